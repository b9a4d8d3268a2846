//! Model-based test: random sequences of spool operations, checked after every step
//! against a plain in-memory model of what the spool promises.

mod common;

use std::collections::BTreeMap;

use common::{msg, open};
use proptest::prelude::*;
use spool::{Lease, Spool};

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
    Retry {
        pick: usize,
        delay: u64,
    },
    DeadLetter(usize),
    Release(usize),
    Tick(u64),
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    let payload = prop::collection::vec(any::<u8>(), 0..40);
    prop_oneof![
        3 => (0..3usize, prop::collection::vec(payload, 1..5))
            .prop_map(|(queue, payloads)| Step::Enqueue { queue, payloads }),
        3 => (0..3usize, 1..6usize).prop_map(|(queue, max)| Step::Lease { queue, max }),
        2 => any::<usize>().prop_map(Step::Ack),
        2 => (any::<usize>(), 0..50u64).prop_map(|(pick, delay)| Step::Retry { pick, delay }),
        1 => any::<usize>().prop_map(Step::DeadLetter),
        1 => any::<usize>().prop_map(Step::Release),
        1 => (1..40u64).prop_map(Step::Tick),
        1 => Just(Step::Reopen),
    ]
}

#[derive(Debug, Clone, PartialEq)]
struct Expected {
    queue: String,
    payload: Vec<u8>,
    attempts: u32,
    due: u64,
}

/// What the spool should hold. Time is a logical clock far above the real one, so every
/// message is due at enqueue and due times are under the test's control.
#[derive(Default)]
struct Model {
    queued: BTreeMap<u64, Expected>,
    dead: BTreeMap<u64, Expected>,
    now: u64,
}

impl Model {
    fn due_in(&self, queue: &str, max: usize) -> Vec<u64> {
        let mut due: Vec<(u64, u64)> = self
            .queued
            .iter()
            .filter(|(_, e)| e.queue == queue && e.due <= self.now)
            .map(|(id, e)| (e.due, *id))
            .collect();
        due.sort();
        due.into_iter().take(max).map(|(_, id)| id).collect()
    }
}

struct Harness {
    dir: tempfile::TempDir,
    spool: Option<Spool>,
    leased: Vec<Lease>,
    model: Model,
    rt: tokio::runtime::Runtime,
}

impl Harness {
    fn spool(&self) -> &Spool {
        self.spool.as_ref().expect("open")
    }

    fn take_leased(&mut self, pick: usize) -> Option<Lease> {
        (!self.leased.is_empty()).then(|| self.leased.remove(pick % self.leased.len()))
    }

    fn apply(&mut self, step: Step) {
        match step {
            Step::Enqueue { queue, payloads } => {
                let batch = payloads.iter().map(|p| msg(QUEUES[queue], p)).collect();
                let ids = self.spool().enqueue_blocking(batch).unwrap();
                for (id, payload) in ids.into_iter().zip(payloads) {
                    let e = Expected {
                        queue: QUEUES[queue].into(),
                        payload,
                        attempts: 0,
                        due: 0,
                    };
                    self.model.queued.insert(id.0, e);
                }
            }
            Step::Lease { queue, max } => {
                let want = self.due_not_leased(QUEUES[queue], max);
                let leased = self
                    .spool()
                    .lease(QUEUES[queue], max, self.model.now)
                    .unwrap();
                let got: Vec<u64> = leased.iter().map(|l| l.lease.id().0).collect();
                assert_eq!(got, want, "lease order/content differs from the model");
                for l in &leased {
                    let (m, e) = (&l.message, &self.model.queued[&l.lease.id().0]);
                    assert_eq!(
                        (&m.payload, m.attempts, &m.queue),
                        (&e.payload, e.attempts, &e.queue)
                    );
                    assert_eq!(
                        (l.lease.queue(), l.lease.id(), l.lease.attempts()),
                        (m.queue.as_str(), m.id, m.attempts),
                        "the lease handle names the message it came with"
                    );
                }
                self.leased.extend(leased.into_iter().map(|l| l.lease));
            }
            Step::Ack(pick) => {
                if let Some(m) = self.take_leased(pick) {
                    self.spool().ack(&m).unwrap();
                    self.model.queued.remove(&m.id().0);
                }
            }
            Step::Retry { pick, delay } => {
                if let Some(m) = self.take_leased(pick) {
                    let due = self.model.now + delay;
                    self.rt
                        .block_on(self.spool().retry(&m, "451 try later", due))
                        .unwrap();
                    let e = self.model.queued.get_mut(&m.id().0).unwrap();
                    e.attempts += 1;
                    e.due = due;
                }
            }
            Step::DeadLetter(pick) => {
                if let Some(m) = self.take_leased(pick) {
                    self.rt
                        .block_on(self.spool().dead_letter(&m, "550 no"))
                        .unwrap();
                    let e = self.model.queued.remove(&m.id().0).unwrap();
                    self.model.dead.insert(m.id().0, e);
                }
            }
            Step::Release(pick) => {
                if let Some(m) = self.take_leased(pick) {
                    self.spool().release(&m);
                }
            }
            Step::Tick(ms) => self.model.now += ms,
            Step::Reopen => {
                self.spool = None; // drop closes it and releases the lock
                self.leased.clear(); // leases do not survive a restart
                self.spool = Some(open(self.dir.path()));
            }
        }
        self.check();
    }

    /// What a lease must return: due messages in (due, id) order, minus those leased.
    fn due_not_leased(&self, queue: &str, max: usize) -> Vec<u64> {
        let leased: Vec<u64> = self.leased.iter().map(|m| m.id().0).collect();
        let mut all = self.model.due_in(queue, usize::MAX);
        all.retain(|id| !leased.contains(id));
        all.truncate(max);
        all
    }

    fn check(&self) {
        let stats = self.spool().stats(0);
        for queue in QUEUES {
            let want = self
                .model
                .queued
                .values()
                .filter(|e| e.queue == queue)
                .count() as u64;
            let got = stats.queues.get(queue).map_or(0, |s| s.count);
            assert_eq!(got, want, "message count of queue {queue}");
        }
        let dead: BTreeMap<u64, Vec<u8>> = self
            .spool()
            .dead_letters()
            .unwrap()
            .into_iter()
            .map(|m| (m.id.0, m.payload))
            .collect();
        let want: BTreeMap<u64, Vec<u8>> = self
            .model
            .dead
            .iter()
            .map(|(id, e)| (*id, e.payload.clone()))
            .collect();
        assert_eq!(dead, want, "dead-letter area");
        assert_eq!(stats.quarantine, 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn spool_agrees_with_the_model(steps in prop::collection::vec(step(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path());
        let mut h = Harness {
            dir,
            spool: Some(spool),
            leased: Vec::new(),
            model: Model { now: 1 << 50, ..Model::default() },
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        };
        for s in steps {
            h.apply(s);
        }
    }
}
