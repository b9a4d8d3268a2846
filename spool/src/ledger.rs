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
//! The ledger is overwritten in place (28 bytes, one sector) and not fsynced per commit:
//! an extra fsync would double the cost of every commit, and after a power loss a stale
//! ledger only weakens detection (it can lag sled, never lead it). It is fsynced when the
//! spool closes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// File name of the ledger inside the spool directory.
pub const FILE_NAME: &str = "ledger";
const MAGIC: &[u8; 8] = b"SRLEDGR1";
const LEN: usize = 8 + 8 + 8 + 4;

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

/// The open ledger file.
pub struct Ledger {
    file: File,
    path: PathBuf,
}

/// What reading the ledger at open found.
pub enum Found {
    Mark(CommitMark),
    /// No ledger yet: a new spool, or one written before ledgers existed.
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
        Ok((Ledger { file, path }, decode(&raw)))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `mark`; called only after sled's fsync of that commit succeeded.
    pub fn write(&self, mark: CommitMark) -> io::Result<()> {
        self.file.write_all_at(&encode(mark), 0)
    }

    /// Replaces whatever the file held (missing, damaged, any length) with `mark`,
    /// durably: used at open, when the ledger cannot be trusted.
    pub fn reset(&self, mark: CommitMark) -> io::Result<()> {
        self.file.set_len(LEN as u64)?;
        self.write(mark)?;
        self.sync()
    }

    /// Makes the last write durable (at close, and once at open).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
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
