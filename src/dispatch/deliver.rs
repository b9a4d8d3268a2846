//! One send and its settlement: the only code that turns a policy outcome into a spool
//! state change.
//!
//! | outcome                          | spool action                                   |
//! |----------------------------------|------------------------------------------------|
//! | `Delivered`                      | `ack` (delete)                                 |
//! | `Transient`, timeout             | `retry` after backoff, or dead-letter if that  |
//! |                                  | would pass `max_age`                           |
//! | `Permanent` + `Requeue`          | as `Transient`                                 |
//! | `Permanent` + `DeadLetter`       | `dead_letter`                                  |
//!
//! A message is deleted only on `Delivered`; everything else keeps it on disk. Each
//! outcome is also reported to [`QueueTelemetry`] (counters, delivery log) right here, where
//! it is decided.

use std::sync::Arc;
use std::time::Duration;

use policy::{MessageView, PermanentFailure, QueueConfig, SendOutcome};
use spool::{Message, Spool};

use super::backoff::retry_delay;
use super::connection::PooledConnection;
use crate::meta;
use crate::telemetry::QueueTelemetry;

/// Slack on top of the policy's own `send_timeout`, which `Connection::send` applies: this
/// outer guard only catches a policy that fails to.
const TIMEOUT_GRACE: Duration = Duration::from_secs(2);

/// What the policy sees of a spooled message.
pub fn message_view(msg: &Message) -> MessageView {
    MessageView {
        id: msg.id.to_string(),
        queue: msg.queue.clone(),
        data: msg.payload.clone(),
        meta: meta::meta_to_map(&msg.meta),
        attempts: msg.attempts,
        sender: meta::as_str(&msg.meta, "sender"),
        recipient: meta::as_str(&msg.meta, "recipient"),
    }
}

/// Sends `msgs` (one `send`, or one `send_batch` for several) on `conn` and settles each
/// message with the spool.
pub async fn deliver(
    spool: Spool,
    telemetry: QueueTelemetry,
    conn: Arc<PooledConnection>,
    cfg: Arc<QueueConfig>,
    msgs: Vec<Message>,
) {
    let views: Vec<MessageView> = msgs.iter().map(message_view).collect();
    let guard = cfg.send_timeout + TIMEOUT_GRACE;
    let timed_out = || SendOutcome::Transient {
        code: 421,
        response: format!("send timed out after {}", humantime::format_duration(guard)),
    };
    let started = std::time::Instant::now();
    let mark = conn.mark();
    let mut outcomes = if views.len() == 1 {
        let view = views.into_iter().next().expect("one view");
        vec![tokio::time::timeout(guard, conn.send(view))
            .await
            .unwrap_or_else(|_| timed_out())]
    } else {
        let n = views.len();
        tokio::time::timeout(guard, conn.send_batch(views))
            .await
            .unwrap_or_else(|_| (0..n).map(|_| timed_out()).collect())
    };
    // Only transient failures (raised errors, timeouts, 4xx) say anything about the
    // connection; a 5xx is the policy's verdict on the message, given over a working one.
    conn.judge(
        mark,
        outcomes.iter().any(SendOutcome::is_delivered),
        outcomes
            .iter()
            .any(|o| matches!(o, SendOutcome::Transient { .. })),
    );
    // The send is over: give the connection's in-flight slot back before the durable waits.
    drop(conn);
    telemetry.sent(started.elapsed(), msgs.len() as u64);
    if outcomes.len() != msgs.len() {
        tracing::error!(queue = %msgs[0].queue, got = outcomes.len(), sent = msgs.len(),
            "policy returned the wrong number of outcomes; retrying the unmatched messages");
    }
    outcomes.resize_with(msgs.len(), || SendOutcome::Transient {
        code: 451,
        response: "policy returned no outcome for this message".into(),
    });
    // Delivered messages are deleted together (one sled batch); the others are settled
    // one by one, each with its own durable retry or dead-letter write.
    let mut delivered = Vec::with_capacity(msgs.len());
    let mut failed = Vec::new();
    for (msg, outcome) in msgs.iter().zip(outcomes) {
        match outcome {
            SendOutcome::Delivered { response } => {
                tracing::debug!(queue = %msg.queue, id = %msg.id, %response, "delivered");
                telemetry.delivered(msg, &response);
                delivered.push(msg);
            }
            other => failed.push(settle(&spool, &telemetry, &cfg, msg, other)),
        }
    }
    if let Err(e) = spool.ack_many(&delivered) {
        tracing::error!(queue = %msgs[0].queue, error = %e,
            "delivered, but the spool could not delete them (they will be sent again)");
    }
    futures::future::join_all(failed).await;
}

/// Applies one outcome to the spool (see the module table).
pub async fn settle(
    spool: &Spool,
    telemetry: &QueueTelemetry,
    cfg: &QueueConfig,
    msg: &Message,
    outcome: SendOutcome,
) {
    let (queue, id) = (&msg.queue, msg.id);
    match outcome {
        SendOutcome::Delivered { response } => {
            tracing::debug!(%queue, %id, %response, "delivered");
            telemetry.delivered(msg, &response);
            if let Err(e) = spool.ack(msg) {
                tracing::error!(%queue, %id, error = %e, "delivered, but the spool could not delete it (it will be sent again)");
            }
        }
        SendOutcome::Transient { code, response } => {
            let error = with_code(code, response);
            telemetry.transient(msg, code, &error);
            retry_or_expire(spool, telemetry, cfg, msg, &error).await
        }
        SendOutcome::Permanent { code, response } => {
            let error = with_code(code, response);
            telemetry.permanent(msg, code, &error);
            match cfg.on_permanent_failure {
                PermanentFailure::Requeue => {
                    retry_or_expire(spool, telemetry, cfg, msg, &error).await
                }
                PermanentFailure::DeadLetter => dead_letter(spool, telemetry, msg, &error).await,
            }
        }
    }
}

/// The failure text as stored in `last_error`: always led by the code, once.
fn with_code(code: u16, response: String) -> String {
    if response.starts_with(&code.to_string()) {
        response
    } else {
        format!("{code} {response}")
    }
}

/// Schedules the next attempt, unless it would come after the message's `max_age`.
async fn retry_or_expire(
    spool: &Spool,
    telemetry: &QueueTelemetry,
    cfg: &QueueConfig,
    msg: &Message,
    error: &str,
) {
    let delay = retry_delay(
        cfg.retry_interval,
        cfg.max_retry_interval,
        cfg.max_age,
        msg.attempts,
    );
    let now = spool::now_ms();
    let next_due = now + delay.as_millis() as u64;
    let expires = msg
        .created_ms
        .saturating_add(cfg.max_age.as_millis() as u64);
    if next_due > expires {
        let reason = format!(
            "expired (max_age {}) after {} attempts; last error: {error}",
            humantime::format_duration(cfg.max_age),
            msg.attempts + 1
        );
        return dead_letter(spool, telemetry, msg, &reason).await;
    }
    tracing::info!(queue = %msg.queue, id = %msg.id, attempts = msg.attempts + 1,
        retry_in = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
        %error, "delivery failed; will retry");
    if let Err(e) = spool.retry(msg, error, next_due).await {
        tracing::error!(queue = %msg.queue, id = %msg.id, error = %e,
            "could not record the failed attempt; the message stays due");
    }
}

pub async fn dead_letter(spool: &Spool, telemetry: &QueueTelemetry, msg: &Message, reason: &str) {
    tracing::warn!(queue = %msg.queue, id = %msg.id, attempts = msg.attempts, %reason, "dead-lettering message");
    match spool.dead_letter(msg, reason).await {
        Ok(()) => telemetry.dead_lettered(msg, reason),
        Err(e) => tracing::error!(queue = %msg.queue, id = %msg.id, error = %e,
            "could not dead-letter; the message stays queued"),
    }
}
