//! The `spoolrelay` binary: parse flags, set up logging, run the daemon or the demo.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use spoolrelay::config::{Config, LogFormat, RunArgs};
use spoolrelay::{shutdown, Shutdown};

#[cfg(feature = "demo")]
mod demo;

#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Log lines on stderr: `text` (colours only when stderr is a terminal) or `json` (one
    /// object per line, for log shippers). Which lines: `RUST_LOG` (see docs/operations.md).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "SPOOLRELAY_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Kafka end to end in one process: a mock broker, the daemon, N messages in and back out.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo draws progress bars; its per-event log lines would only scramble them.
    let default_level = if cli.command.is_some() {
        "warn"
    } else {
        "info"
    };
    let log_format = cli.log_format;
    init_logging(log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report_fatal(log_format, &format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            #[cfg(feature = "demo")]
            Some(Command::Demo(args)) => demo::run(args).await.map(|()| ExitCode::SUCCESS),
            None => serve(cli.run).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            report_fatal(log_format, &format!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Runs the daemon until a signal or a finished drain stops it. The exit code is 0, or the
/// one a drain asked for (docs/operations.md, "Draining a node").
async fn serve(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = Config::resolve(args).await?;
    // Before the daemon starts and says it listens: see `os_signal`.
    let signal = shutdown::os_signal();
    let stop = Shutdown::new();
    let daemon = spoolrelay::start(config, stop.clone()).await?;
    // The spool is open and the listener bound: what systemd's Type=notify waits for.
    systemd_notify(sd_notify::NotifyState::Ready);
    let drain = daemon.drain.clone();
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        signal.await;
        tracing::info!("signal received; shutting down");
        signal_stop.trigger();
    });
    let stopped = stop.clone();
    let stopping = tokio::spawn(async move {
        stop.wait().await;
        systemd_notify(sd_notify::NotifyState::Stopping);
    });
    let waited = daemon.wait().await;
    // The runtime ends when this returns, and with it any task not yet run: make sure
    // STOPPING=1 went out (normally the moment shutdown began) before the process exits.
    stopped.trigger();
    let _ = stopping.await;
    waited?;
    Ok(ExitCode::from(drain.exit_code().unwrap_or(0)))
}

/// Tells systemd (`Type=notify`) about a state change. Without `NOTIFY_SOCKET` (not under
/// systemd) this does nothing; a failure to send is logged, never fatal: the relay works
/// without its supervisor knowing.
fn systemd_notify(state: sd_notify::NotifyState) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (tracing's `EnvFilter` syntax, e.g.
/// `info,spoolrelay::dispatch=debug`) or `default_level` when it is unset or invalid.
/// Colours only on a terminal: a file or journald would get the escape codes verbatim.
fn init_logging(format: LogFormat, default_level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
}

/// The error that stops the daemon: a plain line for people, a JSON log object (level ERROR)
/// under `--log-format json`, so a log shipper parses every line.
fn report_fatal(format: LogFormat, error: &str) {
    match format {
        LogFormat::Text => eprintln!("spoolrelay: {error}"),
        LogFormat::Json => tracing::error!(error, "spoolrelay stopped"),
    }
}
