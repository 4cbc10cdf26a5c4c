//! A task call not yet sent: typed arguments plus call-site options.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Backoff, Task};
use crate::envelope::TaskId;

/// Options chosen at the call site; each set field overrides the task's default.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct EnqueueOptions {
    /// Queue override.
    pub queue: Option<String>,
    /// Priority override (0–9).
    pub priority: Option<u8>,
    /// Run no earlier than this instant.
    pub eta: Option<DateTime<Utc>>,
    /// Run no earlier than this long from now.
    pub countdown: Option<Duration>,
    /// Expire this long after enqueue.
    pub expires_in: Option<Duration>,
    /// Expire at this instant.
    pub expires_at: Option<DateTime<Utc>>,
    /// Headers to send.
    pub headers: BTreeMap<String, String>,
    /// Metadata for the status record.
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// Use this id instead of a fresh one.
    pub task_id: Option<TaskId>,
    /// Retry budget override.
    pub retries: Option<u32>,
    /// Backoff override.
    pub backoff: Option<Backoff>,
    /// Soft time limit override.
    pub soft_time_limit: Option<Duration>,
    /// Hard time limit override.
    pub hard_time_limit: Option<Duration>,
    /// Visibility timeout override.
    pub visibility_timeout: Option<Duration>,
    /// Lineage: the task that enqueues this one.
    pub parent_id: Option<TaskId>,
    /// Lineage: the root of the tree.
    pub root_id: Option<TaskId>,
    /// Deduplicate identical calls within this window.
    pub unique_for: Option<Duration>,
}

macro_rules! option_setters {
    ($($(#[$doc:meta])* $name:ident($arg:ident: $ty:ty) => $field:ident = $val:expr;)*) => {
        impl EnqueueOptions {
            $(
                $(#[$doc])*
                pub fn $name(mut self, $arg: $ty) -> Self {
                    self.$field = $val;
                    self
                }
            )*
        }
        impl<T: Task> Signature<T> {
            $(
                $(#[$doc])*
                pub fn $name(mut self, $arg: $ty) -> Self {
                    self.options = self.options.$name($arg);
                    self
                }
            )*
        }
    };
}

option_setters! {
    /// Publish to `queue`.
    queue(queue: impl Into<String>) => queue = Some(queue.into());
    /// Priority 0–9 (clamped), higher first.
    priority(priority: u8) => priority = Some(priority.min(crate::envelope::MAX_PRIORITY));
    /// Run no earlier than `eta`.
    eta(eta: DateTime<Utc>) => eta = Some(eta);
    /// Run no earlier than `delay` from now.
    countdown(delay: Duration) => countdown = Some(delay);
    /// Cancel instead of running if not started within `after`.
    expires_in(after: Duration) => expires_in = Some(after);
    /// Return the existing task for an identical call (same name and arguments) made within
    /// `window`, instead of enqueueing a duplicate (needs a unique store on the producer).
    unique_for(window: Duration) => unique_for = Some(window);
    /// Cancel instead of running if not started by `at`.
    expires_at(at: DateTime<Utc>) => expires_at = Some(at);
    /// Use `id` as the task id.
    task_id(id: TaskId) => task_id = Some(id);
    /// Allow `retries` retries.
    retries(retries: u32) => retries = Some(retries);
    /// Retry with this backoff.
    backoff(backoff: Backoff) => backoff = Some(backoff);
    /// Soft time limit.
    soft_time_limit(limit: Duration) => soft_time_limit = Some(limit);
    /// Hard time limit.
    hard_time_limit(limit: Duration) => hard_time_limit = Some(limit);
    /// Lease length for each delivery.
    visibility_timeout(timeout: Duration) => visibility_timeout = Some(timeout);
}

impl EnqueueOptions {
    /// Add one header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Add one metadata entry.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.meta.insert(key.into(), value.into());
        self
    }
}

/// A typed call of task `T`: arguments and options, ready to enqueue.
///
/// `#[task]` generates `my_task::new(args..)` returning one of these.
pub struct Signature<T: Task> {
    /// The typed arguments.
    pub args: T::Args,
    /// Call-site options.
    pub options: EnqueueOptions,
    _task: PhantomData<fn() -> T>,
}

impl<T: Task> Signature<T> {
    /// A call of `T` with `args` and no overrides.
    pub fn new(args: T::Args) -> Self {
        Signature { args, options: EnqueueOptions::default(), _task: PhantomData }
    }

    /// Replace all call-site options.
    pub fn with_options(mut self, options: EnqueueOptions) -> Self {
        self.options = options;
        self
    }

    /// Add one header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options = self.options.header(key, value);
        self
    }

    /// Add one metadata entry.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.options = self.options.meta(key, value);
        self
    }

    /// The task name.
    pub fn name(&self) -> &'static str {
        T::NAME
    }
}

impl<T: Task> Clone for Signature<T>
where
    T::Args: Clone,
{
    fn clone(&self) -> Self {
        Signature { args: self.args.clone(), options: self.options.clone(), _task: PhantomData }
    }
}

impl<T: Task> std::fmt::Debug for Signature<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signature").field("task", &T::NAME).field("options", &self.options).finish()
    }
}
