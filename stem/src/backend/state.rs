//! Task states and the status record a result backend keeps per task.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, TaskId};
use crate::task::TaskError;

/// Where a task is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Published, not started.
    Queued,
    /// A worker is running it.
    Running,
    /// An attempt failed; another is scheduled.
    Retried,
    /// Finished with a result.
    Succeeded,
    /// Failed for good (retries exhausted, fatal error, bad input).
    Failed,
    /// Revoked or expired before it ran.
    Cancelled,
}

impl TaskState {
    /// Succeeded, failed or cancelled: nothing more will happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled)
    }

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Retried => "retried",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A recorded error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFailure {
    /// Error kind (`"panic"`, `"hard-time-limit"`, `"invalid-args"`, a task's own kinds, ...).
    pub kind: String,
    /// Message.
    pub message: String,
    /// Whether the error allowed a retry.
    pub retryable: bool,
}

impl TaskFailure {
    /// A failure of `kind`.
    pub fn new(kind: impl Into<String>, message: impl Into<String>, retryable: bool) -> Self {
        TaskFailure { kind: kind.into(), message: message.into(), retryable }
    }
}

impl From<&TaskError> for TaskFailure {
    fn from(e: &TaskError) -> Self {
        TaskFailure::new(e.kind(), e.message(), e.is_retryable())
    }
}

impl std::fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// Progress reported with `ctx.progress(..)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// 0.0 to 1.0.
    pub fraction: f64,
    /// Optional details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// When it was reported.
    #[serde(with = "crate::timestamp::rfc3339")]
    pub at: DateTime<Utc>,
}

/// What the result backend knows about one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// Task id.
    pub id: TaskId,
    /// Task name.
    pub task: String,
    /// Current state.
    pub state: TaskState,
    /// Result (succeeded only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Last error (retried, failed, cancelled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskFailure>,
    /// Attempt number this record belongs to (used as a fence).
    pub attempt: u32,
    /// When the task was enqueued.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::timestamp::opt_rfc3339")]
    pub queued_at: Option<DateTime<Utc>>,
    /// When the current attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::timestamp::opt_rfc3339")]
    pub started_at: Option<DateTime<Utc>>,
    /// When the task reached a terminal state.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::timestamp::opt_rfc3339")]
    pub finished_at: Option<DateTime<Utc>>,
    /// Last change.
    #[serde(with = "crate::timestamp::rfc3339")]
    pub updated_at: DateTime<Utc>,
    /// Worker that wrote the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<std::sync::Arc<str>>,
    /// Last progress report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Metadata from the envelope.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// Lineage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<TaskId>,
    /// Lineage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_id: Option<TaskId>,
}

impl TaskStatus {
    /// A record for `env` in `state`, stamped now.
    pub fn for_envelope(env: &Envelope, state: TaskState) -> Self {
        Self::for_envelope_at(env, state, Utc::now())
    }

    /// [`Self::for_envelope`] as of `now` (a batch of records reads the clock once).
    pub(crate) fn for_envelope_at(env: &Envelope, state: TaskState, now: DateTime<Utc>) -> Self {
        TaskStatus {
            id: env.id,
            task: env.task.clone(),
            state,
            result: None,
            error: None,
            attempt: env.attempt,
            queued_at: Some(env.created_at),
            started_at: None,
            finished_at: state.is_terminal().then_some(now),
            updated_at: now,
            worker_id: None,
            progress: None,
            meta: env.meta.clone(),
            parent_id: env.parent_id,
            root_id: env.root_id,
        }
    }

    /// Append the record's JSON to `out`: the same bytes as its `Serialize`, written
    /// directly (see `crate::json`); adapters store and publish it once per task. Keep the
    /// field order and skip rules of the struct.
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        let mut o = crate::json::Object::new(out);
        o.id("id", self.id);
        o.str("task", &self.task)?;
        o.str("state", self.state.as_str())?;
        if let Some(r) = &self.result {
            o.value("result", r)?;
        }
        if let Some(e) = &self.error {
            o.value("error", e)?;
        }
        o.uint("attempt", self.attempt.into());
        for (name, t) in [
            ("queued_at", &self.queued_at),
            ("started_at", &self.started_at),
            ("finished_at", &self.finished_at),
        ] {
            if let Some(t) = t {
                o.timestamp(name, t)?;
            }
        }
        o.timestamp("updated_at", &self.updated_at)?;
        if let Some(w) = &self.worker_id {
            o.str("worker_id", w)?;
        }
        if let Some(p) = &self.progress {
            o.value("progress", p)?;
        }
        if !self.meta.is_empty() {
            o.value("meta", &self.meta)?;
        }
        if let Some(id) = self.parent_id {
            o.id("parent_id", id);
        }
        if let Some(id) = self.root_id {
            o.id("root_id", id);
        }
        o.end();
        Ok(())
    }

    /// Whether `self` may replace `current`: a record of an older attempt never overwrites a
    /// newer one, and within one attempt a terminal state is never replaced by a non-terminal
    /// one (a late "running" must not hide "succeeded").
    pub fn may_replace(&self, current: &TaskStatus) -> bool {
        if self.attempt != current.attempt {
            return self.attempt > current.attempt;
        }
        !current.state.is_terminal() || self.state.is_terminal()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fencing_rules() {
        let env = Envelope::new("t", serde_json::json!({}));
        let mut running1 = TaskStatus::for_envelope(&env, TaskState::Running);
        running1.attempt = 1;
        let mut done0 = TaskStatus::for_envelope(&env, TaskState::Succeeded);
        done0.attempt = 0;
        assert!(!done0.may_replace(&running1), "stale attempt must not overwrite newer");
        assert!(running1.may_replace(&done0));
        let running0 = TaskStatus::for_envelope(&env, TaskState::Running);
        assert!(!running0.may_replace(&done0), "late running must not hide succeeded");
        assert!(done0.may_replace(&running0));
    }
}
