//! The error a task returns: what went wrong and whether to retry.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// Error kind recorded when a task panics.
pub const KIND_PANIC: &str = "panic";
/// Error kind recorded when a hard time limit drops the task.
pub const KIND_HARD_TIME_LIMIT: &str = "hard-time-limit";
/// Error kind recorded when a task's output cannot be encoded.
pub const KIND_RESULT_ENCODE: &str = "result-encode";
/// Error kind of an explicit `ctx.retry(..)`.
pub const KIND_RETRY: &str = "retry";

/// Error returned by a task.
///
/// Any `std::error::Error` converts into a retryable `TaskError` with kind `"error"`, so `?`
/// works in task bodies. Use [`TaskError::fatal`] for errors that must not be retried and
/// [`TaskError::new`] to set a kind that `retry_for` filters can match.
#[derive(Clone, PartialEq, Eq)]
pub struct TaskError {
    kind: Cow<'static, str>,
    message: String,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl TaskError {
    /// A retryable error of `kind`.
    pub fn new(kind: impl Into<Cow<'static, str>>, message: impl fmt::Display) -> Self {
        TaskError { kind: kind.into(), message: message.to_string(), retryable: true, retry_after: None }
    }

    /// A retryable error of kind `"error"`.
    pub fn retryable(message: impl fmt::Display) -> Self {
        Self::new("error", message)
    }

    /// An error that fails the task at once, whatever retries remain.
    pub fn fatal(message: impl fmt::Display) -> Self {
        Self::new("fatal", message).with_retryable(false)
    }

    /// Ask for a retry after `delay` (counts against the retry budget).
    pub fn retry_after(delay: Duration) -> Self {
        let mut e = Self::new(KIND_RETRY, format_args!("retry requested in {delay:?}"));
        e.retry_after = Some(delay);
        e
    }

    /// Change whether the error may be retried.
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Set an explicit delay before the retry, instead of the backoff policy.
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// The kind used by `retry_for` filters (e.g. `"timeout"`, `"http"`).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether a retry is allowed.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// Explicit retry delay, if any.
    pub fn retry_delay(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("retryable", &self.retryable)
            .finish()
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl<E> From<E> for TaskError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(e: E) -> Self {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        TaskError::new("error", message)
    }
}
