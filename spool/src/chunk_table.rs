//! The chunks in memory: where each chunked message lives and which are settled.
//!
//! A message enqueued with others of its queue is stored in a chunk (`chunk.rs`); every
//! other message is a single v1 record. Once a chunked message is delivered, moved out
//! (a retry, a dead letter, a rebind, an expedite) or quarantined, its bit is set in the
//! chunk's settle bitmap, and the chunk is deleted when every bit is set.
//!
//! Only the commit thread writes bitmaps ([`ChunkTable::settle_writes`]), so a bitmap on
//! disk only ever gains bits:
//! - an ack sets its bit here at once and marks the chunk dirty; the commit thread writes
//!   dirty bitmaps with its next group, or after a short tick when no group comes. Acks are
//!   not fsynced one by one (as in v1): a lost bitmap write redelivers, never loses;
//! - a move sets its bit in the same sled batch as the message's new copy (the job's
//!   [`Op::Settle`](crate::commit::Op)), and here only once that batch is durable, so no
//!   bitmap write can claim a move that a crash could still undo.

use std::collections::{BTreeMap, HashMap};

use rustc_hash::FxHashSet;

use crate::chunk::SettleBitmap;
use crate::commit::{Op, TreeId};
use crate::keys::{self, ChunkPart};

/// Where a chunked message is: its chunk's first id and its index in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Home {
    /// The chunk's first id (its key).
    pub first_id: u64,
    /// The message's position in the chunk.
    pub index: u16,
}

/// Every live chunk of every queue, with its settle bitmap.
#[derive(Debug, Default)]
pub struct ChunkTable {
    queues: HashMap<String, BTreeMap<u64, SettleBitmap>>,
    /// Chunks whose bitmap gained bits (acks) that are not written yet, by queue (so an
    /// ack of a chunk already dirty allocates nothing).
    dirty: HashMap<String, FxHashSet<u64>>,
}

/// The bitmap writes of one group, and the chunks they delete.
#[derive(Debug, Default)]
pub struct SettleWrites {
    /// The bitmap puts and chunk deletes (messages tree), and the deletes of acked single
    /// records (`acked_singles.rs`, which may touch the meta tree too).
    pub(crate) ops: Vec<Op>,
    /// Chunks whose every record is settled: their three keys are deleted by `ops`, and
    /// their state goes once that is written ([`ChunkTable::forget`]).
    pub(crate) deleted: Vec<(String, u64)>,
}

impl ChunkTable {
    /// Adds a chunk of `queue` with what is already settled of it.
    pub fn add(&mut self, queue: &str, first_id: u64, settled: SettleBitmap) {
        let chunks = match self.queues.get_mut(queue) {
            Some(chunks) => chunks,
            None => self.queues.entry(queue.to_owned()).or_default(),
        };
        chunks.insert(first_id, settled);
    }

    /// Where `id` of `queue` lives if it is an unsettled chunked message; `None` for a
    /// single record (or an unknown id).
    pub fn home(&self, queue: &str, id: u64) -> Option<Home> {
        let (&first_id, bits) = self.queues.get(queue)?.range(..=id).next_back()?;
        let index = usize::try_from(id - first_id).ok()?;
        if index >= usize::from(bits.len()) || bits.test(index) {
            return None;
        }
        Some(Home {
            first_id,
            index: index as u16,
        })
    }

    /// Where each unsettled message of a chunk lives, in id order; empty for an unknown chunk.
    pub fn unsettled(&self, queue: &str, first_id: u64) -> Vec<Home> {
        let Some(bits) = self.queues.get(queue).and_then(|c| c.get(&first_id)) else {
            return Vec::new();
        };
        (0..bits.len())
            .filter(|&index| !bits.test(usize::from(index)))
            .map(|index| Home { first_id, index })
            .collect()
    }

    /// A delivered message: sets its bit now; the commit thread writes the bitmap later.
    /// Returns whether the chunk was the first to turn dirty (the commit thread must be
    /// told there is something to write).
    pub fn settle_delivered(&mut self, queue: &str, home: Home) -> bool {
        let Some(bits) = self.bits_mut(queue, home.first_id) else {
            return false;
        };
        bits.set(usize::from(home.index));
        let first_dirty = self.dirty.is_empty();
        match self.dirty.get_mut(queue) {
            Some(chunks) => chunks.insert(home.first_id),
            None => self
                .dirty
                .entry(queue.to_owned())
                .or_default()
                .insert(home.first_id),
        };
        first_dirty
    }

    /// A move whose bitmap write is durable: sets its bit here too.
    pub fn settle_moved(&mut self, queue: &str, home: Home) {
        if let Some(bits) = self.bits_mut(queue, home.first_id) {
            bits.set(usize::from(home.index));
        }
    }

    /// The writes that put every dirty bitmap on disk, plus `moves` (the bits a group's
    /// jobs settle, set in the written bitmaps but not here until the group is durable).
    /// A chunk with every bit set is deleted instead. Clears the dirty set.
    pub(crate) fn settle_writes(&mut self, moves: &[(&str, Home)]) -> SettleWrites {
        let mut pending: BTreeMap<(&str, u64), SettleBitmap> = BTreeMap::new();
        let dirty = std::mem::take(&mut self.dirty);
        let touched = dirty
            .iter()
            .flat_map(|(q, firsts)| firsts.iter().map(move |first| (q.as_str(), *first)))
            .chain(moves.iter().map(|(q, home)| (*q, home.first_id)));
        for (queue, first_id) in touched {
            if let Some(bits) = self.queues.get(queue).and_then(|c| c.get(&first_id)) {
                pending
                    .entry((queue, first_id))
                    .or_insert_with(|| bits.clone());
            }
        }
        for (queue, home) in moves {
            if let Some(bits) = pending.get_mut(&(*queue, home.first_id)) {
                bits.set(usize::from(home.index));
            }
        }
        let mut writes = SettleWrites::default();
        for ((queue, first_id), bits) in pending {
            let key = |part| keys::chunk_key(part, queue, first_id);
            if bits.all_settled() {
                for part in [ChunkPart::Chunk, ChunkPart::Head, ChunkPart::Settled] {
                    writes.ops.push(Op::Del(TreeId::Messages, key(part)));
                }
                writes.deleted.push((queue.to_owned(), first_id));
            } else {
                let value = bits.encode();
                writes
                    .ops
                    .push(Op::Put(TreeId::Messages, key(ChunkPart::Settled), value));
            }
        }
        writes
    }

    /// Drops a chunk whose keys were deleted.
    pub fn forget(&mut self, queue: &str, first_id: u64) {
        if let Some(chunks) = self.queues.get_mut(queue) {
            chunks.remove(&first_id);
            if chunks.is_empty() {
                self.queues.remove(queue);
                crate::index::shrink_if_sparse(&mut self.queues);
            }
        }
    }

    /// Whether acks left bitmaps to write.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Whether no chunk is live.
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    fn bits_mut(&mut self, queue: &str, first_id: u64) -> Option<&mut SettleBitmap> {
        self.queues.get_mut(queue)?.get_mut(&first_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home(first_id: u64, index: u16) -> Home {
        Home { first_id, index }
    }

    #[test]
    fn home_finds_unsettled_chunked_messages_only() {
        let mut table = ChunkTable::default();
        table.add("q", 10, SettleBitmap::new(3));
        assert_eq!(table.home("q", 11), Some(home(10, 1)));
        assert_eq!(table.home("q", 13), None, "past the chunk: a single");
        assert_eq!(table.home("q", 9), None);
        assert_eq!(table.home("other", 11), None);
        table.settle_moved("q", home(10, 1));
        assert_eq!(
            table.home("q", 11),
            None,
            "moved out: its single copy is the one"
        );
    }

    #[test]
    fn acks_are_written_once_and_a_full_chunk_is_deleted() {
        let mut table = ChunkTable::default();
        table.add("q", 0, SettleBitmap::new(2));
        assert!(table.settle_delivered("q", home(0, 0)));
        assert!(!table.settle_delivered("q", home(0, 0)), "already dirty");
        let writes = table.settle_writes(&[]);
        assert_eq!(writes.ops.len(), 1, "one bitmap put");
        assert!(writes.deleted.is_empty());
        assert!(
            table.settle_writes(&[]).ops.is_empty(),
            "nothing dirty any more"
        );
        // A move settles the last record: the group deletes the chunk's three keys.
        let writes = table.settle_writes(&[("q", home(0, 1))]);
        assert_eq!(writes.ops.len(), 3);
        assert_eq!(writes.deleted, [("q".to_owned(), 0)]);
        assert_eq!(
            table.home("q", 1),
            Some(home(0, 1)),
            "not settled until durable"
        );
        table.settle_moved("q", home(0, 1));
        table.forget("q", 0);
        assert!(table.is_empty());
    }
}
