//! Chunked messages: how an enqueue's messages become chunks, and how a chunked message is
//! read back (by a lease, `get`, the operator listings).
//!
//! A chunk holds what one enqueue call brings to one queue: consecutive ids, one creation
//! time, no attempts, due at once. Everything else is a single v1 record: a message alone
//! in its queue in the call (a chunk of one would cost three keys for one message), one
//! too large for a chunk, and every message that moved out of its chunk (a retry, an
//! operator's rewrite). A chunk value therefore stays under sled's blob threshold and needs
//! no large-record marker (its leaf is a blob file all the same: 17 chunks are far over the
//! threshold; docs/performance.md, "Where v2's disk goes").

use crate::chunk::{self, ChunkError, ChunkHeader, RecordRef};
use crate::chunk_table::Home;
use crate::commit::{Effect, Job, Op, TreeId};
use crate::error::Result;
use crate::index::Taken;
use crate::keys::{self, ChunkPart};
use crate::lease::Location;
use crate::record::{self, Message, MessageId};
use crate::recovery::DamagedRecord;
use crate::spool::{add_single, schedule, Spool};
use crate::NewMessage;

/// A message goes into a chunk only if its v1 record is under this: a chunk of such
/// records stays within [`chunk::CHUNK_TARGET_BYTES`], itself under sled's blob threshold.
const CHUNKABLE_RECORD: usize = chunk::CHUNK_TARGET_BYTES / 2;

/// The positions of `messages` grouped by queue (queues in order of first appearance, each
/// queue's messages in their order): the order ids are handed out in.
pub(crate) fn by_queue(messages: &[NewMessage]) -> Vec<usize> {
    let mut queues = std::collections::HashMap::new();
    let ranks: Vec<usize> = messages
        .iter()
        .map(|m| {
            let next = queues.len();
            *queues.entry(m.queue.as_str()).or_insert(next)
        })
        .collect();
    let mut order: Vec<usize> = (0..messages.len()).collect();
    order.sort_by_key(|&at| ranks[at]);
    order
}

/// Adds an enqueue's messages (in id order, each queue's ids consecutive) to `job`: runs
/// of two or more chunkable messages of one queue as chunks, the rest as single records.
pub(crate) fn add_new(job: &mut Job, messages: Vec<Message>) {
    let mut run: Vec<Message> = Vec::new();
    for msg in messages {
        let chunkable = record::encoded_len(&msg) < CHUNKABLE_RECORD;
        let continues = run.last().is_some_and(|last| last.queue == msg.queue);
        if !continues {
            add_run(job, std::mem::take(&mut run));
        }
        if chunkable {
            run.push(msg);
        } else {
            add_run(job, std::mem::take(&mut run));
            add_single(job, msg);
        }
    }
    add_run(job, run);
}

/// One queue's consecutive chunkable messages: chunks if there are two or more.
fn add_run(job: &mut Job, run: Vec<Message>) {
    let Some(first) = run.first() else {
        return;
    };
    if run.len() == 1 {
        return run.into_iter().for_each(|msg| add_single(job, msg));
    }
    let refs: Vec<RecordRef<'_>> = run
        .iter()
        .map(|m| RecordRef {
            meta: &m.meta,
            payload: &m.payload,
        })
        .collect();
    let encoded = chunk::encode_group(
        first.id.0,
        first.created_ms,
        &refs,
        chunk::CHUNK_TARGET_BYTES,
    );
    let chunks = match encoded {
        Ok(chunks) => chunks,
        Err(e) => {
            // Not reachable for messages that passed enqueue's checks; single records
            // store them all the same.
            tracing::error!(error = %e, "could not encode a chunk; storing its messages one by one");
            return run.into_iter().for_each(|msg| add_single(job, msg));
        }
    };
    let queue = &first.queue;
    for chunk in chunks {
        let first_id = chunk.header.first_id;
        let key = |part| keys::chunk_key(part, queue, first_id);
        job.ops.push(Op::Put(
            TreeId::Messages,
            key(ChunkPart::Head),
            chunk.head().to_vec(),
        ));
        job.ops.push(Op::Put(
            TreeId::Messages,
            key(ChunkPart::Chunk),
            chunk.value,
        ));
        job.undo
            .push(Op::Del(TreeId::Messages, key(ChunkPart::Chunk)));
        job.undo
            .push(Op::Del(TreeId::Messages, key(ChunkPart::Head)));
        job.effects.push(Effect::AddChunk {
            queue: queue.clone(),
            first_id,
            count: chunk.header.count,
        });
    }
    job.effects.extend(run.iter().map(schedule));
}

/// The chunk a run of leases last read: leases of one chunk read its value once.
pub(crate) struct ChunkRead {
    first_id: u64,
    value: sled::IVec,
    header: std::result::Result<ChunkHeader, ChunkError>,
}

/// One record of a chunk, or why it cannot be read and the bytes to quarantine: the
/// record's own if the header holds, the whole chunk value if not (each of its messages
/// then quarantines it once, so none is lost uncounted).
fn decode_or_fault<'c>(
    queue: &str,
    id: u64,
    home: Home,
    chunk: &'c ChunkRead,
) -> std::result::Result<Message, (String, &'c [u8])> {
    let header = match &chunk.header {
        Ok(header) => header,
        Err(e) => {
            let reason = format!("chunk {} (holding id {id}): {e}", home.first_id);
            return Err((reason, &chunk.value));
        }
    };
    let index = usize::from(home.index);
    match chunk::decode_record_at(header, &chunk.value, index) {
        Ok(body) => Ok(message_of(queue, id, header.created_ms, body)),
        Err(e) => {
            let raw = header
                .record_range(index)
                .and_then(|range| chunk.value.get(range))
                .unwrap_or(&chunk.value);
            Err((e.to_string(), raw))
        }
    }
}

/// A chunked message rebuilt from its record: what it brought at ingest, plus what its
/// chunk says (id, creation time) and what a chunk implies (no attempts, due at creation).
fn message_of(queue: &str, id: u64, created_ms: u64, body: chunk::RecordBody) -> Message {
    Message {
        id: MessageId(id),
        queue: queue.to_owned(),
        created_ms,
        attempts: 0,
        due_ms: created_ms,
        last_error: None,
        meta: body.meta,
        payload: body.payload,
    }
}

impl Spool {
    /// Reads a leased chunked message. `Ok(None)`: its record (or its chunk's header)
    /// failed its checks and was quarantined, or its chunk is missing; both are logged.
    pub(crate) fn read_chunked(
        &self,
        queue: &str,
        taken: &Taken,
        home: Home,
        last: &mut Option<ChunkRead>,
    ) -> Result<Option<(Message, Location)>> {
        if last.as_ref().is_none_or(|c| c.first_id != home.first_id) {
            *last = self.read_chunk(queue, home.first_id)?;
        }
        let Some(chunk) = last.as_ref() else {
            // Its head was found at open but the chunk is gone: a loss, so it is recorded
            // in quarantine (no bytes left to keep) and its bit is set, never just dropped.
            let key = keys::chunk_key(ChunkPart::Chunk, queue, home.first_id);
            let reason = format!(
                "message {} is lost: its chunk {} is missing although the chunk's head is there",
                taken.id, home.first_id
            );
            self.quarantine_live(queue, taken.id, &key, &[], reason, Some(home));
            return Ok(None);
        };
        match self.decode_chunked(queue, taken.id, home, chunk) {
            Some(mut message) => {
                message.due_ms = taken.due_ms;
                Ok(Some((message, Location::Chunk(home))))
            }
            None => Ok(None),
        }
    }

    /// Looks up a chunked message by id for [`Spool::get`].
    pub(crate) fn get_chunked(
        &self,
        queue: &str,
        id: MessageId,
        home: Home,
    ) -> Result<Option<Message>> {
        let Some(chunk) = self.read_chunk(queue, home.first_id)? else {
            return Ok(None);
        };
        let header = chunk.header.as_ref().ok();
        Ok(header.and_then(|header| {
            let body = chunk::decode_record_at(header, &chunk.value, usize::from(home.index));
            Some(message_of(queue, id.0, header.created_ms, body.ok()?))
        }))
    }

    fn read_chunk(&self, queue: &str, first_id: u64) -> Result<Option<ChunkRead>> {
        let key = keys::chunk_key(ChunkPart::Chunk, queue, first_id);
        let value = self.inner.trees[TreeId::Messages as usize]
            .get(key)
            .map_err(|e| self.storage(e))?;
        Ok(value.map(|value| ChunkRead {
            first_id,
            header: chunk::decode_header(&value),
            value,
        }))
    }

    /// Decodes one record of a chunk, or quarantines what cannot be read (see
    /// [`decode_or_fault`]).
    fn decode_chunked(
        &self,
        queue: &str,
        id: u64,
        home: Home,
        chunk: &ChunkRead,
    ) -> Option<Message> {
        match decode_or_fault(queue, id, home, chunk) {
            Ok(message) => Some(message),
            Err((reason, raw)) => {
                let key = keys::chunk_key(ChunkPart::Chunk, queue, home.first_id);
                self.quarantine_live(queue, id, &key, raw, reason, Some(home));
                None
            }
        }
    }

    /// Reads every chunk's unsettled records, payloads and all (the open scan reads only
    /// heads and bitmaps, so damage inside a chunk is otherwise found only when a lease or
    /// an export reaches it), and returns those that fail their checks. With `repair`, each
    /// is quarantined with its bytes, as a lease would do; wait for [`Spool::sync`] before
    /// calling that durable.
    pub fn check_chunked_records(&self, repair: bool) -> Result<Vec<DamagedRecord>> {
        let mut damaged = Vec::new();
        let prefix = keys::chunk_part_prefix(ChunkPart::Chunk);
        self.for_each_chunk(&prefix, |key, chunk| {
            // A key that is no chunk's is the open scan's to report and set aside.
            let Some((queue, chunk, homes)) = chunk else {
                return Ok(true);
            };
            for home in homes {
                let id = chunk.first_id + u64::from(home.index);
                let Err((reason, raw)) = decode_or_fault(queue, id, home, &chunk) else {
                    continue;
                };
                damaged.push(DamagedRecord {
                    tree: "Messages".into(),
                    key: key.to_vec(),
                    reason: format!("message {id}: {reason}"),
                });
                if repair {
                    self.quarantine_live(queue, id, key, raw, reason, Some(home));
                }
            }
            Ok(true)
        })?;
        Ok(damaged)
    }

    /// Calls `f` with every unsettled chunked message under `prefix` (a
    /// [`keys::chunk_part_prefix`] or [`keys::chunk_queue_prefix`] of chunk values), in key
    /// order, or with what is wrong with one; stops when `f` returns `false`.
    pub(crate) fn for_each_chunked(
        &self,
        prefix: &[u8],
        mut f: impl FnMut(std::result::Result<Message, DamagedRecord>) -> Result<bool>,
    ) -> Result<()> {
        self.for_each_chunk(prefix, |key, chunk| {
            let damaged = |reason: String| DamagedRecord {
                tree: "Messages".into(),
                key: key.to_vec(),
                reason,
            };
            let Some((queue, chunk, homes)) = chunk else {
                return f(Err(damaged("not a chunk's key".into())));
            };
            let header = match &chunk.header {
                Ok(header) => header,
                Err(e) => return f(Err(damaged(e.to_string()))),
            };
            for home in homes {
                let id = chunk.first_id + u64::from(home.index);
                let record = chunk::decode_record_at(header, &chunk.value, usize::from(home.index))
                    .map(|body| message_of(queue, id, header.created_ms, body))
                    .map_err(|e| damaged(e.to_string()));
                if !f(record)? {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    /// Calls `f` with every chunk value under `prefix`, in key order: its key, and (unless
    /// the key is no chunk's) its queue, the value with its decoded header, and where its
    /// unsettled messages are. Stops when `f` returns `false`.
    fn for_each_chunk(
        &self,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], Option<(&str, ChunkRead, Vec<Home>)>) -> Result<bool>,
    ) -> Result<()> {
        for item in self.inner.trees[TreeId::Messages as usize].scan_prefix(prefix) {
            let (key, value) = item.map_err(|e| self.storage(e))?;
            let chunk = keys::parse_chunk_key(ChunkPart::Chunk, &key).map(|(queue, first_id)| {
                let homes = self.index().chunks.unsettled(queue, first_id);
                let header = chunk::decode_header(&value);
                let read = ChunkRead {
                    first_id,
                    header,
                    value,
                };
                (queue, read, homes)
            });
            if !f(&key, chunk)? {
                return Ok(());
            }
        }
        Ok(())
    }
}
