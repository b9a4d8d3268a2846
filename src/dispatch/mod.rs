//! The dispatcher: one `QueueWorker` (`queue.rs`) per queue that has work.
//!
//! The supervisor here starts and wakes workers. After each spool change tick it asks the
//! spool which queues had messages scheduled since the last tick
//! ([`Spool::take_touched_queues`]) and, for each, wakes its worker or starts one: its cost
//! follows the queues that changed, never every queue it knows (no scan or sort of all
//! names per commit, no periodic timer). A worker sleeps until its own next due time (or a
//! connection's idle deadline); it is woken by the supervisor, a finished send, a suspend
//! or resume, or shutdown.
//!
//! A worker whose queue is empty, with nothing in flight and no connection left open,
//! asks the supervisor to retire ([`Retire`]); the supervisor agrees unless a message came
//! in meanwhile (it checks the spool, so a message scheduled after the check is one it
//! will see as touched, and it starts a new worker for it). Retired queues are reaped later
//! (`reaper.rs`). At shutdown the supervisor waits for every worker to drain.
//! A worker of a queue in [`Suspensions`] leases nothing.
//!
//! New workers start no faster than connections can be handed out: a new queue that finds
//! every start slot taken waits in line as a name (`admission.rs`).

mod admission;
mod backoff;
mod batching;
mod budget;
mod connection;
pub mod decide;
mod deliver;
mod queue;
mod rates;
pub mod reaper;
mod sends;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use policy::Policy;
use spool::Spool;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

pub use backoff::{ConnectBackoff, TokenBucket};
pub use decide::{decide, retry_delay, Event, Fate, Lease};
pub use deliver::policy_message;

use crate::shutdown::Shutdown;
use crate::suspensions::Suspensions;
use crate::telemetry::Telemetry;

/// The supervisor: starts a `QueueWorker` per queue that has work, reaps idle queues.
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
    /// How long a queue stays empty and idle before its worker, connections and metrics
    /// series are gone (`--queue-reap-interval`).
    pub reap_interval: Duration,
    /// Most connections open at once over all queues (`--max-broker-connections`).
    pub max_connections: usize,
}

/// A worker's request to end: granted (`true`) only if its queue is still empty.
pub(crate) struct Retire {
    queue: String,
    reply: oneshot::Sender<bool>,
}

/// A queue's worker, or its place in the line for a start slot.
enum Worker {
    Running {
        handle: JoinHandle<()>,
        wake: Arc<Notify>,
    },
    /// In [`admission::Admission`]'s line.
    Waiting,
}

/// What every worker shares with the supervisor.
#[derive(Clone)]
pub(crate) struct WorkerEnv {
    spool: Spool,
    policy: Policy,
    shutdown: Shutdown,
    drain_timeout: Duration,
    suspensions: Suspensions,
    /// How long an unused connection stays open: `min(IDLE_TIMEOUT, reap interval)`.
    idle_timeout: Duration,
    retire: mpsc::UnboundedSender<Retire>,
    trim: reaper::Trim,
    budget: budget::Budget,
    /// `overall_max_message_rate` buckets, shared by the queues of a tenant.
    shared_rates: rates::SharedRates,
}

impl Dispatcher {
    /// Runs until shutdown, then waits for every worker to drain.
    pub async fn run(self) {
        let (retire_tx, mut retire_rx) = mpsc::unbounded_channel();
        let trim = reaper::Trim::new(self.policy.clone());
        let trimmer = tokio::spawn(trim.clone().run());
        let env = WorkerEnv {
            spool: self.spool.clone(),
            policy: self.policy.clone(),
            shutdown: self.shutdown.clone(),
            drain_timeout: self.drain_timeout,
            suspensions: self.suspensions.clone(),
            idle_timeout: connection::IDLE_TIMEOUT.min(self.reap_interval),
            retire: retire_tx,
            trim,
            budget: budget::Budget::new(self.max_connections),
            shared_rates: rates::SharedRates::default(),
        };
        let mut workers: HashMap<String, Worker> = HashMap::new();
        let mut admission = admission::Admission::new(
            self.max_connections
                .saturating_mul(admission::SLOTS_PER_CONNECTION),
        );
        let mut idle = reaper::IdleQueues::default();
        let mut changes = self.spool.watch_changes();
        let mut spool_alive = true;
        while !self.shutdown.is_triggered() {
            for queue in self.spool.take_touched_queues() {
                match workers.get(&queue) {
                    Some(Worker::Running { handle, wake }) if !handle.is_finished() => {
                        wake.notify_one()
                    }
                    Some(Worker::Waiting) => {}
                    _ => {
                        idle.remove(&queue);
                        let worker = match admission.try_start() {
                            Some(slot) => self.start_worker(&env, queue.clone(), slot),
                            None => {
                                admission.wait(queue.clone());
                                Worker::Waiting
                            }
                        };
                        workers.insert(queue, worker);
                    }
                }
            }
            let metrics = &self.telemetry.metrics;
            metrics.dispatch_waiting.set(gauge(admission.waiting()));
            metrics
                .dispatch_workers
                .set(gauge(workers.len().saturating_sub(admission.waiting())));
            let reap_at = idle.next_deadline();
            tokio::select! {
                changed = changes.changed(), if spool_alive => spool_alive = changed.is_ok(),
                // Every queue a slot is free for, not one per pass: a pass takes the index lock.
                ready = admission.ready(), if admission.has_waiting() => {
                    for (queue, slot) in ready {
                        let worker = self.start_worker(&env, queue.clone(), slot);
                        workers.insert(queue, worker);
                    }
                }
                Some(ask) = retire_rx.recv() => {
                    // Still empty: any message scheduled from now on is touched, and gets a new worker.
                    let granted = self.spool.next_due(&ask.queue).is_none();
                    if ask.reply.send(granted).is_ok() && granted {
                        workers.remove(&ask.queue);
                        crate::queue_series::shrink_if_sparse(&mut workers);
                        idle.push(ask.queue, tokio::time::Instant::now() + self.reap_interval);
                    }
                }
                _ = sleep_until(reap_at) => self.reap(&mut idle, &env),
                _ = self.shutdown.wait() => {}
            }
        }
        trimmer.abort();
        // Workers asking to retire get "no" (their reply senders are dropped with the
        // queue), see the shutdown and drain.
        drop(retire_rx);
        // Queues still waiting for a start slot keep their messages spooled for the next start.
        for (queue, worker) in workers {
            if let Worker::Running { handle, .. } = worker {
                if let Err(e) = handle.await {
                    tracing::error!(%queue, error = %e, "queue worker failed");
                }
            }
        }
    }

    fn start_worker(&self, env: &WorkerEnv, queue: String, slot: admission::StartSlot) -> Worker {
        let wake = Arc::new(Notify::new());
        let telemetry = self.telemetry.for_queue(&queue);
        let worker = queue::QueueWorker::new(queue, env.clone(), wake.clone(), telemetry);
        Worker::Running {
            handle: tokio::spawn(worker.run(slot)),
            wake,
        }
    }

    /// Forgets the idle queues whose reap deadline passed, except suspended ones (they are
    /// looked at again one interval later), then asks for a trim: the reaped series, map
    /// entries and closed connections' budget entries are freed memory glibc would
    /// otherwise keep.
    fn reap(&self, idle: &mut reaper::IdleQueues, env: &WorkerEnv) {
        let now = tokio::time::Instant::now();
        let due = idle.due(now);
        let mut reaped = 0usize;
        for queue in due {
            if self.suspensions.is_suspended(&queue) || !self.telemetry.reap(&queue) {
                idle.push(queue, now + self.reap_interval);
            } else {
                reaped += 1;
            }
        }
        if reaped > 0 {
            tracing::debug!(reaped, still_idle = idle.len(), "reaped idle queues");
            env.budget.forget_closed();
            env.trim.freed();
        }
    }
}

/// A count as a gauge's value.
fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Sleeps until `at`, or for ever without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
