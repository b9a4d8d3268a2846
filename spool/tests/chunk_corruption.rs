//! Corruption of chunked messages (spool v2): a damaged record costs only itself, a
//! damaged head quarantines its chunk whole, a damaged settle bitmap redelivers (never
//! loses). Each case damages the bytes behind the spool's back, with sled's own framing
//! intact, so only the spool's checks can notice.

mod common;

use common::{lease_all, msg, open_chunked};
use spool::keys::{chunk_key, ChunkPart};
use spool::{MessageId, Spool, SpoolOptions};

const QUEUE: &str = "q";

/// A chunked spool holding ten messages of one enqueue; returns the first id.
async fn ten_chunked(dir: &std::path::Path) -> MessageId {
    let spool = open_chunked(dir, true);
    let ids = spool
        .enqueue(
            (0..10)
                .map(|i| msg(QUEUE, format!("m{i}").as_bytes()))
                .collect(),
        )
        .await
        .unwrap();
    ids[0]
}

/// Flips one byte of the value under `key` at `at(len)`; returns the damaged value.
fn damage(dir: &std::path::Path, key: &[u8], at: impl Fn(usize) -> usize) -> Vec<u8> {
    let db = common::sled_open(&dir.join("data"));
    let tree = db.open_tree("messages").unwrap();
    let mut bad = tree.get(key).unwrap().expect("the key exists").to_vec();
    let i = at(bad.len());
    bad[i] ^= 0x5a;
    tree.insert(key, bad.clone()).unwrap();
    db.flush().unwrap();
    bad
}

fn key_exists(dir: &std::path::Path, key: &[u8]) -> bool {
    let db = common::sled_open(&dir.join("data"));
    db.open_tree("messages").unwrap().contains_key(key).unwrap()
}

#[tokio::test]
async fn a_damaged_record_is_quarantined_alone_and_its_neighbours_are_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let first = ten_chunked(dir.path()).await;
    let key = chunk_key(ChunkPart::Chunk, QUEUE, first.0);
    // The last byte of the value is inside the last record's body.
    damage(dir.path(), &key, |len| len - 1);
    let spool = open_chunked(dir.path(), true);
    let leased = lease_all(&spool, QUEUE);
    let ids: Vec<u64> = leased.iter().map(|l| l.lease.id().0).collect();
    assert_eq!(ids, (first.0..first.0 + 9).collect::<Vec<_>>());
    spool.sync().await.unwrap(); // the quarantine move is durable with the next group
    let quarantined = spool.quarantined().unwrap();
    assert_eq!(quarantined.len(), 1);
    assert_eq!(
        quarantined[0].key, key,
        "the chunk's key names where it was"
    );
    assert!(quarantined[0].raw.len() < 64, "only the record's bytes");
    assert!(
        quarantined[0].reason.contains("checksum")
            && quarantined[0]
                .reason
                .contains(&format!("id {}", first.0 + 9)),
        "{}",
        quarantined[0].reason
    );
    let acks: Vec<&spool::Lease> = leased.iter().map(|l| &l.lease).collect();
    spool.ack_many(&acks).unwrap();
    drop(spool);
    assert!(
        !key_exists(dir.path(), &key),
        "every bit set: the chunk is gone"
    );
    let (_, report) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert!(report.queues.is_empty(), "{:?}", report.queues);
    assert_eq!(report.quarantine_total, 1);
}

#[tokio::test]
async fn a_damaged_head_quarantines_the_chunk_whole_with_its_raw_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let first = ten_chunked(dir.path()).await;
    let chunk = {
        let db = common::sled_open(&dir.path().join("data"));
        let tree = db.open_tree("messages").unwrap();
        let key = chunk_key(ChunkPart::Chunk, QUEUE, first.0);
        tree.get(key).unwrap().unwrap().to_vec()
    };
    damage(
        dir.path(),
        &chunk_key(ChunkPart::Head, QUEUE, first.0),
        |_| 20,
    );
    let (spool, report) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(report.quarantined_now, 1);
    assert!(report.queues.is_empty(), "nothing of it is scheduled");
    let quarantined = spool.quarantined().unwrap();
    assert_eq!(quarantined.len(), 1);
    assert_eq!(
        quarantined[0].key,
        chunk_key(ChunkPart::Chunk, QUEUE, first.0)
    );
    assert_eq!(
        quarantined[0].raw, chunk,
        "the whole chunk, every payload in it"
    );
    assert!(
        quarantined[0]
            .reason
            .contains(&format!("chunk {}", first.0)),
        "{}",
        quarantined[0].reason
    );
    assert!(spool.lease(QUEUE, 100, common::LATER).unwrap().is_empty());
}

#[tokio::test]
async fn a_damaged_settle_bitmap_redelivers_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let first = ten_chunked(dir.path()).await;
    {
        let spool = open_chunked(dir.path(), true);
        let leased = spool.lease(QUEUE, 4, common::LATER).unwrap();
        let acks: Vec<&spool::Lease> = leased.iter().map(|l| &l.lease).collect();
        spool.ack_many(&acks).unwrap();
    }
    let bitmap = chunk_key(ChunkPart::Settled, QUEUE, first.0);
    assert!(key_exists(dir.path(), &bitmap), "acks are written at close");
    {
        let (_, report) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        assert_eq!(report.queues[QUEUE].0, 6, "the acked four stay settled");
    }
    let bad = damage(dir.path(), &bitmap, |len| len - 1);
    let (spool, report) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(
        report.queues[QUEUE].0, 10,
        "all due again: duplicates, no loss"
    );
    assert!(
        report.damaged.iter().any(|d| d.key == bitmap),
        "{:?}",
        report.damaged
    );
    let quarantined = spool.quarantined().unwrap();
    assert!(quarantined.iter().any(|q| q.key == bitmap && q.raw == bad));
    assert_eq!(lease_all(&spool, QUEUE).len(), 10);
}

#[tokio::test]
async fn a_key_in_the_chunk_area_that_is_no_chunk_part_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    ten_chunked(dir.path()).await;
    let stray: &[u8] = b"\x00\x07stray";
    {
        let db = common::sled_open(&dir.path().join("data"));
        let tree = db.open_tree("messages").unwrap();
        tree.insert(stray, &b"bytes"[..]).unwrap();
        db.flush().unwrap();
    }
    let (spool, report) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(report.quarantined_now, 1);
    assert_eq!(report.queues[QUEUE].0, 10, "the chunk is untouched");
    let quarantined = spool.quarantined().unwrap();
    assert_eq!(quarantined[0].key, stray);
    assert_eq!(quarantined[0].raw, b"bytes");
    drop(spool);
    assert!(!key_exists(dir.path(), stray), "moved, not copied");
}

#[tokio::test]
async fn a_chunk_gone_under_its_head_is_reported_as_lost_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let first = ten_chunked(dir.path()).await;
    let key = chunk_key(ChunkPart::Chunk, QUEUE, first.0);
    {
        let db = common::sled_open(&dir.path().join("data"));
        db.open_tree("messages").unwrap().remove(&key).unwrap();
        db.flush().unwrap();
    }
    let spool = open_chunked(dir.path(), true);
    assert!(lease_all(&spool, QUEUE).is_empty());
    spool.sync().await.unwrap();
    let quarantined = spool.quarantined().unwrap();
    assert_eq!(quarantined.len(), 10, "one entry per lost message");
    assert!(quarantined
        .iter()
        .all(|q| q.key == key && q.reason.contains("lost")));
    drop(spool);
    let (_, report) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert!(report.queues.is_empty(), "settled: not indexed again");
    assert!(!key_exists(
        dir.path(),
        &chunk_key(ChunkPart::Head, QUEUE, first.0)
    ));
}

/// Removes `key` from the messages tree behind the spool's back.
fn remove(dir: &std::path::Path, key: &[u8]) {
    let db = common::sled_open(&dir.join("data"));
    db.open_tree("messages").unwrap().remove(key).unwrap();
    db.flush().unwrap();
}

#[tokio::test]
async fn a_chunk_whose_head_is_gone_gets_it_back_from_its_own_header() {
    let dir = tempfile::tempdir().unwrap();
    let first = ten_chunked(dir.path()).await;
    {
        // Three delivered: the bitmap still counts once the head is back.
        let spool = open_chunked(dir.path(), true);
        let leased = lease_all(&spool, QUEUE);
        let acks: Vec<&spool::Lease> = leased[..3].iter().map(|l| &l.lease).collect();
        spool.ack_many(&acks).unwrap();
    }
    let head = chunk_key(ChunkPart::Head, QUEUE, first.0);
    remove(dir.path(), &head);
    let (spool, report) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert!(report.chunks_walked, "one head fewer than counted");
    assert_eq!(report.heads_restored, 1);
    let leased = lease_all(&spool, QUEUE);
    let ids: Vec<u64> = leased.iter().map(|l| l.lease.id().0).collect();
    assert_eq!(ids, (first.0 + 3..first.0 + 10).collect::<Vec<_>>());
    assert!(spool.quarantined().unwrap().is_empty());
    drop(spool);
    assert!(key_exists(dir.path(), &head), "the head is written back");
    let (_, report) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(report.heads_restored, 0, "repaired once");
    assert!(!report.chunks_walked, "the head count was written back");
    assert_eq!(report.queues[QUEUE].0, 7);
}

#[tokio::test]
async fn a_chunk_with_no_head_and_a_bad_header_is_quarantined_whole() {
    let dir = tempfile::tempdir().unwrap();
    let first = ten_chunked(dir.path()).await;
    let key = chunk_key(ChunkPart::Chunk, QUEUE, first.0);
    remove(dir.path(), &chunk_key(ChunkPart::Head, QUEUE, first.0));
    let bad = damage(dir.path(), &key, |_| 6); // inside the header
    let spool = open_chunked(dir.path(), true);
    assert!(lease_all(&spool, QUEUE).is_empty());
    let quarantined = spool.quarantined().unwrap();
    assert_eq!(quarantined.len(), 1);
    assert_eq!((&quarantined[0].key, &quarantined[0].raw), (&key, &bad));
    assert!(quarantined[0].reason.contains("no head"));
    drop(spool);
    assert!(!key_exists(dir.path(), &key), "moved, not copied");
}
