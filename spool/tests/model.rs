//! Model-based test: random sequences of spool operations, checked after every step
//! against a plain in-memory model of what the spool promises.
//!
//! It is the safety net for the spool v2 rewrite (docs/spool-v2-design.md), so it reaches
//! the spool through its public API only and compares everything an operator or the
//! dispatcher can see: each queue's messages (`list`, `get`), the dead letters, the stats
//! (counts, bytes, leased, due now, next due, oldest, attempts), `next_due`, `due_count`,
//! `queue_names`, `queued_bytes`, and that ids only ever rise, across reopens too.
//!
//! Steps: enqueue, lease, ack, partial `ack_many` (a subset of one lease call's leases, at
//! times with a stale lease among them), retry, dead-letter, release, rebind, expedite,
//! purge, dead-letter requeue, clock ticks and reopen. A second property closes and reopens
//! the spool after every step, checks the whole model with every lease gone, then takes the
//! same messages in flight again: every intermediate state survives a restart.
//!
//! `PROPTEST_CASES` overrides the case counts for a longer run.

#[path = "model/check.rs"]
mod check;
mod common;
#[path = "model/harness.rs"]
mod harness;
#[path = "model/operator.rs"]
mod operator;
#[path = "model/state.rs"]
mod state;

use harness::Harness;
use proptest::prelude::*;

const QUEUES: [&str; 3] = ["a", "b@example.com", "camp:ten@c"];

#[derive(Debug, Clone)]
enum Step {
    Enqueue {
        queue: usize,
        payloads: Vec<Vec<u8>>,
    },
    Lease {
        queue: usize,
        max: usize,
    },
    Ack(usize),
    /// `ack_many` of the leases of one lease call picked by `mask`; `stale` adds a lease
    /// no longer held.
    AckMany {
        batch: usize,
        mask: u16,
        stale: bool,
    },
    Retry {
        pick: usize,
        delay: u64,
    },
    DeadLetter(usize),
    Release(usize),
    Rebind {
        from: usize,
        to: usize,
    },
    Expedite(usize),
    Purge(usize),
    /// Dead-letter requeue, narrowed to a queue and/or one dead letter.
    RequeueDead {
        queue: Option<usize>,
        id: Option<usize>,
    },
    Import(Import),
    Tick(u64),
    Reopen,
}

/// An import of new messages into one queue or the dead letters, ids `gap` above the
/// highest so far, due `delay` after now; `again` offers an id already present too.
#[derive(Debug, Clone)]
struct Import {
    queue: usize,
    payloads: Vec<Vec<u8>>,
    dead: bool,
    attempts: u32,
    delay: u64,
    gap: u64,
    again: Option<usize>,
}

fn step() -> impl Strategy<Value = Step> {
    let payload = prop::collection::vec(any::<u8>(), 0..40);
    let queue = 0..QUEUES.len();
    prop_oneof![
        4 => (queue.clone(), prop::collection::vec(payload, 1..5))
            .prop_map(|(queue, payloads)| Step::Enqueue { queue, payloads }),
        4 => (queue.clone(), 1..6usize).prop_map(|(queue, max)| Step::Lease { queue, max }),
        2 => any::<usize>().prop_map(Step::Ack),
        3 => (any::<usize>(), any::<u16>(), prop::bool::weighted(0.3))
            .prop_map(|(batch, mask, stale)| Step::AckMany { batch, mask, stale }),
        3 => (any::<usize>(), 0..50u64).prop_map(|(pick, delay)| Step::Retry { pick, delay }),
        3 => any::<usize>().prop_map(Step::DeadLetter),
        1 => any::<usize>().prop_map(Step::Release),
        1 => (queue.clone(), queue.clone()).prop_map(|(from, to)| Step::Rebind { from, to }),
        1 => queue.clone().prop_map(Step::Expedite),
        1 => queue.clone().prop_map(Step::Purge),
        2 => (prop::option::of(queue), prop::option::of(any::<usize>()))
            .prop_map(|(queue, id)| Step::RequeueDead { queue, id }),
        1 => import().prop_map(Step::Import),
        2 => (1..40u64).prop_map(Step::Tick),
        1 => Just(Step::Reopen),
    ]
}

fn import() -> impl Strategy<Value = Import> {
    let payloads = prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..4);
    let numbers = (0..4u32, 0..50u64, 0..1000u64);
    (
        0..QUEUES.len(),
        payloads,
        any::<bool>(),
        numbers,
        any::<Option<usize>>(),
    )
        .prop_map(
            |(queue, payloads, dead, (attempts, delay, gap), again)| Import {
                queue,
                payloads,
                dead,
                attempts,
                delay,
                gap,
                again,
            },
        )
}

/// `default` cases, or `PROPTEST_CASES` when set.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Applies `steps` to a fresh spool and its model; every step checks the two agree.
fn run(steps: Vec<Step>, reopen_each_step: bool, chunked: bool) {
    let mut h = Harness::new(reopen_each_step, chunked);
    for s in steps {
        h.apply(s);
    }
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn spool_agrees_with_the_model(steps in prop::collection::vec(step(), 1..80)) {
        run(steps, false, false);
    }

    /// The same with chunked ingest (spool v2): messages enqueued together live in chunks,
    /// and every settlement and operator step must treat them exactly as single records.
    #[test]
    fn chunked_spool_agrees_with_the_model(steps in prop::collection::vec(step(), 1..80)) {
        run(steps, false, true);
    }
}

proptest! {
    #![proptest_config(cases(64))]

    #[test]
    fn every_state_survives_a_reopen(steps in prop::collection::vec(step(), 1..40)) {
        run(steps, true, false);
    }

    /// The same with chunked ingest: heads and settle bitmaps rebuild the same state.
    #[test]
    fn every_chunked_state_survives_a_reopen(steps in prop::collection::vec(step(), 1..40)) {
        run(steps, true, true);
    }
}
