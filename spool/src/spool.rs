//! The [`Spool`] handle: open, enqueue, lease, settle, inspect.

use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{oneshot, watch};

use crate::chunk_table::Home;
use crate::chunked;
use crate::commit::{
    self, CommitStats, Committer, Effect, Job, Op, Poison, Refusal, Reply, TreeId, Trees,
    WriterState,
};
use crate::durability::{sync_dir, DiskSync, SyncFaults};
use crate::error::{Result, SpoolError};
use crate::index::{Index, QueueStats, Taken};
use crate::keys;
use crate::lease::{Lease, Leased, Location};
use crate::ledger::{self, CommitMark, Ledger};
use crate::lock::DirLock;
use crate::record::{self, Message, MessageId, Meta};
use crate::recovery::{self, RecoveryReport};
use crate::{now_ms, QuarantineEntry};

/// How to open a spool. `Default` is what the daemon uses.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// sled's page cache. Small on purpose: the spool is a queue, recently written
    /// records are read back soon or never, and operators care about RSS.
    pub cache_capacity: u64,
    /// Injected disk failures (tests only; inert by default).
    pub faults: SyncFaults,
    /// Move damaged records to quarantine on open (the daemon's choice). `false` leaves
    /// them where they are, unindexed, and only lists them in the report: `spoolctl verify`.
    pub repair: bool,
    /// What to do when sled lost group commits it had made durable (see `ledger.rs`):
    /// `false` (the daemon's choice) refuses to open with [`SpoolError::LostWrites`];
    /// `true` opens and reports the loss, and with `repair` also records it in quarantine
    /// so the spool can be used again (`spoolctl verify [--repair]`).
    pub accept_lost_writes: bool,
    /// How long a write waits for its group commit before the spool gives up on the disk:
    /// past it, the spool is poisoned (a hung fsync or sled flush is no more repairable in
    /// process than a failed one) and the write fails, so ingest answers 503 instead of
    /// hanging. A healthy commit takes milliseconds, a loaded slow disk a second or two.
    pub commit_deadline: std::time::Duration,
    /// Store the messages of one enqueue call that go to one queue as chunks (spool v2,
    /// `chunk.rs`) instead of one record each. On by default: P1, P2 and P4 gain two to
    /// five times with it, and with the vendored sled's blob fix its disk use over P5's
    /// fill/drain cycles is as flat as v1's (docs/performance.md). `false` writes v1 records
    /// only. A spool opened either way reads both.
    pub chunked_ingest: bool,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            cache_capacity: 32 << 20,
            faults: SyncFaults::default(),
            repair: true,
            accept_lost_writes: false,
            commit_deadline: std::time::Duration::from_secs(30),
            chunked_ingest: true,
        }
    }
}

/// A message to be spooled; the spool assigns its id and times.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// The queue it goes to; checked against the key rules before anything is written.
    pub queue: String,
    /// Metadata kept with it and handed to the sender.
    pub meta: Meta,
    /// The body, stored as is.
    pub payload: Vec<u8>,
}

/// Totals across the spool.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SpoolStats {
    /// Per queue, by name; queues with no message are absent.
    pub queues: std::collections::BTreeMap<String, QueueStats>,
    /// Messages in the dead-letter tree, waiting for an operator.
    pub dead_letter: u64,
    /// Records in quarantine (unreadable, kept with their raw bytes).
    pub quarantine: u64,
}

/// A cheap, cloneable handle on an open spool. The last clone to drop finishes pending
/// commits and releases the directory lock.
///
/// The async methods need a tokio runtime with its time driver (`enable_time` or
/// `enable_all`): each write waits for its group commit at most
/// [`SpoolOptions::commit_deadline`].
#[derive(Clone)]
pub struct Spool {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) dir: PathBuf,
    // Field order is drop order: the committer must stop before sled closes, and the
    // lock must outlive both. sled is closed by `Drop` (see `close_sled`), not by the
    // field drops.
    pub(crate) committer: Committer,
    pub(crate) db: ManuallyDrop<sled::Db>,
    pub(crate) trees: ManuallyDrop<Trees>,
    pub(crate) poison: Arc<Poison>,
    pub(crate) index: Arc<Mutex<Index>>,
    pub(crate) next_id: AtomicU64,
    pub(crate) quarantine_seq: AtomicU64,
    commit_deadline: std::time::Duration,
    pub(crate) chunked_ingest: bool,
    changed: watch::Receiver<u64>,
    commit_stats: Arc<CommitStats>,
    _lock: DirLock,
}

/// How long closing sled may take: a healthy close flushes what acks left (seconds at
/// most); a poisoned spool has nothing sled must still write, and its sled may be wedged.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
const POISONED_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

impl Drop for Inner {
    fn drop(&mut self) {
        self.committer.stop();
        // SAFETY: `drop` runs once and neither field is used after this point.
        let (db, trees) = unsafe {
            (
                ManuallyDrop::take(&mut self.db),
                ManuallyDrop::take(&mut self.trees),
            )
        };
        close_sled(&self.dir, db, trees, self.poison.is_set());
    }
}

/// Flushes and drops sled on a thread of its own, waiting a bounded time. sled 0.34 flushes
/// when its last handle drops and, after a failed blob write, that flush waits for ever
/// (a leaked log-buffer reservation): a daemon that waited would never exit. Everything
/// acknowledged was fsynced before its answer, so leaving a stuck close behind loses only
/// unsynced acks (redeliveries, never losses).
fn close_sled(dir: &Path, db: sled::Db, trees: Trees, poisoned: bool) {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let closer = std::thread::Builder::new()
        .name("spool-close".into())
        .spawn(move || {
            let flushed = if poisoned { Ok(0) } else { db.flush() };
            drop(trees);
            drop(db);
            let _ = done_tx.send(flushed);
        });
    if let Err(e) = closer {
        tracing::error!(error = %e, dir = %dir.display(), "cannot start a thread to close the spool; leaving sled unflushed");
        return;
    }
    let timeout = if poisoned {
        POISONED_CLOSE_TIMEOUT
    } else {
        CLOSE_TIMEOUT
    };
    match done_rx.recv_timeout(timeout) {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, dir = %dir.display(), "final spool flush failed")
        }
        Err(_) => tracing::error!(
            dir = %dir.display(),
            waited = ?timeout,
            poisoned,
            "sled did not close in time (wedged after a disk error?); leaving it behind: \
             every acknowledged message was fsynced, unsynced acks are redelivered after the restart"
        ),
    }
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, recovering whatever is there.
    pub fn open(dir: &Path, options: SpoolOptions) -> Result<(Spool, RecoveryReport)> {
        Spool::open_tuned(dir, options, |config| config)
    }

    /// [`open`](Self::open) with sled's configuration passed through `tune` last. Only the
    /// `spool_files` fuzz harness passes anything but the identity (`fuzzing::open_small`:
    /// smaller segments, no flusher thread), so the same open and recovery run on its files.
    pub(crate) fn open_tuned(
        dir: &Path,
        options: SpoolOptions,
        tune: impl FnOnce(sled::Config) -> sled::Config,
    ) -> Result<(Spool, RecoveryReport)> {
        let io_err = |source| SpoolError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let lock = DirLock::acquire(dir)?;
        let sled_dir = dir.join("data");
        let storage = |source| SpoolError::Storage {
            path: sled_dir.clone(),
            source,
        };
        let config = tune(
            sled::Config::new()
                .path(&sled_dir)
                .cache_capacity(options.cache_capacity),
        );
        crate::sled_files::set_aside_damaged(&sled_dir, dir).map_err(io_err)?;
        let db = open_sled(&sled_dir, &config)?.map_err(storage)?;
        // The entries sled (db, conf, blobs/) and we (data/, ledger) may just have created
        // must survive power loss too: fsync both directories on every open (cheap), and the
        // parent when the spool directory itself is new.
        sync_dir(&sled_dir).map_err(io_err)?;
        sync_dir(dir).map_err(io_err)?;
        if created {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent).map_err(io_err)?;
            }
        }
        let trees = [
            db.open_tree("messages").map_err(storage)?,
            db.open_tree("dead_letter").map_err(storage)?,
            db.open_tree("quarantine").map_err(storage)?,
            db.open_tree("meta").map_err(storage)?,
        ];
        let mut scan = survive_panic(&sled_dir, || recovery::scan(&trees))?.map_err(storage)?;
        scan.index.compact();
        if !options.repair {
            scan.report.quarantine_total -= scan.report.quarantined_now;
            scan.report.quarantined_now = 0;
        }
        let sled_mark = trees[TreeId::Meta as usize]
            .get(keys::COMMIT_MARK)
            .map_err(storage)?
            .and_then(|raw| CommitMark::from_bytes(&raw))
            .unwrap_or_default();
        let checked = check_ledger(dir, sled_mark, &options, &mut scan)?;
        let index = Arc::new(Mutex::new(scan.index));
        let (changed_tx, changed) = watch::channel(0);
        let commit_stats = Arc::new(CommitStats::default());
        let poison = Arc::new(Poison::default());
        let sync = DiskSync::new(&sled_dir, options.faults).map_err(io_err)?;
        let mut writer = WriterState {
            db: db.clone(),
            trees: trees.clone(),
            sync,
            index: index.clone(),
            changed: changed_tx,
            id_hwm: scan.report.highest_id,
            mark: checked.mark,
            ledger: checked.ledger,
            stats: commit_stats.clone(),
            poison: poison.clone(),
            chunk_heads: scan.chunk_heads,
        };
        // Repairs (quarantine moves) are made durable before anyone can lease.
        let mut ops = if options.repair {
            scan.repairs
        } else {
            Vec::new()
        };
        ops.extend(checked.record_loss);
        let repairs = Job {
            ops,
            ..Job::with_capacity(0)
        };
        commit::commit_now(&mut writer, repairs).map_err(SpoolError::NotDurable)?;
        let committer = Committer::start(writer).map_err(io_err)?;
        let spool = Spool {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                committer,
                db: ManuallyDrop::new(db),
                trees: ManuallyDrop::new(trees),
                poison,
                index,
                next_id: AtomicU64::new(scan.report.highest_id.saturating_add(1)),
                quarantine_seq: AtomicU64::new(scan.next_quarantine_seq),
                commit_deadline: options.commit_deadline,
                chunked_ingest: options.chunked_ingest,
                changed,
                commit_stats,
                _lock: lock,
            }),
        };
        Ok((spool, scan.report))
    }

    /// The spool directory this handle opened, for messages and tools.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Spools `messages` as one durable batch and returns their ids, in order. Returns only
    /// once the batch is fsynced; on error nothing of the batch may be acknowledged.
    pub async fn enqueue(&self, messages: Vec<NewMessage>) -> Result<Vec<MessageId>> {
        let (ids, rx) = self.submit_enqueue(messages)?;
        self.await_commit(rx).await?;
        Ok(ids)
    }

    /// [`enqueue`](Self::enqueue) for threads outside an async runtime, with the same
    /// [`SpoolOptions::commit_deadline`].
    pub fn enqueue_blocking(&self, messages: Vec<NewMessage>) -> Result<Vec<MessageId>> {
        let (ids, rx) = self.submit_enqueue(messages)?;
        match recv_within(rx, self.inner.commit_deadline) {
            Some(reply) => wait(reply)?,
            None => self.commit_timed_out()?,
        }
        Ok(ids)
    }

    fn submit_enqueue(
        &self,
        messages: Vec<NewMessage>,
    ) -> Result<(Vec<MessageId>, oneshot::Receiver<Reply>)> {
        for m in &messages {
            keys::check_queue_name(&m.queue).map_err(|why| SpoolError::InvalidQueueName {
                name: m.queue.clone(),
                why,
            })?;
        }
        let now = now_ms();
        let count = messages.len() as u64;
        let limit = MessageId::MAX.0 + 1;
        let first = self
            .inner
            .next_id
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |next| {
                next.checked_add(count).filter(|end| *end <= limit)
            })
            .map_err(|next| SpoolError::IdsExhausted {
                next,
                max: MessageId::MAX.0,
            })?;
        // Chunks need each queue's ids consecutive: they are handed out queue by queue.
        let order: Vec<usize> = if self.inner.chunked_ingest {
            chunked::by_queue(&messages)
        } else {
            (0..messages.len()).collect()
        };
        let mut ids = vec![MessageId(0); messages.len()];
        for (n, &at) in order.iter().enumerate() {
            ids[at] = MessageId(first + n as u64);
        }
        let mut messages: Vec<Option<NewMessage>> = messages.into_iter().map(Some).collect();
        let in_id_order = order.iter().filter_map(|&at| {
            let m = messages[at].take()?;
            Some(Message {
                id: ids[at],
                queue: m.queue,
                created_ms: now,
                attempts: 0,
                due_ms: now,
                last_error: None,
                meta: m.meta,
                payload: m.payload,
            })
        });
        let mut job = Job::with_capacity(ids.len());
        if self.inner.chunked_ingest {
            chunked::add_new(&mut job, in_id_order.collect());
        } else {
            in_id_order.for_each(|msg| add_single(&mut job, msg));
        }
        Ok((ids, self.submit(job)?))
    }

    /// Leases up to `max` messages of `queue` that are due at `now_ms`. Each comes with its
    /// [`Lease`], which must then settle it with [`ack`](Self::ack), [`retry`](Self::retry),
    /// [`dead_letter`](Self::dead_letter) or [`release`](Self::release); leases live in
    /// memory only, so a restart releases them all.
    ///
    /// A poisoned spool leases nothing (its settlements could not be written). A read
    /// error gives back every lease this call took, so nothing stays in flight.
    pub fn lease(&self, queue: &str, max: usize, now_ms: u64) -> Result<Vec<Leased>> {
        self.lease_within(queue, max, u64::MAX, now_ms)
    }

    /// [`lease`](Self::lease), stopping before the message that would bring the leased
    /// payloads' sizes ([`Lease::bytes`]) over `max_bytes`, so a caller can bound the
    /// memory it holds in flight without reading a message first. The first message is
    /// leased whatever its size: one larger than the budget goes alone.
    pub fn lease_within(
        &self,
        queue: &str,
        max: usize,
        max_bytes: u64,
        now_ms: u64,
    ) -> Result<Vec<Leased>> {
        self.check_poison()?;
        let taken = self.index().take_due_within(queue, now_ms, max, max_bytes);
        self.read_taken(queue, taken)
    }

    /// Reads the records of ids just leased in the index. A read error gives back every
    /// lease of `taken`.
    pub(crate) fn read_taken(&self, queue: &str, taken: Vec<Taken>) -> Result<Vec<Leased>> {
        let mut leased: Vec<Leased> = Vec::with_capacity(taken.len());
        let shared: std::sync::Arc<str> = queue.into();
        let mut last_chunk = None;
        for (n, t) in taken.iter().enumerate() {
            let read = match t.home {
                None => self.read_single(queue, t.id),
                Some(home) => self.read_chunked(queue, t, home, &mut last_chunk),
            };
            match read {
                Ok(Some((message, location))) => leased.push(Leased {
                    lease: Lease::of(&shared, &message, location, t.slot.bytes),
                    message,
                }),
                Ok(None) => {}
                Err(e) => {
                    let mut index = self.index();
                    for t in &taken[n..] {
                        index.release(queue, t.id);
                    }
                    for done in &leased {
                        index.release(queue, done.lease.id.0);
                    }
                    return Err(e);
                }
            }
        }
        Ok(leased)
    }

    /// Reads a leased single record. `Ok(None)`: it was quarantined or is missing (both
    /// logged, and out of the index).
    fn read_single(&self, queue: &str, id: u64) -> Result<Option<(Message, Location)>> {
        let key = keys::message_key(queue, MessageId(id));
        let raw = self.inner.trees[TreeId::Messages as usize]
            .get(&key)
            .map_err(|e| self.storage(e))?;
        match raw.map(|raw| (recovery::check_message(&key, &raw), raw)) {
            Some((Ok(message), raw)) => {
                let location = Location::Single {
                    record_len: raw.len(),
                };
                Ok(Some((message, location)))
            }
            Some((Err(reason), raw)) => {
                self.quarantine_live(queue, id, &key, &raw, reason, None);
                Ok(None)
            }
            None => {
                self.missing(queue, id);
                Ok(None)
            }
        }
    }

    /// An indexed message whose record is gone (only a bug or a hand-edited spool does
    /// that): logged, and taken out of the index so it is not leased for ever.
    fn missing(&self, queue: &str, id: u64) {
        tracing::error!(
            queue,
            id,
            "indexed message has no record; dropping it from the index"
        );
        self.index().remove(queue, id);
    }

    /// Makes every write so far durable (acks included). Used at shutdown.
    pub async fn sync(&self) -> Result<()> {
        self.await_commit(self.submit(Job::with_capacity(0))?).await
    }

    /// Queues that hold at least one message, sorted.
    pub fn queue_names(&self) -> Vec<String> {
        self.index().queue_names()
    }

    /// How many waiting messages of `queue` are due at `now_ms`, at most `max` counted.
    pub fn due_count(&self, queue: &str, now_ms: u64, max: usize) -> usize {
        self.index().due_count(queue, now_ms, max)
    }

    /// When the earliest waiting message of `queue` is due, if any is waiting.
    pub fn next_due(&self, queue: &str) -> Option<u64> {
        self.index().next_due(queue)
    }

    /// The queues that had a message scheduled since the previous call (every recovered
    /// queue on the first): a dispatcher's work list after a [`Spool::watch_changes`] tick.
    pub fn take_touched_queues(&self) -> Vec<String> {
        self.index().take_touched()
    }

    /// Ticks after every commit that changed the schedule: dispatchers wait on it.
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.inner.changed.clone()
    }

    /// Every queue's figures at `now_ms` plus the dead-letter and quarantine counts, from memory
    /// (no disk read), for `/stats`, metrics and `spoolctl summary`.
    pub fn stats(&self, now_ms: u64) -> SpoolStats {
        let queues = {
            let index = self.index();
            index
                .queue_names()
                .into_iter()
                .map(|q| {
                    let stats = index.stats(&q, now_ms);
                    (q, stats)
                })
                .collect()
        };
        // Counted after the index lock is released: `len` walks a whole tree and may read
        // the disk, and every ingest, lease and commit needs that lock.
        SpoolStats {
            queues,
            dead_letter: self.inner.trees[TreeId::DeadLetter as usize].len() as u64,
            quarantine: self.inner.trees[TreeId::Quarantine as usize].len() as u64,
        }
    }

    /// Bytes of every queued message (waiting or leased, not dead letters), as recorded
    /// at enqueue: what `--max-spool-bytes` bounds. O(1); unlike [`disk_bytes`](Self::disk_bytes)
    /// it falls as messages leave (sled's files do not shrink).
    pub fn queued_bytes(&self) -> u64 {
        self.index().total_bytes()
    }

    /// (group commits, jobs committed, total µs spent in flush+fsync) since open.
    pub fn commit_stats(&self) -> (u64, u64, u64) {
        let s = &self.inner.commit_stats;
        (
            s.groups.load(Ordering::Relaxed),
            s.jobs.load(Ordering::Relaxed),
            s.sync_micros.load(Ordering::Relaxed),
        )
    }

    /// Registers `observe`, called on the commit thread after each group commit with its
    /// flush + fsync time and the number of durable writes it carried. It must be quick.
    /// Only the first registration takes effect; returns whether this one did.
    pub fn observe_commits(
        &self,
        observe: impl Fn(std::time::Duration, usize) + Send + Sync + 'static,
    ) -> bool {
        self.inner
            .commit_stats
            .observer
            .set(Box::new(observe))
            .is_ok()
    }

    /// Looks a queued message up by id.
    pub fn get(&self, id: MessageId) -> Result<Option<Message>> {
        let (queue, home) = {
            let index = self.index();
            let Some(queue) = index.find(id.0) else {
                return Ok(None);
            };
            let home = index.chunks.home(&queue, id.0);
            (queue, home)
        };
        if let Some(home) = home {
            return self.get_chunked(&queue, id, home);
        }
        let key = keys::message_key(&queue, id);
        match self.inner.trees[TreeId::Messages as usize].get(&key) {
            Ok(Some(raw)) => Ok(recovery::check_message(&key, &raw).ok()),
            Ok(None) => Ok(None),
            Err(e) => Err(self.storage(e)),
        }
    }

    /// Every dead-lettered message, oldest id first.
    pub fn dead_letters(&self) -> Result<Vec<Message>> {
        let mut out = Vec::new();
        for item in self.inner.trees[TreeId::DeadLetter as usize].iter() {
            let (_, raw) = item.map_err(|e| self.storage(e))?;
            if let Ok(msg) = record::decode::<Message>(&raw) {
                out.push(msg);
            }
        }
        Ok(out)
    }

    /// Every quarantined record, in the order it was set aside.
    pub fn quarantined(&self) -> Result<Vec<QuarantineEntry>> {
        let mut out = Vec::new();
        for item in self.inner.trees[TreeId::Quarantine as usize].iter() {
            let (key, raw) = item.map_err(|e| self.storage(e))?;
            match record::decode::<QuarantineEntry>(&raw) {
                Ok(entry) => out.push(entry),
                Err(e) => out.push(QuarantineEntry {
                    tree: "Quarantine".into(),
                    key: key.to_vec(),
                    raw: raw.to_vec(),
                    reason: format!("quarantine entry itself is damaged: {e}"),
                    at_ms: 0,
                }),
            }
        }
        Ok(out)
    }

    /// Total bytes of the spool's files on disk.
    pub fn disk_bytes(&self) -> Result<u64> {
        self.inner.db.size_on_disk().map_err(|e| self.storage(e))
    }

    /// Moves a record that failed its checks after it was leased to quarantine, with its
    /// raw bytes. A chunked message (`home`) has its record's bytes set aside and its bit
    /// set: its chunk stays for its neighbours.
    pub(crate) fn quarantine_live(
        &self,
        queue: &str,
        id: u64,
        key: &[u8],
        raw: &[u8],
        reason: String,
        home: Option<Home>,
    ) {
        tracing::error!(queue, id, %reason, "quarantining corrupt spool record");
        let seq = self.inner.quarantine_seq.fetch_add(1, Ordering::Relaxed);
        let mut job = Job::with_capacity(2);
        let [put, _delete] = recovery::quarantine_ops(seq, TreeId::Messages, key, raw, reason);
        job.ops.push(put);
        job.ops
            .push(crate::settle::remove_op(queue, MessageId(id), home));
        job.effects.push(Effect::Forget {
            queue: queue.to_owned(),
            id,
        });
        // Nobody waits: the record is out of the index already (leased), and the move is
        // durable with the next group.
        let _ = self.submit(job);
    }

    pub(crate) fn submit(&self, mut job: Job) -> Result<oneshot::Receiver<Reply>> {
        self.check_poison()?;
        let (tx, rx) = oneshot::channel();
        job.reply = Some(tx);
        self.inner
            .committer
            .submit(job)
            .map_err(|_| SpoolError::WriterStopped)?;
        Ok(rx)
    }

    /// Waits for the answer to a submitted job, at most `commit_deadline`. A commit that
    /// takes longer is stuck in an fsync or a sled flush that may never return: the spool is
    /// poisoned, so this write and every later one fail at once instead of hanging (the job
    /// may still complete; a write reported failed that landed after all is at worst a
    /// duplicate when the client retries, never a false acknowledgement).
    pub(crate) async fn await_commit(&self, rx: oneshot::Receiver<Reply>) -> Result<()> {
        let deadline = self.inner.commit_deadline;
        match tokio::time::timeout(deadline, rx).await {
            Ok(reply) => wait(reply),
            Err(_) => self.commit_timed_out(),
        }
    }

    /// A commit outlived `commit_deadline`: the disk (or a wedged sled) hangs, so the spool
    /// is poisoned and the caller gets that error instead of waiting for ever.
    fn commit_timed_out(&self) -> Result<()> {
        let deadline = self.inner.commit_deadline;
        let cause = format!(
            "a group commit did not finish within {deadline:?} (an fsync or sled flush \
             hung: check the disk)"
        );
        tracing::error!(dir = %self.inner.dir.display(), %cause, "spool poisoned");
        self.inner.poison.set(&cause);
        self.check_poison()
    }

    /// `Err(Poisoned)` once a durability error poisoned the spool (see [`Poison`]).
    pub(crate) fn check_poison(&self) -> Result<()> {
        match self.inner.poison.refusal() {
            Some(refusal) => Err(refused(refusal)),
            None => Ok(()),
        }
    }

    /// Why the spool refuses writes, if it does: a durability error poisoned it, and only a
    /// reopen (a daemon restart) reads the disk again. `/readyz` answers 503 while this is
    /// `Some`.
    pub fn poisoned(&self) -> Option<String> {
        self.check_poison().err().map(|e| e.to_string())
    }

    pub(crate) fn index(&self) -> MutexGuard<'_, Index> {
        self.inner.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn storage(&self, source: sled::Error) -> SpoolError {
        SpoolError::Storage {
            path: self.inner.dir.join("data"),
            source,
        }
    }
}

/// The commit mark the writer starts from, the ledger it keeps, and the quarantine
/// writes that record an accepted loss.
struct LedgerCheck {
    mark: CommitMark,
    ledger: Option<Ledger>,
    record_loss: Vec<Op>,
}

/// Compares sled's last commit mark with the ledger's (see `ledger.rs`): refuses on a
/// loss unless the options accept it, and keeps new ids above every acknowledged one.
fn check_ledger(
    dir: &Path,
    sled_mark: CommitMark,
    options: &SpoolOptions,
    scan: &mut recovery::Scan,
) -> Result<LedgerCheck> {
    let io_err = |source| SpoolError::Io {
        path: dir.join(ledger::FILE_NAME),
        source,
    };
    let (ledger, found) = Ledger::open(dir).map_err(io_err)?;
    // A ledger that cannot be trusted is replaced by sled's mark: detection restarts there.
    let restart = |ledger: &Ledger| -> Result<CommitMark> {
        ledger.reset(sled_mark).map_err(io_err)?;
        sync_dir(dir).map_err(io_err)?;
        Ok(sled_mark)
    };
    let ledger_mark = match found {
        ledger::Found::Mark(mark) => mark,
        ledger::Found::Damaged(raw) => {
            tracing::warn!(dir = %dir.display(), bytes = raw.len(), "spool ledger is damaged; rewritten");
            restart(&ledger)?
        }
        ledger::Found::Missing => {
            if sled_mark.seq > 0 {
                tracing::warn!(dir = %dir.display(), "spool ledger was missing; rewritten");
            }
            restart(&ledger)?
        }
    };
    // Ids the ledger saw acknowledged must never be handed out again.
    scan.report.highest_id = scan.report.highest_id.max(ledger_mark.highest_id);
    let mut check = LedgerCheck {
        mark: sled_mark.max(ledger_mark),
        ledger: Some(ledger),
        record_loss: Vec::new(),
    };
    let Some(lost) = ledger::compare(sled_mark, ledger_mark) else {
        return Ok(check);
    };
    if !options.accept_lost_writes {
        return Err(SpoolError::LostWrites {
            path: dir.to_path_buf(),
            lost,
        });
    }
    tracing::error!(dir = %dir.display(), %lost, "spool lost acknowledged writes");
    if options.repair {
        let entry = QuarantineEntry {
            tree: "ledger".into(),
            key: b"lost_writes".to_vec(),
            raw: std::fs::read(dir.join(ledger::FILE_NAME)).unwrap_or_default(),
            reason: lost.to_string(),
            at_ms: now_ms(),
        };
        let seq = scan.next_quarantine_seq;
        scan.next_quarantine_seq += 1;
        check.record_loss.push(Op::Put(
            TreeId::Quarantine,
            keys::id_key(seq).to_vec(),
            record::encode(&entry),
        ));
        scan.report.quarantined_now += 1;
        scan.report.quarantine_total += 1;
    } else {
        // Inspection only: keep the ledger's evidence for the repairing open.
        check.mark = sled_mark;
        check.ledger = None;
    }
    scan.report.lost_writes = Some(lost);
    Ok(check)
}

/// Opens sled, waiting out the file lock of this process's previous instance. We hold
/// `spool.lock`, so nobody else can hold sled's lock on `data/db`; but when a spool is
/// dropped and reopened in one process, sled's flusher thread may still be letting go of
/// it for a moment.
fn open_sled(sled_dir: &Path, config: &sled::Config) -> Result<sled::Result<sled::Db>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let opened = survive_panic(sled_dir, || config.open())?;
        let lock_held = matches!(&opened, Err(sled::Error::Io(e))
            if e.to_string().contains("could not acquire lock"));
        if !lock_held || std::time::Instant::now() >= deadline {
            return Ok(opened);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// sled 0.34 asserts its way through recovery: a damaged database file can make it panic
/// rather than return an error. A daemon must not crash on a bad disk, so the panic is
/// turned into an error that tells the operator what to do.
fn survive_panic<T>(sled_dir: &Path, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let detail = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        SpoolError::Unrecoverable {
            path: sled_dir.to_path_buf(),
            detail,
        }
    })
}

/// The write that marks `msg` as large (see [`keys::LARGE_RECORD`]); it rides in the same
/// commit as the message.
pub(crate) fn mark_large(msg: &Message) -> Op {
    Op::Put(
        TreeId::Meta,
        keys::large_marker(msg.id.0),
        msg.queue.as_bytes().to_vec(),
    )
}

/// Adds `msg` to `job` as a single record (with its large-record marker if it needs one).
pub(crate) fn add_single(job: &mut Job, msg: Message) {
    let key = keys::message_key(&msg.queue, msg.id);
    let record = record::encode(&msg);
    if record.len() >= keys::LARGE_RECORD {
        job.ops.push(mark_large(&msg));
        job.undo
            .push(Op::Del(TreeId::Meta, keys::large_marker(msg.id.0)));
    }
    job.undo.push(Op::Del(TreeId::Messages, key.clone()));
    job.ops.push(Op::Put(TreeId::Messages, key, record));
    job.effects.push(schedule(&msg));
}

pub(crate) fn schedule(msg: &Message) -> Effect {
    Effect::Schedule {
        queue: msg.queue.clone(),
        id: msg.id.0,
        due_ms: msg.due_ms,
        slot: recovery::slot_of(msg),
    }
}

/// Wakes the thread blocked in [`recv_within`].
struct Unpark(std::thread::Thread);

impl std::task::Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// `rx.blocking_recv()` that gives up after `limit` (`None`).
fn recv_within(
    mut rx: oneshot::Receiver<Reply>,
    limit: std::time::Duration,
) -> Option<Result<Reply, oneshot::error::RecvError>> {
    use std::future::Future;
    use std::task::{Context, Poll};
    let deadline = std::time::Instant::now() + limit;
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(reply) = std::pin::Pin::new(&mut rx).poll(&mut cx) {
            return Some(reply);
        }
        let left = deadline.checked_duration_since(std::time::Instant::now())?;
        std::thread::park_timeout(left);
    }
}

pub(crate) fn wait(reply: Result<Reply, oneshot::error::RecvError>) -> Result<()> {
    match reply {
        Ok(Ok(())) => Ok(()),
        Ok(Err(refusal)) => Err(refused(refusal)),
        Err(_) => Err(SpoolError::WriterStopped),
    }
}

fn refused(refusal: Refusal) -> SpoolError {
    match refusal {
        Refusal::NotDurable(why) => SpoolError::NotDurable(why),
        Refusal::Poisoned { since_ms, cause } => SpoolError::Poisoned { since_ms, cause },
    }
}
