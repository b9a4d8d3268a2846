//! The whole-model comparison run after every step, through the public API only (so the
//! same check holds any storage format to the same promises).

use spool::{Message, MessageId};

use super::harness::Harness;
use super::state::Expected;
use super::QUEUES;
use crate::common::{all_queued, msg};

impl Harness {
    pub fn check(&self) {
        let spool = self.spool();
        let leased = self.leased_ids();
        let now = self.model.now;
        let stats = spool.stats(now);
        let mut total_bytes = 0;
        for queue in QUEUES {
            let want = self.model.queue_stats(queue, &leased);
            let got = stats.queues.get(queue).cloned().unwrap_or_default();
            assert_eq!(got, want, "stats of queue {queue} at {now}");
            assert_eq!(
                spool.next_due(queue),
                want.next_due_ms,
                "next_due of {queue}"
            );
            let due_now = usize::try_from(want.due_now).unwrap();
            assert_eq!(spool.due_count(queue, now, usize::MAX), due_now, "{queue}");
            assert_eq!(spool.due_count(queue, now, 2), due_now.min(2), "{queue}");
            if let Some(next) = want.next_due_ms {
                assert_eq!(spool.due_count(queue, next - 1, 1), 0, "{queue}");
            }
            let listed = spool.list(queue, usize::MAX).unwrap();
            let expected: Vec<(u64, &Expected)> = self.model.in_queue(queue).collect();
            assert_eq!(observed(&listed), owned(expected), "ls {queue}");
            total_bytes += want.bytes;
        }
        let names: Vec<&str> = QUEUES
            .into_iter()
            .filter(|q| self.model.in_queue(q).next().is_some())
            .collect();
        assert_eq!(spool.queue_names(), names, "queue names");
        assert_eq!(stats.queues.len(), names.len(), "{:?}", stats.queues.keys());
        assert_eq!(spool.queued_bytes(), total_bytes, "queued bytes");
        for (&id, e) in &self.model.queued {
            let got = spool
                .get(MessageId(id))
                .unwrap()
                .map(|m| Expected::of(&m).1);
            assert_eq!(got.as_ref(), Some(e), "get {id}");
        }
        let all = all_queued(spool);
        let queued = self.model.queued.iter().map(|(id, e)| (*id, e));
        assert_eq!(
            observed(&all),
            owned(queued),
            "every message (export's walk)"
        );
        let dead = owned(self.model.dead.iter().map(|(id, e)| (*id, e)));
        assert_eq!(
            observed(&spool.dead_letters().unwrap()),
            dead,
            "dead letters"
        );
        let (good, bad) = spool.dead_letter_records().unwrap();
        assert_eq!(
            (observed(&good), bad),
            (dead, vec![]),
            "dead-letter records"
        );
        for &id in self.model.dead.keys() {
            assert_eq!(
                spool.get(MessageId(id)).unwrap(),
                None,
                "dead {id} is not queued"
            );
        }
        assert_eq!(stats.dead_letter, self.model.dead.len() as u64);
        assert_eq!(stats.quarantine, 0);
    }
}

/// Messages as the model sees them, each checked to carry the metadata it was given.
fn observed(messages: &[Message]) -> Vec<(u64, Expected)> {
    let meta = msg("q", b"").meta;
    messages
        .iter()
        .inspect(|m| assert_eq!(m.meta, meta, "metadata of {}", m.id))
        .map(Expected::of)
        .collect()
}

fn owned<'a>(entries: impl IntoIterator<Item = (u64, &'a Expected)>) -> Vec<(u64, Expected)> {
    entries.into_iter().map(|(id, e)| (id, e.clone())).collect()
}
