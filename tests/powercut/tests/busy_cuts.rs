//! Power cuts while the spool is busy on two of the vendored sled's patched paths
//! (`vendor/sled/PATCHES.md`), each a workload of its own:
//!
//! - **wide**: enqueue calls of one or two messages to each of 4 800 queues (about 7 200
//!   sled writes per group commit) and settles of 4 800 leases in one `ack_many`: sled
//!   batches of over 4 096 writes, which repin their epoch guard while the batch's log
//!   reservation is still open ("A long batch repins its epoch").
//! - **deep**: one queue, enqueue calls of 120 × 1 KiB (two chunks each) and settles of
//!   256: leaves of 17 chunks are sled blob files, replaced as chunks come and go, and
//!   each replaced page's old blob file is deleted ("a replaced page's lone blob was never
//!   deleted", "Leaves of big values merge only once small", "A blob page takes more
//!   deltas").
//!
//! Two threads enqueue and a third leases and settles. Once both have committed in a
//! cycle, the power goes at a random moment within 0.8 s while all three run. After each
//! cut the spool must open without a damaged record and hold every message whose enqueue
//! was acknowledged and whose ack was not.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Rig;
use rand::Rng;
use spool::{Leased, MessageId, Meta, NewMessage, Spool, SpoolOptions};

/// Cuts per workload; `BUSY_CUTS_CYCLES` sets another number.
fn cycles() -> u32 {
    std::env::var("BUSY_CUTS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

/// What the threads do between cuts.
struct Workload {
    name: &'static str,
    /// Queues `q0..q{queues}`; every enqueue call and every lease pass covers all of them.
    queues: u32,
    /// Messages queue `q` gets in one enqueue call.
    per_queue: fn(u32) -> u32,
    /// Payload bytes after a unique prefix.
    filler: usize,
    /// Messages leased from each queue per pass.
    lease_per_queue: usize,
    /// Leases held before they are settled in one `ack_many`.
    settle_at: usize,
}

const WIDE: Workload = Workload {
    name: "wide",
    queues: 4_800,
    per_queue: |q| 1 + q % 2,
    filler: 0,
    lease_per_queue: 1,
    settle_at: 4_800,
};

const DEEP: Workload = Workload {
    name: "deep",
    queues: 1,
    per_queue: |_| 120,
    filler: 1_000,
    lease_per_queue: 256,
    settle_at: 256,
};

impl Workload {
    fn call_len(&self) -> usize {
        (0..self.queues).map(|q| (self.per_queue)(q) as usize).sum()
    }

    /// One enqueue call: unique payloads, `filler` bytes each past their prefix.
    fn call(&self, thread: u32, seq: u32) -> Vec<NewMessage> {
        (0..self.queues)
            .flat_map(|q| {
                (0..(self.per_queue)(q)).map(move |part| {
                    let mut payload = format!("t{thread} s{seq} q{q} p{part} ").into_bytes();
                    payload.resize(payload.len() + self.filler, b'a' + (seq % 26) as u8);
                    NewMessage {
                        queue: format!("q{q}"),
                        meta: Meta::new(),
                        payload,
                    }
                })
            })
            .collect()
    }
}

#[derive(Default)]
struct Ledger {
    /// Acknowledged by `enqueue`, with their payloads.
    enqueued: BTreeMap<MessageId, Vec<u8>>,
    /// Passed to `ack_many`, whatever it returned: these may be gone.
    settled: BTreeSet<MessageId>,
}

type Shared = Arc<Mutex<Ledger>>;

/// Enqueues calls until the power goes (the first error) or `stop`.
fn enqueuer(w: &Workload, spool: Spool, ledger: Shared, stop: Arc<AtomicBool>, tag: (u32, u32)) {
    let (thread, cycle) = tag;
    for seq in cycle * 100_000.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let msgs = w.call(thread, seq);
        let payloads: Vec<_> = msgs.iter().map(|m| m.payload.clone()).collect();
        let Ok(ids) = spool.enqueue_blocking(msgs) else {
            return;
        };
        let mut ledger = ledger.lock().unwrap();
        ledger.enqueued.extend(ids.into_iter().zip(payloads));
    }
}

/// Leases `lease_per_queue` from every queue per pass until it holds `settle_at`, then
/// acks them all in one sled batch.
fn settler(w: &Workload, spool: Spool, ledger: Shared, stop: Arc<AtomicBool>) {
    let mut leased: Vec<Leased> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for q in 0..w.queues {
            match spool.lease(&format!("q{q}"), w.lease_per_queue, u64::MAX) {
                Ok(got) => leased.extend(got),
                Err(_) => return,
            }
        }
        if leased.len() < w.settle_at {
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
fn lost(w: &Workload, spool: &Spool, ledger: &Ledger) -> Vec<MessageId> {
    let mut found = BTreeMap::new();
    for q in 0..w.queues {
        for leased in spool
            .lease(&format!("q{q}"), usize::MAX, u64::MAX)
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
fn reopen_and_check(w: &Workload, dir: &Path, ledger: &Shared, after: &str) -> Spool {
    let (spool, report) =
        Spool::open(dir, options()).unwrap_or_else(|e| panic!("{after}: the spool must open: {e}"));
    assert!(
        report.damaged.is_empty() && report.quarantined_now == 0,
        "{after}: damaged records after a power cut: {:?}",
        report.damaged
    );
    let ledger = ledger.lock().unwrap();
    let lost = lost(w, &spool, &ledger);
    assert!(
        lost.is_empty(),
        "{after}: {} acknowledged, unsettled messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    spool
}

/// The number of messages acknowledged and settled so far.
fn counts(ledger: &Shared) -> (usize, usize) {
    let l = ledger.lock().unwrap();
    (l.enqueued.len(), l.settled.len())
}

/// Waits until both counts have grown by `by` since `before`.
fn wait_for_progress(ledger: &Shared, before: (usize, usize), by: (usize, usize)) {
    let start = Instant::now();
    loop {
        let now = counts(ledger);
        if now.0 >= before.0 + by.0 && now.1 >= before.1 + by.1 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no progress in 120 s: {now:?} acknowledged and settled, {before:?} before"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The daemon's options, with a shorter commit deadline. After a cut, the instance that
/// lost its power keeps running here (a real one would be gone), and its sled can be left
/// wedged: a blob write of its cleaner fails on the cut layer, leaks a log reservation, and
/// every later flush waits for ever. Its callers then get the deadline's error, as the
/// daemon's would, and the cycle goes on.
fn options() -> SpoolOptions {
    SpoolOptions {
        commit_deadline: Duration::from_secs(10),
        ..SpoolOptions::default()
    }
}

/// Sled's blob files under the spool (each leaf of chunks over 128 KiB is one).
fn blob_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("data").join("blobs")).map_or(0, |d| d.count())
}

/// Runs `w` for [`cycles`] cut-and-reopen cycles; `progress` is what each cycle must have
/// acknowledged and settled before its cut. Returns the most blob files seen at a cut, or
/// `None` where the layer cannot be mounted (the test is skipped).
fn run(w: &'static Workload, progress: (usize, usize)) -> Option<usize> {
    let rig = Rig::new()?;
    let dir = rig.path("spool");
    let ledger: Shared = Arc::default();
    let mut rng = rand::thread_rng();
    let mut spool = Spool::open(&dir, options()).expect("open").0;
    let mut most_blobs = 0;
    let cycles = cycles();
    for cycle in 0..cycles {
        let before = counts(&ledger);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads: Vec<_> = (0..2)
            .map(|t| {
                let (s, l, stop) = (spool.clone(), ledger.clone(), stop.clone());
                std::thread::spawn(move || enqueuer(w, s, l, stop, (t, cycle)))
            })
            .collect();
        let (s, l, st) = (spool.clone(), ledger.clone(), stop.clone());
        threads.push(std::thread::spawn(move || settler(w, s, l, st)));
        wait_for_progress(&ledger, before, progress);
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..800)));
        most_blobs = most_blobs.max(blob_files(&dir));
        rig.cut();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("worker thread");
        }
        // What a power cut does to the process that was running: nothing of it runs again.
        std::mem::forget(spool);
        spool = reopen_and_check(w, &dir, &ledger, &format!("{} cycle {cycle}", w.name));
    }
    let (enqueued, settled) = counts(&ledger);
    println!(
        "{}: {cycles} cuts, {enqueued} acknowledged, {settled} settled, 0 lost, \
         up to {most_blobs} blob files at a cut",
        w.name
    );
    Some(most_blobs)
}

#[test]
fn cuts_inside_long_sled_batches_lose_nothing_acknowledged() {
    // Each cycle commits at least one wide call and one wide settle.
    run(&WIDE, (WIDE.call_len(), WIDE.settle_at));
}

#[test]
fn cuts_while_chunk_leaves_are_blob_files_lose_nothing_acknowledged() {
    // About 2 MiB per cycle: leaves of chunks fill, split and are written as blobs.
    if let Some(most_blobs) = run(&DEEP, (16 * DEEP.call_len(), 4 * DEEP.settle_at)) {
        assert!(
            most_blobs > 0,
            "no blob file at any cut: the blob path went untested"
        );
    }
}
