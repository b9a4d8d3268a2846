//! One send and its settlement: the outcomes of a send are turned into fates by
//! [`decide`](super::decide::decide), and this module carries them out on the spool.
//!
//! A message is deleted only on `Fate::Ack` (a 2xx result); everything else keeps it on
//! disk. Each outcome is also reported to [`QueueTelemetry`] (counters, delivery log) here.

use std::sync::Arc;
use std::time::Duration;

use policy::{PolicyMessage, QueueConfig, SendOutcome};
use spool::{meta_json, Leased, Message, Spool};

use super::connection::{PooledConnection, SendSign};
use super::decide::{decide, Event, Fate};
use crate::telemetry::QueueTelemetry;

/// What the policy sees of a spooled message.
pub fn policy_message(msg: &Message) -> PolicyMessage {
    PolicyMessage {
        id: msg.id.to_string(),
        queue: msg.queue.clone(),
        data: msg.payload.clone(),
        meta: meta_json::meta_to_json(&msg.meta),
        attempts: msg.attempts,
        sender: meta_json::sender(&msg.meta),
        recipient: meta_json::recipient(&msg.meta),
    }
}

/// Sends `leased` (one `send`, or one `send_batch` for several) on `conn` and settles each
/// message with the spool through its lease, as [`decide`] rules.
pub async fn deliver(
    spool: Spool,
    telemetry: QueueTelemetry,
    conn: Arc<PooledConnection>,
    cfg: Arc<QueueConfig>,
    leased: Vec<Leased>,
) {
    let views: Vec<PolicyMessage> = leased.iter().map(|l| policy_message(&l.message)).collect();
    let started = std::time::Instant::now();
    let mark = conn.mark();
    // `Connection` bounds both calls with the queue's `send_timeout`, also for Lua code that
    // never yields; a send that runs out of time comes back as a transient outcome.
    let mut outcomes = if views.len() == 1 {
        let view = views.into_iter().next().expect("one view");
        vec![conn.send(view).await]
    } else {
        conn.send_batch(views).await
    };
    conn.record_send(mark, SendSign::of(&outcomes));
    // The send is over: give the connection's in-flight slot back before the durable waits.
    drop(conn);
    telemetry.sent(started.elapsed(), leased.len() as u64);
    if outcomes.len() != leased.len() {
        tracing::error!(queue = %leased[0].lease.queue(), got = outcomes.len(), sent = leased.len(),
            "policy returned the wrong number of outcomes; retrying the unmatched messages");
    }
    outcomes.resize_with(leased.len(), || SendOutcome::Transient {
        code: policy::outcome::TRANSIENT_CODE,
        response: "policy returned no outcome for this message".into(),
    });
    // Delivered messages are deleted together (one sled batch); the others are settled
    // one by one, each with its own durable retry or dead-letter write.
    let now_ms = spool::now_ms();
    let mut delivered = Vec::with_capacity(leased.len());
    let mut failed = Vec::new();
    for (leased, outcome) in leased.iter().zip(outcomes) {
        let Leased { lease, message } = leased;
        report(&telemetry, message, &outcome);
        match decide(Event::Sent(outcome), message.into(), &cfg, now_ms, jitter()) {
            Fate::Ack { response } => {
                tracing::debug!(queue = %lease.queue(), id = %lease.id(), %response, "delivered");
                delivered.push(lease);
            }
            fate => failed.push(apply(&spool, &telemetry, leased, fate)),
        }
    }
    if let Err(e) = spool.ack_many(&delivered) {
        tracing::error!(queue = %leased[0].lease.queue(), error = %e,
            "delivered, but the spool could not delete them (they will be sent again)");
    }
    futures::future::join_all(failed).await;
}

/// Counts an outcome and writes it to the delivery log, before its fate is applied.
fn report(telemetry: &QueueTelemetry, msg: &Message, outcome: &SendOutcome) {
    match outcome {
        SendOutcome::Delivered { response } => telemetry.delivered(msg, response),
        SendOutcome::Transient { code, response } => telemetry.transient(msg, *code, response),
        SendOutcome::Permanent { code, response } => telemetry.permanent(msg, *code, response),
    }
}

/// A random draw for the retry jitter.
pub fn jitter() -> f64 {
    rand::random::<f64>()
}

/// Carries out a fate other than `Send` on the spool, through the message's lease.
pub async fn apply(spool: &Spool, telemetry: &QueueTelemetry, leased: &Leased, fate: Fate) {
    let lease = &leased.lease;
    let (queue, id) = (lease.queue(), lease.id());
    match fate {
        Fate::Send => {
            tracing::error!(%queue, %id, "bug: apply() asked to send; releasing the lease");
            spool.release(lease);
        }
        Fate::Ack { response } => {
            tracing::debug!(%queue, %id, %response, "delivered");
            if let Err(e) = spool.ack(lease) {
                tracing::error!(%queue, %id, error = %e, "delivered, but the spool could not delete it (it will be sent again)");
            }
        }
        Fate::Retry { due_ms, error, .. } => {
            let retry_in = Duration::from_millis(due_ms.saturating_sub(spool::now_ms()));
            tracing::info!(%queue, %id, attempts = lease.attempts() + 1,
                retry_in = %humantime::format_duration(retry_in), %error, "delivery failed; will retry");
            if let Err(e) = spool.retry(leased, &error, due_ms).await {
                tracing::error!(%queue, %id, error = %e,
                    "could not record the failed attempt; the message stays due");
            }
        }
        Fate::DeadLetter { reason, .. } => dead_letter(spool, telemetry, leased, &reason).await,
    }
}

async fn dead_letter(spool: &Spool, telemetry: &QueueTelemetry, leased: &Leased, reason: &str) {
    let msg = &leased.message;
    tracing::warn!(queue = %msg.queue, id = %msg.id, attempts = msg.attempts, %reason, "dead-lettering message");
    match spool.dead_letter(leased, reason).await {
        Ok(()) => telemetry.dead_lettered(msg, reason),
        Err(e) => tracing::error!(queue = %msg.queue, id = %msg.id, error = %e,
            "could not dead-letter; the message stays queued"),
    }
}
