//! The v2 chunk codec: what one group commit adds to one queue, as one sled value.
//!
//! Not wired into the spool yet (step 2 of `docs/spool-v2-design.md`): the spool still
//! writes one v1 record per message. This module only encodes and decodes.
//!
//! ```text
//! header:  magic "SPC2" | version u8 | count u16 | first_id u64 | created_ms u64
//!          | sizes [u32; count] | payload_sizes [u32; count] | header_crc u32
//!                                                         (integers little-endian)
//! records: [ len u32 | crc u32 | body ] × count          (crc over len and body)
//! ```
//!
//! - The header is also stored alone in the `heads` tree, so recovery never reads a payload:
//!   [`EncodedChunk::head`] is the value's prefix, decoded by [`decode_header`].
//! - Record `i` has id `first_id + i`, and `sizes[i]` is its body length. Records are found
//!   through the header's sizes (CRC-checked), never through their own `len` fields, so a
//!   damaged record cannot shift its neighbours: it fails alone ([`RecordError`]), and
//!   [`decode_record`] reads one record without touching the others.
//! - Every length is bounded by the input before anything is allocated or sliced.
//! - Settled records are tracked apart from the chunk in a [`SettleBitmap`].

use std::ops::Range;

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::record::{bincode_options, MessageId, Meta};

mod bitmap;
mod error;
mod header;

pub use bitmap::{BitmapError, SettleBitmap};
pub use error::{ChunkError, EncodeError, ReadError, RecordError, RecordFault};
use header::le_u32;
pub use header::{decode_header, encode_header, ChunkHeader};

/// The chunk value's first four bytes ("spool chunk", format 2).
pub const MAGIC: [u8; 4] = *b"SPC2";
/// The only chunk layout this build writes and reads.
pub const CHUNK_VERSION: u8 = 1;
/// Where [`cut`] closes a chunk: below sled's ~128 KiB blob threshold, so a chunk stays
/// in sled's log (no blob file, no blob fsync, no `large/` marker).
pub const CHUNK_TARGET_BYTES: usize = 64 * 1024;
/// magic + version + count + first_id + created_ms.
const FIXED_HEAD: usize = 4 + 1 + 2 + 8 + 8;
/// A record's `len` and `crc` fields.
const RECORD_FRAME: usize = 4 + 4;

/// A record's body: what a chunk stores per message.
///
/// Only what the message brought at ingest (`NewMessage` minus its queue). The queue is in
/// the chunk's key, the id and creation time in its header; attempts, due time and last
/// error never change inside a chunk, because a retried message moves to its own retry
/// record. Reusing the v1 record (`record.rs`) would store all of those again per message,
/// plus a version byte and a CRC that the chunk's framing already gives. The body is bincode
/// with the same options as v1, so metadata keeps v1's flat, non-recursive [`Meta`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordBody {
    /// Metadata set at ingest.
    pub meta: Meta,
    /// The message body, opaque to the spool.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// A borrowed [`RecordBody`], so encoding a group copies no payload. Encodes identically.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RecordRef<'a> {
    /// Metadata set at ingest.
    pub meta: &'a Meta,
    /// The message body.
    #[serde(with = "serde_bytes")]
    pub payload: &'a [u8],
}

impl RecordBody {
    /// The borrowed form the encoder takes.
    pub fn as_ref(&self) -> RecordRef<'_> {
        RecordRef {
            meta: &self.meta,
            payload: &self.payload,
        }
    }
}

/// One chunk as written: its header and its value (header then records).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedChunk {
    /// The decoded header, for the index.
    pub header: ChunkHeader,
    /// The `chunks` tree's value.
    pub value: Vec<u8>,
}

impl EncodedChunk {
    /// The `heads` tree's value: the header alone, a prefix of [`EncodedChunk::value`].
    pub fn head(&self) -> &[u8] {
        &self.value[..self.header.encoded_len()]
    }
}

/// A chunk read back: a sound header, and each record decoded or failed on its own.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedChunk {
    /// The header (its CRC held).
    pub header: ChunkHeader,
    /// Record `i`'s body or why it cannot be read; the others do not depend on it.
    pub records: Vec<Result<RecordBody, RecordError>>,
    /// Bytes after the last record. A writer never leaves any: the caller reports them.
    pub trailing_bytes: usize,
}

fn record_crc(len: u32, body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(body);
    hasher.finalize()
}

/// Serializes each record's body once; [`cut`] and [`frame`] work on the results.
fn bodies(records: &[RecordRef<'_>]) -> Vec<Vec<u8>> {
    records
        .iter()
        .map(|r| {
            bincode_options()
                .serialize(r)
                .expect("bincode serialization of owned spool types cannot fail")
        })
        .collect()
}

/// Splits records of the given body lengths into chunks of at most `budget` encoded bytes
/// (header included) and at most 65535 records. A record that alone exceeds the budget gets
/// a chunk of its own. Returns index ranges covering `sizes` in order.
pub fn cut(sizes: &[usize], budget: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = FIXED_HEAD + 4;
    for (i, &size) in sizes.iter().enumerate() {
        let add = 8 + RECORD_FRAME + size;
        let full = i - start == usize::from(u16::MAX);
        if i > start && (bytes + add > budget || full) {
            out.push(start..i);
            start = i;
            bytes = FIXED_HEAD + 4;
        }
        bytes += add;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// Frames already-serialized bodies as one chunk.
fn frame(
    first_id: u64,
    created_ms: u64,
    bodies: &[Vec<u8>],
    payload_sizes: &[usize],
) -> Result<EncodedChunk, EncodeError> {
    let count = u16::try_from(bodies.len()).map_err(|_| EncodeError::TooManyRecords {
        first_id,
        count: bodies.len(),
    })?;
    if count == 0 {
        return Err(EncodeError::Empty { first_id });
    }
    if first_id.saturating_add(u64::from(count)) > MessageId::MAX.0 {
        return Err(EncodeError::IdRange {
            first_id,
            count: bodies.len(),
        });
    }
    let sizes = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| {
            u32::try_from(b.len()).map_err(|_| EncodeError::RecordTooLarge {
                id: first_id + i as u64,
                len: b.len(),
            })
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let header = ChunkHeader {
        first_id,
        count,
        created_ms,
        sizes,
        // A payload is part of its body, whose length was just checked to fit a u32.
        payload_sizes: payload_sizes.iter().map(|&p| p as u32).collect(),
    };
    let mut value = Vec::with_capacity(header.chunk_len());
    value.extend_from_slice(&encode_header(&header));
    for (body, &len) in bodies.iter().zip(&header.sizes) {
        value.extend_from_slice(&len.to_le_bytes());
        value.extend_from_slice(&record_crc(len, body).to_le_bytes());
        value.extend_from_slice(body);
    }
    Ok(EncodedChunk { header, value })
}

/// Encodes `records` as one chunk with ids from `first_id` (no budget applied).
pub fn encode_chunk(
    first_id: u64,
    created_ms: u64,
    records: &[RecordRef<'_>],
) -> Result<EncodedChunk, EncodeError> {
    frame(
        first_id,
        created_ms,
        &bodies(records),
        &payload_sizes(records),
    )
}

fn payload_sizes(records: &[RecordRef<'_>]) -> Vec<usize> {
    records.iter().map(|r| r.payload.len()).collect()
}

/// Encodes a queue's records of one group commit as chunks of at most `budget` bytes
/// (normally [`CHUNK_TARGET_BYTES`]), ids consecutive from `first_id` across the chunks.
pub fn encode_group(
    first_id: u64,
    created_ms: u64,
    records: &[RecordRef<'_>],
    budget: usize,
) -> Result<Vec<EncodedChunk>, EncodeError> {
    let bodies = bodies(records);
    let payloads = payload_sizes(records);
    let sizes: Vec<usize> = bodies.iter().map(Vec::len).collect();
    cut(&sizes, budget)
        .into_iter()
        .map(|range| {
            let first = first_id + range.start as u64;
            frame(first, created_ms, &bodies[range.clone()], &payloads[range])
        })
        .collect()
}

/// Reads record `index` at `offset` (from the header's sizes) and checks it alone.
fn record_at(
    header: &ChunkHeader,
    raw: &[u8],
    index: usize,
    offset: usize,
) -> Result<RecordBody, RecordError> {
    let fail = |fault| RecordError {
        first_id: header.first_id,
        index,
        offset,
        fault,
    };
    let expected = header.sizes[index];
    let end = offset + RECORD_FRAME + expected as usize;
    let Some(record) = raw.get(offset..end) else {
        return Err(fail(RecordFault::Truncated {
            end,
            len: raw.len(),
        }));
    };
    let stored_len = le_u32(record, 0);
    if stored_len != expected {
        return Err(fail(RecordFault::Length {
            stored: stored_len,
            expected,
        }));
    }
    let body = &record[RECORD_FRAME..];
    let stored = le_u32(record, 4);
    let computed = record_crc(stored_len, body);
    if stored != computed {
        return Err(fail(RecordFault::Checksum { stored, computed }));
    }
    let decoded: RecordBody = bincode_options()
        .with_limit(body.len() as u64)
        .deserialize(body)
        .map_err(|e| fail(RecordFault::Body(e.to_string())))?;
    let claimed = header.payload_sizes[index];
    if decoded.payload.len() != claimed as usize {
        return Err(fail(RecordFault::Body(format!(
            "payload is {} bytes, the header says {claimed}",
            decoded.payload.len()
        ))));
    }
    Ok(decoded)
}

/// Decodes a whole chunk value: a bad header fails the chunk, a bad record only itself.
pub fn decode_chunk(raw: &[u8]) -> Result<DecodedChunk, ChunkError> {
    let header = decode_header(raw)?;
    let mut offset = header.encoded_len();
    let mut records = Vec::with_capacity(header.sizes.len());
    for index in 0..header.sizes.len() {
        records.push(record_at(&header, raw, index, offset));
        offset += RECORD_FRAME + header.sizes[index] as usize;
    }
    Ok(DecodedChunk {
        trailing_bytes: raw.len().saturating_sub(offset),
        header,
        records,
    })
}

/// Reads record `index` of a chunk value whose header is already decoded (the caller reads
/// several records of one chunk and decodes its header once).
pub fn decode_record_at(
    header: &ChunkHeader,
    raw: &[u8],
    index: usize,
) -> Result<RecordBody, RecordError> {
    match header.record_range(index) {
        Some(range) => record_at(header, raw, index, range.start),
        None => Err(RecordError {
            first_id: header.first_id,
            index,
            offset: header.chunk_len(),
            fault: RecordFault::NoSuchIndex {
                count: header.count,
            },
        }),
    }
}

/// Reads record `index` of a chunk value alone, locating it by the header's sizes (the
/// other records' bytes are neither checked nor decoded).
pub fn decode_record(raw: &[u8], index: usize) -> Result<RecordBody, ReadError> {
    let header = decode_header(raw)?;
    let Some(range) = header.record_range(index) else {
        return Err(RecordError {
            first_id: header.first_id,
            index,
            offset: header.chunk_len(),
            fault: RecordFault::NoSuchIndex {
                count: header.count,
            },
        }
        .into());
    };
    Ok(record_at(&header, raw, index, range.start)?)
}
