//! Batch gathering, as KumoMTA's `min_batch_size` / `max_batch_latency` mean it: a queue
//! waits up to `max_batch_latency` for `min_batch_size` due messages before it calls
//! `send_batch`, so a trickle of messages still reaches the broker in few, full batches
//! (KumoMTA's main lever for Kafka throughput).
//!
//! The wait happens *before* leasing: while a batch gathers, its messages stay waiting in
//! the spool, not leased in memory, so shutdown and drain never wait for a batch to fill,
//! and a crash loses nothing. The latency counts from the moment the oldest waiting message
//! became due (its due time), not from when a worker first looked: the rule needs no state,
//! survives a restart (a backlog found on start is long past its latency and goes at once)
//! and holds for retries too.

/// What a fill pass should do about the due messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gather {
    /// Lease this many now (whole batches, plus a last one of at least `min_batch_size`,
    /// or everything once the latency has passed).
    Lease(usize),
    /// Too few are due: look again at this time (ms since the epoch), or sooner if a message
    /// arrives.
    WaitUntil(u64),
}

/// How a queue batches: `protocol.custom_lua.{batch_size, min_batch_size, max_batch_latency}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRule {
    /// Most messages per `send_batch`.
    pub batch_size: usize,
    /// Fewest messages per `send_batch` while the latency lasts.
    pub min_batch_size: usize,
    /// How long the oldest due message may wait for company, in ms.
    pub max_latency_ms: u64,
}

impl BatchRule {
    /// How many of the `due` messages (counted up to what there is room for) to lease at
    /// `now_ms`, the oldest of them due since `oldest_due_ms`.
    pub fn gather(&self, due: usize, oldest_due_ms: u64, now_ms: u64) -> Gather {
        let deadline = oldest_due_ms.saturating_add(self.max_latency_ms);
        if self.min_batch_size <= 1 || now_ms >= deadline {
            return Gather::Lease(due);
        }
        let size = self.batch_size.max(1);
        let full = due / size * size;
        let rest = due - full;
        let take = if rest >= self.min_batch_size {
            due
        } else {
            full
        };
        if take > 0 {
            Gather::Lease(take)
        } else {
            Gather::WaitUntil(deadline)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: BatchRule = BatchRule {
        batch_size: 10,
        min_batch_size: 5,
        max_latency_ms: 100,
    };

    #[test]
    fn batches_wait_for_min_size_until_the_latency_passes() {
        use Gather::*;
        let cases = [
            // (rule, due, oldest due, now) => what to do
            (RULE, 1, 1000, 1000, WaitUntil(1100)),
            (RULE, 4, 1000, 1099, WaitUntil(1100)),
            (RULE, 4, 1000, 1100, Lease(4)), // the latency passed: a partial batch goes
            (RULE, 5, 1000, 1000, Lease(5)), // min_batch_size reached
            (RULE, 10, 1000, 1000, Lease(10)),
            (RULE, 13, 1000, 1000, Lease(10)), // the 3 left over keep gathering
            (RULE, 17, 1000, 1000, Lease(17)), // 10 + 7 (>= 5)
            (RULE, 13, 1000, 5000, Lease(13)),
            (RULE, 0, 1000, 1000, WaitUntil(1100)),
            (
                BatchRule {
                    min_batch_size: 1,
                    ..RULE
                },
                1,
                1000,
                1000,
                Lease(1),
            ),
            (
                BatchRule {
                    max_latency_ms: 0,
                    ..RULE
                },
                1,
                1000,
                1000,
                Lease(1),
            ),
            (RULE, 1, u64::MAX - 1, u64::MAX - 1, WaitUntil(u64::MAX)),
        ];
        for (rule, due, oldest, now, want) in cases {
            assert_eq!(
                rule.gather(due, oldest, now),
                want,
                "{rule:?} due={due} oldest={oldest} now={now}"
            );
        }
    }
}
