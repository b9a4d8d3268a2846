//! Operator operations: listing, re-routing, purging, dead-letter requeue, export/import.
//!
//! They go through the same commit thread as the dispatcher's writes, so they are durable
//! when they return and never race a group commit. They touch waiting messages only:
//! a leased message is in flight and belongs to the dispatcher until it is settled.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use crate::chunk_table::Home;
use crate::commit::{Effect, Job, Op, TreeId};
use crate::error::{Result, SpoolError};
use crate::keys;
use crate::keys::ChunkPart;
use crate::record::{self, Message, MessageId};
use crate::recovery::{self, DamagedRecord};
use crate::settle::remove_op;
use crate::spool::{schedule, Spool};

/// Writes are committed in chunks so a million-message purge does not build one giant job.
const CHUNK: usize = 1000;

impl Spool {
    /// Up to `limit` messages of `queue` in id order, read from disk (leased ones included).
    /// Records that fail their checks are skipped here; `verify` reports them.
    pub fn list(&self, queue: &str, limit: usize) -> Result<Vec<Message>> {
        let mut chunked = Vec::new();
        self.for_each_chunked(&keys::chunk_queue_prefix(ChunkPart::Chunk, queue), |m| {
            if let Ok(m) = m {
                chunked.push(m);
            }
            Ok(chunked.len() < limit)
        })?;
        let mut out = self.list_singles(queue, limit)?;
        // Both are in id order: merge them, keep the first `limit`.
        out.extend(chunked);
        out.sort_by_key(|m| m.id);
        out.truncate(limit);
        Ok(out)
    }

    fn list_singles(&self, queue: &str, limit: usize) -> Result<Vec<Message>> {
        let mut out = Vec::new();
        for item in
            self.inner.trees[TreeId::Messages as usize].scan_prefix(keys::queue_prefix(queue))
        {
            let (key, raw) = item.map_err(|e| self.storage(e))?;
            if self.ack_pending(&key) {
                continue;
            }
            if let Ok(msg) = recovery::check_message(&key, &raw) {
                out.push(msg);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Every queued message of every queue, in key order. Records that fail their checks
    /// are skipped: use [`for_each_record`](Self::for_each_record) to see them.
    pub fn for_each_message(&self, mut f: impl FnMut(Message) -> Result<()>) -> Result<()> {
        self.for_each_record(|record| match record {
            Ok(msg) => f(msg),
            Err(_) => Ok(()),
        })
    }

    /// Every record of the messages tree in key order: each a message, or what is wrong
    /// with it (export lists those instead of dropping them silently).
    pub fn for_each_record(
        &self,
        mut f: impl FnMut(std::result::Result<Message, DamagedRecord>) -> Result<()>,
    ) -> Result<()> {
        self.for_each_chunked(&keys::chunk_part_prefix(ChunkPart::Chunk), |record| {
            f(record).map(|()| true)
        })?;
        for item in self.inner.trees[TreeId::Messages as usize].range(keys::SINGLES_START..) {
            let (key, raw) = item.map_err(|e| self.storage(e))?;
            if self.ack_pending(&key) {
                continue;
            }
            f(
                recovery::check_message(&key, &raw).map_err(|reason| DamagedRecord {
                    tree: "messages".into(),
                    key: key.to_vec(),
                    reason,
                }),
            )?;
        }
        Ok(())
    }

    /// Whether the single record under `key` was delivered and only its delete is still
    /// to be written (`acked_singles.rs`): listings leave it out, as they leave out
    /// delivered chunked messages whose bitmap is not written yet.
    fn ack_pending(&self, key: &[u8]) -> bool {
        self.index().acked_singles.contains(key)
    }

    /// Every dead letter, oldest id first, and every dead-letter record that does not
    /// decode.
    pub fn dead_letter_records(&self) -> Result<(Vec<Message>, Vec<DamagedRecord>)> {
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for item in self.inner.trees[TreeId::DeadLetter as usize].iter() {
            let (key, raw) = item.map_err(|e| self.storage(e))?;
            match record::decode::<Message>(&raw) {
                Ok(msg) => good.push(msg),
                Err(e) => bad.push(DamagedRecord {
                    tree: "dead_letter".into(),
                    key: key.to_vec(),
                    reason: e.to_string(),
                }),
            }
        }
        Ok((good, bad))
    }

    /// Moves the waiting messages of `from` to `to` (KumoMTA's rebind). Returns how many.
    pub async fn rebind(&self, from: &str, to: &str) -> Result<u64> {
        keys::check_queue_name(to).map_err(|why| SpoolError::InvalidQueueName {
            name: to.into(),
            why,
        })?;
        self.rewrite_waiting(from, |msg, home| {
            let mut moved = msg.clone();
            moved.queue = to.to_owned();
            let mut ops = vec![remove_op(from, msg.id, home)];
            ops.push(Op::Put(
                TreeId::Messages,
                keys::message_key(to, moved.id),
                record::encode(&moved),
            ));
            let effects = vec![
                Effect::Forget {
                    queue: from.into(),
                    id: msg.id.0,
                },
                schedule(&moved),
            ];
            (ops, effects)
        })
        .await
    }

    /// Makes every waiting message of `queue` due now (retry immediately). Returns how many.
    pub async fn expedite(&self, queue: &str) -> Result<u64> {
        let now = crate::now_ms();
        self.rewrite_waiting(queue, |msg, home| {
            let mut due = msg.clone();
            due.due_ms = now;
            let mut ops = vec![Op::Put(
                TreeId::Messages,
                keys::message_key(queue, msg.id),
                record::encode(&due),
            )];
            // A chunked message moves out to a single record with its new due time.
            ops.extend(home.map(|home| Op::Settle(queue.to_owned(), home)));
            (ops, vec![schedule(&due)])
        })
        .await
    }

    /// Deletes every waiting message of `queue`. Returns how many.
    pub async fn purge(&self, queue: &str) -> Result<u64> {
        self.rewrite_waiting(queue, |msg, home| {
            let mut ops = vec![remove_op(queue, msg.id, home)];
            if home.is_none() && record::encoded_len(msg) >= keys::LARGE_RECORD {
                ops.push(Op::Del(TreeId::Meta, keys::large_marker(msg.id.0)));
            }
            (
                ops,
                vec![Effect::Forget {
                    queue: queue.into(),
                    id: msg.id.0,
                }],
            )
        })
        .await
    }

    /// Rewrites every message of `queue` waiting when the call starts with `change(msg)`,
    /// chunk by chunk. Each chunk is leased first (so the dispatcher cannot take it
    /// meanwhile), then committed with its index changes, which the commit thread applies
    /// once the chunk is durable, even if this future is dropped meanwhile. The ids are
    /// taken from a snapshot, so a message rescheduled into the same queue is not picked
    /// up a second time. On an error, the chunks already written stay applied and the
    /// failed chunk's leases are given back untouched: no message stays in flight, none is
    /// scheduled twice.
    async fn rewrite_waiting(
        &self,
        queue: &str,
        change: impl Fn(&Message, Option<Home>) -> (Vec<Op>, Vec<Effect>),
    ) -> Result<u64> {
        self.check_poison()?;
        let waiting = self.index().waiting(queue);
        let mut done = 0u64;
        for keys in waiting.chunks(CHUNK) {
            let taken = self.index().take_keys(queue, keys);
            if taken.is_empty() {
                continue;
            }
            let chunk = self.read_taken(queue, taken)?;
            let mut job = Job::with_capacity(chunk.len());
            for leased in &chunk {
                let (ops, effects) = change(&leased.message, leased.lease.home());
                job.ops.extend(ops);
                job.effects.extend(effects);
            }
            let committed = match self.submit(job) {
                Ok(rx) => self.await_commit(rx).await,
                Err(e) => Err(e),
            };
            if let Err(e) = committed {
                chunk.iter().for_each(|l| self.release(&l.lease));
                return Err(e);
            }
            done += chunk.len() as u64;
        }
        Ok(done)
    }

    /// Puts dead-lettered messages back in their queue, due now, with their attempt count
    /// reset. `queue`/`id` narrow the selection. Returns how many.
    pub async fn requeue_dead_letters(
        &self,
        queue: Option<&str>,
        id: Option<MessageId>,
    ) -> Result<u64> {
        let selected: Vec<Message> = self
            .dead_letters()?
            .into_iter()
            .filter(|m| queue.is_none_or(|q| m.queue == q) && id.is_none_or(|id| m.id == id))
            .collect();
        let now = crate::now_ms();
        for chunk in selected.chunks(CHUNK) {
            let mut job = Job::with_capacity(chunk.len() * 2);
            for dead in chunk {
                let mut msg = dead.clone();
                msg.attempts = 0;
                msg.due_ms = now;
                job.ops
                    .push(Op::Del(TreeId::DeadLetter, keys::id_key(msg.id.0).to_vec()));
                job.ops.push(Op::Put(
                    TreeId::Messages,
                    keys::message_key(&msg.queue, msg.id),
                    record::encode(&msg),
                ));
                job.effects.push(schedule(&msg));
            }
            self.await_commit(self.submit(job)?).await?;
        }
        Ok(selected.len() as u64)
    }

    /// Adds messages exported from a spool, keeping their ids, durably: `queued` into their
    /// queues, `dead` into the dead-letter area. Ids already present (queued or
    /// dead-lettered) are skipped, so importing the same file twice is harmless. An id above
    /// [`MessageId::MAX`] refuses the whole import (nothing is written). Returns
    /// (imported, skipped).
    pub async fn import(&self, queued: Vec<Message>, dead: Vec<Message>) -> Result<(u64, u64)> {
        let mut present: HashSet<u64> = self.dead_letters()?.iter().map(|m| m.id.0).collect();
        self.for_each_message(|m| {
            present.insert(m.id.0);
            Ok(())
        })?;
        let (mut imported, mut skipped) = (0, 0);
        let mut job = Job::with_capacity(queued.len() + dead.len());
        let all = queued.into_iter().map(|m| (m, false));
        for (msg, is_dead) in all.chain(dead.into_iter().map(|m| (m, true))) {
            keys::check_queue_name(&msg.queue).map_err(|why| SpoolError::InvalidQueueName {
                name: msg.queue.clone(),
                why,
            })?;
            if msg.id > MessageId::MAX {
                return Err(SpoolError::IdOutOfRange {
                    id: msg.id.0,
                    max: MessageId::MAX.0,
                });
            }
            if !present.insert(msg.id.0) {
                skipped += 1;
                continue;
            }
            self.inner
                .next_id
                .fetch_max(msg.id.0 + 1, Ordering::Relaxed);
            let record = record::encode(&msg);
            if record.len() >= keys::LARGE_RECORD {
                job.ops.push(crate::spool::mark_large(&msg));
            }
            if is_dead {
                job.ops.push(Op::Put(
                    TreeId::DeadLetter,
                    keys::id_key(msg.id.0).to_vec(),
                    record,
                ));
            } else {
                job.ops.push(Op::Put(
                    TreeId::Messages,
                    keys::message_key(&msg.queue, msg.id),
                    record,
                ));
                job.effects.push(schedule(&msg));
            }
            imported += 1;
        }
        self.await_commit(self.submit(job)?).await?;
        Ok((imported, skipped))
    }
}
