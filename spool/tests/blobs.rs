//! sled writes log items over about 128 KiB to their own files in `data/blobs/` and never
//! fsyncs them: the spool must, before it acknowledges the batch. Proven through the
//! fault-injection seam, which records every file the spool fsyncs.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::msg;
use spool::{Spool, SpoolOptions, SyncFaults};

fn blob_files(dir: &Path) -> HashMap<PathBuf, u64> {
    match std::fs::read_dir(dir.join("data").join("blobs")) {
        Ok(entries) => entries
            .map(|e| {
                let e = e.unwrap();
                (e.path(), e.metadata().unwrap().len())
            })
            .collect(),
        Err(_) => HashMap::new(),
    }
}

/// Many blob-sized enqueues in a row, each its own group commit, on a filesystem with
/// 1 s timestamps: most land in the same mtime tick of the blobs directory, which used
/// to skip the listing and acknowledge a blob never synced. (Linux 6.13+ gives a fresh
/// fine-grained mtime after one was read, so the seam makes the timestamps coarse.)
#[tokio::test]
async fn every_blob_a_commit_wrote_is_fsynced_before_the_ack() {
    let dir = tempfile::tempdir().unwrap();
    let faults = SyncFaults::default();
    faults.record();
    faults.coarse_mtimes(std::time::Duration::from_secs(1));
    let options = SpoolOptions {
        faults: faults.clone(),
        ..SpoolOptions::default()
    };
    let (spool, _) = Spool::open(dir.path(), options).unwrap();
    let mut unsynced = Vec::new();
    let mut blobs_seen = 0;
    for i in 0..40u8 {
        let before = blob_files(dir.path());
        spool
            .enqueue(vec![msg("big", &vec![i; 300 << 10])])
            .await
            .unwrap();
        let synced: HashMap<PathBuf, u64> = faults.synced().into_iter().collect();
        for (path, len) in blob_files(dir.path()) {
            if before.contains_key(&path) {
                continue;
            }
            blobs_seen += 1;
            if synced.get(&path) != Some(&len) {
                let when = synced.get(&path).copied();
                unsynced.push((i, path, len, when));
            }
        }
    }
    assert!(
        blobs_seen >= 40,
        "sled wrote only {blobs_seen} blob files for 40 blob-sized messages: the test proved nothing"
    );
    assert!(
        unsynced.is_empty(),
        "blob files acknowledged without an fsync at their final size \
         (enqueue #, path, size, size when synced): {unsynced:?}"
    );
    let blobs_dir = dir.path().join("data").join("blobs");
    assert!(
        faults.synced().iter().any(|(p, _)| *p == blobs_dir),
        "the blobs directory itself was never fsynced"
    );
}
