//! What can go wrong in the spool, one variant per cause, each naming where.

use std::path::PathBuf;

use crate::record::MessageId;

/// Every error the spool returns. The message says what failed, on which path or message,
/// and what the operator can do about it; callers map variants to HTTP status or exit codes.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Another process holds the spool's lock file: two writers would corrupt sled.
    #[error("spool {path} is locked by pid {pid}: another spoolrelay or spoolctl is using it (stop it, or talk to the daemon with `spoolctl --url`)")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The holder's pid as written in the lock file (may be empty or stale text).
        pid: String,
    },
    /// A file-system call on the spool directory failed (create, open, lock, read).
    #[error("cannot use spool directory {path}: {source}")]
    Io {
        /// The file or directory the call was made on.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// sled reported an error reading or writing its trees.
    #[error(
        "sled storage error in {path}: {source} (check the disk (dmesg). If this comes at \
         open, sled cannot read its own log, and `spoolctl verify` opens it the same way: \
         restore `data/` from a backup, or move the spool directory aside, keeping it as \
         evidence, and start with an empty one)"
    )]
    Storage {
        /// The spool directory.
        path: PathBuf,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// sled refused to open its database: its own recovery cannot repair what is on disk.
    #[error("the sled database in {path} is damaged beyond what it can recover ({detail}): move the spool directory aside, start with an empty spool, and salvage with `spoolctl --spool <old dir> verify` / `export` once it opens, or restore from a `spoolctl export` backup")]
    Unrecoverable {
        /// The spool directory.
        path: PathBuf,
        /// sled's description of the damage.
        detail: String,
    },
    /// sled's log lost group commits the ledger saw made durable (see `ledger.rs`).
    #[error("spool {path}: {lost}. The disk or filesystem damaged sled's files under data/. See what is left with `spoolctl --spool {path} verify`; record the loss in quarantine and start again with `spoolctl --spool {path} verify --repair`, or restore from a `spoolctl export` backup")]
    LostWrites {
        /// The spool directory.
        path: PathBuf,
        /// How far sled's last commit mark is behind the ledger's.
        lost: crate::ledger::LostWrites,
    },
    /// The batch could not be made durable; nothing in it may be acknowledged.
    #[error("spool could not make the batch durable: {0} (is the disk full or failing?)")]
    NotDurable(String),
    /// A durability error happened earlier: the kernel may have dropped pages that a later
    /// fsync would report as written (fsyncgate), and sled itself may be wedged. Only a
    /// fresh open reads the disk again, so every write is refused until then.
    #[error("the spool refuses writes since {since_ms} ms after the epoch, when making a batch durable failed ({cause}): data written after that could be reported durable without being so; free or fix the disk, then restart the daemon to reread the spool from disk")]
    Poisoned {
        /// When the first durability error happened (ms since the Unix epoch).
        since_ms: u64,
        /// That first error, so the operator sees the root cause, not the refusal.
        cause: String,
    },
    /// An imported message carries an id above [`MessageId::MAX`]; ids must never wrap.
    #[error("message id {id} is above the largest id a spool accepts ({max}): the export was not written by spoolctl, or was edited; renumber those messages before importing")]
    IdOutOfRange {
        /// The offending id.
        id: u64,
        /// The largest id a spool accepts ([`MessageId::MAX`]).
        max: u64,
    },
    /// No id is left to assign without wrapping (a FIFO key order would break).
    #[error("the spool has handed out every message id up to {max} (next would be {next}): export the spool, then import into a new one with smaller ids")]
    IdsExhausted {
        /// The id the next message would have had.
        next: u64,
        /// The largest id a spool accepts.
        max: u64,
    },
    /// A queue name the key layout cannot hold (empty, over 255 bytes, or containing the
    /// key separator or another control byte).
    #[error("invalid queue name {name:?}: {why}")]
    InvalidQueueName {
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        why: &'static str,
    },
    /// A settlement (ack, retry, dead-letter, release) named a message this spool did not
    /// lease out from that queue: a caller bug or a lease already settled.
    #[error("message {id} is not leased from queue {queue:?}")]
    NotLeased {
        /// The queue named by the caller.
        queue: String,
        /// The message named by the caller.
        id: MessageId,
    },
    /// An operator operation named a message that is not (or no longer) in the spool.
    #[error("message {id} not found")]
    NotFound {
        /// The id asked for.
        id: MessageId,
    },
    /// The commit thread is gone (it panicked or the spool is closing), so no write can be
    /// made durable any more.
    #[error("the spool's commit thread has stopped; the spool must be reopened")]
    WriterStopped,
}

/// The spool's result type: [`SpoolError`] unless said otherwise.
pub type Result<T, E = SpoolError> = std::result::Result<T, E>;
