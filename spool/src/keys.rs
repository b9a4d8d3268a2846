//! Key layout. One data tree holds every queue (sled bloats with many trees, sled #1333):
//!
//! ```text
//! messages:    <queue name bytes> 0x00 <id: u64 big-endian>  -> record v1 (Message): a "single"
//!              0x00 0x01 <queue> 0x00 <first id u64 BE>      -> chunk (`chunk.rs`)
//!              0x00 0x02 <queue> 0x00 <first id u64 BE>      -> the chunk's header alone
//!              0x00 0x03 <queue> 0x00 <first id u64 BE>      -> the chunk's settle bitmap
//! dead_letter: <id: u64 big-endian>                          -> record v1 (Message)
//! quarantine:  <seq: u64 big-endian>                         -> record v1 (QuarantineEntry)
//! meta:        "id_hwm"                                      -> u64 big-endian
//!              "commit_mark"                                 -> u64 seq, u64 highest id (BE)
//!              "large/" <id: u64 big-endian>                 -> queue name (a large message)
//! ```
//!
//! Big-endian ids sort numerically, so a prefix scan of one queue walks it in id (FIFO)
//! order. Queue names may not contain 0x00, which makes the separator unambiguous.

use crate::record::MessageId;

/// The byte between a queue name and the id in a messages-tree key; refused in queue names.
pub const SEPARATOR: u8 = 0;
/// Meta-tree key of the highest id ever committed, so ids are never reused after deletes.
pub const ID_HWM: &[u8] = b"id_hwm";
/// The last group commit's mark (see `ledger.rs`).
pub const COMMIT_MARK: &[u8] = b"commit_mark";
/// Longest queue name accepted. Names are KumoMTA-style `campaign:tenant@domain!routing`.
pub const MAX_QUEUE_NAME: usize = 255;

/// Why a queue name is refused.
pub fn check_queue_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("queue name is empty")
    } else if name.len() > MAX_QUEUE_NAME {
        Err("queue name is longer than 255 bytes")
    } else if name.bytes().any(|b| b == SEPARATOR || b.is_ascii_control()) {
        Err("queue name contains a control character")
    } else {
        Ok(())
    }
}

/// The messages-tree key of message `id` in `queue`: queue-prefixed so each queue is one
/// contiguous range in id (FIFO) order.
pub fn message_key(queue: &str, id: MessageId) -> Vec<u8> {
    let mut key = Vec::with_capacity(queue.len() + 9);
    key.extend_from_slice(queue.as_bytes());
    key.push(SEPARATOR);
    key.extend_from_slice(&id.0.to_be_bytes());
    key
}

/// The scan prefix of one queue in the messages tree.
pub fn queue_prefix(queue: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(queue.len() + 1);
    key.extend_from_slice(queue.as_bytes());
    key.push(SEPARATOR);
    key
}

/// Splits a messages-tree key; `None` if it is not one this build writes.
pub fn parse_message_key(key: &[u8]) -> Option<(&str, MessageId)> {
    if key.len() < 10 || key[key.len() - 9] != SEPARATOR {
        return None;
    }
    let (queue, rest) = key.split_at(key.len() - 9);
    let queue = std::str::from_utf8(queue).ok()?;
    check_queue_name(queue).ok()?;
    let id = u64::from_be_bytes(rest[1..].try_into().ok()?);
    Some((queue, MessageId(id)))
}

/// The first byte of every chunk-area key in the messages tree. Queue names are never
/// empty and never start with 0x00, so the chunk area sorts before every message key and
/// the two never mix: `SINGLES_START..` is exactly the v1 records.
pub const CHUNK_AREA: u8 = 0;
/// How many chunk heads the spool has written and not deleted (u64 BE), written in the same
/// batch as every head's write or deletion. An open that finds another number of heads
/// (or no count: a spool from before it, or damage) walks the chunks for one that lost its
/// head; a healthy open never reads a chunk's payload.
pub const CHUNK_HEADS: &[u8] = &[CHUNK_AREA, 0];
/// The first key of the single records (v1 records, one per message).
pub const SINGLES_START: &[u8] = &[1];

/// What a chunk-area key holds. The kinds sort apart, so recovery reads the heads and
/// settle records as two contiguous ranges and never pages in a chunk's payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkPart {
    /// The chunk value: header and records.
    Chunk = 1,
    /// The chunk's header alone.
    Head = 2,
    /// The chunk's settle bitmap (absent while nothing in it is settled).
    Settled = 3,
}

/// The key of `part` of the chunk of `queue` whose first id is `first_id`:
/// `0x00 <part> <queue> 0x00 <first id u64 BE>`.
pub fn chunk_key(part: ChunkPart, queue: &str, first_id: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(queue.len() + 11);
    key.push(CHUNK_AREA);
    key.push(part as u8);
    key.extend_from_slice(&message_key(queue, MessageId(first_id)));
    key
}

/// The prefix of every `part` key of `queue`'s chunks.
pub fn chunk_queue_prefix(part: ChunkPart, queue: &str) -> Vec<u8> {
    let mut key = vec![CHUNK_AREA, part as u8];
    key.extend_from_slice(&queue_prefix(queue));
    key
}

/// The prefix of every `part` key.
pub fn chunk_part_prefix(part: ChunkPart) -> [u8; 2] {
    [CHUNK_AREA, part as u8]
}

/// Splits a chunk-area key of `part` into queue and first id; `None` if it is not one.
pub fn parse_chunk_key(part: ChunkPart, key: &[u8]) -> Option<(&str, u64)> {
    let rest = key.strip_prefix(&chunk_part_prefix(part))?;
    parse_message_key(rest).map(|(queue, id)| (queue, id.0))
}

/// The dead-letter and quarantine trees' key: big-endian so they iterate in id order.
pub fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// Records this long or longer get a large-message marker. sled writes a log item over
/// `segment_size / 4` (128 KiB with the spool's 512 KiB segments) to a blob file of its
/// own, and if that file is gone at open, sled skips the update without a word
/// (`LogRead::DanglingBlob`). The marker is small, so it stays in the log: a marker whose
/// message is nowhere at open is a message lost with its blob, and is reported. Half the
/// threshold leaves room for keys and sled's framing.
pub const LARGE_RECORD: usize = 64 * 1024;

const LARGE_PREFIX: &[u8] = b"large/";

/// The meta-tree key of message `id`'s large-message marker.
pub fn large_marker(id: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(LARGE_PREFIX.len() + 8);
    key.extend_from_slice(LARGE_PREFIX);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The id a [`large_marker`] key names; `None` for any other meta key.
pub fn parse_large_marker(key: &[u8]) -> Option<u64> {
    parse_id_key(key.strip_prefix(LARGE_PREFIX)?)
}

/// Reads an [`id_key`]; `None` if the key is not 8 bytes.
pub fn parse_id_key(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_keys_round_trip_and_sort_by_id() {
        let a = message_key("q@x", MessageId(2));
        let b = message_key("q@x", MessageId(256));
        assert!(a < b);
        assert_eq!(parse_message_key(&b), Some(("q@x", MessageId(256))));
        assert!(b.starts_with(&queue_prefix("q@x")));
        assert!(!b.starts_with(&queue_prefix("q@")));
    }

    #[test]
    fn bad_keys_and_names_are_refused() {
        assert_eq!(parse_message_key(b"short"), None);
        assert_eq!(parse_message_key(&[0xff; 12]), None);
        assert!(check_queue_name("").is_err());
        assert!(check_queue_name("a\0b").is_err());
        assert!(check_queue_name(&"x".repeat(256)).is_err());
        assert!(check_queue_name("campaign:tenant@example.com!mx").is_ok());
    }

    #[test]
    fn chunk_keys_sort_before_every_single_and_round_trip() {
        let head = chunk_key(ChunkPart::Head, "q@x", 7);
        assert_eq!(parse_chunk_key(ChunkPart::Head, &head), Some(("q@x", 7)));
        assert_eq!(parse_chunk_key(ChunkPart::Chunk, &head), None);
        assert!(head.starts_with(&chunk_queue_prefix(ChunkPart::Head, "q@x")));
        assert!(chunk_key(ChunkPart::Chunk, "q", 9) < chunk_key(ChunkPart::Head, "a", 0));
        assert!(chunk_key(ChunkPart::Settled, "\u{7f}", u64::MAX).as_slice() < SINGLES_START);
        assert!(message_key("\u{1}", MessageId(0)).as_slice() >= SINGLES_START);
    }
}
