//! Corruption test: damage single records behind the spool's back and check that each is
//! quarantined with its raw bytes while every other record survives.

mod common;

use common::{lease_all, msg, open_chunked};
use rand::seq::SliceRandom;

#[tokio::test]
async fn damaged_records_are_quarantined_and_the_rest_survive() {
    let dir = tempfile::tempdir().unwrap();
    let payloads: Vec<Vec<u8>> = (0..100u32)
        .map(|i| format!("message {i}").into_bytes())
        .collect();
    {
        // Single records: chunks have tests of their own (`chunk_corruption.rs`).
        let spool = open_chunked(dir.path(), false);
        spool
            .enqueue(payloads.iter().map(|p| msg("q", p)).collect())
            .await
            .unwrap();
        let victim = spool.lease("q", 1, common::LATER).unwrap().remove(0);
        spool.dead_letter(&victim, "550 test").await.unwrap();
    }
    // Flip one byte inside five message values and one dead-letter value, keeping sled's
    // own framing intact: only the spool's checksum can notice.
    let mut damaged = Vec::new();
    {
        let db = common::sled_open(&dir.path().join("data"));
        for (tree, n) in [("messages", 5), ("dead_letter", 1)] {
            let tree = db.open_tree(tree).unwrap();
            let mut entries: Vec<(sled::IVec, sled::IVec)> =
                tree.iter().map(Result::unwrap).collect();
            entries.shuffle(&mut rand::thread_rng());
            for (key, value) in entries.into_iter().take(n) {
                let mut bad = value.to_vec();
                let at = bad.len() / 2;
                bad[at] ^= 0x5a;
                tree.insert(&key, bad.clone()).unwrap();
                damaged.push((key.to_vec(), bad));
            }
        }
        db.flush().unwrap();
    }
    let (spool, report) = spool::Spool::open(dir.path(), spool::SpoolOptions::default()).unwrap();
    assert_eq!(report.quarantined_now, 6);
    assert_eq!(report.queues["q"].0, 99 - 5);
    let quarantined = spool.quarantined().unwrap();
    assert_eq!(quarantined.len(), 6);
    for (key, raw) in &damaged {
        let entry = quarantined
            .iter()
            .find(|e| &e.key == key)
            .expect("damaged key is quarantined");
        assert_eq!(&entry.raw, raw, "quarantine keeps the raw bytes");
        assert!(entry.reason.contains("checksum"), "{}", entry.reason);
    }
    let survivors: Vec<Vec<u8>> = lease_all(&spool, "q")
        .into_iter()
        .map(|l| l.message.payload)
        .collect();
    assert_eq!(survivors.len(), 94);
    assert!(survivors.iter().all(|p| payloads.contains(p)));
    assert_eq!(spool.stats(0).quarantine, 6);
    drop(spool);
    let (_, again) = spool::Spool::open(dir.path(), spool::SpoolOptions::default()).unwrap();
    assert_eq!(
        (again.quarantined_now, again.quarantine_total),
        (0, 6),
        "quarantine is durable and not repeated"
    );
}
