//! `overall_max_message_rate`: one rate shared by several queues.
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

use policy::{QueueName, Rate};

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
