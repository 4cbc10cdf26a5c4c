//! Result backends keep task status records, results, progress, group/chord bookkeeping and
//! worker heartbeats.
//!
//! Like [`Broker`](crate::broker::Broker), the [`ResultBackend`] trait is object safe so
//! adapters can be chosen at run time.

pub mod memory;
mod state;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::broker::BoxFuture;
use crate::envelope::TaskId;
use crate::error::Result;

pub use memory::MemoryBackend;
pub use state::{Progress, TaskFailure, TaskState, TaskStatus};

/// Default time a result is kept.
pub const DEFAULT_RESULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Outcome of one group member.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberOutcome {
    /// The member task.
    pub task_id: TaskId,
    /// Succeeded, failed or cancelled.
    pub state: TaskState,
    /// Result when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Error when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskFailure>,
}

/// One member outcome to record, for [`ResultBackend::group_record_many`].
#[derive(Clone, Debug, PartialEq)]
pub struct MemberRecord {
    /// The group.
    pub group: TaskId,
    /// The member's index in the group.
    pub index: usize,
    /// What the member ended with.
    pub outcome: MemberOutcome,
}

/// How far a group has come.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCounts {
    /// Members in the group.
    pub total: usize,
    /// Members that succeeded.
    pub succeeded: usize,
    /// Members that failed or were cancelled.
    pub failed: usize,
}

impl GroupCounts {
    /// Members that finished either way.
    pub fn completed(&self) -> usize {
        self.succeeded + self.failed
    }

    /// Whether every member finished.
    pub fn is_done(&self) -> bool {
        self.completed() >= self.total
    }
}

/// A group's members in member order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupState {
    /// Group id.
    pub id: TaskId,
    /// Outcome per member index (`None`: not finished).
    pub members: Vec<Option<MemberOutcome>>,
    /// Counts.
    pub counts: GroupCounts,
    /// Whether the chord callback was claimed.
    pub claimed: bool,
}

/// A worker's periodic "I am alive" record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerHeartbeat {
    /// Random per-process identity.
    pub worker_id: String,
    /// Host name.
    pub hostname: String,
    /// OS process id.
    pub pid: u32,
    /// Queues consumed.
    pub queues: Vec<String>,
    /// Concurrency limit.
    pub concurrency: usize,
    /// Tasks running now.
    pub in_flight: usize,
    /// Tasks finished since start.
    pub processed: u64,
    /// When the worker started.
    pub started_at: DateTime<Utc>,
    /// When this heartbeat was sent.
    pub at: DateTime<Utc>,
}

/// Stores task status and results.
///
/// Semantics every implementation keeps (checked by the shared contract suite): writes are
/// fenced ([`TaskStatus::may_replace`]); records expire after the backend's TTL; `wait`
/// returns as soon as the task is terminal without polling; group counters are atomic and
/// idempotent per member index; `chord_claim` returns `true` to exactly one caller.
pub trait ResultBackend: Send + Sync + 'static {
    /// Write records (in order); each is dropped if fenced out by the stored one.
    fn set(&self, statuses: Vec<TaskStatus>) -> BoxFuture<'_, Result<()>>;

    /// Read one record.
    fn get(&self, id: TaskId) -> BoxFuture<'_, Result<Option<TaskStatus>>>;

    /// Wait until the task is terminal (returning its record) or `timeout` passes (returning
    /// the latest record, if any).
    fn wait(&self, id: TaskId, timeout: Duration) -> BoxFuture<'_, Result<Option<TaskStatus>>>;

    /// Store progress on the task's record.
    fn progress(&self, id: TaskId, progress: Progress) -> BoxFuture<'_, Result<()>>;

    /// Delete a record.
    fn forget(&self, id: TaskId) -> BoxFuture<'_, Result<()>>;

    /// Create a group of `total` members (idempotent).
    fn group_init(&self, group: TaskId, total: usize) -> BoxFuture<'_, Result<()>>;

    /// Record member `index`'s outcome; recording the same index twice counts once.
    fn group_record(
        &self,
        group: TaskId,
        index: usize,
        outcome: MemberOutcome,
    ) -> BoxFuture<'_, Result<GroupCounts>>;

    /// Record many members' outcomes (of one group or of several) in one call, each exactly
    /// as [`ResultBackend::group_record`] would: the first outcome per index counts, once.
    ///
    /// Returns one result per record, in the order given: that record's group counts, read
    /// after the record was applied (so the call that applies a group's last member sees the
    /// group complete), or that record's own error (unknown or expired group, index out of
    /// range), which leaves the other records unaffected. An outer error means the call as a
    /// whole failed: any of the records may or may not have been applied, and recording them
    /// again is harmless.
    ///
    /// The default calls `group_record` for every record, concurrently; adapters that can
    /// apply the whole batch in one round trip override it (memory: one lock; Redis: one
    /// script call). The worker sends the member records of concurrently finishing canvas
    /// tasks through this method.
    fn group_record_many(
        &self,
        records: Vec<MemberRecord>,
    ) -> BoxFuture<'_, Result<Vec<Result<GroupCounts>>>> {
        Box::pin(async move {
            let calls = records.into_iter().map(|r| self.group_record(r.group, r.index, r.outcome));
            Ok(futures_util::future::join_all(calls).await)
        })
    }

    /// Read a group.
    fn group_get(&self, group: TaskId) -> BoxFuture<'_, Result<Option<GroupState>>>;

    /// Claim the right to run the chord callback; exactly one caller ever gets `true`.
    fn chord_claim(&self, group: TaskId) -> BoxFuture<'_, Result<bool>>;

    /// Store a worker heartbeat that expires after `ttl`.
    fn heartbeat(&self, heartbeat: WorkerHeartbeat, ttl: Duration) -> BoxFuture<'_, Result<()>>;

    /// Workers whose heartbeat has not expired.
    fn workers(&self) -> BoxFuture<'_, Result<Vec<WorkerHeartbeat>>>;

    /// The concrete backend, for a broker that can combine its own writes with this
    /// backend's (see [`Broker::record_and_ack`](crate::broker::Broker::record_and_ack)).
    /// `None` (the default) keeps the two apart.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}
