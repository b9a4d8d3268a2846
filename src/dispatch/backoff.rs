//! Timing rules: when to retry a connect, how fast to send (a message's retry is
//! [`decide`](super::decide)'s).
//!
//! All pure functions or tiny state machines over explicit times, so they are tested
//! without sleeping.

use std::time::Duration;

/// Exponential backoff for a queue whose connections cannot be made (constructor raised,
/// no protocol, broker down): 1 s, 2 s, 4 s, ... capped at 30 s. Reset on success.
#[derive(Debug, Default)]
pub struct ConnectBackoff {
    failures: u32,
}

impl ConnectBackoff {
    /// Wait after the first failed connect.
    pub const FIRST: Duration = Duration::from_secs(1);
    /// Longest wait between connects.
    pub const MAX: Duration = Duration::from_secs(30);

    /// Records a failure and returns how long to wait before the next try.
    pub fn failed(&mut self) -> Duration {
        let delay = Self::FIRST
            .saturating_mul(1u32 << self.failures.min(16))
            .min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Records a successful connect: the next failure starts again at [`Self::FIRST`].
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }
}

/// A token bucket for `max_message_rate`: `rate` tokens per `per`, burst of one `per`'s
/// worth. Times are `Instant`-free milliseconds so tests drive them.
#[derive(Debug)]
pub struct TokenBucket {
    capacity: f64,
    per_ms: f64,
    tokens: f64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket of `count` tokens, refilled at `count` per `per`.
    pub fn new(count: u64, per: Duration, now_ms: u64) -> TokenBucket {
        let capacity = count.max(1) as f64;
        TokenBucket {
            capacity,
            per_ms: capacity / (per.as_millis().max(1) as f64),
            tokens: capacity,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64;
        self.tokens = (self.tokens + elapsed * self.per_ms).min(self.capacity);
        self.last_ms = now_ms.max(self.last_ms);
    }

    /// Takes up to `want` whole tokens; returns how many were granted.
    pub fn take(&mut self, want: usize, now_ms: u64) -> usize {
        self.refill(now_ms);
        let granted = (self.tokens.floor() as usize).min(want);
        self.tokens -= granted as f64;
        granted
    }

    /// Returns `n` tokens taken but not used (another limit granted fewer).
    pub fn give_back(&mut self, n: usize) {
        self.tokens = (self.tokens + n as f64).min(self.capacity);
    }

    /// How long until at least one token is available.
    pub fn wait_for_one(&mut self, now_ms: u64) -> Duration {
        self.refill(now_ms);
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_millis(((1.0 - self.tokens) / self.per_ms).ceil() as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_backoff_grows_to_thirty_seconds_and_resets() {
        let mut b = ConnectBackoff::default();
        let seq: Vec<u64> = (0..7).map(|_| b.failed().as_secs()).collect();
        assert_eq!(seq, [1, 2, 4, 8, 16, 30, 30]);
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_secs(1));
    }

    #[test]
    fn token_bucket_limits_rate() {
        let mut tb = TokenBucket::new(10, Duration::from_secs(1), 0);
        assert_eq!(tb.take(100, 0), 10);
        assert_eq!(tb.take(1, 0), 0);
        assert_eq!(tb.wait_for_one(0), Duration::from_millis(100));
        assert_eq!(tb.take(100, 500), 5);
        assert_eq!(tb.take(100, 10_000), 10);
    }
}
