//! The commit ledger: how the spool notices that sled lost writes it had made durable.
//!
//! sled 0.34 replays its log at open and stops at the first frame that fails its checks,
//! treating it as a torn tail. A flipped byte in the middle of `data/db`, or a file cut
//! short, therefore makes every later write vanish with no error: acknowledged messages
//! disappear and the spool would report the smaller queue as the whole truth
//! (docs/reliability.md). The per-record CRC cannot see this, because sled never hands
//! those records back.
//!
//! So each group commit also writes a [`CommitMark`] (commit sequence number and highest
//! message id so far) twice: into sled's meta tree, in the same batch as the group, and,
//! once sled's fsync succeeded, into `<spool>/ledger`, a small file outside sled. The
//! ledger is never ahead of what sled made durable, so at open
//!
//! * sled's mark ≥ the ledger's: nothing acknowledged is missing;
//! * sled's mark < the ledger's: sled lost whole group commits. The spool refuses to open
//!   ([`crate::SpoolError::LostWrites`]) until an operator accepts the loss with
//!   `spoolctl verify --repair`, which records it in quarantine (with the ledger's bytes)
//!   so it stays visible.
//!
//! The ledger is overwritten in place (28 bytes, one sector) and not fsynced in the commit
//! path: an extra fsync there would double the cost of every commit. A power cut rolls an
//! unsynced ledger back, and a ledger rolled back below sled's mark cannot see sled
//! dropping the tail of its log in the same cut. So a background thread fdatasyncs the
//! ledger every [`SYNC_INTERVAL`] when it changed (and the spool syncs it when it closes).
//!
//! The window this leaves: after a power cut the ledger holds the mark of a commit at most
//! [`SYNC_INTERVAL`] plus one fdatasync older than the last one sled made durable. Losses of
//! sled's log tail reaching back further than that are detected; a loss confined to the
//! commits of that last window is not. A stale ledger only weakens detection (it can lag
//! sled, never lead it: it is written only after sled's fsync of that commit succeeded).
//! The cost is at most one fdatasync of one sector per interval, off the commit thread.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// File name of the ledger inside the spool directory.
pub const FILE_NAME: &str = "ledger";
const MAGIC: &[u8; 8] = b"SRLEDGR1";
const LEN: usize = 8 + 8 + 8 + 4;

/// How often the background thread makes a changed ledger durable: the detection window
/// after a power cut (see the module docs). `SPOOLRELAY_LEDGER_SYNC_MS` overrides it (read
/// when the spool opens); `0` turns the background sync off (the ledger is then synced only
/// when the spool closes, and a power cut can hide lost writes again).
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);
const SYNC_INTERVAL_ENV: &str = "SPOOLRELAY_LEDGER_SYNC_MS";

fn sync_interval() -> Option<Duration> {
    let Ok(raw) = std::env::var(SYNC_INTERVAL_ENV) else {
        return Some(SYNC_INTERVAL);
    };
    match raw.trim().parse::<u64>() {
        Ok(0) => None,
        Ok(ms) => Some(Duration::from_millis(ms)),
        Err(_) => {
            tracing::warn!(value = %raw, default_ms = SYNC_INTERVAL.as_millis() as u64,
                "{SYNC_INTERVAL_ENV} is not a number of milliseconds; using the default");
            Some(SYNC_INTERVAL)
        }
    }
}

/// Where the commit history stood after one group commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct CommitMark {
    /// Group commits made durable since the spool was created (or the loss last accepted).
    pub seq: u64,
    /// The highest message id of any enqueue committed so far.
    pub highest_id: u64,
}

impl CommitMark {
    /// The 16-byte form stored in sled's meta tree.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.seq.to_be_bytes());
        out[8..].copy_from_slice(&self.highest_id.to_be_bytes());
        out
    }

    /// Reads the form [`to_bytes`](Self::to_bytes) writes; `None` if it is not 16 bytes.
    pub fn from_bytes(raw: &[u8]) -> Option<CommitMark> {
        let raw: &[u8; 16] = raw.try_into().ok()?;
        Some(CommitMark {
            seq: u64::from_be_bytes(raw[..8].try_into().ok()?),
            highest_id: u64::from_be_bytes(raw[8..].try_into().ok()?),
        })
    }
}

/// What the ledger says about sled, found at open.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LostWrites {
    /// Group commits the ledger saw made durable that sled no longer has.
    pub commits: u64,
    /// Highest message id sled still knows was committed.
    pub sled_highest_id: u64,
    /// Highest message id acknowledged as durable: ids above `sled_highest_id` up to this
    /// one were acknowledged and are gone.
    pub ledger_highest_id: u64,
}

impl std::fmt::Display for LostWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sled lost {} group commit(s) it had made durable",
            self.commits
        )?;
        if self.ledger_highest_id > self.sled_highest_id {
            write!(
                f,
                "; acknowledged messages with ids from {} to {} are missing (ids skip after restarts: \
                 not every id in that range was used)",
                self.sled_highest_id + 1,
                self.ledger_highest_id
            )?;
        } else {
            write!(
                f,
                "; no newly enqueued message is among them, but retries, dead-letter moves or \
                 older records written in them may be"
            )?;
        }
        Ok(())
    }
}

/// Compares sled's mark with the ledger's.
pub fn compare(sled: CommitMark, ledger: CommitMark) -> Option<LostWrites> {
    (sled.seq < ledger.seq).then(|| LostWrites {
        commits: ledger.seq - sled.seq,
        sled_highest_id: sled.highest_id,
        ledger_highest_id: ledger.highest_id,
    })
}

/// The open ledger file, and the thread that syncs it in the background.
pub struct Ledger {
    shared: Arc<Shared>,
    path: PathBuf,
    syncer: Option<JoinHandle<()>>,
}

struct Shared {
    file: File,
    state: Mutex<SyncState>,
    wake: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Marks written so far, and how many of them a finished fdatasync covers.
    written: u64,
    synced: u64,
    stop: bool,
}

/// What reading the ledger at open found.
pub enum Found {
    /// The last commit mark written, checksum intact.
    Mark(CommitMark),
    /// No ledger file: a new spool, or one whose ledger was never written or was removed;
    /// the open starts it at sled's own mark.
    Missing,
    /// The file exists but does not check out; its raw bytes.
    Damaged(Vec<u8>),
}

impl Ledger {
    /// Opens (creating if needed) the ledger in `spool_dir` and reads what it holds.
    pub fn open(spool_dir: &Path) -> io::Result<(Ledger, Found)> {
        let path = spool_dir.join(FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut raw = Vec::new();
        io::Read::read_to_end(&mut (&file), &mut raw)?;
        let shared = Arc::new(Shared {
            file,
            state: Mutex::new(SyncState::default()),
            wake: Condvar::new(),
        });
        let syncer = match sync_interval() {
            Some(every) => {
                let (shared, path) = (shared.clone(), path.clone());
                let thread = std::thread::Builder::new()
                    .name("spool-ledger-sync".into())
                    .spawn(move || sync_in_background(&shared, &path, every))?;
                Some(thread)
            }
            None => None,
        };
        let ledger = Ledger {
            shared,
            path,
            syncer,
        };
        Ok((ledger, decode(&raw)))
    }

    /// The ledger file, for error messages and the operator.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `mark`; called only after sled's fsync of that commit succeeded.
    /// The background thread makes it durable within [`SYNC_INTERVAL`].
    pub fn write(&self, mark: CommitMark) -> io::Result<()> {
        self.shared.file.write_all_at(&encode(mark), 0)?;
        self.shared.lock().written += 1;
        Ok(())
    }

    /// Replaces whatever the file held (missing, damaged, any length) with `mark`,
    /// durably: used at open, when the ledger cannot be trusted.
    pub fn reset(&self, mark: CommitMark) -> io::Result<()> {
        self.shared.file.set_len(LEN as u64)?;
        self.write(mark)?;
        self.sync()
    }

    /// Makes the last write durable (at close, and once at open).
    pub fn sync(&self) -> io::Result<()> {
        let written = self.shared.lock().written;
        self.shared.file.sync_data()?;
        let mut state = self.shared.lock();
        state.synced = state.synced.max(written);
        Ok(())
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState> {
        // The state is two counters and a flag: still consistent after a panic elsewhere.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(syncer) = self.syncer.take() {
            let _ = syncer.join();
        }
    }
}

/// Every `every` ([`SYNC_INTERVAL`] by default), fdatasyncs the ledger if a mark was written since the last
/// sync. A failure is logged once per run of failures: the commits stay durable in sled,
/// only the check at the next open after a power cut is weaker until a sync succeeds.
fn sync_in_background(shared: &Shared, path: &Path, every: Duration) {
    let mut failing = false;
    let mut state = shared.lock();
    loop {
        // Waits on the flag, not on the notification: a stop asked while this thread was
        // syncing (or before it first waited) is seen at once, not one interval later.
        state = shared
            .wake
            .wait_timeout_while(state, every, |s| !s.stop)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        if state.stop {
            return;
        }
        let written = state.written;
        if written == state.synced {
            continue;
        }
        drop(state);
        let result = shared.file.sync_data();
        state = shared.lock();
        match result {
            Ok(()) => {
                state.synced = state.synced.max(written);
                failing = false;
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, path = %path.display(),
                    "could not sync the spool ledger; lost writes in sled's last commits may go unnoticed after a power cut");
            }
            Err(_) => {}
        }
    }
}

fn encode(mark: CommitMark) -> [u8; LEN] {
    let mut out = [0u8; LEN];
    out[..8].copy_from_slice(MAGIC);
    out[8..24].copy_from_slice(&mark.to_bytes());
    let crc = crc32fast::hash(&out[..24]);
    out[24..].copy_from_slice(&crc.to_be_bytes());
    out
}

fn decode(raw: &[u8]) -> Found {
    if raw.is_empty() {
        return Found::Missing;
    }
    let checked = (raw.len() == LEN && &raw[..8] == MAGIC)
        .then(|| u32::from_be_bytes([raw[24], raw[25], raw[26], raw[27]]))
        .filter(|crc| *crc == crc32fast::hash(&raw[..24]))
        .and_then(|_| CommitMark::from_bytes(&raw[8..24]));
    match checked {
        Some(mark) => Found::Mark(mark),
        None => Found::Damaged(raw.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, found) = Ledger::open(dir.path()).unwrap();
        assert!(matches!(found, Found::Missing));
        let mark = CommitMark {
            seq: 7,
            highest_id: 1234,
        };
        ledger.write(mark).unwrap();
        drop(ledger);
        match Ledger::open(dir.path()).unwrap().1 {
            Found::Mark(m) => assert_eq!(m, mark),
            _ => panic!("ledger did not read back"),
        }
        let path = dir.path().join(FILE_NAME);
        let mut raw = std::fs::read(&path).unwrap();
        raw[12] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        assert!(matches!(
            Ledger::open(dir.path()).unwrap().1,
            Found::Damaged(_)
        ));
    }

    #[test]
    fn only_a_ledger_ahead_of_sled_is_a_loss() {
        let at = |seq, highest_id| CommitMark { seq, highest_id };
        assert_eq!(compare(at(5, 10), at(5, 10)), None);
        assert_eq!(compare(at(6, 12), at(5, 10)), None);
        let lost = compare(at(3, 8), at(5, 10)).unwrap();
        assert_eq!(lost.commits, 2);
        assert!(lost.to_string().contains("ids from 9 to 10"), "{lost}");
        let retries_only = compare(at(3, 10), at(5, 10)).unwrap();
        assert!(retries_only.to_string().contains("no newly enqueued"));
    }
}
