//! The model: what the spool must hold, as plain maps, and what each public query must
//! answer for it. Nothing here touches a spool, so every expectation reads on its own.

use std::collections::{BTreeMap, BTreeSet};

use spool::{Message, QueueStats};

/// One message as the spool promises to keep it.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub queue: String,
    pub payload: Vec<u8>,
    pub created: u64,
    pub attempts: u32,
    pub due: u64,
    pub last_error: Option<String>,
}

impl Expected {
    /// The model's view of a message the spool returned (its metadata is checked apart).
    pub fn of(m: &Message) -> (u64, Expected) {
        let e = Expected {
            queue: m.queue.clone(),
            payload: m.payload.clone(),
            created: m.created_ms,
            attempts: m.attempts,
            due: m.due_ms,
            last_error: m.last_error.clone(),
        };
        (m.id.0, e)
    }
}

/// What the spool should hold. `now` is a logical clock far above the real one: every
/// message stamped with the real clock (enqueue, expedite, dead-letter requeue) is due at
/// once, and the due times of retries are under the test's control.
#[derive(Default)]
pub struct Model {
    pub queued: BTreeMap<u64, Expected>,
    pub dead: BTreeMap<u64, Expected>,
    /// Highest id the spool ever handed out: later ids must be above it, reopen or not.
    pub max_id: Option<u64>,
    pub now: u64,
}

impl Model {
    /// Ids of the messages of `queue`, in id order.
    pub fn in_queue<'a>(&'a self, queue: &'a str) -> impl Iterator<Item = (u64, &'a Expected)> {
        self.queued
            .iter()
            .filter(move |(_, e)| e.queue == queue)
            .map(|(id, e)| (*id, e))
    }

    /// Ids of the messages of `queue` not in `leased` (what operator rewrites touch).
    pub fn waiting(&self, queue: &str, leased: &BTreeSet<u64>) -> Vec<u64> {
        self.in_queue(queue)
            .filter(|(id, _)| !leased.contains(id))
            .map(|(id, _)| id)
            .collect()
    }

    /// What a lease must return: waiting messages due now in (due, id) order, at most `max`.
    pub fn due_order(&self, queue: &str, leased: &BTreeSet<u64>, max: usize) -> Vec<u64> {
        let mut due: Vec<(u64, u64)> = self
            .in_queue(queue)
            .filter(|(id, e)| !leased.contains(id) && e.due <= self.now)
            .map(|(id, e)| (e.due, id))
            .collect();
        due.sort();
        due.into_iter().take(max).map(|(_, id)| id).collect()
    }

    /// The figures `Spool::stats(now)` must give for `queue` (all zero when it is empty).
    pub fn queue_stats(&self, queue: &str, leased: &BTreeSet<u64>) -> QueueStats {
        let mut s = QueueStats::default();
        for (id, e) in self.in_queue(queue) {
            s.count += 1;
            s.bytes += e.payload.len() as u64;
            *s.attempts.entry(e.attempts).or_default() += 1;
            s.oldest_created_ms = Some(s.oldest_created_ms.map_or(e.created, |t| t.min(e.created)));
            if leased.contains(&id) {
                s.leased += 1;
                continue;
            }
            s.due_now += u64::from(e.due <= self.now);
            s.next_due_ms = Some(s.next_due_ms.map_or(e.due, |t| t.min(e.due)));
        }
        s
    }

    /// Records `ids` as just handed out, checking they rise above every earlier id.
    pub fn note_new_ids(&mut self, ids: &[u64]) {
        for &id in ids {
            assert!(
                self.max_id.is_none_or(|max| id > max),
                "id {id} handed out again or out of order (highest so far {:?})",
                self.max_id
            );
            self.max_id = Some(id);
        }
    }
}
