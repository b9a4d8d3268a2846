//! A queue worker's running send tasks, and the leases each one holds.
//!
//! Each send runs as a task of its own that settles its messages with the spool (see
//! [`deliver`](super::deliver)). A task that panics, or is aborted when the drain deadline
//! passes, never settles: its messages would stay leased, invisible to every lease until a
//! restart. So the lease handles (no payloads) of each task are kept here by task id, and
//! given back to the spool when the task did not end normally. They are due again at once,
//! with no attempt counted.

use std::collections::HashMap;
use std::future::Future;

use spool::{Lease, Spool};
use tokio::task::{Id, JoinError, JoinSet};

/// The send tasks of one queue.
pub struct Sends {
    queue: String,
    spool: Spool,
    tasks: JoinSet<()>,
    leased: HashMap<Id, Vec<Lease>>,
}

impl Sends {
    pub fn new(queue: &str, spool: Spool) -> Sends {
        Sends {
            queue: queue.to_owned(),
            spool,
            tasks: JoinSet::new(),
            leased: HashMap::new(),
        }
    }

    /// Runs `send` (given the spool) as a task holding `held` until it ends.
    pub fn spawn<F>(&mut self, send: impl FnOnce(Spool) -> F, held: Vec<Lease>)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = self.tasks.spawn(send(self.spool.clone()));
        if !held.is_empty() {
            self.leased.insert(handle.id(), held);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Waits for a task to end (pending for ever with none), then settles its leases.
    /// Cancel-safe: a task that ended stays in the set until a call that completes.
    pub async fn next_ended(&mut self) {
        match self.tasks.join_next_with_id().await {
            Some(done) => self.ended(done),
            None => std::future::pending().await,
        }
    }

    /// Settles every task that has already ended, without waiting.
    pub fn reap_ended(&mut self) {
        while let Some(done) = self.tasks.try_join_next_with_id() {
            self.ended(done);
        }
    }

    /// Aborts every task, then gives back the leases of those that did not end by themselves.
    pub async fn abort_all(&mut self) {
        self.tasks.abort_all();
        while let Some(done) = self.tasks.join_next_with_id().await {
            self.ended(done);
        }
    }

    /// A task ended. If it did not end normally, its leases may still be held.
    fn ended(&mut self, done: Result<(Id, ()), JoinError>) {
        match done {
            Ok((id, ())) => {
                self.leased.remove(&id);
            }
            Err(e) => {
                if e.is_panic() {
                    tracing::error!(queue = %self.queue, error = %e, "a send task panicked; releasing its messages");
                }
                for lease in self.leased.remove(&e.id()).unwrap_or_default() {
                    self.spool.release(&lease);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spool::{Meta, NewMessage, SpoolOptions};

    async fn spool_with_one(dir: &std::path::Path) -> Spool {
        let (spool, _) = Spool::open(dir, SpoolOptions::default()).unwrap();
        let msg = NewMessage {
            queue: "q".into(),
            meta: Meta::new(),
            payload: b"hello".to_vec(),
        };
        spool.enqueue(vec![msg]).await.unwrap();
        spool
    }

    fn lease_one(spool: &Spool) -> Vec<Lease> {
        let leased = spool.lease("q", 10, spool::now_ms()).unwrap();
        leased.into_iter().map(|l| l.lease).collect()
    }

    #[tokio::test]
    async fn a_panicking_send_gives_its_leases_back() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_with_one(dir.path()).await;
        let held = lease_one(&spool);
        assert_eq!(held.len(), 1);
        assert!(lease_one(&spool).is_empty(), "leased: nothing else is due");
        let mut sends = Sends::new("q", spool.clone());
        sends.spawn(|_| async { panic!("planted") }, held);
        sends.next_ended().await;
        assert!(sends.is_empty());
        let again = lease_one(&spool);
        assert_eq!(again.len(), 1, "the message is due again");
        assert_eq!(again[0].attempts(), 0, "no attempt was counted");
    }

    #[tokio::test]
    async fn an_aborted_send_gives_its_leases_back_and_a_finished_one_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool_with_one(dir.path()).await;
        let mut sends = Sends::new("q", spool.clone());
        // Ends normally without settling: its lease is its own business (as a real send
        // settles through the lease itself), so it is not released.
        sends.spawn(|_| async {}, lease_one(&spool));
        sends.next_ended().await;
        assert!(lease_one(&spool).is_empty(), "still leased");
        // A second message, held by a send that never ends until aborted.
        spool
            .enqueue(vec![NewMessage {
                queue: "q".into(),
                meta: Meta::new(),
                payload: b"two".to_vec(),
            }])
            .await
            .unwrap();
        sends.spawn(|_| std::future::pending(), lease_one(&spool));
        sends.reap_ended();
        assert_eq!(sends.len(), 1);
        sends.abort_all().await;
        assert_eq!(
            lease_one(&spool).len(),
            1,
            "the aborted send's message is due again"
        );
    }
}
