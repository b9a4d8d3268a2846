//! A run: waiting messages of one queue with consecutive ids, one due time, one creation
//! time and one attempt count, held as one schedule entry.
//!
//! What one enqueue call brings to a queue gets consecutive ids, the same creation time and
//! the same due time, and recovery schedules a chunk's messages in id order, so most of a
//! backlog falls into runs. One entry per run instead of one per message is what keeps a
//! million queued messages to a few megabytes of schedule (docs/performance.md, P4): a run
//! keeps its figures once and each message's size in four bytes.

use std::collections::VecDeque;

use super::Slot;

/// The most messages one run holds. Cutting a message out of the middle of a run (an
/// operator taking one message, a purge) copies the shorter side of it, so this bounds that
/// copy; at 4096 a run's own cost stays well under 1 % of its sizes' four bytes each.
pub(super) const MAX_RUN: usize = 4096;

/// A run of waiting messages. Its key in the schedule, (due time, first id), gives the due
/// time and the first id; message `i` of the run has id `first + i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Run {
    created_ms: u64,
    attempts: u32,
    /// The size of each message, in id order.
    bytes: VecDeque<u32>,
}

impl Run {
    /// A run of one message.
    pub(super) fn of(slot: Slot) -> Run {
        Run {
            created_ms: slot.created_ms,
            attempts: slot.attempts,
            bytes: VecDeque::from([slot.bytes]),
        }
    }

    /// How many messages it holds (never zero: an emptied run leaves the schedule).
    pub(super) fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Whether `id` is one of its messages, the run starting at `first`.
    pub(super) fn holds(&self, first: u64, id: u64) -> bool {
        id >= first && id - first < self.len()
    }

    /// Whether a message with `slot` may join the run (at either end, if its id fits).
    pub(super) fn admits(&self, slot: &Slot) -> bool {
        self.created_ms == slot.created_ms
            && self.attempts == slot.attempts
            && self.bytes.len() < MAX_RUN
    }

    /// The figures of message `at` of the run.
    pub(super) fn slot(&self, at: usize) -> Slot {
        Slot {
            created_ms: self.created_ms,
            bytes: self.bytes[at],
            attempts: self.attempts,
        }
    }

    /// The sum of its messages' sizes.
    pub(super) fn total_bytes(&self) -> u64 {
        self.bytes.iter().map(|&b| u64::from(b)).sum()
    }

    /// Adds a message after the last one.
    pub(super) fn push_back(&mut self, bytes: u32) {
        self.bytes.push_back(bytes);
    }

    /// Adds a message before the first one.
    pub(super) fn push_front(&mut self, bytes: u32) {
        self.bytes.push_front(bytes);
    }

    /// How many of its first messages fit in `max` messages and `bytes` bytes, and the sum
    /// of their sizes.
    pub(super) fn front_within(&self, max: usize, bytes: u64) -> (usize, u64) {
        let mut sum = 0u64;
        let n = self
            .bytes
            .iter()
            .take(max)
            .take_while(|&&b| match sum.checked_add(u64::from(b)) {
                Some(next) if next <= bytes => {
                    sum = next;
                    true
                }
                _ => false,
            })
            .count();
        (n, sum)
    }

    /// Takes the first `n` messages' figures out (fewer if it holds fewer).
    pub(super) fn take_front(&mut self, n: usize) -> Vec<Slot> {
        let n = n.min(self.bytes.len());
        let slots = (0..n).map(|at| self.slot(at)).collect();
        self.bytes.drain(..n);
        slots
    }

    /// Cuts message `at` out: returns its figures and the runs of the messages before and
    /// after it (either may be empty). Only the shorter side is copied, so an operator
    /// taking a queue's messages in id order costs O(1) per message, not O(run length).
    pub(super) fn cut(self, at: usize) -> (Slot, Run, Run) {
        let slot = self.slot(at);
        let Run {
            created_ms,
            attempts,
            mut bytes,
        } = self;
        let (before, after) = if at < bytes.len() / 2 {
            let before: VecDeque<u32> = bytes.drain(..at).collect();
            bytes.pop_front();
            (before, bytes)
        } else {
            let mut after = bytes.split_off(at);
            after.pop_front();
            (bytes, after)
        };
        let run = |bytes| Run {
            created_ms,
            attempts,
            bytes,
        };
        (slot, run(before), run(after))
    }

    /// Whether it holds no message.
    pub(super) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Gives back spare capacity (after recovery built the schedule).
    pub(super) fn shrink(&mut self) {
        self.bytes.shrink_to_fit();
    }
}
