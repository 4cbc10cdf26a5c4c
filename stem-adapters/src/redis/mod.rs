//! Redis adapters: [`RedisBroker`] (streams, consumer groups, leases, delays, priorities, DLQ,
//! broadcast) and [`RedisBackend`] (status records with TTL, pub/sub waiting, Lua counters).
//!
//! Both run on a [`RedisConnection`]: one auto-reconnecting multiplexed connection for
//! commands and scripts, plus a small pool of dedicated connections for blocking reads, so a
//! consumer blocked on an empty queue never stalls anybody else's commands. Every state
//! change is atomic and costs one round trip per batch: a Lua script (loaded with
//! `include_str!`, run with `EVALSHA`) where it must read before it writes, plain commands in
//! a pipeline or `MULTI` where they need not. See `docs/redis.md` for keys, scripts and
//! guarantees.

mod backend;
mod broker;
mod groups;
pub mod keys;
mod scripts;
mod stores;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, ProtocolVersion};

pub use backend::RedisBackend;
pub use broker::RedisBroker;
pub use keys::Keys;
pub use stores::RedisStores;

use crate::url::{AdapterUrl, Scheme};

/// Connection settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RedisOptions {
    /// Give up connecting after this long (default 5 s).
    pub connect_timeout: Duration,
    /// Fail a command whose answer takes longer (default 10 s).
    pub response_timeout: Duration,
    /// Idle blocking connections kept for reuse (default 16).
    pub blocking_pool: usize,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(10),
            blocking_pool: 16,
        }
    }
}

impl RedisOptions {
    /// Set [`RedisOptions::connect_timeout`].
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Set [`RedisOptions::response_timeout`].
    pub fn response_timeout(mut self, d: Duration) -> Self {
        self.response_timeout = d;
        self
    }
}

/// A handle to one Redis server, shared by brokers and backends (clones are cheap and share
/// the connections).
#[derive(Clone)]
pub struct RedisConnection {
    inner: Arc<ConnInner>,
}

struct ConnInner {
    client: Client,
    /// Commands and scripts; reconnects by itself.
    manager: ConnectionManager,
    /// Idle connections for blocking reads (XREAD/XREADGROUP BLOCK).
    idle: Mutex<Vec<MultiplexedConnection>>,
    masked: String,
    options: RedisOptions,
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnection").field("url", &self.inner.masked).finish_non_exhaustive()
    }
}

fn unreachable(masked: &str, why: impl std::fmt::Display) -> stem::Error {
    stem::Error::broker(format!("cannot connect to Redis at `{masked}`: {why}"))
}

impl RedisConnection {
    /// Connect to the server named by `url` (`redis://` or `rediss://`), failing within
    /// `options.connect_timeout` when it does not answer.
    pub async fn connect(url: &AdapterUrl, options: RedisOptions) -> Result<Self, stem::Error> {
        let masked = url.masked().to_owned();
        if !matches!(url.scheme, Scheme::Redis | Scheme::Rediss) {
            return Err(stem::Error::Config(format!("`{masked}` is not a redis:// or rediss:// URL")));
        }
        if url.scheme == Scheme::Rediss {
            // rustls needs a process-wide crypto provider; keep one that is already installed.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let info = url
            .driver_url()
            .into_connection_info()
            .map_err(|e| stem::Error::Config(format!("invalid Redis URL `{masked}`: {e}")))?;
        let client = Client::open(info).map_err(|e| unreachable(&masked, e))?;
        let timeout = options.connect_timeout;
        let connect = async {
            // One plain connection first: it proves the server answers (PING) without the
            // manager's reconnect retries, and becomes the first blocking connection.
            let mut probe = client
                .get_multiplexed_async_connection_with_config(&blocking_config(timeout))
                .await
                .map_err(|e| unreachable(&masked, e))?;
            redis::cmd("PING").query_async::<()>(&mut probe).await.map_err(|e| unreachable(&masked, e))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(options.response_timeout))
                .set_number_of_retries(3)
                .set_max_delay(Duration::from_secs(2))
                .set_pipeline_buffer_size(1024);
            let manager = client
                .get_connection_manager_with_config(config)
                .await
                .map_err(|e| unreachable(&masked, e))?;
            Ok::<_, stem::Error>((probe, manager))
        };
        let (probe, manager) = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| unreachable(&masked, format!("no answer within {timeout:?}")))??;
        Ok(RedisConnection {
            inner: Arc::new(ConnInner { client, manager, idle: Mutex::new(vec![probe]), masked, options }),
        })
    }

    /// The URL, password masked.
    pub fn masked_url(&self) -> &str {
        &self.inner.masked
    }

    /// Whether `other` is a clone of this handle (same server, same connections).
    pub(crate) fn same_as(&self, other: &RedisConnection) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The shared command connection.
    pub(crate) fn commands(&self) -> ConnectionManager {
        self.inner.manager.clone()
    }

    /// A connection for one blocking command; give it back with [`Blocking::release`].
    pub(crate) async fn blocking(&self) -> redis::RedisResult<Blocking> {
        let pooled = self.inner.idle.lock().pop();
        let conn = match pooled {
            Some(c) => c,
            None => {
                self.inner
                    .client
                    .get_multiplexed_async_connection_with_config(&blocking_config(
                        self.inner.options.connect_timeout,
                    ))
                    .await?
            }
        };
        Ok(Blocking { conn, home: Arc::clone(&self.inner) })
    }

    /// A RESP3 connection for pub/sub that reconnects and resubscribes by itself; pushes
    /// (messages, and `Disconnection` when the link drops) go to `pushes`.
    pub(crate) async fn pubsub(
        &self,
        pushes: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
    ) -> redis::RedisResult<ConnectionManager> {
        let info = self.inner.client.get_connection_info().clone();
        let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        let client = Client::open(info.set_redis_settings(settings))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.inner.options.connect_timeout))
            .set_response_timeout(Some(self.inner.options.response_timeout))
            .set_max_delay(Duration::from_secs(2))
            .set_push_sender(pushes)
            .set_automatic_resubscription();
        client.get_connection_manager_with_config(config).await
    }
}

fn blocking_config(connect_timeout: Duration) -> AsyncConnectionConfig {
    // No response timeout: blocking reads wait on the server; callers bound them themselves.
    AsyncConnectionConfig::new().set_connection_timeout(Some(connect_timeout)).set_response_timeout(None)
}

/// A dedicated connection for one blocking command. Dropped (closed) unless released, so a
/// connection whose command was cancelled mid-flight is never reused.
pub(crate) struct Blocking {
    pub(crate) conn: MultiplexedConnection,
    home: Arc<ConnInner>,
}

impl Blocking {
    /// Return the connection to the pool.
    pub(crate) fn release(self) {
        let mut idle = self.home.idle.lock();
        if idle.len() < self.home.options.blocking_pool {
            idle.push(self.conn);
        }
    }
}

/// Open a broker and a backend sharing one connection.
/// `items` grouped by `key` (items without one are left out), groups in order of first
/// appearance. A batch spans few streams or slot hashes, so a linear search beats hashing.
pub(crate) fn grouped<T, K: PartialEq>(
    items: impl IntoIterator<Item = T>,
    mut key: impl FnMut(&T) -> Option<K>,
) -> Vec<(K, Vec<T>)> {
    let mut out: Vec<(K, Vec<T>)> = Vec::new();
    for item in items {
        let Some(k) = key(&item) else { continue };
        match out.iter_mut().find(|(g, _)| *g == k) {
            Some((_, members)) => members.push(item),
            None => out.push((k, vec![item])),
        }
    }
    out
}

pub(crate) async fn connect(url: &AdapterUrl) -> Result<crate::Adapters, stem::Error> {
    let conn = RedisConnection::connect(url, RedisOptions::default()).await?;
    Ok(crate::Adapters {
        broker: Arc::new(RedisBroker::new(conn.clone(), &url.namespace)),
        backend: Arc::new(RedisBackend::new(conn, &url.namespace, stem::backend::DEFAULT_RESULT_TTL)),
    })
}

#[cfg(test)]
mod tests {
    use super::grouped;

    #[test]
    fn groups_keep_first_appearance_order_and_skip_items_without_a_key() {
        let items = [("a", 1), ("b", 2), ("-", 3), ("a", 4), ("c", 5), ("b", 6)];
        let groups = grouped(items, |(k, _)| (*k != "-").then_some(*k));
        let shape: Vec<(&str, Vec<i32>)> = groups
            .into_iter()
            .map(|(k, members)| (k, members.into_iter().map(|(_, n)| n).collect()))
            .collect();
        assert_eq!(shape, vec![("a", vec![1, 4]), ("b", vec![2, 6]), ("c", vec![5])]);
    }
}
