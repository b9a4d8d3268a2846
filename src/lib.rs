//! # spoolrelay: HTTP in → durable spool → Lua policy → brokers out
//!
//! The daemon is three parts around one [`Spool`]:
//! - [`ingest`]: axum handlers; a 2xx means the message is fsynced.
//! - [`dispatch`]: a worker per queue leasing due messages and sending them through the
//!   policy's connections; only a delivered message is deleted.
//! - [`shutdown`]: SIGTERM/SIGINT stop HTTP first, then leasing; in-flight sends get a
//!   deadline; the spool is synced; a restart resumes where this run stopped.
//!
//! Around them, for operators: [`admin_api`] (`/api/admin/...`, what `spoolctl --url` talks
//! to), [`suspensions`] (the queues an operator suspended), [`metrics`] (`/metrics`), and
//! the [`delivery_log`] (its Lua hook's task in [`log_hook_task`]), [`queue_series`] (which
//! per-queue series exist and how they are labelled); ingest and dispatch
//! report outcomes to both through [`telemetry`]. [`config`] holds the flags,
//! [`http_error`] the JSON error answers ingest and admin share. Metadata is converted
//! between JSON and the spool by [`spool::meta_json`].
//!
//! In front of ingest: [`server`] (the accept loop: header, body and idle time limits, a
//! connection cap, a bounded shutdown grace), [`capacity`] (503 + `Retry-After` at
//! `--max-spool-bytes` / `--min-free-disk`), [`tls`] (HTTPS and mutual TLS), [`ingest_auth`]
//! (ingest and `/metrics` bearer tokens: 401/403) and [`health`] (`/livez`, `/readyz`).
//! [`drain`] (`POST /api/admin/drain`) turns ingest and readiness off and stops the
//! daemon once nothing deliverable remains, with an exit code that says what is left.
//!
//! [`start`] runs all of it in the current tokio runtime and returns once it is serving,
//! so tests and the demo (`src/demo/`, part of the binary only: `main.rs` declares it, `lib.rs` does not) embed the daemon without a
//! subprocess.

#![warn(missing_docs)]

pub mod admin_api;
pub mod capacity;
pub mod config;
pub mod delivery_log;
pub mod dispatch;
pub mod drain;
pub mod health;
pub mod http_error;
pub mod ingest;
pub mod ingest_auth;
pub mod log_hook_task;
pub mod memory;
pub mod metrics;
pub mod queue_metrics;
pub mod queue_series;
pub mod reload;
pub mod server;
pub mod shutdown;
pub mod suspensions;
pub mod telemetry;
pub mod tls;

use std::net::SocketAddr;

use anyhow::Context;
use spool::{RecoveryReport, Spool};
use tokio::task::JoinHandle;

pub use config::Config;
pub use shutdown::Shutdown;

/// A running daemon.
pub struct Daemon {
    /// Where the HTTP API listens (the real port when `listen` asked for port 0).
    pub addr: SocketAddr,
    /// The daemon's spool, for inspection. Drop it before reopening the directory.
    pub spool: Spool,
    /// The drain switch; `main` reads the exit code a finished drain asks for.
    pub drain: drain::Drain,
    shutdown: Shutdown,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    /// Asks the daemon to stop and waits until it has (drained, synced).
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        self.wait().await
    }

    /// Waits until the daemon stopped (its `Shutdown` was triggered elsewhere).
    pub async fn wait(self) -> anyhow::Result<()> {
        let Daemon { spool, task, .. } = self;
        drop(spool);
        task.await.context("daemon task failed")?
    }
}

/// How long shutdown waits for the log hook task to spool its last records.
const HOOK_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Opens the spool, binds the listener and starts serving and dispatching. Returns once
/// requests are accepted; the daemon stops when `shutdown` is triggered.
pub async fn start(config: Config, shutdown: Shutdown) -> anyhow::Result<Daemon> {
    let (dir, options) = (config.spool_dir.clone(), config.spool_options.clone());
    let (spool, report) = tokio::task::spawn_blocking(move || Spool::open(&dir, options))
        .await
        .context("spool open task failed")?
        .with_context(|| format!("cannot open spool {}", config.spool_dir.display()))?;
    // The recovery scan decodes records and frees them at once, and the index was just
    // rebuilt: without this, a daemon that recovered a million messages would carry the
    // scan's peak as RSS for good (jemalloc's dirty pages and glibc's arenas alike). It runs
    // beside the start, not before it: purging a large heap takes about 0.1 s (P4).
    drop(tokio::task::spawn_blocking(memory::release_free_memory));
    log_recovery(&config, &report);
    // Bad certificates or token files stop the start with the flag and file named.
    let tls = tls::acceptor(&config.tls)?;
    let tokens = ingest_auth::Tokens::from_args(&config.auth)?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    if config.admin_api {
        admin_api::check_exposure(addr, config.admin_token.as_deref())?;
    }
    let mut telemetry = telemetry::Telemetry {
        metrics: std::sync::Arc::new(metrics::Metrics::new(config.queues.metrics_queue_label)),
        ..Default::default()
    };
    spool.observe_commits(telemetry.metrics.commit_observer());
    let log_writer = match &config.delivery_log {
        Some(path) => {
            let (log, writer) = delivery_log::DeliveryLog::open(
                path,
                config.delivery_log_max_bytes,
                telemetry.metrics.log_dropped.clone(),
            )
            .with_context(|| format!("cannot open the delivery log {}", path.display()))?;
            telemetry.log = log;
            tracing::info!(path = %path.display(), "writing the delivery log");
            Some(writer)
        }
        None => None,
    };
    let hook_task = if config.log_hooks.is_empty() {
        None
    } else {
        let (sink, task) = log_hook_task::start(
            config.policy.clone(),
            spool.clone(),
            config.log_hooks.clone(),
            telemetry.metrics.log_dropped.clone(),
        );
        telemetry.hooks = Some(sink);
        tracing::info!(hooks = ?config.log_hooks, "log hooks enabled");
        Some(task)
    };
    tracing::info!(%addr, admin_api = config.admin_api, admin_token = config.admin_token.is_some(),
        tls = tls.is_some(), mutual_tls = config.tls.tls_client_ca.is_some(),
        ingest_tokens = tokens.is_enabled(), allocator = memory::allocator(), "HTTP API listening");
    if !tokens.is_enabled() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "ingest is open to anyone who can reach this non-loopback address; \
            set --ingest-token or --ingest-tokens-file to require a bearer token");
    }

    let suspensions = suspensions::Suspensions::load(spool.clone())
        .await
        .context("cannot read the queue suspensions kept in the spool")?;
    let drain = drain::Drain::new(spool.clone(), suspensions.clone(), shutdown.clone());
    let limits = &config.limits;
    let capacity = capacity::Capacity::new(
        spool.clone(),
        &config.spool_dir,
        limits.max_spool_bytes,
        limits.min_free_disk,
    );
    let refresher = capacity.spawn_refresher(shutdown.clone());
    let ingest = ingest::Ingest {
        spool: spool.clone(),
        telemetry: telemetry.clone(),
        limits: ingest::IngestLimits::from(limits),
        capacity: capacity.clone(),
    };
    let mut app = ingest::router(
        ingest,
        config.max_body_bytes,
        capacity.clone(),
        drain.clone(),
        tokens.clone(),
    )
    .merge(metrics_router(
        &config,
        &spool,
        &telemetry,
        &suspensions,
        &capacity,
    ))
    .merge(health::router(health::Health {
        spool: spool.clone(),
        capacity,
        shutdown: shutdown.clone(),
        drain: drain.clone(),
    }));
    if config.admin_api {
        let state = admin_api::Admin {
            spool: spool.clone(),
            suspensions: suspensions.clone(),
            drain: drain.clone(),
            policy: config.policy.clone(),
        };
        app = app.merge(admin_api::router(state, config.admin_token.clone()));
    }
    // Wrong paths and methods get the same JSON error shape as every other refusal.
    // Every body is read under the body deadline before any handler sees it.
    let http_limits = server::HttpLimits::new(limits, config.max_body_bytes);
    let app = app
        .fallback(http_error::not_found)
        .method_not_allowed_fallback(http_error::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            http_limits.clone(),
            server::read_body_within,
        ))
        // Outside the body reader: a client without a valid ingest token is refused before
        // its body is read, so it cannot make the relay buffer --max-body-bytes for it.
        .layer(axum::middleware::from_fn_with_state(
            tokens.clone(),
            ingest_auth::refuse_early,
        ));
    let http = tokio::spawn(server::serve(
        listener,
        app,
        http_limits,
        tls,
        shutdown.clone(),
    ));
    let dispatcher = dispatch::Dispatcher {
        spool: spool.clone(),
        policy: config.policy.clone(),
        shutdown: shutdown.clone(),
        drain_timeout: config.drain_timeout,
        suspensions,
        telemetry,
        reap_interval: config.queues.queue_reap_interval,
        max_connections: config.queues.max_broker_connections,
    };
    let dispatch = tokio::spawn(dispatcher.run());
    reload::on_sighup(config.policy.clone(), shutdown.clone());
    let task_spool = spool.clone();
    let task = tokio::spawn(async move {
        http.await.context("HTTP task failed")?;
        dispatch.await.context("dispatcher task failed")?;
        // Not awaited: a statvfs stuck on a sick filesystem must not hold the exit.
        refresher.abort();
        if let Some(mut task) = hook_task {
            // Every producer is gone, so the hook task ends once it spooled what it has.
            if tokio::time::timeout(HOOK_DRAIN, &mut task).await.is_err() {
                task.abort();
                tracing::warn!(
                    "log hook task did not finish in {HOOK_DRAIN:?}; its last records are lost"
                );
            }
        }
        task_spool.sync().await.context("final spool sync failed")?;
        if let Some(writer) = log_writer {
            tokio::task::spawn_blocking(move || writer.finish())
                .await
                .context("delivery log writer failed")?;
        }
        tracing::info!("stopped; spool synced");
        Ok(())
    });
    Ok(Daemon {
        addr,
        spool,
        drain,
        shutdown,
        task,
    })
}

/// `GET /metrics`, behind `--metrics-token` when one is set.
fn metrics_router(
    config: &Config,
    spool: &Spool,
    telemetry: &telemetry::Telemetry,
    suspensions: &suspensions::Suspensions,
    capacity: &std::sync::Arc<capacity::Capacity>,
) -> axum::Router {
    let router = metrics::router(
        spool.clone(),
        telemetry.metrics.clone(),
        suspensions.clone(),
        capacity.clone(),
    );
    match config
        .auth
        .metrics_token
        .as_deref()
        .filter(|t| !t.is_empty())
    {
        None => router,
        Some(token) => router.route_layer(axum::middleware::from_fn_with_state(
            ingest_auth::MetricsToken::new(token),
            ingest_auth::require_metrics_token,
        )),
    }
}

/// The startup summary: what the spool held, per queue.
fn log_recovery(config: &Config, report: &RecoveryReport) {
    let total: u64 = report.queues.values().map(|(n, _)| n).sum();
    tracing::info!(
        spool = %config.spool_dir.display(),
        queued = total,
        queues = report.queues.len(),
        dead_letter = report.dead_letter,
        quarantined_now = report.quarantined_now,
        quarantine_total = report.quarantine_total,
        "spool opened"
    );
    for (queue, (count, bytes)) in &report.queues {
        tracing::info!(%queue, messages = count, bytes, "recovered queue");
    }
    if report.quarantined_now > 0 {
        tracing::warn!(
            count = report.quarantined_now,
            "corrupt records were quarantined at open (see `spoolctl`)"
        );
    }
}
