//! Coordination stores shared by every worker and producer of a deployment: locks, revokes,
//! a global rate limiter and unique-task claims.
//!
//! Each trait has an in-memory implementation here (one process) and shared implementations
//! in `stem-adapters` (Redis, Postgres, SQLite), so limits and revokes hold across processes.

mod memory;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::broker::BoxFuture;
use crate::envelope::TaskId;
use crate::error::Result;
use crate::task::RateLimit;

pub use memory::{MemoryLockStore, MemoryRateLimiter, MemoryRevokeStore, MemoryUniqueStore};

/// Named locks with an owner and a time to live (leader election, Beat, exclusive jobs).
pub trait LockStore: Send + Sync + 'static {
    /// Take `key` for `owner` if free (or expired). Returns whether `owner` holds it now.
    fn acquire<'a>(&'a self, key: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, Result<bool>>;
    /// Extend `owner`'s hold on `key`; `false` when `owner` no longer holds it.
    fn renew<'a>(&'a self, key: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, Result<bool>>;
    /// Let go of `key` if `owner` holds it; returns whether it did.
    fn release<'a>(&'a self, key: &'a str, owner: &'a str) -> BoxFuture<'a, Result<bool>>;
    /// Current holder of `key`, if any.
    fn owner<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>>>;
}

/// A request to stop a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The task.
    pub task_id: TaskId,
    /// Also cancel it if it is running (its context is cancelled, then it is dropped).
    pub terminate: bool,
    /// Why.
    pub reason: String,
    /// When it was revoked.
    pub at: DateTime<Utc>,
}

/// Persistent revokes: a revoked task never starts, and with `terminate` a running one is
/// cancelled. Revokes survive worker restarts.
pub trait RevokeStore: Send + Sync + 'static {
    /// Record a revoke (kept for `ttl`).
    fn revoke(&self, revocation: Revocation, ttl: Duration) -> BoxFuture<'_, Result<()>>;
    /// The revoke of `id`, if any.
    fn get(&self, id: TaskId) -> BoxFuture<'_, Result<Option<Revocation>>>;
    /// Every live revoke.
    fn list(&self) -> BoxFuture<'_, Result<Vec<Revocation>>>;
}

/// A rate limiter shared by every worker: a task's `rate_limit` holds across all of them.
pub trait RateLimiter: Send + Sync + 'static {
    /// Take one start for `key` under `limit`: `Ok(None)` if granted, `Ok(Some(wait))` if the
    /// caller should try again after `wait`.
    fn acquire<'a>(&'a self, key: &'a str, limit: RateLimit) -> BoxFuture<'a, Result<Option<Duration>>>;
}

/// Unique-task claims: an identical enqueue within the window returns the existing task.
pub trait UniqueStore: Send + Sync + 'static {
    /// Claim `key` for task `id` for `ttl`. `Ok(None)`: claimed; `Ok(Some(existing))`: another
    /// task holds it.
    fn claim<'a>(&'a self, key: &'a str, id: TaskId, ttl: Duration) -> BoxFuture<'a, Result<Option<TaskId>>>;
    /// Drop a claim (when the task finishes).
    fn release<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>>;
}
