//! `TaskContext`: what a running task can see and do (its identity, progress, retry, child
//! tasks, cancellation).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

use super::{Signature, Task, TaskError};
use crate::backend::Progress;
use crate::broker::{Broker, Receipt};
use crate::envelope::{Envelope, TaskId};
use crate::error::Result;
use crate::producer::Stem;
use crate::result::TaskHandle;

/// Handed to a task as its leading parameter (`ctx: TaskContext`); cheap to clone.
#[derive(Clone)]
pub struct TaskContext {
    inner: Arc<Inner>,
}

struct Inner {
    envelope: Arc<Envelope>,
    worker_id: Arc<str>,
    producer: Option<Stem>,
    /// Cancellation lives inline (flag + notify) so a context costs one allocation.
    cancelled: AtomicBool,
    cancel_notify: Notify,
    /// Set by a revoke with `terminate`: the worker drops the task.
    terminated: AtomicBool,
    terminate_notify: Notify,
    lease: Option<Lease>,
    /// The last progress this context stored: the worker puts it on the final record.
    progress: parking_lot::Mutex<Option<Progress>>,
}

pub(crate) struct Lease {
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) receipt: Receipt,
    pub(crate) length: Duration,
}

impl TaskContext {
    pub(crate) fn new(envelope: Arc<Envelope>, worker_id: Arc<str>, producer: Stem, lease: Lease) -> Self {
        TaskContext {
            inner: Arc::new(Inner {
                envelope,
                worker_id,
                producer: Some(producer),
                cancelled: AtomicBool::new(false),
                cancel_notify: Notify::new(),
                terminated: AtomicBool::new(false),
                terminate_notify: Notify::new(),
                lease: Some(lease),
                progress: parking_lot::Mutex::new(None),
            }),
        }
    }

    /// A context outside any worker, for calling a task function directly (tests, scripts).
    /// Progress and child enqueues are no-ops / errors respectively.
    pub fn detached(envelope: Envelope) -> Self {
        TaskContext {
            inner: Arc::new(Inner {
                envelope: Arc::new(envelope),
                worker_id: Arc::from("detached"),
                producer: None,
                cancelled: AtomicBool::new(false),
                cancel_notify: Notify::new(),
                terminated: AtomicBool::new(false),
                terminate_notify: Notify::new(),
                lease: None,
                progress: parking_lot::Mutex::new(None),
            }),
        }
    }

    /// This task's id.
    pub fn id(&self) -> TaskId {
        self.inner.envelope.id
    }

    /// Registered task name.
    pub fn task_name(&self) -> &str {
        &self.inner.envelope.task
    }

    /// 0 for the first attempt.
    pub fn attempt(&self) -> u32 {
        self.inner.envelope.attempt
    }

    /// Retries allowed after the first attempt.
    pub fn max_retries(&self) -> u32 {
        self.inner.envelope.max_retries
    }

    /// Headers sent with the task.
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.inner.envelope.headers
    }

    /// Metadata sent with the task.
    pub fn meta(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.inner.envelope.meta
    }

    /// The whole envelope.
    pub fn envelope(&self) -> &Envelope {
        &self.inner.envelope
    }

    /// Identity of the worker running the task.
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// Whether the task was asked to stop (soft time limit, revoke).
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::Acquire)
    }

    /// Resolves when the task is asked to stop; `select!` on it in long loops.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.inner.cancel_notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }

    /// Report progress (`fraction` in 0.0..=1.0, clamped) with optional details.
    pub async fn progress(&self, fraction: f64, data: Option<serde_json::Value>) -> Result<()> {
        let Some(producer) = &self.inner.producer else {
            return Ok(());
        };
        let progress = Progress { fraction: fraction.clamp(0.0, 1.0), data, at: Utc::now() };
        producer.backend().progress(self.id(), progress.clone()).await?;
        *self.inner.progress.lock() = Some(progress);
        Ok(())
    }

    /// The last progress reported through this context, if any.
    pub(crate) fn last_progress(&self) -> Option<Progress> {
        self.inner.progress.lock().clone()
    }

    /// An error asking for a retry after `delay`; return it: `return Err(ctx.retry(d))`.
    pub fn retry(&self, delay: Duration) -> TaskError {
        TaskError::retry_after(delay)
    }

    /// Extend this delivery's lease now (the worker also does so on its own for long tasks).
    /// Returns `false` if the lease was already lost.
    pub async fn heartbeat(&self) -> Result<bool> {
        match &self.inner.lease {
            Some(l) => l.broker.extend_lease(&l.receipt, l.length).await,
            None => Ok(true),
        }
    }

    /// Enqueue a child task; it records this task as parent and this task's root as root.
    pub async fn enqueue<T: Task>(&self, mut sig: Signature<T>) -> Result<TaskHandle<T::Output>> {
        let Some(producer) = &self.inner.producer else {
            return Err(crate::Error::Config("a detached TaskContext cannot enqueue tasks".to_owned()));
        };
        let env = &self.inner.envelope;
        sig.options.parent_id = Some(env.id);
        sig.options.root_id = Some(env.root_id.unwrap_or(env.id));
        producer.enqueue(sig).await
    }

    /// Cancel and mark for termination (revoke with `terminate`).
    pub(crate) fn terminate(&self) {
        self.cancel();
        self.inner.terminated.store(true, Ordering::Release);
        self.inner.terminate_notify.notify_waiters();
    }

    /// Resolves once [`TaskContext::terminate`] was called.
    pub(crate) async fn terminated(&self) {
        loop {
            let notified = self.inner.terminate_notify.notified();
            if self.inner.terminated.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::Release);
        self.inner.cancel_notify.notify_waiters();
    }
}

impl std::fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskContext")
            .field("id", &self.id())
            .field("task", &self.task_name())
            .field("attempt", &self.attempt())
            .finish()
    }
}
