//! The `spoolrelay` binary: parse flags, set up logging, run the daemon or the demo.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use spoolrelay::config::{Config, RunArgs};
use spoolrelay::{shutdown, Shutdown};

#[path = "../demo/mod.rs"]
mod demo;

#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Kafka end to end in one process: a mock broker, the daemon, N messages in and back out.
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("spoolrelay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Some(Command::Demo(args)) => demo::run(args).await,
            None => serve(cli.run).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spoolrelay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    let config = Config::resolve(args).await?;
    let stop = Shutdown::new();
    let daemon = spoolrelay::start(config, stop.clone()).await?;
    tokio::spawn(async move {
        shutdown::os_signal().await;
        tracing::info!("signal received; shutting down");
        stop.trigger();
    });
    daemon.wait().await
}
