//! Large messages: sled writes log items over about 128 KiB to their own files in
//! `data/blobs/`, and skips one whose file is missing at open without a word, so the spool
//! keeps a marker per large record and reports a loss. (That a blob is durable before its
//! pointer is the vendored sled's to ensure; `tests/powercut/tests/busy_cuts.rs` holds it
//! under power cuts.)

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::msg;
use spool::{Spool, SpoolOptions};

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
