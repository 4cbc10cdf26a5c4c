//! The Postgres result backend: status records, groups and heartbeats in the namespace's
//! schema.

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

use super::{PgStore, backend_err};
use crate::sql_shared::{decode_status, encode_status, fold_statuses, millis};

/// How often expired rows are deleted (rows past expiry are invisible at once).
const SWEEP_EVERY_SECS: i64 = 30;
/// Slow safety re-check while waiting, in case a notification was lost.
const WAIT_RECHECK: Duration = Duration::from_secs(5);

/// Result backend on the `statuses`, `groups`, `group_members`, `group_counts` and `workers`
/// tables.
///
/// `set` writes a whole batch in one statement: an `INSERT … ON CONFLICT DO UPDATE … WHERE`
/// that applies [`TaskStatus::may_replace`] in SQL (a newer attempt, or the same attempt
/// unless a terminal record would be replaced by a non-terminal one) and keeps earlier
/// progress; the same statement sends `NOTIFY` for terminal records (their ids, up to 200 in
/// one notification), which is what [`ResultBackend::wait`] sleeps on (it re-reads after subscribing, so a completion between
/// the two is not missed, and re-checks every few seconds as a safety net). Rows past
/// `expires_at` are invisible and deleted in the background every half minute.
#[derive(Clone)]
pub struct PgBackend {
    store: PgStore,
    ttl: Duration,
    sql: Arc<Sql>,
    last_sweep: Arc<AtomicI64>,
}

impl std::fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBackend").field("store", &self.store).field("ttl", &self.ttl).finish()
    }
}

pub(crate) struct Sql {
    pub(crate) set: String,
    get: String,
    progress: String,
    forget: String,
    group_init: String,
    group_reset: String,
    group_record: String,
    group_counts: String,
    group_row: String,
    group_members: String,
    chord_claim: String,
    heartbeat: String,
    workers: String,
    sweep: Vec<String>,
}

/// The fenced batch upsert of status records, for a `WITH up AS (…)` clause: the records'
/// columns are the arrays `$1`–`$7` (see [`StatusRows::bind_to`]), the TTL in milliseconds is
/// `$8`. [`TaskStatus::may_replace`] in SQL: an expired record, a newer attempt, or the same
/// attempt unless a terminal record would be replaced by a non-terminal one; earlier
/// progress is kept. Returns the written ids and whether each is terminal.
pub(crate) fn upsert_sql(s: &str) -> String {
    format!(
        "INSERT INTO {s}.statuses AS t \
           (id, task, state, attempt, terminal, record, progress, updated_at, expires_at) \
           SELECT i, k, st, a, te, r::json, p::jsonb, now(), now() + $8 * interval '1 millisecond' \
           FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int8[], $5::bool[], $6::text[], $7::text[]) \
             AS u(i, k, st, a, te, r, p) \
           ON CONFLICT (id) DO UPDATE SET task = EXCLUDED.task, state = EXCLUDED.state, \
             attempt = EXCLUDED.attempt, terminal = EXCLUDED.terminal, record = EXCLUDED.record, \
             progress = CASE WHEN t.expires_at <= now() THEN EXCLUDED.progress \
               ELSE coalesce(EXCLUDED.progress, t.progress) END, \
             updated_at = EXCLUDED.updated_at, expires_at = EXCLUDED.expires_at \
           WHERE t.expires_at <= now() OR EXCLUDED.attempt > t.attempt \
             OR (EXCLUDED.attempt = t.attempt AND (NOT t.terminal OR EXCLUDED.terminal)) \
           RETURNING t.id, t.terminal"
    )
}

/// Notifications for the terminal records written by a `WITH up AS (…)` upsert, on the
/// channel `$9`: `S<id>,<id>,…` with up to 200 ids each (37 bytes an id, well under the
/// 8000-byte payload limit), so a batch of 512 outcomes costs three notifications, not 512.
/// One row per notification.
pub(crate) const NOTIFY_TERMINAL: &str = "SELECT pg_notify($9, 'S' || string_agg(id::text, ',')) \
     FROM (SELECT id, (row_number() OVER ()) / 200 AS g FROM up WHERE terminal) x GROUP BY g";

impl Sql {
    pub(crate) fn new(s: &str) -> Self {
        Sql {
            set: format!("WITH up AS ({}) SELECT count(*) FROM ({}) n", upsert_sql(s), NOTIFY_TERMINAL),
            get: format!(
                "SELECT record::text, progress::text FROM {s}.statuses WHERE id = $1 AND expires_at > now()"
            ),
            progress: format!(
                "UPDATE {s}.statuses SET progress = $2::jsonb, updated_at = now(), \
                   record = jsonb_set(record::jsonb, '{{updated_at}}', $3::jsonb)::json, \
                   expires_at = now() + $4 * interval '1 millisecond' \
                 WHERE id = $1 AND expires_at > now()"
            ),
            forget: format!("DELETE FROM {s}.statuses WHERE id = $1"),
            group_init: format!(
                "INSERT INTO {s}.groups AS g (id, total, expires_at) \
                 VALUES ($1, $2, now() + $3 * interval '1 millisecond') \
                 ON CONFLICT (id) DO UPDATE SET total = EXCLUDED.total, claimed = false, \
                   expires_at = EXCLUDED.expires_at \
                 WHERE g.expires_at <= now()"
            ),
            group_reset: format!(
                "WITH m AS (DELETE FROM {s}.group_members WHERE group_id = $1) \
                 DELETE FROM {s}.group_counts WHERE group_id = $1"
            ),
            // One statement: insert the member's row unless its slot is taken and, only when
            // it was inserted, bump the counters of its shard (index modulo 32; members
            // finishing together mostly touch different rows, so they commit in parallel).
            // Returns the group's size; no row: the group does not exist or has expired.
            group_record: format!(
                "WITH g AS (SELECT total FROM {s}.groups WHERE id = $1 AND expires_at > now()), \
                 ins AS (INSERT INTO {s}.group_members (group_id, idx, succeeded, outcome) \
                   SELECT $1, $2, $3, $4::jsonb FROM g WHERE $2 < g.total \
                   ON CONFLICT DO NOTHING RETURNING idx, succeeded), \
                 bump AS (INSERT INTO {s}.group_counts AS c (group_id, shard, succeeded, failed) \
                   SELECT $1, idx % {GROUP_SHARDS}, succeeded::int, (NOT succeeded)::int FROM ins \
                   ON CONFLICT (group_id, shard) DO UPDATE \
                   SET succeeded = c.succeeded + EXCLUDED.succeeded, failed = c.failed + EXCLUDED.failed) \
                 SELECT total FROM g"
            ),
            group_counts: format!(
                "SELECT coalesce(sum(succeeded), 0)::int, coalesce(sum(failed), 0)::int \
                 FROM {s}.group_counts WHERE group_id = $1"
            ),
            group_row: format!("SELECT total, claimed FROM {s}.groups WHERE id = $1 AND expires_at > now()"),
            group_members: format!(
                "SELECT idx, outcome::text FROM {s}.group_members WHERE group_id = $1 ORDER BY idx"
            ),
            chord_claim: format!(
                "UPDATE {s}.groups SET claimed = true WHERE id = $1 AND NOT claimed AND expires_at > now()"
            ),
            heartbeat: format!(
                "INSERT INTO {s}.workers (worker_id, record, expires_at) \
                 VALUES ($1, $2::jsonb, now() + $3 * interval '1 millisecond') \
                 ON CONFLICT (worker_id) DO UPDATE SET record = EXCLUDED.record, expires_at = EXCLUDED.expires_at"
            ),
            workers: format!(
                "SELECT record::text FROM {s}.workers WHERE expires_at > now() ORDER BY worker_id"
            ),
            sweep: ["statuses", "groups", "workers", "locks", "revokes", "unique_claims"]
                .iter()
                .map(|t| {
                    format!(
                        "DELETE FROM {s}.{t} WHERE ctid IN (SELECT ctid FROM {s}.{t} \
                         WHERE expires_at <= now() LIMIT 5000)"
                    )
                })
                .collect(),
        }
    }
}

/// Columns of a batch status write.
#[derive(Default)]
pub(crate) struct StatusRows {
    ids: Vec<uuid::Uuid>,
    tasks: Vec<String>,
    states: Vec<&'static str>,
    attempts: Vec<i64>,
    terminal: Vec<bool>,
    records: Vec<String>,
    progress: Vec<Option<String>>,
}

impl StatusRows {
    pub(crate) fn new(statuses: Vec<TaskStatus>) -> Result<Self> {
        let mut statuses = fold_statuses(statuses);
        // One lock order for every writer: two batches sharing ids never deadlock.
        statuses.sort_unstable_by_key(|s| s.id.0);
        let mut rows = StatusRows::default();
        for s in &statuses {
            rows.ids.push(s.id.0);
            rows.tasks.push(s.task.clone());
            rows.states.push(s.state.as_str());
            rows.attempts.push(i64::from(s.attempt));
            rows.terminal.push(s.state.is_terminal());
            rows.records.push(encode_status(s)?);
            rows.progress.push(match &s.progress {
                Some(p) => Some(serde_json::to_string(p).map_err(stem::Error::backend)?),
                None => None,
            });
        }
        Ok(rows)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Bind the records as `$1`–`$7`, then the TTL as `$8` and the NOTIFY channel as `$9`
    /// (what [`upsert_sql`] and [`NOTIFY_TERMINAL`] read).
    pub(crate) fn bind_to<'q>(
        self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        ttl: Duration,
        channel: &str,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.ids)
            .bind(self.tasks)
            .bind(self.states)
            .bind(self.attempts)
            .bind(self.terminal)
            .bind(self.records)
            .bind(self.progress)
            .bind(millis(ttl))
            .bind(channel.to_owned())
    }
}

impl PgBackend {
    /// A backend on `store`'s namespace keeping records for `ttl`.
    pub fn new(store: PgStore, ttl: Duration) -> Self {
        let sql = store.backend_sql();
        PgBackend { store, ttl, sql, last_sweep: Arc::new(AtomicI64::new(0)) }
    }

    /// The store this backend runs on.
    pub fn store(&self) -> &PgStore {
        &self.store
    }

    /// How long records are kept.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A group's succeeded and failed members: the sums of its counter shards.
    async fn counts(&self, group: TaskId) -> Result<(i32, i32)> {
        sqlx::query_as(&self.sql.group_counts)
            .bind(group.0)
            .fetch_one(self.store.pool())
            .await
            .map_err(backend_err)
    }

    /// Delete expired rows (statuses, groups, heartbeats, locks, revokes, unique claims)
    /// now; returns how many went. Runs by itself in the background every half minute
    /// while the backend writes.
    pub async fn sweep(&self) -> Result<u64> {
        sweep(&self.store, &self.sql).await
    }

    /// Start a background sweep when the last one is half a minute old (called after
    /// writes, also by the broker's combined writes).
    pub(crate) fn maybe_sweep(&self) {
        let now = chrono::Utc::now().timestamp();
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now - last < SWEEP_EVERY_SECS
            || self.last_sweep.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        let (store, sql) = (self.store.clone(), Arc::clone(&self.sql));
        tokio::spawn(async move {
            if let Err(e) = sweep(&store, &sql).await {
                tracing::warn!(error = %e, "sweeping expired rows failed");
            }
        });
    }

    async fn read(&self, id: TaskId) -> Result<Option<TaskStatus>> {
        let mut conn = self.store.hot().await.map_err(backend_err)?;
        let row = sqlx::query_as::<_, (String, Option<String>)>(&self.sql.get)
            .bind(id.0)
            .fetch_optional(conn.conn())
            .await;
        let row = conn.finish(row).map_err(backend_err)?;
        row.map(|(r, p)| decode_status(&r, p.as_deref())).transpose()
    }
}

async fn sweep(store: &PgStore, sql: &Sql) -> Result<u64> {
    let mut n = 0;
    for q in &sql.sweep {
        n += sqlx::query(q).execute(store.pool()).await.map_err(backend_err)?.rows_affected();
    }
    Ok(n)
}

/// Shards of a group's counters (`group_counts`).
const GROUP_SHARDS: i32 = 32;

fn count(x: i32) -> usize {
    usize::try_from(x).unwrap_or(0)
}

impl ResultBackend for PgBackend {
    fn set(&self, statuses: Vec<TaskStatus>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let rows = StatusRows::new(statuses)?;
            if rows.is_empty() {
                return Ok(());
            }
            let mut conn = self.store.hot().await.map_err(backend_err)?;
            let done = rows
                .bind_to(sqlx::query(&self.sql.set), self.ttl, self.store.channel())
                .execute(conn.conn())
                .await;
            conn.finish(done).map_err(backend_err)?;
            self.maybe_sweep();
            Ok(())
        })
    }

    fn get(&self, id: TaskId) -> BoxFuture<'_, Result<Option<TaskStatus>>> {
        Box::pin(self.read(id))
    }

    fn wait(&self, id: TaskId, timeout: Duration) -> BoxFuture<'_, Result<Option<TaskStatus>>> {
        Box::pin(async move {
            let deadline = Instant::now() + timeout;
            self.store.listening().await;
            let watch = self.store.hub().watch(id);
            loop {
                let notified = watch.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                // Read after subscribing: a completion in between is seen here or notified.
                let current = self.read(id).await?;
                let now = Instant::now();
                if current.as_ref().is_some_and(|s| s.state.is_terminal()) || now >= deadline {
                    return Ok(current);
                }
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(deadline.min(now + WAIT_RECHECK)) => {}
                }
            }
        })
    }

    fn progress(&self, id: TaskId, progress: Progress) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let at = serde_json::to_string(&progress.at).map_err(stem::Error::backend)?;
            let p = serde_json::to_string(&progress).map_err(stem::Error::backend)?;
            sqlx::query(&self.sql.progress)
                .bind(id.0)
                .bind(p)
                .bind(at)
                .bind(millis(self.ttl))
                .execute(self.store.pool())
                .await
                .map_err(backend_err)?;
            Ok(())
        })
    }

    fn forget(&self, id: TaskId) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            sqlx::query(&self.sql.forget).bind(id.0).execute(self.store.pool()).await.map_err(backend_err)?;
            Ok(())
        })
    }

    fn group_init(&self, group: TaskId, total: usize) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let total = i32::try_from(total).map_err(|_| stem::Error::backend("group too large"))?;
            let mut tx = self.store.pool().begin().await.map_err(backend_err)?;
            let r = sqlx::query(&self.sql.group_init)
                .bind(group.0)
                .bind(total)
                .bind(millis(self.ttl))
                .execute(&mut *tx)
                .await
                .map_err(backend_err)?;
            if r.rows_affected() > 0 {
                // A re-created (expired) group starts without members.
                sqlx::query(&self.sql.group_reset)
                    .bind(group.0)
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
            let idx = i32::try_from(index)
                .map_err(|_| stem::Error::backend(format!("group {group} has no member {index}")))?;
            let total: Option<i32> = sqlx::query_scalar(&self.sql.group_record)
                .bind(group.0)
                .bind(idx)
                .bind(succeeded)
                .bind(encoded)
                .fetch_optional(self.store.pool())
                .await
                .map_err(backend_err)?;
            let Some(total) = total else {
                return Err(stem::Error::backend(format!("group {group} does not exist or has expired")));
            };
            if idx >= total {
                return Err(stem::Error::backend(format!("group {group} has no member {index}")));
            }
            // Read after the record committed: whichever member commits last sees every
            // member counted, so a complete group is always noticed (possibly by several
            // members; `chord_claim` picks one).
            let (ok, failed) = self.counts(group).await?;
            Ok(GroupCounts { total: count(total), succeeded: count(ok), failed: count(failed) })
        })
    }

    fn group_get(&self, group: TaskId) -> BoxFuture<'_, Result<Option<GroupState>>> {
        Box::pin(async move {
            let pool = self.store.pool();
            let row: Option<(i32, bool)> = sqlx::query_as(&self.sql.group_row)
                .bind(group.0)
                .fetch_optional(pool)
                .await
                .map_err(backend_err)?;
            let Some((total, claimed)) = row else { return Ok(None) };
            let (ok, failed) = self.counts(group).await?;
            let members: Vec<(i32, String)> = sqlx::query_as(&self.sql.group_members)
                .bind(group.0)
                .fetch_all(pool)
                .await
                .map_err(backend_err)?;
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
            let r = sqlx::query(&self.sql.chord_claim)
                .bind(group.0)
                .execute(self.store.pool())
                .await
                .map_err(backend_err)?;
            Ok(r.rows_affected() == 1)
        })
    }

    fn heartbeat(&self, heartbeat: WorkerHeartbeat, ttl: Duration) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let record = serde_json::to_string(&heartbeat).map_err(stem::Error::backend)?;
            sqlx::query(&self.sql.heartbeat)
                .bind(&heartbeat.worker_id)
                .bind(record)
                .bind(millis(ttl))
                .execute(self.store.pool())
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
            let rows: Vec<String> = sqlx::query_scalar(&self.sql.workers)
                .fetch_all(self.store.pool())
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
