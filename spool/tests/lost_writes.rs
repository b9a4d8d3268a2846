//! sled losing durable writes behind the spool's back (what its recovery does with a
//! damaged log: it stops replaying there, silently). The test stands in for that damage by
//! putting back an older copy of `data/` while the ledger remembers the newer commits,
//! which is exactly the state such a recovery leaves.

mod common;

use std::path::Path;

use common::dirs::copy_dir;
use common::{lease_all, msg, open};
use spool::{Spool, SpoolError, SpoolOptions};

fn options(repair: bool, accept_lost_writes: bool) -> SpoolOptions {
    SpoolOptions {
        repair,
        accept_lost_writes,
        ..SpoolOptions::default()
    }
}

/// A spool whose sled database lost the second of two enqueued batches, and the ids of
/// that batch.
async fn spool_that_lost_a_batch(dir: &Path) -> Vec<u64> {
    let old = dir.join("old-data");
    {
        let spool = open(&dir.join("spool"));
        spool
            .enqueue(
                (0..10)
                    .map(|i| msg("q", format!("first {i}").as_bytes()))
                    .collect(),
            )
            .await
            .unwrap();
    }
    copy_dir(&dir.join("spool/data"), &old);
    let lost = {
        let spool = open(&dir.join("spool"));
        spool
            .enqueue(
                (0..5)
                    .map(|i| msg("q", format!("second {i}").as_bytes()))
                    .collect(),
            )
            .await
            .unwrap()
    };
    std::fs::remove_dir_all(dir.join("spool/data")).unwrap();
    copy_dir(&old, &dir.join("spool/data"));
    lost.into_iter().map(|id| id.0).collect()
}

#[tokio::test]
async fn a_clean_spool_reopens_without_a_loss() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let spool = open(dir.path());
        spool.enqueue(vec![msg("q", b"x")]).await.unwrap();
        let leased = lease_all(&spool, "q");
        assert_eq!(leased.len(), round + 1);
        for m in &leased {
            spool.release(&m.lease);
        }
    }
    let (_, report) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(report.lost_writes, None);
}

#[tokio::test]
async fn lost_commits_refuse_the_open_until_the_loss_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let lost_ids = spool_that_lost_a_batch(dir.path()).await;
    let spool_dir = dir.path().join("spool");

    // The daemon's options refuse, naming the missing ids and the tool to use.
    let err = match Spool::open(&spool_dir, SpoolOptions::default()) {
        Err(e) => e,
        Ok(_) => panic!("a spool that lost acknowledged messages opened without a word"),
    };
    let SpoolError::LostWrites { lost, .. } = &err else {
        panic!("wrong error: {err}");
    };
    assert_eq!(lost.commits, 1);
    assert_eq!(lost.ledger_highest_id, *lost_ids.iter().max().unwrap());
    assert!(lost.sled_highest_id < *lost_ids.iter().min().unwrap());
    let text = err.to_string();
    assert!(text.contains("verify --repair"), "{text}");
    assert!(
        text.contains(&format!(
            "ids from {} to {}",
            lost.sled_highest_id + 1,
            lost_ids[4]
        )),
        "{text}"
    );

    // Inspection sees what is left and the loss, and changes nothing.
    let (spool, report) = Spool::open(&spool_dir, options(false, true)).unwrap();
    assert_eq!(report.lost_writes.as_ref(), Some(lost));
    assert_eq!(report.queues["q"].0, 10);
    drop(spool);
    assert!(matches!(
        Spool::open(&spool_dir, SpoolOptions::default()),
        Err(SpoolError::LostWrites { .. })
    ));

    // Repair records the loss in quarantine; from then on the spool opens normally.
    let (spool, report) = Spool::open(&spool_dir, options(true, true)).unwrap();
    assert_eq!(report.quarantined_now, 1);
    let quarantined = spool.quarantined().unwrap();
    assert_eq!(quarantined.len(), 1);
    assert_eq!(quarantined[0].tree, "ledger");
    assert!(quarantined[0].reason.contains("lost 1 group commit"));
    drop(spool);
    let (spool, report) = Spool::open(&spool_dir, SpoolOptions::default()).unwrap();
    assert_eq!(report.lost_writes, None);
    assert_eq!(spool.stats(0).quarantine, 1, "the record of the loss stays");

    // Ids that were acknowledged before the loss are never handed out again.
    let fresh = spool.enqueue(vec![msg("q", b"after")]).await.unwrap();
    assert!(fresh[0].0 > *lost_ids.iter().max().unwrap());
}

#[tokio::test]
async fn a_missing_or_damaged_ledger_is_rebuilt_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = open(dir.path());
        spool.enqueue(vec![msg("q", b"kept")]).await.unwrap();
    }
    // Longer than a ledger: the rewrite must not leave a tail that reads as damage again.
    std::fs::write(dir.path().join("ledger"), vec![b'x'; 100]).unwrap();
    let (spool, report) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(report.queues["q"].0, 1);
    assert_eq!(
        std::fs::metadata(dir.path().join("ledger")).unwrap().len(),
        28,
        "the damaged ledger is replaced whole"
    );
    spool.enqueue(vec![msg("q", b"more")]).await.unwrap();
    drop(spool);
    std::fs::remove_file(dir.path().join("ledger")).unwrap();
    let (_, report) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(report.queues["q"].0, 2);
}
