//! Command line and its merge with the policy's `init` event.
//!
//! A KumoMTA policy configures the server from Lua (`kumo.define_spool`,
//! `kumo.start_http_listener` in `init`); spoolrelay honours that so a Kumo policy runs
//! unchanged, but a flag given on the command line always wins, and built-in defaults fill
//! what neither says.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use policy::{Policy, PolicyLimits};

/// Spool directory when neither flag nor policy names one.
pub const DEFAULT_SPOOL: &str = "./spool";
/// HTTP listen address when neither flag nor policy names one.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8000";
/// Default `--max-body-bytes` (16 MiB).
pub const DEFAULT_MAX_BODY: usize = 16 << 20;

/// How log lines are written (`--log-format`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines; ANSI colours only when stderr is a terminal.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`, `spans`.
    Json,
}

/// The daemon's flags (`spoolrelay --policy FILE ...`).
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The Lua policy (KumoMTA-compatible).
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Spool directory [default: ./spool, or the policy's kumo.define_spool path].
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,
    /// HTTP listen address [default: 127.0.0.1:8000, or the policy's start_http_listener].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Largest accepted request body; bigger requests get 413.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_BODY)]
    pub max_body_bytes: usize,
    /// How long in-flight sends may finish after SIGTERM before they are abandoned (and
    /// sent again after restart).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Bearer token the admin API (/api/admin/...) requires. Without one the daemon refuses
    /// to listen on a non-loopback address (unless --no-admin-api).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "SPOOLRELAY_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Serve no admin API at all (ingest, /metrics and /healthz only).
    #[arg(long)]
    pub no_admin_api: bool,
    /// Store the messages one request brings to one queue as chunks (spool v2, the
    /// default) instead of one record each: faster ingest, drains and restarts
    /// (docs/performance.md, "Spool v2"); `--spool-chunked-ingest=false` writes v1 records
    /// only. A spool written with chunks needs a build that reads them (every build since
    /// 2026-12-01); every build reads v1 records.
    #[arg(
        long,
        env = "SPOOLRELAY_SPOOL_CHUNKED_INGEST",
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub spool_chunked_ingest: bool,
    /// Write a JSONL delivery log (one line per reception and send outcome) to FILE.
    #[arg(long, value_name = "FILE")]
    pub delivery_log: Option<PathBuf>,
    /// Rotate the delivery log when it would pass this size (FILE.1 … FILE.5 are kept).
    #[arg(long, value_name = "BYTES", default_value_t = crate::delivery_log::DEFAULT_MAX_BYTES)]
    pub delivery_log_max_bytes: u64,
    // -- Lua isolation --
    /// Bound on each run of the policy chunk, `init`, `get_queue_config`, a constructor or
    /// a log hook; code past it is stopped (even a loop that never yields) and its Lua state
    /// rebuilt. Sends are bounded by the queue's own send_timeout.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub lua_event_timeout: Duration,
    /// Memory one Lua state may allocate, in MiB; a call that needs more fails with an error
    /// naming the limit and the state is rebuilt.
    #[arg(long, value_name = "MIB", default_value_t = (policy::DEFAULT_MEMORY_LIMIT >> 20) as u64, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub lua_memory_limit: u64,
    /// Isolation and capacity bounds (`--max-*`, `--http-*`, `--lua-*`).
    #[command(flatten)]
    pub limits: Limits,
    /// Queue reaping and metrics labels (`--queue-reap-interval`, `--metrics-queue-label`).
    #[command(flatten)]
    pub queues: crate::queue_series::QueueArgs,
    /// HTTPS and mutual TLS on the listener (`--tls-*`).
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Ingest and metrics tokens (`--ingest-token*`, `--metrics-token`).
    #[command(flatten)]
    pub auth: crate::ingest_auth::AuthArgs,
}

/// Ingest bounds, HTTP time limits and spool capacity. One
/// struct, flattened into the command line and carried whole in [`Config`], so the
/// handlers, the server loop and the capacity gate read one value.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most recipients one POST /api/inject/v1 may name (413 above it).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_inject_recipients: usize,
    /// Most bytes an injection may expand to: recipients x content bytes (413 above it).
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20)]
    pub max_inject_expanded_bytes: u64,
    /// Most lines (blank ones included) one NDJSON batch may have (413 above it).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_batch_lines: usize,
    /// Time a client has to send a request's headers, counted from the connection being
    /// ready for a request (accepted, or the previous response sent).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_header_timeout: Duration,
    /// Time a client has to send a request's whole body once its headers arrived (408).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http_body_timeout: Duration,
    /// A connection that sends nothing for this long while none of its requests is being
    /// handled is closed (keep-alive idle limit).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub http_idle_timeout: Duration,
    /// Most HTTP connections served at once; above it a connection gets a 503 and is closed.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_connections: usize,
    /// How long shutdown lets in-flight HTTP requests finish before dropping connections.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub http_shutdown_grace: Duration,
    /// Refuse ingest (503 + Retry-After) while queued messages hold this many bytes or
    /// more [default: no limit].
    #[arg(long, value_name = "BYTES")]
    pub max_spool_bytes: Option<u64>,
    /// Refuse ingest (503 + Retry-After) while the spool's filesystem has less free space
    /// than this.
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20)]
    pub min_free_disk: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_inject_recipients: 10_000,
            max_inject_expanded_bytes: 64 << 20,
            max_batch_lines: 10_000,
            http_header_timeout: Duration::from_secs(10),
            http_body_timeout: Duration::from_secs(30),
            http_idle_timeout: Duration::from_secs(5),
            max_connections: 1024,
            http_shutdown_grace: Duration::from_secs(2),
            max_spool_bytes: None,
            min_free_disk: 64 << 20,
        }
    }
}

/// Everything the daemon needs, resolved.
#[derive(Clone)]
pub struct Config {
    /// The loaded Lua policy.
    pub policy: Policy,
    /// The spool directory.
    pub spool_dir: PathBuf,
    /// HTTP listen address (`host:port`; port 0 picks one).
    pub listen: String,
    /// Largest accepted request body; bigger requests get 413.
    pub max_body_bytes: usize,
    /// How long in-flight sends may finish after shutdown is asked.
    pub drain_timeout: Duration,
    /// How the spool is opened; tests inject disk faults through it.
    pub spool_options: spool::SpoolOptions,
    /// Bearer token for the admin API (`None`: no token; then only loopback is allowed).
    pub admin_token: Option<String>,
    /// Whether the admin API is served at all.
    pub admin_api: bool,
    /// Where the delivery log is written (`None`: no log).
    pub delivery_log: Option<PathBuf>,
    /// Size at which the delivery log is rotated.
    pub delivery_log_max_bytes: u64,
    /// Log hooks the policy declared in `init` (`kumo.configure_log_hook`).
    pub log_hooks: Vec<String>,
    // -- Lua isolation --
    /// The bounds the policy was loaded with (`--lua-event-timeout`, `--lua-memory-limit`).
    pub lua_limits: PolicyLimits,
    /// Ingest bounds, HTTP limits, spool capacity.
    pub limits: Limits,
    /// Queue reaping and metrics labels.
    pub queues: crate::queue_series::QueueArgs,
    /// HTTPS and mutual TLS on the listener.
    pub tls: crate::tls::TlsArgs,
    /// Ingest and metrics tokens.
    pub auth: crate::ingest_auth::AuthArgs,
}

impl Config {
    /// A config with built-in defaults around an already loaded policy (tests, demo).
    pub fn new(policy: Policy, spool_dir: PathBuf) -> Config {
        let lua_limits = policy.limits();
        Config {
            policy,
            spool_dir,
            listen: DEFAULT_LISTEN.into(),
            max_body_bytes: DEFAULT_MAX_BODY,
            drain_timeout: Duration::from_secs(10),
            spool_options: Default::default(),
            admin_token: None,
            admin_api: true,
            delivery_log: None,
            delivery_log_max_bytes: crate::delivery_log::DEFAULT_MAX_BYTES,
            log_hooks: Vec::new(),
            lua_limits,
            limits: Limits::default(),
            queues: Default::default(),
            tls: Default::default(),
            auth: Default::default(),
        }
    }

    /// Loads the policy, runs its `init` event, and merges: flags > policy > defaults.
    pub async fn resolve(args: RunArgs) -> anyhow::Result<Config> {
        let path = args
            .policy
            .context("--policy FILE is required (or use `spoolrelay demo`)")?;
        // The policy error carries the Lua chunk name and line; show it as is.
        anyhow::ensure!(
            !args.lua_event_timeout.is_zero(),
            "--lua-event-timeout must be more than 0 (every policy call would time out)"
        );
        let lua_limits = PolicyLimits {
            event_timeout: args.lua_event_timeout,
            memory_limit: (args.lua_memory_limit as usize) << 20,
        };
        let policy = Policy::load_with(&path, lua_limits)
            .map_err(|e| anyhow::anyhow!("cannot load policy {}: {e}", path.display()))?;
        let init = policy
            .init_config()
            .await
            .map_err(|e| anyhow::anyhow!("policy {} init event failed: {e}", path.display()))?;
        Ok(Config {
            policy,
            spool_dir: args
                .spool
                .or(init.spool_path)
                .unwrap_or_else(|| DEFAULT_SPOOL.into()),
            listen: args
                .listen
                .or(init.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.into()),
            max_body_bytes: args.max_body_bytes,
            drain_timeout: args.drain_timeout,
            spool_options: spool::SpoolOptions {
                chunked_ingest: args.spool_chunked_ingest,
                ..spool_options_from_env()
            },
            // An empty SPOOLRELAY_ADMIN_TOKEN means no token, not the empty token.
            admin_token: args.admin_token.filter(|t| !t.is_empty()),
            admin_api: !args.no_admin_api,
            delivery_log: args.delivery_log,
            delivery_log_max_bytes: args.delivery_log_max_bytes,
            log_hooks: init.log_hooks,
            lua_limits,
            limits: args.limits,
            queues: args.queues,
            tls: args.tls,
            auth: args.auth,
        })
    }
}

/// `SPOOLRELAY_TEST_SKIP_FSYNC=1` makes the spool acknowledge without its fdatasync
/// (`SyncFaults::skip_syncs`): the negative control of the power-loss test
/// (`tests/powerloss.rs`), which must then lose acknowledged messages. Never for production:
/// a 2xx then means nothing. Logged as an error at startup.
fn spool_options_from_env() -> spool::SpoolOptions {
    let options = spool::SpoolOptions::default();
    if std::env::var_os("SPOOLRELAY_TEST_SKIP_FSYNC").is_some_and(|v| v == "1") {
        tracing::error!(
            "SPOOLRELAY_TEST_SKIP_FSYNC=1: the spool does not fsync; acknowledged messages are lost on power failure (tests only)"
        );
        options.faults.skip_syncs();
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn limit_flags_default_to_limits_default() {
        let cli = Cli::try_parse_from(["spoolrelay"]).unwrap();
        assert_eq!(cli.run.limits, Limits::default());
        let cli = Cli::try_parse_from([
            "spoolrelay",
            "--max-spool-bytes",
            "1000",
            "--http-header-timeout",
            "3s",
        ])
        .unwrap();
        assert_eq!(cli.run.limits.max_spool_bytes, Some(1000));
        assert_eq!(cli.run.limits.http_header_timeout, Duration::from_secs(3));
    }

    #[test]
    fn chunked_ingest_takes_the_flag_or_a_boolish_value() {
        let cli = Cli::try_parse_from(["spoolrelay"]).unwrap();
        assert!(cli.run.spool_chunked_ingest, "on by default");
        let cli = Cli::try_parse_from(["spoolrelay", "--spool-chunked-ingest"]).unwrap();
        assert!(cli.run.spool_chunked_ingest);
        let cli = Cli::try_parse_from(["spoolrelay", "--spool-chunked-ingest=false"]).unwrap();
        assert!(!cli.run.spool_chunked_ingest);
        // What SPOOLRELAY_SPOOL_CHUNKED_INGEST may hold (the test suite sets it to 1).
        use clap::builder::TypedValueParser;
        let value = clap::builder::BoolishValueParser::new();
        for (raw, want) in [("1", true), ("yes", true), ("0", false), ("false", false)] {
            let cmd = clap::Command::new("t");
            let parsed = value
                .parse_ref(&cmd, None, std::ffi::OsStr::new(raw))
                .unwrap();
            assert_eq!(parsed, want, "{raw}");
        }
    }
}
