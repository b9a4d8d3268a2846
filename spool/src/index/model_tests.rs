//! The index against a model: one map entry per message, as the index was before runs.
//!
//! Runs are only a representation, so every answer the index gives (what a lease takes and
//! in which order, what a release or a removal finds, every figure) must be the model's,
//! through any sequence of what the spool does: ingest in runs, leases, operator takes of
//! single messages, releases, retries, removals, acks and compaction.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

use super::*;

/// The index with one entry per message: the reference.
#[derive(Debug, Default)]
struct Model {
    queues: BTreeMap<String, ModelQueue>,
}

#[derive(Debug, Default)]
struct ModelQueue {
    scheduled: BTreeMap<(u64, u64), Slot>,
    leased: HashMap<u64, (u64, Slot)>,
}

impl Model {
    fn insert(&mut self, queue: &str, id: u64, due: u64, slot: Slot) {
        let q = self.queues.entry(queue.to_owned()).or_default();
        q.leased.remove(&id);
        q.scheduled.insert((due, id), slot);
    }

    fn take_keys(&mut self, queue: &str, keys: &[(u64, u64)]) -> Vec<(u64, u64, Slot)> {
        let Some(q) = self.queues.get_mut(queue) else {
            return Vec::new();
        };
        keys.iter()
            .filter_map(|&(due, id)| {
                let slot = q.scheduled.remove(&(due, id))?;
                q.leased.insert(id, (due, slot));
                Some((id, due, slot))
            })
            .collect()
    }

    /// Due messages in order until `max`, or until the next would pass `max_bytes`; the
    /// first is taken whatever its size.
    fn take_due(
        &mut self,
        queue: &str,
        now: u64,
        max: usize,
        max_bytes: u64,
    ) -> Vec<(u64, u64, Slot)> {
        let keys: Vec<(u64, u64)> = self.queues.get(queue).map_or_else(Vec::new, |q| {
            let mut sum = 0u64;
            let due = q.scheduled.range(..=(now, u64::MAX)).take(max);
            due.enumerate()
                .take_while(|(i, (_, slot))| {
                    sum += u64::from(slot.bytes);
                    *i == 0 || sum <= max_bytes
                })
                .map(|(_, (k, _))| *k)
                .collect()
        });
        self.take_keys(queue, &keys)
    }

    fn release(&mut self, queue: &str, id: u64) -> bool {
        let Some(q) = self.queues.get_mut(queue) else {
            return false;
        };
        let Some((due, slot)) = q.leased.remove(&id) else {
            return false;
        };
        q.scheduled.insert((due, id), slot);
        true
    }

    fn remove(&mut self, queue: &str, id: u64) -> Option<Slot> {
        let q = self.queues.get_mut(queue)?;
        let slot = match q.leased.remove(&id) {
            Some((_, slot)) => Some(slot),
            None => {
                let key = q.scheduled.keys().find(|k| k.1 == id).copied();
                key.and_then(|k| q.scheduled.remove(&k))
            }
        };
        if q.scheduled.is_empty() && q.leased.is_empty() {
            self.queues.remove(queue);
        }
        slot
    }

    fn waiting(&self, queue: &str) -> Vec<(u64, u64)> {
        self.queues
            .get(queue)
            .map_or_else(Vec::new, |q| q.scheduled.keys().copied().collect())
    }

    fn where_is(&self, id: u64) -> Option<(&str, Option<u64>)> {
        self.queues.iter().find_map(|(name, q)| {
            if q.leased.contains_key(&id) {
                return Some((name.as_str(), None));
            }
            let key = q.scheduled.keys().find(|k| k.1 == id)?;
            Some((name.as_str(), Some(key.0)))
        })
    }

    fn stats(&self, queue: &str, now: u64) -> QueueStats {
        let mut stats = QueueStats::default();
        let Some(q) = self.queues.get(queue) else {
            return stats;
        };
        for slot in q
            .scheduled
            .values()
            .chain(q.leased.values().map(|(_, s)| s))
        {
            stats.count += 1;
            stats.bytes += u64::from(slot.bytes);
            *stats.attempts.entry(slot.attempts).or_default() += 1;
            let oldest = stats.oldest_created_ms.unwrap_or(u64::MAX);
            stats.oldest_created_ms = Some(oldest.min(slot.created_ms));
        }
        stats.leased = q.leased.len() as u64;
        stats.due_now = q.scheduled.range(..=(now, u64::MAX)).count() as u64;
        stats.next_due_ms = q.scheduled.keys().next().map(|k| k.0);
        stats
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Ingest: `len` consecutive ids from `first`, one due time and one slot (ids already
    /// queued are skipped, as the spool never enqueues an id twice).
    Ingest {
        queue: usize,
        first: u64,
        len: u64,
        due: u64,
        slot: Slot,
    },
    /// A retry or a rebind: a leased or waiting id scheduled again.
    Reschedule {
        id: u64,
        due: u64,
        slot: Slot,
    },
    TakeDue {
        queue: usize,
        now: u64,
        max: usize,
        max_bytes: u64,
    },
    /// An operator's take of some waiting messages (`pick` chooses among them by index).
    TakeKeys {
        queue: usize,
        pick: Vec<usize>,
    },
    Release {
        queue: usize,
        id: u64,
    },
    Remove {
        queue: usize,
        id: u64,
    },
    Ack {
        queue: usize,
        id: u64,
    },
    Compact,
}

const QUEUES: [&str; 2] = ["a", "b"];

fn slot() -> impl Strategy<Value = Slot> {
    (1u64..3, 0u32..1000, 0u32..2).prop_map(|(created_ms, bytes, attempts)| Slot {
        created_ms,
        bytes,
        attempts,
    })
}

fn op() -> impl Strategy<Value = Op> {
    let queue = 0..QUEUES.len();
    prop_oneof![
        3 => (queue.clone(), 0u64..60, 1u64..12, 0u64..4, slot())
            .prop_map(|(queue, first, len, due, slot)| Op::Ingest { queue, first, len, due, slot }),
        1 => (0u64..60, 0u64..4, slot()).prop_map(|(id, due, slot)| Op::Reschedule { id, due, slot }),
        3 => (queue.clone(), 0u64..5, 1usize..9, prop_oneof![Just(u64::MAX), 0u64..3000])
            .prop_map(|(queue, now, max, max_bytes)| Op::TakeDue { queue, now, max, max_bytes }),
        1 => (queue.clone(), prop::collection::vec(0usize..40, 0..4))
            .prop_map(|(queue, pick)| Op::TakeKeys { queue, pick }),
        2 => (queue.clone(), 0u64..60).prop_map(|(queue, id)| Op::Release { queue, id }),
        1 => (queue.clone(), 0u64..60).prop_map(|(queue, id)| Op::Remove { queue, id }),
        2 => (queue, 0u64..60).prop_map(|(queue, id)| Op::Ack { queue, id }),
        1 => Just(Op::Compact),
    ]
}

fn taken(list: Vec<Taken>) -> Vec<(u64, u64, Slot)> {
    list.into_iter().map(|t| (t.id, t.due_ms, t.slot)).collect()
}

fn apply(index: &mut Index, model: &mut Model, op: &Op) {
    match op {
        Op::Ingest {
            queue,
            first,
            len,
            due,
            slot,
        } => {
            for id in *first..first + len {
                if model.where_is(id).is_none() {
                    index.insert(QUEUES[*queue], id, *due, *slot);
                    model.insert(QUEUES[*queue], id, *due, *slot);
                }
            }
        }
        Op::Reschedule { id, due, slot } => {
            // The spool reschedules a leased message anywhere, and a waiting one at its due time.
            let Some((queue, waiting_at)) = model.where_is(*id) else {
                return;
            };
            let queue = queue.to_owned();
            let due = waiting_at.unwrap_or(*due);
            index.insert(&queue, *id, due, *slot);
            model.insert(&queue, *id, due, *slot);
        }
        Op::TakeDue {
            queue,
            now,
            max,
            max_bytes,
        } => {
            let got = taken(index.take_due_within(QUEUES[*queue], *now, *max, *max_bytes));
            assert_eq!(got, model.take_due(QUEUES[*queue], *now, *max, *max_bytes));
        }
        Op::TakeKeys { queue, pick } => {
            let waiting = model.waiting(QUEUES[*queue]);
            let mut keys: Vec<(u64, u64)> = pick
                .iter()
                .filter_map(|&i| waiting.get(i).copied())
                .collect();
            keys.push((9, 9)); // never waiting: left alone
            let got = taken(index.take_keys(QUEUES[*queue], &keys));
            assert_eq!(got, model.take_keys(QUEUES[*queue], &keys));
        }
        Op::Release { queue, id } => {
            let q = QUEUES[*queue];
            assert_eq!(index.release(q, *id), model.release(q, *id));
        }
        Op::Remove { queue, id } => {
            let q = QUEUES[*queue];
            assert_eq!(index.remove(q, *id), model.remove(q, *id));
        }
        Op::Ack { queue, id } => {
            let q = QUEUES[*queue];
            let leased = model
                .queues
                .get(q)
                .is_some_and(|m| m.leased.contains_key(id));
            let home = Home {
                first_id: *id,
                index: 0,
            };
            // No chunk is known here, so an ack of a leased message forgets it and writes
            // no bitmap; any other ack is refused.
            let expected = leased.then(|| {
                model.remove(q, *id);
                false
            });
            assert_eq!(index.ack_chunked(q, *id, home), expected);
        }
        Op::Compact => index.compact(),
    }
}

fn check_figures(index: &Index, model: &Model) {
    let names: Vec<String> = model.queues.keys().cloned().collect();
    assert_eq!(index.queue_names(), names);
    let mut total = 0;
    for queue in QUEUES {
        assert_eq!(
            index.waiting(queue),
            model.waiting(queue),
            "waiting in {queue}"
        );
        for now in [0, 2, 5] {
            let stats = model.stats(queue, now);
            assert_eq!(index.stats(queue, now), stats, "stats of {queue} at {now}");
            for max in [1, 3, 100] {
                let due = (stats.due_now as usize).min(max);
                assert_eq!(index.due_count(queue, now, max), due);
            }
        }
        assert_eq!(index.next_due(queue), model.stats(queue, 0).next_due_ms);
        total += model.stats(queue, 0).bytes;
    }
    assert_eq!(index.total_bytes(), total);
    for id in 0..60 {
        let found = model.where_is(id).map(|(q, _)| q.to_owned());
        assert_eq!(index.find(id), found, "find {id}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_index_answers_as_one_entry_per_message_would(ops in prop::collection::vec(op(), 1..80)) {
        let mut index = Index::default();
        let mut model = Model::default();
        for op in &ops {
            apply(&mut index, &mut model, op);
            check_figures(&index, &model);
        }
    }
}

#[test]
fn a_backlog_in_id_order_is_a_few_runs() {
    let mut index = Index::default();
    let slot = Slot {
        created_ms: 7,
        bytes: 100,
        attempts: 0,
    };
    for id in 0..10_000 {
        index.insert("q", id, 7, slot);
    }
    let runs = index.queues["q"].scheduled.len();
    assert_eq!(
        runs,
        10_000usize.div_ceil(run::MAX_RUN),
        "one entry per run"
    );
    let ids: Vec<u64> = index.take_due("q", 7, 5000).iter().map(|t| t.id).collect();
    assert_eq!(ids, (0..5000).collect::<Vec<_>>(), "FIFO across runs");
}
