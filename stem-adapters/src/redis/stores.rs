//! Coordination stores on Redis, shared by every worker and producer of a namespace: locks,
//! persistent revokes, a global rate limiter and unique-task claims. Each operation is one
//! atomic command or Lua script.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{ns}:lock:{name}` | string, TTL | lock owner |
//! | `{ns}:revokes`, `{ns}:revokes:exp` | hash, sorted set | revokes (JSON) and their expiry |
//! | `{ns}:rate:{task}` | hash, TTL | token bucket (`tokens`, `ts`) on the server clock |
//! | `{ns}:unique:{key}` | string, TTL | id of the task holding a unique claim |

use std::sync::LazyLock;
use std::time::Duration;

use redis::{AsyncCommands, Script};
use stem::broker::BoxFuture;
use stem::store::{LockStore, RateLimiter, Revocation, RevokeStore, UniqueStore};
use stem::{RateLimit, TaskId};

use super::RedisConnection;

macro_rules! store_script {
    ($name:ident, $file:literal) => {
        static $name: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!($file)));
    };
}

store_script!(LOCK_ACQUIRE, "scripts/stores/lock_acquire.lua");
store_script!(LOCK_RENEW, "scripts/stores/lock_renew.lua");
store_script!(LOCK_RELEASE, "scripts/stores/lock_release.lua");
store_script!(REVOKE_GET, "scripts/stores/revoke_get.lua");
store_script!(REVOKE_LIST, "scripts/stores/revoke_list.lua");
store_script!(RATE_LIMIT, "scripts/stores/rate_limit.lua");
store_script!(UNIQUE_CLAIM, "scripts/stores/unique_claim.lua");

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn err(e: impl Into<stem::error::BoxError>) -> stem::Error {
    stem::Error::backend(e)
}

/// The four stores of one namespace, sharing a connection.
#[derive(Clone, Debug)]
pub struct RedisStores {
    conn: RedisConnection,
    ns: String,
}

impl RedisStores {
    /// Stores under `namespace` on `conn`.
    pub fn new(conn: RedisConnection, namespace: &str) -> Self {
        RedisStores { conn, ns: namespace.to_owned() }
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}:{name}", self.ns)
    }
}

impl LockStore for RedisStores {
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, stem::Result<bool>> {
        Box::pin(async move {
            let mut c = self.conn.commands();
            let took: i64 = LOCK_ACQUIRE
                .key(self.key("lock", key))
                .arg(owner)
                .arg(ms(ttl))
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            Ok(took == 1)
        })
    }

    fn renew<'a>(&'a self, key: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, stem::Result<bool>> {
        Box::pin(async move {
            let mut c = self.conn.commands();
            let ok: i64 = LOCK_RENEW
                .key(self.key("lock", key))
                .arg(owner)
                .arg(ms(ttl))
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            Ok(ok == 1)
        })
    }

    fn release<'a>(&'a self, key: &'a str, owner: &'a str) -> BoxFuture<'a, stem::Result<bool>> {
        Box::pin(async move {
            let mut c = self.conn.commands();
            let ok: i64 =
                LOCK_RELEASE.key(self.key("lock", key)).arg(owner).invoke_async(&mut c).await.map_err(err)?;
            Ok(ok == 1)
        })
    }

    fn owner<'a>(&'a self, key: &'a str) -> BoxFuture<'a, stem::Result<Option<String>>> {
        Box::pin(async move {
            let mut c = self.conn.commands();
            c.get(self.key("lock", key)).await.map_err(err)
        })
    }
}

impl RevokeStore for RedisStores {
    fn revoke(&self, revocation: Revocation, ttl: Duration) -> BoxFuture<'_, stem::Result<()>> {
        Box::pin(async move {
            let json = serde_json::to_string(&revocation)?;
            let id = revocation.task_id.to_string();
            let expires = chrono::Utc::now()
                .timestamp_millis()
                .saturating_add(i64::try_from(ms(ttl)).unwrap_or(i64::MAX));
            let mut c = self.conn.commands();
            redis::pipe()
                .atomic()
                .hset(format!("{}:revokes", self.ns), &id, json)
                .ignore()
                .zadd(format!("{}:revokes:exp", self.ns), &id, expires)
                .ignore()
                .query_async::<()>(&mut c)
                .await
                .map_err(err)
        })
    }

    fn get(&self, id: TaskId) -> BoxFuture<'_, stem::Result<Option<Revocation>>> {
        Box::pin(async move {
            let mut c = self.conn.commands();
            let json: Option<String> = REVOKE_GET
                .key(format!("{}:revokes", self.ns))
                .key(format!("{}:revokes:exp", self.ns))
                .arg(id.to_string())
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            json.map(|j| serde_json::from_str(&j).map_err(stem::Error::from)).transpose()
        })
    }

    fn list(&self) -> BoxFuture<'_, stem::Result<Vec<Revocation>>> {
        Box::pin(async move {
            let mut c = self.conn.commands();
            let all: Vec<String> = REVOKE_LIST
                .key(format!("{}:revokes", self.ns))
                .key(format!("{}:revokes:exp", self.ns))
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            let mut out =
                all.iter().map(|j| serde_json::from_str(j)).collect::<Result<Vec<Revocation>, _>>()?;
            out.sort_by_key(|r| r.at);
            Ok(out)
        })
    }
}

impl RateLimiter for RedisStores {
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        limit: RateLimit,
    ) -> BoxFuture<'a, stem::Result<Option<Duration>>> {
        Box::pin(async move {
            let per_token_ms = limit.per.as_secs_f64() * 1000.0 / f64::from(limit.count.max(1));
            let mut c = self.conn.commands();
            let wait_ms: u64 = RATE_LIMIT
                .key(self.key("rate", key))
                .arg(limit.count.max(1))
                .arg(per_token_ms)
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            Ok((wait_ms > 0).then(|| Duration::from_millis(wait_ms)))
        })
    }
}

impl UniqueStore for RedisStores {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        id: TaskId,
        ttl: Duration,
    ) -> BoxFuture<'a, stem::Result<Option<TaskId>>> {
        Box::pin(async move {
            let mut c = self.conn.commands();
            let holder: Option<String> = UNIQUE_CLAIM
                .key(self.key("unique", key))
                .arg(id.to_string())
                .arg(ms(ttl))
                .invoke_async(&mut c)
                .await
                .map_err(err)?;
            holder
                .map(|h| {
                    h.parse::<TaskId>()
                        .map_err(|e| err(format!("unique claim holds a bad task id `{h}`: {e}")))
                })
                .transpose()
        })
    }

    fn release<'a>(&'a self, key: &'a str) -> BoxFuture<'a, stem::Result<()>> {
        Box::pin(async move {
            let mut c = self.conn.commands();
            c.del(self.key("unique", key)).await.map_err(err)
        })
    }
}
