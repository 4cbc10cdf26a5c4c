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
