//! The in-memory schedule: which message of which queue is due when.
//!
//! It holds ids, due times and sizes, never payloads. Waiting messages are kept in runs of
//! consecutive ids that share a due time (`index/run.rs`): one entry per run and four bytes
//! per message, so a million queued messages cost a few megabytes and a thousand entries
//! (P4 in docs/performance.md). It is rebuilt from disk on open and is only ever changed
//! after the change it mirrors is durable (see `commit.rs`), so the dispatcher can never
//! lease a message that a crash could take back.

#[cfg(test)]
mod model_tests;
mod run;

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};

use rustc_hash::FxHashMap;

use crate::acked_singles::AckedSingles;
use crate::chunk_table::{ChunkTable, Home, SettleWrites};
use run::Run;

/// What the index keeps per message besides its id and due time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// When the message was first enqueued (ms since the epoch), for the oldest-message figure.
    pub created_ms: u64,
    /// Its size as recorded at enqueue, summed for the capacity gate without reading sled.
    pub bytes: u32,
    /// Failed delivery attempts so far, for the per-queue attempts histogram.
    pub attempts: u32,
}

/// One message just leased: its id, the due time it had, its slot, and where it lives
/// (`None`: a single record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// The message's id.
    pub id: u64,
    /// The due time it was scheduled at (a release puts it back there).
    pub due_ms: u64,
    /// Its figures.
    pub slot: Slot,
    /// Its chunk and place in it, if it is chunked.
    pub home: Option<Home>,
}

#[derive(Debug, Default)]
struct QueueIndex {
    /// Waiting messages in runs (`run.rs`), keyed by (due time, first id). The runs of one
    /// due time never overlap, so the key order is the (due time, id) order of every message
    /// in them: first attempts come out FIFO.
    scheduled: BTreeMap<(u64, u64), Run>,
    /// Messages handed to the dispatcher and not yet settled, with their due time. One entry
    /// per message, but only for what is in flight. Keyed by id, which the spool assigns, so
    /// a fast hash (FxHash) is safe here; maps keyed by queue names keep std's SipHash.
    leased: FxHashMap<u64, (u64, Slot)>,
}

impl QueueIndex {
    /// The key of the run that holds `id` waiting at `due`.
    fn run_holding(&self, due: u64, id: u64) -> Option<(u64, u64)> {
        let (&key, run) = self.scheduled.range(..=(due, id)).next_back()?;
        (key.0 == due && run.holds(key.1, id)).then_some(key)
    }

    /// The key of the run that holds `id` waiting at any due time (a walk over every run:
    /// for operators, not for the hot path).
    fn run_holding_any(&self, id: u64) -> Option<(u64, u64)> {
        self.scheduled
            .iter()
            .find(|((_, first), run)| run.holds(*first, id))
            .map(|(key, _)| *key)
    }

    /// Takes `id` out of the run at `key`, which holds it; the messages before and after it
    /// stay as runs of their own.
    fn cut(&mut self, key: (u64, u64), id: u64) -> Slot {
        let Some(run) = self.scheduled.remove(&key) else {
            unreachable!("cut is only called with the key of a run that holds the id");
        };
        let (slot, before, after) = run.cut((id - key.1) as usize);
        if !after.is_empty() {
            self.scheduled.insert((key.0, id + 1), after);
        }
        if !before.is_empty() {
            self.scheduled.insert(key, before);
        }
        slot
    }

    /// Schedules `id` at `due`: it joins the run it continues (or starts), or starts one.
    /// Returns the figures of the same id already waiting at `due`, which it replaces.
    fn schedule(&mut self, due: u64, id: u64, slot: Slot) -> Option<Slot> {
        // The common case first, in one lookup: ingest and recovery schedule in id order,
        // so the id continues the run before it (and no run holds it yet).
        if self.append(due, id, slot) {
            return None;
        }
        let replaced = self.run_holding(due, id).map(|key| self.cut(key, id));
        if !self.append(due, id, slot) && !self.prepend(due, id, slot) {
            self.scheduled.insert((due, id), Run::of(slot));
        }
        replaced
    }

    /// Adds `id` at the end of the run before it, if it continues that run. The range takes
    /// in a run that starts at `id` itself, which holds it: then nothing is appended.
    fn append(&mut self, due: u64, id: u64, slot: Slot) -> bool {
        match self.scheduled.range_mut(..=(due, id)).next_back() {
            Some((&(run_due, first), run))
                if run_due == due && first + run.len() == id && run.admits(&slot) =>
            {
                run.push_back(slot.bytes);
                true
            }
            _ => false,
        }
    }

    /// Adds `id` at the front of the run after it, if that run starts at `id + 1`.
    fn prepend(&mut self, due: u64, id: u64, slot: Slot) -> bool {
        let Entry::Occupied(next) = self.scheduled.entry((due, id + 1)) else {
            return false;
        };
        if !next.get().admits(&slot) {
            return false;
        }
        let mut run = next.remove();
        run.push_front(slot.bytes);
        self.scheduled.insert((due, id), run);
        true
    }

    /// Whether no message is waiting or leased.
    fn is_empty(&self) -> bool {
        self.scheduled.is_empty() && self.leased.is_empty()
    }
}

/// Figures for one queue, as shown by stats and `spoolctl summary`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueStats {
    /// Messages in the queue, waiting and leased.
    pub count: u64,
    /// Their total size in bytes, as recorded at enqueue.
    pub bytes: u64,
    /// Messages handed to the dispatcher and not yet settled.
    pub leased: u64,
    /// Waiting messages whose due time has come: the backlog a dispatcher could take now.
    pub due_now: u64,
    /// Creation time of the oldest message, ms since the epoch.
    pub oldest_created_ms: Option<u64>,
    /// Earliest due time among waiting messages.
    pub next_due_ms: Option<u64>,
    /// attempts → number of messages with that many failed attempts.
    pub attempts: BTreeMap<u32, u64>,
}

/// The schedule of every queue plus the running byte total. The spool keeps it behind one
/// lock and changes it only after the disk change it mirrors is durable.
#[derive(Debug, Default)]
pub struct Index {
    queues: HashMap<String, QueueIndex>,
    /// Sum of `Slot::bytes` over every queued message (waiting or leased), kept as the
    /// index changes so the capacity gate reads it in O(1).
    bytes: u64,
    /// Queues that had a message scheduled since the last [`Index::take_touched`]: the
    /// dispatcher wakes (or starts) only their workers after a commit, so its cost follows
    /// the queues that changed, not every queue it knows.
    touched: HashSet<String>,
    /// The live chunks and their settled bits: which messages are chunked, and where.
    pub(crate) chunks: ChunkTable,
    /// Delivered single records whose deletes the commit thread has not written yet.
    pub(crate) acked_singles: AckedSingles,
}

impl Index {
    /// Schedules `id` in `queue` at `due_ms`, replacing a lease or an earlier schedule of the
    /// same id at the same due time (a retry or a rebind) so the byte total counts each
    /// message once.
    pub fn insert(&mut self, queue: &str, id: u64, due_ms: u64, slot: Slot) {
        self.insert_all(queue, [(id, due_ms, slot)]);
    }

    /// [`Index::insert`] for many messages of one queue, as (id, due time, slot): the queue
    /// is looked up once (recovery schedules a chunk's messages this way).
    pub fn insert_all(
        &mut self,
        queue: &str,
        messages: impl IntoIterator<Item = (u64, u64, Slot)>,
    ) {
        if !self.touched.contains(queue) {
            self.touched.insert(queue.to_owned());
        }
        let q = match self.queues.get_mut(queue) {
            Some(q) => q,
            None => self.queues.entry(queue.to_owned()).or_default(),
        };
        for (id, due_ms, slot) in messages {
            let mut freed = q
                .leased
                .remove(&id)
                .map_or(0, |(_, old)| u64::from(old.bytes));
            if let Some(old) = q.schedule(due_ms, id, slot) {
                freed += u64::from(old.bytes);
            }
            self.bytes = (self.bytes + u64::from(slot.bytes)).saturating_sub(freed);
        }
    }

    /// The queues that had a message scheduled (enqueued, retried, released by an
    /// operator, recovered at open) since the previous call, each once.
    pub fn take_touched(&mut self) -> Vec<String> {
        // Taken, not drained: a burst's capacity is not kept for ever.
        std::mem::take(&mut self.touched).into_iter().collect()
    }

    /// Bytes of every queued message (waiting or leased), as recorded at enqueue.
    pub fn total_bytes(&self) -> u64 {
        self.bytes
    }

    /// Rebuilds each queue's schedule with full B-tree nodes and runs without spare room.
    /// Inserting in order (as recovery and ingest do) leaves every node about half full
    /// (docs/performance.md, P4).
    pub fn compact(&mut self) {
        for q in self.queues.values_mut() {
            let mut runs = std::mem::take(&mut q.scheduled);
            runs.values_mut().for_each(Run::shrink);
            q.scheduled = runs.into_iter().collect();
        }
    }

    /// Leases up to `max` messages due at `now_ms`, earliest first (then by id).
    pub fn take_due(&mut self, queue: &str, now_ms: u64, max: usize) -> Vec<Taken> {
        self.take_due_within(queue, now_ms, max, u64::MAX)
    }

    /// [`take_due`](Self::take_due), stopping before the message that would bring the
    /// sizes taken over `max_bytes`. The first message is taken whatever its size, so a
    /// message larger than the budget still goes, alone.
    pub fn take_due_within(
        &mut self,
        queue: &str,
        now_ms: u64,
        max: usize,
        max_bytes: u64,
    ) -> Vec<Taken> {
        let Some(q) = self.queues.get_mut(queue) else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        let mut bytes_left = max_bytes;
        while taken.len() < max {
            let Some(entry) = q.scheduled.first_entry() else {
                break;
            };
            let (due_ms, first) = *entry.key();
            if due_ms > now_ms {
                break;
            }
            let (mut n, bytes) = entry.get().front_within(max - taken.len(), bytes_left);
            let over_budget = n == 0;
            if over_budget {
                if !taken.is_empty() {
                    break;
                }
                n = 1;
            }
            bytes_left -= bytes;
            // A run's messages all come before the next entry (runs of one due time never
            // overlap), so the first run is taken from its front.
            let mut run = entry.remove();
            let slots = run.take_front(n);
            let ids = first..first + slots.len() as u64;
            if !run.is_empty() {
                q.scheduled.insert((due_ms, ids.end), run);
            }
            for (id, slot) in ids.zip(slots) {
                q.leased.insert(id, (due_ms, slot));
                taken.push(Taken {
                    id,
                    due_ms,
                    slot,
                    home: self.chunks.home(queue, id),
                });
            }
            if over_budget {
                break;
            }
        }
        taken
    }

    /// The waiting (not leased) messages of `queue` as (due, id), earliest due first.
    pub fn waiting(&self, queue: &str) -> Vec<(u64, u64)> {
        let Some(q) = self.queues.get(queue) else {
            return Vec::new();
        };
        q.scheduled
            .iter()
            .flat_map(|(&(due, first), run)| (first..first + run.len()).map(move |id| (due, id)))
            .collect()
    }

    /// Leases those of `keys` (due, id) that are still waiting at that due time; the
    /// others were leased or rescheduled meanwhile and are left alone.
    pub fn take_keys(&mut self, queue: &str, keys: &[(u64, u64)]) -> Vec<Taken> {
        let Some(q) = self.queues.get_mut(queue) else {
            return Vec::new();
        };
        let chunks = &self.chunks;
        keys.iter()
            .filter_map(|&(due_ms, id)| {
                let run = q.run_holding(due_ms, id)?;
                let slot = q.cut(run, id);
                q.leased.insert(id, (due_ms, slot));
                Some(Taken {
                    id,
                    due_ms,
                    slot,
                    home: chunks.home(queue, id),
                })
            })
            .collect()
    }

    /// Settles a leased chunked message as delivered: forgets it and sets its bit (see
    /// `chunk_table.rs`). Returns whether the commit thread must be woken to write the
    /// bitmap, or `None` if it was not leased.
    pub(crate) fn ack_chunked(&mut self, queue: &str, id: u64, home: Home) -> Option<bool> {
        self.remove_leased(queue, id)?;
        let idle = self.no_settles_pending();
        let dirtied = self.chunks.settle_delivered(queue, home);
        Some(idle && dirtied)
    }

    /// Settles a leased single record as delivered: forgets it and leaves its delete (and
    /// its large-record marker's) to the commit thread (see `acked_singles.rs`). Returns
    /// whether the commit thread must be woken, or `None` if it was not leased.
    pub(crate) fn ack_single(&mut self, queue: &str, id: u64, large: bool) -> Option<bool> {
        self.remove_leased(queue, id)?;
        let wake = self.no_settles_pending();
        self.acked_singles.push(queue, id, large);
        Some(wake)
    }

    /// Whether acks left nothing for the commit thread to write: the next ack must wake it.
    fn no_settles_pending(&self) -> bool {
        !self.chunks.has_dirty() && self.acked_singles.is_empty()
    }

    /// Every write the acks left (bitmaps and deletes), plus the bits `moves` set: what the
    /// commit thread writes with a group or on its settle tick.
    pub(crate) fn settle_writes(&mut self, moves: &[(&str, Home)]) -> SettleWrites {
        let mut writes = self.chunks.settle_writes(moves);
        writes.ops.extend(self.acked_singles.take_ops());
        writes
    }

    /// Whether `id` is in flight from `queue`: settlements check it before touching disk.
    pub fn is_leased(&self, queue: &str, id: u64) -> bool {
        self.queues
            .get(queue)
            .is_some_and(|q| q.leased.contains_key(&id))
    }

    /// Gives a lease back untouched (e.g. on shutdown or a suspended queue).
    pub fn release(&mut self, queue: &str, id: u64) -> bool {
        let Some(q) = self.queues.get_mut(queue) else {
            return false;
        };
        match q.leased.remove(&id) {
            Some((due, slot)) => {
                q.schedule(due, id, slot);
                true
            }
            None => false,
        }
    }

    /// Forgets a message wherever it is (settled, dead-lettered, purged).
    pub fn remove(&mut self, queue: &str, id: u64) -> Option<Slot> {
        let q = self.queues.get_mut(queue)?;
        let slot = match q.leased.remove(&id) {
            Some((_, slot)) => Some(slot),
            None => q.run_holding_any(id).map(|run| q.cut(run, id)),
        };
        self.account_removed(queue, slot)
    }

    /// Forgets a leased message (the hot path of an ack: no walk over the runs).
    fn remove_leased(&mut self, queue: &str, id: u64) -> Option<Slot> {
        let slot = self.queues.get_mut(queue)?.leased.remove(&id);
        self.account_removed(queue, slot.map(|(_, slot)| slot))
    }

    /// What every removal does after taking `slot` out of `queue`: its bytes leave the
    /// total, and an emptied queue is forgotten. Returns `slot`.
    fn account_removed(&mut self, queue: &str, slot: Option<Slot>) -> Option<Slot> {
        if let Some(slot) = slot {
            self.bytes = self.bytes.saturating_sub(u64::from(slot.bytes));
        }
        if self.queues.get(queue).is_some_and(QueueIndex::is_empty) {
            self.queues.remove(queue);
            shrink_if_sparse(&mut self.queues);
        }
        slot
    }

    /// Names of every queue holding at least one message, sorted (an empty queue is dropped).
    pub fn queue_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.queues.keys().cloned().collect();
        names.sort();
        names
    }

    /// How many waiting messages of `queue` are due at `now_ms`, counting at most `max`
    /// (the dispatcher's batch gathering asks "are there `min_batch_size` yet?").
    pub fn due_count(&self, queue: &str, now_ms: u64, max: usize) -> usize {
        let Some(q) = self.queues.get(queue) else {
            return 0;
        };
        let mut count = 0;
        for run in q.scheduled.range(..=(now_ms, u64::MAX)).map(|(_, run)| run) {
            if count >= max as u64 {
                break;
            }
            count += run.len();
        }
        count.min(max as u64) as usize
    }

    /// Earliest due time of a waiting message, for the dispatcher's timer.
    pub fn next_due(&self, queue: &str) -> Option<u64> {
        let q = self.queues.get(queue)?;
        q.scheduled.keys().next().map(|(due, _)| *due)
    }

    /// Which queue holds `id` (a linear walk: for operators, not for the hot path).
    pub fn find(&self, id: u64) -> Option<String> {
        self.queues
            .iter()
            .find(|(_, q)| q.leased.contains_key(&id) || q.run_holding_any(id).is_some())
            .map(|(name, _)| name.clone())
    }

    /// The figures of one queue at `now_ms`; all zero for an unknown queue.
    pub fn stats(&self, queue: &str, now_ms: u64) -> QueueStats {
        let mut stats = QueueStats::default();
        let Some(q) = self.queues.get(queue) else {
            return stats;
        };
        let mut count = |slot: Slot, n: u64, bytes: u64| {
            stats.count += n;
            stats.bytes += bytes;
            *stats.attempts.entry(slot.attempts).or_default() += n;
            stats.oldest_created_ms = Some(
                stats
                    .oldest_created_ms
                    .map_or(slot.created_ms, |t| t.min(slot.created_ms)),
            );
        };
        for run in q.scheduled.values() {
            count(run.slot(0), run.len(), run.total_bytes());
        }
        for (_, slot) in q.leased.values() {
            count(*slot, 1, u64::from(slot.bytes));
        }
        stats.leased = q.leased.len() as u64;
        stats.due_now = q
            .scheduled
            .range(..=(now_ms, u64::MAX))
            .map(|(_, run)| run.len())
            .sum();
        stats.next_due_ms = self.next_due(queue);
        stats
    }
}

/// Gives back a map's capacity once it is under a quarter full: a burst over many queues
/// would otherwise keep its table for good. Amortized O(1) per removal.
pub(crate) fn shrink_if_sparse<K: std::hash::Hash + Eq, V, S: std::hash::BuildHasher>(
    map: &mut HashMap<K, V, S>,
) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOT: Slot = Slot {
        created_ms: 5,
        bytes: 10,
        attempts: 0,
    };

    #[test]
    fn compact_keeps_the_schedule() {
        let mut index = Index::default();
        for id in (0..1000).rev() {
            index.insert("q", id, 1000 - id, SLOT);
        }
        let before = index.stats("q", 0);
        index.compact();
        assert_eq!(index.stats("q", 0), before);
        let ids: Vec<u64> = index.take_due("q", 2000, 3).iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![999, 998, 997], "earliest due first, as before");
    }

    #[test]
    fn leases_due_messages_in_due_then_id_order() {
        let mut index = Index::default();
        index.insert("q", 3, 100, SLOT);
        index.insert("q", 1, 100, SLOT);
        index.insert("q", 2, 500, SLOT);
        let taken: Vec<u64> = index.take_due("q", 100, 10).iter().map(|t| t.id).collect();
        assert_eq!(taken, vec![1, 3]);
        assert!(
            index.take_due("q", 100, 10).is_empty(),
            "leased ones are not handed out twice"
        );
        assert!(index.release("q", 3));
        assert_eq!(index.take_due("q", 1000, 10).len(), 2);
    }

    #[test]
    fn a_byte_budget_stops_the_take_but_never_before_the_first_message() {
        let mut index = Index::default();
        let sized = |bytes| Slot { bytes, ..SLOT };
        for (id, bytes) in [(1, 400), (2, 400), (3, 400), (4, 5000), (5, 10)] {
            index.insert("q", id, 100, sized(bytes));
        }
        let ids = |taken: Vec<Taken>| taken.iter().map(|t| t.id).collect::<Vec<u64>>();
        assert_eq!(ids(index.take_due_within("q", 100, 10, 900)), vec![1, 2]);
        assert_eq!(
            ids(index.take_due_within("q", 100, 10, 900)),
            vec![3],
            "the next message (5000 B) would pass the budget"
        );
        assert_eq!(
            ids(index.take_due_within("q", 100, 10, 900)),
            vec![4],
            "a message over the budget goes alone, and nothing after it"
        );
        assert_eq!(ids(index.take_due_within("q", 100, 10, 900)), vec![5]);
    }

    #[test]
    fn due_count_counts_waiting_due_messages_up_to_max() {
        let mut index = Index::default();
        for id in 0..5 {
            index.insert("q", id, 100 + id, SLOT);
        }
        assert_eq!(index.due_count("q", 99, 10), 0);
        assert_eq!(index.due_count("q", 102, 10), 3);
        assert_eq!(index.due_count("q", 1000, 2), 2, "at most max");
        index.take_due("q", 100, 1);
        assert_eq!(
            index.due_count("q", 102, 10),
            2,
            "leased ones are not waiting"
        );
        assert_eq!(index.due_count("other", 1000, 10), 0);
    }

    #[test]
    fn total_bytes_matches_the_stats_through_any_sequence() {
        let mut index = Index::default();
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for step in 0..5000 {
            let queue = ["a", "b", "c"][next(3) as usize];
            let id = next(50);
            let slot = Slot {
                bytes: next(1000) as u32,
                ..SLOT
            };
            match next(4) {
                // insert only ids not already scheduled elsewhere, as the spool does
                0 if !index.is_leased(queue, id) && index.find(id).is_none() => {
                    index.insert(queue, id, next(100), slot)
                }
                0 | 1 => {
                    index.take_due(queue, next(100), 3);
                }
                2 => {
                    // a retry: a leased message rescheduled
                    if index.is_leased(queue, id) {
                        index.insert(queue, id, next(100), slot);
                    } else {
                        index.release(queue, id);
                    }
                }
                _ => {
                    index.remove(queue, id);
                }
            }
            let sum: u64 = index
                .queue_names()
                .iter()
                .map(|q| index.stats(q, 0).bytes)
                .sum();
            assert_eq!(index.total_bytes(), sum, "after step {step}");
        }
    }

    #[test]
    fn stats_count_waiting_and_leased() {
        let mut index = Index::default();
        index.insert("q", 1, 0, SLOT);
        index.insert(
            "q",
            2,
            50,
            Slot {
                attempts: 2,
                created_ms: 1,
                ..SLOT
            },
        );
        index.take_due("q", 0, 1);
        let stats = index.stats("q", 10);
        assert_eq!(
            (stats.count, stats.bytes, stats.leased, stats.due_now),
            (2, 20, 1, 0)
        );
        assert_eq!(stats.oldest_created_ms, Some(1));
        assert_eq!(stats.attempts.get(&2), Some(&1));
        assert_eq!(index.total_bytes(), 20);
        index.insert("q", 1, 80, SLOT); // the leased message rescheduled: no double count
        assert_eq!(index.total_bytes(), 20);
        assert_eq!(index.remove("q", 1), Some(SLOT));
        assert_eq!(index.total_bytes(), 10);
        assert!(index.remove("q", 2).is_some());
        assert_eq!(index.total_bytes(), 0);
        assert!(index.queue_names().is_empty(), "empty queues are forgotten");
    }

    #[test]
    fn touched_queues_are_reported_once_until_touched_again() {
        let mut index = Index::default();
        index.insert("a", 1, 0, SLOT);
        index.insert("a", 2, 0, SLOT);
        index.insert("b", 3, 0, SLOT);
        let mut touched = index.take_touched();
        touched.sort();
        assert_eq!(touched, ["a", "b"]);
        assert!(index.take_touched().is_empty());
        index.take_due("a", 0, 1);
        assert!(index.take_touched().is_empty(), "a lease touches nothing");
        index.insert("a", 1, 50, SLOT); // a retry reschedules
        assert_eq!(index.take_touched(), ["a"]);
    }
}
