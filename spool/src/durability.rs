//! Making sled's writes real. sled 0.34's `flush()` ends in `sync_file_range`, which pushes
//! pages to the device but commits neither the file's metadata nor the drive's cache (sled
//! #1452), and it writes large log items (a value, or a whole node, over about 128 KiB) to
//! files in `blobs/` that it never syncs at all. After each flush we therefore `fdatasync`
//! the log file ourselves, and fsync every blob file not yet synced at its current size
//! and modification time, plus the blobs directory when a file was new.
//!
//! Finding new blobs: the directory is listed unless its mtime is unchanged *and* settled.
//! mtimes are coarse (a kernel tick), so a blob created in the same tick as the previous
//! listing leaves the mtime as it was: an mtime (of the directory or of any blob) younger
//! than `SETTLE` (2 s) when it was read is not trusted, and the next sync lists again. Blobs
//! are remembered by name, size and mtime, so one synced while sled was still writing it
//! (sled's cleaner writes blobs from its own thread) is synced again once it changed.
//! Cost: one `stat` per sync when no blob is new or recent; otherwise a listing with one
//! `statx` per blob file (see docs/reliability.md for the measured cost).
//!
//! [`SyncFaults`] is the seam where tests make the disk fail on purpose and see which
//! files were fsynced.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How old an mtime must be before an unchanged one is trusted (see the module doc).
const SETTLE: Duration = Duration::from_secs(2);

/// Fsyncs a directory so that entries created in it survive power loss.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Files fsynced, with their sizes then; `None` until a test asks to record.
type SyncLog = Arc<Mutex<Option<Vec<(PathBuf, u64)>>>>;

/// Injected disk failures, shared between a test and the spool it opened; it also records
/// which files were fsynced once [`record`](Self::record) was called.
#[derive(Debug, Clone, Default)]
pub struct SyncFaults {
    failing: Arc<Mutex<Option<io::ErrorKind>>>,
    skipping: Arc<AtomicBool>,
    stalling: Arc<AtomicBool>,
    /// Syncs held by `stalling` right now.
    stalled: Arc<std::sync::atomic::AtomicUsize>,
    synced: SyncLog,
    mtime_granularity: Arc<Mutex<Option<Duration>>>,
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

    /// From now on, remember every file the spool fsyncs (path, size at the time).
    pub fn record(&self) {
        self.synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Vec::new);
    }

    /// The files fsynced since [`record`](Self::record), in order, with their sizes then.
    pub fn synced(&self) -> Vec<(PathBuf, u64)> {
        self.synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }

    /// Makes the spool see modification times rounded down to `granularity`, as on a
    /// filesystem with coarse timestamps (FAT: 2 s, ext3: 1 s; Linux before 6.13 a kernel
    /// tick on any filesystem).
    pub fn coarse_mtimes(&self, granularity: Duration) {
        *self
            .mtime_granularity
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(granularity);
    }

    fn mtime(&self, t: SystemTime) -> SystemTime {
        let granularity = *self
            .mtime_granularity
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(g) = granularity.filter(|g| !g.is_zero()) else {
            return t;
        };
        let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let rounded = since.as_nanos() / g.as_nanos() * g.as_nanos();
        SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(rounded).unwrap_or(u64::MAX))
    }

    fn note_synced(&self, path: &Path, len: u64) {
        if let Some(list) = self
            .synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            list.push((path.to_path_buf(), len));
        }
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

/// Syncs the files of one sled database directory.
pub struct DiskSync {
    log_file: File,
    log_path: PathBuf,
    blobs_dir: PathBuf,
    /// The directory's mtime at the last listing, if it was settled then.
    settled_mtime: Option<SystemTime>,
    /// Blob files synced, with the (size, mtime) they were synced at.
    synced_blobs: HashMap<OsString, (u64, SystemTime)>,
    faults: SyncFaults,
}

impl DiskSync {
    /// Opens sled's log file in `sled_dir` for fsync; the blobs directory is listed lazily at
    /// each sync. `faults` is the test seam: production passes `SyncFaults::default()`.
    pub fn new(sled_dir: &Path, faults: SyncFaults) -> io::Result<DiskSync> {
        let log_path = sled_dir.join("db");
        Ok(DiskSync {
            log_file: File::open(&log_path)?,
            log_path,
            blobs_dir: sled_dir.join("blobs"),
            settled_mtime: None,
            synced_blobs: HashMap::new(),
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
        self.faults.note_synced(&self.log_path, 0);
        self.sync_new_blobs()
    }

    fn sync_new_blobs(&mut self) -> io::Result<()> {
        let dir_mtime = match std::fs::metadata(&self.blobs_dir) {
            Ok(meta) => self.faults.mtime(meta.modified()?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(with_path(e, &self.blobs_dir)),
        };
        if self.settled_mtime == Some(dir_mtime) {
            return Ok(());
        }
        let listed_at = SystemTime::now();
        let recent = |t: SystemTime| listed_at.duration_since(t).map_or(true, |age| age < SETTLE);
        let mut settled = !recent(dir_mtime);
        let mut present = HashMap::with_capacity(self.synced_blobs.len());
        let mut new_file = false;
        let entries =
            std::fs::read_dir(&self.blobs_dir).map_err(|e| with_path(e, &self.blobs_dir))?;
        for entry in entries {
            let entry = entry.map_err(|e| with_path(e, &self.blobs_dir))?;
            let path = entry.path();
            // sled may delete a blob between readdir and stat or open: nothing to sync.
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(with_path(e, &path)),
            };
            let seen = (meta.len(), self.faults.mtime(meta.modified()?));
            settled &= !recent(seen.1);
            let name = entry.file_name();
            if self.synced_blobs.get(&name) != Some(&seen) {
                match File::open(&path) {
                    Ok(f) => f.sync_all().map_err(|e| with_path(e, &path))?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(with_path(e, &path)),
                }
                self.faults.note_synced(&path, seen.0);
                new_file |= !self.synced_blobs.contains_key(&name);
            }
            present.insert(name, seen);
        }
        if new_file {
            sync_dir(&self.blobs_dir).map_err(|e| with_path(e, &self.blobs_dir))?;
            self.faults.note_synced(&self.blobs_dir, 0);
        }
        self.synced_blobs = present;
        self.settled_mtime = settled.then_some(dir_mtime);
        Ok(())
    }
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
