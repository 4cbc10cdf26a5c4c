//! Coordination stores on SQLite: locks, revokes, a token-bucket rate limiter and unique
//! claims, each one statement on the writer connection.

use std::time::Duration;

use chrono::{DateTime, Utc};
use stem::TaskId;
use stem::broker::BoxFuture;
use stem::error::Result;
use stem::store::{LockStore, RateLimiter, Revocation, RevokeStore, UniqueStore};
use stem::task::RateLimit;

use super::{SqliteStore, backend_err, now_ms};
use crate::sql_shared::millis;

const ACQUIRE: &str = "INSERT INTO locks (key, owner, expires_at) VALUES (?1, ?2, ?3 + ?4) \
     ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at \
     WHERE locks.expires_at <= ?3 OR locks.owner = excluded.owner";
const RENEW: &str = "UPDATE locks SET expires_at = ?3 + ?4 WHERE key = ?1 AND owner = ?2 AND expires_at > ?3";
const RELEASE: &str = "DELETE FROM locks WHERE key = ?1 AND owner = ?2 AND expires_at > ?3";
const OWNER: &str = "SELECT owner FROM locks WHERE key = ?1 AND expires_at > ?2";
const REVOKE: &str = "INSERT INTO revokes (task_id, terminate, reason, revoked_at, expires_at) \
     VALUES (?1, ?2, ?3, ?4, ?5) \
     ON CONFLICT (task_id) DO UPDATE SET terminate = excluded.terminate, reason = excluded.reason, \
       revoked_at = excluded.revoked_at, expires_at = excluded.expires_at";
const REVOKE_GET: &str =
    "SELECT task_id, terminate, reason, revoked_at FROM revokes WHERE task_id = ?1 AND expires_at > ?2";
const REVOKE_LIST: &str = "SELECT task_id, terminate, reason, revoked_at FROM revokes WHERE expires_at > ?1";
const RATE: &str = "INSERT INTO rate_buckets (key, tokens, granted, updated_at) VALUES (?1, ?2 - 1, 1, ?4) \
     ON CONFLICT (key) DO UPDATE SET \
       granted = min(?2, tokens + (?4 - updated_at) / 1000.0 / ?3) >= 1, \
       tokens = min(?2, tokens + (?4 - updated_at) / 1000.0 / ?3) \
         - (CASE WHEN min(?2, tokens + (?4 - updated_at) / 1000.0 / ?3) >= 1 THEN 1 ELSE 0 END), \
       updated_at = ?4 \
     RETURNING granted, tokens";
const CLAIM: &str = "INSERT INTO unique_claims (key, task_id, expires_at) VALUES (?1, ?2, ?3 + ?4) \
     ON CONFLICT (key) DO UPDATE SET task_id = excluded.task_id, expires_at = excluded.expires_at \
     WHERE unique_claims.expires_at <= ?3";
const CLAIM_HOLDER: &str = "SELECT task_id FROM unique_claims WHERE key = ?1 AND expires_at > ?2";
const UNCLAIM: &str = "DELETE FROM unique_claims WHERE key = ?1";

/// [`LockStore`], [`RevokeStore`], [`RateLimiter`] and [`UniqueStore`] on a SQLite
/// database. Writes go through the store's single writer, so each operation is atomic;
/// across processes SQLite's write lock serialises them.
#[derive(Clone, Debug)]
pub struct SqliteStores {
    store: SqliteStore,
}

impl SqliteStores {
    /// The stores of `store`'s database.
    pub fn new(store: SqliteStore) -> Self {
        SqliteStores { store }
    }

    /// The store these run on.
    pub fn store(&self) -> &SqliteStore {
        &self.store
    }
}

type RevokeRow = (String, bool, String, String);

fn revocation((id, terminate, reason, at): RevokeRow) -> Result<Revocation> {
    let task_id = id.parse().map_err(|e| stem::Error::backend(format!("stored task id `{id}`: {e}")))?;
    let at = DateTime::parse_from_rfc3339(&at)
        .map_err(|e| stem::Error::backend(format!("stored revoke time `{at}` is unreadable: {e}")))?
        .with_timezone(&Utc);
    Ok(Revocation { task_id, terminate, reason, at })
}

impl LockStore for SqliteStores {
    fn acquire<'a>(&'a self, key: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let r = sqlx::query(ACQUIRE)
                .bind(key)
                .bind(owner)
                .bind(now_ms())
                .bind(millis(ttl))
                .execute(self.store.writer())
                .await
                .map_err(backend_err)?;
            Ok(r.rows_affected() > 0)
        })
    }

    fn renew<'a>(&'a self, key: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let r = sqlx::query(RENEW)
                .bind(key)
                .bind(owner)
                .bind(now_ms())
                .bind(millis(ttl))
                .execute(self.store.writer())
                .await
                .map_err(backend_err)?;
            Ok(r.rows_affected() > 0)
        })
    }

    fn release<'a>(&'a self, key: &'a str, owner: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let r = sqlx::query(RELEASE)
                .bind(key)
                .bind(owner)
                .bind(now_ms())
                .execute(self.store.writer())
                .await
                .map_err(backend_err)?;
            Ok(r.rows_affected() > 0)
        })
    }

    fn owner<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            sqlx::query_scalar(OWNER)
                .bind(key)
                .bind(now_ms())
                .fetch_optional(self.store.reader())
                .await
                .map_err(backend_err)
        })
    }
}

impl RevokeStore for SqliteStores {
    fn revoke(&self, revocation: Revocation, ttl: Duration) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            sqlx::query(REVOKE)
                .bind(revocation.task_id.to_string())
                .bind(revocation.terminate)
                .bind(&revocation.reason)
                .bind(revocation.at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
                .bind(now_ms().saturating_add(millis(ttl)))
                .execute(self.store.writer())
                .await
                .map_err(backend_err)?;
            Ok(())
        })
    }

    fn get(&self, id: TaskId) -> BoxFuture<'_, Result<Option<Revocation>>> {
        Box::pin(async move {
            let row: Option<RevokeRow> = sqlx::query_as(REVOKE_GET)
                .bind(id.to_string())
                .bind(now_ms())
                .fetch_optional(self.store.reader())
                .await
                .map_err(backend_err)?;
            row.map(revocation).transpose()
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Revocation>>> {
        Box::pin(async move {
            let rows: Vec<RevokeRow> = sqlx::query_as(REVOKE_LIST)
                .bind(now_ms())
                .fetch_all(self.store.reader())
                .await
                .map_err(backend_err)?;
            let mut out = rows.into_iter().map(revocation).collect::<Result<Vec<_>>>()?;
            out.sort_by_key(|r| r.at);
            Ok(out)
        })
    }
}

impl RateLimiter for SqliteStores {
    fn acquire<'a>(&'a self, key: &'a str, limit: RateLimit) -> BoxFuture<'a, Result<Option<Duration>>> {
        Box::pin(async move {
            let capacity = f64::from(limit.count.max(1));
            let per_token = limit.per.as_secs_f64() / capacity;
            let (granted, tokens): (bool, f64) = sqlx::query_as(RATE)
                .bind(key)
                .bind(capacity)
                .bind(per_token)
                .bind(now_ms())
                .fetch_one(self.store.writer())
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

impl UniqueStore for SqliteStores {
    fn claim<'a>(&'a self, key: &'a str, id: TaskId, ttl: Duration) -> BoxFuture<'a, Result<Option<TaskId>>> {
        Box::pin(async move {
            for _ in 0..5 {
                let now = now_ms();
                let r = sqlx::query(CLAIM)
                    .bind(key)
                    .bind(id.to_string())
                    .bind(now)
                    .bind(millis(ttl))
                    .execute(self.store.writer())
                    .await
                    .map_err(backend_err)?;
                if r.rows_affected() > 0 {
                    return Ok(None);
                }
                let holder: Option<String> = sqlx::query_scalar(CLAIM_HOLDER)
                    .bind(key)
                    .bind(now)
                    .fetch_optional(self.store.writer())
                    .await
                    .map_err(backend_err)?;
                if let Some(h) = holder {
                    return h
                        .parse()
                        .map(Some)
                        .map_err(|e| stem::Error::backend(format!("stored task id `{h}`: {e}")));
                }
            }
            Err(stem::Error::backend(format!("unique claim of `{key}` kept racing; try again")))
        })
    }

    fn release<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            sqlx::query(UNCLAIM).bind(key).execute(self.store.writer()).await.map_err(backend_err)?;
            Ok(())
        })
    }
}
