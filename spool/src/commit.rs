//! Group commit: one thread owns every durable write.
//!
//! Callers hand it a [`Job`] (a list of tree writes plus the index changes they imply) and
//! wait on a oneshot. The thread takes whatever jobs queued up while its previous sync
//! ran, applies them atomically (one sled batch, or a transaction across trees), flushes,
//! fsyncs (see `durability.rs`), and only then updates the in-memory index and answers
//! every caller. Concurrent producers therefore share one fsync, and the index never shows
//! a write a crash could undo.
//! The index is updated here rather than by the caller because a caller may stop waiting
//! (an HTTP client hangs up) after its messages became durable: they must still be sent.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use tokio::sync::{oneshot, watch};

use crate::chunk_table::{Home, SettleWrites};
use crate::durability::DiskSync;
use crate::index::{Index, Slot};
use crate::keys;
use crate::ledger::{CommitMark, Ledger};

/// How far ahead of the highest used id the persisted high-water mark is set. Ids skipped
/// after a crash are harmless; only reuse would be wrong.
const ID_RESERVATION: u64 = 1 << 16;

/// How long acks' bitmaps wait for a group to carry them before the commit thread writes
/// them alone (not fsynced, as v1's acks: sled's background flush carries them).
const SETTLE_TICK: std::time::Duration = std::time::Duration::from_millis(50);

/// Above this many bytes a group is committed without waiting for more jobs.
const MAX_GROUP_BYTES: usize = 32 << 20;

/// The trees, in the order [`Trees`] holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeId {
    Messages = 0,
    DeadLetter = 1,
    Quarantine = 2,
    Meta = 3,
}

pub type Trees = [sled::Tree; 4];

#[derive(Debug)]
pub enum Op {
    Put(TreeId, Vec<u8>, Vec<u8>),
    Del(TreeId, Vec<u8>),
    /// Sets a chunked message's settled bit, in the same batch as the job's other writes
    /// (its new copy, if it moves). The commit thread turns it into the chunk's bitmap
    /// write (or the chunk's deletion) when it builds the group: see `chunk_table.rs`.
    Settle(String, Home),
}

/// How the in-memory index changes once a job is durable.
#[derive(Debug)]
pub enum Effect {
    /// A message (new or rescheduled) waits in `queue` until `due_ms`.
    Schedule {
        queue: String,
        id: u64,
        due_ms: u64,
        slot: Slot,
    },
    /// A message left the queue (dead-lettered, quarantined, purged).
    Forget { queue: String, id: u64 },
    /// A new chunk of `count` messages (each also scheduled).
    AddChunk {
        queue: String,
        first_id: u64,
        count: u16,
    },
}

/// Why a job was not made durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// This group's write, flush or fsync failed (the cause, with the path where known).
    NotDurable(String),
    /// An earlier group failed: the spool is poisoned (see [`Poison`]).
    Poisoned { since_ms: u64, cause: String },
}

pub type Reply = Result<(), Refusal>;

/// Set by the first durability error and never cleared while the spool is open.
///
/// After a failed flush or fsync the kernel may have dropped the dirty pages and cleared
/// the error, so a later fsync can report success for data that is gone ("fsyncgate",
/// PostgreSQL 2018); and sled 0.34 can be left wedged (a blob write that fails leaks a
/// log-buffer reservation, and every later `flush` waits for it for ever). Neither can be
/// repaired in-process: from the first error on, every write is refused, and only a new
/// open (a daemon restart) reads the disk again.
#[derive(Debug, Default)]
pub struct Poison {
    /// Write-once: checking it (every write, lease and ack) is one atomic load.
    state: OnceLock<(u64, String)>,
}

impl Poison {
    /// Records the first durability error; later ones keep the first cause.
    pub fn set(&self, cause: &str) {
        let _ = self.state.set((crate::now_ms(), cause.to_owned()));
    }

    pub fn is_set(&self) -> bool {
        self.state.get().is_some()
    }

    pub fn refusal(&self) -> Option<Refusal> {
        self.state.get().map(|(since_ms, cause)| Refusal::Poisoned {
            since_ms: *since_ms,
            cause: cause.clone(),
        })
    }
}

pub struct Job {
    pub ops: Vec<Op>,
    pub effects: Vec<Effect>,
    /// Writes that take the job back if the sync fails (new messages are deleted again).
    pub undo: Vec<Op>,
    pub reply: Option<oneshot::Sender<Reply>>,
    /// A wake-up from an ack: acks left bitmaps to write (see [`SETTLE_TICK`]).
    pub settle_tick: bool,
}

impl Op {
    fn tree(&self) -> TreeId {
        match self {
            Op::Put(tree, _, _) | Op::Del(tree, _) => *tree,
            Op::Settle(..) => TreeId::Messages,
        }
    }
}

impl Job {
    pub fn with_capacity(n: usize) -> Job {
        Job {
            ops: Vec::with_capacity(n),
            effects: Vec::with_capacity(n),
            undo: Vec::new(),
            reply: None,
            settle_tick: false,
        }
    }

    /// The wake-up an ack sends when it leaves the first dirty bitmap.
    pub fn settle_tick() -> Job {
        Job {
            settle_tick: true,
            ..Job::with_capacity(0)
        }
    }

    fn bytes(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Put(_, k, v) => k.len() + v.len(),
                Op::Del(_, k) => k.len(),
                Op::Settle(..) => 16,
            })
            .sum()
    }

    fn highest_new_id(&self) -> u64 {
        self.effects
            .iter()
            .map(|e| match e {
                Effect::Schedule { id, .. } => *id,
                Effect::Forget { .. } | Effect::AddChunk { .. } => 0,
            })
            .max()
            .unwrap_or(0)
    }
}

/// The meta writes that ride along with a group: the commit mark always, the id
/// high-water mark when it moved.
struct MetaWrites {
    mark: CommitMark,
    hwm: Option<u64>,
}

/// A group's writes in the order they are applied: what acks left (`settles`) first, then
/// the jobs'. Where a job writes a key an ack deletes (an import of a just-delivered id),
/// the job's write must win: the index schedules what the job wrote, and a record kept
/// costs at most a duplicate, while a record deleted under its index entry is lost.
fn in_write_order<'a>(group: &'a [Job], settles: &'a [Op]) -> impl Iterator<Item = &'a Op> {
    settles.iter().chain(group.iter().flat_map(|job| &job.ops))
}

/// The common case (enqueue, retry) touches only the messages tree: one sled batch is
/// atomic there and much cheaper than a transaction. The meta writes follow the batch in
/// sled's log, so a log cut short before them also lost the group (which is what the
/// ledger check at open relies on); recovery takes the max of the id high-water mark and
/// the ids it scans, so that need not be atomic with the messages.
fn write_messages_batch(
    state: &WriterState,
    group: &[Job],
    settles: &[Op],
    meta: &MetaWrites,
) -> sled::Result<()> {
    let mut batch = sled::Batch::default();
    for op in in_write_order(group, settles) {
        match op {
            Op::Put(_, key, value) => batch.insert(key.as_slice(), value.as_slice()),
            Op::Del(_, key) => batch.remove(key.as_slice()),
            Op::Settle(..) => {}
        }
    }
    state.trees[TreeId::Messages as usize].apply_batch(batch)?;
    let meta_tree = &state.trees[TreeId::Meta as usize];
    if let Some(hwm) = meta.hwm {
        meta_tree.insert(keys::ID_HWM, &hwm.to_be_bytes())?;
    }
    meta_tree.insert(keys::COMMIT_MARK, &meta.mark.to_bytes())?;
    Ok(())
}

/// Walks sled's tree to each chunk-area key just written or deleted, so that the commit
/// thread, not a reader, splits the leaves those writes left oversized (and starts the
/// merges of those the deletes left nearly empty, which sled also leaves to the next walk).
///
/// sled splits a leaf of more than 16 entries on the next walk that passes it, not on the
/// write that made it so. A leaf of chunks is up to 1 MiB, a blob file of its own, and
/// splitting it writes two new blobs, each fsynced: milliseconds. When that next walk was a
/// lease's `get`, the dispatcher's thread stalled on those fsyncs: in P5's drain, half of
/// the draining thread's context switches, and from 4 to 66 splits in one drain of 200 000
/// messages (docs/performance.md). Single records (v1) are left alone: their leaves are
/// small and written to the log, not to blob files.
///
/// A walk that fails fails the commit like a failed write, and the spool refuses writes
/// from then on. It must not be passed over: a split whose blob write failed can leave
/// sled's log waiting for ever on the reservation it leaked, and the commit's flush would
/// then hang instead of failing.
fn split_ahead<'a>(tree: &sled::Tree, ops: impl IntoIterator<Item = &'a Op>) -> sled::Result<()> {
    for op in ops {
        if let Op::Put(TreeId::Messages, key, _) | Op::Del(TreeId::Messages, key) = op {
            if key.first() == Some(&keys::CHUNK_AREA) {
                tree.get(key)?;
            }
        }
    }
    Ok(())
}

/// Moves between trees (dead-letter, quarantine) must be all or nothing across trees.
fn write_transaction(
    state: &WriterState,
    group: &[Job],
    settles: &[Op],
    meta: &MetaWrites,
) -> sled::Result<()> {
    let written = state.trees.as_slice().transaction(|views| {
        for op in in_write_order(group, settles) {
            match op {
                Op::Put(tree, key, value) => {
                    views[*tree as usize].insert(key.as_slice(), value.as_slice())?;
                }
                Op::Del(tree, key) => {
                    views[*tree as usize].remove(key.as_slice())?;
                }
                Op::Settle(..) => {}
            }
        }
        if let Some(hwm) = meta.hwm {
            views[TreeId::Meta as usize].insert(keys::ID_HWM, &hwm.to_be_bytes())?;
        }
        views[TreeId::Meta as usize].insert(keys::COMMIT_MARK, &meta.mark.to_bytes())?;
        Ok::<(), ConflictableTransactionError<()>>(())
    });
    match written {
        Ok(()) => Ok(()),
        Err(TransactionError::Storage(e)) => Err(e),
        Err(TransactionError::Abort(())) => {
            Err(sled::Error::Unsupported("transaction aborted".into()))
        }
    }
}

/// Called after each group commit with its flush + fsync time and its number of jobs.
pub type CommitObserver = Box<dyn Fn(std::time::Duration, usize) + Send + Sync>;

/// Figures about group commits, read by metrics.
#[derive(Default)]
pub struct CommitStats {
    pub groups: std::sync::atomic::AtomicU64,
    pub jobs: std::sync::atomic::AtomicU64,
    pub sync_micros: std::sync::atomic::AtomicU64,
    /// Set once by [`crate::Spool::observe_commits`] (the daemon's histograms).
    pub observer: std::sync::OnceLock<CommitObserver>,
}

impl std::fmt::Debug for CommitStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitStats")
            .field("groups", &self.groups)
            .field("jobs", &self.jobs)
            .field("sync_micros", &self.sync_micros)
            .finish_non_exhaustive()
    }
}

/// How long `stop` waits for the commit thread to finish its queued jobs. A healthy one
/// takes milliseconds; one stuck in a sled flush that can never finish (see [`Poison`])
/// is left behind so that shutdown still completes.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Committer {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the thread ends (its sender is dropped on the way out, panics
    /// included), so `stop` waits on it with a timeout instead of polling `is_finished`.
    /// (The mutex only makes the spool `Sync`; `stop` owns it.)
    finished: Option<Mutex<mpsc::Receiver<()>>>,
}

pub struct WriterState {
    pub db: sled::Db,
    pub trees: Trees,
    pub sync: DiskSync,
    pub index: Arc<Mutex<Index>>,
    pub changed: watch::Sender<u64>,
    pub id_hwm: u64,
    /// The last durable commit, as written to sled's meta tree and the ledger.
    pub mark: CommitMark,
    /// `None` while an accepted loss is only being inspected (`spoolctl verify` without
    /// `--repair`): the ledger keeps its evidence until the loss is recorded.
    pub ledger: Option<Ledger>,
    pub stats: Arc<CommitStats>,
    pub poison: Arc<Poison>,
    /// The chunk heads on disk, as counted under [`keys::CHUNK_HEADS`].
    pub chunk_heads: u64,
}

impl Committer {
    pub fn start(state: WriterState) -> std::io::Result<Committer> {
        let (tx, rx) = mpsc::channel();
        let (finished_tx, finished) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || {
                let _finished = finished_tx;
                run(state, rx)
            })?;
        Ok(Committer {
            tx: Some(tx),
            thread: Some(thread),
            finished: Some(Mutex::new(finished)),
        })
    }

    pub fn submit(&self, job: Job) -> Result<(), Job> {
        match &self.tx {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }

    /// Finishes queued jobs and stops the thread, waiting at most [`STOP_TIMEOUT`].
    pub fn stop(&mut self) {
        self.tx.take();
        let Some(thread) = self.thread.take() else {
            return;
        };
        let ended = match self.finished.take() {
            Some(finished) => matches!(
                finished
                    .into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .recv_timeout(STOP_TIMEOUT),
                Err(mpsc::RecvTimeoutError::Disconnected)
            ),
            None => true,
        };
        if !ended {
            tracing::error!(
                waited = ?STOP_TIMEOUT,
                "the spool's commit thread is stuck (in a sled flush after a disk error?); \
                 leaving it behind: everything acknowledged was fsynced before its answer"
            );
            return;
        }
        let _ = thread.join();
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(mut state: WriterState, rx: mpsc::Receiver<Job>) {
    serve(&mut state, rx);
    if let Some(ledger) = &state.ledger {
        if let Err(e) = ledger.sync() {
            tracing::warn!(error = %e, path = %ledger.path().display(), "could not sync the spool ledger");
        }
    }
}

fn serve(state: &mut WriterState, rx: mpsc::Receiver<Job>) {
    // When acks left bitmaps to write: the time to write them if no group comes first.
    let mut settle_due: Option<Instant> = None;
    loop {
        let next = match settle_due {
            Some(due) => rx.recv_timeout(due.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        let first = match next {
            Ok(job) if job.settle_tick => {
                settle_due.get_or_insert_with(|| Instant::now() + SETTLE_TICK);
                continue;
            }
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                write_settles(state);
                settle_due = None;
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut bytes = first.bytes();
        let mut group = vec![first];
        while bytes < MAX_GROUP_BYTES {
            match rx.try_recv() {
                Ok(job) if job.settle_tick => {}
                Ok(job) => {
                    bytes += job.bytes();
                    group.push(job);
                }
                Err(_) => break,
            }
        }
        // This group carries every bitmap the acks left.
        settle_due = None;
        // A poisoned spool touches sled no more: a flush could wait for ever, and a
        // success could be a lie (see `Poison`).
        let result = match state.poison.refusal() {
            Some(refusal) => Err(refusal),
            None => commit_group(state, &group).map_err(Refusal::NotDurable),
        };
        let result = result.map(|deleted| apply_effects(state, &mut group, deleted));
        match &result {
            Err(Refusal::NotDurable(e)) => {
                tracing::error!(error = %e, jobs = group.len(), "spool group commit failed; the spool refuses writes until it is reopened (restart the daemon)");
                state.poison.set(e);
                undo_group(state, &group);
            }
            Err(Refusal::Poisoned { .. }) | Ok(()) => {}
        }
        for job in &mut group {
            if let Some(reply) = job.reply.take() {
                let _ = reply.send(result.clone());
            }
        }
    }
    // Closing: what the acks left goes to sled before the spool's last flush.
    write_settles(state);
}

/// The chunk head count after `added` heads were written and `deleted` removed; when it
/// changes, its write joins `ops` (the same batch as the heads').
fn count_heads(state: &WriterState, added: usize, deleted: usize, ops: &mut Vec<Op>) -> u64 {
    let heads = (state.chunk_heads + added as u64).saturating_sub(deleted as u64);
    if heads != state.chunk_heads {
        let count = heads.to_be_bytes().to_vec();
        ops.push(Op::Put(TreeId::Messages, keys::CHUNK_HEADS.to_vec(), count));
    }
    heads
}

/// Writes what acks left (bitmaps, deletes of single records), alone: not fsynced (a crash
/// before sled's next flush redelivers those messages, never loses one). Large-record
/// markers go first, in their own batch, as `acked_singles.rs` explains.
fn write_settles(state: &mut WriterState) {
    if state.poison.is_set() {
        return;
    }
    let mut writes = lock_index(state).settle_writes(&[]);
    if writes.ops.is_empty() {
        return;
    }
    let heads = count_heads(state, 0, writes.deleted.len(), &mut writes.ops);
    let (mut markers, mut messages) = (sled::Batch::default(), sled::Batch::default());
    let mut any_marker = false;
    for op in &writes.ops {
        match (op, op.tree()) {
            (Op::Put(_, key, value), TreeId::Messages) => {
                messages.insert(key.as_slice(), value.as_slice())
            }
            (Op::Del(_, key), TreeId::Messages) => messages.remove(key.as_slice()),
            (Op::Del(_, key), TreeId::Meta) => {
                markers.remove(key.as_slice());
                any_marker = true;
            }
            _ => debug_assert!(
                false,
                "settle writes touch only messages and markers: {op:?}"
            ),
        }
    }
    // An empty sled batch still costs a log record.
    let written = match any_marker {
        true => state.trees[TreeId::Meta as usize].apply_batch(markers),
        false => Ok(()),
    }
    .and_then(|()| state.trees[TreeId::Messages as usize].apply_batch(messages))
    .and_then(|()| split_ahead(&state.trees[TreeId::Messages as usize], &writes.ops));
    match written {
        Ok(()) => {
            state.chunk_heads = heads;
            forget_deleted(&mut lock_index(state), writes.deleted);
        }
        Err(e) => {
            let cause = format!("sled write of settle bitmaps failed: {e}");
            tracing::error!(error = %cause, "the spool refuses writes until it is reopened (restart the daemon)");
            state.poison.set(&cause);
        }
    }
}

fn lock_index(state: &WriterState) -> std::sync::MutexGuard<'_, Index> {
    state.index.lock().unwrap_or_else(|e| e.into_inner())
}

fn forget_deleted(index: &mut Index, deleted: Vec<(String, u64)>) {
    for (queue, first_id) in deleted {
        index.chunks.forget(&queue, first_id);
    }
}

/// The chunked messages a group's jobs settle (moves, quarantines, purges).
fn moves(group: &[Job]) -> Vec<(&str, Home)> {
    group
        .iter()
        .flat_map(|job| &job.ops)
        .filter_map(|op| match op {
            Op::Settle(queue, home) => Some((queue.as_str(), *home)),
            _ => None,
        })
        .collect()
}

/// Commits one job on the calling thread, before the commit thread starts (open-time
/// repairs: `open` may be called from inside an async runtime, where it must not block on
/// a channel).
pub fn commit_now(state: &mut WriterState, job: Job) -> Result<(), String> {
    if job.ops.is_empty() {
        return Ok(());
    }
    commit_group(state, std::slice::from_ref(&job)).map(|_| ())
}

/// Writes, flushes and fsyncs one group; returns the chunks it deleted.
fn commit_group(state: &mut WriterState, group: &[Job]) -> Result<Vec<(String, u64)>, String> {
    let hwm = group.iter().map(Job::highest_new_id).max().unwrap_or(0);
    let SettleWrites {
        ops: mut settles,
        deleted,
    } = lock_index(state).settle_writes(&moves(group));
    let added = group
        .iter()
        .flat_map(|job| &job.effects)
        .filter(|effect| matches!(effect, Effect::AddChunk { .. }))
        .count();
    let heads = count_heads(state, added, deleted.len(), &mut settles);
    let writes = group.iter().any(|job| !job.ops.is_empty()) || !settles.is_empty();
    // The high-water mark is reserved ahead in steps, so most groups write only messages.
    let meta = MetaWrites {
        mark: CommitMark {
            seq: state.mark.seq + u64::from(writes),
            highest_id: state.mark.highest_id.max(hwm),
        },
        hwm: (hwm > state.id_hwm).then_some(hwm.saturating_add(ID_RESERVATION)),
    };
    if writes {
        let single_tree = group
            .iter()
            .flat_map(|job| &job.ops)
            .chain(&settles)
            .all(|op| op.tree() == TreeId::Messages);
        if single_tree {
            write_messages_batch(state, group, &settles, &meta)
        } else {
            write_transaction(state, group, &settles, &meta)
        }
        .and_then(|()| {
            let messages = &state.trees[TreeId::Messages as usize];
            split_ahead(messages, in_write_order(group, &settles))
        })
        .map_err(|e| format!("sled write failed: {e}"))?;
    }
    let started = Instant::now();
    state
        .db
        .flush()
        .map_err(|e| format!("sled flush failed: {e}"))?;
    state
        .sync
        .sync()
        .map_err(|e| format!("fsync failed: {e}"))?;
    record_stats(&state.stats, group.len(), started);
    state.chunk_heads = heads;
    if let Some(hwm) = meta.hwm {
        state.id_hwm = hwm;
    }
    if writes {
        state.mark = meta.mark;
        if let Some(ledger) = &state.ledger {
            if let Err(e) = ledger.write(meta.mark) {
                // The commit itself is durable; only the check at the next open is weaker.
                tracing::warn!(error = %e, path = %ledger.path().display(), "could not update the spool ledger");
            }
        }
    }
    Ok(deleted)
}

fn record_stats(stats: &CommitStats, jobs: usize, started: Instant) {
    use std::sync::atomic::Ordering::Relaxed;
    stats.groups.fetch_add(1, Relaxed);
    stats.jobs.fetch_add(jobs as u64, Relaxed);
    let took = started.elapsed();
    stats
        .sync_micros
        .fetch_add(took.as_micros() as u64, Relaxed);
    if let Some(observe) = stats.observer.get() {
        observe(took, jobs);
    }
}

/// Best effort: a failed sync left the group's writes in sled's memory; take back new
/// messages so a later successful sync cannot make unacknowledged data reappear.
fn undo_group(state: &WriterState, group: &[Job]) {
    for op in group.iter().flat_map(|job| &job.undo) {
        let tree = |t: &TreeId| &state.trees[*t as usize];
        let _ = match op {
            Op::Put(t, k, v) => tree(t).insert(k.as_slice(), v.as_slice()).map(|_| ()),
            Op::Del(t, k) => tree(t).remove(k.as_slice()).map(|_| ()),
            Op::Settle(..) => Ok(()),
        };
    }
}

fn apply_effects(state: &WriterState, group: &mut [Job], deleted: Vec<(String, u64)>) {
    let mut index = lock_index(state);
    for (queue, home) in moves(group) {
        index.chunks.settle_moved(queue, home);
    }
    forget_deleted(&mut index, deleted);
    for effect in group.iter_mut().flat_map(|job| job.effects.drain(..)) {
        match effect {
            Effect::Schedule {
                queue,
                id,
                due_ms,
                slot,
            } => index.insert(&queue, id, due_ms, slot),
            Effect::Forget { queue, id } => {
                index.remove(&queue, id);
            }
            Effect::AddChunk {
                queue,
                first_id,
                count,
            } => index
                .chunks
                .add(&queue, first_id, crate::chunk::SettleBitmap::new(count)),
        }
    }
    drop(index);
    state.changed.send_modify(|generation| *generation += 1);
}
