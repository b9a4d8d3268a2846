//! The relay-wide bound on open connections (`--max-broker-connections`).
//!
//! Every connection is a Lua state on an OS thread of its own, with a small tokio runtime
//! (an epoll and an event fd) plus whatever sockets the policy opens. Without a bound, a
//! burst over 10 000 queues opened 10 000 of them at once, ran out of file descriptors
//! ("cannot start its runtime: Too many open files") and backed off for seconds per queue,
//! holding ~60 KiB per idle state meanwhile (docs/performance.md, P7).
//!
//! A connection holds a permit of the [`Budget`] until it is closed. A queue that needs one
//! while none is free takes the room of an *idle* connection of another queue: the first
//! registered connection with nothing in flight is retired (it takes no new sends) and its
//! worker is woken to close it, which returns the permit. If every connection is busy, the
//! queue waits in line (the semaphore is fair) and [`Budget::wanted`] tells workers, which
//! then close a connection as soon as it goes idle while their queue has nothing due.
//! Busy connections are never taken, so a queue under load keeps its connections. Nobody
//! polls: a waiter sleeps on the semaphore.
//!
//! Registered connections are visited in a ring (`VecDeque`, clock order), so finding a
//! victim costs about one step per busy connection passed over, never a sort.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// What the budget needs of an open connection: whether it is on its way out, and a way to
/// send it there. A trait, so that the budget does not import the pool that uses it.
pub trait Evictable: Send + Sync {
    /// Retired or broken: it takes no new sends and will be closed.
    fn is_retired(&self) -> bool;
    /// Takes no new sends from now on; closed once its sends end.
    fn retire(&self);
}

/// An open connection and the bell of the worker that owns it.
type Entry = (Weak<dyn Evictable>, Weak<Notify>);

/// Permits for open connections, shared by every queue's pool. Cheap to clone.
#[derive(Clone)]
pub struct Budget {
    permits: Arc<Semaphore>,
    max: usize,
    /// Queues waiting for a permit.
    waiting: Arc<AtomicUsize>,
    /// Open connections and the bell of the worker that owns each one.
    open: Arc<Mutex<VecDeque<Entry>>>,
}

impl Budget {
    /// A budget of `max` open connections (at least one).
    pub fn new(max: usize) -> Budget {
        Budget {
            permits: Arc::new(Semaphore::new(max.max(1))),
            max: max.max(1),
            waiting: Arc::default(),
            open: Arc::default(),
        }
    }

    /// A permit for one more connection: at once if one is free, else once an idle
    /// connection elsewhere was closed to make room.
    pub async fn acquire(&self) -> OwnedSemaphorePermit {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return permit;
        }
        // Counted before looking for a victim: a connection that goes idle after the look
        // sees the count and is closed by its worker.
        let _waiting = Waiting::new(&self.waiting);
        self.evict_one();
        self.permits
            .clone()
            .acquire_owned()
            .await
            .expect("the budget's semaphore is never closed")
    }

    /// Whether some queue waits for a permit: idle connections should make room.
    pub fn wanted(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Makes `conn` a candidate for eviction; `owner` is woken to close it.
    pub fn register<C: Evictable + 'static>(&self, conn: &Arc<C>, owner: &Arc<Notify>) {
        let mut open = self.lock();
        // Connections closed without eviction leave dead entries: sweep them now and then.
        if open.len() >= 2 * self.max {
            open.retain(|(conn, _)| conn.strong_count() > 0);
        }
        let weak: Weak<C> = Arc::downgrade(conn);
        let conn: Weak<dyn Evictable> = weak;
        open.push_back((conn, Arc::downgrade(owner)));
    }

    /// Forgets the entries of closed connections. Each one's `Weak`s keep two small
    /// allocations (the connection's and its worker's bell) from being freed, scattered over
    /// pages the burst touched; after a burst those pages could not go back to the system.
    /// The supervisor calls it when it reaps idle queues.
    pub fn forget_closed(&self) {
        let mut open = self.lock();
        open.retain(|(conn, _)| conn.strong_count() > 0);
        open.shrink_to_fit();
    }

    /// Retires the first idle connection in clock order and wakes its owner; false if every
    /// open connection is busy. Closed connections met on the way are forgotten.
    pub fn evict_one(&self) -> bool {
        let mut open = self.lock();
        for _ in 0..open.len() {
            let Some((weak, owner)) = open.pop_front() else {
                return false;
            };
            let Some(conn) = weak.upgrade() else {
                continue; // closed meanwhile
            };
            if conn.is_retired() {
                continue; // on its way out already
            }
            // Held by its pool slot and by `conn` here: nothing in flight.
            if Arc::strong_count(&conn) <= 2 {
                conn.retire();
                if let Some(owner) = owner.upgrade() {
                    owner.notify_one();
                }
                return true;
            }
            open.push_back((weak, owner));
        }
        false
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counts a waiter for as long as it waits (also when its future is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Conn;
    impl Evictable for Conn {
        fn is_retired(&self) -> bool {
            false
        }
        fn retire(&self) {}
    }

    #[test]
    fn closed_connections_are_forgotten() {
        let budget = Budget::new(4);
        let (owner, closed_owner) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let kept = Arc::new(Conn);
        budget.register(&kept, &owner);
        budget.register(&Arc::new(Conn), &closed_owner);
        // The closed connection's entry still holds its allocation and its owner's bell.
        assert_eq!(Arc::weak_count(&closed_owner), 1);
        budget.forget_closed();
        assert_eq!(
            Arc::weak_count(&closed_owner),
            0,
            "the closed entry is gone"
        );
        assert_eq!(Arc::weak_count(&owner), 1, "the open one stays");
        assert_eq!(budget.lock().len(), 1);
    }
}
