//! Per-task defaults set with `#[task(...)]`, built with `const fn`s.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Defaults a task declares; call-site options override them field by field.
///
/// Every setter is a `const fn`, so `#[task]` can store the options in a constant.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct TaskOptions {
    /// Queue to publish to (`None`: the producer's default queue).
    pub queue: Option<&'static str>,
    /// Retries allowed after the first attempt.
    pub retries: u32,
    /// Priority 0–9, higher runs first.
    pub priority: u8,
    /// Soft time limit: cancellation the task can observe.
    pub soft_time_limit: Option<Duration>,
    /// Hard time limit: the task future is dropped and the attempt fails.
    pub hard_time_limit: Option<Duration>,
    /// Lease length for one delivery (renewed while the task runs).
    pub visibility_timeout: Option<Duration>,
    /// At most this many starts per period.
    pub rate_limit: Option<RateLimit>,
    /// Delay between retries.
    pub backoff: Backoff,
    /// Error kinds that are retried; empty means every retryable error.
    pub retry_for: &'static [&'static str],
    /// A task not started within this long after enqueue is cancelled, not run.
    pub expires: Option<Duration>,
    /// Do not store the result (state is still recorded).
    pub ignore_result: bool,
    /// An identical call (same name and arguments) within this window returns the existing
    /// task instead of enqueueing another (needs a unique store on the producer).
    pub unique_for: Option<Duration>,
}

impl TaskOptions {
    /// No retries, priority 0, no limits, default backoff.
    pub const fn new() -> Self {
        TaskOptions {
            queue: None,
            retries: 0,
            priority: 0,
            soft_time_limit: None,
            hard_time_limit: None,
            visibility_timeout: None,
            rate_limit: None,
            backoff: Backoff::DEFAULT,
            retry_for: &[],
            expires: None,
            ignore_result: false,
            unique_for: None,
        }
    }
    /// Set the queue.
    pub const fn queue(mut self, queue: &'static str) -> Self {
        self.queue = Some(queue);
        self
    }
    /// Set the number of retries.
    pub const fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }
    /// Set the priority (clamped to 9).
    pub const fn priority(mut self, priority: u8) -> Self {
        self.priority = if priority > 9 { 9 } else { priority };
        self
    }
    /// Set the soft time limit.
    pub const fn soft_time_limit(mut self, limit: Duration) -> Self {
        self.soft_time_limit = Some(limit);
        self
    }
    /// Set the hard time limit.
    pub const fn hard_time_limit(mut self, limit: Duration) -> Self {
        self.hard_time_limit = Some(limit);
        self
    }
    /// Set the visibility timeout (lease length).
    pub const fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = Some(timeout);
        self
    }
    /// Set the rate limit.
    pub const fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }
    /// Set the whole backoff policy.
    pub const fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }
    /// Set the first retry delay.
    pub const fn backoff_base(mut self, base: Duration) -> Self {
        self.backoff.base = base;
        self
    }
    /// Cap the retry delay.
    pub const fn backoff_max(mut self, max: Duration) -> Self {
        self.backoff.max = max;
        self
    }
    /// Turn jitter on or off.
    pub const fn backoff_jitter(mut self, jitter: bool) -> Self {
        self.backoff.jitter = jitter;
        self
    }
    /// Only retry errors of these kinds.
    pub const fn retry_for(mut self, kinds: &'static [&'static str]) -> Self {
        self.retry_for = kinds;
        self
    }
    /// Expire tasks not started within `after` of enqueue.
    pub const fn expires(mut self, after: Duration) -> Self {
        self.expires = Some(after);
        self
    }
    /// Do not store results.
    pub const fn ignore_result(mut self, ignore: bool) -> Self {
        self.ignore_result = ignore;
        self
    }
    /// Deduplicate identical calls within `window`.
    pub const fn unique_for(mut self, window: Duration) -> Self {
        self.unique_for = Some(window);
        self
    }
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Capped exponential backoff with optional jitter.
///
/// The delay before retry `n` (1-based) is `min(max, base * 2^(n-1))`; with jitter it is drawn
/// uniformly from `[delay/2, delay]` ("equal jitter"), so retries spread out but never come
/// sooner than half the nominal delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    /// Delay before the first retry.
    #[serde(with = "crate::envelope::millis")]
    pub base: Duration,
    /// Upper bound of any delay.
    #[serde(with = "crate::envelope::millis")]
    pub max: Duration,
    /// Randomize within `[delay/2, delay]`.
    pub jitter: bool,
}

impl Backoff {
    /// 1 s base, 10 min cap, jitter on.
    pub const DEFAULT: Backoff =
        Backoff { base: Duration::from_secs(1), max: Duration::from_secs(600), jitter: true };

    /// Nominal delay (no jitter) before retry number `retry` (1 for the first retry).
    pub fn nominal(&self, retry: u32) -> Duration {
        let exp = retry.saturating_sub(1).min(32);
        let factor = 1u64 << exp;
        let ms = u64::try_from(self.base.as_millis()).unwrap_or(u64::MAX).saturating_mul(factor);
        Duration::from_millis(ms).min(self.max)
    }

    /// Delay before retry number `retry`, with jitter when enabled.
    pub fn delay(&self, retry: u32) -> Duration {
        let nominal = self.nominal(retry);
        if !self.jitter || nominal.is_zero() {
            return nominal;
        }
        let ms = u64::try_from(nominal.as_millis()).unwrap_or(u64::MAX);
        let half = ms / 2;
        Duration::from_millis(half + fastrand::u64(0..=ms - half))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// At most `count` task starts per `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Starts allowed per period.
    pub count: u32,
    /// Period length.
    #[serde(with = "crate::envelope::millis")]
    pub per: Duration,
}

impl RateLimit {
    /// `count` starts per `per`.
    pub const fn new(count: u32, per: Duration) -> Self {
        RateLimit { count, per }
    }

    /// Parse `"N/s"`, `"N/m"` or `"N/h"`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (n, unit) = s
            .split_once('/')
            .ok_or_else(|| format!("rate limit `{s}` must look like \"10/s\", \"100/m\" or \"1000/h\""))?;
        let count: u32 =
            n.trim().parse().map_err(|_| format!("rate limit `{s}`: `{n}` is not a whole number"))?;
        if count == 0 {
            return Err(format!("rate limit `{s}`: the count must be at least 1"));
        }
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => {
                return Err(format!("rate limit `{s}`: unit `{other}` must be `s`, `m` or `h`"));
            }
        };
        Ok(RateLimit { count, per })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff { base: Duration::from_millis(100), max: Duration::from_secs(1), jitter: false };
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(2), Duration::from_millis(200));
        assert_eq!(b.delay(3), Duration::from_millis(400));
        assert_eq!(b.delay(5), Duration::from_secs(1));
        assert_eq!(b.delay(60), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_half_and_full_delay() {
        let b = Backoff { base: Duration::from_millis(1000), max: Duration::from_secs(60), jitter: true };
        for retry in 1..6 {
            let nominal = b.nominal(retry);
            for _ in 0..200 {
                let d = b.delay(retry);
                assert!(d >= nominal / 2 && d <= nominal, "{d:?} outside [{:?}, {nominal:?}]", nominal / 2);
            }
        }
    }

    #[test]
    fn parses_rate_limits() {
        assert_eq!(RateLimit::parse("10/s").unwrap(), RateLimit::new(10, Duration::from_secs(1)));
        assert_eq!(RateLimit::parse("5/m").unwrap(), RateLimit::new(5, Duration::from_secs(60)));
        assert_eq!(RateLimit::parse("2/h").unwrap(), RateLimit::new(2, Duration::from_secs(3600)));
        assert!(RateLimit::parse("10").is_err());
        assert!(RateLimit::parse("x/s").is_err());
        assert!(RateLimit::parse("10/d").is_err());
        assert!(RateLimit::parse("0/s").is_err());
    }
}
