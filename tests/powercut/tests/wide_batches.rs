//! Power cuts in the middle of sled batches of over 4 096 writes: the path where the
//! vendored sled repins its epoch guard while the batch's log reservation is still open
//! (`vendor/sled/PATCHES.md`, "A long batch repins its epoch").
//!
//! Two threads enqueue wide calls (one or two messages to each of [`QUEUES`] queues, about
//! 7 000 sled writes per group commit) and a third leases across every queue and settles
//! what it got with one `ack_many` (one sled batch of thousands of deletes and bitmap
//! writes). Once both kinds of batch have committed in a cycle, the power goes at a
//! random moment while all three threads run, so most cuts land in a long batch. After each cut the spool must open without damage and hold every message
//! whose enqueue was acknowledged and whose ack was not.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Rig;
use rand::Rng;
use spool::{MessageId, Meta, NewMessage, Spool, SpoolOptions};

/// Queues per enqueue call: far over the repin threshold of 4 096 writes per batch.
const QUEUES: u32 = 4_800;
const CYCLES: u32 = 6;

#[derive(Default)]
struct Ledger {
    /// Acknowledged by `enqueue`, with their payloads.
    enqueued: BTreeMap<MessageId, Vec<u8>>,
    /// Settled by an `ack_many` that returned `Ok`: these may be gone.
    settled: BTreeSet<MessageId>,
}

type Shared = Arc<Mutex<Ledger>>;

/// One call: queue `w{q}` gets one message if `q` is even (a single record), two if odd
/// (a chunk, its head and its bitmap).
fn wide_call(thread: u32, seq: u32) -> Vec<NewMessage> {
    (0..QUEUES)
        .flat_map(|q| {
            (0..1 + q % 2).map(move |part| NewMessage {
                queue: format!("w{q}"),
                meta: Meta::new(),
                payload: format!("t{thread} s{seq} q{q} p{part}").into_bytes(),
            })
        })
        .collect()
}

/// Enqueues wide calls until the power goes (the first error) or `stop`.
fn enqueuer(spool: Spool, ledger: Shared, stop: Arc<AtomicBool>, thread: u32, cycle: u32) {
    for seq in cycle * 1_000.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let msgs = wide_call(thread, seq);
        let payloads: Vec<_> = msgs.iter().map(|m| m.payload.clone()).collect();
        let Ok(ids) = spool.enqueue_blocking(msgs) else {
            return;
        };
        ledger
            .lock()
            .unwrap()
            .enqueued
            .extend(ids.into_iter().zip(payloads));
    }
}

/// Leases one message from every queue per pass until it holds at least [`QUEUES`], then
/// acks them all in one sled batch (thousands of deletes and bitmap writes).
fn settler(spool: Spool, ledger: Shared, stop: Arc<AtomicBool>) {
    let mut leased = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for q in 0..QUEUES {
            match spool.lease(&format!("w{q}"), 1, u64::MAX) {
                Ok(got) => leased.extend(got),
                Err(_) => return,
            }
        }
        if leased.len() < QUEUES as usize {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let leases: Vec<_> = leased.iter().map(|l| &l.lease).collect();
        let acked = spool.ack_many(&leases);
        // An ack that failed may still have reached the disk: either way these may be gone.
        let mut ledger = ledger.lock().unwrap();
        ledger
            .settled
            .extend(leased.drain(..).map(|l| l.lease.id()));
        if acked.is_err() {
            return;
        }
    }
}

/// Acknowledged, not settled, and missing or changed in the reopened spool. Reads every
/// queue by leasing it whole (`get` by id decodes a chunk per message), then releases.
fn lost(spool: &Spool, ledger: &Ledger) -> Vec<MessageId> {
    let mut found = BTreeMap::new();
    for q in 0..QUEUES {
        for leased in spool
            .lease(&format!("w{q}"), usize::MAX, u64::MAX)
            .expect("lease")
        {
            spool.release(&leased.lease);
            found.insert(leased.lease.id(), leased.message.payload);
        }
    }
    ledger
        .enqueued
        .iter()
        .filter(|(id, payload)| !ledger.settled.contains(id) && found.get(id) != Some(payload))
        .map(|(id, _)| *id)
        .collect()
}

/// Opens after a cut: no damage, nothing acknowledged lost.
fn reopen_and_check(rig: &Rig, ledger: &Shared, after: &str) -> Spool {
    let (spool, report) = Spool::open(&rig.path("spool"), SpoolOptions::default())
        .unwrap_or_else(|e| panic!("{after}: the spool must open: {e}"));
    assert!(
        report.damaged.is_empty() && report.quarantined_now == 0,
        "{after}: damaged records after a power cut: {:?}",
        report.damaged
    );
    let ledger = ledger.lock().unwrap();
    let lost = lost(&spool, &ledger);
    assert!(
        lost.is_empty(),
        "{after}: {} of {} acknowledged, unsettled messages lost, e.g. {:?}",
        lost.len(),
        ledger.enqueued.len() - ledger.settled.len(),
        &lost[..lost.len().min(5)]
    );
    spool
}

#[test]
fn cuts_inside_long_sled_batches_lose_nothing_acknowledged() {
    let Some(rig) = Rig::new() else { return };
    let ledger: Shared = Arc::default();
    let mut rng = rand::thread_rng();
    let mut spool = Spool::open(&rig.path("spool"), SpoolOptions::default())
        .expect("open")
        .0;
    for cycle in 0..CYCLES {
        let before = counts(&ledger);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads: Vec<_> = (0..2)
            .map(|t| {
                let (s, l, stop) = (spool.clone(), ledger.clone(), stop.clone());
                std::thread::spawn(move || enqueuer(s, l, stop, t, cycle))
            })
            .collect();
        let (s, l, st) = (spool.clone(), ledger.clone(), stop.clone());
        threads.push(std::thread::spawn(move || settler(s, l, st)));
        // Cut once both kinds of long batch have committed in this cycle, at a moment
        // that differs every cycle.
        wait_for_progress(&ledger, before);
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..800)));
        rig.cut();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("worker thread");
        }
        // What a power cut does to the process that was running: nothing of it runs again.
        std::mem::forget(spool);
        spool = reopen_and_check(&rig, &ledger, &format!("cycle {cycle}"));
    }
    let ledger = ledger.lock().unwrap();
    println!(
        "wide batches: {CYCLES} cuts, {} acknowledged, {} settled, 0 lost",
        ledger.enqueued.len(),
        ledger.settled.len()
    );
}

/// The number of messages acknowledged and settled so far.
fn counts(ledger: &Shared) -> (usize, usize) {
    let l = ledger.lock().unwrap();
    (l.enqueued.len(), l.settled.len())
}

/// Waits until both counts have grown by a wide call's worth since `before`: a long
/// enqueue batch and a long settle batch have committed in this cycle.
fn wait_for_progress(ledger: &Shared, before: (usize, usize)) {
    let start = std::time::Instant::now();
    loop {
        let (enqueued, settled) = counts(ledger);
        if enqueued >= before.0 + QUEUES as usize && settled >= before.1 + QUEUES as usize {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no wide commit in 120 s ({enqueued} enqueued, {settled} settled; {before:?} before)"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
