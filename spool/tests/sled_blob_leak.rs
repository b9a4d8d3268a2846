//! The vendored sled's one fix (`vendor/sled/PATCHES.md`): a page that is a lone blob file,
//! replaced by a new version of itself (a merge into it, a split, a free), gets its old
//! blob deleted. sled 0.34.7 kept such files for good, and spool v2's chunk leaves are
//! blobs, so every fill and drain grew the spool's disk use (docs/performance.md, "Where
//! v2's disk goes"). This runs the same shape on sled alone: leaves of big values next to
//! leaves of small ones, filled and emptied in key order, the way chunks and their heads are.

mod common;

use std::path::Path;

fn blob_files(db_dir: &Path) -> usize {
    std::fs::read_dir(db_dir.join("blobs")).map_or(0, |entries| entries.count())
}

/// `area` 0 holds the big values (a chunk), 1 the small ones (its head), as in the spool's
/// key layout; ids only grow across rounds.
fn key(area: u8, id: u64) -> Vec<u8> {
    let mut key = vec![area];
    key.extend_from_slice(&id.to_be_bytes());
    key
}

#[test]
fn blob_files_do_not_pile_up_over_fill_and_drain_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::bare_sled(dir.path());
    let big = vec![7u8; 40 * 1024];
    let per_round = 96u64;
    let mut after_round = Vec::new();
    for round in 0..30u64 {
        let ids = round * per_round..(round + 1) * per_round;
        for id in ids.clone() {
            let mut batch = sled::Batch::default();
            batch.insert(key(0, id), big.clone());
            batch.insert(key(1, id), vec![1u8; 32]);
            db.apply_batch(batch).unwrap();
        }
        db.flush().unwrap();
        for id in ids {
            let mut batch = sled::Batch::default();
            batch.remove(key(0, id));
            batch.remove(key(1, id));
            db.apply_batch(batch).unwrap();
        }
        db.flush().unwrap();
        after_round.push(blob_files(dir.path()));
    }
    // Deletions are deferred until the log moves on, so the count swings from round to
    // round (4 to 15 files with the fix); with the leak it also climbs every round (from
    // 11 to 61 over these 30).
    let mean = |rounds: &[usize]| rounds.iter().sum::<usize>() as f64 / rounds.len() as f64;
    let (early, late) = (mean(&after_round[5..10]), mean(&after_round[25..]));
    assert!(
        late <= early + 8.0,
        "blob files after each round: {after_round:?}: sled keeps the blobs of replaced pages"
    );
}
