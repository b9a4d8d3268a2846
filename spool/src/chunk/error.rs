//! The chunk codec's errors: one type per level, so a caller knows what to quarantine (the
//! whole chunk for a [`ChunkError`], one record for a [`RecordError`]).

use super::CHUNK_VERSION;
use crate::record::MessageId;

/// Why a group could not be encoded (a caller's bug or an impossible message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// No records: a chunk holds at least one.
    #[error("chunk at id {first_id}: no records to encode")]
    Empty {
        /// The id the chunk would have started at.
        first_id: u64,
    },
    /// More records than a chunk's u16 count ([`cut`](super::cut) never makes such a chunk).
    #[error("chunk at id {first_id}: {count} records, more than a chunk's 65535")]
    TooManyRecords {
        /// The chunk's first id.
        first_id: u64,
        /// How many records were given.
        count: usize,
    },
    /// A record body of 4 GiB or more does not fit its u32 length.
    #[error("record id {id}: body of {len} bytes does not fit a chunk's u32 length")]
    RecordTooLarge {
        /// The record's id.
        id: u64,
        /// Its body length.
        len: usize,
    },
    /// The ids would pass [`MessageId::MAX`].
    #[error(
        "chunk at id {first_id} with {count} records passes the largest id {}",
        MessageId::MAX
    )]
    IdRange {
        /// The chunk's first id.
        first_id: u64,
        /// Its record count.
        count: usize,
    },
}

/// Why a chunk's header cannot be trusted: the whole chunk is quarantined with its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// Fewer bytes than the header needs.
    #[error("chunk header truncated: {len} bytes, the header needs {need} (quarantine the chunk with its key)")]
    Truncated {
        /// Bytes found.
        len: usize,
        /// Bytes the header needs (as far as could be read).
        need: usize,
    },
    /// Not a v2 chunk at all.
    #[error(
        "not a chunk: magic {found:02x?}, expected \"SPC2\" (quarantine the value with its key)"
    )]
    Magic {
        /// The first four bytes found.
        found: [u8; 4],
    },
    /// A chunk layout this build does not read.
    #[error("chunk version {found}, this build reads version {CHUNK_VERSION} (quarantine it; a newer build may read it)")]
    Version {
        /// The version byte found.
        found: u8,
    },
    /// The header's CRC-32 fails: none of its fields can be trusted.
    #[error("chunk header checksum mismatch (claims first id {claimed_first_id}, {claimed_count} records): stored {stored:#010x}, computed {computed:#010x}; quarantine the chunk with its key")]
    Checksum {
        /// The first id as read (unverified): for the operator's report only.
        claimed_first_id: u64,
        /// The count as read (unverified).
        claimed_count: u16,
        /// The checksum stored.
        stored: u32,
        /// The checksum of the bytes as read.
        computed: u32,
    },
    /// A sound header with no records or ids past [`MessageId::MAX`]: a writer bug.
    #[error("chunk header at id {first_id} with {count} records is invalid (no records, or ids past {})", MessageId::MAX)]
    Invalid {
        /// The first id.
        first_id: u64,
        /// The count.
        count: u16,
    },
}

/// What is wrong with one record; its chunk's other records are unaffected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordFault {
    /// The value ends inside the record.
    #[error("truncated: the record needs bytes up to offset {end}, the chunk has {len}")]
    Truncated {
        /// Where the record should end.
        end: usize,
        /// The chunk value's length.
        len: usize,
    },
    /// The record's `len` field disagrees with the header's size.
    #[error("length field says {stored}, the header says {expected}")]
    Length {
        /// The record's own length field.
        stored: u32,
        /// The header's size for it.
        expected: u32,
    },
    /// The record's CRC-32 fails.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The checksum stored.
        stored: u32,
        /// The checksum of the bytes as read.
        computed: u32,
    },
    /// The checksum holds but the body does not decode (a writer bug or a foreign record).
    #[error("body does not decode: {0}")]
    Body(String),
    /// [`decode_record`](super::decode_record) was asked for an index the chunk does not have.
    #[error("no such record: the chunk has {count}")]
    NoSuchIndex {
        /// The chunk's record count.
        count: u16,
    },
}

/// One record that cannot be read, with where it is: quarantine only it, set its settled bit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record {index} (id {}) of chunk {first_id} at offset {offset}: {fault} (quarantine this record alone)", first_id + *index as u64)]
pub struct RecordError {
    /// The chunk's first id.
    pub first_id: u64,
    /// The record's index in the chunk.
    pub index: usize,
    /// The record's offset in the chunk value.
    pub offset: usize,
    /// What is wrong.
    pub fault: RecordFault,
}

/// Why [`decode_record`](super::decode_record) returned no body: the chunk's header, or that one record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The header failed: the whole chunk is unreadable.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// The header held; this record did not.
    #[error(transparent)]
    Record(#[from] RecordError),
}
