//! Log hooks: the relay's own delivery records, routed through the policy into a queue,
//! so they reach Kafka or AMQP like any other message (KumoMTA's
//! `kumo.configure_log_hook` + `should_enqueue_log_record`).
//!
//! Producers (ingest, the dispatcher) offer records without waiting: a bounded channel
//! feeds one task that asks the policy about each record and hook, and spools what the
//! policy accepted in one durable batch per round. A record offered while the channel is
//! full is dropped and counted: log records are observability, not contract messages,
//! and the send path must never wait for them.
//!
//! Loops are impossible by construction: every message a hook spools carries the
//! [`META_KEY`] metadata, and records about such messages are never offered.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use policy::{Policy, PolicyMessage};
use serde_json::{Map, Value};
use spool::{NewMessage, Spool};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::delivery_log::LogRecord;

/// Metadata that marks a message spooled by a log hook (its value is the hook's name).
pub const META_KEY: &str = "log_hook";
/// Metadata that holds the whole record, KumoMTA's name for it.
const LOG_RECORD_META: &str = "log_record";
const CHANNEL_CAPACITY: usize = 16 * 1024;
/// Most records handled per durable batch.
const MAX_ROUND: usize = 512;

/// The producers' handle. Cheap to clone.
#[derive(Clone)]
pub struct LogHookSink {
    tx: mpsc::Sender<LogRecord>,
    dropped: Arc<AtomicU64>,
}

impl LogHookSink {
    /// Hands `record` to the hook task without waiting; counts it as dropped when the
    /// task's queue is full.
    pub fn offer(&self, record: LogRecord) {
        if self.tx.try_send(record).is_err() {
            self.dropped.fetch_add(1, Relaxed);
        }
    }
}

/// Starts the hook task. It ends when every [`LogHookSink`] clone is dropped.
pub fn start(
    policy: Policy,
    spool: Spool,
    hooks: Vec<String>,
    dropped: Arc<AtomicU64>,
) -> (LogHookSink, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let task = tokio::spawn(run(rx, policy, spool, hooks));
    (LogHookSink { tx, dropped }, task)
}

async fn run(mut rx: mpsc::Receiver<LogRecord>, policy: Policy, spool: Spool, hooks: Vec<String>) {
    let mut round = Vec::with_capacity(MAX_ROUND);
    while rx.recv_many(&mut round, MAX_ROUND).await > 0 {
        let mut batch = Vec::new();
        for record in round.drain(..) {
            for hook in &hooks {
                match offer(&policy, &record, hook).await {
                    Ok(Some(message)) => batch.push(message),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(hook, queue = %record.queue, id = %record.id, "log hook: {e}")
                    }
                }
            }
        }
        if !batch.is_empty() {
            if let Err(e) = spool.enqueue(batch).await {
                tracing::warn!(error = %e, "log hook records could not be spooled; they are lost (the delivery log file keeps them)");
            }
        }
    }
}

/// Asks the policy about one record for one hook; the spool message if it said yes.
async fn offer(
    policy: &Policy,
    record: &LogRecord,
    hook: &str,
) -> anyhow::Result<Option<NewMessage>> {
    let view = PolicyMessage {
        id: record.id.clone(),
        queue: record.queue.clone(),
        data: serde_json::to_vec(record)?,
        meta: record_meta(record),
        ..PolicyMessage::default()
    };
    let Some(mut taken) = policy.should_enqueue_log_record(view, hook).await? else {
        return Ok(None);
    };
    let queue = match taken.meta.get("queue") {
        Some(Value::String(q)) if !q.is_empty() => q.clone(),
        _ => anyhow::bail!(
            "should_enqueue_log_record returned true but did not choose a queue: call msg:set_meta('queue', ...)"
        ),
    };
    spool::keys::check_queue_name(&queue)
        .map_err(|why| anyhow::anyhow!("should_enqueue_log_record chose queue {queue:?}: {why}"))?;
    taken
        .meta
        .insert(META_KEY.into(), Value::String(hook.to_owned()));
    Ok(Some(NewMessage {
        queue,
        meta: spool::meta_json::meta_from_json(taken.meta),
        payload: taken.data,
    }))
}

/// The record's fields as metadata for the policy to look at. The record's own queue is
/// `source_queue`: `queue` is what the policy sets to choose where the record goes. The
/// whole record is also under `log_record`, where KumoMTA policies look for it
/// (`msg:get_meta('log_record').queue` is the record's own queue there).
fn record_meta(record: &LogRecord) -> Map<String, Value> {
    let mut meta = Map::new();
    if let Ok(Value::Object(fields)) = serde_json::to_value(record) {
        for (key, value) in &fields {
            let key = if key == "queue" {
                "source_queue".to_owned()
            } else {
                key.clone()
            };
            meta.insert(key, value.clone());
        }
        meta.insert(LOG_RECORD_META.into(), Value::Object(fields));
    }
    meta
}
