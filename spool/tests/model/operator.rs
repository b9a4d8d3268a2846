//! The operator steps: rebind, expedite, purge, dead-letter requeue and import, each
//! checked against what docs/operations.md promises (waiting messages only: a leased one
//! belongs to the dispatcher until it is settled).

use spool::{Message, MessageId, Spool};

use super::harness::Harness;
use super::state::Expected;
use super::{Import, QUEUES};
use crate::common::msg;

impl Harness {
    /// Runs an async operator call on the current spool.
    pub fn block_on<T, F: std::future::Future<Output = spool::Result<T>>>(
        &self,
        call: impl FnOnce(Spool) -> F,
    ) -> T {
        self.rt.block_on(call(self.spool().clone())).unwrap()
    }

    /// Rebind moves the waiting messages, attempts, due time and error kept; leased ones
    /// stay where they are, in flight.
    pub fn rebind(&mut self, from: &str, to: &str) {
        let waiting = self.model.waiting(from, &self.leased_ids());
        let (f, t) = (from.to_owned(), to.to_owned());
        let moved = self.block_on(|s| async move { s.rebind(&f, &t).await });
        assert_eq!(moved, waiting.len() as u64, "rebind {from} -> {to} count");
        for id in waiting {
            self.model.queued.get_mut(&id).unwrap().queue = to.into();
            self.touched.insert(to.into());
        }
    }

    /// Expedite makes the waiting messages due now (by the spool's clock), nothing else.
    pub fn expedite(&mut self, queue: &str) {
        let waiting = self.model.waiting(queue, &self.leased_ids());
        let before = spool::now_ms();
        let q = queue.to_owned();
        let n = self.block_on(|s| async move { s.expedite(&q).await });
        let after = spool::now_ms();
        assert_eq!(n, waiting.len() as u64, "expedite {queue} count");
        for id in waiting {
            let due = self.stamp(id, before, after);
            self.model.queued.get_mut(&id).unwrap().due = due;
            self.touched.insert(queue.into());
        }
    }

    /// Purge deletes the waiting messages; leased ones stay in flight.
    pub fn purge(&mut self, queue: &str) {
        let waiting = self.model.waiting(queue, &self.leased_ids());
        let q = queue.to_owned();
        let n = self.block_on(|s| async move { s.purge(&q).await });
        assert_eq!(n, waiting.len() as u64, "purge {queue} count");
        for id in waiting {
            self.model.queued.remove(&id);
        }
    }

    /// Dead-letter requeue: back to their own queue, due now, attempts reset, the reason
    /// kept as last error. `id` picks one dead letter (or, with none, an unknown id).
    pub fn requeue_dead(&mut self, queue: Option<usize>, id: Option<usize>) {
        let queue = queue.map(|q| QUEUES[q]);
        let dead: Vec<u64> = self.model.dead.keys().copied().collect();
        let id = id.map(|p| p.checked_rem(dead.len()).map_or(u64::MAX >> 2, |n| dead[n]));
        let selected: Vec<u64> = self
            .model
            .dead
            .iter()
            .filter(|(i, e)| queue.is_none_or(|q| e.queue == q) && id.is_none_or(|id| **i == id))
            .map(|(i, _)| *i)
            .collect();
        let before = spool::now_ms();
        let (q, id) = (queue.map(str::to_owned), id.map(MessageId));
        let n = self.block_on(|s| async move { s.requeue_dead_letters(q.as_deref(), id).await });
        let after = spool::now_ms();
        assert_eq!(n, selected.len() as u64, "dead-letter requeue count");
        for id in selected {
            let mut e = self.model.dead.remove(&id).unwrap();
            e.attempts = 0;
            e.due = self.stamp(id, before, after);
            self.touched.insert(e.queue.clone());
            self.model.queued.insert(id, e);
        }
    }

    /// Import keeps ids, attempts, times and errors as given, queued or dead-lettered;
    /// ids already present (queued or dead) are skipped. New ids continue above the
    /// imported ones. With `again`, one message already present (queued or dead) is
    /// offered once more: it must be skipped and stay as it is.
    pub fn import(&mut self, import: Import) {
        let first = self.model.max_id.map_or(1, |max| max + 1) + import.gap;
        let queue = QUEUES[import.queue];
        let new: Vec<Message> = import
            .payloads
            .iter()
            .enumerate()
            .map(|(n, payload)| Message {
                id: MessageId(first + n as u64),
                queue: queue.into(),
                created_ms: 1_000 + n as u64,
                attempts: import.attempts,
                due_ms: self.model.now + import.delay,
                last_error: Some(format!("imported {n}")),
                meta: msg(queue, b"").meta,
                payload: payload.clone(),
            })
            .collect();
        let total = self.model.queued.len() + self.model.dead.len();
        let mut present = self.model.queued.iter().chain(&self.model.dead);
        let again = import
            .again
            .and_then(|pick| present.nth(pick.checked_rem(total)?))
            .map(|(id, e)| to_message(*id, e));
        let (mut queued, mut dead) = (Vec::new(), Vec::new());
        match import.dead {
            true => dead.extend(new.iter().cloned()),
            false => queued.extend(new.iter().cloned()),
        }
        queued.extend(again.iter().cloned());
        let n = self.block_on(|s| async move { s.import(queued, dead).await });
        let want = (new.len() as u64, again.iter().count() as u64);
        assert_eq!(n, want, "import (imported, skipped)");
        let ids: Vec<u64> = new.iter().map(|m| m.id.0).collect();
        self.model.note_new_ids(&ids);
        for m in &new {
            let (id, e) = Expected::of(m);
            match import.dead {
                true => self.model.dead.insert(id, e),
                false => self.model.queued.insert(id, e),
            };
        }
        if !import.dead {
            self.touched.insert(queue.into());
        }
    }
}

/// The message the model expects under `id`, with the metadata every test message has.
fn to_message(id: u64, e: &Expected) -> Message {
    Message {
        id: MessageId(id),
        queue: e.queue.clone(),
        created_ms: e.created,
        attempts: e.attempts,
        due_ms: e.due,
        last_error: e.last_error.clone(),
        meta: msg(&e.queue, b"").meta,
        payload: e.payload.clone(),
    }
}
