//! Delivered single records whose deletes wait for the commit thread.
//!
//! An ack of a chunked message sets a bit in memory and leaves the bitmap write to the
//! commit thread (`chunk_table.rs`); an ack of a single (v1) record does the same with its
//! delete. The reason is isolation, not speed: the dispatcher acks from async code, and a
//! sled write on its thread can block it on the disk (sled may rewrite the leaf as a blob
//! file, which it fsyncs, or wait for log space behind a stalled flush). A runtime thread
//! held by the disk stalls every queue (contract 7); the commit thread is the one thread
//! that is allowed to wait for the disk.
//!
//! The delete is not fsynced on its own, as before: it rides with the next group commit,
//! or is written alone after the commit thread's short settle tick. A crash before then
//! delivers the message again, never loses one. Until it is written, the record is still
//! in sled but no longer in the index, so listings skip it ([`AckedSingles::contains`]).

use rustc_hash::FxHashSet;

use crate::commit::{Op, TreeId};
use crate::keys;
use crate::record::MessageId;

/// The single records acked since the commit thread last wrote acks.
#[derive(Debug, Default)]
pub struct AckedSingles {
    /// Their keys in the messages tree.
    records: FxHashSet<Vec<u8>>,
    /// The large-record markers of those that have one (meta tree).
    markers: Vec<Vec<u8>>,
}

impl AckedSingles {
    /// A delivered single record of `queue`; `large` if it has a large-record marker.
    pub fn push(&mut self, queue: &str, id: u64, large: bool) {
        self.records.insert(keys::message_key(queue, MessageId(id)));
        if large {
            self.markers.push(keys::large_marker(id));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Whether the record under `key` (messages tree) was delivered and waits to be deleted.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.records.contains(key)
    }

    /// The deletes, markers first: where they are written as two batches (the settle tick),
    /// sled's log keeps that order, and a crash in between leaves a record without its
    /// marker, never a marker without its record (which the next open would report as a
    /// lost large message). Empties the set.
    pub(crate) fn take_ops(&mut self) -> impl Iterator<Item = Op> {
        let markers = std::mem::take(&mut self.markers);
        let records = std::mem::take(&mut self.records);
        markers
            .into_iter()
            .map(|key| Op::Del(TreeId::Meta, key))
            .chain(
                records
                    .into_iter()
                    .map(|key| Op::Del(TreeId::Messages, key)),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletes_come_out_markers_first_and_once() {
        let mut acked = AckedSingles::default();
        acked.push("q", 7, true);
        acked.push("q", 8, false);
        let key = keys::message_key("q", MessageId(7));
        assert!(acked.contains(&key));
        let ops: Vec<Op> = acked.take_ops().collect();
        assert_eq!(ops.len(), 3);
        assert!(matches!(&ops[0], Op::Del(TreeId::Meta, k) if *k == keys::large_marker(7)));
        assert!(ops[1..]
            .iter()
            .all(|op| matches!(op, Op::Del(TreeId::Messages, _))));
        assert!(acked.is_empty() && !acked.contains(&key));
        assert_eq!(acked.take_ops().count(), 0);
    }
}
