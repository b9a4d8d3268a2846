//! The vendored sled's merge change (`vendor/sled/PATCHES.md`, "A leaf does not merge into
//! a blob").
//!
//! The spool's messages tree keeps its chunk heads right of its chunks: the first leaf of
//! heads has the last leaf of chunks (~1 MiB, a blob file) as its left sibling. As a drain
//! deletes heads in key order, each emptied leaf of heads was merged into its left
//! sibling, and the first such merge, then every later one (each merges into the leaf the
//! previous ones merged into), rewrote that big leaf as a new blob file, fsynced. With the
//! change those leaves merge among themselves, and the big leaf is not rewritten.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

fn key(part: u8, id: u64) -> Vec<u8> {
    let mut k = vec![part];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn open(dir: &Path) -> sled::Db {
    // No flusher: its segment cleaning could write blob files of its own during the test.
    common::open_when_unlocked(dir, || {
        sled::Config::new().path(dir).flush_every_ms(None).open()
    })
}

fn blob_files(dir: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(dir.join("blobs")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

#[test]
fn emptied_leaves_of_small_values_do_not_rewrite_a_big_left_sibling() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    // A leaf of 12 values of 64 KiB (a blob leaf), then 20 leaves' worth of small values.
    let mut batch = sled::Batch::default();
    for id in 0..12 {
        batch.insert(key(b'c', id), vec![id as u8; 64 << 10]);
    }
    db.apply_batch(batch).unwrap();
    for id in 0..320 {
        db.insert(key(b'h', id), vec![1u8; 40]).unwrap();
    }
    db.flush().unwrap();
    let before = blob_files(dir.path());
    assert!(
        !before.is_empty(),
        "the leaf of big values should be a blob file"
    );

    // Delete the small values in key order, as a drain deletes chunk heads.
    for id in 0..320 {
        db.remove(key(b'h', id)).unwrap();
    }
    db.flush().unwrap();
    let written: Vec<String> = blob_files(dir.path())
        .difference(&before)
        .cloned()
        .collect();
    assert!(
        written.is_empty(),
        "deleting small values wrote {} new blob files ({written:?}): the leaf of big values \
         was rewritten by merges into it",
        written.len()
    );

    // Nothing was lost on the way, in memory and after a reopen.
    check(&db);
    drop(db);
    check(&open(dir.path()));
}

fn check(db: &sled::Db) {
    for id in 0..12 {
        let value = db.get(key(b'c', id)).unwrap().expect("big value kept");
        assert_eq!(value.len(), 64 << 10);
    }
    assert_eq!(db.scan_prefix([b'h']).count(), 0);
}
