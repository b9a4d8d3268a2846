//! The recovery scan over any tree contents: every record is either indexed or set aside
//! with its exact bytes, never dropped and never a panic; repairs are idempotent.
//!
//! Structure-aware: the input is a list of 8-byte entries `[tree, kind, queue, id, a, b,
//! c, d]`. `kind` picks a valid message under its own key, one under a key that does not
//! match it, a valid record with a flipped byte or cut short, bytes of no record at all, a
//! large message, or (in meta) an id high-water mark or a large-message marker; the rest
//! pick queue, id and mutation offsets. Ids collide on purpose (queued and dead-lettered
//! copies, markers of messages that are or are not there).
//! The trees are ordered maps (`spool::fuzzing`), so the target runs tens of
//! thousands of inputs a second; `spool_files` damages the real files instead.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use spool::fuzzing::{tree_label, ScanHarness, TREES};
use spool::{keys, record, Message, MessageId, Meta};

const QUEUES: [&str; 4] = ["kafka", "amqp", "camp:ten@example.com", "q"];
const MESSAGES: usize = 0;
const DEAD_LETTER: usize = 1;
const QUARANTINE: usize = 2;
const META: usize = 3;

fn message(queue: &str, id: u64, e: &[u8]) -> Message {
    Message {
        id: MessageId(id),
        queue: queue.to_string(),
        created_ms: u64::from(e[4]) * 1000,
        attempts: u32::from(e[5] % 4),
        due_ms: u64::from(e[6]) * 7,
        last_error: (e[5] % 3 == 0).then(|| "421 later".to_string()),
        meta: Meta::new(),
        payload: vec![e[7]; usize::from(e[7] % 32)],
    }
}

/// Turns one 8-byte entry into a (tree, key, value) to store.
fn entry(e: &[u8]) -> (usize, Vec<u8>, Vec<u8>) {
    let tree = usize::from(e[0]) % TREES.len();
    let queue = QUEUES[usize::from(e[2]) % QUEUES.len()];
    let id = u64::from(e[3] % 16);
    let msg = message(queue, id, e);
    let valid = record::encode(&msg);
    let key = match tree {
        MESSAGES => keys::message_key(queue, MessageId(id)),
        _ => keys::id_key(id).to_vec(),
    };
    let (key, value) = match e[1] % 8 {
        0 | 1 => (key, valid),
        2 => (keys::message_key(queue, MessageId(id + 1)), valid),
        3 => {
            let mut v = valid;
            let at = usize::from(e[4]) % v.len();
            v[at] ^= e[5].max(1);
            (key, v)
        }
        4 => {
            let mut v = valid;
            v.truncate(usize::from(e[4]) % v.len());
            (key, v)
        }
        5 => (key, e[4..].to_vec()),
        6 => (e[2..].to_vec(), valid),
        7 if tree == META && e[4] % 2 == 0 => {
            (keys::ID_HWM.to_vec(), e[..usize::from(e[4] % 9)].to_vec())
        }
        // A large-message marker, with or without its message.
        7 if tree == META => (keys::large_marker(id), queue.as_bytes().to_vec()),
        // A large message (it gets a marker if it has none).
        _ => {
            let mut big = msg;
            big.payload = vec![e[7]; spool::fuzzing::LARGE_RECORD];
            (key, record::encode(&big))
        }
    };
    (tree, key, value)
}

fuzz_target!(|data: &[u8]| {
    let h = ScanHarness::new();
    for e in data.chunks_exact(8).take(64) {
        let (tree, key, value) = entry(e);
        h.insert(tree, &key, &value);
    }
    let before: Vec<Vec<(Vec<u8>, Vec<u8>)>> = (0..TREES.len()).map(|t| h.entries(t)).collect();
    let first = h
        .scan_and_repair()
        .expect("a scan over healthy trees does not fail");
    let r = &first.report;

    // Every record is accounted for: indexed, dead-lettered, a resolved duplicate, or damaged.
    let damaged_in = |t: usize| r.damaged.iter().filter(|d| d.tree == tree_label(t)).count();
    let indexed: u64 = r.queues.values().map(|(n, _)| n).sum();
    // Single records are keys from 0x01 on; 0x00 starts the chunk area (spool v2).
    let single = |key: &[u8]| key >= keys::SINGLES_START;
    let singles = before[MESSAGES].iter().filter(|(k, _)| single(k)).count();
    let damaged_singles = r
        .damaged
        .iter()
        .filter(|d| d.tree == tree_label(MESSAGES) && single(&d.key))
        .count();
    assert_eq!(
        singles as u64,
        indexed + r.duplicates_resolved + damaged_singles as u64
    );
    // No input here makes a valid chunk header (35 bytes or more, with a CRC), so in the
    // chunk area every head is quarantined (its chunk's bytes, or its own when there is no
    // chunk), every chunk too (through its bad head, or as a chunk with no head whose header
    // is bad), and every key that is no chunk part. Bitmaps of no chunk are litter.
    let damaged_key = |key: &[u8]| r.damaged.iter().any(|d| d.key == key);
    for (key, _) in before[MESSAGES].iter().filter(|(k, _)| !single(k)) {
        match key.get(1) {
            Some(3) => {}
            Some(1) => assert!(damaged_key(key), "chunk {key:?} unreported"),
            Some(2) => {
                let mut chunk = key.clone();
                chunk[1] = 1;
                assert!(
                    damaged_key(key) || damaged_key(&chunk),
                    "head {key:?} unreported"
                );
            }
            _ => assert!(damaged_key(key), "chunk-area key {key:?} unreported"),
        }
    }
    assert_eq!(
        before[DEAD_LETTER].len() as u64,
        r.dead_letter + damaged_in(DEAD_LETTER) as u64
    );
    // The index hands out exactly what the report counts, per queue.
    let counted: BTreeMap<String, usize> = r
        .queues
        .iter()
        .map(|(q, (n, _))| (q.clone(), *n as usize))
        .collect();
    assert_eq!(first.leasable, counted);
    // Each damaged record left its tree and sits in quarantine with its exact bytes.
    let quarantined: Vec<spool::QuarantineEntry> = h
        .entries(QUARANTINE)
        .iter()
        .filter_map(|(_, raw)| record::decode(raw).ok())
        .collect();
    let after: Vec<BTreeMap<Vec<u8>, Vec<u8>>> = (0..TREES.len())
        .map(|t| h.entries(t).into_iter().collect())
        .collect();
    // Ids continue above every record still stored (litter such as a bitmap of no chunk
    // is deleted, so whatever it held does not count).
    for t in [MESSAGES, DEAD_LETTER] {
        for (key, raw) in &after[t] {
            if let Ok(m) = record::decode::<Message>(raw) {
                assert!(
                    r.highest_id >= m.id.0,
                    "ids would be reused above {}: {key:?} holds id {}",
                    r.highest_id,
                    m.id.0
                );
            }
        }
    }
    for d in &r.damaged {
        let t = (0..TREES.len()).find(|t| tree_label(*t) == d.tree).unwrap();
        let raw = &before[t].iter().find(|(k, _)| *k == d.key).unwrap().1;
        assert!(
            !after[t].contains_key(&d.key),
            "damaged record left in place"
        );
        assert!(
            quarantined
                .iter()
                .any(|q| q.key == d.key && q.raw == *raw && q.tree == d.tree),
            "damaged record not quarantined with its bytes"
        );
    }
    // Repairs are idempotent: a second open finds nothing more to repair and the same queues.
    let second = h.scan_and_repair().unwrap();
    assert!(
        second.report.damaged.is_empty(),
        "{:?}",
        second.report.damaged
    );
    assert_eq!(second.report.duplicates_resolved, 0);
    assert_eq!(second.report.queues, first.report.queues);
    assert_eq!(
        second.report.quarantine_total,
        first.report.quarantine_total
    );
});
