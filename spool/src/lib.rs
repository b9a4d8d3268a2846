//! # The spool: a durable, crash-safe message queue on sled
//!
//! spoolrelay answers "accepted" only for messages this library has put on stable storage,
//! and forgets a message only once it was delivered or an operator removed it. Everything
//! here serves those two promises.
//!
//! ## Invariants
//! - `enqueue` returns only after the batch is flushed **and fsynced** (sled's own flush is
//!   not an fsync on Linux, sled #1452: see [`durability`]).
//! - Every record is checksummed (CRC-32) and versioned ([`record`]). A record that fails its
//!   checksum or does not decode is moved to the quarantine tree with its raw bytes and key;
//!   it is never dropped silently and never panics the process.
//! - A message leaves the messages tree only by `ack` (delivered), `dead_letter` (moved,
//!   kept), or a quarantine move. `retry` persists attempts, due time and error first. A
//!   chunked message's settled bit is set only with its new copy (one batch), or after it
//!   was delivered.
//! - The in-memory index changes only after the disk change it mirrors is durable.
//! - After any durability error the spool is *poisoned*: it writes nothing more until a
//!   reopen reads the disk again (see "Poisoning" below).
//! - Ids are at most [`MessageId::MAX`] (2^63); nothing wraps.
//!
//! ## On-disk layout
//! ```text
//! <spool dir>/
//!   spool.lock          flock + holder pid: one process per spool
//!   ledger              the last commit's mark, outside sled ([`ledger`])
//!   damaged/            sled `conf` / `snap.*` files that failed their CRC, set aside at
//!                       open for sled to rebuild (`sled_files.rs`); only if any
//!   data/               one sled database
//!     messages          <queue> 0x00 <id u64 BE>  -> record v1 (Message): a "single"
//!                       0x00 0x01 <queue> 0x00 <first id> -> chunk: header + records
//!                       0x00 0x02 <queue> 0x00 <first id> -> the chunk's header alone
//!                       0x00 0x03 <queue> 0x00 <first id> -> the chunk's settle bitmap
//!                       0x00 0x00                 -> how many chunk heads there are
//!     dead_letter       <id u64 BE>               -> record v1 (Message, last_error = reason)
//!     quarantine        <seq u64 BE>              -> record v1 (QuarantineEntry)
//!     meta              "id_hwm"                  -> highest id ever committed
//!                       "commit_mark"             -> commit seq + highest id ([`ledger`])
//!                       "large/" <id u64 BE>      -> queue name ([`keys::LARGE_RECORD`])
//!                       "setting/" <name>         -> operator setting ([`Spool::put_setting`])
//! ```
//! One data tree holds every queue, because sled bloats when used with many trees (sled
//! #1333, #1484); queue-prefixed keys keep each queue contiguous and FIFO by id.
//!
//! ## Chunks (spool v2, `SpoolOptions::chunked_ingest`, on by default)
//! With chunked ingest, what one enqueue call brings to one queue (two messages or more,
//! each under half a chunk) is written as one chunk ([`chunk`]): one sled value for up to
//! 64 KiB of messages, plus a copy of its header, in the same batch. A chunked message is
//! settled by a bit in its chunk's bitmap ([`chunk_table`]), and the chunk is deleted once
//! every bit is set. Everything else is a single v1 record, as before: a message alone in
//! its queue in the call, a large one, and every message that moved out of its chunk (a
//! retry, a dead letter, an operator's rewrite), in the same batch that sets its bit. A v1
//! spool is therefore a v2 spool without chunks, and opens as it is; a spool that holds
//! chunks needs a build that reads them (a v1 build would quarantine the chunk keys as
//! records it cannot read, never drop them silently). Recovery reads the heads and bitmaps,
//! never a payload, unless the heads found do not match their count (`keys::CHUNK_HEADS`):
//! then it walks the chunks for one that lost its head (`recovery_chunks.rs`).
//! docs/spool-v2-design.md has the design and the steps still to come.
//!
//! ## Writing: group commit
//! All durable writes go through one commit thread (`commit.rs`). It takes every job that
//! queued up while its previous fsync ran, applies them atomically (a sled batch or
//! transaction), flushes, fsyncs, updates the index, then answers all callers at once. Many concurrent HTTP
//! requests therefore share one fsync: throughput grows with concurrency while latency
//! stays about one fsync.
//!
//! ## Blobs
//! sled writes a log item over about 128 KiB (a large value, or a large node) to its own
//! file in `data/blobs/`. Upstream never fsyncs it; the vendored sled fsyncs the file and
//! the directory before the item's pointer goes into the log, so the spool's own sync is
//! the log's fdatasync alone ([`durability`]). sled skips a blob whose file is missing at open without an error, so each record big
//! enough to be a blob gets a small marker in `meta`, written with it; the recovery scan
//! reports a marker whose message is gone ([`keys::LARGE_RECORD`]).
//!
//! ## Poisoning (fsyncgate)
//! A failed write, flush or fsync poisons the spool. After a failed fsync Linux may have
//! dropped the dirty pages and cleared the error, so a later fsync can succeed for data
//! that is gone; and sled 0.34 can be left wedged (a blob write that fails leaks a log
//! reservation, and every later flush waits for it for ever). Neither is repairable in
//! process, so from then on every write and lease answers [`SpoolError::Poisoned`] ("restart
//! the daemon to reread the disk"), [`Spool::poisoned`] says why (the daemon's `/readyz`
//! answers 503), and closing the spool gives sled a bounded time to let go: whatever got a
//! 2xx was fsynced before, so a wedged sled is left behind rather than waited for.
//!
//! ## Reading: leases
//! The dispatcher calls `lease(queue, max, now)`; the index hands out due ids (earliest
//! due first, then id: FIFO for first attempts) and the records are read from sled one by
//! one (a chunk once for a run of its messages), so a queue is never loaded whole. Each comes as a [`Leased`]: the message to send
//! and its [`Lease`], a small handle (queue, id, attempts, times, where the record is
//! stored) that every settlement takes (`settle.rs`), so in-flight tracking never copies a
//! payload and a message read from anywhere else cannot settle anything. Leases are
//! memory-only: after a crash every message is simply due again, and only what was in
//! flight can be delivered twice. An `ack` does not touch the disk: the message leaves the
//! index at once, and the commit thread writes its delete (or settled bit) with its next
//! group commit, or alone after a short tick, not fsynced on its own, so a dispatcher never
//! waits for the disk on an async thread. A crash in between means a duplicate, never a
//! loss. `retry` and `dead_letter` take the whole [`Leased`]
//! and write its message back durably (v1 keeps the delivery state in the record; nothing
//! else writes a leased record). Whatever fails after a lease was taken (a read, an ack, the
//! hand-off of a retry or a dead-letter to the commit thread) gives the lease back, so
//! nothing stays in flight until a restart.
//! Operator rewrites (requeue, rebind) apply each chunk's index changes with
//! that chunk's commit, so an interrupted one leaves nothing leased.
//!
//! ## Recovery
//! Opening scans every tree once ([`recovery`]): it rebuilds the index (ids, due times and
//! sizes, in runs of consecutive ids: a million messages cost a few MB), reading single
//! records whole but of chunks only their headers and bitmaps, never a payload; it
//! quarantines what does not decode, and resolves a message found both queued and
//! dead-lettered in favour of the dead-letter copy. The ids continue above the highest id
//! ever committed.
//!
//! sled itself can lose data without saying so: its recovery treats a damaged frame as
//! the end of the log. The [`ledger`] catches that (sled's last commit mark behind the one
//! recorded outside it) and the open refuses until an operator accepts the loss.
//!
//! ## Operator API
//! Listing, re-routing (`rebind`, `expedite`), purging, dead-letter requeue and
//! export/import live in `operator.rs`. They go through the same commit thread as the
//! dispatcher's writes, touch waiting messages only (a leased one belongs to the
//! dispatcher until settled), and commit in chunks so a large rewrite never builds one
//! giant job.

#![warn(missing_docs)]

mod acked_singles;
pub mod chunk;
pub mod chunk_table;
mod chunked;
mod commit;
pub mod durability;
pub mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod index;
pub mod keys;
mod lease;
pub mod ledger;
mod lock;
pub mod meta_json;
mod operator;
pub mod record;
pub mod recovery;
mod recovery_chunks;
mod settings;
mod settle;
mod sled_files;
mod spool;
pub mod view;

pub use durability::SyncFaults;
pub use error::{Result, SpoolError};
pub use index::QueueStats;
pub use lease::{Lease, Leased};
pub use ledger::LostWrites;
pub use record::{Message, MessageId, Meta, MetaValue};
pub use recovery::{DamagedRecord, RecoveryReport};
pub use spool::{NewMessage, Spool, SpoolOptions, SpoolStats};

/// A record set aside because it could not be read: enough to inspect, export or repair it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuarantineEntry {
    /// The tree the record was found in.
    pub tree: String,
    /// The record's key in that tree, so a repair can put it back where it was.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The record's bytes exactly as found: nothing is lost by setting it aside.
    #[serde(with = "serde_bytes")]
    pub raw: Vec<u8>,
    /// Why it could not be read (checksum, version, decoding or key), for the operator.
    pub reason: String,
    /// When it was quarantined (ms since the Unix epoch).
    pub at_ms: u64,
}

/// Milliseconds since the Unix epoch: the spool's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
