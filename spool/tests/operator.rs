//! Operator rewrites (expedite, rebind) run chunk by chunk. One interrupted half-way (its
//! caller went away, as an HTTP handler does when the client hangs up) must leave every
//! message leasable without a restart, and none scheduled twice.

mod common;

use std::collections::HashSet;
use std::future::Future;
use std::pin::pin;
use std::task::Poll;

use common::{lease_all, msg, open};
use spool::{NewMessage, Spool};

const N: usize = 3_500; // four chunks of the rewrite

async fn fill(spool: &Spool, queue: &str) {
    let batch: Vec<NewMessage> = (0..N)
        .map(|i| msg(queue, format!("m{i}").as_bytes()))
        .collect();
    spool.enqueue(batch).await.unwrap();
}

/// Polls `op` until the spool committed at least one chunk of it, then drops it.
async fn interrupt_after_first_chunk<F: Future>(spool: &Spool, op: F) {
    let mut changes = spool.watch_changes();
    changes.borrow_and_update();
    let mut op = pin!(op);
    let finished = std::future::poll_fn(|cx| {
        if changes.has_changed().unwrap_or(false) {
            return Poll::Ready(false);
        }
        match op.as_mut().poll(cx) {
            Poll::Ready(_) => Poll::Ready(true),
            Poll::Pending => {
                // Wake again soon to look at the change counter.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    })
    .await;
    assert!(
        !finished,
        "the rewrite finished before it could be interrupted"
    );
}

fn assert_all_leasable_once(spool: &Spool, queue: &str) {
    let leased = lease_all(spool, queue);
    let ids: HashSet<_> = leased.iter().map(|l| l.lease.id()).collect();
    assert_eq!(ids.len(), leased.len(), "a message was scheduled twice");
    assert_eq!(
        leased.len(),
        N,
        "{} messages stuck (leased by the interrupted rewrite) until a restart",
        N - leased.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_expedite_leaves_every_message_leasable_once() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    fill(&spool, "q").await;
    interrupt_after_first_chunk(&spool, spool.expedite("q")).await;
    // The chunk in flight when the caller left is still committed and applied.
    spool.sync().await.unwrap();
    assert_all_leasable_once(&spool, "q");
    assert_eq!(spool.expedite("q").await.unwrap(), 0, "all leased now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_rebind_leaves_every_message_leasable_once() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    fill(&spool, "from").await;
    interrupt_after_first_chunk(&spool, spool.rebind("from", "to")).await;
    spool.sync().await.unwrap();
    let mut leased = lease_all(&spool, "from");
    let moved = lease_all(&spool, "to");
    assert!(!moved.is_empty(), "the first chunk was moved");
    leased.extend(moved);
    let ids: HashSet<_> = leased.iter().map(|l| l.lease.id()).collect();
    assert_eq!(ids.len(), leased.len(), "a message was scheduled twice");
    assert_eq!(leased.len(), N, "messages stuck until a restart");
}

#[tokio::test]
async fn expedite_into_the_same_queue_rewrites_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let spool = open(dir.path());
    fill(&spool, "q").await;
    assert_eq!(spool.expedite("q").await.unwrap(), N as u64);
    assert_all_leasable_once(&spool, "q");
}
