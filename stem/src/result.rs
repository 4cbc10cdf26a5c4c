//! Typed handles to enqueued tasks: status and waiting for the result.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::backend::{ResultBackend, TaskFailure, TaskState, TaskStatus};
use crate::envelope::TaskId;
use crate::error::Error;

/// Why [`TaskHandle::wait`] returned no result.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The task did not finish in time (it may still finish later).
    #[error("task {id} did not finish within {timeout:?} (last state: {})", last_state.map_or("unknown", TaskState::as_str))]
    Timeout {
        /// Task id.
        id: TaskId,
        /// How long we waited.
        timeout: Duration,
        /// Last state seen, if any record exists.
        last_state: Option<TaskState>,
    },
    /// The task failed for good.
    #[error("task {id} failed: {error}")]
    Failed {
        /// Task id.
        id: TaskId,
        /// The recorded error.
        error: TaskFailure,
    },
    /// The task was revoked or expired before it ran.
    #[error("task {id} was cancelled{}", reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    Cancelled {
        /// Task id.
        id: TaskId,
        /// Why, when recorded.
        reason: Option<TaskFailure>,
    },
    /// The stored result does not decode as the expected type.
    #[error("task {id}: result does not match the expected type: {source}")]
    Decode {
        /// Task id.
        id: TaskId,
        /// What serde said.
        source: serde_json::Error,
    },
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] Error),
}

/// A typed handle to an enqueued task; `T` is the task's output type.
pub struct TaskHandle<T> {
    id: TaskId,
    backend: Arc<dyn ResultBackend>,
    _output: PhantomData<fn() -> T>,
}

impl<T> Clone for TaskHandle<T> {
    fn clone(&self) -> Self {
        TaskHandle { id: self.id, backend: Arc::clone(&self.backend), _output: PhantomData }
    }
}

impl<T> std::fmt::Debug for TaskHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle").field("id", &self.id).finish()
    }
}

impl<T> TaskHandle<T> {
    /// A handle for task `id` whose results live in `backend`.
    pub fn new(id: TaskId, backend: Arc<dyn ResultBackend>) -> Self {
        TaskHandle { id, backend, _output: PhantomData }
    }

    /// The task id.
    pub fn id(&self) -> TaskId {
        self.id
    }

    /// The current status record, if any.
    pub async fn status(&self) -> Result<Option<TaskStatus>, Error> {
        self.backend.get(self.id).await
    }

    /// Wait for a terminal record without decoding it.
    pub async fn wait_status(&self, timeout: Duration) -> Result<TaskStatus, WaitError> {
        match self.backend.wait(self.id, timeout).await? {
            Some(s) if s.state.is_terminal() => Ok(s),
            last => Err(WaitError::Timeout { id: self.id, timeout, last_state: last.map(|s| s.state) }),
        }
    }
}

impl<T: DeserializeOwned> TaskHandle<T> {
    /// Wait up to `timeout` for the result.
    pub async fn wait(&self, timeout: Duration) -> Result<T, WaitError> {
        let status = self.wait_status(timeout).await?;
        match status.state {
            TaskState::Succeeded => {
                let value = status.result.unwrap_or(serde_json::Value::Null);
                serde_json::from_value(value).map_err(|source| WaitError::Decode { id: self.id, source })
            }
            TaskState::Cancelled => Err(WaitError::Cancelled { id: self.id, reason: status.error }),
            _ => Err(WaitError::Failed {
                id: self.id,
                error: status
                    .error
                    .unwrap_or_else(|| TaskFailure::new("unknown", "no error recorded", false)),
            }),
        }
    }
}
