//! In-memory stores (one process).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::{LockStore, RateLimiter, Revocation, RevokeStore, UniqueStore};
use crate::broker::BoxFuture;
use crate::envelope::TaskId;
use crate::error::Result;
use crate::task::RateLimit;

/// In-memory [`LockStore`]. Clones share the locks.
#[derive(Clone, Default)]
pub struct MemoryLockStore {
    locks: Arc<Mutex<HashMap<String, (String, Instant)>>>,
}

impl MemoryLockStore {
    /// No locks held.
    pub fn new() -> Self {
        Self::default()
    }
}

impl LockStore for MemoryLockStore {
    fn acquire<'a>(&'a self, key: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut locks = self.locks.lock();
            match locks.get(key) {
                Some((holder, exp)) if *exp > now && holder != owner => Ok(false),
                _ => {
                    locks.insert(key.to_owned(), (owner.to_owned(), now + ttl));
                    Ok(true)
                }
            }
        })
    }

    fn renew<'a>(&'a self, key: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut locks = self.locks.lock();
            match locks.get_mut(key) {
                Some((holder, exp)) if *exp > now && holder == owner => {
                    *exp = now + ttl;
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
    }

    fn release<'a>(&'a self, key: &'a str, owner: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut locks = self.locks.lock();
            match locks.get(key) {
                Some((holder, exp)) if *exp > now && holder == owner => {
                    locks.remove(key);
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
    }

    fn owner<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            let now = Instant::now();
            Ok(self.locks.lock().get(key).filter(|(_, exp)| *exp > now).map(|(o, _)| o.clone()))
        })
    }
}

/// In-memory [`RevokeStore`]. Clones share the revokes.
#[derive(Clone, Default)]
pub struct MemoryRevokeStore {
    revoked: Arc<Mutex<HashMap<TaskId, (Revocation, Instant)>>>,
}

impl MemoryRevokeStore {
    /// Nothing revoked.
    pub fn new() -> Self {
        Self::default()
    }
}

impl RevokeStore for MemoryRevokeStore {
    fn revoke(&self, revocation: Revocation, ttl: Duration) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.revoked.lock().insert(revocation.task_id, (revocation, Instant::now() + ttl));
            Ok(())
        })
    }

    fn get(&self, id: TaskId) -> BoxFuture<'_, Result<Option<Revocation>>> {
        Box::pin(async move {
            let now = Instant::now();
            Ok(self.revoked.lock().get(&id).filter(|(_, exp)| *exp > now).map(|(r, _)| r.clone()))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Revocation>>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut out: Vec<_> =
                self.revoked.lock().values().filter(|(_, exp)| *exp > now).map(|(r, _)| r.clone()).collect();
            out.sort_by_key(|r| r.at);
            Ok(out)
        })
    }
}

/// In-memory token-bucket [`RateLimiter`]. Clones share the buckets.
#[derive(Clone, Default)]
pub struct MemoryRateLimiter {
    buckets: Arc<Mutex<HashMap<String, (f64, Instant)>>>,
}

impl MemoryRateLimiter {
    /// Full buckets.
    pub fn new() -> Self {
        Self::default()
    }
}

impl RateLimiter for MemoryRateLimiter {
    fn acquire<'a>(&'a self, key: &'a str, limit: RateLimit) -> BoxFuture<'a, Result<Option<Duration>>> {
        Box::pin(async move {
            let now = Instant::now();
            let capacity = f64::from(limit.count.max(1));
            let per_token = limit.per.as_secs_f64() / capacity;
            let mut buckets = self.buckets.lock();
            let (tokens, last) = buckets.entry(key.to_owned()).or_insert((capacity, now));
            *tokens = (*tokens + now.duration_since(*last).as_secs_f64() / per_token).min(capacity);
            *last = now;
            if *tokens >= 1.0 {
                *tokens -= 1.0;
                Ok(None)
            } else {
                Ok(Some(Duration::from_secs_f64((1.0 - *tokens) * per_token)))
            }
        })
    }
}

/// In-memory [`UniqueStore`]. Clones share the claims.
#[derive(Clone, Default)]
pub struct MemoryUniqueStore {
    claims: Arc<Mutex<HashMap<String, (TaskId, Instant)>>>,
}

impl MemoryUniqueStore {
    /// No claims.
    pub fn new() -> Self {
        Self::default()
    }
}

impl UniqueStore for MemoryUniqueStore {
    fn claim<'a>(&'a self, key: &'a str, id: TaskId, ttl: Duration) -> BoxFuture<'a, Result<Option<TaskId>>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut claims = self.claims.lock();
            match claims.get(key) {
                Some((existing, exp)) if *exp > now => Ok(Some(*existing)),
                _ => {
                    claims.insert(key.to_owned(), (id, now + ttl));
                    Ok(None)
                }
            }
        })
    }

    fn release<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.claims.lock().remove(key);
            Ok(())
        })
    }
}
