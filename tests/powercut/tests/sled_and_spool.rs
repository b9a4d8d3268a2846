//! sled and the spool on the power-cut layer. sled's own `flush()` (sync_file_range) must
//! lose acknowledged data at a cut: the negative control that proves the layer catches
//! sled #1452. The spool (group commit + fdatasync + directory fsyncs) must lose nothing
//! that `enqueue` acknowledged, across cut-and-reopen cycles; and with its fsync disabled
//! through the fault hook, it must lose acknowledged messages again.
//!
//! The power goes while sled or the spool is open, as in real life. The instance that was
//! running is then leaked, not dropped: its handles are dead (EIO), and sled's `Drop`
//! unwraps a failing `sync_all` (it would panic), while a process that lost its power runs
//! no destructors anyway. [`crashed`] is that.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{sync_dir, Rig};
use spool::{MessageId, Meta, NewMessage, Spool, SpoolError, SpoolOptions, SyncFaults};

const KEYS: u32 = 200;

fn key(i: u32) -> [u8; 4] {
    i.to_be_bytes()
}

/// Opens sled on the mount and makes its directory entries durable, so that only the
/// data's durability is at stake below.
fn open_sled(rig: &Rig) -> (sled::Db, std::path::PathBuf) {
    let dir = rig.path("sled");
    // No periodic flusher: its fsync would blur what flush() alone does.
    let db = sled::Config::new()
        .path(&dir)
        .flush_every_ms(None)
        .open()
        .expect("open sled on the mount");
    sync_dir(&dir);
    sync_dir(&rig.root);
    (db, dir)
}

/// What a power cut does to the process that was running: nothing of it runs again.
fn crashed<T>(instance: T) {
    std::mem::forget(instance);
}

fn surviving_keys(dir: &Path) -> u32 {
    let db = sled::Config::new()
        .path(dir)
        .open()
        .expect("reopen sled after the cut");
    (0..KEYS)
        .filter(|i| db.get(key(*i)).expect("sled get").is_some())
        .count() as u32
}

#[test]
fn sled_flush_alone_loses_acknowledged_data_at_a_cut() {
    let Some(rig) = Rig::new() else { return };
    let (db, dir) = open_sled(&rig);
    for i in 0..KEYS {
        db.insert(key(i), vec![i as u8; 100]).unwrap();
        db.flush().unwrap(); // sled's "durable": sync_file_range only
    }
    rig.cut();
    crashed(db);
    let kept = surviving_keys(&dir);
    eprintln!("sled flush() only: {kept} of {KEYS} flushed keys survived the cut");
    assert!(
        kept < KEYS,
        "every key survived: the layer does not model sync_file_range"
    );
}

#[test]
fn sled_flush_plus_fdatasync_keeps_acknowledged_data_at_a_cut() {
    let Some(rig) = Rig::new() else { return };
    let (db, dir) = open_sled(&rig);
    let log = File::open(dir.join("db")).unwrap();
    for i in 0..KEYS {
        db.insert(key(i), vec![i as u8; 100]).unwrap();
        db.flush().unwrap();
        log.sync_data().unwrap(); // what the spool's DiskSync adds
    }
    rig.cut();
    crashed(db);
    drop(log);
    assert_eq!(surviving_keys(&dir), KEYS);
}

fn message(thread: u32, seq: u32) -> NewMessage {
    // Every 16th message is over 128 KiB: sled stores those as separate blob files.
    let len = if seq % 16 == 5 {
        150 * 1024
    } else {
        64 + (seq as usize * 37) % 900
    };
    let mut payload = format!("t{thread}-s{seq}-").into_bytes();
    payload.extend((0..len).map(|i| (i as u32 * 31 + thread + seq) as u8));
    NewMessage {
        queue: format!("q{}", thread % 2),
        meta: Meta::new(),
        payload,
    }
}

type Acked = Arc<Mutex<BTreeMap<MessageId, Vec<u8>>>>;

/// Four threads enqueue small batches; every id `enqueue` returned goes into `acked`.
fn enqueue_concurrently(spool: &Spool, acked: &Acked, cycle: u32) {
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let (spool, acked) = (spool.clone(), acked.clone());
            std::thread::spawn(move || {
                for batch in 0..12u32 {
                    let first = cycle * 1000 + batch * 4;
                    let msgs: Vec<_> = (first..first + 1 + batch % 4)
                        .map(|s| message(t, s))
                        .collect();
                    let payloads: Vec<_> = msgs.iter().map(|m| m.payload.clone()).collect();
                    let ids = spool.enqueue_blocking(msgs).expect("enqueue");
                    let mut acked = acked.lock().unwrap();
                    acked.extend(ids.into_iter().zip(payloads));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("enqueue thread");
    }
}

/// Acknowledged messages missing (or changed) in a reopened spool.
fn missing(spool: &Spool, acked: &Acked) -> Vec<MessageId> {
    let acked = acked.lock().unwrap();
    acked
        .iter()
        .filter(|(id, payload)| match spool.get(**id).expect("spool get") {
            Some(msg) => &msg.payload != *payload,
            None => true,
        })
        .map(|(id, _)| *id)
        .collect()
}

#[test]
fn spool_loses_nothing_it_acknowledged_across_power_cuts() {
    let Some(rig) = Rig::new() else { return };
    let dir = rig.path("spool");
    let acked: Acked = Arc::default();
    for cycle in 0..5 {
        let (spool, _) = Spool::open(&dir, SpoolOptions::default()).unwrap_or_else(|e| {
            panic!("cycle {cycle}: the spool must open after a power cut: {e}")
        });
        let lost = missing(&spool, &acked);
        assert!(
            lost.is_empty(),
            "cycle {cycle}: acknowledged and lost: {lost:?}"
        );
        enqueue_concurrently(&spool, &acked, cycle);
        rig.cut();
        crashed(spool);
    }
    let (spool, _) = Spool::open(&dir, SpoolOptions::default()).expect("open after the last cut");
    let lost = missing(&spool, &acked);
    let total = acked.lock().unwrap().len();
    assert!(
        lost.is_empty(),
        "{} of {total} acknowledged messages lost: {lost:?}",
        lost.len()
    );
    assert!(total >= 5 * 4 * 12, "only {total} messages acknowledged");
}

#[test]
fn spool_without_its_fsync_loses_acknowledged_messages() {
    let Some(rig) = Rig::new() else { return };
    let dir = rig.path("spool");
    let acked: Acked = Arc::default();
    let faults = SyncFaults::default();
    faults.skip_syncs();
    let options = SpoolOptions {
        faults: faults.clone(),
        ..SpoolOptions::default()
    };
    let (spool, _) = Spool::open(&dir, options.clone()).expect("open");
    enqueue_concurrently(&spool, &acked, 0);
    rig.cut();
    crashed(spool);
    // Either the spool sees the loss (its ledger is ahead of sled) or messages are gone.
    match Spool::open(&dir, options) {
        Err(SpoolError::LostWrites { .. }) => {}
        Err(e) => panic!("unexpected error reopening: {e}"),
        Ok((spool, _)) => {
            let lost = missing(&spool, &acked);
            let total = acked.lock().unwrap().len();
            eprintln!(
                "fsync disabled: {} of {total} acknowledged messages lost",
                lost.len()
            );
            assert!(
                !lost.is_empty(),
                "nothing lost without fsync: the layer is too kind"
            );
        }
    }
}
