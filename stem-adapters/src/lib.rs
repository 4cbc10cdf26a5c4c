//! # stem-adapters
//!
//! Brokers and result backends for [Stem](stem), chosen at run time by URL:
//!
//! | URL | broker | result backend | feature |
//! |---|---|---|---|
//! | `memory://` | [`stem::MemoryBroker`] | [`stem::MemoryBackend`] | always |
//! | `redis://[user:password@]host[:port][/db][?ns=name]` | `redis::RedisBroker` | `redis::RedisBackend` | `redis` |
//! | `rediss://…` (TLS) | same | same | `redis` |
//!
//! ```no_run
//! # async fn demo() -> Result<(), stem::Error> {
//! let adapters = stem_adapters::connect("redis://127.0.0.1:6379/0?ns=shop").await?;
//! let stem = stem::Stem::new(adapters.broker.clone(), adapters.backend.clone());
//! # let _ = stem; Ok(()) }
//! ```
//!
//! The `ns` query parameter is the namespace (default `stem`): every key starts with it, so
//! two deployments can share one server. Errors and logs show URLs with the password masked
//! ([`url::mask`]).

pub mod url;

#[cfg(feature = "redis")]
pub mod redis;

#[cfg(feature = "postgres")]
pub mod postgres;

#[cfg(feature = "sqlite")]
pub mod sqlite;

#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[path = "postgres/sql_shared.rs"]
mod sql_shared;

#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlite"))]
mod detached;

use std::sync::Arc;

use stem::backend::ResultBackend;
use stem::broker::Broker;

pub use url::{AdapterUrl, Scheme};

/// A broker and a result backend opened from one URL.
#[derive(Clone)]
pub struct Adapters {
    /// Stores and delivers envelopes.
    pub broker: Arc<dyn Broker>,
    /// Keeps task states and results.
    pub backend: Arc<dyn ResultBackend>,
}

impl std::fmt::Debug for Adapters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapters").finish_non_exhaustive()
    }
}

/// Open the broker and result backend named by `url`.
///
/// `memory://` gives fresh in-process adapters; `redis://` and `rediss://` connect (within a
/// few seconds, or fail with an error naming the URL) and need the `redis` feature. Any other
/// URL is an [`stem::Error::Config`] naming it, password masked.
pub async fn connect(url: &str) -> Result<Adapters, stem::Error> {
    // SQL URLs carry their own syntax (paths, `sqlite::memory:`): route them before the
    // key-value URL parser.
    let lower = url.trim().to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        return connect_postgres(url.trim()).await;
    }
    if lower.starts_with("sqlite:") {
        return connect_sqlite(url.trim()).await;
    }
    let parsed = url::parse(url)?;
    match parsed.scheme {
        Scheme::Memory => Ok(Adapters {
            broker: Arc::new(stem::MemoryBroker::new()),
            backend: Arc::new(stem::MemoryBackend::new()),
        }),
        Scheme::Redis | Scheme::Rediss => connect_redis(&parsed).await,
    }
}

#[cfg(feature = "redis")]
async fn connect_redis(url: &AdapterUrl) -> Result<Adapters, stem::Error> {
    redis::connect(url).await
}

#[cfg(not(feature = "redis"))]
async fn connect_redis(url: &AdapterUrl) -> Result<Adapters, stem::Error> {
    Err(stem::Error::Config(format!(
        "`{}` needs the Redis adapter: enable the `redis` feature of stem-adapters",
        url.masked()
    )))
}

#[cfg(feature = "postgres")]
async fn connect_postgres(url: &str) -> Result<Adapters, stem::Error> {
    postgres::connect(url).await
}

#[cfg(not(feature = "postgres"))]
async fn connect_postgres(url: &str) -> Result<Adapters, stem::Error> {
    Err(stem::Error::Config(format!(
        "`{}` needs the Postgres adapter: enable the `postgres` feature of stem-adapters",
        url::mask(url)
    )))
}

#[cfg(feature = "sqlite")]
async fn connect_sqlite(url: &str) -> Result<Adapters, stem::Error> {
    sqlite::connect(url).await
}

#[cfg(not(feature = "sqlite"))]
async fn connect_sqlite(url: &str) -> Result<Adapters, stem::Error> {
    Err(stem::Error::Config(format!(
        "`{}` needs the SQLite adapter: enable the `sqlite` feature of stem-adapters",
        url::mask(url)
    )))
}
