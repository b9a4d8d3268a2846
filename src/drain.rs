//! Draining a node (`POST /api/admin/drain`): for scale-down and rolling upgrades.
//!
//! A drain is a shutdown that waits for the spool to empty instead of leaving it for a
//! restart. From the moment it is asked:
//! - `/readyz` answers 503 and ingest answers 503 with `Retry-After` ([`gate`]), so a load
//!   balancer moves clients to the other relays;
//! - delivery goes on as before, retries included, as long as their backoff is due before
//!   the deadline;
//! - a watcher task looks at the spool every [`POLL`] and stops the daemon (the ordinary
//!   shutdown) once nothing deliverable remains, or when the deadline passes.
//!
//! "Deliverable" is one pure function, [`remaining`]: a message in flight, or waiting in a
//! queue that is not suspended with a due time at or before the deadline. Everything else
//! is a leftover the report names: suspended queues, messages due after the deadline, dead
//! letters. [`decide`] turns that into an [`Outcome`], and the outcome into the process's
//! exit code, so a script (or `spoolctl drain --wait`) knows whether the volume may go.
//!
//! A drain cannot be cancelled: readiness and ingest stay off until the process exits. A
//! SIGTERM during a drain stops at once, as it always does (the spool keeps what is left).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;
use spool::{Spool, SpoolStats};
use tokio::sync::watch;

use crate::suspensions::Suspensions;
use crate::Shutdown;

/// The deadline of a drain that names none.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(300);
/// How often the watcher looks at the spool.
pub const POLL: Duration = Duration::from_millis(250);
/// The `Retry-After` of ingest refused during a drain, in seconds: the client should try
/// another relay, or this one once it was restarted.
pub const RETRY_AFTER_SECS: u64 = 5;

/// Exit code: drained; the spool holds no queued message and no dead letter.
pub const EXIT_DRAINED: u8 = 0;
/// Exit code: nothing deliverable remains, but the spool still holds messages (suspended
/// queues, messages due after the deadline, dead letters): keep or export the volume.
pub const EXIT_LEFTOVERS: u8 = 3;
/// Exit code: the deadline passed while deliverable messages were still queued.
pub const EXIT_DEADLINE: u8 = 4;

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Everything was delivered.
    Drained,
    /// Nothing deliverable is left; leftovers are.
    Leftovers,
    /// The deadline passed first.
    DeadlinePassed,
}

impl Outcome {
    /// The daemon's exit code for this outcome.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Drained => EXIT_DRAINED,
            Outcome::Leftovers => EXIT_LEFTOVERS,
            Outcome::DeadlinePassed => EXIT_DEADLINE,
        }
    }
}

/// What the spool still holds, sorted by why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Remaining {
    /// Messages that will still be sent before the deadline (in flight or due by then).
    pub deliverable: u64,
    /// Of those, the ones in flight now.
    pub in_flight: u64,
    /// Waiting messages of suspended queues, per queue.
    pub suspended: BTreeMap<String, u64>,
    /// Waiting messages due after the deadline, per queue.
    pub past_deadline: BTreeMap<String, u64>,
    /// Messages in the dead-letter area.
    pub dead_letter: u64,
}

impl Remaining {
    fn has_leftovers(&self) -> bool {
        !self.suspended.is_empty() || !self.past_deadline.is_empty() || self.dead_letter > 0
    }
}

/// Sorts what the spool holds. `at_deadline` must be the spool's figures taken at the
/// deadline (`Spool::stats(deadline_ms)`), so `due_now` counts what is due by then.
pub fn remaining(at_deadline: &SpoolStats, suspended: &[String]) -> Remaining {
    let mut rem = Remaining {
        dead_letter: at_deadline.dead_letter,
        ..Remaining::default()
    };
    for (queue, q) in &at_deadline.queues {
        // In flight is being sent, suspended or not: it settles on its own.
        rem.in_flight += q.leased;
        rem.deliverable += q.leased;
        let waiting = q.count.saturating_sub(q.leased);
        if suspended.contains(queue) {
            if waiting > 0 {
                rem.suspended.insert(queue.clone(), waiting);
            }
            continue;
        }
        rem.deliverable += q.due_now;
        let later = waiting.saturating_sub(q.due_now);
        if later > 0 {
            rem.past_deadline.insert(queue.clone(), later);
        }
    }
    rem
}

/// Whether the drain is over, and how: `None` while deliverable messages remain and the
/// deadline has not passed.
///
/// Once the deadline passed, a message waiting for a retry counts as unfinished work, not as
/// a leftover: at the deadline every retry is "due after the deadline", but the watcher only
/// got there because each earlier look still found deliverable messages (a look that found
/// none ended the drain). Only suspended queues and dead letters are leftovers then.
pub fn decide(rem: &Remaining, deadline_passed: bool) -> Option<Outcome> {
    if deadline_passed && (rem.deliverable > 0 || !rem.past_deadline.is_empty()) {
        return Some(Outcome::DeadlinePassed);
    }
    if rem.deliverable > 0 {
        return None;
    }
    Some(if rem.has_leftovers() {
        Outcome::Leftovers
    } else {
        Outcome::Drained
    })
}

/// How long the daemon still answers (the outcome included) after a drain ended, before it
/// closes its listener and exits.
pub const OUTCOME_LINGER: Duration = Duration::from_secs(2);

/// A drain's state, as `GET /api/admin/drain` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Always true (a daemon not draining answers `{"draining": false}`).
    pub draining: bool,
    /// When the drain was asked, ms since the epoch.
    pub started_ms: u64,
    /// The deadline, ms since the epoch.
    pub deadline_ms: u64,
    /// What is left, at the last look.
    pub remaining: Remaining,
    /// How it ended; `None` while it goes on.
    pub outcome: Option<Outcome>,
    /// The exit code the daemon stops with; `None` while it goes on.
    pub exit_code: Option<u8>,
}

/// The drain switch: cheap to clone, shared by the admin API, ingest's gate, `/readyz` and
/// `main` (which reads the exit code).
#[derive(Clone)]
pub struct Drain {
    state: Arc<watch::Sender<Option<Status>>>,
    /// Ingest requests past the gate and not yet answered. A request that passed before the
    /// drain began may still spool messages, so the drain is not over while any is left.
    ingest_in_flight: Arc<AtomicU64>,
    spool: Spool,
    suspensions: Suspensions,
    shutdown: Shutdown,
}

impl Drain {
    /// A daemon's drain switch, off.
    pub fn new(spool: Spool, suspensions: Suspensions, shutdown: Shutdown) -> Drain {
        Drain {
            state: Arc::new(watch::channel(None).0),
            ingest_in_flight: Arc::new(AtomicU64::new(0)),
            spool,
            suspensions,
            shutdown,
        }
    }

    /// Whether a drain was asked.
    pub fn is_draining(&self) -> bool {
        self.state.borrow().is_some()
    }

    /// The drain's state; `None` when none was asked.
    pub fn status(&self) -> Option<Status> {
        self.state.borrow().clone()
    }

    /// The exit code a finished drain asks for; `None` when no drain finished.
    pub fn exit_code(&self) -> Option<u8> {
        self.state.borrow().as_ref().and_then(|s| s.exit_code)
    }

    /// Starts draining with `deadline` from now, and the watcher that ends it. A second
    /// call changes nothing and answers the drain under way (`Err`).
    pub async fn begin(&self, deadline: Duration) -> Result<Status, Status> {
        let now = spool::now_ms();
        let deadline_ms = now.saturating_add(deadline.as_millis() as u64);
        let rem = self.look_blocking(deadline_ms).await;
        let mut started = None;
        self.state.send_if_modified(|state| {
            if state.is_some() {
                return false;
            }
            let status = Status {
                draining: true,
                started_ms: now,
                deadline_ms,
                remaining: rem,
                outcome: None,
                exit_code: None,
            };
            started = Some(status.clone());
            *state = Some(status);
            true
        });
        let Some(status) = started else {
            return Err(self.status().expect("a drain is under way"));
        };
        tracing::warn!(
            deadline = ?deadline,
            deliverable = status.remaining.deliverable,
            "draining: ingest and /readyz answer 503; the daemon exits once nothing \
             deliverable remains"
        );
        tokio::spawn(self.clone().watch(deadline));
        Ok(status)
    }

    /// Waits up to `limit` for the drain to end; the state then (`None`: no drain).
    pub async fn wait_outcome(&self, limit: Duration) -> Option<Status> {
        let mut rx = self.state.subscribe();
        let _ = tokio::time::timeout(
            limit,
            rx.wait_for(|s| s.as_ref().is_none_or(|s| s.outcome.is_some())),
        )
        .await;
        self.status()
    }

    /// The spool's figures sorted by [`remaining`], read on a blocking thread: `stats`
    /// counts the dead-letter tree, which may read the disk.
    async fn look_blocking(&self, deadline_ms: u64) -> Remaining {
        let (spool, suspended) = (self.spool.clone(), self.suspensions.list());
        let look = move || remaining(&spool.stats(deadline_ms), &suspended);
        match tokio::task::spawn_blocking(look).await {
            Ok(rem) => rem,
            Err(e) => {
                // Unreachable short of a panic in stats; a drain that cannot look ends at
                // its deadline rather than at once.
                tracing::error!(error = %e, "drain: reading the spool's figures failed");
                Remaining {
                    deliverable: 1,
                    ..Remaining::default()
                }
            }
        }
    }

    /// The watcher: updates the figures every [`POLL`] and, once [`decide`] says the drain
    /// is over, records the outcome, logs the report and stops the daemon.
    async fn watch(self, deadline: Duration) {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let Some(deadline_ms) = self.status().map(|s| s.deadline_ms) else {
                return;
            };
            // Read before the look: no request passes the gate once the drain began, so when
            // none is in flight here, the look below sees every message ingest will spool.
            let answering = self.ingest_in_flight.load(Ordering::SeqCst);
            let mut rem = self.look_blocking(deadline_ms).await;
            rem.deliverable += answering;
            let outcome = decide(&rem, tokio::time::Instant::now() >= until);
            self.state.send_modify(|s| {
                if let Some(s) = s {
                    s.remaining = rem.clone();
                    s.outcome = outcome;
                    s.exit_code = outcome.map(Outcome::exit_code);
                }
            });
            if let Some(outcome) = outcome {
                report(outcome, &rem);
                // A follower (`spoolctl drain --wait`) polls with `GET ?wait=`; if the drain
                // ended between two of its requests, the next one must still find the
                // listener open to learn the outcome. A signal cuts the pause short.
                tokio::select! {
                    _ = tokio::time::sleep(OUTCOME_LINGER) => {}
                    _ = self.shutdown.wait() => {}
                }
                self.shutdown.trigger();
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = self.shutdown.wait() => return,
            }
        }
    }
}

/// The drain's last words in the log: one line for the outcome, one per leftover queue.
fn report(outcome: Outcome, rem: &Remaining) {
    let code = outcome.exit_code();
    match outcome {
        Outcome::Drained => tracing::info!(exit_code = code, "drained: every message delivered"),
        Outcome::Leftovers => tracing::warn!(
            exit_code = code,
            dead_letter = rem.dead_letter,
            "drained what was deliverable; the spool still holds messages (see below): \
             keep this volume, or `spoolctl export` it and `import` into a peer"
        ),
        Outcome::DeadlinePassed => tracing::warn!(
            exit_code = code,
            in_flight = rem.in_flight,
            waiting_for_retry = rem.past_deadline.values().sum::<u64>(),
            "drain deadline passed with deliverable messages left; they stay in the spool \
             for a restart on this volume (or `spoolctl export`/`import` into a peer)"
        ),
    }
    for (queue, n) in &rem.suspended {
        tracing::warn!(%queue, messages = n, "left: queue suspended (resume it to deliver)");
    }
    for (queue, n) in &rem.past_deadline {
        tracing::warn!(%queue, messages = n, "left: waiting for a retry due after the deadline");
    }
}

/// One ingest request being answered; the count drops when the guard does (a cancelled
/// request included).
struct InFlight(Arc<AtomicU64>);

impl InFlight {
    fn enter(count: &Arc<AtomicU64>) -> InFlight {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Middleware on the ingest routes: 503 with `Retry-After` while draining.
pub async fn gate(State(drain): State<Drain>, req: Request, next: Next) -> Response {
    // Counted before the check, so that the watcher, which reads the count before it looks
    // at the spool, cannot miss a request that passed just before the drain began.
    let _answering = InFlight::enter(&drain.ingest_in_flight);
    if !drain.is_draining() {
        return next.run(req).await;
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, RETRY_AFTER_SECS.to_string())],
        Json(json!({
            "error": "this relay is draining (POST /api/admin/drain) and accepts nothing new; \
                      send to another relay",
            "draining": true,
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use spool::QueueStats;

    fn queue(count: u64, leased: u64, due_now: u64) -> QueueStats {
        QueueStats {
            count,
            leased,
            due_now,
            ..QueueStats::default()
        }
    }

    fn stats(queues: &[(&str, QueueStats)], dead_letter: u64) -> SpoolStats {
        SpoolStats {
            queues: queues
                .iter()
                .map(|(n, q)| (n.to_string(), q.clone()))
                .collect(),
            dead_letter,
            quarantine: 0,
        }
    }

    #[test]
    fn remaining_sorts_by_why() {
        let s = stats(&[("a", queue(10, 2, 5)), ("held", queue(4, 1, 3))], 7);
        let rem = remaining(&s, &["held".to_owned()]);
        assert_eq!(rem.in_flight, 3);
        assert_eq!(rem.deliverable, 2 + 5 + 1);
        assert_eq!(rem.past_deadline, BTreeMap::from([("a".to_owned(), 3)]));
        assert_eq!(rem.suspended, BTreeMap::from([("held".to_owned(), 3)]));
        assert_eq!(rem.dead_letter, 7);
    }

    #[test]
    fn outcome_table() {
        let empty = Remaining::default();
        let busy = Remaining {
            deliverable: 1,
            ..Remaining::default()
        };
        let dead = Remaining {
            dead_letter: 1,
            ..Remaining::default()
        };
        let later = Remaining {
            past_deadline: BTreeMap::from([("q".to_owned(), 1)]),
            ..Remaining::default()
        };
        let cases = [
            (&empty, false, Some(Outcome::Drained)),
            (&empty, true, Some(Outcome::Drained)),
            (&busy, false, None),
            (&busy, true, Some(Outcome::DeadlinePassed)),
            (&dead, false, Some(Outcome::Leftovers)),
            (&later, false, Some(Outcome::Leftovers)),
            (&later, true, Some(Outcome::DeadlinePassed)),
            (&dead, true, Some(Outcome::Leftovers)),
        ];
        for (rem, passed, want) in cases {
            assert_eq!(decide(rem, passed), want, "{rem:?} passed={passed}");
        }
        assert_eq!(Outcome::Drained.exit_code(), 0);
        assert_ne!(
            Outcome::Leftovers.exit_code(),
            Outcome::DeadlinePassed.exit_code()
        );
    }
}
