//! Prometheus metrics, hand-written exposition (text format 0.0.4).
//!
//! Two kinds of numbers:
//! - **Counters** bumped where outcomes are decided (ingest, settlement). Each queue's
//!   counters are one [`QueueCounters`] that a queue worker looks up once and keeps, so
//!   the hot path is a relaxed atomic add; only ingest looks a queue up per request (a read
//!   lock on a map). The latency histogram is a fixed array of atomics.
//! - **Gauges** read at scrape time: queue depth and age from `Spool::stats`, group-commit
//!   totals from `Spool::commit_stats`. Nothing is sampled in the background.
//!
//! A hand-written exposition rather than a crate: the metric set is fixed and small, and a
//! registry would add a lock or a label lookup per increment for no gain.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use spool::Spool;

use crate::capacity::Capacity;
use crate::suspensions::Suspensions;

/// Upper bounds (seconds) of the send latency buckets; `+Inf` is implied.
const LATENCY_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One queue's counters since the daemon started.
#[derive(Debug, Default)]
pub struct QueueCounters {
    pub accepted: AtomicU64,
    pub delivered: AtomicU64,
    pub transient_failures: AtomicU64,
    pub permanent_failures: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Open broker connections (a gauge the queue worker keeps current).
    pub connections: AtomicU64,
}

/// A fixed-bucket histogram of seconds; sums kept in microseconds.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records `n` observations of `d` (a batch send is one duration for `n` messages).
    pub fn observe(&self, d: Duration, n: u64) {
        let secs = d.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].fetch_add(n, Relaxed);
        self.count.fetch_add(n, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64 * n, Relaxed);
    }
}

/// Everything the daemon counts. Shared as `Arc<Metrics>`.
#[derive(Debug, Default)]
pub struct Metrics {
    queues: RwLock<HashMap<String, Arc<QueueCounters>>>,
    pub send_latency: Histogram,
    /// Delivery-log records dropped because the writer fell behind (or failed to write).
    pub log_dropped: Arc<AtomicU64>,
}

impl Metrics {
    /// The counters of `queue`, created on first use. Callers on a hot path keep the `Arc`.
    pub fn queue(&self, queue: &str) -> Arc<QueueCounters> {
        if let Some(found) = self
            .queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(queue)
        {
            return found.clone();
        }
        self.queues
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(queue.to_owned())
            .or_default()
            .clone()
    }

    fn snapshot(&self) -> BTreeMap<String, Arc<QueueCounters>> {
        let queues = self.queues.read().unwrap_or_else(|e| e.into_inner());
        queues.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The whole exposition: counters, then gauges read from `spool` now.
    pub fn render(&self, spool: &Spool, suspended: &[String]) -> String {
        let now = spool::now_ms();
        let stats = spool.stats(now);
        let counters = self.snapshot();
        // Every queue seen by either side, so a drained queue reports depth 0, not nothing.
        let mut names: Vec<&String> = counters.keys().chain(stats.queues.keys()).collect();
        names.sort();
        names.dedup();
        let mut out = String::with_capacity(4096);

        type Field = fn(&QueueCounters) -> &AtomicU64;
        let per_queue: [(&str, &str, &str, Field); 6] = [
            (
                "spoolrelay_accepted_total",
                "counter",
                "Messages accepted by HTTP ingest (fsynced).",
                |c| &c.accepted,
            ),
            (
                "spoolrelay_delivered_total",
                "counter",
                "Messages the broker accepted; deleted from the spool.",
                |c| &c.delivered,
            ),
            (
                "spoolrelay_transient_failures_total",
                "counter",
                "Send attempts that failed temporarily (4xx, timeouts); the message is retried.",
                |c| &c.transient_failures,
            ),
            (
                "spoolrelay_permanent_failures_total",
                "counter",
                "Send attempts rejected permanently (5xx).",
                |c| &c.permanent_failures,
            ),
            (
                "spoolrelay_dead_lettered_total",
                "counter",
                "Messages moved to the dead-letter area (permanent failure or max_age).",
                |c| &c.dead_lettered,
            ),
            (
                "spoolrelay_connections",
                "gauge",
                "Open broker connections.",
                |c| &c.connections,
            ),
        ];
        for (name, kind, help, field) in per_queue {
            header(&mut out, name, kind, help);
            for (queue, c) in &counters {
                let _ = writeln!(
                    out,
                    "{name}{{queue=\"{}\"}} {}",
                    escape(queue),
                    field(c).load(Relaxed)
                );
            }
        }

        header(
            &mut out,
            "spoolrelay_queue_depth",
            "gauge",
            "Messages in the queue (waiting and in flight).",
        );
        for queue in &names {
            let n = stats.queues.get(*queue).map_or(0, |q| q.count);
            let _ = writeln!(
                out,
                "spoolrelay_queue_depth{{queue=\"{}\"}} {n}",
                escape(queue)
            );
        }
        header(
            &mut out,
            "spoolrelay_queue_due",
            "gauge",
            "Waiting messages that are due now (a backlog when it stays high).",
        );
        for queue in &names {
            let n = stats.queues.get(*queue).map_or(0, |q| q.due_now);
            let _ = writeln!(
                out,
                "spoolrelay_queue_due{{queue=\"{}\"}} {n}",
                escape(queue)
            );
        }
        header(
            &mut out,
            "spoolrelay_queue_oldest_age_seconds",
            "gauge",
            "Age of the oldest message in the queue (0 when empty).",
        );
        for queue in &names {
            let age = stats
                .queues
                .get(*queue)
                .and_then(|q| q.oldest_created_ms)
                .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
            let _ = writeln!(
                out,
                "spoolrelay_queue_oldest_age_seconds{{queue=\"{}\"}} {age}",
                escape(queue)
            );
        }
        header(
            &mut out,
            "spoolrelay_queue_suspended",
            "gauge",
            "1 while the queue is suspended through the admin API.",
        );
        let mut all: Vec<&String> = names.clone();
        all.extend(suspended);
        all.sort();
        all.dedup();
        for queue in all {
            let on = u8::from(suspended.contains(queue));
            let _ = writeln!(
                out,
                "spoolrelay_queue_suspended{{queue=\"{}\"}} {on}",
                escape(queue)
            );
        }

        let h = &self.send_latency;
        header(
            &mut out,
            "spoolrelay_send_latency_seconds",
            "histogram",
            "Time from handing messages to the policy's send to its outcome, per message.",
        );
        let mut cumulative = 0;
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += h.buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "spoolrelay_send_latency_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        cumulative += h.buckets[LATENCY_BUCKETS.len()].load(Relaxed);
        let _ = writeln!(
            out,
            "spoolrelay_send_latency_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "spoolrelay_send_latency_seconds_sum {}",
            h.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "spoolrelay_send_latency_seconds_count {cumulative}");

        let (groups, jobs, sync_micros) = spool.commit_stats();
        let single: [(&str, &str, &str, String); 6] = [
            (
                "spoolrelay_dead_letter_depth",
                "gauge",
                "Messages in the dead-letter area.",
                stats.dead_letter.to_string(),
            ),
            (
                "spoolrelay_quarantined_total",
                "counter",
                "Unreadable records set aside in quarantine (kept; nothing removes them).",
                stats.quarantine.to_string(),
            ),
            (
                "spoolrelay_spool_commit_groups_total",
                "counter",
                "Group commits (one flush + fsync each).",
                groups.to_string(),
            ),
            (
                "spoolrelay_spool_commit_jobs_total",
                "counter",
                "Durable writes carried by group commits; jobs/groups is the fsync sharing factor.",
                jobs.to_string(),
            ),
            (
                "spoolrelay_spool_fsync_seconds_total",
                "counter",
                "Time spent in flush + fsync.",
                (sync_micros as f64 / 1e6).to_string(),
            ),
            (
                "spoolrelay_delivery_log_dropped_total",
                "counter",
                "Delivery-log records dropped because the writer fell behind or could not write.",
                self.log_dropped.load(Relaxed).to_string(),
            ),
        ];
        for (name, kind, help, value) in single {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
        out
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
        let mut text = s.metrics.render(&s.spool, &s.suspensions.list());
        // Spool usage, the capacity limits, free disk and refusals (capacity.rs).
        text.push_str(&s.capacity.exposition());
        text
    })
    .await
    .unwrap_or_else(|e| format!("# metrics rendering failed: {e}\n"));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_the_exposition() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), Default::default()).unwrap();
        let m = Metrics::default();
        m.send_latency.observe(Duration::from_micros(500), 2);
        m.send_latency.observe(Duration::from_secs(60), 1);
        m.queue("q\"x").delivered.fetch_add(3, Relaxed);
        let text = m.render(&spool, &["paused".into()]);
        assert!(text.contains("spoolrelay_send_latency_seconds_bucket{le=\"0.001\"} 2\n"));
        assert!(text.contains("spoolrelay_send_latency_seconds_bucket{le=\"10\"} 2\n"));
        assert!(text.contains("spoolrelay_send_latency_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("spoolrelay_send_latency_seconds_count 3\n"));
        assert!(text.contains("spoolrelay_delivered_total{queue=\"q\\\"x\"} 3\n"));
        assert!(text.contains("spoolrelay_queue_depth{queue=\"q\\\"x\"} 0\n"));
        assert!(text.contains("spoolrelay_queue_suspended{queue=\"paused\"} 1\n"));
    }
}
