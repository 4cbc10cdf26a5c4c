//! The SQLite result backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use stem::TaskId;
use stem::backend::{
    GroupCounts, GroupState, MemberOutcome, Progress, ResultBackend, TaskState, TaskStatus, WorkerHeartbeat,
};
use stem::broker::BoxFuture;
use stem::error::Result;
use tokio::time::Instant;

use super::{SqliteStore, backend_err, now_ms};
use crate::sql_shared::{decode_status, encode_status, fold_statuses, millis};

const SWEEP_EVERY_MS: i64 = 30_000;

/// The fenced batch upsert of status records (`?1` the JSON rows of [`status_rows`], `?2` now,
/// `?3` the TTL); returns the written ids and whether each is terminal.
pub(crate) const SET: &str = "INSERT INTO statuses (id, task, state, attempt, terminal, record, progress, updated_at, expires_at) \
     SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, ?2, ?2 + ?3 \
     FROM json_each(?1) WHERE true \
     ON CONFLICT (id) DO UPDATE SET task = excluded.task, state = excluded.state, attempt = excluded.attempt, \
       terminal = excluded.terminal, record = excluded.record, \
       progress = CASE WHEN statuses.expires_at <= ?2 THEN excluded.progress \
         ELSE coalesce(excluded.progress, statuses.progress) END, \
       updated_at = excluded.updated_at, expires_at = excluded.expires_at \
     WHERE statuses.expires_at <= ?2 OR excluded.attempt > statuses.attempt \
       OR (excluded.attempt = statuses.attempt AND (NOT statuses.terminal OR excluded.terminal)) \
     RETURNING id, terminal";
const GET: &str = "SELECT record, progress FROM statuses WHERE id = ?1 AND expires_at > ?2";
const PROGRESS: &str = "UPDATE statuses SET progress = ?2, updated_at = ?4, \
       record = json_set(record, '$.updated_at', ?3), expires_at = ?4 + ?5 \
     WHERE id = ?1 AND expires_at > ?4";
const FORGET: &str = "DELETE FROM statuses WHERE id = ?1";
const GROUP_INIT: &str = "INSERT INTO groups (id, total, expires_at) VALUES (?1, ?2, ?3 + ?4) \
     ON CONFLICT (id) DO UPDATE SET total = excluded.total, succeeded = 0, failed = 0, claimed = 0, \
       expires_at = excluded.expires_at WHERE groups.expires_at <= ?3";
const GROUP_CLEAR: &str = "DELETE FROM group_members WHERE group_id = ?1";
/// Inserts a member unless its slot is taken (the `group_members_count` trigger bumps the
/// counters); nothing when the group does not exist, has expired or is smaller.
const MEMBER_INSERT: &str = "INSERT INTO group_members (group_id, idx, succeeded, outcome) \
     SELECT ?1, ?2, ?3, ?4 FROM groups WHERE id = ?1 AND expires_at > ?5 AND ?2 < total \
     ON CONFLICT DO NOTHING";
const GROUP_ROW: &str =
    "SELECT total, succeeded, failed, claimed FROM groups WHERE id = ?1 AND expires_at > ?2";
const GROUP_MEMBERS: &str = "SELECT idx, outcome FROM group_members WHERE group_id = ?1 ORDER BY idx";
const CHORD_CLAIM: &str = "UPDATE groups SET claimed = 1 WHERE id = ?1 AND NOT claimed AND expires_at > ?2";
const HEARTBEAT: &str = "INSERT INTO workers (worker_id, record, expires_at) VALUES (?1, ?2, ?3) \
     ON CONFLICT (worker_id) DO UPDATE SET record = excluded.record, expires_at = excluded.expires_at";
const WORKERS: &str = "SELECT record FROM workers WHERE expires_at > ?1 ORDER BY worker_id";
const SWEEP: [&str; 7] = [
    "DELETE FROM statuses WHERE expires_at <= ?1",
    "DELETE FROM group_members WHERE group_id IN (SELECT id FROM groups WHERE expires_at <= ?1)",
    "DELETE FROM groups WHERE expires_at <= ?1",
    "DELETE FROM workers WHERE expires_at <= ?1",
    "DELETE FROM locks WHERE expires_at <= ?1",
    "DELETE FROM revokes WHERE expires_at <= ?1",
    "DELETE FROM unique_claims WHERE expires_at <= ?1",
];

/// Result backend on the `statuses`, `groups`, `group_members` and `workers` tables of a
/// SQLite database.
///
/// `set` writes a batch in one upsert statement applying [`TaskStatus::may_replace`] in SQL
/// and keeping earlier progress. Terminal writes wake waiters of this process at once;
/// waiters also re-read every [`SqliteOptions::fallback_poll`](super::SqliteOptions) to see
/// other processes' writes. Expired rows are invisible and swept every half minute.
#[derive(Clone)]
pub struct SqliteBackend {
    store: SqliteStore,
    ttl: Duration,
    last_sweep: Arc<AtomicI64>,
}

impl std::fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBackend").field("store", &self.store).field("ttl", &self.ttl).finish()
    }
}

fn count(x: i64) -> usize {
    usize::try_from(x).unwrap_or(0)
}

impl SqliteBackend {
    /// A backend on `store` keeping records for `ttl`.
    pub fn new(store: SqliteStore, ttl: Duration) -> Self {
        SqliteBackend { store, ttl, last_sweep: Arc::new(AtomicI64::new(0)) }
    }

    /// The store this backend runs on.
    pub fn store(&self) -> &SqliteStore {
        &self.store
    }

    /// How long records are kept.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Delete expired rows now; returns how many went.
    pub async fn sweep(&self) -> Result<u64> {
        sweep(&self.store).await
    }

    fn maybe_sweep(&self) {
        let now = now_ms();
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now - last < SWEEP_EVERY_MS
            || self.last_sweep.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = sweep(&store).await {
                tracing::warn!(error = %e, "sweeping expired rows failed");
            }
        });
    }

    async fn read(&self, id: TaskId) -> Result<Option<TaskStatus>> {
        let row: Option<(String, Option<String>)> = sqlx::query_as(GET)
            .bind(id.to_string())
            .bind(now_ms())
            .fetch_optional(self.store.reader())
            .await
            .map_err(backend_err)?;
        row.map(|(r, p)| decode_status(&r, p.as_deref())).transpose()
    }
}

async fn sweep(store: &SqliteStore) -> Result<u64> {
    let now = now_ms();
    let mut n = 0;
    for q in SWEEP {
        n += sqlx::query(q).bind(now).execute(store.writer()).await.map_err(backend_err)?.rows_affected();
    }
    Ok(n)
}

/// The JSON rows [`SET`] reads, one per task (the batch folded first); `None` when empty.
pub(crate) fn status_rows(statuses: Vec<TaskStatus>) -> Result<Option<String>> {
    let statuses = fold_statuses(statuses);
    if statuses.is_empty() {
        return Ok(None);
    }
    let mut rows = Vec::with_capacity(statuses.len());
    for s in &statuses {
        let progress = match &s.progress {
            Some(p) => Some(serde_json::to_string(p).map_err(stem::Error::backend)?),
            None => None,
        };
        rows.push(serde_json::json!([
            s.id.to_string(),
            s.task,
            s.state.as_str(),
            s.attempt,
            s.state.is_terminal(),
            encode_status(s)?,
            progress,
        ]));
    }
    serde_json::to_string(&rows).map(Some).map_err(stem::Error::backend)
}

/// Run the fenced upsert of `rows` (from [`status_rows`]) on `conn` (the writer, possibly
/// inside a transaction); returns the written ids and whether each is terminal.
async fn write_statuses(
    conn: &mut sqlx::SqliteConnection,
    rows: String,
    ttl: Duration,
) -> Result<Vec<(String, bool)>> {
    sqlx::query_as(SET).bind(rows).bind(now_ms()).bind(millis(ttl)).fetch_all(conn).await.map_err(backend_err)
}

impl SqliteBackend {
    /// After records were written (and committed): wake this process's waiters of the
    /// terminal ones, and sweep now and then.
    pub(crate) fn written(&self, written: &[(String, bool)]) {
        let hub = self.store.hub();
        if hub.has_waiters() {
            for (id, terminal) in written {
                if let (true, Ok(id)) = (*terminal, id.parse::<TaskId>()) {
                    hub.task_done(id);
                }
            }
        }
        self.maybe_sweep();
    }
}

impl ResultBackend for SqliteBackend {
    fn set(&self, statuses: Vec<TaskStatus>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let Some(rows) = status_rows(statuses)? else { return Ok(()) };
            let mut conn = self.store.writer().acquire().await.map_err(backend_err)?;
            let written = write_statuses(&mut conn, rows, self.ttl).await?;
            drop(conn);
            self.written(&written);
            Ok(())
        })
    }

    fn get(&self, id: TaskId) -> BoxFuture<'_, Result<Option<TaskStatus>>> {
        Box::pin(self.read(id))
    }

    fn wait(&self, id: TaskId, timeout: Duration) -> BoxFuture<'_, Result<Option<TaskStatus>>> {
        Box::pin(async move {
            let deadline = Instant::now() + timeout;
            let watch = self.store.hub().watch(id);
            loop {
                let notified = watch.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let current = self.read(id).await?;
                let now = Instant::now();
                if current.as_ref().is_some_and(|s| s.state.is_terminal()) || now >= deadline {
                    return Ok(current);
                }
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(deadline.min(now + self.store.fallback_poll())) => {}
                }
            }
        })
    }

    fn progress(&self, id: TaskId, progress: Progress) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let at = progress.at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
            let p = serde_json::to_string(&progress).map_err(stem::Error::backend)?;
            sqlx::query(PROGRESS)
                .bind(id.to_string())
                .bind(p)
                .bind(at)
                .bind(now_ms())
                .bind(millis(self.ttl))
                .execute(self.store.writer())
                .await
                .map_err(backend_err)?;
            Ok(())
        })
    }

    fn forget(&self, id: TaskId) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            sqlx::query(FORGET)
                .bind(id.to_string())
                .execute(self.store.writer())
                .await
                .map_err(backend_err)?;
            Ok(())
        })
    }

    fn group_init(&self, group: TaskId, total: usize) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let total = i64::try_from(total).map_err(|_| stem::Error::backend("group too large"))?;
            let mut tx = self.store.writer().begin_with("BEGIN IMMEDIATE").await.map_err(backend_err)?;
            let r = sqlx::query(GROUP_INIT)
                .bind(group.to_string())
                .bind(total)
                .bind(now_ms())
                .bind(millis(self.ttl))
                .execute(&mut *tx)
                .await
                .map_err(backend_err)?;
            if r.rows_affected() > 0 {
                sqlx::query(GROUP_CLEAR)
                    .bind(group.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(backend_err)?;
            }
            tx.commit().await.map_err(backend_err)
        })
    }

    fn group_record(
        &self,
        group: TaskId,
        index: usize,
        outcome: MemberOutcome,
    ) -> BoxFuture<'_, Result<GroupCounts>> {
        Box::pin(async move {
            let encoded = serde_json::to_string(&outcome).map_err(stem::Error::backend)?;
            let succeeded = outcome.state == TaskState::Succeeded;
            let gid = group.to_string();
            let idx = i64::try_from(index)
                .map_err(|_| stem::Error::backend(format!("group {group} has no member {index}")))?;
            // One write statement (autocommit), then a read after it committed: whichever
            // member commits last sees every member counted, so a complete group is always
            // noticed (possibly by several members; `chord_claim` picks one).
            sqlx::query(MEMBER_INSERT)
                .bind(&gid)
                .bind(idx)
                .bind(succeeded)
                .bind(encoded)
                .bind(now_ms())
                .execute(self.store.writer())
                .await
                .map_err(backend_err)?;
            let row: Option<(i64, i64, i64, bool)> = sqlx::query_as(GROUP_ROW)
                .bind(&gid)
                .bind(now_ms())
                .fetch_optional(self.store.reader())
                .await
                .map_err(backend_err)?;
            let Some((total, ok, failed, _)) = row else {
                return Err(stem::Error::backend(format!("group {group} does not exist or has expired")));
            };
            if idx >= total {
                return Err(stem::Error::backend(format!("group {group} has no member {index}")));
            }
            Ok(GroupCounts { total: count(total), succeeded: count(ok), failed: count(failed) })
        })
    }

    fn group_get(&self, group: TaskId) -> BoxFuture<'_, Result<Option<GroupState>>> {
        Box::pin(async move {
            let r = self.store.reader();
            let gid = group.to_string();
            let row: Option<(i64, i64, i64, bool)> = sqlx::query_as(GROUP_ROW)
                .bind(&gid)
                .bind(now_ms())
                .fetch_optional(r)
                .await
                .map_err(backend_err)?;
            let Some((total, ok, failed, claimed)) = row else { return Ok(None) };
            let members: Vec<(i64, String)> =
                sqlx::query_as(GROUP_MEMBERS).bind(&gid).fetch_all(r).await.map_err(backend_err)?;
            let mut slots: Vec<Option<MemberOutcome>> = vec![None; count(total)];
            for (idx, outcome) in members {
                let outcome: MemberOutcome = serde_json::from_str(&outcome)
                    .map_err(|e| stem::Error::backend(format!("stored group member is unreadable: {e}")))?;
                if let Some(slot) = slots.get_mut(count(idx)) {
                    *slot = Some(outcome);
                }
            }
            Ok(Some(GroupState {
                id: group,
                members: slots,
                counts: GroupCounts { total: count(total), succeeded: count(ok), failed: count(failed) },
                claimed,
            }))
        })
    }

    fn chord_claim(&self, group: TaskId) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let r = sqlx::query(CHORD_CLAIM)
                .bind(group.to_string())
                .bind(now_ms())
                .execute(self.store.writer())
                .await
                .map_err(backend_err)?;
            Ok(r.rows_affected() == 1)
        })
    }

    fn heartbeat(&self, heartbeat: WorkerHeartbeat, ttl: Duration) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let record = serde_json::to_string(&heartbeat).map_err(stem::Error::backend)?;
            sqlx::query(HEARTBEAT)
                .bind(&heartbeat.worker_id)
                .bind(record)
                .bind(now_ms().saturating_add(millis(ttl)))
                .execute(self.store.writer())
                .await
                .map_err(backend_err)?;
            Ok(())
        })
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn workers(&self) -> BoxFuture<'_, Result<Vec<WorkerHeartbeat>>> {
        Box::pin(async move {
            let rows: Vec<String> = sqlx::query_scalar(WORKERS)
                .bind(now_ms())
                .fetch_all(self.store.reader())
                .await
                .map_err(backend_err)?;
            rows.iter()
                .map(|r| {
                    serde_json::from_str(r)
                        .map_err(|e| stem::Error::backend(format!("stored heartbeat is unreadable: {e}")))
                })
                .collect()
        })
    }
}
