//! Prometheus metrics through `prometheus-client` (the OpenMetrics text format).
//!
//! Three kinds of numbers:
//! - **Counters** bumped where outcomes are decided (ingest, settlement). Each queue's
//!   metrics are one [`QueueCounters`] that a queue worker looks up once and keeps (shared
//!   atomics, encoded at scrape time by `queue_metrics`), so the hot path is an atomic add;
//!   only ingest looks a queue up per request (a read lock on a map). Only
//!   live queues have series; a reaped queue's counters fold into `queue="_reaped"`, and
//!   `--metrics-queue-label` labels by a part of the name (see `queue_series`).
//! - **Histograms**: send latency, send batch size and time from ingest to delivery, per
//!   queue; fsync latency and messages per group commit, fed by the spool's commit thread.
//! - **Gauges and totals read at scrape time**: queue depth and age from `Spool::stats`,
//!   group-commit totals from `Spool::commit_stats`, capacity figures. They go into a
//!   registry built for that one scrape, beside the long-lived families.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use spool::Spool;

use crate::capacity::Capacity;
pub use crate::queue_metrics::QueueCounters;
use crate::queue_metrics::{
    count_histogram, seconds_histogram, QueueLabel, QueueSeries, ReapedTotals,
};
use crate::queue_series::{Forgot, LiveSeries, QueueLabelMode};
use crate::suspensions::Suspensions;

/// Everything the daemon counts. Shared as `Arc<Metrics>`.
pub struct Metrics {
    /// The series of live queues (see `queue_metrics` for why there are no families).
    queues: RwLock<LiveSeries<QueueCounters>>,
    /// What reaped queues counted.
    reaped: Arc<ReapedTotals>,
    /// Seconds per group commit's flush + fsync (the spool's commit thread observes it).
    pub fsync_latency: Histogram,
    /// Durable writes per group commit.
    pub commit_batch_size: Histogram,
    /// Delivery-log records dropped because the writer fell behind (or failed to write).
    pub log_dropped: Arc<AtomicU64>,
    /// Queue workers running (the dispatcher's supervisor sets it).
    pub dispatch_workers: Gauge,
    /// Queues with messages that wait for a start slot (`dispatch/admission.rs`).
    pub dispatch_waiting: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let live = self.queues.read().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Metrics")
            .field("label", &live.mode())
            .field("live_queues", &live.len())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(QueueLabelMode::default())
    }
}

impl Metrics {
    /// Metrics whose per-queue series are labelled by `mode`.
    pub fn new(mode: QueueLabelMode) -> Self {
        Self {
            queues: RwLock::new(LiveSeries::new(mode)),
            reaped: Arc::default(),
            fsync_latency: seconds_histogram(),
            commit_batch_size: count_histogram(),
            log_dropped: Arc::default(),
            dispatch_workers: Gauge::default(),
            dispatch_waiting: Gauge::default(),
        }
    }

    /// The metrics of `queue`, created on first use. Callers on a hot path keep the `Arc`.
    pub fn queue(&self, queue: &str) -> Arc<QueueCounters> {
        if let Some(found) = self
            .queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(queue)
        {
            return found;
        }
        self.queues
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(queue, |_| QueueCounters::default())
    }

    /// Drops the series of a reaped `queue`, its counters added to `queue="_reaped"` first.
    /// False while a report on the queue is under way (ask again later).
    pub fn forget(&self, queue: &str) -> bool {
        let mut live = self.queues.write().unwrap_or_else(|e| e.into_inner());
        match live.forget(queue) {
            Forgot::InUse => false,
            Forgot::Unknown | Forgot::Shared => true,
            // Under the write lock: no one can look the queue up (and count) midway.
            Forgot::Last(gone) => {
                self.reaped.fold(&gone);
                true
            }
        }
    }

    /// What the spool's commit thread calls after each group commit.
    pub fn commit_observer(self: &Arc<Self>) -> impl Fn(Duration, usize) + Send + Sync + 'static {
        let metrics = self.clone();
        move |sync, jobs| {
            metrics.fsync_latency.observe(sync.as_secs_f64());
            metrics.commit_batch_size.observe(jobs as f64);
        }
    }

    /// The whole exposition (OpenMetrics text): the long-lived families, then figures read
    /// from `spool` now, then `extra` (capacity) registrations.
    pub fn render(
        &self,
        spool: &Spool,
        suspended: &[String],
        extra: impl FnOnce(&mut Registry),
    ) -> String {
        let mut r = Registry::default();
        // Counters: the encoder appends `_total` to a counter's name.
        r.register_collector(Box::new(self.queue_series()));
        r.register(
            "spoolrelay_spool_fsync_duration_seconds",
            "Time of one group commit's flush + fsync",
            self.fsync_latency.clone(),
        );
        r.register(
            "spoolrelay_spool_commit_batch_size",
            "Durable writes carried by one group commit (one fsync)",
            self.commit_batch_size.clone(),
        );
        r.register(
            "spoolrelay_dispatch_workers",
            "Queue workers running: queues with messages, sends in flight or a connection still open",
            self.dispatch_workers.clone(),
        );
        r.register(
            "spoolrelay_dispatch_queues_waiting_to_start",
            "Queues with messages whose worker waits for a start slot (at most \
             --max-broker-connections workers start at once)",
            self.dispatch_waiting.clone(),
        );
        self.register_spool_readings(&mut r, spool, suspended);
        extra(&mut r);
        let mut out = String::with_capacity(8192);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &r) {
            out = format!("# metrics encoding failed: {e}\n");
        }
        out
    }

    /// A snapshot of the per-queue series for one scrape.
    fn queue_series(&self) -> QueueSeries {
        let live = self.queues.read().unwrap_or_else(|e| e.into_inner());
        QueueSeries {
            live: live
                .series()
                .map(|(label, series)| {
                    let label = QueueLabel {
                        queue: label.clone(),
                    };
                    (label, series.clone())
                })
                .collect(),
            reaped: self.reaped.clone(),
        }
    }

    /// Gauges and totals read now from the spool, in `r`.
    fn register_spool_readings(&self, r: &mut Registry, spool: &Spool, suspended: &[String]) {
        let now = spool::now_ms();
        let stats = spool.stats(now);
        let live = self.queues.read().unwrap_or_else(|e| e.into_inner());
        let mode = live.mode();
        let label = |queue: &str| QueueLabel {
            queue: mode.label(queue),
        };
        // Every live label reports, so a drained (not yet reaped) queue shows depth 0.
        let depth = Family::<QueueLabel, Gauge>::default();
        let due = Family::<QueueLabel, Gauge>::default();
        let bytes = Family::<QueueLabel, Gauge>::default();
        let age = Family::<QueueLabel, Gauge<f64, AtomicU64>>::default();
        for name in live.labels() {
            let name = QueueLabel {
                queue: name.clone(),
            };
            let _ = depth.get_or_create(&name);
            let _ = due.get_or_create(&name);
            let _ = bytes.get_or_create(&name);
            let _ = age.get_or_create(&name);
        }
        drop(live);
        for (queue, q) in &stats.queues {
            let name = label(queue);
            depth.get_or_create(&name).inc_by(q.count as i64);
            due.get_or_create(&name).inc_by(q.due_now as i64);
            bytes.get_or_create(&name).inc_by(q.bytes as i64);
            let oldest = q
                .oldest_created_ms
                .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
            let age = age.get_or_create(&name);
            if oldest > age.get() {
                age.set(oldest);
            }
        }
        let paused = Family::<QueueLabel, Gauge>::default();
        for queue in suspended {
            paused.get_or_create(&label(queue)).inc();
        }
        r.register(
            "spoolrelay_queue_depth",
            "Messages in the queue (waiting and in flight)",
            depth,
        );
        r.register(
            "spoolrelay_queue_bytes",
            "Bytes of the queue's messages (waiting and in flight), as recorded at enqueue",
            bytes,
        );
        r.register(
            "spoolrelay_queue_due",
            "Waiting messages that are due now (a backlog when it stays high)",
            due,
        );
        r.register(
            "spoolrelay_queue_oldest_age_seconds",
            "Age of the oldest message in the queue (0 when empty)",
            age,
        );
        r.register(
            "spoolrelay_queue_suspended",
            "Queues suspended through the admin API (1 per suspended queue of this label)",
            paused,
        );

        let (groups, jobs, sync_micros) = spool.commit_stats();
        r.register(
            "spoolrelay_dead_letter_depth",
            "Messages in the dead-letter area",
            ConstGauge::new(stats.dead_letter as i64),
        );
        r.register(
            "spoolrelay_quarantined",
            "Unreadable records set aside in quarantine (kept; nothing removes them)",
            ConstCounter::new(stats.quarantine as u64),
        );
        r.register(
            "spoolrelay_spool_commit_groups",
            "Group commits (one flush + fsync each)",
            ConstCounter::new(groups),
        );
        r.register(
            "spoolrelay_spool_commit_jobs",
            "Durable writes carried by group commits; jobs/groups is the fsync sharing factor",
            ConstCounter::new(jobs),
        );
        r.register(
            "spoolrelay_spool_fsync_seconds",
            "Time spent in flush + fsync",
            ConstCounter::new(sync_micros as f64 / 1e6),
        );
        r.register(
            "spoolrelay_delivery_log_dropped",
            "Delivery-log records dropped because the writer fell behind or could not write",
            ConstCounter::new(self.log_dropped.load(std::sync::atomic::Ordering::Relaxed)),
        );
    }
}

#[derive(Clone)]
struct Scrape {
    spool: Spool,
    metrics: Arc<Metrics>,
    suspensions: Suspensions,
    capacity: Arc<Capacity>,
}

/// `GET /metrics`. Not behind the admin token: it shows counts and queue names only.
pub fn router(
    spool: Spool,
    metrics: Arc<Metrics>,
    suspensions: Suspensions,
    capacity: Arc<Capacity>,
) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(Scrape {
            spool,
            metrics,
            suspensions,
            capacity,
        })
}

async fn scrape(State(s): State<Scrape>) -> impl IntoResponse {
    // `Spool::stats` walks the index under its lock: keep it off the async workers.
    let text = tokio::task::spawn_blocking(move || {
        let capacity = s.capacity.clone();
        // Spool usage, the capacity limits, free disk and refusals (capacity.rs).
        s.metrics
            .render(&s.spool, &s.suspensions.list(), |r| capacity.register(r))
    })
    .await
    .unwrap_or_else(|e| format!("# metrics rendering failed: {e}\n"));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), Default::default()).unwrap();
        let m = Metrics::default();
        let q = m.queue("q\"x");
        for _ in 0..2 {
            q.send_latency.observe(0.0005);
        }
        q.send_latency.observe(60.0);
        q.delivered.inc_by(3);
        let text = m.render(&spool, &["paused".into()], |_| {});
        let bucket = |le: &str| {
            format!("spoolrelay_send_latency_seconds_bucket{{le=\"{le}\",queue=\"q\\\"x\"}}")
        };
        assert!(text.contains(&format!("{} 2\n", bucket("0.001"))), "{text}");
        assert!(
            text.contains(&format!("{} 2\n", bucket("16.384"))),
            "{text}"
        );
        assert!(text.contains(&format!("{} 3\n", bucket("+Inf"))), "{text}");
        assert!(
            text.contains("spoolrelay_delivered_total{queue=\"q\\\"x\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("spoolrelay_queue_depth{queue=\"q\\\"x\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("spoolrelay_queue_suspended{queue=\"paused\"} 1\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_reaped_queue_leaves_only_its_counts_in_the_reaped_totals() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), Default::default()).unwrap();
        let m = Metrics::default();
        m.queue("gone@a.com").delivered.inc_by(2);
        m.queue("gone@b.com").delivered.inc_by(3);
        m.queue("live@c.com").send_latency.observe(0.5);
        assert!(m.forget("gone@a.com") && m.forget("gone@b.com"));
        let text = m.render(&spool, &[], |_| {});
        assert!(!text.contains("gone@"), "reaped series stay: {text}");
        assert!(
            text.contains("spoolrelay_delivered_total{queue=\"_reaped\"} 5\n"),
            "{text}"
        );
        assert!(
            !text.contains("spoolrelay_accepted_total{queue=\"_reaped\"}"),
            "a total that never counted is not shown: {text}"
        );
        assert!(
            text.contains("spoolrelay_send_latency_seconds_count{queue=\"live@c.com\"} 1\n"),
            "{text}"
        );
        // Families keep their descriptor with no live queue, as a registered family did.
        assert!(m.forget("live@c.com"));
        let text = m.render(&spool, &[], |_| {});
        assert!(
            text.contains("# TYPE spoolrelay_connections gauge\n"),
            "{text}"
        );
        assert!(!text.contains("live@c.com"), "{text}");
    }
}
