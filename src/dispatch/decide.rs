//! A message's fate, decided in one place.
//!
//! Everything that can happen to a leased message — it turned out to be past its
//! `max_age` before it was sent, or its send came back with an outcome — is turned into one
//! [`Fate`] here, and nowhere else: expiry, backoff and the meaning of result codes live in
//! [`decide`], a pure function over explicit inputs (the clock and the jitter are
//! arguments), so the whole rule is tested as a table without a spool, a policy or a sleep.
//!
//! | event                                   | fate                                            |
//! |-----------------------------------------|-------------------------------------------------|
//! | leased, younger than `max_age`          | [`Fate::Send`]                                  |
//! | leased, older than `max_age`            | [`Fate::DeadLetter`] (expired)                  |
//! | `Delivered` (a 2xx result)              | [`Fate::Ack`]                                   |
//! | `Transient` (4xx, error, timeout)       | [`Fate::Retry`] after backoff, or `DeadLetter` if the next attempt would come after `max_age` |
//! | `Permanent` + `on_permanent_failure = 'Requeue'`  | as `Transient`                        |
//! | `Permanent` + `on_permanent_failure = 'DeadLetter'` | [`Fate::DeadLetter`]                |
//!
//! Timeouts are not special here: the policy host bounds every send with the queue's
//! `send_timeout` and reports a send that ran out of time as a `Transient` 451 outcome
//! (see `policy::outcome`), so there is one timeout, with one code.

use std::time::Duration;

use policy::{PermanentFailure, QueueConfig, SendOutcome};

/// What happened to a leased message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// It was just leased and has not been sent yet.
    Leased,
    /// Its send ended with this outcome.
    Sent(SendOutcome),
}

/// What the message's bookkeeping says, as far as the rule needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease<'a> {
    /// When the message was first accepted (ms since the epoch).
    pub created_ms: u64,
    /// Failed attempts before this one.
    pub attempts: u32,
    /// The error of the last failed attempt, if any.
    pub last_error: Option<&'a str>,
}

impl<'a> From<&'a spool::Message> for Lease<'a> {
    fn from(msg: &'a spool::Message) -> Lease<'a> {
        Lease {
            created_ms: msg.created_ms,
            attempts: msg.attempts,
            last_error: msg.last_error.as_deref(),
        }
    }
}

/// The decision: what the spool is to do with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Hand it to a connection.
    Send,
    /// Delivered: delete it. `response` is the policy's 2xx result.
    Ack {
        /// The policy's 2xx result.
        response: String,
    },
    /// Keep it, with one more attempt recorded, due again at `due_ms`.
    Retry {
        /// When the message is due again (ms since the epoch).
        due_ms: u64,
        /// The code of the failure (for counters and the delivery log).
        code: u16,
        /// What is stored as the message's last error: always led by the code, once.
        error: String,
    },
    /// Move it to the dead-letter area, with `reason`.
    DeadLetter {
        /// The code of the failure that ended it, if a send ended it.
        code: Option<u16>,
        /// Why, stored with the dead letter.
        reason: String,
    },
}

/// Decides `event`'s consequence for a message with bookkeeping `lease` on a queue with
/// config `cfg`, at `now_ms`. `jitter` in `[0, 1)` spreads retries (see
/// [`retry_delay`]); callers pass a random draw, tests a fixed one.
pub fn decide(event: Event, lease: Lease<'_>, cfg: &QueueConfig, now_ms: u64, jitter: f64) -> Fate {
    let expires_ms = lease.created_ms.saturating_add(millis(cfg.max_age));
    let outcome = match event {
        Event::Leased if now_ms > expires_ms => {
            return Fate::DeadLetter {
                code: None,
                reason: format!(
                    "expired (max_age {}) after {} attempts; last error: {}",
                    humantime::format_duration(cfg.max_age),
                    lease.attempts,
                    lease.last_error.unwrap_or("none")
                ),
            }
        }
        Event::Leased => return Fate::Send,
        Event::Sent(outcome) => outcome,
    };
    let (code, error) = match outcome {
        SendOutcome::Delivered { response } => return Fate::Ack { response },
        SendOutcome::Permanent { code, response } => {
            let error = with_code(code, response);
            if cfg.on_permanent_failure == PermanentFailure::DeadLetter {
                return Fate::DeadLetter {
                    code: Some(code),
                    reason: error,
                };
            }
            (code, error)
        }
        SendOutcome::Transient { code, response } => (code, with_code(code, response)),
    };
    let delay = retry_delay(
        cfg.retry_interval,
        cfg.max_retry_interval,
        cfg.max_age,
        lease.attempts,
        jitter,
    );
    let due_ms = now_ms.saturating_add(millis(delay));
    if due_ms > expires_ms {
        return Fate::DeadLetter {
            code: Some(code),
            reason: format!(
                "expired (max_age {}) after {} attempts; last error: {error}",
                humantime::format_duration(cfg.max_age),
                lease.attempts.saturating_add(1)
            ),
        };
    }
    Fate::Retry {
        due_ms,
        code,
        error,
    }
}

/// The delay before attempt `attempts + 1` of a message that failed `attempts` times before:
/// `retry_interval * 2^attempts`, capped by `max_retry_interval` (or, without one, by
/// `max_age`, past which retrying is pointless), plus `jitter` (0..1) times 10 %, so that a
/// burst of failures does not come back as a burst.
pub fn retry_delay(
    retry_interval: Duration,
    max_retry_interval: Option<Duration>,
    max_age: Duration,
    attempts: u32,
    jitter: f64,
) -> Duration {
    let cap = max_retry_interval.unwrap_or(max_age).max(retry_interval);
    let factor = 1u32.checked_shl(attempts.min(31)).unwrap_or(u32::MAX);
    let base = retry_interval.saturating_mul(factor).min(cap);
    base.saturating_add(base.mul_f64(jitter.clamp(0.0, 0.999) / 10.0))
}

/// The failure text as stored in `last_error`: always led by the code, once.
fn with_code(code: u16, response: String) -> String {
    if response.starts_with(&code.to_string()) {
        response
    } else {
        format!("{code} {response}")
    }
}

/// Milliseconds, saturating (a `max_age` of centuries must not wrap to the past).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    fn cfg(on_permanent: PermanentFailure) -> QueueConfig {
        QueueConfig {
            retry_interval: Duration::from_secs(60),
            max_retry_interval: Some(Duration::from_secs(600)),
            max_age: Duration::from_secs(3600),
            on_permanent_failure: on_permanent,
            ..QueueConfig::default()
        }
    }

    fn transient(code: u16, text: &str) -> Event {
        Event::Sent(SendOutcome::Transient {
            code,
            response: text.into(),
        })
    }

    fn permanent(code: u16, text: &str) -> Event {
        Event::Sent(SendOutcome::Permanent {
            code,
            response: text.into(),
        })
    }

    fn retry(due_ms: u64, code: u16, error: &str) -> Fate {
        Fate::Retry {
            due_ms,
            code,
            error: error.into(),
        }
    }

    fn dead(code: Option<u16>, reason: &str) -> Fate {
        Fate::DeadLetter {
            code,
            reason: reason.into(),
        }
    }

    /// The whole rule, one row per case: (event, created, attempts, now, on_permanent, fate).
    #[test]
    fn the_rule_as_a_table() {
        use PermanentFailure::{DeadLetter as Dl, Requeue as Rq};
        let t0 = 1_000_000_000;
        let rows: Vec<(Event, u64, u32, u64, PermanentFailure, Fate)> = vec![
            // Leased: sent while young, dead-lettered once past max_age (60 min).
            (Event::Leased, t0, 0, t0, Rq, Fate::Send),
            (Event::Leased, t0, 3, t0 + 60 * MIN, Rq, Fate::Send),
            (
                Event::Leased,
                t0,
                3,
                t0 + 60 * MIN + 1,
                Rq,
                dead(
                    None,
                    "expired (max_age 1h) after 3 attempts; last error: none",
                ),
            ),
            // Delivered: acked, whatever the age.
            (
                Event::Sent(SendOutcome::Delivered {
                    response: "250 ok".into(),
                }),
                t0,
                9,
                t0 + 999 * MIN,
                Dl,
                Fate::Ack {
                    response: "250 ok".into(),
                },
            ),
            // Transient: 1 min, 2 min, 4 min ... capped at 10 min; the code leads the error once.
            (
                transient(451, "send timed out after 5s"),
                t0,
                0,
                t0,
                Rq,
                retry(t0 + MIN, 451, "451 send timed out after 5s"),
            ),
            (
                transient(421, "421 broker busy"),
                t0,
                2,
                t0 + MIN,
                Rq,
                retry(t0 + 5 * MIN, 421, "421 broker busy"),
            ),
            (
                transient(451, "x"),
                t0,
                30,
                t0 + 10 * MIN,
                Rq,
                retry(t0 + 20 * MIN, 451, "451 x"),
            ),
            // Transient, but the next try would come after max_age: dead-lettered now.
            (
                transient(451, "x"),
                t0,
                5,
                t0 + 55 * MIN,
                Rq,
                dead(
                    Some(451),
                    "expired (max_age 1h) after 6 attempts; last error: 451 x",
                ),
            ),
            // Permanent: the queue's choice.
            (
                permanent(550, "no such topic"),
                t0,
                0,
                t0,
                Dl,
                dead(Some(550), "550 no such topic"),
            ),
            (
                permanent(550, "no such topic"),
                t0,
                0,
                t0,
                Rq,
                retry(t0 + MIN, 550, "550 no such topic"),
            ),
        ];
        for (i, (event, created_ms, attempts, now, on_permanent, want)) in
            rows.into_iter().enumerate()
        {
            let lease = Lease {
                created_ms,
                attempts,
                last_error: None,
            };
            let got = decide(event.clone(), lease, &cfg(on_permanent), now, 0.0);
            assert_eq!(got, want, "row {i}: {event:?} attempts={attempts}");
        }
    }

    #[test]
    fn huge_durations_saturate_instead_of_wrapping() {
        let cfg = QueueConfig {
            retry_interval: Duration::MAX,
            max_age: Duration::MAX,
            ..QueueConfig::default()
        };
        let lease = Lease {
            created_ms: 5,
            attempts: 0,
            last_error: Some("451 x"),
        };
        assert_eq!(
            decide(Event::Leased, lease, &cfg, u64::MAX, 0.5),
            Fate::Send
        );
        match decide(transient(451, "x"), lease, &cfg, 10, 0.5) {
            Fate::Retry { due_ms, .. } => assert_eq!(due_ms, u64::MAX),
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn retry_delay_doubles_is_capped_and_jitters_up_to_ten_percent() {
        let ri = Duration::from_secs(60);
        let week = Duration::from_secs(7 * 86400);
        assert_eq!(retry_delay(ri, None, week, 0, 0.0), ri);
        assert_eq!(retry_delay(ri, None, week, 3, 0.0), ri * 8);
        assert_eq!(retry_delay(ri, None, week, 3, 0.5), ri * 8 + ri * 8 / 20);
        assert!(retry_delay(ri, None, week, 0, 1.0) < ri + ri / 10);
        let capped = retry_delay(ri, Some(Duration::from_secs(300)), Duration::MAX, 40, 0.0);
        assert_eq!(capped, Duration::from_secs(300));
        let by_age = retry_delay(ri, None, Duration::from_secs(3600), 1000, 0.0);
        assert_eq!(by_age, Duration::from_secs(3600));
    }
}
