//! Where outcomes fan out: each decision (accepted, delivered, failed, dead-lettered) is
//! reported here once and becomes a counter bump and, if enabled, a delivery-log record.
//! Callers stay one line; neither sink can block them.

use std::sync::Arc;
use std::time::Duration;

use spool::{Message, MessageId};

use policy::outcome::leading_code;

use crate::delivery_log::{DeliveryLog, LogRecord, RecordType};
use crate::log_hook_task::{self, LogHookSink};
use crate::metrics::{Metrics, QueueCounters};
use prometheus_client::metrics::counter::Counter;

/// The daemon-wide sinks. Cheap to clone.
#[derive(Clone, Default)]
pub struct Telemetry {
    /// The Prometheus registry and families that `/metrics` renders.
    pub metrics: Arc<Metrics>,
    /// The JSONL delivery log (disabled unless `--delivery-log` is given).
    pub log: DeliveryLog,
    /// Set when the policy configured log hooks.
    pub hooks: Option<LogHookSink>,
}

impl Telemetry {
    /// Ingest accepted (fsynced) `ids` into `queue`.
    pub fn accepted(&self, queue: &str, ids: &[MessageId]) {
        self.metrics.queue(queue).accepted.inc_by(ids.len() as u64);
        for id in ids {
            let make = || LogRecord::new(RecordType::Reception, queue, *id, 0, None, "");
            publish(&self.log, self.hooks.as_ref(), make);
        }
    }

    /// A reaped queue's metrics series go (their counters folded into the aggregate).
    /// False while a report on the queue is under way: reap it later.
    pub fn reap(&self, queue: &str) -> bool {
        self.metrics.forget(queue)
    }

    /// The handle a queue worker keeps: its counters are looked up once.
    pub fn for_queue(&self, queue: &str) -> QueueTelemetry {
        QueueTelemetry {
            counters: self.metrics.queue(queue),
            log: self.log.clone(),
            hooks: self.hooks.clone(),
        }
    }
}

/// One queue's sinks, for its worker and sends.
#[derive(Clone)]
pub struct QueueTelemetry {
    counters: Arc<QueueCounters>,
    log: DeliveryLog,
    hooks: Option<LogHookSink>,
}

/// Hands one record to the delivery log and the log hooks, building it only if one of
/// them is on.
fn publish(log: &DeliveryLog, hooks: Option<&LogHookSink>, make: impl FnOnce() -> LogRecord) {
    match hooks {
        None => log.log(make),
        Some(hooks) => {
            let record = make();
            if log.is_enabled() {
                log.log(|| record.clone());
            }
            hooks.offer(record);
        }
    }
}

impl QueueTelemetry {
    fn record(
        &self,
        counter: impl FnOnce(&QueueCounters) -> &Counter,
        kind: RecordType,
        msg: &Message,
        code: Option<u16>,
        response: &str,
    ) {
        counter(&self.counters).inc();
        // Records about log-hook messages are never offered to the hooks: no loops.
        let hooks = self
            .hooks
            .as_ref()
            .filter(|_| !msg.meta.contains_key(log_hook_task::META_KEY));
        let make = || LogRecord::new(kind, &msg.queue, msg.id, msg.attempts + 1, code, response);
        publish(&self.log, hooks, make);
    }

    /// The broker accepted `msg` and it left the spool: counts it, observes its time from
    /// ingest to delivery, and logs a `Delivery` record with the response's leading code.
    pub fn delivered(&self, msg: &Message, response: &str) {
        let code = leading_code(response);
        let in_spool_ms = spool::now_ms().saturating_sub(msg.created_ms);
        self.counters
            .ingest_to_delivery
            .observe(in_spool_ms as f64 / 1000.0);
        self.record(|c| &c.delivered, RecordType::Delivery, msg, code, response);
    }

    /// A send of `msg` failed for now (`code`, `response`); it stays spooled for a retry.
    pub fn transient(&self, msg: &Message, code: u16, response: &str) {
        self.record(
            |c| &c.transient_failures,
            RecordType::TransientFailure,
            msg,
            Some(code),
            response,
        );
    }

    /// The broker refused `msg` for good; the policy's `on_permanent_failure` decides its fate,
    /// which is reported separately (dead letter, or retry).
    pub fn permanent(&self, msg: &Message, code: u16, response: &str) {
        self.record(
            |c| &c.permanent_failures,
            RecordType::PermanentFailure,
            msg,
            Some(code),
            response,
        );
    }

    /// The message is in the dead-letter area now (`reason` as stored in `last_error`).
    pub fn dead_lettered(&self, msg: &Message, reason: &str) {
        self.record(
            |c| &c.dead_lettered,
            RecordType::DeadLetter,
            msg,
            leading_code(reason),
            reason,
        );
    }

    /// One send of `n` messages took `d`: `n` latency observations, one batch size.
    pub fn sent(&self, d: Duration, n: u64) {
        for _ in 0..n {
            self.counters.send_latency.observe(d.as_secs_f64());
        }
        self.counters.send_batch_size.observe(n as f64);
    }

    /// Sets the queue's open-broker-connections gauge to `n`.
    pub fn set_connections(&self, n: usize) {
        self.counters.connections.set(n as i64);
    }
}
