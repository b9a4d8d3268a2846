//! One test per spool operation and per promise of the contract it keeps.

mod common;

use common::{lease_all, msg, open, LATER};
use spool::{Message, MessageId, Spool, SpoolError, SpoolOptions, SyncFaults};

#[tokio::test]
async fn enqueued_messages_come_back_fifo_and_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let payloads: Vec<Vec<u8>> = vec![vec![], (0..=255u8).collect(), b"\0\xff\n".to_vec()];
    let batch = payloads.iter().map(|p| msg("q", p)).collect();
    let ids = spool.enqueue(batch).await.unwrap();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids are monotonic: {ids:?}"
    );
    let leased: Vec<Message> = lease_all(&spool, "q")
        .into_iter()
        .map(|l| l.message)
        .collect();
    assert_eq!(leased.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
    let got: Vec<&Vec<u8>> = leased.iter().map(|m| &m.payload).collect();
    assert_eq!(got, payloads.iter().collect::<Vec<_>>());
    assert_eq!(leased[0].meta, msg("q", b"").meta);
}

#[tokio::test]
async fn ten_mib_payload_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..10 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    {
        let spool = open(dir.path());
        spool.enqueue(vec![msg("big", &big)]).await.unwrap();
    }
    let spool = open(dir.path());
    let leased = lease_all(&spool, "big");
    assert_eq!(leased.len(), 1);
    assert!(
        leased[0].message.payload == big,
        "10 MiB payload differs after reopen"
    );
}

#[tokio::test]
async fn ack_deletes_and_the_delete_survives_reopen_after_sync() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = open(dir.path());
        spool
            .enqueue(vec![msg("q", b"a"), msg("q", b"b")])
            .await
            .unwrap();
        let leased = lease_all(&spool, "q");
        spool.ack(&leased[0].lease).unwrap();
        assert!(
            spool.ack(&leased[0].lease).is_err(),
            "a settled message cannot be acked twice"
        );
        spool.sync().await.unwrap();
    }
    let spool = open(dir.path());
    let left = lease_all(&spool, "q");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].message.payload, b"b");
}

/// An ack never waits for the disk (contract 7: the dispatcher acks on an async thread).
/// With the commit thread stuck in a sync that does not return, acks of a single record
/// and of a chunked message still return at once, and listings stop showing them; once
/// the disk answers, both deletes are written and survive a reopen.
#[tokio::test]
async fn an_ack_does_not_wait_for_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let faults = SyncFaults::default();
    {
        let options = SpoolOptions {
            faults: faults.clone(),
            chunked_ingest: true,
            ..SpoolOptions::default()
        };
        let spool = std::sync::Arc::new(Spool::open(dir.path(), options).unwrap().0);
        // One message alone is a single record; two of a queue make a chunk.
        spool.enqueue(vec![msg("single", b"s")]).await.unwrap();
        let pair = vec![msg("chunked", b"1"), msg("chunked", b"2")];
        spool.enqueue(pair).await.unwrap();
        let (single, chunked) = (lease_all(&spool, "single"), lease_all(&spool, "chunked"));
        faults.stall_syncs();
        let stuck = tokio::spawn({
            let spool = spool.clone();
            async move { spool.enqueue(vec![msg("other", b"x")]).await }
        });
        while !faults.is_stalled() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        spool.ack(&single[0].lease).unwrap();
        spool.ack_many(&[&chunked[0].lease]).unwrap();
        assert!(spool.list("single", 10).unwrap().is_empty());
        assert_eq!(spool.list("chunked", 10).unwrap().len(), 1);
        assert!(
            !stuck.is_finished(),
            "the commit thread was stuck meanwhile"
        );
        faults.heal();
        stuck.await.unwrap().unwrap();
        spool.sync().await.unwrap();
    }
    let spool = open(dir.path());
    assert!(lease_all(&spool, "single").is_empty());
    let left = lease_all(&spool, "chunked");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].message.payload, b"2");
}

#[tokio::test]
async fn ack_many_deletes_the_leased_and_reports_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = open(dir.path());
        let batch = (0..10)
            .map(|i| msg("q", format!("m{i}").as_bytes()))
            .collect();
        spool.enqueue(batch).await.unwrap();
        let leased = lease_all(&spool, "q");
        spool.ack(&leased[9].lease).unwrap();
        // Five leased plus one already settled: the five go, the error names the other.
        let mut some: Vec<&spool::Lease> = leased[..5].iter().map(|l| &l.lease).collect();
        some.push(&leased[9].lease);
        match spool.ack_many(&some) {
            Err(spool::SpoolError::NotLeased { id, .. }) => assert_eq!(id, leased[9].lease.id()),
            other => panic!("expected NotLeased, got {other:?}"),
        }
        spool.sync().await.unwrap();
    }
    let spool = open(dir.path());
    let left: Vec<Vec<u8>> = lease_all(&spool, "q")
        .into_iter()
        .map(|l| l.message.payload)
        .collect();
    let want: Vec<Vec<u8>> = (5..9).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(left, want);
}

#[tokio::test]
async fn retry_persists_attempts_due_time_and_error() {
    let dir = tempfile::tempdir().unwrap();
    let due = spool::now_ms() + 60_000;
    {
        let spool = open(dir.path());
        spool.enqueue(vec![msg("q", b"x")]).await.unwrap();
        let m = lease_all(&spool, "q").remove(0);
        spool.retry(&m, "451 broker busy", due).await.unwrap();
        assert!(
            spool.lease("q", 10, due - 1).unwrap().is_empty(),
            "not due before next_due"
        );
    }
    let spool = open(dir.path());
    assert!(
        spool.lease("q", 10, due - 1).unwrap().is_empty(),
        "due time persisted"
    );
    let m = spool.lease("q", 10, due).unwrap().remove(0).message;
    assert_eq!((m.attempts, m.due_ms), (1, due));
    assert_eq!(m.last_error.as_deref(), Some("451 broker busy"));
}

/// Settling takes only the small lease handle, so retry and dead-letter rebuild the stored
/// record themselves: the payload, meta and creation time must come through unchanged.
#[tokio::test]
async fn retry_and_dead_letter_by_lease_keep_payload_and_meta() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let ids = spool
        .enqueue(vec![msg("q", b"retry me"), msg("q", b"bury me")])
        .await
        .unwrap();
    let leased = lease_all(&spool, "q");
    let (retried, dead) = (&leased[0], &leased[1]);
    assert_eq!(
        (
            retried.lease.id(),
            retried.lease.queue(),
            retried.lease.attempts()
        ),
        (ids[0], "q", 0),
        "the handle names the message it came with"
    );
    assert_eq!(retried.lease.created_ms(), retried.message.created_ms);
    assert_eq!(retried.lease.due_ms(), retried.message.due_ms);
    spool.retry(retried, "451 later", 1).await.unwrap();
    spool.dead_letter(dead, "550 no").await.unwrap();
    let back = lease_all(&spool, "q").remove(0).message;
    let want = Message {
        attempts: 1,
        due_ms: 1,
        last_error: Some("451 later".into()),
        ..retried.message.clone()
    };
    assert_eq!(back, want);
    let buried = spool.dead_letters().unwrap().remove(0);
    let want = Message {
        last_error: Some("550 no".into()),
        ..dead.message.clone()
    };
    assert_eq!(buried, want);
}

#[tokio::test]
async fn dead_letter_keeps_the_message_out_of_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = open(dir.path());
        spool.enqueue(vec![msg("q", b"poison")]).await.unwrap();
        let m = lease_all(&spool, "q").remove(0);
        spool.dead_letter(&m, "550 rejected").await.unwrap();
        assert!(lease_all(&spool, "q").is_empty());
    }
    let spool = open(dir.path());
    assert!(lease_all(&spool, "q").is_empty());
    let dead = spool.dead_letters().unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload, b"poison");
    assert_eq!(dead[0].last_error.as_deref(), Some("550 rejected"));
    assert_eq!(spool.stats(0).dead_letter, 1);
}

#[tokio::test]
async fn release_makes_a_lease_due_again_and_restart_releases_all() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = open(dir.path());
        spool
            .enqueue(vec![msg("q", b"1"), msg("q", b"2")])
            .await
            .unwrap();
        let leased = lease_all(&spool, "q");
        assert!(lease_all(&spool, "q").is_empty());
        spool.release(&leased[0].lease);
        assert_eq!(lease_all(&spool, "q").len(), 1);
    }
    let spool = open(dir.path());
    assert_eq!(
        lease_all(&spool, "q").len(),
        2,
        "leases do not survive a restart"
    );
}

#[tokio::test]
async fn ids_are_never_reused_even_after_everything_is_acked() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let spool = open(dir.path());
        let ids = spool.enqueue(vec![msg("q", b"1")]).await.unwrap();
        let m = lease_all(&spool, "q").remove(0);
        spool.ack(&m.lease).unwrap();
        spool.sync().await.unwrap();
        ids[0]
    };
    let spool = open(dir.path());
    let second = spool.enqueue(vec![msg("q", b"2")]).await.unwrap()[0];
    assert!(second > first, "{second} must be above {first}");
}

#[test]
fn a_second_opener_is_told_who_holds_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let _held = open(dir.path());
    let err = Spool::open(dir.path(), SpoolOptions::default())
        .err()
        .expect("must be locked");
    assert!(matches!(err, SpoolError::Locked { .. }));
    let text = err.to_string();
    assert!(
        text.contains(&format!("locked by pid {}", std::process::id())),
        "{text}"
    );
}

#[tokio::test]
async fn bad_queue_names_are_refused_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let err = spool
        .enqueue(vec![msg("ok", b"1"), msg("bad\0name", b"2")])
        .await;
    assert!(matches!(err, Err(SpoolError::InvalidQueueName { .. })));
    assert!(
        spool.queue_names().is_empty(),
        "nothing of a refused batch is queued"
    );
}

/// fsyncgate: after a failed fsync the kernel may have dropped the pages and a later
/// fsync can report success for them, so the spool refuses every write (even once the
/// disk is healthy again) until a reopen reads the disk again.
#[tokio::test]
async fn failed_fsync_poisons_the_spool_until_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let faults = SyncFaults::default();
    let options = SpoolOptions {
        faults: faults.clone(),
        ..SpoolOptions::default()
    };
    {
        let (spool, _) = Spool::open(dir.path(), options.clone()).unwrap();
        spool.enqueue(vec![msg("q", b"before")]).await.unwrap();
        assert_eq!(spool.poisoned(), None);
        faults.fail_with(std::io::ErrorKind::StorageFull);
        let err = spool.enqueue(vec![msg("q", b"lost?")]).await;
        assert!(matches!(err, Err(SpoolError::NotDurable(_))), "{err:?}");
        faults.heal();
        let err = spool.enqueue(vec![msg("q", b"after")]).await;
        assert!(
            matches!(err, Err(SpoolError::Poisoned { .. })),
            "a healed disk is not trusted before a reopen: {err:?}"
        );
        let why = spool.poisoned().expect("poisoned() reports it");
        assert!(why.contains("restart"), "{why}");
        assert!(why.contains("injected sync failure"), "{why}");
        assert!(
            matches!(
                spool.lease("q", 10, LATER),
                Err(SpoolError::Poisoned { .. })
            ),
            "a poisoned spool hands nothing out"
        );
        assert!(matches!(
            spool.sync().await,
            Err(SpoolError::Poisoned { .. })
        ));
    }
    let (spool, _) = Spool::open(dir.path(), options).unwrap();
    assert_eq!(spool.poisoned(), None, "a reopen reads the disk again");
    let payloads: Vec<Vec<u8>> = lease_all(&spool, "q")
        .into_iter()
        .map(|l| l.message.payload)
        .collect();
    assert_eq!(
        payloads,
        vec![b"before".to_vec()],
        "what failed, and what came after, is not there"
    );
    spool.enqueue(vec![msg("q", b"kept")]).await.unwrap();
}

/// A spool with a 300 ms commit deadline, and the seam that can stall its fsyncs.
fn open_with_deadline(dir: &std::path::Path) -> (Spool, SyncFaults) {
    let faults = SyncFaults::default();
    let options = SpoolOptions {
        faults: faults.clone(),
        commit_deadline: std::time::Duration::from_millis(300),
        ..SpoolOptions::default()
    };
    (Spool::open(dir, options).unwrap().0, faults)
}

/// A disk whose fsync hangs (a dead NFS server, a drive that stopped answering) must not
/// hang ingest: past the commit deadline the write fails and the spool is poisoned, so every
/// later write fails at once (the daemon answers 503 and `/readyz` says why).
#[tokio::test]
async fn a_hung_fsync_poisons_the_spool_after_the_commit_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, faults) = open_with_deadline(dir.path());
    spool.enqueue(vec![msg("q", b"before")]).await.unwrap();
    faults.stall_syncs();
    let bounded = std::time::Duration::from_secs(10);
    let err = tokio::time::timeout(bounded, spool.enqueue(vec![msg("q", b"stuck")]))
        .await
        .expect("the write hung with the disk instead of failing after the deadline");
    assert!(matches!(err, Err(SpoolError::Poisoned { .. })), "{err:?}");
    let why = spool.poisoned().expect("poisoned() reports it");
    assert!(why.contains("did not finish within"), "{why}");
    let err = tokio::time::timeout(bounded, spool.enqueue(vec![msg("q", b"later")]))
        .await
        .expect("a later write waited too");
    assert!(matches!(err, Err(SpoolError::Poisoned { .. })), "{err:?}");
    // The disk answers again: the stuck commit ends and the spool can close.
    faults.heal();
}

/// The same for [`Spool::enqueue_blocking`] (threads outside a runtime: tools, tests): it
/// keeps the deadline too, instead of waiting on the commit for ever.
#[test]
fn a_hung_fsync_fails_a_blocking_enqueue_after_the_commit_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, faults) = open_with_deadline(dir.path());
    spool.enqueue_blocking(vec![msg("q", b"before")]).unwrap();
    faults.stall_syncs();
    let started = std::time::Instant::now();
    let err = spool.enqueue_blocking(vec![msg("q", b"stuck")]);
    assert!(matches!(err, Err(SpoolError::Poisoned { .. })), "{err:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "failed only after {:?}",
        started.elapsed()
    );
    faults.heal();
}

#[tokio::test]
async fn stats_report_counts_bytes_due_and_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    spool
        .enqueue(vec![msg("a", b"12345"), msg("a", b"1"), msg("b", b"")])
        .await
        .unwrap();
    let m = spool.lease("a", 1, LATER).unwrap().remove(0);
    spool.retry(&m, "451", LATER).await.unwrap();
    let stats = spool.stats(spool::now_ms());
    let a = &stats.queues["a"];
    assert_eq!((a.count, a.bytes, a.due_now), (2, 6, 1));
    assert_eq!(a.attempts.get(&1), Some(&1));
    assert_eq!(stats.queues["b"].count, 1);
    assert!(spool.get(m.lease.id()).unwrap().is_some());
}

#[tokio::test]
async fn many_concurrent_producers_share_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let tasks: Vec<_> = (0..64)
        .map(|n| {
            let spool = spool.clone();
            tokio::spawn(async move {
                for i in 0..20 {
                    spool
                        .enqueue(vec![msg("q", format!("{n}-{i}").as_bytes())])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(lease_all(&spool, "q").len(), 64 * 20);
    let (groups, jobs, _) = spool.commit_stats();
    assert_eq!(jobs, 64 * 20);
    // 64 producers waiting at once must share syncs: one group per job would mean the
    // commit thread synced each caller alone.
    assert!(
        groups * 4 <= jobs,
        "{jobs} concurrent enqueues took {groups} group commits: they did not share syncs"
    );
}

#[tokio::test]
async fn disk_use_stays_bounded_over_fill_and_drain_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let payload = vec![7u8; 1024];
    let mut sizes = Vec::new();
    for _cycle in 0..6 {
        for _ in 0..20 {
            let batch = (0..100).map(|_| msg("q", &payload)).collect();
            spool.enqueue(batch).await.unwrap();
        }
        for m in lease_all(&spool, "q") {
            spool.ack(&m.lease).unwrap();
        }
        spool.sync().await.unwrap();
        sizes.push(spool.disk_bytes().unwrap());
    }
    // 2 000 KiB pass through per cycle; the files must not keep all six cycles.
    let (first, last) = (sizes[1], *sizes.last().unwrap());
    assert!(
        last < first * 2 + (4 << 20),
        "spool grew from {first} to {last} bytes: {sizes:?}"
    );
}

/// A record imported under the id of a message delivered a moment before (its delete not
/// yet written, as acks leave deletes to the commit thread) is kept: the import's write
/// comes after the delete, never under it.
#[tokio::test]
async fn an_import_right_after_an_ack_of_the_same_id_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = open(dir.path());
        spool.enqueue(vec![msg("q", b"delivered")]).await.unwrap();
        let leased = lease_all(&spool, "q").remove(0);
        spool.ack(&leased.lease).unwrap();
        let mut again = leased.message.clone();
        again.payload = b"imported".to_vec();
        assert_eq!(spool.import(vec![again], vec![]).await.unwrap(), (1, 0));
        let back = lease_all(&spool, "q");
        assert_eq!(back.len(), 1, "the import is leasable");
        assert_eq!(back[0].message.payload, b"imported");
        spool.release(&back[0].lease);
        spool.sync().await.unwrap();
    }
    let back = lease_all(&open(dir.path()), "q");
    assert_eq!(back.len(), 1, "the import survives a reopen");
    assert_eq!(back[0].message.payload, b"imported");
}

/// An imported id near u64::MAX used to make the next enqueue wrap around and overwrite a
/// queued message: imports are bounded, and the id counter refuses rather than wraps.
#[tokio::test]
async fn imported_ids_are_bounded_and_ids_never_wrap() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    let mut queued = spool.enqueue(vec![msg("q", b"first")]).await.unwrap();
    let exported = |id: u64, payload: &[u8]| Message {
        id: MessageId(id),
        queue: "q".into(),
        created_ms: 1,
        attempts: 0,
        due_ms: 1,
        last_error: None,
        meta: Default::default(),
        payload: payload.to_vec(),
    };
    let err = spool
        .import(vec![exported(u64::MAX - 1, b"too high")], vec![])
        .await;
    assert!(
        matches!(err, Err(SpoolError::IdOutOfRange { id, .. }) if id == u64::MAX - 1),
        "{err:?}"
    );
    let leased = lease_all(&spool, "q");
    assert_eq!(leased.len(), 1, "nothing of it was written");
    spool.release(&leased[0].lease);
    // The largest id accepted: the next enqueue has no id left and says so.
    spool
        .import(vec![exported(MessageId::MAX.0, b"last id")], vec![])
        .await
        .unwrap();
    let err = spool.enqueue(vec![msg("q", b"would wrap")]).await;
    assert!(
        matches!(err, Err(SpoolError::IdsExhausted { .. })),
        "{err:?}"
    );
    queued.push(MessageId::MAX);
    let mut ids: Vec<MessageId> = lease_all(&spool, "q")
        .iter()
        .map(|l| l.lease.id())
        .collect();
    ids.sort();
    assert_eq!(ids, queued, "no queued message was overwritten");
}

/// A settlement that fails gives its lease back: the message is waiting again (due at its
/// old time), never left in flight until a restart. Here the spool is poisoned, so the
/// ack, the retry's hand-off to the writer and the dead-letter's all fail.
#[tokio::test]
async fn failed_settlements_give_their_leases_back() {
    let dir = tempfile::tempdir().unwrap();
    let faults = SyncFaults::default();
    let options = SpoolOptions {
        faults: faults.clone(),
        ..SpoolOptions::default()
    };
    let (spool, _) = Spool::open(dir.path(), options).unwrap();
    spool
        .enqueue(vec![msg("q", b"1"), msg("q", b"2"), msg("q", b"3")])
        .await
        .unwrap();
    let leased = lease_all(&spool, "q");
    assert_eq!(spool.stats(0).queues["q"].leased, 3);
    faults.fail_with(std::io::ErrorKind::Other);
    assert!(spool.enqueue(vec![msg("other", b"x")]).await.is_err());
    assert!(spool.poisoned().is_some());
    let acked = spool.ack(&leased[0].lease);
    let retried = spool.retry(&leased[1], "451 later", LATER).await;
    let dead = spool.dead_letter(&leased[2], "550 no").await;
    for (what, result) in [("ack", acked), ("retry", retried), ("dead_letter", dead)] {
        assert!(
            matches!(result, Err(SpoolError::Poisoned { .. })),
            "{what}: {result:?}"
        );
    }
    let q = &spool.stats(0).queues["q"];
    assert_eq!((q.count, q.leased), (3, 0), "every lease was given back");
}
