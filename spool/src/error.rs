//! What can go wrong in the spool, one variant per cause, each naming where.

use std::path::PathBuf;

use crate::record::MessageId;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path} is locked by pid {pid}: another spoolrelay or spoolctl is using it (stop it, or talk to the daemon with `spoolctl --url`)")]
    Locked { path: PathBuf, pid: String },
    #[error("cannot use spool directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sled storage error in {path}: {source} (check the disk, then run `spoolctl verify`)")]
    Storage {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("the sled database in {path} is damaged beyond what it can recover ({detail}): move the spool directory aside, start with an empty spool, and salvage with `spoolctl --spool <old dir> verify` / `export` once it opens, or restore from a `spoolctl export` backup")]
    Unrecoverable { path: PathBuf, detail: String },
    /// sled's log lost group commits the ledger saw made durable (see `ledger.rs`).
    #[error("spool {path}: {lost}. The disk or filesystem damaged sled's files under data/. See what is left with `spoolctl --spool {path} verify`; record the loss in quarantine and start again with `spoolctl --spool {path} verify --repair`, or restore from a `spoolctl export` backup")]
    LostWrites {
        path: PathBuf,
        lost: crate::ledger::LostWrites,
    },
    /// The batch could not be made durable; nothing in it may be acknowledged.
    #[error("spool could not make the batch durable: {0} (is the disk full or failing?)")]
    NotDurable(String),
    /// A durability error happened earlier: the kernel may have dropped pages that a later
    /// fsync would report as written (fsyncgate), and sled itself may be wedged. Only a
    /// fresh open reads the disk again, so every write is refused until then.
    #[error("the spool refuses writes since {since_ms} ms after the epoch, when making a batch durable failed ({cause}): data written after that could be reported durable without being so; free or fix the disk, then restart the daemon to reread the spool from disk")]
    Poisoned { since_ms: u64, cause: String },
    #[error("message id {id} is above the largest id a spool accepts ({max}): the export was not written by spoolctl, or was edited; renumber those messages before importing")]
    IdOutOfRange { id: u64, max: u64 },
    #[error("the spool has handed out every message id up to {max} (next would be {next}): export the spool, then import into a new one with smaller ids")]
    IdsExhausted { next: u64, max: u64 },
    #[error("invalid queue name {name:?}: {why}")]
    InvalidQueueName { name: String, why: &'static str },
    #[error("message {id} is not leased from queue {queue:?}")]
    NotLeased { queue: String, id: MessageId },
    #[error("message {id} not found")]
    NotFound { id: MessageId },
    #[error("the spool's commit thread has stopped; the spool must be reopened")]
    WriterStopped,
}

pub type Result<T, E = SpoolError> = std::result::Result<T, E>;
