//! Recovery of chunked messages: the heads and settle bitmaps, never a payload.
//!
//! Each head (a chunk's header, stored apart from the chunk) gives the chunk's ids, creation
//! time and sizes; its settle bitmap says which of them are gone. The unsettled ones are
//! scheduled at their creation time, as at ingest. A bitmap that does not decode counts as
//! nothing settled (duplicates, never a loss) and is reported; a head that fails its CRC
//! quarantines the whole chunk with its raw bytes, and its ids are reported.

use std::collections::{HashMap, HashSet};

use crate::chunk::{decode_header, ChunkHeader, SettleBitmap};
use crate::commit::{Op, TreeId};
use crate::index::Slot;
use crate::keys::{self, ChunkPart};
use crate::recovery::{quarantine, Scan, ScanSource};

type KeyValue = (Vec<u8>, Vec<u8>);

/// Scans the heads and settle bitmaps into `scan`. A chunked message also found
/// dead-lettered keeps its dead-letter copy, as a single record does.
pub(crate) fn scan_chunks(
    trees: &impl ScanSource,
    dead: &HashSet<u64>,
    scan: &mut Scan,
) -> Result<(), sled::Error> {
    let mut settled: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let settled_prefix = keys::chunk_part_prefix(ChunkPart::Settled);
    trees.for_each_prefix(TreeId::Messages, &settled_prefix, &mut |key, raw| {
        settled.insert(key[settled_prefix.len()..].to_vec(), raw.to_vec());
    })?;
    let mut heads = Vec::new();
    let head_prefix = keys::chunk_part_prefix(ChunkPart::Head);
    trees.for_each_prefix(TreeId::Messages, &head_prefix, &mut |key, raw| {
        heads.push((key.to_vec(), raw.to_vec()));
    })?;
    // A head whose key does not parse heads nothing: it is quarantined on its own.
    let mut headed: HashSet<Vec<u8>> = heads
        .iter()
        .filter(|(key, _)| keys::parse_chunk_key(ChunkPart::Head, key).is_some())
        .map(|(key, _)| key[head_prefix.len()..].to_vec())
        .collect();
    let counted = read_head_count(trees)?;
    let walk = must_walk(trees, counted, headed.len())?;
    if walk {
        scan.report.chunks_walked = true;
        let restored = headless_chunks(trees, &headed, scan)?;
        headed.extend(
            restored
                .iter()
                .map(|(key, _)| key[head_prefix.len()..].to_vec()),
        );
        heads.extend(restored);
    }
    for (key, raw) in heads {
        // A head that heads nothing has no bitmap either: one under its key is litter.
        let suffix = &key[head_prefix.len()..];
        let bitmap = headed
            .contains(suffix)
            .then(|| settled.remove(suffix))
            .flatten();
        if scan_head(trees, dead, scan, &key, &raw, bitmap)? {
            scan.chunk_heads += 1;
        }
    }
    if counted.unwrap_or(0) != scan.chunk_heads || (walk && counted.is_none()) {
        let count = scan.chunk_heads.to_be_bytes().to_vec();
        scan.repairs
            .push(Op::Put(TreeId::Messages, keys::CHUNK_HEADS.to_vec(), count));
    }
    quarantine_foreign_keys(trees, scan)?;
    // A bitmap whose chunk is gone (its deletion was cut short) is only litter.
    for rest in settled.into_keys() {
        let mut key = settled_prefix.to_vec();
        key.extend_from_slice(&rest);
        scan.repairs.push(Op::Del(TreeId::Messages, key));
    }
    Ok(())
}

/// Whether the chunks must be walked for one that lost its head: the heads found are not
/// as many as counted. No count: a spool from before it (walked once, then counted) or one
/// that never held a chunk (nothing to walk).
fn must_walk(
    trees: &impl ScanSource,
    counted: Option<u64>,
    heads: usize,
) -> Result<bool, sled::Error> {
    Ok(match counted {
        Some(count) => count != heads as u64,
        None if heads > 0 => true,
        None => {
            let chunks = keys::chunk_part_prefix(ChunkPart::Chunk);
            let past_chunks = keys::chunk_part_prefix(ChunkPart::Head);
            trees.any_in_range(TreeId::Messages, &chunks, &past_chunks)?
        }
    })
}

/// The stored head count; `None` if there is none or it does not read as one.
fn read_head_count(trees: &impl ScanSource) -> Result<Option<u64>, sled::Error> {
    let raw = trees.get(TreeId::Messages, keys::CHUNK_HEADS)?;
    Ok(raw.and_then(|raw| Some(u64::from_be_bytes(raw.try_into().ok()?))))
}

/// Chunks with no head. Enqueue and settling write and delete a chunk and its head in one
/// batch, so only damage below sled parts them; the messages must still not be dropped in
/// silence. A chunk whose own header is sound gets its head written again (returned, to be
/// scanned like the others); any other is quarantined whole with its bytes.
///
/// This walks the chunk values, payloads and all (sled has no walk over keys alone): in P4
/// it cost 0.5 s and ~200 MiB of RSS at 200 000 queued messages. So it runs only when the
/// heads found do not match their count (`keys::CHUNK_HEADS`).
fn headless_chunks(
    trees: &impl ScanSource,
    headed: &HashSet<Vec<u8>>,
    scan: &mut Scan,
) -> Result<Vec<KeyValue>, sled::Error> {
    let chunk_prefix = keys::chunk_part_prefix(ChunkPart::Chunk);
    let mut headless = Vec::new();
    trees.for_each_prefix(TreeId::Messages, &chunk_prefix, &mut |key, raw| {
        if !headed.contains(&key[chunk_prefix.len()..]) {
            headless.push((key.to_vec(), raw.to_vec()));
        }
    })?;
    let mut restored = Vec::new();
    for (key, raw) in headless {
        let parsed = keys::parse_chunk_key(ChunkPart::Chunk, &key);
        match (parsed, decode_header(&raw)) {
            (Some((queue, first_id)), Ok(header)) if header.first_id == first_id => {
                tracing::warn!(
                    queue,
                    first_id,
                    "chunk without its head; head written again"
                );
                let head_key = keys::chunk_key(ChunkPart::Head, queue, first_id);
                let head = raw[..header.encoded_len()].to_vec();
                scan.repairs
                    .push(Op::Put(TreeId::Messages, head_key.clone(), head.clone()));
                scan.report.heads_restored += 1;
                restored.push((head_key, head));
            }
            (_, Err(e)) => {
                let reason = format!("a chunk with no head, whose own header is bad: {e}");
                quarantine(scan, TreeId::Messages, &key, &raw, reason);
            }
            _ => {
                let reason = "a chunk with no head, whose key does not match its header";
                quarantine(scan, TreeId::Messages, &key, &raw, reason.into());
            }
        }
    }
    Ok(restored)
}

/// Keys in the chunk area that are no chunk part (this build never writes them) are set
/// aside like any record that cannot be read. The two ranges are empty in a healthy spool,
/// so looking costs two lookups.
fn quarantine_foreign_keys(trees: &impl ScanSource, scan: &mut Scan) -> Result<(), sled::Error> {
    let mut foreign = Vec::new();
    let area = [keys::CHUNK_AREA];
    let first_part = keys::chunk_part_prefix(ChunkPart::Chunk);
    let past_parts = [keys::CHUNK_AREA, ChunkPart::Settled as u8 + 1];
    for (start, end) in [
        (&area[..], &first_part[..]),
        (&past_parts[..], keys::SINGLES_START),
    ] {
        trees.for_each_range(TreeId::Messages, start, Some(end), &mut |key, raw| {
            if key != keys::CHUNK_HEADS {
                foreign.push((key.to_vec(), raw.to_vec()));
            }
        })?;
    }
    for (key, raw) in foreign {
        let reason = "a key in the chunk area that is no chunk, head or bitmap".to_string();
        quarantine(scan, TreeId::Messages, &key, &raw, reason);
    }
    Ok(())
}

fn scan_head(
    trees: &impl ScanSource,
    dead: &HashSet<u64>,
    scan: &mut Scan,
    key: &[u8],
    raw: &[u8],
    bitmap: Option<Vec<u8>>,
) -> Result<bool, sled::Error> {
    let Some((queue, first_id)) = keys::parse_chunk_key(ChunkPart::Head, key) else {
        quarantine(
            scan,
            TreeId::Messages,
            key,
            raw,
            "not a chunk head's key".into(),
        );
        return Ok(false);
    };
    let header = match decode_header(raw) {
        Ok(header) if header.first_id == first_id => header,
        Ok(header) => {
            let reason = format!(
                "chunk head says first id {}, its key says {first_id}",
                header.first_id
            );
            return quarantine_chunk(trees, scan, queue, first_id, reason).map(|()| false);
        }
        Err(e) => {
            let reason = e.to_string();
            return quarantine_chunk(trees, scan, queue, first_id, reason).map(|()| false);
        }
    };
    let mut bits = match bitmap.map(|raw| (SettleBitmap::decode(&raw, header.count), raw)) {
        None => SettleBitmap::new(header.count),
        Some((Ok(bits), _)) => bits,
        Some((Err(e), raw)) => {
            // Quarantined like any damaged record; its chunk's messages are all due again
            // (duplicates, never a loss).
            let key = keys::chunk_key(ChunkPart::Settled, queue, first_id);
            let reason = format!("chunk {first_id} of queue {queue:?}: {e}");
            quarantine(scan, TreeId::Messages, &key, &raw, reason);
            SettleBitmap::new(header.count)
        }
    };
    let last_id = first_id + u64::from(header.count) - 1;
    scan.report.highest_id = scan.report.highest_id.max(last_id);
    let resolved = settle_dead_lettered(&header, &mut bits, dead);
    scan.report.duplicates_resolved += resolved;
    let key = |part| keys::chunk_key(part, queue, first_id);
    if bits.all_settled() {
        for part in [ChunkPart::Chunk, ChunkPart::Head, ChunkPart::Settled] {
            scan.repairs.push(Op::Del(TreeId::Messages, key(part)));
        }
        return Ok(false);
    }
    if resolved > 0 {
        let put = Op::Put(TreeId::Messages, key(ChunkPart::Settled), bits.encode());
        scan.repairs.push(put);
    }
    schedule_unsettled(scan, queue, &header, &bits);
    scan.index.chunks.add(queue, first_id, bits);
    Ok(true)
}

/// Sets the bits of messages that are also dead letters; returns how many.
fn settle_dead_lettered(header: &ChunkHeader, bits: &mut SettleBitmap, dead: &HashSet<u64>) -> u64 {
    let mut resolved = 0;
    for index in 0..usize::from(header.count) {
        if !bits.test(index) && dead.contains(&header.id(index).0) {
            bits.set(index);
            resolved += 1;
        }
    }
    resolved
}

fn schedule_unsettled(scan: &mut Scan, queue: &str, header: &ChunkHeader, bits: &SettleBitmap) {
    let counts = scan.report.queues.entry(queue.to_owned()).or_default();
    let unsettled = (0..usize::from(header.count)).filter(|&i| !bits.test(i));
    let messages = unsettled.map(|index| {
        let bytes = header.payload_sizes[index];
        counts.0 += 1;
        counts.1 += u64::from(bytes);
        let slot = Slot {
            created_ms: header.created_ms,
            bytes,
            attempts: 0,
        };
        (header.id(index).0, header.created_ms, slot)
    });
    scan.index.insert_all(queue, messages);
}

/// A head that cannot be trusted: the chunk goes to quarantine whole, with its raw bytes
/// (or the head's, if the chunk is gone too), and the head and bitmap are deleted. The
/// messages it held are reported through the quarantine entry and the damaged list.
fn quarantine_chunk(
    trees: &impl ScanSource,
    scan: &mut Scan,
    queue: &str,
    first_id: u64,
    reason: String,
) -> Result<(), sled::Error> {
    let key = |part| keys::chunk_key(part, queue, first_id);
    let reason = format!("chunk {first_id} of queue {queue:?}: {reason}");
    let chunk_key = key(ChunkPart::Chunk);
    match trees.get(TreeId::Messages, &chunk_key)? {
        Some(raw) => {
            quarantine(scan, TreeId::Messages, &chunk_key, &raw, reason);
            scan.repairs
                .push(Op::Del(TreeId::Messages, key(ChunkPart::Head)));
        }
        None => {
            let head_key = key(ChunkPart::Head);
            let raw = trees.get(TreeId::Messages, &head_key)?.unwrap_or_default();
            quarantine(scan, TreeId::Messages, &head_key, &raw, reason);
        }
    }
    scan.repairs
        .push(Op::Del(TreeId::Messages, key(ChunkPart::Settled)));
    Ok(())
}
