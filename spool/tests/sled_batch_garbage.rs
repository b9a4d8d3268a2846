//! The vendored sled's batch repin (`vendor/sled/PATCHES.md`, "A long batch repins its
//! epoch"). Every write in sled copies the node it changes and defers the old copy's free
//! to the epoch GC; sled 0.34.7 held one epoch guard across a whole `apply_batch`, so a
//! long batch kept every old copy alive until it ended. One group commit carrying a
//! message for each of 100 000 queues is such a batch: it set the daemon's peak at
//! ~960 MiB in P7 (docs/performance.md), and the allocator's bookkeeping for that peak
//! stays after the burst. This compares the heap's peak during a short and a long batch
//! on sled alone.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting the bytes live now and the most live since `reset_peak`.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = System.alloc(layout);
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn reset_peak() -> usize {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    live
}

/// The heap's peak above where it stood, while one batch of `writes` writes is applied.
fn batch_peak(writes: u64) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let db = common::bare_sled(dir.path());
    let value = vec![7u8; 200];
    let mut batch = sled::Batch::default();
    for id in 0..writes {
        batch.insert(&id.to_be_bytes(), value.clone());
    }
    let before = reset_peak();
    db.apply_batch(batch).unwrap();
    PEAK.load(Ordering::Relaxed) - before
}

#[test]
fn a_long_batch_does_not_keep_every_replaced_node_alive() {
    // Short batches keep sled's own behaviour (up to 4 096 writes, PATCHES.md), so the
    // measure is how the peak grows with the batch: with the patch, hardly at all past
    // that; without it, in proportion (223 MB at 50 000 writes against 23 MB at 5 000).
    let short = batch_peak(5_000);
    let long = batch_peak(50_000);
    let data = 50_000 * (8 + 200);
    eprintln!("peak heap: {short} bytes for 5 000 writes, {long} for 50 000 ({data} bytes)");
    assert!(
        long < short + 4 * data,
        "a batch of 50 000 writes ({data} bytes) took the heap {long} bytes above where it \
         started, against {short} for 5 000: the batch holds its epoch guard and keeps \
         every replaced node alive"
    );
}
