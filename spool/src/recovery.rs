//! Opening an existing spool: one scan that rebuilds the index and sets corrupt records
//! aside.
//!
//! Every record of every tree is decoded once. What does not decode, or whose key does
//! not match its contents, is moved to quarantine with its raw bytes (never dropped). A
//! message found both queued and dead-lettered keeps its dead-letter copy: the dead-letter
//! area is the one an operator looks at. The commit thread moves a message to dead letter
//! in one transaction, so only a spool written some other way can hold both copies; the
//! scan still resolves it rather than deliver a message an operator set aside.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::commit::{Op, TreeId, Trees};
use crate::index::{Index, Slot};
use crate::keys;
use crate::record::{self, Message};
use crate::{now_ms, QuarantineEntry};

/// What an open found, for the startup log line and `spoolctl`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Queue name → (messages, payload bytes).
    pub queues: BTreeMap<String, (u64, u64)>,
    /// Messages in the dead-letter tree.
    pub dead_letter: u64,
    /// Records moved to quarantine by this open.
    pub quarantined_now: u64,
    /// Records in quarantine after this open, old and new.
    pub quarantine_total: u64,
    /// Messages found both queued and dead-lettered; the queued copy was removed.
    pub duplicates_resolved: u64,
    /// Chunks found without their head (spool v2) whose own header was sound: the head was
    /// written again from it, so their messages are delivered.
    pub heads_restored: u64,
    /// Whether this open walked the chunks for one that lost its head: the heads found did
    /// not match their count (`keys::CHUNK_HEADS`). A healthy open does not.
    pub chunks_walked: bool,
    /// The highest id found or recorded; new ids continue above it.
    pub highest_id: u64,
    /// Every record that failed its checks, whether or not it was moved (see
    /// `SpoolOptions::repair`).
    pub damaged: Vec<DamagedRecord>,
    /// Large messages lost with their sled blob file (ids; see [`keys::LARGE_RECORD`]),
    /// each also quarantined with its marker.
    pub lost_large: Vec<u64>,
    /// Group commits sled lost (found by the ledger check), when the open accepted them.
    pub lost_writes: Option<crate::ledger::LostWrites>,
}

/// A record that failed its checksum, decoding, or key check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DamagedRecord {
    /// The tree it sits in (`messages`, `dead_letter`, ...).
    pub tree: String,
    /// Its key there, so `verify` can point at it and a repair can move it.
    pub key: Vec<u8>,
    /// What check it failed.
    pub reason: String,
}

/// The outcome of a scan: the index, and the writes that put corrupt records aside.
pub struct Scan {
    /// The schedule rebuilt from every readable message.
    pub index: Index,
    /// The quarantine moves and duplicate removals that repair what was found; an open
    /// that may repair commits them before anything can be leased.
    pub repairs: Vec<Op>,
    /// What was found, for the log line at start and for `spoolctl verify`.
    pub report: RecoveryReport,
    /// The key the next quarantined record gets, above every one already there.
    pub next_quarantine_seq: u64,
    /// Ids of the messages this scan quarantined (their large-message markers go too).
    quarantined_ids: HashSet<u64>,
    /// The chunk heads left once the repairs are made (the commit thread counts on).
    pub chunk_heads: u64,
}

/// What a scan reads: the spool's sled trees, or plain maps in the fuzz harness
/// (`spool::fuzzing`), which runs this code on millions of inputs without sled's files.
pub trait ScanSource {
    /// Calls `f` with every (key, value) of `tree`, in key order.
    fn for_each(&self, tree: TreeId, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), sled::Error>;
    /// The value under `key` in `tree`.
    fn get(&self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, sled::Error>;
    /// Calls `f` with every (key, value) of `tree` whose key starts with `prefix`. The
    /// spool reads the range alone, so a scan of chunk heads never pages in a payload.
    fn for_each_prefix(
        &self,
        tree: TreeId,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), sled::Error> {
        self.for_each(tree, &mut |k, v| {
            if k.starts_with(prefix) {
                f(k, v)
            }
        })
    }
    /// Calls `f` with every (key, value) of `tree` from `start` on, before `end` if given.
    fn for_each_range(
        &self,
        tree: TreeId,
        start: &[u8],
        end: Option<&[u8]>,
        f: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), sled::Error> {
        self.for_each(tree, &mut |k, v| {
            if k >= start && end.is_none_or(|end| k < end) {
                f(k, v)
            }
        })
    }
    /// Whether `tree` holds a key in `start..end`. The spool looks at the first one only.
    fn any_in_range(&self, tree: TreeId, start: &[u8], end: &[u8]) -> Result<bool, sled::Error> {
        let mut any = false;
        self.for_each_range(tree, start, Some(end), &mut |_, _| any = true)?;
        Ok(any)
    }
    /// The record size from which a message has a large-message marker: always
    /// [`keys::LARGE_RECORD`] in a spool; the fuzz harness lowers it so that its large
    /// records cost bytes, not 64 KiB each.
    fn large_record(&self) -> usize {
        keys::LARGE_RECORD
    }
}

impl ScanSource for Trees {
    fn for_each(&self, tree: TreeId, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<(), sled::Error> {
        visit(self[tree as usize].iter(), f)
    }

    fn get(&self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, sled::Error> {
        Ok(self[tree as usize].get(key)?.map(|v| v.to_vec()))
    }

    fn any_in_range(&self, tree: TreeId, start: &[u8], end: &[u8]) -> Result<bool, sled::Error> {
        Ok(self[tree as usize]
            .range(start..end)
            .next()
            .transpose()?
            .is_some())
    }

    fn for_each_prefix(
        &self,
        tree: TreeId,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), sled::Error> {
        visit(self[tree as usize].scan_prefix(prefix), f)
    }

    fn for_each_range(
        &self,
        tree: TreeId,
        start: &[u8],
        end: Option<&[u8]>,
        f: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), sled::Error> {
        let tree = &self[tree as usize];
        match end {
            Some(end) => visit(tree.range(start..end), f),
            None => visit(tree.range(start..), f),
        }
    }
}

/// Calls `f` with each (key, value) of a sled iterator; stops at sled's first error.
fn visit(
    items: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    f: &mut dyn FnMut(&[u8], &[u8]),
) -> Result<(), sled::Error> {
    for item in items {
        let (key, value) = item?;
        f(&key, &value);
    }
    Ok(())
}

/// Reads every tree once and builds a [`Scan`]: the index, the report, and the repairs for
/// what does not decode. Only sled's own errors stop it; damaged records never do.
pub fn scan(trees: &impl ScanSource) -> Result<Scan, sled::Error> {
    let mut scan = Scan {
        index: Index::default(),
        repairs: Vec::new(),
        report: RecoveryReport::default(),
        next_quarantine_seq: 0,
        quarantined_ids: HashSet::new(),
        chunk_heads: 0,
    };
    trees.for_each(TreeId::Quarantine, &mut |key, _| {
        let seq = keys::parse_id_key(key).unwrap_or(0);
        scan.next_quarantine_seq = scan.next_quarantine_seq.max(seq + 1);
        scan.report.quarantine_total += 1;
    })?;
    if let Some(hwm) = trees.get(TreeId::Meta, keys::ID_HWM)? {
        scan.report.highest_id = keys::parse_id_key(&hwm).unwrap_or(0);
    }
    let mut large = HashMap::new();
    let dead = scan_dead_letters(trees, &mut scan, &mut large)?;
    scan_messages(trees, &dead, &mut scan, &mut large)?;
    crate::recovery_chunks::scan_chunks(trees, &dead, &mut scan)?;
    check_large_markers(trees, &mut scan, &dead, large)?;
    Ok(scan)
}

fn scan_dead_letters(
    trees: &impl ScanSource,
    scan: &mut Scan,
    large: &mut HashMap<u64, LargeRecord>,
) -> Result<HashSet<u64>, sled::Error> {
    let mut dead = HashSet::new();
    trees.for_each(TreeId::DeadLetter, &mut |key, raw| {
        let checked = record::decode::<Message>(raw)
            .map_err(|e| e.to_string())
            .and_then(|m| match keys::parse_id_key(key) {
                Some(id) if id == m.id.0 => Ok(m),
                _ => Err("dead-letter key does not match the record's id".into()),
            });
        match checked {
            Ok(msg) => {
                note_large(large, &msg, raw.len(), trees.large_record());
                dead.insert(msg.id.0);
                scan.report.highest_id = scan.report.highest_id.max(msg.id.0);
                scan.report.dead_letter += 1;
            }
            Err(reason) => quarantine(scan, TreeId::DeadLetter, key, raw, reason),
        }
    })?;
    Ok(dead)
}

fn scan_messages(
    trees: &impl ScanSource,
    dead: &HashSet<u64>,
    scan: &mut Scan,
    large: &mut HashMap<u64, LargeRecord>,
) -> Result<(), sled::Error> {
    trees.for_each_range(
        TreeId::Messages,
        keys::SINGLES_START,
        None,
        &mut |key, raw| {
            let msg = match check_message(key, raw) {
                Ok(msg) => msg,
                Err(reason) => {
                    quarantine(scan, TreeId::Messages, key, raw, reason);
                    return;
                }
            };
            scan.report.highest_id = scan.report.highest_id.max(msg.id.0);
            if dead.contains(&msg.id.0) {
                scan.repairs.push(Op::Del(TreeId::Messages, key.to_vec()));
                scan.report.duplicates_resolved += 1;
                return;
            }
            note_large(large, &msg, raw.len(), trees.large_record());
            let counts = scan.report.queues.entry(msg.queue.clone()).or_default();
            counts.0 += 1;
            counts.1 += msg.payload.len() as u64;
            let slot = slot_of(&msg);
            scan.index.insert(&msg.queue, msg.id.0, msg.due_ms, slot);
        },
    )
}

/// A record that has, or may have, a large-message marker.
struct LargeRecord {
    queue: Vec<u8>,
    /// At or over [`keys::LARGE_RECORD`]: a record that size without a marker gets one.
    /// Records a little under it may carry one from when they were larger (a rebind to a
    /// shorter queue name), so their markers are not reported lost either.
    unmarked_needs_one: bool,
}

/// How far under [`keys::LARGE_RECORD`] a marked record may have shrunk (a queue name is
/// at most 255 bytes; everything else in a record only grows).
const MARKER_SLACK: usize = 512;

fn note_large(
    large: &mut HashMap<u64, LargeRecord>,
    msg: &Message,
    raw_len: usize,
    threshold: usize,
) {
    if raw_len + MARKER_SLACK.min(threshold / 8) >= threshold {
        let record = LargeRecord {
            queue: msg.queue.clone().into_bytes(),
            unmarked_needs_one: raw_len >= threshold,
        };
        large.insert(msg.id.0, record);
    }
}

/// Matches the large-message markers (see [`keys::LARGE_RECORD`]) against the large records
/// found. A marker without its message is a message sled dropped because its blob file was
/// missing: it is reported and quarantined (the marker names the queue; the payload is
/// gone). A large record without a marker (one written before markers existed) gets one.
fn check_large_markers(
    trees: &impl ScanSource,
    scan: &mut Scan,
    dead: &HashSet<u64>,
    mut large: HashMap<u64, LargeRecord>,
) -> Result<(), sled::Error> {
    let mut lost = Vec::new();
    trees.for_each(TreeId::Meta, &mut |key, value| {
        if let Some(id) = keys::parse_large_marker(key) {
            if large.remove(&id).is_none() && !dead.contains(&id) {
                lost.push((key.to_vec(), value.to_vec(), id));
            }
        }
    })?;
    lost.retain(|(key, _, id)| {
        let quarantined = scan.quarantined_ids.contains(id);
        if quarantined {
            scan.repairs.push(Op::Del(TreeId::Meta, key.clone()));
        }
        !quarantined
    });
    for (key, queue, id) in lost {
        let reason = format!(
            "message {id} of queue {:?} is lost: its record was stored in a sled blob file \
             (data/blobs/) that is missing, so sled skipped it at open; restore the file from \
             a backup to recover it, or clear this entry",
            String::from_utf8_lossy(&queue)
        );
        scan.report.lost_large.push(id);
        quarantine(scan, TreeId::Meta, &key, &queue, reason);
    }
    for (id, LargeRecord { queue, .. }) in large.into_iter().filter(|(_, r)| r.unmarked_needs_one) {
        scan.repairs
            .push(Op::Put(TreeId::Meta, keys::large_marker(id), queue));
    }
    Ok(())
}

/// Decodes a messages-tree record and checks it belongs under its key.
pub fn check_message(key: &[u8], raw: &[u8]) -> Result<Message, String> {
    let msg = record::decode::<Message>(raw).map_err(|e| e.to_string())?;
    match keys::parse_message_key(key) {
        Some((queue, id)) if queue == msg.queue && id == msg.id => Ok(msg),
        _ => Err(format!(
            "key does not match the record (record says queue {:?}, id {})",
            msg.queue, msg.id
        )),
    }
}

/// What the index keeps of `msg`: the numbers the capacity gate and stats need, no payload.
pub fn slot_of(msg: &Message) -> Slot {
    Slot {
        created_ms: msg.created_ms,
        bytes: u32::try_from(msg.payload.len()).unwrap_or(u32::MAX),
        attempts: msg.attempts,
    }
}

pub(crate) fn quarantine(scan: &mut Scan, tree: TreeId, key: &[u8], raw: &[u8], reason: String) {
    tracing::warn!(?tree, key = ?String::from_utf8_lossy(key), %reason, "corrupt spool record");
    scan.report.damaged.push(DamagedRecord {
        tree: format!("{tree:?}"),
        key: key.to_vec(),
        reason: reason.clone(),
    });
    // A damaged message keeps its bytes in quarantine; its marker must not report it lost.
    let id = match tree {
        TreeId::Messages => keys::parse_message_key(key).map(|(_, id)| id.0),
        TreeId::DeadLetter => keys::parse_id_key(key),
        _ => None,
    };
    scan.quarantined_ids.extend(id);
    let seq = scan.next_quarantine_seq;
    scan.next_quarantine_seq += 1;
    scan.repairs
        .extend(quarantine_ops(seq, tree, key, raw, reason));
    scan.report.quarantined_now += 1;
    scan.report.quarantine_total += 1;
}

/// The writes that move a record into quarantine under sequence number `seq`.
pub fn quarantine_ops(seq: u64, tree: TreeId, key: &[u8], raw: &[u8], reason: String) -> [Op; 2] {
    let entry = QuarantineEntry {
        tree: format!("{tree:?}"),
        key: key.to_vec(),
        raw: raw.to_vec(),
        reason,
        at_ms: now_ms(),
    };
    [
        Op::Put(
            TreeId::Quarantine,
            keys::id_key(seq).to_vec(),
            record::encode(&entry),
        ),
        Op::Del(tree, key.to_vec()),
    ]
}
