//! How many new workers start at once: no more than there are connections to hand out.
//!
//! A burst over N new queues used to start N workers at once. All but
//! `--max-broker-connections` of them then waited in the budget's line, each a task holding
//! its pool, rate limits and metrics series: ~12 KiB a queue, 1.2 GB at the peak of a burst
//! over 100 000 queues (docs/performance.md, P7). That memory was spread over pages that glibc
//! could not give back after the reap, because a few long-lived blocks stayed on each.
//!
//! Now a worker needs a start slot for its first fill (config, first connect, first lease).
//! There are [`SLOTS_PER_CONNECTION`] slots per connection in the budget. A new queue that
//! finds none waits as a name in [`Admission`]'s line (first come, first served) and costs
//! nothing else until a slot frees up.
//!
//! A slot is held only for the first fill, whatever it ends in: a connection, a queue that is
//! suspended or not due yet, a failure that backs off. So a queue waits in this line only
//! while other new queues are in their first connect, the same wait it had before in the
//! budget's fair line. A constructor that hangs holds a slot for at most the connect timeout,
//! as it holds a connection permit.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Start slots per connection of `--max-broker-connections`. A first fill also waits for
/// the queue's config from the policy's shared Lua state, so with one slot per connection
/// the connections sat idle while new workers queued for their configs: 100 000 new queues
/// drained in 44–48 s instead of 31–32 s. Four slots drained in 33 s (16: 34 s), with the
/// peak RSS still a quarter lower than with no line at all (docs/performance.md, P7).
pub const SLOTS_PER_CONNECTION: usize = 4;

/// Held by a worker for its first fill.
pub type StartSlot = OwnedSemaphorePermit;

/// Start slots, and the queues waiting for one.
pub struct Admission {
    slots: Arc<Semaphore>,
    line: VecDeque<String>,
}

impl Admission {
    /// `slots` workers may be in their first fill at once (at least one).
    pub fn new(slots: usize) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(slots.max(1))),
            line: VecDeque::new(),
        }
    }

    /// A slot for a new worker now, or `None`: then [`wait`](Self::wait) for one.
    pub fn try_start(&self) -> Option<StartSlot> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Puts `queue` at the back of the line (the caller keeps it there only once).
    pub fn wait(&mut self, queue: String) {
        self.line.push_back(queue);
    }

    /// Whether a queue waits for a slot.
    pub fn has_waiting(&self) -> bool {
        !self.line.is_empty()
    }

    /// How many queues wait for a slot.
    pub fn waiting(&self) -> usize {
        self.line.len()
    }

    /// Resolves when a slot is free and a queue waits: every queue that can start now, first
    /// in line first, each with its slot (one wake of the supervisor starts them all).
    /// Cancel-safe: dropped before it resolves, it takes nothing out of the line.
    pub async fn ready(&mut self) -> Vec<(String, StartSlot)> {
        if self.line.is_empty() {
            std::future::pending::<()>().await;
        }
        let first = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the start slots' semaphore is never closed");
        let mut ready = vec![(self.pop(), first)];
        while !self.line.is_empty() {
            let Some(slot) = self.try_start() else { break };
            ready.push((self.pop(), slot));
        }
        ready
    }

    /// The queue first in line (there is one); the line's memory goes back as it empties.
    fn pop(&mut self) -> String {
        let queue = self
            .line
            .pop_front()
            .expect("checked by the caller; only we pop");
        if self.line.capacity() > 64 && self.line.len() < self.line.capacity() / 4 {
            self.line.shrink_to(self.line.len() * 2);
        }
        queue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn queues_wait_in_order_until_a_slot_frees() {
        let mut admission = Admission::new(1);
        let first = admission.try_start().expect("one slot is free");
        assert!(admission.try_start().is_none(), "the only slot is taken");
        admission.wait("b".into());
        admission.wait("c".into());
        let nothing_yet = tokio::time::timeout(Duration::from_millis(50), admission.ready()).await;
        assert!(nothing_yet.is_err(), "no slot is free: nobody starts");
        assert!(admission.has_waiting(), "a cancelled wait keeps the line");
        drop(first);
        let mut ready = admission.ready().await;
        assert_eq!(ready.len(), 1, "one slot: one start");
        let (queue, slot) = ready.remove(0);
        assert_eq!(queue, "b");
        drop(slot);
        let ready = admission.ready().await;
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].0, "c");
        assert!(!admission.has_waiting());
    }

    #[tokio::test]
    async fn one_wake_starts_every_queue_a_slot_is_free_for() {
        let mut admission = Admission::new(2);
        for queue in ["a", "b", "c"] {
            admission.wait(queue.into());
        }
        let ready = admission.ready().await;
        let started: Vec<&str> = ready.iter().map(|(q, _)| q.as_str()).collect();
        assert_eq!(started, ["a", "b"], "two slots, first in line first");
        assert_eq!(admission.waiting(), 1);
    }
}
