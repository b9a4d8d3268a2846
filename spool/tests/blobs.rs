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

/// Over `spool::keys::LARGE_RECORD` and sled's blob threshold.
const LARGE: usize = 200 * 1024;

/// A large message whose blob file disappears (a restore that missed `blobs/`, a careless
/// cleanup) is reported lost, by id and queue, and its marker kept in quarantine: sled
/// itself skips the missing file without a word.
#[tokio::test]
async fn a_large_message_lost_with_its_blob_file_is_reported_not_silent() {
    let dir = tempfile::tempdir().unwrap();
    let before = blob_files(dir.path());
    let id = {
        let (spool, _) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        spool
            .enqueue(vec![msg("big@example.com", &vec![7; LARGE])])
            .await
            .unwrap()[0]
    };
    let new: Vec<PathBuf> = blob_files(dir.path())
        .into_keys()
        .filter(|p| !before.contains_key(p))
        .collect();
    assert!(
        !new.is_empty(),
        "the large message was not written as a blob"
    );
    new.iter().for_each(|p| std::fs::remove_file(p).unwrap());

    let (spool, report) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(
        spool.get(id).unwrap(),
        None,
        "sled kept the message after all"
    );
    assert_eq!(report.lost_large, vec![id.0]);
    let quarantined = spool.quarantined().unwrap();
    assert_eq!(quarantined.len(), 1);
    assert!(
        quarantined[0].reason.contains(&format!("message {id}"))
            && quarantined[0].reason.contains("big@example.com")
            && quarantined[0].reason.contains("blob"),
        "{}",
        quarantined[0].reason
    );
    drop(spool);
    // Reported once: the marker moved to quarantine.
    let (_, again) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert!(again.lost_large.is_empty());
}

/// Large messages that leave on purpose (delivered one by one or in a batch, purged, or
/// delivered just before the spool closes) take their markers with them: the next open
/// reports nothing lost.
#[tokio::test]
async fn large_messages_that_leave_on_purpose_are_not_reported_lost() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (spool, _) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let big = |q: &str| msg(q, &vec![1; LARGE]);
        spool
            .enqueue(vec![big("one"), big("many"), big("many"), big("purged")])
            .await
            .unwrap();
        spool.enqueue(vec![big("at_close")]).await.unwrap();
        let one = spool.lease("one", 10, u64::MAX).unwrap();
        spool.ack(&one[0].lease).unwrap();
        let many = spool.lease("many", 10, u64::MAX).unwrap();
        spool
            .ack_many(&many.iter().map(|l| &l.lease).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(spool.purge("purged").await.unwrap(), 1);
        spool.sync().await.unwrap();
        // Acked with no group after it: the close writes the delete (marker first).
        let at_close = spool.lease("at_close", 10, u64::MAX).unwrap();
        spool.ack(&at_close[0].lease).unwrap();
    }
    let (spool, report) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert!(report.lost_large.is_empty(), "{:?}", report.lost_large);
    assert!(spool.quarantined().unwrap().is_empty());
    assert_eq!(report.queues.len(), 0);
}
