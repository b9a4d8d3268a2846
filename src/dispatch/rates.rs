//! A queue's rate limits: its own `max_message_rate` and `overall_max_message_rate`, one
//! rate shared by several queues. A fill takes tokens from both and gives back what it
//! could not use (fewer messages were due than it asked for), so at a low rate (`'10/h'`)
//! every token is a message sent.
//!
//! In KumoMTA `max_message_rate` limits each queue on its own, even when it is configured
//! for a whole tenant, and `overall_max_message_rate` is the *collective* limit: a tenant
//! set to `'100/s'` sends 100 messages a second over all its queues (every campaign and
//! domain). Here the scope is the tenant of the queue name (`campaign:tenant@domain`);
//! a queue name without a tenant is a scope of its own, where the rate is a limit for that
//! queue across all its connections (like `max_message_rate`). Queues share a bucket when
//! they have the same scope *and* declare the same rate, so a policy that gives two queues of
//! one tenant different overall rates gets two limits rather than one that flips between
//! them. The limit is per process, like `max_message_rate`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use policy::{QueueConfig, QueueName, Rate};

use super::backoff::TokenBucket;

/// A token bucket several queue workers draw from.
pub type SharedBucket = Arc<Mutex<TokenBucket>>;

/// Which queues share a bucket: their scope and the rate they declare.
type Key = (String, Rate);

/// The buckets of every scope in use. A bucket lives as long as a worker holds it; the
/// map keeps only weak references, pruned as it grows.
#[derive(Clone, Default)]
pub struct SharedRates {
    buckets: Arc<Mutex<HashMap<Key, Weak<Mutex<TokenBucket>>>>>,
}

impl SharedRates {
    /// The bucket for `queue`'s scope at `rate`, made full if no queue holds it yet.
    pub fn bucket(&self, queue: &str, rate: Rate, now_ms: u64) -> SharedBucket {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let key = (scope(queue), rate);
        if let Some(bucket) = buckets.get(&key).and_then(Weak::upgrade) {
            return bucket;
        }
        if buckets.len() >= 64 && buckets.len().is_power_of_two() {
            buckets.retain(|_, b| b.strong_count() > 0);
        }
        let bucket = Arc::new(Mutex::new(TokenBucket::new(rate.limit, rate.per, now_ms)));
        buckets.insert(key, Arc::downgrade(&bucket));
        bucket
    }
}

/// One queue's limits, as its worker holds them.
pub struct QueueRates {
    queue: String,
    /// `max_message_rate`: this queue's own bucket.
    own: Option<TokenBucket>,
    /// `overall_max_message_rate`: the bucket this queue shares with its tenant's queues.
    overall: Option<SharedBucket>,
    shared: SharedRates,
}

impl QueueRates {
    pub fn new(queue: &str, shared: SharedRates) -> QueueRates {
        QueueRates {
            queue: queue.to_owned(),
            own: None,
            overall: None,
            shared,
        }
    }

    /// Follows a config just read (`old`: the one it replaces): a limit whose rate changed
    /// starts afresh, an unchanged one keeps its tokens.
    pub fn update(&mut self, old: Option<&QueueConfig>, cfg: &QueueConfig, now_ms: u64) {
        if old.map(|o| o.max_message_rate) != Some(cfg.max_message_rate) {
            self.own = cfg
                .max_message_rate
                .map(|rate| TokenBucket::new(rate.limit, rate.per, now_ms));
        }
        if old.map(|o| o.overall_max_message_rate) != Some(cfg.overall_max_message_rate) {
            self.overall = cfg
                .overall_max_message_rate
                .map(|rate| self.shared.bucket(&self.queue, rate, now_ms));
        }
    }

    /// Takes up to `want` tokens from every limit: how many all of them granted, or how
    /// long until one has a token again.
    pub fn take(&mut self, want: usize, now_ms: u64) -> Result<usize, Duration> {
        let mut want = want;
        if let Some(own) = &mut self.own {
            want = own.take(want, now_ms);
            if want == 0 {
                return Err(own.wait_for_one(now_ms));
            }
        }
        if let Some(shared) = &self.overall {
            let mut overall = lock(shared);
            let granted = overall.take(want, now_ms);
            if let Some(own) = &mut self.own {
                own.give_back(want - granted);
            }
            want = granted;
            if want == 0 {
                return Err(overall.wait_for_one(now_ms));
            }
        }
        Ok(want)
    }

    /// Returns `n` tokens taken but not used to every limit.
    pub fn give_back(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        if let Some(own) = &mut self.own {
            own.give_back(n);
        }
        if let Some(shared) = &self.overall {
            lock(shared).give_back(n);
        }
    }
}

fn lock(bucket: &SharedBucket) -> std::sync::MutexGuard<'_, TokenBucket> {
    bucket.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which queues share an overall rate: those of the same tenant (`tenant:NAME`); a queue
/// without a tenant alone (`queue:NAME`).
pub fn scope(queue: &str) -> String {
    match QueueName::parse(queue).tenant {
        Some(tenant) => format!("tenant:{tenant}"),
        None => format!("queue:{queue}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const RATE: Rate = Rate {
        limit: 10,
        per: Duration::from_secs(3600),
    };

    #[test]
    fn scopes_follow_the_tenant() {
        assert_eq!(scope("c1:acme@example.com"), "tenant:acme");
        assert_eq!(scope("acme@example.org"), "tenant:acme");
        assert_eq!(scope("kafka"), "queue:kafka");
        assert_eq!(scope("c1:@example.com"), "queue:c1:@example.com");
    }

    #[test]
    fn queues_of_one_tenant_draw_from_one_bucket() {
        let rates = SharedRates::default();
        let a = rates.bucket("c1:acme@a.com", RATE, 0);
        let b = rates.bucket("c2:acme@b.com", RATE, 0);
        let other = rates.bucket("c1:zeta@a.com", RATE, 0);
        let faster = rates.bucket("c3:acme@c.com", Rate { limit: 20, ..RATE }, 0);
        assert_eq!(a.lock().unwrap().take(7, 0), 7);
        assert_eq!(
            b.lock().unwrap().take(7, 0),
            3,
            "the tenant's 10 are shared"
        );
        assert_eq!(other.lock().unwrap().take(7, 0), 7, "another tenant");
        assert_eq!(faster.lock().unwrap().take(30, 0), 20, "another rate");
        drop((a, b));
        let again = rates.bucket("c1:acme@a.com", RATE, 0);
        assert_eq!(
            again.lock().unwrap().take(10, 0),
            10,
            "a new bucket once unused"
        );
    }
}
