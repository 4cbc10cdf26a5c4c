//! Per-worker token buckets for tasks with a `rate_limit`.
//!
//! A denied task is not failed: the worker hands it back to the broker delayed until a token
//! is due, so it neither blocks a slot nor loses its place for long. Limits hold per worker
//! process; a store shared by all workers makes them global (adapters issue).

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::task::RateLimit;

#[derive(Default)]
pub(crate) struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// Take a token for `name`, or say how long until one is due.
    pub(crate) fn try_acquire(&self, name: &str, limit: RateLimit) -> Result<(), Duration> {
        let now = Instant::now();
        let capacity = f64::from(limit.count);
        let per_token = limit.per.as_secs_f64() / capacity;
        let mut buckets = self.buckets.lock();
        let bucket = match buckets.get_mut(name) {
            Some(b) => b,
            None => buckets.entry(name.to_owned()).or_insert(Bucket { tokens: capacity, last: now }),
        };
        let elapsed = now.duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed / per_token).min(capacity);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) * per_token))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn allows_burst_then_spaces_out() {
        let rl = RateLimiter::default();
        let limit = RateLimit::new(2, Duration::from_secs(1));
        assert!(rl.try_acquire("t", limit).is_ok());
        assert!(rl.try_acquire("t", limit).is_ok());
        let wait = rl.try_acquire("t", limit).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500), "{wait:?}");
        assert!(rl.try_acquire("other", limit).is_ok(), "buckets are per task name");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(rl.try_acquire("t", limit).is_ok());
    }
}
