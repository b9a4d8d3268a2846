//! One queue's scheduler: lease what is due, hand it to connections, sleep otherwise.
//!
//! The worker never waits on a send itself: each send runs as its own task that settles its
//! messages with the spool (see [`deliver`](super::deliver)), so a slow broker only ever
//! holds its in-flight slots. The worker's loop is: refresh config → make room (open a
//! connection if all are full) → lease as many due messages as there is room for (once
//! `min_batch_size` of them gathered or `max_batch_latency` passed: `batching.rs`) → spawn
//! sends → sleep until the next due time or connection idle deadline, a wake from the
//! supervisor (its queue was touched), a finished send, a suspend/resume or shutdown. A
//! worker with nothing timed to do sets no timer at all. Once its queue is empty, nothing
//! is in flight and its connections are closed, it asks the supervisor to retire.

use std::sync::Arc;
use std::time::{Duration, Instant};

use policy::{Policy, QueueConfig};
use spool::{Leased, Spool};
use tokio::sync::{oneshot, Notify};

use super::backoff::ConnectBackoff;
use super::batching::{BatchRule, Gather};
use super::connection::{self, Pool};
use super::decide::{decide, Event, Fate};
use super::rates::QueueRates;
use super::sends::Sends;
use super::{deliver, Retire, WorkerEnv};
use crate::shutdown::Shutdown;
use crate::suspensions::Suspensions;
use crate::telemetry::QueueTelemetry;

/// The shortest `refresh_interval` honoured: each refresh is a call into the policy's
/// shared Lua state, which every queue's config goes through.
const MIN_CONFIG_TTL: Duration = Duration::from_secs(1);
/// Upper bound on one connect (a constructor reaching a dead broker may hang).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How soon a worker looks again after a lease failed or came back empty although a
/// message was due (the spool is sick, or another lease raced it).
const RETRY_SOON: Duration = Duration::from_secs(1);
/// Most messages leased in one call, so one queue cannot hog the index lock.
const MAX_LEASE: usize = 1024;

pub struct QueueWorker {
    queue: String,
    spool: Spool,
    policy: Policy,
    shutdown: Shutdown,
    drain_timeout: Duration,
    config: Option<(Arc<QueueConfig>, Instant)>,
    pool: Pool,
    /// Running sends and the leases each holds (given back if one panics or is aborted).
    sends: Sends,
    /// `max_message_rate` and `overall_max_message_rate`.
    rates: QueueRates,
    backoff: ConnectBackoff,
    blocked_until: Option<Instant>,
    suspensions: Suspensions,
    telemetry: QueueTelemetry,
    /// The policy generation this worker's config and connections come from; a reload moves
    /// it on (see [`QueueWorker::follow_reload`]).
    generation: u64,
    /// Rung by the supervisor when the queue got new messages.
    wake: Arc<Notify>,
    retire: tokio::sync::mpsc::UnboundedSender<Retire>,
}

/// What one fill pass found: sleep at most until `wake`; `None`: until something happens
/// (a new message, a finished send, a resume).
struct NextWake {
    wake: Option<Instant>,
}

impl QueueWorker {
    pub(crate) fn new(
        queue: String,
        env: WorkerEnv,
        wake: Arc<Notify>,
        telemetry: QueueTelemetry,
    ) -> Self {
        QueueWorker {
            pool: Pool::new(&queue, env.idle_timeout, env.trim, env.budget, wake.clone()),
            rates: QueueRates::new(&queue, env.shared_rates),
            sends: Sends::new(&queue, env.spool.clone()),
            queue,
            spool: env.spool,
            generation: env.policy.generation(),
            policy: env.policy,
            shutdown: env.shutdown,
            drain_timeout: env.drain_timeout,
            config: None,
            backoff: ConnectBackoff::default(),
            blocked_until: None,
            suspensions: env.suspensions,
            telemetry,
            wake,
            retire: env.retire,
        }
    }

    /// Runs until shutdown, or until the queue is empty with no connection left open and
    /// the supervisor let it retire. `start` is held for the first fill only (see
    /// `admission.rs`).
    pub async fn run(mut self, start: super::admission::StartSlot) {
        let mut start = Some(start);
        let mut suspensions = self.suspensions.watch();
        let mut reloads = self.policy.generations();
        let shutdown = self.shutdown.clone();
        let wake = self.wake.clone();
        while !self.shutdown.is_triggered() {
            self.follow_reload();
            // Other queues wait for a connection: give up idle ones unless work is due here.
            let make_room = self.pool.room_wanted() && !self.due_now();
            self.pool.close_idle(make_room);
            // A fill may wait on the policy (get_queue_config, a constructor: each bounded by
            // --lua-event-timeout); shutdown does not wait for it. Dropping a fill midway is
            // safe: what it leased is already in `sends`, a half-built connection is dropped.
            let nap = tokio::select! {
                nap = self.fill() => nap,
                _ = shutdown.wait() => break,
            };
            // The first fill is over (connected, nothing due, or backing off): the next new
            // queue may start.
            start.take();
            self.telemetry.set_connections(self.pool.len());
            if self.sends.is_empty()
                && self.pool.is_empty()
                && self.spool.next_due(&self.queue).is_none()
                && self.may_retire().await
            {
                tracing::debug!(queue = %self.queue, "queue is empty; worker retires");
                return;
            }
            // A queue waiting for something timed (a rate token, a batch, a retry) also
            // wakes when its config is due again, so a changed rate applies within
            // `refresh_interval`, not after the old rate's wait.
            let wake_at = [
                nap.wake,
                self.pool.next_idle_deadline(),
                nap.wake.and(self.config_refresh_at()),
            ]
            .into_iter()
            .flatten()
            .min();
            tokio::select! {
                _ = self.sends.next_ended(), if !self.sends.is_empty() => {}
                _ = wake.notified() => {}
                _ = suspensions.changed() => {}
                Ok(()) = reloads.changed() => {}
                _ = sleep_until(wake_at) => {}
                _ = self.shutdown.wait() => {}
            }
            // Reap every send that finished meanwhile, so one fill pass serves them all
            // (reaping one per pass made this loop the bottleneck under a backlog).
            self.sends.reap_ended();
        }
        self.drain().await;
        self.telemetry.set_connections(0);
    }

    /// After a policy reload: the queue's config is asked again, and connections built
    /// from the old policy take no new sends (theirs in flight finish on the old Lua state)
    /// and close; the next fill connects through the new policy's constructor.
    fn follow_reload(&mut self) {
        let now = self.policy.generation();
        if now == self.generation {
            return;
        }
        self.generation = now;
        self.config = None;
        self.blocked_until = None;
        self.backoff = ConnectBackoff::default();
        self.pool.retire_outdated(now);
    }

    /// Whether a waiting message of this queue is due now.
    fn due_now(&self) -> bool {
        self.spool
            .next_due(&self.queue)
            .is_some_and(|due| due <= spool::now_ms())
    }

    /// Asks the supervisor whether this worker may end (it says no if a message came in).
    /// A suspended queue's worker stays: suspended queues are never reaped.
    async fn may_retire(&self) -> bool {
        if self.suspensions.is_suspended(&self.queue) {
            return false;
        }
        let (reply, answer) = oneshot::channel();
        let ask = Retire {
            queue: self.queue.clone(),
            reply,
        };
        // No supervisor (shutting down): stay, shutdown ends the loop.
        self.retire.send(ask).is_ok() && answer.await.unwrap_or(false)
    }

    /// Fills the connections with due messages; returns when there is nothing more to do.
    async fn fill(&mut self) -> NextWake {
        let now = Instant::now();
        let later = |d: Duration| NextWake {
            wake: Some(now + d),
        };
        let idle = NextWake { wake: None };
        if let Some(suspended) = self.suspensions.get(&self.queue) {
            // Nothing is leased; running sends finish. A resume wakes the worker, and so
            // does the suspension's expiry.
            let expires = suspended
                .until_ms
                .map(|until| now + Duration::from_millis(until.saturating_sub(spool::now_ms())));
            return NextWake { wake: expires };
        }
        if let Some(until) = self.blocked_until {
            if until > now {
                return NextWake { wake: Some(until) };
            }
            self.blocked_until = None;
        }
        let Some(cfg) = self.config().await else {
            return NextWake {
                wake: Some(self.blocked_until.unwrap_or(now + RETRY_SOON)),
            };
        };
        let per_send = cfg.batch_size.max(1);
        self.pool.set_send_size(per_send);
        loop {
            let now_ms = spool::now_ms();
            let oldest_due = match self.spool.next_due(&self.queue) {
                Some(due) if due <= now_ms => due,
                Some(due) => return later(Duration::from_millis(due - now_ms)),
                None => return idle,
            };
            // Saturated connections get company (at most one more per GROWTH_INTERVAL):
            // waiting until they are completely full would never happen, because each
            // finished send is replaced at once.
            if self.pool.all_busy() && self.pool.may_grow(cfg.connection_limit) {
                if !self.connect(&cfg).await {
                    return NextWake {
                        wake: Some(self.blocked_until.unwrap_or(now + RETRY_SOON)),
                    };
                }
                continue;
            }
            let (conn, room) = match self.pool.with_room() {
                Some(found) => found,
                None if self.pool.may_grow(cfg.connection_limit) => {
                    if !self.connect(&cfg).await {
                        return NextWake {
                            wake: Some(self.blocked_until.unwrap_or(now + RETRY_SOON)),
                        };
                    }
                    continue;
                }
                // Every connection is full: a finished send (or the growth timer) wakes us.
                None => return later(connection::GROWTH_INTERVAL),
            };
            let mut want = (room.sends * per_send).min(MAX_LEASE);
            if cfg.min_batch_size > 1 {
                let due = self.spool.due_count(&self.queue, now_ms, want);
                match batch_rule(&cfg).gather(due, oldest_due, now_ms) {
                    Gather::Lease(n) => want = n.max(1),
                    Gather::WaitUntil(at_ms) => {
                        return NextWake {
                            wake: Some(Instant::now() + Duration::from_millis(at_ms - now_ms)),
                        }
                    }
                }
            }
            want = match self.rates.take(want, now_ms) {
                Ok(granted) => granted,
                Err(wait) => return later(wait),
            };
            let leased = self
                .spool
                .lease_within(&self.queue, want, room.bytes, now_ms);
            let msgs: Vec<Leased> = match leased {
                Ok(msgs) => msgs,
                Err(e) => {
                    tracing::error!(queue = %self.queue, error = %e, "lease failed");
                    self.rates.give_back(want);
                    return later(RETRY_SOON);
                }
            };
            // Fewer were due than there was room for: the rate limits keep the rest.
            self.rates.give_back(want - msgs.len().min(want));
            if msgs.is_empty() {
                return later(RETRY_SOON);
            }
            if self.policy.generation() != self.generation {
                // A reload landed during this pass: `conn` runs the old policy. Checked
                // after the lease, so a message taken in after the reload answered is
                // always sent by the new one. Released untouched (no attempt counted).
                for leased in &msgs {
                    self.spool.release(&leased.lease);
                }
                self.rates.give_back(msgs.len());
                return later(Duration::ZERO);
            }
            let mut live = Vec::with_capacity(msgs.len());
            for leased in msgs {
                match decide(
                    Event::Leased,
                    (&leased.message).into(),
                    &cfg,
                    now_ms,
                    deliver::jitter(),
                ) {
                    Fate::Send => live.push(leased),
                    fate => {
                        let telemetry = self.telemetry.clone();
                        let held = vec![leased.lease.clone()];
                        self.sends.spawn(
                            move |spool| async move {
                                deliver::apply(&spool, &telemetry, &leased, fate).await
                            },
                            held,
                        );
                    }
                }
            }
            let mut live = live.into_iter().peekable();
            while live.peek().is_some() {
                let batch: Vec<Leased> = live.by_ref().take(per_send).collect();
                let held = batch.iter().map(|l| l.lease.clone()).collect();
                let bytes = conn.hold_bytes(batch.iter().map(|l| l.lease.bytes()).sum());
                let (conn, cfg, telemetry) = (conn.clone(), cfg.clone(), self.telemetry.clone());
                self.sends.spawn(
                    move |spool| async move {
                        let _bytes = bytes;
                        deliver::deliver(spool, telemetry, conn, cfg, batch).await
                    },
                    held,
                );
            }
        }
    }

    /// When the cached config is to be asked again, if there is one.
    fn config_refresh_at(&self) -> Option<Instant> {
        let (cfg, at) = self.config.as_ref()?;
        Some(*at + cfg.refresh_interval.max(MIN_CONFIG_TTL))
    }

    /// The cached queue config, asked again after its `refresh_interval` (at least
    /// [`MIN_CONFIG_TTL`]). A failing refresh keeps
    /// the old config; a failing first ask blocks the queue with backoff.
    async fn config(&mut self) -> Option<Arc<QueueConfig>> {
        if let Some((cfg, at)) = &self.config {
            if at.elapsed() < cfg.refresh_interval.max(MIN_CONFIG_TTL) {
                return Some(cfg.clone());
            }
        }
        match self.policy.queue_config(&self.queue).await {
            Ok(cfg) => {
                let old = self.config.as_ref().map(|(old, _)| old.as_ref());
                self.rates.update(old, &cfg, spool::now_ms());
                let cfg = Arc::new(cfg);
                self.config = Some((cfg.clone(), Instant::now()));
                Some(cfg)
            }
            Err(e) => {
                if let Some((cfg, at)) = &mut self.config {
                    tracing::warn!(queue = %self.queue, error = %e, "get_queue_config failed; keeping the previous config");
                    *at = Instant::now();
                    return Some(cfg.clone());
                }
                self.back_off(format_args!("get_queue_config failed: {e}"));
                None
            }
        }
    }

    /// Opens one more connection for the queue's current config (`cfg`, from
    /// [`config`](Self::config)). On failure the queue backs off (nothing was leased).
    async fn connect(&mut self, cfg: &QueueConfig) -> bool {
        // The policy host bounds each of a connect's steps (the chunk, the constructor) by
        // --lua-event-timeout; this guard stays above their sum so their clearer errors
        // come first.
        let limit =
            CONNECT_TIMEOUT.max(self.policy.limits().event_timeout * 3 + Duration::from_secs(1));
        // Waits while --max-broker-connections are open and busy (not a connect failure).
        let permit = self.pool.permit().await;
        let connect = self.policy.connect_with(&self.queue, cfg.clone());
        match tokio::time::timeout(limit, connect).await {
            Ok(Ok(conn)) => {
                self.backoff.succeeded();
                self.pool.add(conn, permit);
                tracing::info!(queue = %self.queue, connections = self.pool.len(), "connected");
                true
            }
            Ok(Err(e)) => {
                self.back_off(format_args!("cannot connect: {e}"));
                false
            }
            Err(_) => {
                self.back_off(format_args!(
                    "cannot connect: constructor took over {}",
                    humantime::format_duration(limit)
                ));
                false
            }
        }
    }

    /// Logs `why` and stops leasing for the next connect-backoff delay.
    fn back_off(&mut self, why: std::fmt::Arguments<'_>) {
        let delay = self.backoff.failed();
        tracing::error!(queue = %self.queue, retry_in = %humantime::format_duration(delay), "{why}");
        self.blocked_until = Some(Instant::now() + delay);
    }

    /// Shutdown: no more leases; let running sends finish until the drain deadline, then
    /// abort the rest and release their leases (they are due again on the next start).
    async fn drain(&mut self) {
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        if !self.sends.is_empty() {
            tracing::info!(queue = %self.queue, sends = self.sends.len(), "draining in-flight sends");
        }
        while !self.sends.is_empty() {
            tokio::select! {
                _ = self.sends.next_ended() => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if !self.sends.is_empty() {
            tracing::warn!(queue = %self.queue, sends = self.sends.len(),
                "drain deadline passed; aborting sends (their messages stay spooled and are sent again after restart)");
            self.sends.abort_all().await;
        }
        self.pool.close_all().await;
    }
}

/// The queue config's batching settings.
fn batch_rule(cfg: &QueueConfig) -> BatchRule {
    BatchRule {
        batch_size: cfg.batch_size,
        min_batch_size: cfg.min_batch_size,
        max_latency_ms: u64::try_from(cfg.max_batch_latency.as_millis()).unwrap_or(u64::MAX),
    }
}

/// Sleeps until `at`, or for ever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
