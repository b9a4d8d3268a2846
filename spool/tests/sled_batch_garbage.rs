//! The vendored sled's batch repin (`vendor/sled/PATCHES.md`, "A batch repins its epoch").
//! Every write in sled copies the node it changes and defers the old copy's free to the
//! epoch GC; sled 0.34.7 held one epoch guard across a whole `apply_batch`, so a big batch
//! kept every old copy alive until it ended. One group commit carrying a message for each
//! of 100 000 queues is such a batch: it set the daemon's peak at ~960 MiB in P7
//! (docs/performance.md), and the allocator's bookkeeping for that peak stays after the
//! burst. This measures the heap's peak during one big batch on sled alone.

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

#[test]
fn a_big_batch_does_not_keep_every_replaced_node_alive() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path())
        .flush_every_ms(None)
        .open()
        .unwrap();
    let writes = 50_000u64;
    let value = vec![7u8; 200];
    let mut batch = sled::Batch::default();
    for id in 0..writes {
        batch.insert(&id.to_be_bytes(), value.clone());
    }
    let before = reset_peak();
    db.apply_batch(batch).unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    let data = writes as usize * (8 + value.len());
    eprintln!("peak heap during the batch: {peak} bytes over {data} bytes written");
    assert!(
        peak < 8 * data,
        "a batch of {writes} writes ({data} bytes) took the heap {peak} bytes above where it \
         started: the batch holds its epoch guard and keeps every replaced node alive"
    );
}
