//! A queue's connection pool: lazily opened, shared by many concurrent sends, closed when
//! idle.
//!
//! A policy `Connection` accepts many `send` calls at once (the Kafka producer and the
//! AMQP channel both pipeline), so a connection is not checked out exclusively: each
//! in-flight send holds an `Arc` clone, and `Arc::strong_count - 1` is the connection's
//! in-flight count. A new connection is opened only when every open one is full, up to the
//! queue's `connection_limit`: one connection is usually enough, and each costs a broker
//! session.
//!
//! A connection on which a send failed transiently (an error, a timeout, a 4xx) while
//! nothing was delivered since that send began is *retired* (see
//! [`PooledConnection::record_send`]): it takes no new sends and is closed once its
//! in-flight sends end, and the next fill opens a fresh one (with connect backoff if the
//! broker is still away). Without this, a connection whose broker went away (RabbitMQ
//! restarted, a socket that hangs) would stay in the pool while traffic keeps it from going
//! idle, and every send on it would fail until the daemon restarts.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use policy::{Connection, SendOutcome};
use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::budget::{Budget, Evictable};
use super::reaper::Trim;

/// Sends in flight per connection. Pipelining is what makes brokers fast (Kafka: ~185
/// msg/s one at a time with the default linger, 500k+ pipelined); 256 keeps a producer
/// busy while bounding what a stuck broker holds in memory.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 256;

/// Messages in flight per connection, whatever the batch size. Without this bound a
/// `batch_size = 100` queue would have 256 x 100 messages in the air per connection, and a
/// million-message backlog drains at 1.3 GB RSS (measured: docs/performance.md, P4); it is
/// also what a crash can deliver twice.
///
/// It also bounds one connection's throughput: a Kafka producer holds each record for
/// `linger.ms` (5 in kafka.lua) plus a round trip, so at most this many messages per that
/// time go out. At 1 024 the P2 drain stopped at ~200 000 msg/s with CPU to spare; at 2 048
/// the CPU is the limit. 4 096 and 8 192 were no faster, and 4 096 raised the peak RSS of
/// a million-message drain by about 100 MiB (docs/performance.md, "In flight per
/// connection").
pub const MAX_MESSAGES_IN_FLIGHT_PER_CONNECTION: usize = 2048;

/// Payload bytes in flight per connection. The message count alone bounds memory only for
/// small messages (2 048 messages of 16 MiB would be 32 GiB); this keeps what a connection
/// holds in Lua, in librdkafka's or lapin's buffers and in the sends' copies to a few
/// times this. A message larger than the budget is still sent, alone.
pub const MAX_BYTES_IN_FLIGHT_PER_CONNECTION: u64 = 16 << 20;

/// How many sends of `per_send` messages one connection carries at once.
pub fn send_slots(per_send: usize) -> usize {
    (MAX_MESSAGES_IN_FLIGHT_PER_CONNECTION / per_send.max(1)).clamp(1, MAX_IN_FLIGHT_PER_CONNECTION)
}

/// Connections with nothing in flight for this long are closed (sooner when the reap
/// interval is shorter).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The pool grows by at most one connection per this interval. A new connection's first
/// sends are slow (a Kafka producer needs ~0.5 s for metadata), so without a pause a burst
/// would fill each new connection at once and open all `connection_limit` of them.
pub const GROWTH_INTERVAL: Duration = Duration::from_secs(1);

/// A policy connection plus what the pool needs to know about its health.
pub struct PooledConnection {
    conn: Connection,
    /// Payload bytes of the sends in flight on it (see [`HeldBytes`]).
    bytes_in_flight: Arc<AtomicU64>,
    /// Sends delivered on this connection so far.
    delivered: AtomicU64,
    retired: AtomicBool,
    /// Its place in the relay-wide [`Budget`], given back once it is closed.
    permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for PooledConnection {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

/// What one send's outcomes say about the connection it went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendSign {
    /// At least one message was delivered: the connection works.
    Works,
    /// Nothing was delivered and something failed transiently (a raised error, a timeout,
    /// a 4xx): the connection may be broken.
    Suspect,
    /// Only permanent verdicts (5xx): the policy judged the messages over a working
    /// connection; nothing to learn about it.
    Silent,
}

impl SendSign {
    /// The sign of one send (or batch) from its outcomes.
    pub fn of(outcomes: &[SendOutcome]) -> SendSign {
        if outcomes.iter().any(SendOutcome::is_delivered) {
            SendSign::Works
        } else if outcomes
            .iter()
            .any(|o| matches!(o, SendOutcome::Transient { .. }))
        {
            SendSign::Suspect
        } else {
            SendSign::Silent
        }
    }
}

/// Room on a connection for more sends: how many, and how many payload bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub sends: usize,
    pub bytes: u64,
}

/// A send's payload bytes, counted in its connection's bytes in flight until this is
/// dropped: with the send's task, however it ends (done, panicked or aborted).
pub struct HeldBytes {
    counter: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl PooledConnection {
    /// Counts `bytes` in flight on this connection until the returned guard is dropped.
    /// (Not an `Arc` of the connection: those count its sends in flight.)
    pub fn hold_bytes(&self, bytes: u64) -> HeldBytes {
        self.bytes_in_flight.fetch_add(bytes, Ordering::Relaxed);
        HeldBytes {
            counter: self.bytes_in_flight.clone(),
            bytes,
        }
    }

    fn bytes_in_flight(&self) -> u64 {
        self.bytes_in_flight.load(Ordering::Relaxed)
    }

    /// A mark to take before a send, for [`record_send`](Self::record_send).
    pub fn mark(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Records how a send that began at `mark` went: a [`SendSign::Suspect`] send while no
    /// send on this connection was delivered since `mark` retires the connection (it is
    /// probably broken: the broker went away, or the socket hangs). One good send in between
    /// keeps it (a message-specific rejection says nothing about the connection).
    pub fn record_send(&self, mark: u64, sign: SendSign) {
        match sign {
            SendSign::Works => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            SendSign::Suspect if self.delivered.load(Ordering::Relaxed) == mark => {
                self.retired.store(true, Ordering::Relaxed);
            }
            SendSign::Suspect | SendSign::Silent => {}
        }
    }
}

impl Evictable for PooledConnection {
    /// Retired by [`record_send`](PooledConnection::record_send) or by the [`Budget`], or
    /// broken by the policy host (a call ran out of time or memory: its Lua state is thrown
    /// away).
    fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed) || self.conn.is_broken()
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }
}

struct Slot {
    conn: Arc<PooledConnection>,
    last_used: Instant,
}

pub struct Pool {
    queue: String,
    slots: Vec<Slot>,
    /// Retired connections with sends still in flight, closed once those end.
    retiring: Vec<Arc<PooledConnection>>,
    /// Sends one connection carries at once ([`send_slots`] of the queue's batch size).
    slots_per_connection: usize,
    last_opened: Option<Instant>,
    /// Connections unused for this long are closed.
    idle_timeout: Duration,
    /// Told when a connection is closed, so the freed Lua state's memory is returned.
    trim: Trim,
    /// Where each connection's permit comes from.
    budget: Budget,
    /// The owning worker's bell: the budget rings it after retiring one of its connections.
    owner: Arc<Notify>,
}

impl Pool {
    pub fn new(
        queue: &str,
        idle_timeout: Duration,
        trim: Trim,
        budget: Budget,
        owner: Arc<Notify>,
    ) -> Pool {
        Pool {
            queue: queue.to_owned(),
            slots: Vec::new(),
            retiring: Vec::new(),
            slots_per_connection: MAX_IN_FLIGHT_PER_CONNECTION,
            last_opened: None,
            idle_timeout,
            trim,
            budget,
            owner,
        }
    }

    /// A permit for one more connection (waits while the relay-wide budget is spent).
    pub async fn permit(&self) -> OwnedSemaphorePermit {
        self.budget.acquire().await
    }

    /// Whether other queues wait for a connection permit (idle connections should go).
    pub fn room_wanted(&self) -> bool {
        self.budget.wanted()
    }

    /// When the first connection with nothing in flight reaches its idle timeout.
    pub fn next_idle_deadline(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter(|slot| Self::in_flight(&slot.conn) == 0)
            .map(|slot| slot.last_used + self.idle_timeout)
            .min()
    }

    /// Sizes each connection's sends for the queue's current `batch_size`.
    pub fn set_send_size(&mut self, per_send: usize) {
        self.slots_per_connection = send_slots(per_send);
    }

    /// Whether one more connection may be opened now (under `limit`, and not too soon
    /// after the previous one).
    pub fn may_grow(&self, limit: usize) -> bool {
        self.slots.len() < limit.max(1)
            && (self.slots.is_empty()
                || self
                    .last_opened
                    .is_none_or(|t| t.elapsed() >= GROWTH_INTERVAL))
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn in_flight(conn: &Arc<PooledConnection>) -> usize {
        Arc::strong_count(conn) - 1
    }

    /// Moves retired connections out of the pool: they take no new sends, and no longer
    /// count against `connection_limit`, so a replacement can be opened at once.
    pub fn retire_broken(&mut self) {
        let (broken, kept): (Vec<Slot>, Vec<Slot>) =
            self.slots.drain(..).partition(|s| s.conn.is_retired());
        self.slots = kept;
        for slot in broken {
            let in_flight = Self::in_flight(&slot.conn);
            if slot.conn.conn.is_broken() {
                tracing::warn!(queue = %self.queue, in_flight,
                    "retiring a connection: a policy call on it ran out of time or memory, so its Lua state is discarded; a new one will be opened");
            } else if in_flight == 0 {
                // Routine under many queues: not worth a warning each time.
                tracing::info!(queue = %self.queue,
                    "closing an idle connection: another queue needs its place under --max-broker-connections");
            } else {
                tracing::warn!(queue = %self.queue, in_flight,
                    "retiring a connection: a send failed and none succeeded since; a new one will be opened");
            }
            self.retiring.push(slot.conn);
        }
        self.close_retired();
    }

    /// Retires the connections built from a policy generation other than `generation`
    /// (after a reload): they take no new sends, their in-flight ones finish on the old
    /// policy, and they close once those ended.
    pub fn retire_outdated(&mut self, generation: u64) {
        let (old, kept): (Vec<Slot>, Vec<Slot>) = self
            .slots
            .drain(..)
            .partition(|s| s.conn.generation() != generation);
        self.slots = kept;
        for slot in old {
            tracing::info!(queue = %self.queue, in_flight = Self::in_flight(&slot.conn),
                "policy reloaded: retiring a connection of the old policy once its sends end");
            slot.conn.retire();
            self.retiring.push(slot.conn);
        }
        self.close_retired();
    }

    fn close_retired(&mut self) {
        for conn in std::mem::take(&mut self.retiring) {
            match Arc::try_unwrap(conn) {
                Ok(pooled) => close_in_background(pooled, &self.trim),
                Err(conn) => self.retiring.push(conn),
            }
        }
    }

    /// Whether every open connection is busy: another one would add throughput. Under a
    /// backlog the worker tops a connection up as each send finishes, so it is never seen
    /// completely full; three quarters full (of its sends or of its bytes) means it is
    /// saturated (its Lua state, which runs one coroutine at a time, or its broker round
    /// trips are the limit).
    pub fn all_busy(&self) -> bool {
        let busy = (self.slots_per_connection * 3 / 4).max(1);
        let busy_bytes = MAX_BYTES_IN_FLIGHT_PER_CONNECTION / 4 * 3;
        !self.slots.is_empty()
            && self.slots.iter().all(|slot| {
                Self::in_flight(&slot.conn) >= busy || slot.conn.bytes_in_flight() >= busy_bytes
            })
    }

    /// The first connection with room, and how much more it takes. Filling in order keeps
    /// later connections idle, so they time out when load drops.
    pub fn with_room(&mut self) -> Option<(Arc<PooledConnection>, Room)> {
        self.retire_broken();
        let now = Instant::now();
        self.slots.iter_mut().find_map(|slot| {
            let room = Room {
                sends: self
                    .slots_per_connection
                    .saturating_sub(Self::in_flight(&slot.conn)),
                bytes: MAX_BYTES_IN_FLIGHT_PER_CONNECTION
                    .saturating_sub(slot.conn.bytes_in_flight()),
            };
            (room.sends > 0 && room.bytes > 0).then(|| {
                slot.last_used = now;
                (slot.conn.clone(), room)
            })
        })
    }

    pub fn add(&mut self, conn: Connection, permit: OwnedSemaphorePermit) {
        self.last_opened = Some(Instant::now());
        let conn = Arc::new(PooledConnection {
            conn,
            bytes_in_flight: Arc::default(),
            delivered: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            permit,
        });
        self.budget.register(&conn, &self.owner);
        self.slots.push(Slot {
            conn,
            last_used: Instant::now(),
        });
    }

    /// Closes connections idle for the pool's idle timeout (or all idle ones if `all`), in
    /// the background so a slow `close` never stalls dispatching.
    pub fn close_idle(&mut self, all: bool) {
        let now = Instant::now();
        let mut kept = Vec::with_capacity(self.slots.len());
        for slot in self.slots.drain(..) {
            let idle = all
                || slot.conn.is_retired()
                || now.duration_since(slot.last_used) >= self.idle_timeout;
            if !idle || Self::in_flight(&slot.conn) > 0 {
                kept.push(slot);
                continue;
            }
            match Arc::try_unwrap(slot.conn) {
                Ok(pooled) => {
                    tracing::info!(queue = %self.queue, "closing idle connection");
                    close_in_background(pooled, &self.trim);
                }
                Err(conn) => kept.push(Slot {
                    conn,
                    last_used: slot.last_used,
                }),
            }
        }
        self.slots = kept;
        self.close_retired();
    }

    /// Closes every connection and waits (bounded) for the closes: used at shutdown, after
    /// in-flight sends were drained or aborted.
    pub async fn close_all(&mut self) {
        let closes = self
            .slots
            .drain(..)
            .map(|s| s.conn)
            .chain(self.retiring.drain(..))
            .filter_map(|c| Arc::try_unwrap(c).ok());
        let all = futures::future::join_all(closes.map(|c| c.conn.close()));
        if tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .is_err()
        {
            tracing::warn!(queue = %self.queue, "closing connections took over 10 s; abandoned");
        }
        self.trim.freed();
    }
}

/// Closes `pooled` without making anyone wait for it (bounded: a broker may hang), then
/// gives its permit back and asks for the freed memory to be returned.
fn close_in_background(pooled: PooledConnection, trim: &Trim) {
    let trim = trim.clone();
    tokio::spawn(async move {
        let PooledConnection { conn, permit, .. } = pooled;
        if tokio::time::timeout(Duration::from_secs(10), conn.close())
            .await
            .is_err()
        {
            tracing::warn!("connection close took over 10 s; abandoned");
        }
        drop(permit);
        trim.freed();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_signs_by_its_best_outcome() {
        let ok = SendOutcome::Delivered {
            response: "250 ok".into(),
        };
        let later = SendOutcome::Transient {
            code: 451,
            response: "later".into(),
        };
        let no = SendOutcome::Permanent {
            code: 550,
            response: "no".into(),
        };
        assert_eq!(SendSign::of(&[later.clone(), ok]), SendSign::Works);
        assert_eq!(SendSign::of(&[no.clone(), later]), SendSign::Suspect);
        assert_eq!(SendSign::of(&[no]), SendSign::Silent);
        assert_eq!(SendSign::of(&[]), SendSign::Silent);
    }
}
