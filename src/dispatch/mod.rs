//! The dispatcher: one `QueueWorker` (`queue.rs`) per queue that holds messages.
//!
//! The supervisor here only discovers queues (from `Spool::queue_names`, woken by the
//! spool's change ticks and a one-second timer) and starts a worker for each queue that
//! has none. A worker exits when its queue is empty and its connections are closed; the
//! next message for that queue starts a new one. At shutdown the supervisor waits for every
//! worker to drain.
//! A worker of a queue in [`Suspensions`] leases nothing.

mod backoff;
mod connection;
pub mod decide;
mod deliver;
mod queue;

use std::collections::HashMap;
use std::time::Duration;

use policy::{Policy, QueueConfig};
use spool::Spool;
use tokio::task::JoinHandle;

pub use backoff::{ConnectBackoff, TokenBucket};
pub use decide::{decide, retry_delay, Event, Fate, Lease};
pub use deliver::policy_message;

use crate::shutdown::Shutdown;
use crate::suspensions::Suspensions;
use crate::telemetry::Telemetry;

/// The supervisor: starts a `QueueWorker` per queue that holds messages.
pub struct Dispatcher {
    /// The spool the workers lease from.
    pub spool: Spool,
    /// The policy that configures queues and builds connections.
    pub policy: Policy,
    /// Stops leasing when triggered.
    pub shutdown: Shutdown,
    /// How long in-flight sends may take to finish after shutdown was asked.
    pub drain_timeout: Duration,
    /// Queues whose workers lease nothing.
    pub suspensions: Suspensions,
    /// Where outcomes are reported (metrics, delivery log).
    pub telemetry: Telemetry,
}

impl Dispatcher {
    /// Runs until shutdown, then waits for every worker to drain.
    pub async fn run(self) {
        let mut workers: HashMap<String, JoinHandle<()>> = HashMap::new();
        let mut changes = self.spool.watch_changes();
        let mut spool_alive = true;
        while !self.shutdown.is_triggered() {
            workers.retain(|_, worker| !worker.is_finished());
            for queue in self.spool.queue_names() {
                workers.entry(queue.clone()).or_insert_with(|| {
                    let queue_name = queue.clone();
                    let worker = queue::QueueWorker::new(
                        queue,
                        self.spool.clone(),
                        self.policy.clone(),
                        self.shutdown.clone(),
                        self.drain_timeout,
                        self.suspensions.clone(),
                        self.telemetry.for_queue(&queue_name),
                    );
                    tokio::spawn(worker.run())
                });
            }
            tokio::select! {
                changed = changes.changed(), if spool_alive => spool_alive = changed.is_ok(),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.shutdown.wait() => {}
            }
        }
        for (queue, worker) in workers {
            if let Err(e) = worker.await {
                tracing::error!(%queue, error = %e, "queue worker failed");
            }
        }
    }
}

/// The token bucket for a queue's `max_message_rate`, if it has one.
fn token_bucket(cfg: &QueueConfig) -> Option<TokenBucket> {
    cfg.max_message_rate
        .as_ref()
        .map(|rate| TokenBucket::new(rate.limit, rate.per, spool::now_ms()))
}
