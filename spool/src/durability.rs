//! Making sled's writes real. sled 0.34's `flush()` ends in `sync_file_range`, which pushes
//! pages to the device but commits neither the file's metadata nor the drive's cache (sled
//! #1452), and it writes large values to `blobs/` files that it never syncs at all. After
//! each flush we therefore `fdatasync` the log file ourselves, and fsync any blob file we
//! have not synced yet plus the blobs directory. Blob files are only looked for when the
//! directory's mtime moved, so the common case costs one `stat`.
//!
//! [`SyncFaults`] is the seam where tests make the disk fail on purpose.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Fsyncs a directory so that entries created in it survive power loss.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Injected disk failures, shared between a test and the spool it opened.
#[derive(Debug, Clone, Default)]
pub struct SyncFaults {
    failing: Arc<Mutex<Option<io::ErrorKind>>>,
    skipping: Arc<AtomicBool>,
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

    fn skipping(&self) -> bool {
        self.skipping.load(Ordering::SeqCst)
    }

    pub fn heal(&self) {
        *self.failing.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.skipping.store(false, Ordering::SeqCst);
    }

    fn check(&self) -> io::Result<()> {
        match *self.failing.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(kind) => Err(io::Error::new(kind, "injected sync failure")),
            None => Ok(()),
        }
    }
}

/// Syncs the files of one sled database directory.
pub struct DiskSync {
    log_file: File,
    log_path: PathBuf,
    blobs_dir: PathBuf,
    blobs_mtime: Option<SystemTime>,
    synced_blobs: HashSet<OsString>,
    faults: SyncFaults,
}

impl DiskSync {
    pub fn new(sled_dir: &Path, faults: SyncFaults) -> io::Result<DiskSync> {
        let log_path = sled_dir.join("db");
        Ok(DiskSync {
            log_file: File::open(&log_path)?,
            log_path,
            blobs_dir: sled_dir.join("blobs"),
            blobs_mtime: None,
            synced_blobs: HashSet::new(),
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
            .map_err(|e| with_path(e, &self.log_path))?;
        self.sync_new_blobs()
    }

    fn sync_new_blobs(&mut self) -> io::Result<()> {
        let mtime = match std::fs::metadata(&self.blobs_dir) {
            Ok(meta) => meta.modified()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(with_path(e, &self.blobs_dir)),
        };
        if self.blobs_mtime == Some(mtime) {
            return Ok(());
        }
        let mut present = HashSet::new();
        for entry in std::fs::read_dir(&self.blobs_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_all().map_err(|e| with_path(e, &entry.path()))?,
                    // sled may delete a blob between readdir and open: nothing to sync.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(with_path(e, &entry.path())),
                }
            }
            present.insert(name);
        }
        sync_dir(&self.blobs_dir).map_err(|e| with_path(e, &self.blobs_dir))?;
        self.synced_blobs = present;
        self.blobs_mtime = Some(mtime);
        Ok(())
    }
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
