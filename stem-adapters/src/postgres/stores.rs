//! Coordination stores on Postgres: locks, revokes, a token-bucket rate limiter and unique
//! claims, each one statement.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use stem::TaskId;
use stem::broker::BoxFuture;
use stem::error::Result;
use stem::store::{LockStore, RateLimiter, Revocation, RevokeStore, UniqueStore};
use stem::task::RateLimit;

use super::{PgStore, backend_err};
use crate::sql_shared::millis;

/// [`LockStore`], [`RevokeStore`], [`RateLimiter`] and [`UniqueStore`] on the `locks`,
/// `revokes`, `rate_buckets` and `unique_claims` tables. Every operation is a single
/// statement, so it is atomic across processes.
#[derive(Clone)]
pub struct PgStores {
    store: PgStore,
    sql: Arc<Sql>,
}

impl std::fmt::Debug for PgStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStores").field("store", &self.store).finish()
    }
}

struct Sql {
    acquire: String,
    renew: String,
    release: String,
    owner: String,
    revoke: String,
    revoke_get: String,
    revoke_list: String,
    rate: String,
    claim: String,
    unclaim: String,
}

impl PgStores {
    /// The stores of `store`'s namespace.
    pub fn new(store: PgStore) -> Self {
        let s = store.schema();
        let sql = Sql {
            acquire: format!(
                "INSERT INTO {s}.locks AS l (key, owner, expires_at) \
                 VALUES ($1, $2, now() + $3 * interval '1 millisecond') \
                 ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at \
                 WHERE l.expires_at <= now() OR l.owner = EXCLUDED.owner"
            ),
            renew: format!(
                "UPDATE {s}.locks SET expires_at = now() + $3 * interval '1 millisecond' \
                 WHERE key = $1 AND owner = $2 AND expires_at > now()"
            ),
            release: format!("DELETE FROM {s}.locks WHERE key = $1 AND owner = $2 AND expires_at > now()"),
            owner: format!("SELECT owner FROM {s}.locks WHERE key = $1 AND expires_at > now()"),
            revoke: format!(
                "INSERT INTO {s}.revokes (task_id, terminate, reason, revoked_at, expires_at) \
                 VALUES ($1, $2, $3, $4, now() + $5 * interval '1 millisecond') \
                 ON CONFLICT (task_id) DO UPDATE SET terminate = EXCLUDED.terminate, \
                   reason = EXCLUDED.reason, revoked_at = EXCLUDED.revoked_at, expires_at = EXCLUDED.expires_at"
            ),
            revoke_get: format!(
                "SELECT task_id, terminate, reason, revoked_at FROM {s}.revokes \
                 WHERE task_id = $1 AND expires_at > now()"
            ),
            revoke_list: format!(
                "SELECT task_id, terminate, reason, revoked_at FROM {s}.revokes \
                 WHERE expires_at > now()"
            ),
            // Token bucket: refill by elapsed time, take one if there is one; `granted` says
            // whether this call got it. One statement, so concurrent callers serialise on the row.
            rate: format!(
                "INSERT INTO {s}.rate_buckets AS b (key, tokens, granted, updated_at) \
                 VALUES ($1, $2 - 1, true, clock_timestamp()) \
                 ON CONFLICT (key) DO UPDATE SET \
                   granted = least($2, b.tokens + EXTRACT(EPOCH FROM clock_timestamp() - b.updated_at) / $3) >= 1, \
                   tokens = least($2, b.tokens + EXTRACT(EPOCH FROM clock_timestamp() - b.updated_at) / $3) \
                     - CASE WHEN least($2, b.tokens + EXTRACT(EPOCH FROM clock_timestamp() - b.updated_at) / $3) >= 1 \
                       THEN 1 ELSE 0 END, \
                   updated_at = clock_timestamp() \
                 RETURNING granted, tokens"
            ),
            claim: format!(
                "WITH ins AS (INSERT INTO {s}.unique_claims AS c (key, task_id, expires_at) \
                   VALUES ($1, $2, now() + $3 * interval '1 millisecond') \
                   ON CONFLICT (key) DO UPDATE SET task_id = EXCLUDED.task_id, expires_at = EXCLUDED.expires_at \
                   WHERE c.expires_at <= now() RETURNING task_id) \
                 SELECT task_id, true FROM ins \
                 UNION ALL SELECT task_id, false FROM {s}.unique_claims \
                   WHERE key = $1 AND expires_at > now() AND NOT EXISTS (SELECT 1 FROM ins)"
            ),
            unclaim: format!("DELETE FROM {s}.unique_claims WHERE key = $1"),
        };
        PgStores { store, sql: Arc::new(sql) }
    }

    /// The store these run on.
    pub fn store(&self) -> &PgStore {
        &self.store
    }
}

type RevokeRow = (uuid::Uuid, bool, String, String);

fn revocation((id, terminate, reason, at): RevokeRow) -> Result<Revocation> {
    let at = DateTime::parse_from_rfc3339(&at)
        .map_err(|e| stem::Error::backend(format!("stored revoke time `{at}` is unreadable: {e}")))?
        .with_timezone(&Utc);
    Ok(Revocation { task_id: TaskId(id), terminate, reason, at })
}

impl LockStore for PgStores {
    fn acquire<'a>(&'a self, key: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let r = sqlx::query(&self.sql.acquire)
                .bind(key)
                .bind(owner)
                .bind(millis(ttl))
                .execute(self.store.pool())
                .await
                .map_err(backend_err)?;
            Ok(r.rows_affected() > 0)
        })
    }

    fn renew<'a>(&'a self, key: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let r = sqlx::query(&self.sql.renew)
                .bind(key)
                .bind(owner)
                .bind(millis(ttl))
                .execute(self.store.pool())
                .await
                .map_err(backend_err)?;
            Ok(r.rows_affected() > 0)
        })
    }

    fn release<'a>(&'a self, key: &'a str, owner: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let r = sqlx::query(&self.sql.release)
                .bind(key)
                .bind(owner)
                .execute(self.store.pool())
                .await
                .map_err(backend_err)?;
            Ok(r.rows_affected() > 0)
        })
    }

    fn owner<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            sqlx::query_scalar(&self.sql.owner)
                .bind(key)
                .fetch_optional(self.store.pool())
                .await
                .map_err(backend_err)
        })
    }
}

impl RevokeStore for PgStores {
    fn revoke(&self, revocation: Revocation, ttl: Duration) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            sqlx::query(&self.sql.revoke)
                .bind(revocation.task_id.0)
                .bind(revocation.terminate)
                .bind(&revocation.reason)
                .bind(revocation.at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
                .bind(millis(ttl))
                .execute(self.store.pool())
                .await
                .map_err(backend_err)?;
            Ok(())
        })
    }

    fn get(&self, id: TaskId) -> BoxFuture<'_, Result<Option<Revocation>>> {
        Box::pin(async move {
            let row: Option<RevokeRow> = sqlx::query_as(&self.sql.revoke_get)
                .bind(id.0)
                .fetch_optional(self.store.pool())
                .await
                .map_err(backend_err)?;
            row.map(revocation).transpose()
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Revocation>>> {
        Box::pin(async move {
            let rows: Vec<RevokeRow> = sqlx::query_as(&self.sql.revoke_list)
                .fetch_all(self.store.pool())
                .await
                .map_err(backend_err)?;
            let mut out = rows.into_iter().map(revocation).collect::<Result<Vec<_>>>()?;
            out.sort_by_key(|r| r.at);
            Ok(out)
        })
    }
}

impl RateLimiter for PgStores {
    fn acquire<'a>(&'a self, key: &'a str, limit: RateLimit) -> BoxFuture<'a, Result<Option<Duration>>> {
        Box::pin(async move {
            let capacity = f64::from(limit.count.max(1));
            let per_token = limit.per.as_secs_f64() / capacity;
            let (granted, tokens): (bool, f64) = sqlx::query_as(&self.sql.rate)
                .bind(key)
                .bind(capacity)
                .bind(per_token)
                .fetch_one(self.store.pool())
                .await
                .map_err(backend_err)?;
            if granted {
                Ok(None)
            } else {
                Ok(Some(Duration::from_secs_f64(((1.0 - tokens) * per_token).max(0.001))))
            }
        })
    }
}

impl UniqueStore for PgStores {
    fn claim<'a>(&'a self, key: &'a str, id: TaskId, ttl: Duration) -> BoxFuture<'a, Result<Option<TaskId>>> {
        Box::pin(async move {
            // A claim committed by someone else after this statement's snapshot is seen by
            // ON CONFLICT but not by the SELECT: try again, it is visible next time.
            for _ in 0..5 {
                let row: Option<(uuid::Uuid, bool)> = sqlx::query_as(&self.sql.claim)
                    .bind(key)
                    .bind(id.0)
                    .bind(millis(ttl))
                    .fetch_optional(self.store.pool())
                    .await
                    .map_err(backend_err)?;
                match row {
                    Some((_, true)) => return Ok(None),
                    Some((existing, false)) => return Ok(Some(TaskId(existing))),
                    None => tokio::task::yield_now().await,
                }
            }
            Err(stem::Error::backend(format!("unique claim of `{key}` kept racing; try again")))
        })
    }

    fn release<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            sqlx::query(&self.sql.unclaim).bind(key).execute(self.store.pool()).await.map_err(backend_err)?;
            Ok(())
        })
    }
}
