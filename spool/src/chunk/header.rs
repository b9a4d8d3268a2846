//! A chunk's header: encoded at the front of the chunk value and alone in `heads`.

use std::ops::Range;

use super::{ChunkError, CHUNK_VERSION, FIXED_HEAD, MAGIC, RECORD_FRAME};
use crate::record::MessageId;

/// A chunk's header: enough to index it (ids, sizes, age) without reading a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHeader {
    /// The id of record 0; record `i` is `first_id + i`.
    pub first_id: u64,
    /// How many records the chunk holds (at least one).
    pub count: u16,
    /// When the group was accepted (ms since the Unix epoch).
    pub created_ms: u64,
    /// Each record's body length, in order (`count` entries).
    pub sizes: Vec<u32>,
    /// Each record's payload length, in order (`count` entries, each at most its body
    /// length): what the index counts as the message's bytes, known without reading it.
    pub payload_sizes: Vec<u32>,
}

impl ChunkHeader {
    /// The header's encoded length.
    pub fn encoded_len(&self) -> usize {
        FIXED_HEAD + 8 * self.sizes.len() + 4
    }

    /// The id of record `index`.
    pub fn id(&self, index: usize) -> MessageId {
        MessageId(self.first_id + index as u64)
    }

    /// Where record `index` (its `len`, `crc` and body) lies in the chunk value, or `None`
    /// past the last record. The range may reach past a truncated value: slice with `get`.
    pub fn record_range(&self, index: usize) -> Option<Range<usize>> {
        let body = *self.sizes.get(index)? as usize;
        let before: usize = self.sizes[..index]
            .iter()
            .map(|&s| RECORD_FRAME + s as usize)
            .sum();
        let start = self.encoded_len() + before;
        Some(start..start + RECORD_FRAME + body)
    }

    /// The chunk value's full length as the header describes it.
    pub fn chunk_len(&self) -> usize {
        self.encoded_len()
            + self
                .sizes
                .iter()
                .map(|&s| RECORD_FRAME + s as usize)
                .sum::<usize>()
    }
}

/// The header's bytes (the `heads` tree's value; also the chunk value's prefix).
/// `count` must equal `sizes.len()`, as in every header the encoder or decoder makes;
/// a header built otherwise encodes bytes whose sizes do not match their count.
pub fn encode_header(header: &ChunkHeader) -> Vec<u8> {
    debug_assert_eq!(usize::from(header.count), header.sizes.len());
    debug_assert_eq!(header.sizes.len(), header.payload_sizes.len());
    let mut out = Vec::with_capacity(header.encoded_len());
    out.extend_from_slice(&MAGIC);
    out.push(CHUNK_VERSION);
    out.extend_from_slice(&header.count.to_le_bytes());
    out.extend_from_slice(&header.first_id.to_le_bytes());
    out.extend_from_slice(&header.created_ms.to_le_bytes());
    for size in header.sizes.iter().chain(&header.payload_sizes) {
        out.extend_from_slice(&size.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn le_u16(raw: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([raw[at], raw[at + 1]])
}

pub(super) fn le_u32(raw: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(raw: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads a header from the start of `raw` (a `heads` value, or a whole chunk value; bytes
/// after the header are ignored). Checks magic, version, length and CRC before trusting any
/// field; the sizes are allocated only once the input is known to hold them.
pub fn decode_header(raw: &[u8]) -> Result<ChunkHeader, ChunkError> {
    if raw.len() < FIXED_HEAD + 4 {
        return Err(ChunkError::Truncated {
            len: raw.len(),
            need: FIXED_HEAD + 4,
        });
    }
    let found: [u8; 4] = raw[..4].try_into().expect("4 bytes");
    if found != MAGIC {
        return Err(ChunkError::Magic { found });
    }
    if raw[4] != CHUNK_VERSION {
        return Err(ChunkError::Version { found: raw[4] });
    }
    let count = le_u16(raw, 5);
    let first_id = le_u64(raw, 7);
    let need = FIXED_HEAD + 8 * usize::from(count) + 4;
    if raw.len() < need {
        return Err(ChunkError::Truncated {
            len: raw.len(),
            need,
        });
    }
    let stored = le_u32(raw, need - 4);
    let computed = crc32fast::hash(&raw[..need - 4]);
    if stored != computed {
        return Err(ChunkError::Checksum {
            claimed_first_id: first_id,
            claimed_count: count,
            stored,
            computed,
        });
    }
    if count == 0 || first_id.saturating_add(u64::from(count)) > MessageId::MAX.0 {
        return Err(ChunkError::Invalid { first_id, count });
    }
    let n = usize::from(count);
    let sizes: Vec<u32> = (0..n).map(|i| le_u32(raw, FIXED_HEAD + 4 * i)).collect();
    let payload_sizes: Vec<u32> = (0..n)
        .map(|i| le_u32(raw, FIXED_HEAD + 4 * (n + i)))
        .collect();
    if payload_sizes.iter().zip(&sizes).any(|(p, s)| p > s) {
        return Err(ChunkError::Invalid { first_id, count });
    }
    Ok(ChunkHeader {
        first_id,
        count,
        created_ms: le_u64(raw, 15),
        sizes,
        payload_sizes,
    })
}
