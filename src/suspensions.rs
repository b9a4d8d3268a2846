//! The operator's brake (admin API `suspend`/`resume`): a suspended queue's worker stops
//! leasing, so its messages stay waiting while ingest keeps accepting new ones.
//!
//! Its own module, beside `dispatch` (which reads it) and `admin`/`metrics` (which set and
//! report it), so none of those needs to import another to reach it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Queues an operator suspended: their workers lease nothing until resumed. Memory only: a
/// restart resumes every queue. Cheap to clone; every clone sees the same set.
#[derive(Clone)]
pub struct Suspensions {
    set: Arc<Mutex<BTreeSet<String>>>,
    /// Ticks on every change, so a resumed queue's worker wakes at once.
    changed: Arc<watch::Sender<u64>>,
}

impl Default for Suspensions {
    fn default() -> Self {
        Suspensions {
            set: Arc::default(),
            changed: Arc::new(watch::channel(0).0),
        }
    }
}

impl Suspensions {
    fn with_set<T>(&self, f: impl FnOnce(&mut BTreeSet<String>) -> T) -> T {
        f(&mut self.set.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Suspends `queue`; false if it already was.
    pub fn suspend(&self, queue: &str) -> bool {
        let new = self.with_set(|s| s.insert(queue.to_owned()));
        self.changed.send_modify(|n| *n += 1);
        new
    }

    /// Resumes `queue`; false if it was not suspended.
    pub fn resume(&self, queue: &str) -> bool {
        let was = self.with_set(|s| s.remove(queue));
        self.changed.send_modify(|n| *n += 1);
        was
    }

    /// Whether `queue` is suspended.
    pub fn is_suspended(&self, queue: &str) -> bool {
        self.with_set(|s| s.contains(queue))
    }

    /// The suspended queues, sorted.
    pub fn list(&self) -> Vec<String> {
        self.with_set(|s| s.iter().cloned().collect())
    }

    /// Ticks on every suspend and resume.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
