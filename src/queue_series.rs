//! Which per-queue metrics series exist, and what their `queue` label says.
//!
//! Queue names carry routing (`campaign:tenant@domain`), so a relay may see millions of
//! them; a series per name ever seen would grow `/metrics` without bound. Two bounds:
//!
//! - **Only live queues have series.** A queue's series are created when it is first
//!   counted and dropped when the dispatcher reaps it (`--queue-reap-interval`). Its
//!   counters are then added to the series labelled [`REAPED`] first, so a sum over all
//!   series (`sum(spoolrelay_delivered_total)`) never goes down. Histograms and the
//!   connections gauge of a reaped queue are dropped (a histogram cannot be merged into
//!   another through `prometheus-client`; rates over a window are unaffected).
//! - **`--metrics-queue-label`** maps each name to the label value ([`QueueLabelMode`]):
//!   the full name (default), or only its tenant, domain or campaign, or nothing, so the
//!   series count is bounded by the tenants (domains, campaigns) instead of the queues.
//!   Queues that share a label value share series; those go when the last of them is
//!   reaped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use policy::QueueName;

/// Default `--queue-reap-interval`: KumoMTA's `reap_interval` default.
pub const DEFAULT_REAP_INTERVAL: Duration = Duration::from_secs(600);

/// Default `--max-broker-connections` (see `dispatch/budget.rs`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// What many queues may cost: the reap interval, the metrics label, the connection bound.
#[derive(Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueArgs {
    /// How long a queue stays empty and idle before it is reaped: its worker, broker
    /// connections, Lua state and metrics series go (KumoMTA's reap_interval). Connections
    /// of an empty queue close after min(60s, this).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub queue_reap_interval: Duration,
    /// What the `queue` label of per-queue metrics holds: the full queue name, or only its
    /// tenant, domain or campaign, or nothing (one series), to bound their number.
    #[arg(long, value_name = "PART", value_enum, default_value_t = QueueLabelMode::Full)]
    pub metrics_queue_label: QueueLabelMode,
    /// Most broker connections open at once over all queues. Each is a Lua state on an OS
    /// thread of its own (~60 KiB, 2 file descriptors plus the broker's sockets); past it, a
    /// queue that needs one closes an idle connection of another queue, or waits for one.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_broker_connections: usize,
}

impl Default for QueueArgs {
    fn default() -> Self {
        QueueArgs {
            queue_reap_interval: DEFAULT_REAP_INTERVAL,
            metrics_queue_label: QueueLabelMode::Full,
            max_broker_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// The label value that collects the counters of reaped queues.
pub const REAPED: &str = "_reaped";
/// The label value of a queue whose name lacks the chosen part (no tenant, ...).
pub const NO_PART: &str = "_none";
/// The label value of every queue under `--metrics-queue-label=none`.
pub const ALL: &str = "_all";

/// What the `queue` label of per-queue metrics holds (`--metrics-queue-label`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueueLabelMode {
    /// The whole queue name: one series per live queue.
    #[default]
    Full,
    /// The tenant (`_none` without one).
    Tenant,
    /// The destination domain.
    Domain,
    /// The campaign (`_none` without one).
    Campaign,
    /// Nothing: all queues in one series labelled `_all`.
    None,
}

impl QueueLabelMode {
    /// The label value of `queue` under this mode.
    pub fn label(self, queue: &str) -> String {
        let part = |p: Option<String>| p.unwrap_or_else(|| NO_PART.to_string());
        match self {
            QueueLabelMode::Full => queue.to_string(),
            QueueLabelMode::Tenant => part(QueueName::parse(queue).tenant),
            QueueLabelMode::Domain => part(QueueName::parse(queue).domain),
            QueueLabelMode::Campaign => part(QueueName::parse(queue).campaign),
            QueueLabelMode::None => ALL.to_string(),
        }
    }
}

/// Live queues and the series (of type `S`) each label value has. Queue → its label's
/// `Arc<S>`; label → the `Arc<S>` and how many live queues use it.
pub struct LiveSeries<S> {
    mode: QueueLabelMode,
    queues: HashMap<String, Arc<S>>,
    labels: HashMap<String, (Arc<S>, usize)>,
}

/// What [`LiveSeries::forget`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Forgot<S> {
    /// Not a live queue.
    Unknown,
    /// Someone still holds the queue's series (a send being reported): try again later.
    InUse,
    /// The queue is gone; other live queues still use its label's series.
    Shared,
    /// The queue and its label's series are gone: here is that series, to fold into the
    /// totals of reaped queues.
    Last(Arc<S>),
}

impl<S> LiveSeries<S> {
    /// An empty set labelling by `mode`.
    pub fn new(mode: QueueLabelMode) -> Self {
        LiveSeries {
            mode,
            queues: HashMap::new(),
            labels: HashMap::new(),
        }
    }

    /// The label mode.
    pub fn mode(&self) -> QueueLabelMode {
        self.mode
    }

    /// The series of a live queue.
    pub fn get(&self, queue: &str) -> Option<Arc<S>> {
        self.queues.get(queue).cloned()
    }

    /// The series of `queue`, made live; `make(label)` builds a label's series on first use.
    pub fn get_or_insert(&mut self, queue: &str, make: impl FnOnce(&str) -> S) -> Arc<S> {
        if let Some(found) = self.queues.get(queue) {
            return found.clone();
        }
        let label = self.mode.label(queue);
        let entry = self
            .labels
            .entry(label)
            .or_insert_with_key(|label| (Arc::new(make(label)), 0));
        entry.1 += 1;
        let series = entry.0.clone();
        self.queues.insert(queue.to_owned(), series.clone());
        series
    }

    /// Drops `queue` (reaped). When it was the last queue of its label, the caller folds
    /// and removes that label's series.
    pub fn forget(&mut self, queue: &str) -> Forgot<S> {
        let Some(series) = self.queues.get(queue) else {
            return Forgot::Unknown;
        };
        let label = self.mode.label(queue);
        let Some((_, members)) = self.labels.get(&label) else {
            return Forgot::Unknown;
        };
        // The last member's series is held by `queues` and `labels` only, unless a report
        // is under way; folding now could lose that report's count.
        if *members == 1 && Arc::strong_count(series) > 2 {
            return Forgot::InUse;
        }
        self.queues.remove(queue);
        shrink_if_sparse(&mut self.queues);
        let entry = self.labels.get_mut(&label).expect("label looked up above");
        entry.1 -= 1;
        if entry.1 > 0 {
            return Forgot::Shared;
        }
        let (series, _) = self.labels.remove(&label).expect("label looked up above");
        shrink_if_sparse(&mut self.labels);
        Forgot::Last(series)
    }

    /// The label values of live queues.
    pub fn labels(&self) -> impl Iterator<Item = &String> {
        self.labels.keys()
    }

    /// Each live label value with its series.
    pub fn series(&self) -> impl Iterator<Item = (&String, &Arc<S>)> {
        self.labels
            .iter()
            .map(|(label, (series, _))| (label, series))
    }

    /// How many queues are live.
    pub fn len(&self) -> usize {
        self.queues.len()
    }

    /// Whether no queue is live.
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }
}

/// Gives back a map's capacity once it is under a quarter full (a burst of queues would
/// otherwise keep its table for good). Amortized O(1) per removal.
pub fn shrink_if_sparse<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_take_the_chosen_part_of_the_name() {
        let q = "spring:acme@example.com";
        let cases = [
            (QueueLabelMode::Full, q),
            (QueueLabelMode::Tenant, "acme"),
            (QueueLabelMode::Domain, "example.com"),
            (QueueLabelMode::Campaign, "spring"),
            (QueueLabelMode::None, ALL),
        ];
        for (mode, want) in cases {
            assert_eq!(mode.label(q), want, "{mode:?}");
        }
        assert_eq!(QueueLabelMode::Tenant.label("example.com"), NO_PART);
    }

    #[test]
    fn a_label_series_goes_with_its_last_queue() {
        let mut live = LiveSeries::new(QueueLabelMode::Tenant);
        let made = std::cell::Cell::new(0);
        let make = |label: &str| {
            made.set(made.get() + 1);
            label.to_string()
        };
        live.get_or_insert("acme@a.com", make);
        live.get_or_insert("acme@b.com", make);
        live.get_or_insert("acme@b.com", make);
        assert_eq!(made.get(), 1, "one series per label");
        let held = live.get("acme@a.com");
        assert_eq!(live.forget("acme@a.com"), Forgot::Shared);
        assert_eq!(
            live.forget("acme@b.com"),
            Forgot::InUse,
            "a report holds it"
        );
        drop(held);
        assert_eq!(
            live.forget("acme@b.com"),
            Forgot::Last(Arc::new("acme".to_string()))
        );
        assert_eq!(live.forget("acme@b.com"), Forgot::Unknown);
        assert!(live.is_empty() && live.labels().next().is_none());
    }
}
