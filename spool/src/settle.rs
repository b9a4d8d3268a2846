//! Settling leased messages: ack, retry, dead-letter, release, each by [`Lease`].
//!
//! A lease says where its record is stored, so an ack deletes the record (and its
//! large-record marker) without reading it, through the commit thread. Record format v1
//! keeps a message's delivery state inside its one record, so a retry or a dead-letter
//! writes the leased copy back whole; every settlement that fails gives the lease back, so
//! nothing stays in flight until a restart.

use tokio::sync::oneshot;

use crate::chunk_table::Home;
use crate::commit::{Effect, Job, Op, Reply, TreeId};
use crate::error::{Result, SpoolError};
use crate::keys;
use crate::lease::{Lease, Leased, Location};
use crate::record::MessageId;
use crate::record::{self, Message};
use crate::spool::{mark_large, schedule, Spool};

impl Spool {
    /// Delivered: deletes the message. The delete is left to the commit thread (see
    /// [`ack_many`](Self::ack_many)); a crash before it is written redelivers the message
    /// (at-least-once).
    pub fn ack(&self, lease: &Lease) -> Result<()> {
        self.ack_many(&[lease])
    }

    /// [`ack`](Self::ack) for several delivered messages at once. Nothing here touches the
    /// disk: each message leaves the index now, and its delete (a single record) or settled
    /// bit (a chunked one) is written by the commit thread with its next group, or alone
    /// after a short tick, so a dispatcher on an async runtime never waits for the disk
    /// (`acked_singles.rs`). Leases no longer held are skipped (and reported in the
    /// error); the rest are still settled.
    pub fn ack_many(&self, leases: &[&Lease]) -> Result<()> {
        if let Err(e) = self.check_poison() {
            leases.iter().for_each(|l| self.release(l));
            return Err(e);
        }
        let mut wake = false;
        let mut not_leased = None;
        {
            let mut index = self.index();
            for lease in leases {
                let (queue, id) = (&lease.queue, lease.id.0);
                let first = match lease.location {
                    Location::Chunk(home) => index.ack_chunked(queue, id, home),
                    Location::Single { .. } => {
                        let large = lease.is_single_of_at_least(keys::LARGE_RECORD);
                        index.ack_single(queue, id, large)
                    }
                };
                match first {
                    Some(first) => wake |= first,
                    None => {
                        not_leased.get_or_insert((queue.clone(), lease.id));
                    }
                }
            }
        }
        if wake {
            // Only a stopped commit thread refuses it, and then nothing is written anyway.
            let _ = self.inner.committer.submit(Job::settle_tick());
        }
        match not_leased {
            Some((queue, id)) => Err(SpoolError::NotLeased {
                queue: queue.to_string(),
                id,
            }),
            None => Ok(()),
        }
    }

    /// Not delivered: counts the attempt and reschedules the message for `next_due_ms`,
    /// durably, before returning.
    ///
    /// Record format v1 keeps attempts, due time and last error inside the message's one
    /// record, so this rewrites it whole from the leased copy: nothing else writes a leased
    /// record (operator rewrites take waiting messages only), so the copy is the record.
    pub async fn retry(&self, leased: &Leased, error: &str, next_due_ms: u64) -> Result<()> {
        let lease = &leased.lease;
        self.check_leased(lease)?;
        let home = lease.home();
        let done = match self.submit_retry(leased.message.clone(), home, error, next_due_ms) {
            Ok(rx) => self.await_commit(rx).await,
            Err(e) => Err(e),
        };
        self.release_on_error(lease, done)
    }

    fn submit_retry(
        &self,
        mut updated: Message,
        home: Option<Home>,
        error: &str,
        due: u64,
    ) -> Result<oneshot::Receiver<Reply>> {
        updated.attempts = updated.attempts.saturating_add(1);
        updated.due_ms = due;
        updated.last_error = Some(error.to_owned());
        let mut job = Job::with_capacity(1);
        job.effects.push(schedule(&updated));
        let record = record::encode(&updated);
        if record.len() >= keys::LARGE_RECORD {
            job.ops.push(mark_large(&updated));
        }
        job.ops.push(Op::Put(
            TreeId::Messages,
            keys::message_key(&updated.queue, updated.id),
            record,
        ));
        // A chunked message moves out to a single record of its own, in the same batch.
        if let Some(home) = home {
            job.ops.push(Op::Settle(updated.queue.clone(), home));
        }
        self.submit(job)
    }

    /// Gives up on a message: moves it, with `reason`, to the dead-letter area, where it is
    /// kept until an operator requeues or purges it. The dead-letter copy is the leased one,
    /// as in [`retry`](Self::retry).
    pub async fn dead_letter(&self, leased: &Leased, reason: &str) -> Result<()> {
        let lease = &leased.lease;
        self.check_leased(lease)?;
        let done = match self.submit_dead_letter(leased.message.clone(), lease.home(), reason) {
            Ok(rx) => self.await_commit(rx).await,
            Err(e) => Err(e),
        };
        self.release_on_error(lease, done)
    }

    fn submit_dead_letter(
        &self,
        mut dead: Message,
        home: Option<Home>,
        reason: &str,
    ) -> Result<oneshot::Receiver<Reply>> {
        dead.last_error = Some(reason.to_owned());
        let mut job = Job::with_capacity(2);
        job.ops.push(Op::Put(
            TreeId::DeadLetter,
            keys::id_key(dead.id.0).to_vec(),
            record::encode(&dead),
        ));
        job.ops.push(remove_op(&dead.queue, dead.id, home));
        job.effects.push(Effect::Forget {
            queue: dead.queue.clone(),
            id: dead.id.0,
        });
        self.submit(job)
    }

    /// A settlement that could not be made durable leaves the message as it was on disk:
    /// give the lease back so it is tried again rather than stuck until a restart.
    fn release_on_error(&self, lease: &Lease, done: Result<()>) -> Result<()> {
        if done.is_err() {
            self.release(lease);
        }
        done
    }

    /// Returns a lease untouched: the message is due again at its old time.
    pub fn release(&self, lease: &Lease) {
        self.index().release(&lease.queue, lease.id.0);
    }
    fn check_leased(&self, lease: &Lease) -> Result<()> {
        if self.index().is_leased(&lease.queue, lease.id.0) {
            Ok(())
        } else {
            Err(SpoolError::NotLeased {
                queue: lease.queue.to_string(),
                id: lease.id,
            })
        }
    }
}

/// The write that takes a message out of where it is stored: a single record's delete, or
/// the settled bit of a chunked one.
pub(crate) fn remove_op(queue: &str, id: MessageId, home: Option<Home>) -> Op {
    match home {
        Some(home) => Op::Settle(queue.to_owned(), home),
        None => Op::Del(TreeId::Messages, keys::message_key(queue, id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NewMessage, SpoolOptions};

    const LATER: u64 = u64::MAX / 2;

    /// A spool with one message, leased, and that message's key.
    async fn one_leased() -> (tempfile::TempDir, Spool, Leased, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let new = NewMessage {
            queue: "q".into(),
            meta: Default::default(),
            payload: b"x".to_vec(),
        };
        spool.enqueue(vec![new]).await.unwrap();
        let leased = spool.lease("q", 1, LATER).unwrap().remove(0);
        let key = keys::message_key("q", leased.lease.id);
        (dir, spool, leased, key)
    }

    /// The settlement writes the leased copy: a record damaged on disk while its message
    /// was in flight is rewritten whole (retry) or moved whole (dead letter), not lost.
    #[tokio::test]
    async fn a_retry_and_a_dead_letter_write_the_leased_copy() {
        let (_dir, spool, leased, key) = one_leased().await;
        let damaged: &[u8] = b"\x01\0\0\0\0not this message";
        let messages = &spool.inner.trees[TreeId::Messages as usize];
        messages.insert(&key, damaged).unwrap();
        spool.retry(&leased, "451", 0).await.unwrap();
        let again = spool.lease("q", 1, LATER).unwrap().remove(0);
        assert_eq!(again.message.payload, b"x");
        assert_eq!(again.message.attempts, 1);
        assert_eq!(again.message.last_error.as_deref(), Some("451"));
        messages.insert(&key, damaged).unwrap();
        spool.dead_letter(&again, "550").await.unwrap();
        let dead = spool.dead_letters().unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].payload, b"x");
        assert_eq!(dead[0].last_error.as_deref(), Some("550"));
        assert!(messages.get(&key).unwrap().is_none());
        assert!(spool.quarantined().unwrap().is_empty());
    }
}
