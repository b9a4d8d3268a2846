//! Per-queue metrics: what one live queue (or label value) counts, how a reaped queue's
//! counts fold into the `_reaped` totals, and how they are encoded at scrape time.
//!
//! The series live in [`LiveSeries`](crate::queue_series::LiveSeries) only, not in
//! `prometheus-client` families as well: a `Family` keeps its hash table's capacity after
//! its entries are removed (it offers no way to shrink it), so a burst of 100 000 queues
//! left ~4 MiB per family (nine of them) behind for good, after every queue was reaped
//! (docs/performance.md, P7). [`QueueSeries`] encodes a snapshot of the live series in
//! the same OpenMetrics text a family would.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::TypedMetric;

use crate::queue_series::REAPED;

/// The one label of per-queue metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    /// The queue name, or the part of it `--metrics-queue-label` chose.
    pub queue: String,
}

/// Seconds, 1 ms to ~16 s (and `+Inf`): a send or an fsync.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Seconds, 10 ms to ~11 days: a message's time in the spool, retries included.
pub fn age_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 4.0, 14))
}

/// Messages, 1 to 4096.
pub fn count_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// One queue's metrics since the daemon started (shared by the queues of one label value).
#[derive(Debug)]
pub struct QueueCounters {
    /// Messages accepted by ingest (fsynced).
    pub accepted: Counter,
    /// Messages the broker accepted.
    pub delivered: Counter,
    /// Attempts that will be retried.
    pub transient_failures: Counter,
    /// Attempts refused for good.
    pub permanent_failures: Counter,
    /// Messages moved to the dead-letter area.
    pub dead_lettered: Counter,
    /// Open broker connections (a gauge the queue worker keeps current).
    pub connections: Gauge,
    /// Seconds from handing messages to the policy's send to its outcome, per message.
    pub send_latency: Histogram,
    /// Messages per send call.
    pub send_batch_size: Histogram,
    /// Seconds from ingest to the broker's acceptance.
    pub ingest_to_delivery: Histogram,
}

impl Default for QueueCounters {
    fn default() -> Self {
        QueueCounters {
            accepted: Counter::default(),
            delivered: Counter::default(),
            transient_failures: Counter::default(),
            permanent_failures: Counter::default(),
            dead_lettered: Counter::default(),
            connections: Gauge::default(),
            send_latency: seconds_histogram(),
            send_batch_size: count_histogram(),
            ingest_to_delivery: age_histogram(),
        }
    }
}

/// A per-queue family: its exposition name, its help, and which metric of a queue it is.
type Described<M> = (&'static str, &'static str, fn(&QueueCounters) -> &M);

/// The five counters of [`QueueCounters`].
const COUNTERS: [Described<Counter>; 5] = [
    (
        "spoolrelay_accepted",
        "Messages accepted by HTTP ingest (fsynced)",
        |q| &q.accepted,
    ),
    (
        "spoolrelay_delivered",
        "Messages the broker accepted; deleted from the spool",
        |q| &q.delivered,
    ),
    (
        "spoolrelay_transient_failures",
        "Send attempts that failed temporarily (4xx, timeouts); the message is retried",
        |q| &q.transient_failures,
    ),
    (
        "spoolrelay_permanent_failures",
        "Send attempts rejected permanently (5xx)",
        |q| &q.permanent_failures,
    ),
    (
        "spoolrelay_dead_lettered",
        "Messages moved to the dead-letter area (permanent failure or max_age)",
        |q| &q.dead_lettered,
    ),
];

/// The three histograms of [`QueueCounters`].
const HISTOGRAMS: [Described<Histogram>; 3] = [
    (
        "spoolrelay_send_latency_seconds",
        "Time from handing messages to the policy's send to its outcome, per message",
        |q| &q.send_latency,
    ),
    (
        "spoolrelay_send_batch_size",
        "Messages per call of the policy's send",
        |q| &q.send_batch_size,
    ),
    (
        "spoolrelay_ingest_to_delivery_seconds",
        "Time from ingest to the broker's acceptance, retries included",
        |q| &q.ingest_to_delivery,
    ),
];

/// The counters of every reaped queue, added up (exposed as `queue="_reaped"`, each
/// counter once it is above zero, so sums over all series never go down).
#[derive(Debug, Default)]
pub struct ReapedTotals(QueueCounters);

impl ReapedTotals {
    /// Adds a reaped label's counters. Histograms and the gauge are dropped: a histogram
    /// cannot be merged into another, and a reaped queue has no connection.
    pub fn fold(&self, gone: &QueueCounters) {
        for (_, _, counter) in COUNTERS {
            let count = counter(gone).get();
            if count > 0 {
                counter(&self.0).inc_by(count);
            }
        }
    }
}

fn connections(q: &QueueCounters) -> &Gauge {
    &q.connections
}

/// A scrape's snapshot of the per-queue series, as a `prometheus-client` collector.
#[derive(Debug)]
pub struct QueueSeries {
    /// Live label values and their series.
    pub live: Vec<(QueueLabel, Arc<QueueCounters>)>,
    /// The totals of reaped queues.
    pub reaped: Arc<ReapedTotals>,
}

impl Collector for QueueSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let reaped = QueueLabel {
            queue: REAPED.to_owned(),
        };
        for (name, help, counter) in COUNTERS {
            let total = counter(&self.reaped.0);
            let mut family = encoder.encode_descriptor(name, help, None, Counter::<u64>::TYPE)?;
            for (label, series) in &self.live {
                counter(series).encode(family.encode_family(label)?)?;
            }
            if total.get() > 0 {
                total.encode(family.encode_family(&reaped)?)?;
            }
        }
        self.encode_each(
            &mut encoder,
            "spoolrelay_connections",
            "Open broker connections",
            connections,
        )?;
        for (name, help, histogram) in HISTOGRAMS {
            self.encode_each(&mut encoder, name, help, histogram)?;
        }
        Ok(())
    }
}

impl QueueSeries {
    /// One family: the metric `pick` chooses, for every live label.
    fn encode_each<M: EncodeMetric + TypedMetric>(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        pick: fn(&QueueCounters) -> &M,
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, None, M::TYPE)?;
        for (label, series) in &self.live {
            pick(series).encode(family.encode_family(label)?)?;
        }
        Ok(())
    }
}
