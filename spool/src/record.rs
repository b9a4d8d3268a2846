//! Record format v1: what a message looks like on disk.
//!
//! ```text
//! +---------+--------------------+---------------------------------------+
//! | version | crc32 (LE, 4 B)    | bincode body (varint ints, see below) |
//! | 1 B = 1 | over version+body  |                                       |
//! +---------+--------------------+---------------------------------------+
//! ```
//!
//! The checksum covers the version byte and the body, so a flipped version byte is caught
//! too. The body is decoded with a byte limit equal to its own length: a corrupt length
//! prefix fails instead of asking for a huge allocation. Metadata values are a flat enum
//! (no recursion), so a hostile record cannot nest its way into a stack overflow; nested
//! JSON is kept as JSON text.

use std::collections::BTreeMap;

use bincode::Options;
use serde::{Deserialize, Serialize};

/// The only record version this build writes. Readers reject anything else as corrupt
/// (quarantined with its raw bytes, so a newer build can still read it later).
pub const RECORD_VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 4;

/// Identifies a message for the life of a spool. Monotonic: a later enqueue gets a larger id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageId(pub u64);

impl MessageId {
    /// The largest id a spool hands out or imports. Half the range: ids are assigned by
    /// adding to the highest one seen, and the high-water marks reserve ahead of it, so
    /// this bound keeps every such sum far from wrapping (a wrapped id would overwrite a
    /// queued message).
    pub const MAX: MessageId = MessageId(1 << 63);
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for MessageId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(MessageId)
    }
}

/// A metadata value. Flat on purpose: bincode cannot decode `serde_json::Value` (it needs a
/// self-describing format), and a recursive type would let a corrupt record recurse without
/// bound. Arrays and objects travel as JSON text in [`MetaValue::Json`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetaValue {
    /// JSON `null`.
    Null,
    /// A JSON boolean.
    Bool(bool),
    /// A JSON number that fits an `i64`, kept exact.
    Int(i64),
    /// Any other JSON number.
    Float(f64),
    /// A JSON string.
    Str(String),
    /// A JSON array or object, as compact JSON text.
    Json(String),
}

/// Message metadata: small, string-keyed, ordered so encoding is deterministic.
pub type Meta = BTreeMap<String, MetaValue>;

/// A spooled message with its delivery state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The spool-assigned id: the message's identity from enqueue to delivery.
    pub id: MessageId,
    /// The queue it waits in (KumoMTA-style name); decides which dispatcher sends it.
    pub queue: String,
    /// Milliseconds since the Unix epoch when the spool accepted it.
    pub created_ms: u64,
    /// Failed delivery attempts so far.
    pub attempts: u32,
    /// Not to be delivered before this time (ms since the epoch).
    pub due_ms: u64,
    /// The last failure (or the dead-letter reason), for operators.
    pub last_error: Option<String>,
    /// Metadata set at ingest or by the policy, handed to the sender with the payload.
    pub meta: Meta,
    /// The message body, opaque to the spool.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// Why bytes could not be read back as a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the header: a torn or truncated write. Holds the length found.
    #[error("record is {0} bytes, shorter than its 5-byte header")]
    Truncated(usize),
    /// A version byte this build does not read. Holds the byte found.
    #[error("unknown record version {0} (this build reads version {RECORD_VERSION})")]
    Version(u8),
    /// The CRC-32 does not match: the bytes changed after they were written.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The checksum in the header.
        stored: u32,
        /// The checksum of the bytes as read.
        computed: u32,
    },
    /// The checksum holds but bincode cannot decode the body (a writer bug or a foreign
    /// record). Holds bincode's message.
    #[error("body does not decode: {0}")]
    Body(String),
}

/// The bincode options of every record body the spool writes (v1 records and v2 chunks).
pub(crate) fn bincode_options() -> impl Options {
    bincode::DefaultOptions::new()
}

fn checksum(version: u8, body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[version]);
    hasher.update(body);
    hasher.finalize()
}

/// Frames any serializable value as a v1 record.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let body = bincode_options()
        .serialize(value)
        .expect("bincode serialization of owned spool types cannot fail");
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(RECORD_VERSION);
    out.extend_from_slice(&checksum(RECORD_VERSION, &body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The length [`encode`] gives `value`, without encoding it.
pub fn encoded_len<T: Serialize>(value: &T) -> usize {
    let body = bincode_options()
        .serialized_size(value)
        .expect("bincode sizing of owned spool types cannot fail");
    HEADER_LEN + body as usize
}

/// Reads a v1 record back, checking version and checksum before decoding.
pub fn decode<T: for<'de> Deserialize<'de>>(raw: &[u8]) -> Result<T, DecodeError> {
    if raw.len() < HEADER_LEN {
        return Err(DecodeError::Truncated(raw.len()));
    }
    let version = raw[0];
    if version != RECORD_VERSION {
        return Err(DecodeError::Version(version));
    }
    let stored = u32::from_le_bytes([raw[1], raw[2], raw[3], raw[4]]);
    let body = &raw[HEADER_LEN..];
    let computed = checksum(version, body);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    bincode_options()
        .with_limit(body.len() as u64)
        .deserialize(body)
        .map_err(|e| DecodeError::Body(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(payload: Vec<u8>) -> Message {
        let mut meta = Meta::new();
        meta.insert("tenant".into(), MetaValue::Str("acme".into()));
        meta.insert("n".into(), MetaValue::Int(-7));
        meta.insert("list".into(), MetaValue::Json("[1,2]".into()));
        Message {
            id: MessageId(42),
            queue: "kafka".into(),
            created_ms: 1,
            attempts: 3,
            due_ms: 2,
            last_error: Some("451 later".into()),
            meta,
            payload,
        }
    }

    #[test]
    fn round_trips_binary_and_empty_payloads() {
        for payload in [vec![], (0..=255u8).collect(), vec![0u8; 1 << 20]] {
            let msg = sample(payload);
            assert_eq!(decode::<Message>(&encode(&msg)).unwrap(), msg);
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let raw = encode(&sample(b"hello".to_vec()));
        for byte in 0..raw.len() {
            for bit in 0..8 {
                let mut bad = raw.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    decode::<Message>(&bad).is_err(),
                    "flip at {byte}:{bit} undetected"
                );
            }
        }
    }

    #[test]
    fn truncation_is_an_error_not_a_panic() {
        let raw = encode(&sample(b"hello".to_vec()));
        for len in 0..raw.len() {
            assert!(decode::<Message>(&raw[..len]).is_err());
        }
    }

    #[test]
    fn huge_length_prefix_with_valid_checksum_fails_without_allocating() {
        // A body claiming a 2^60-byte payload, re-checksummed so only the limit can stop it.
        let mut body = bincode_options().serialize(&sample(vec![])).unwrap();
        let tail = body.len() - 1; // the empty payload's length prefix (varint 0)
        body[tail] = 0xfd; // varint marker: u64 follows
        body.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let mut raw = vec![RECORD_VERSION];
        raw.extend_from_slice(&checksum(RECORD_VERSION, &body).to_le_bytes());
        raw.extend_from_slice(&body);
        assert!(matches!(decode::<Message>(&raw), Err(DecodeError::Body(_))));
    }
}
