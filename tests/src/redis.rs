//! The Redis adapters under the contract suite.
//!
//! The server comes from `STEM_TEST_REDIS_URL` (default `redis://127.0.0.1:6379/0`). Each
//! namespace a check asks for becomes the key prefix, so checks run in parallel on one
//! database. Tests never skip silently: when Redis does not answer they fail with a message
//! saying how to start it.

use std::sync::Arc;
use std::time::Duration;

use stem::backend::ResultBackend;
use stem::broker::{BoxFuture, Broker};
use stem_adapters::redis::{RedisBackend, RedisBroker, RedisConnection, RedisOptions};
use tokio::sync::OnceCell;

use crate::Harness;

/// Default server for the Redis checks.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379/0";

/// Opens Redis brokers and backends; one connection per harness, shared by its handles.
pub struct RedisHarness {
    url: String,
    conn: OnceCell<RedisConnection>,
}

impl Default for RedisHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl RedisHarness {
    pub fn new() -> Self {
        let url = std::env::var("STEM_TEST_REDIS_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
        RedisHarness { url, conn: OnceCell::new() }
    }

    /// The shared connection (connects on first use; panics with a clear message when the
    /// server does not answer).
    pub async fn connection(&self) -> RedisConnection {
        self.conn
            .get_or_init(|| async {
                let parsed = stem_adapters::url::parse(&self.url)
                    .unwrap_or_else(|e| panic!("STEM_TEST_REDIS_URL is not usable: {e}"));
                let options = RedisOptions::default().connect_timeout(Duration::from_secs(3));
                match RedisConnection::connect(&parsed, options).await {
                    Ok(c) => c,
                    Err(e) => {
                        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
                        panic!(
                            "Redis contract tests need a Redis server ({e}).{} Start one \
                             (e.g. `redis-server --save '' --daemonize yes`) or point \
                             STEM_TEST_REDIS_URL at one.",
                            if ci {
                                " CI=true: the test script must start Redis before the tests."
                            } else {
                                ""
                            }
                        )
                    }
                }
            })
            .await
            .clone()
    }
}

impl Harness for RedisHarness {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn broker(&self, namespace: &str) -> BoxFuture<'_, Arc<dyn Broker>> {
        let namespace = namespace.to_owned();
        Box::pin(
            async move { Arc::new(RedisBroker::new(self.connection().await, &namespace)) as Arc<dyn Broker> },
        )
    }

    fn backend(&self, namespace: &str, ttl: Duration) -> BoxFuture<'_, Arc<dyn ResultBackend>> {
        let namespace = namespace.to_owned();
        Box::pin(async move {
            Arc::new(RedisBackend::new(self.connection().await, &namespace, ttl)) as Arc<dyn ResultBackend>
        })
    }
}
