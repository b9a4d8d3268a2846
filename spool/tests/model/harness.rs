//! Runs one step on the spool and on the model, and keeps the lease handles the spool gave
//! out, grouped by the `lease` call that returned them (so a partial ack can take a subset
//! of one call's leases, as the dispatcher does after a `send_batch`).

use std::collections::BTreeSet;

use spool::{Lease, Leased, MessageId, Spool, SpoolError};

use super::state::{Expected, Model};
use super::{Step, QUEUES};
use crate::common::{msg, open_chunked};

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub spool: Option<Spool>,
    /// Leases held with their messages, one group per `lease` call (empty groups are
    /// dropped).
    pub batches: Vec<Vec<Leased>>,
    /// Leases already settled (or lost at a reopen): handed to `ack_many` while their
    /// message is not leased again, they must be refused.
    pub settled: Vec<Lease>,
    pub model: Model,
    pub rt: tokio::runtime::Runtime,
    /// Close and reopen the spool after every step (see `reopen_keeping_leases`).
    pub reopen_each_step: bool,
    /// Open the spool with chunked ingest (spool v2).
    pub chunked: bool,
    /// Queues the step scheduled a message in: the spool must name them to the
    /// dispatcher (`take_touched_queues`), or their new work waits unseen.
    pub touched: BTreeSet<String>,
}

impl Harness {
    pub fn new(reopen_each_step: bool, chunked: bool) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let spool = open_chunked(dir.path(), chunked);
        Harness {
            dir,
            spool: Some(spool),
            batches: Vec::new(),
            settled: Vec::new(),
            model: Model {
                now: 1 << 50,
                ..Model::default()
            },
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            reopen_each_step,
            chunked,
            touched: BTreeSet::new(),
        }
    }

    pub fn spool(&self) -> &Spool {
        self.spool.as_ref().expect("open")
    }

    pub fn leased_ids(&self) -> BTreeSet<u64> {
        self.batches
            .iter()
            .flatten()
            .map(|l| l.lease.id().0)
            .collect()
    }

    /// Removes and returns the `pick`-th lease held, counting across all groups.
    fn take_leased(&mut self, pick: usize) -> Option<Leased> {
        let total: usize = self.batches.iter().map(Vec::len).sum();
        let mut n = pick.checked_rem(total)?;
        let b = self.batches.iter().position(|b| {
            let here = n < b.len();
            if !here {
                n -= b.len();
            }
            here
        })?;
        let lease = self.batches[b].remove(n);
        self.batches.retain(|b| !b.is_empty());
        Some(lease)
    }

    pub fn apply(&mut self, step: Step) {
        match step {
            Step::Enqueue { queue, payloads } => self.enqueue(QUEUES[queue], payloads),
            Step::Lease { queue, max } => {
                let leases = self.lease(QUEUES[queue], max);
                self.batches.push(leases);
                self.batches.retain(|b| !b.is_empty());
            }
            Step::Ack(pick) => {
                if let Some(Leased { lease: l, .. }) = self.take_leased(pick) {
                    self.spool().ack(&l).unwrap();
                    self.model.queued.remove(&l.id().0);
                    self.settled.push(l);
                }
            }
            Step::AckMany { batch, mask, stale } => self.ack_many(batch, mask, stale),
            Step::Retry { pick, delay } => {
                if let Some(leased) = self.take_leased(pick) {
                    let (due, error) = (self.model.now + delay, format!("451 retry in {delay}"));
                    let spool = self.spool().clone();
                    self.rt.block_on(spool.retry(&leased, &error, due)).unwrap();
                    let l = leased.lease;
                    let e = self.model.queued.get_mut(&l.id().0).unwrap();
                    e.attempts += 1;
                    e.due = due;
                    e.last_error = Some(error);
                    self.touched.insert(l.queue().into());
                    self.settled.push(l);
                }
            }
            Step::DeadLetter(pick) => {
                if let Some(leased) = self.take_leased(pick) {
                    let reason = format!("550 no ({})", leased.lease.id());
                    let spool = self.spool().clone();
                    self.rt
                        .block_on(spool.dead_letter(&leased, &reason))
                        .unwrap();
                    let l = leased.lease;
                    let mut e = self.model.queued.remove(&l.id().0).unwrap();
                    e.last_error = Some(reason);
                    self.model.dead.insert(l.id().0, e);
                    self.settled.push(l);
                }
            }
            Step::Release(pick) => {
                if let Some(l) = self.take_leased(pick) {
                    self.spool().release(&l.lease);
                }
            }
            Step::Rebind { from, to } => self.rebind(QUEUES[from], QUEUES[to]),
            Step::Expedite(queue) => self.expedite(QUEUES[queue]),
            Step::Purge(queue) => self.purge(QUEUES[queue]),
            Step::RequeueDead { queue, id } => self.requeue_dead(queue, id),
            Step::Import(import) => self.import(import),
            Step::Tick(ms) => self.model.now += ms,
            Step::Reopen => self.reopen(),
        }
        self.check_touched();
        self.check();
        if self.reopen_each_step {
            self.reopen_keeping_leases();
        }
    }

    fn enqueue(&mut self, queue: &str, payloads: Vec<Vec<u8>>) {
        let batch = payloads.iter().map(|p| msg(queue, p)).collect();
        let before = spool::now_ms();
        let ids: Vec<u64> = self
            .spool()
            .enqueue_blocking(batch)
            .unwrap()
            .iter()
            .map(|id| id.0)
            .collect();
        let after = spool::now_ms();
        self.model.note_new_ids(&ids);
        self.touched.insert(queue.into());
        for (&id, payload) in ids.iter().zip(payloads) {
            // Stamped with the real clock: read the stamp back, within the call's bounds.
            let created = self.stamp(id, before, after);
            let e = Expected {
                queue: queue.into(),
                payload,
                created,
                attempts: 0,
                due: created,
                last_error: None,
            };
            self.model.queued.insert(id, e);
        }
    }

    /// The due time the spool gave `id` from its clock, checked to lie in `[lo, hi]`.
    pub fn stamp(&self, id: u64, lo: u64, hi: u64) -> u64 {
        let m = self
            .spool()
            .get(MessageId(id))
            .unwrap()
            .expect("just written");
        assert!(
            (lo..=hi).contains(&m.due_ms),
            "message {id} due at {} outside the call's clock window {lo}..={hi}",
            m.due_ms
        );
        m.due_ms
    }

    /// Leases up to `max` of `queue` and checks each against the model.
    fn lease(&mut self, queue: &str, max: usize) -> Vec<Leased> {
        let want = self.model.due_order(queue, &self.leased_ids(), max);
        let leased = self.spool().lease(queue, max, self.model.now).unwrap();
        let got: Vec<u64> = leased.iter().map(|l| l.lease.id().0).collect();
        assert_eq!(
            got, want,
            "lease order/content of {queue} differs from the model"
        );
        for l in &leased {
            let (id, seen) = Expected::of(&l.message);
            assert_eq!(seen, self.model.queued[&id], "leased message {id}");
            let handle = &l.lease;
            assert_eq!(
                (handle.queue(), handle.id().0, handle.attempts()),
                (queue, id, seen.attempts),
                "the lease handle names the message it came with"
            );
            assert_eq!(
                (handle.created_ms(), handle.due_ms()),
                (seen.created, seen.due)
            );
        }
        leased
    }

    /// Acks the subset `mask` of one lease call's leases in one `ack_many`; the rest stay
    /// leased for later steps. With `stale`, a lease settled earlier goes in first: it
    /// must be refused by name while the others are still acked.
    fn ack_many(&mut self, batch: usize, mask: u16, stale: bool) {
        let Some(b) = batch.checked_rem(self.batches.len()) else {
            return;
        };
        let leased = self.leased_ids();
        let group = std::mem::take(&mut self.batches[b]);
        let (chosen, kept): (Vec<_>, Vec<_>) = group
            .into_iter()
            .enumerate()
            .partition(|(n, _)| mask & (1 << n) != 0);
        self.batches[b] = kept.into_iter().map(|(_, l)| l).collect();
        self.batches.retain(|b| !b.is_empty());
        let mut acked: Vec<Lease> = chosen.into_iter().map(|(_, l)| l.lease).collect();
        let old = self
            .settled
            .iter()
            .filter(|l| !leased.contains(&l.id().0))
            .nth(usize::from(mask) % self.settled.len().max(1))
            .filter(|_| stale)
            .cloned();
        let mut call: Vec<&Lease> = old.iter().collect();
        call.extend(acked.iter());
        match (self.spool().ack_many(&call), &old) {
            (Ok(()), None) => {}
            (Err(SpoolError::NotLeased { id, .. }), Some(old)) => assert_eq!(id, old.id()),
            (got, _) => panic!("ack_many with stale lease {old:?}: {got:?}"),
        }
        for l in &acked {
            self.model.queued.remove(&l.id().0);
        }
        self.settled.append(&mut acked);
    }

    /// Closes and reopens the spool: every lease is gone, every leased message due again.
    pub fn reopen(&mut self) {
        self.spool = None; // drop closes it and releases the lock
        let lost = self.batches.drain(..).flatten().map(|l| l.lease);
        self.settled.extend(lost);
        let options = spool::SpoolOptions {
            chunked_ingest: self.chunked,
            ..spool::SpoolOptions::default()
        };
        let (spool, report) = spool::Spool::open(self.dir.path(), options).expect("reopen");
        // The chunk head count stays exact through every step, so no healthy reopen walks
        // the chunks' payloads looking for a lost head.
        assert!(!report.chunks_walked, "head count off: {report:?}");
        self.spool = Some(spool);
        // Every queue recovered with messages is work for the dispatcher.
        self.touched = self
            .model
            .queued
            .values()
            .map(|e| e.queue.clone())
            .collect();
        self.check_touched();
    }

    /// The step's queues are among those the spool reports touched.
    fn check_touched(&mut self) {
        let got: BTreeSet<String> = self.spool().take_touched_queues().into_iter().collect();
        let want = std::mem::take(&mut self.touched);
        assert!(
            got.is_superset(&want),
            "touched queues {got:?}, expected {want:?} among them"
        );
    }

    /// Closes and reopens the spool, checks the whole model with no lease held, then takes
    /// the same messages in flight again (grouped as before), so the next step acts on the
    /// state it would have had without the restart.
    fn reopen_keeping_leases(&mut self) {
        let groups: Vec<Vec<u64>> = self
            .batches
            .iter()
            .map(|b| b.iter().map(|l| l.lease.id().0).collect())
            .collect();
        self.reopen();
        self.check();
        let mut again = Vec::new();
        for queue in QUEUES {
            // Leased messages were due when leased and keep their due time, so they are
            // among the due ones now; the others go straight back.
            for l in self.lease(queue, usize::MAX) {
                if groups.iter().flatten().any(|&id| id == l.lease.id().0) {
                    again.push(l);
                } else {
                    self.spool().release(&l.lease);
                }
            }
        }
        for group in groups {
            let b = group
                .iter()
                .map(|id| {
                    let n = again.iter().position(|l| l.lease.id().0 == *id);
                    again.swap_remove(n.expect("a leased message is due again after reopen"))
                })
                .collect();
            self.batches.push(b);
        }
    }
}
