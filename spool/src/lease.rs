//! Lease handles: what a caller holds while a message is in flight.
//!
//! [`Spool::lease`](crate::Spool::lease) hands out each due message as a [`Leased`]: the
//! [`Message`] to send (payload and meta) and a [`Lease`], the small handle that settles it
//! (`ack`, `ack_many`, `release`; `retry` and `dead_letter` take the whole [`Leased`], since
//! they write the message to its new place). Settling by handle instead of by message has
//! two reasons:
//! - a dispatcher keeps only handles for in-flight tracking (a send task that panics or is
//!   aborted gives its leases back), never a second copy of the payload and never a fake
//!   message built to name one;
//! - the handle, not the message, says where the record is stored, so a later record
//!   format can settle a message without reading it again (see [`Lease`]).

use std::sync::Arc;

use crate::chunk_table::Home;
use crate::record::{Message, MessageId};

/// One leased message, as [`Spool::lease`](crate::Spool::lease) returns it.
///
/// Two plain fields rather than a message with a lease inside (or a lease with a message
/// inside): the dispatcher reads the message once, to build what the policy sends, and
/// settles with the handle afterwards, so it can move the message into the send and keep
/// the handle; and a `Message` from anywhere else ([`Spool::get`](crate::Spool::get), the
/// dead letters, an import) can never settle anything.
#[derive(Debug, Clone, PartialEq)]
pub struct Leased {
    /// The handle that settles the message.
    pub lease: Lease,
    /// The message as stored when it was leased: payload, meta, attempts, last error.
    pub message: Message,
}

/// The handle on one leased message: queue, id, attempts, created and due time, and where
/// its record is stored. Small and `Clone` (no payload), so a dispatcher can keep one per
/// message in flight.
///
/// The queue name is shared by every lease of one [`Spool::lease`](crate::Spool::lease) call
/// (an `Arc`), so a handle costs no allocation of its own to make or to clone.
///
/// Only the spool makes leases. A lease names the message's storage location, so settling
/// never has to look the record up first: a single record's key (queue and id) plus its
/// encoded length, which says whether the record carries a large-record marker that an ack
/// must delete too; or a chunk's key and the message's position in it, so an ack sets the
/// message's bit in the chunk's settle bitmap without reading the chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub(crate) queue: Arc<str>,
    pub(crate) id: MessageId,
    pub(crate) attempts: u32,
    pub(crate) created_ms: u64,
    pub(crate) due_ms: u64,
    pub(crate) location: Location,
    /// The message's payload size, as the spool's index keeps it.
    pub(crate) bytes: u32,
}

/// Where a leased message's record is, beyond its queue and id (see [`Lease`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Location {
    /// A single record of this length in bytes, as read at lease time.
    Single { record_len: usize },
    /// A record of a chunk.
    Chunk(Home),
}

impl Lease {
    /// Builds the handle for `msg` of `queue`, whose record was just read at `location`.
    pub(crate) fn of(queue: &Arc<str>, msg: &Message, location: Location, bytes: u32) -> Lease {
        Lease {
            queue: queue.clone(),
            id: msg.id,
            attempts: msg.attempts,
            created_ms: msg.created_ms,
            due_ms: msg.due_ms,
            location,
            bytes,
        }
    }

    /// The chunk and place of a chunked message; `None` for a single record.
    pub(crate) fn home(&self) -> Option<Home> {
        match self.location {
            Location::Chunk(home) => Some(home),
            Location::Single { .. } => None,
        }
    }

    /// Whether the record is a single one of at least `len` bytes (a large record).
    pub(crate) fn is_single_of_at_least(&self, len: usize) -> bool {
        matches!(self.location, Location::Single { record_len } if record_len >= len)
    }

    /// The queue the message was leased from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The message's id.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// Failed delivery attempts before this lease.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// When the spool accepted the message (ms since the Unix epoch).
    pub fn created_ms(&self) -> u64 {
        self.created_ms
    }

    /// When the message was due (ms since the Unix epoch) when it was leased.
    pub fn due_ms(&self) -> u64 {
        self.due_ms
    }

    /// The message's payload size in bytes, as the spool's index keeps it: what
    /// [`Spool::lease_within`](crate::Spool::lease_within) budgets.
    pub fn bytes(&self) -> u64 {
        u64::from(self.bytes)
    }
}
