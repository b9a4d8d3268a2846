//! A queue's connection pool: lazily opened, shared by many concurrent sends, closed when
//! idle.
//!
//! A policy `Connection` accepts many `send` calls at once (the Kafka producer and the
//! AMQP channel both pipeline), so a connection is not checked out exclusively: each
//! in-flight send holds an `Arc` clone, and `Arc::strong_count - 1` is the connection's
//! in-flight count. A new connection is opened only when every open one is full, up to the
//! queue's `connection_limit`: one connection is usually enough, and each costs a broker
//! session.

use std::sync::Arc;
use std::time::{Duration, Instant};

use policy::Connection;

/// Sends in flight per connection. Pipelining is what makes brokers fast (Kafka: ~185
/// msg/s one at a time with the default linger, 500k+ pipelined); 256 keeps a producer
/// busy while bounding what a stuck broker holds in memory.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 256;

/// Connections with nothing in flight for this long are closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The pool grows by at most one connection per this interval. A new connection's first
/// sends are slow (a Kafka producer needs ~0.5 s for metadata), so without a pause a burst
/// would fill each new connection at once and open all `connection_limit` of them.
pub const GROWTH_INTERVAL: Duration = Duration::from_secs(1);

struct Slot {
    conn: Arc<Connection>,
    last_used: Instant,
}

pub struct Pool {
    queue: String,
    slots: Vec<Slot>,
    last_opened: Option<Instant>,
}

impl Pool {
    pub fn new(queue: &str) -> Pool {
        Pool {
            queue: queue.to_owned(),
            slots: Vec::new(),
            last_opened: None,
        }
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

    fn in_flight(conn: &Arc<Connection>) -> usize {
        Arc::strong_count(conn) - 1
    }

    /// The first connection with room, and how many more sends it takes. Filling in order
    /// keeps later connections idle, so they time out when load drops.
    pub fn with_room(&mut self) -> Option<(Arc<Connection>, usize)> {
        let now = Instant::now();
        self.slots.iter_mut().find_map(|slot| {
            let room = MAX_IN_FLIGHT_PER_CONNECTION.saturating_sub(Self::in_flight(&slot.conn));
            (room > 0).then(|| {
                slot.last_used = now;
                (slot.conn.clone(), room)
            })
        })
    }

    pub fn add(&mut self, conn: Connection) {
        self.last_opened = Some(Instant::now());
        self.slots.push(Slot {
            conn: Arc::new(conn),
            last_used: Instant::now(),
        });
    }

    /// Closes connections idle for [`IDLE_TIMEOUT`] (or all idle ones if `all`), in the
    /// background so a slow `close` never stalls dispatching.
    pub fn close_idle(&mut self, all: bool) {
        let now = Instant::now();
        let mut kept = Vec::with_capacity(self.slots.len());
        for slot in self.slots.drain(..) {
            let idle = all || now.duration_since(slot.last_used) >= IDLE_TIMEOUT;
            if !idle || Self::in_flight(&slot.conn) > 0 {
                kept.push(slot);
                continue;
            }
            match Arc::try_unwrap(slot.conn) {
                Ok(conn) => {
                    tracing::info!(queue = %self.queue, "closing idle connection");
                    tokio::spawn(async move {
                        if tokio::time::timeout(Duration::from_secs(10), conn.close())
                            .await
                            .is_err()
                        {
                            tracing::warn!("connection close took over 10 s; abandoned");
                        }
                    });
                }
                Err(conn) => kept.push(Slot {
                    conn,
                    last_used: slot.last_used,
                }),
            }
        }
        self.slots = kept;
    }

    /// Closes every connection and waits (bounded) for the closes: used at shutdown, after
    /// in-flight sends were drained or aborted.
    pub async fn close_all(&mut self) {
        let closes = self
            .slots
            .drain(..)
            .filter_map(|s| Arc::try_unwrap(s.conn).ok());
        let all = futures::future::join_all(closes.map(|c| c.close()));
        if tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .is_err()
        {
            tracing::warn!(queue = %self.queue, "closing connections took over 10 s; abandoned");
        }
    }
}
