//! Making sled's writes real. sled 0.34's `flush()` ends in `sync_file_range`, which pushes
//! pages to the device but commits neither the file's metadata nor the drive's cache (sled
//! #1452). After each flush we therefore `fdatasync` the log file ourselves.
//!
//! Blob files need nothing here. sled writes a log item over about 128 KiB (a big value, or
//! a whole node) to its own file in `blobs/`, and the vendored sled fsyncs that file and the
//! directory before it writes the item's pointer into the log (`vendor/sled/PATCHES.md`,
//! "The third fix"). That order is the one that matters: a blob synced only after the log
//! (as this module once did, listing `blobs/` after every fdatasync) could lose its data
//! while a pointer to it survived, since any log write can become durable at any moment.
//! `tests/powercut/tests/busy_cuts.rs` ("deep") is the test that holds it.
//!
//! [`SyncFaults`] is the seam where tests make the disk fail on purpose.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Fsyncs a directory so that entries created in it survive power loss.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Injected disk failures, shared between a test and the spool it opened.
#[derive(Debug, Clone, Default)]
pub struct SyncFaults {
    failing: Arc<Mutex<Option<io::ErrorKind>>>,
    skipping: Arc<AtomicBool>,
    stalling: Arc<AtomicBool>,
    /// Syncs held by `stalling` right now.
    stalled: Arc<AtomicUsize>,
}

impl SyncFaults {
    /// Every sync from now on fails with `kind` (e.g. `StorageFull`), until [`heal`](Self::heal).
    pub fn fail_with(&self, kind: io::ErrorKind) {
        *self.failing.lock().unwrap_or_else(|e| e.into_inner()) = Some(kind);
    }

    /// Every sync from now on succeeds without syncing anything: commits are acknowledged
    /// after sled's own flush alone (`sync_file_range`). The negative control of the
    /// power-loss tests: with this, a power cut must lose acknowledged messages.
    pub fn skip_syncs(&self) {
        self.skipping.store(true, Ordering::SeqCst);
    }

    /// Every sync from now on blocks until [`heal`](Self::heal): a disk whose fsync hangs
    /// (a dead NFS server, a drive that stopped answering).
    pub fn stall_syncs(&self) {
        self.stalling.store(true, Ordering::SeqCst);
    }

    /// Whether a sync is being held by [`stall_syncs`](Self::stall_syncs) right now: the
    /// spool's commit thread is stuck in it.
    pub fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst) > 0
    }

    fn skipping(&self) -> bool {
        self.skipping.load(Ordering::SeqCst)
    }

    /// Ends what [`fail_with`](Self::fail_with) and [`skip_syncs`](Self::skip_syncs) started:
    /// syncs are real and succeed again (a poisoned spool still needs a reopen).
    pub fn heal(&self) {
        *self.failing.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.skipping.store(false, Ordering::SeqCst);
        self.stalling.store(false, Ordering::SeqCst);
    }

    fn check(&self) -> io::Result<()> {
        if self.stalling.load(Ordering::SeqCst) {
            self.stalled.fetch_add(1, Ordering::SeqCst);
            while self.stalling.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            self.stalled.fetch_sub(1, Ordering::SeqCst);
        }
        match *self.failing.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(kind) => Err(io::Error::new(kind, "injected sync failure")),
            None => Ok(()),
        }
    }
}

/// Syncs sled's log file.
pub struct DiskSync {
    log_file: File,
    log_path: PathBuf,
    faults: SyncFaults,
}

impl DiskSync {
    /// Opens sled's log file in `sled_dir` for fsync. `faults` is the test seam: production
    /// passes `SyncFaults::default()`.
    pub fn new(sled_dir: &Path, faults: SyncFaults) -> io::Result<DiskSync> {
        let log_path = sled_dir.join("db");
        Ok(DiskSync {
            log_file: File::open(&log_path)?,
            log_path,
            faults,
        })
    }

    /// Call right after `Db::flush()`: afterwards everything flushed is on stable storage.
    pub fn sync(&mut self) -> io::Result<()> {
        self.faults.check()?;
        if self.faults.skipping() {
            return Ok(());
        }
        self.log_file
            .sync_data()
            .map_err(|e| with_path(e, &self.log_path))
    }
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
