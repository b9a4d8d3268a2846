//! What an idle queue leaves behind, and how it goes away.
//!
//! A queue's worker retires once its queue is empty, nothing is in flight and its
//! connections were closed (idle for `min(IDLE_TIMEOUT, reap interval)`): from then on the
//! queue costs no task, no connection and no Lua state. What is left is its name in the
//! supervisor's [`IdleQueues`] and its metrics series; `--queue-reap-interval` after the
//! worker retired (KumoMTA's `reap_interval`, default 10 minutes) those go too, the counters
//! folded into an aggregate so totals stay right (see `metrics`). A suspended queue is never
//! reaped: its suspension and series stay for as long as it is suspended.
//!
//! Idle queues reach their deadline in the order they retired (one interval for all), so
//! a `VecDeque` ordered by deadline is the whole schedule: the supervisor sleeps until the
//! front one, never runs a timer per queue, and reaping costs O(reaped).
//!
//! Freed Lua states do not shrink the process by themselves: the allocator keeps freed
//! memory. [`Trim`] asks it to hand it back (`crate::memory`), at most once
//! per [`TRIM_DEBOUNCE`] and only after a connection was closed, so a burst of thousands of
//! closes costs one trim and an idle relay none. Each trim also lets go the policy's warm
//! Lua states (kept to serve a burst's next connections without building new ones).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use policy::Policy;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Quiet time after the last closed connection before memory is trimmed (the Lua threads
/// need a moment to drop their states).
pub const TRIM_DEBOUNCE: Duration = Duration::from_secs(1);

/// Queues whose worker retired, by reap deadline.
#[derive(Default)]
pub struct IdleQueues {
    order: VecDeque<(Instant, String)>,
    /// Queue → its current deadline; an entry in `order` whose deadline differs is stale
    /// (the queue became busy and idle again since).
    deadline: HashMap<String, Instant>,
}

impl IdleQueues {
    /// `queue` went idle; it is reaped at `at` unless it gets busy first.
    pub fn push(&mut self, queue: String, at: Instant) {
        // Deadlines are "now + one interval for everyone", so pushes keep `order` sorted.
        self.deadline.insert(queue.clone(), at);
        self.order.push_back((at, queue));
    }

    /// `queue` got a worker again: it is not idle any more.
    pub fn remove(&mut self, queue: &str) {
        self.deadline.remove(queue);
    }

    /// When the next reap is due, if any queue is idle.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.drop_stale();
        self.order.front().map(|(at, _)| *at)
    }

    /// Takes the queues whose deadline is at or before `now`.
    pub fn due(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        loop {
            self.drop_stale();
            match self.order.front() {
                Some((at, _)) if *at <= now => {
                    let (_, queue) = self.order.pop_front().expect("front exists");
                    self.deadline.remove(&queue);
                    due.push(queue);
                }
                _ => {
                    crate::queue_series::shrink_if_sparse(&mut self.deadline);
                    if self.order.capacity() > 64 && self.order.len() < self.order.capacity() / 4 {
                        self.order.shrink_to(self.order.len() * 2);
                    }
                    return due;
                }
            }
        }
    }

    /// How many queues are idle and not yet reaped.
    pub fn len(&self) -> usize {
        self.deadline.len()
    }

    /// Whether no queue waits to be reaped.
    pub fn is_empty(&self) -> bool {
        self.deadline.is_empty()
    }

    fn drop_stale(&mut self) {
        while let Some((at, queue)) = self.order.front() {
            if self.deadline.get(queue) == Some(at) {
                return;
            }
            self.order.pop_front();
        }
    }
}

/// Asks for a `malloc_trim` after connections were closed. Cheap to clone.
#[derive(Clone)]
pub struct Trim {
    freed: Arc<Notify>,
    /// Its warm Lua states (kept for the next connection) go at each trim.
    policy: Policy,
}

impl Trim {
    /// Trims for `policy`'s connections.
    pub fn new(policy: Policy) -> Trim {
        Trim {
            freed: Arc::default(),
            policy,
        }
    }

    /// A connection (and so a Lua state) was closed.
    pub fn freed(&self) {
        self.freed.notify_one();
    }

    /// Trims once per quiet [`TRIM_DEBOUNCE`] after frees, until the task is aborted.
    pub async fn run(self) {
        loop {
            self.freed.notified().await;
            // Frees during the pause leave one permit: they are covered by the next trim.
            tokio::time::sleep(TRIM_DEBOUNCE).await;
            // Warm states are for bursts; a quiet second means the burst is over. Their
            // threads free them a moment later: trim again after the next pause.
            if self.policy.drop_warm_states() > 0 {
                self.freed();
            }
            let _ = tokio::task::spawn_blocking(crate::memory::release_free_memory).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_queues_come_due_in_order_and_a_busy_one_is_skipped() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut idle = IdleQueues::default();
        idle.push("a".into(), t0 + s);
        idle.push("b".into(), t0 + 2 * s);
        idle.push("c".into(), t0 + 3 * s);
        idle.remove("a"); // got busy again
        idle.push("b".into(), t0 + 4 * s); // busy and idle again: the later deadline counts
        assert_eq!(idle.next_deadline(), Some(t0 + 3 * s));
        assert_eq!(idle.due(t0 + 3 * s), ["c"]);
        assert_eq!(idle.len(), 1);
        assert!(idle.due(t0 + 3 * s).is_empty());
        assert_eq!(idle.due(t0 + 10 * s), ["b"]);
        assert_eq!(idle.next_deadline(), None);
    }
}
