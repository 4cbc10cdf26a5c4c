//! What to do with a failed attempt: retry (and after how long) or fail for good. Pure.

use std::time::Duration;

use crate::broker::{REASON_FATAL, REASON_MAX_RETRIES};
use crate::envelope::Envelope;
use crate::task::{KIND_RETRY, TaskError, TaskOptions};

/// The decision for one failed attempt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Run again after `delay`.
    Retry { delay: Duration },
    /// Fail for good; dead-letter with this reason.
    Fail { reason: &'static str },
}

/// Decide with the envelope's budget and backoff (falling back to the task's) and the task's
/// `retry_for` filter. An explicit `ctx.retry(..)` passes any filter but not the budget.
pub(crate) fn decide(env: &Envelope, task: &TaskOptions, error: &TaskError) -> Decision {
    if !error.is_retryable() {
        return Decision::Fail { reason: REASON_FATAL };
    }
    let kind_allowed =
        task.retry_for.is_empty() || error.kind() == KIND_RETRY || task.retry_for.contains(&error.kind());
    if !kind_allowed {
        return Decision::Fail { reason: REASON_FATAL };
    }
    if env.attempt >= env.max_retries {
        return Decision::Fail { reason: REASON_MAX_RETRIES };
    }
    let backoff = env.backoff.unwrap_or(task.backoff);
    let delay = error.retry_delay().unwrap_or_else(|| backoff.delay(env.attempt + 1));
    Decision::Retry { delay }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Backoff;

    fn env(attempt: u32, max: u32) -> Envelope {
        let mut e = Envelope::new("t", serde_json::json!({}));
        e.attempt = attempt;
        e.max_retries = max;
        e
    }

    const NO_JITTER: Backoff =
        Backoff { base: Duration::from_millis(100), max: Duration::from_secs(1), jitter: false };

    #[test]
    fn retries_until_budget_then_fails() {
        let opts = TaskOptions::new().backoff(NO_JITTER);
        let err = TaskError::retryable("x");
        assert_eq!(decide(&env(0, 2), &opts, &err), Decision::Retry { delay: Duration::from_millis(100) });
        assert_eq!(decide(&env(1, 2), &opts, &err), Decision::Retry { delay: Duration::from_millis(200) });
        assert_eq!(decide(&env(2, 2), &opts, &err), Decision::Fail { reason: REASON_MAX_RETRIES });
    }

    #[test]
    fn fatal_and_filtered_kinds_do_not_retry() {
        let opts = TaskOptions::new().retry_for(&["timeout"]);
        assert_eq!(
            decide(&env(0, 5), &opts, &TaskError::fatal("x")),
            Decision::Fail { reason: REASON_FATAL }
        );
        assert_eq!(
            decide(&env(0, 5), &opts, &TaskError::new("http", "x")),
            Decision::Fail { reason: REASON_FATAL }
        );
        assert!(matches!(decide(&env(0, 5), &opts, &TaskError::new("timeout", "x")), Decision::Retry { .. }));
    }

    #[test]
    fn explicit_retry_uses_its_delay_and_passes_filters() {
        let opts = TaskOptions::new().retry_for(&["timeout"]);
        let err = TaskError::retry_after(Duration::from_secs(7));
        assert_eq!(decide(&env(0, 1), &opts, &err), Decision::Retry { delay: Duration::from_secs(7) });
        assert_eq!(decide(&env(1, 1), &opts, &err), Decision::Fail { reason: REASON_MAX_RETRIES });
    }

    #[test]
    fn call_site_backoff_wins() {
        let opts = TaskOptions::new().backoff(NO_JITTER);
        let mut e = env(0, 3);
        e.backoff =
            Some(Backoff { base: Duration::from_secs(5), max: Duration::from_secs(60), jitter: false });
        assert_eq!(
            decide(&e, &opts, &TaskError::retryable("x")),
            Decision::Retry { delay: Duration::from_secs(5) }
        );
    }
}
