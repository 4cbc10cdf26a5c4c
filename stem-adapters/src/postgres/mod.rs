//! Postgres adapters: [`PgBroker`] (`FOR UPDATE SKIP LOCKED` batch claims, leases fenced by a
//! per-delivery token, LISTEN/NOTIFY wake-ups, delays, priorities, DLQ, broadcast),
//! [`PgBackend`] (status records with TTL, fenced upserts, NOTIFY for waiting, atomic group
//! counters), [`PgStores`] (locks, revokes, rate limiter, unique claims), [`PgSchedules`]
//! (Beat's table) and transactional enqueue ([`enqueue_tx`]).
//!
//! Everything runs on a [`PgStore`]: a connection pool plus one namespace. A namespace is a
//! schema of its own (created by the embedded migrations when the store opens), so two
//! deployments share one database without seeing each other. Every statement names its
//! tables with the schema, so a caller's transaction (see [`enqueue_tx`]) works whatever its
//! `search_path`. See `docs/postgres.md` for tables, statements and guarantees.

mod backend;
mod broker;
mod listener;
mod schedules;
mod stores;
mod tx;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio::sync::OnceCell;

pub use backend::PgBackend;
pub use broker::PgBroker;
pub use schedules::{PgSchedules, ScheduleRow};
pub use stores::PgStores;
pub use tx::enqueue_tx;

use crate::sql_shared::{Hub, split_namespace};
use listener::Listener;

/// The embedded migrations (`stem-adapters/migrations/postgres`), applied per schema.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Connection settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PgOptions {
    /// Give up connecting after this long (default 5 s).
    pub connect_timeout: Duration,
    /// Pool size (default 16).
    pub max_connections: u32,
    /// Apply the embedded migrations when opening (default `true`).
    pub migrate: bool,
    /// How long a consumer with no notification waits before checking again (default
    /// 250 ms): the bound on what a missed notification can cost.
    pub fallback_poll: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            connect_timeout: Duration::from_secs(5),
            max_connections: 16,
            migrate: true,
            fallback_poll: Duration::from_millis(250),
        }
    }
}

impl PgOptions {
    /// Set [`PgOptions::connect_timeout`].
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Set [`PgOptions::migrate`].
    pub fn migrate(mut self, on: bool) -> Self {
        self.migrate = on;
        self
    }

    /// Set [`PgOptions::fallback_poll`].
    pub fn fallback_poll(mut self, d: Duration) -> Self {
        self.fallback_poll = d;
        self
    }

    /// Set [`PgOptions::max_connections`].
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(2);
        self
    }
}

/// A pool and a namespace (schema): what every Postgres adapter runs on. Clones are cheap
/// and share the pool and the notification listener.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    pool: PgPool,
    /// The pool's connection settings as the pool shares them: the same `Arc` for every
    /// clone of one pool, so it tells whether two stores run on the same pool.
    pool_identity: Arc<PgConnectOptions>,
    namespace: String,
    /// `"schema"`, quoted for use in statements.
    schema: String,
    /// NOTIFY channel of the namespace.
    channel: String,
    masked: String,
    options: PgOptions,
    hub: Arc<Hub>,
    listener: OnceCell<Listener>,
    broker_sql: OnceLock<Arc<broker::Sql>>,
    backend_sql: OnceLock<Arc<backend::Sql>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.inner.masked)
            .field("namespace", &self.inner.namespace)
            .finish_non_exhaustive()
    }
}

fn unreachable(masked: &str, why: impl std::fmt::Display) -> stem::Error {
    stem::Error::Config(format!("cannot connect to Postgres at `{masked}`: {why}"))
}

impl PgStore {
    /// Connect to the database named by `url` (`postgres://` or `postgresql://`, optional
    /// `?ns=name`, default namespace `stem`) and apply the migrations to the namespace's
    /// schema. Fails within `options.connect_timeout` with an error naming the URL (password
    /// masked) when the server does not answer.
    pub async fn connect(url: &str, options: PgOptions) -> Result<Self, stem::Error> {
        let masked = crate::url::mask(url);
        let (driver_url, namespace) = split_namespace(url)?;
        let connect_options: PgConnectOptions = driver_url
            .parse()
            .map_err(|e| stem::Error::Config(format!("invalid Postgres URL `{masked}`: {e}")))?;
        // No ping before each checkout: it would cost every statement a second round trip. A
        // connection that died meanwhile (server restart) fails its next statement instead;
        // sqlx then discards it, and the caller's retry gets a fresh one.
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .min_connections(0)
            .test_before_acquire(false)
            .acquire_timeout(options.connect_timeout.max(Duration::from_secs(10)))
            .connect_lazy_with(connect_options);
        let timeout = options.connect_timeout;
        tokio::time::timeout(timeout, pool.acquire())
            .await
            .map_err(|_| unreachable(&masked, format!("no answer within {timeout:?}")))?
            .map_err(|e| unreachable(&masked, e))?;
        Self::with_pool(pool, &namespace, options, masked).await
    }

    /// Use an existing pool (e.g. the application's) for `namespace`, applying the
    /// migrations unless `options.migrate` is off.
    pub async fn from_pool(pool: PgPool, namespace: &str, options: PgOptions) -> Result<Self, stem::Error> {
        let (_, ns) = split_namespace(&format!("postgres://pool?ns={namespace}"))?;
        Self::with_pool(pool, &ns, options, "postgres://(pool)".to_owned()).await
    }

    async fn with_pool(
        pool: PgPool,
        namespace: &str,
        options: PgOptions,
        masked: String,
    ) -> Result<Self, stem::Error> {
        let store = PgStore {
            inner: Arc::new(StoreInner {
                pool_identity: pool.connect_options(),
                pool,
                namespace: namespace.to_owned(),
                schema: format!("\"{namespace}\""),
                channel: format!("stem.{namespace}"),
                masked,
                options,
                hub: Arc::new(Hub::default()),
                listener: OnceCell::new(),
                broker_sql: OnceLock::new(),
                backend_sql: OnceLock::new(),
            }),
        };
        if store.inner.options.migrate {
            store.migrate().await?;
        }
        Ok(store)
    }

    /// Create the namespace's schema and apply the embedded migrations to it (idempotent;
    /// concurrent callers are serialised by an advisory lock).
    pub async fn migrate(&self) -> Result<(), stem::Error> {
        let masked = &self.inner.masked;
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            stem::Error::Config(format!(
                "migrating namespace `{}` at `{masked}` failed ({what}): {e}",
                self.inner.namespace
            ))
        };
        let mut conn = self.inner.pool.acquire().await.map_err(|e| fail("connect", &e))?;
        // The migrations create unqualified tables: point this session at the schema, and
        // close the connection afterwards so the setting never leaks into the pool.
        let result = async {
            sqlx::query("SELECT pg_advisory_lock(8315464034069720423)")
                .execute(&mut *conn)
                .await
                .map_err(|e| fail("lock", &e))?;
            let schema = &self.inner.schema;
            let steps = async {
                sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| fail("create schema", &e))?;
                sqlx::query(&format!("SET search_path TO {schema}"))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| fail("search_path", &e))?;
                MIGRATOR.run_direct(&mut *conn).await.map_err(|e| fail("migrations", &e))
            }
            .await;
            let _ = sqlx::query("SELECT pg_advisory_unlock(8315464034069720423)").execute(&mut *conn).await;
            steps
        }
        .await;
        conn.close_on_drop();
        result
    }

    /// Whether `other` writes to the same place: the same pool (one database) and the same
    /// namespace. Then a broker and a backend on the two stores can share a transaction.
    pub fn same_as(&self, other: &PgStore) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
            || (Arc::ptr_eq(&self.inner.pool_identity, &other.inner.pool_identity)
                && self.inner.namespace == other.inner.namespace)
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The namespace (also the schema name).
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The URL, password masked.
    pub fn masked_url(&self) -> &str {
        &self.inner.masked
    }

    /// `"schema"`, quoted for statements.
    pub(crate) fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The namespace's NOTIFY channel.
    pub(crate) fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// The broker's statements for this schema (built once).
    pub(crate) fn broker_sql(&self) -> Arc<broker::Sql> {
        Arc::clone(self.inner.broker_sql.get_or_init(|| Arc::new(broker::Sql::new(&self.inner.schema))))
    }

    /// The backend's statements for this schema (built once).
    pub(crate) fn backend_sql(&self) -> Arc<backend::Sql> {
        Arc::clone(self.inner.backend_sql.get_or_init(|| Arc::new(backend::Sql::new(&self.inner.schema))))
    }

    pub(crate) fn hub(&self) -> &Arc<Hub> {
        &self.inner.hub
    }

    pub(crate) fn fallback_poll(&self) -> Duration {
        self.inner.options.fallback_poll
    }

    /// Start the LISTEN connection (once) and wait briefly until it listens, so a
    /// notification sent after this returns is not missed. When the server refuses, waiting
    /// falls back to polling every [`PgOptions::fallback_poll`].
    pub(crate) async fn listening(&self) {
        let listener = self
            .inner
            .listener
            .get_or_init(|| async {
                Listener::spawn(
                    self.inner.pool.clone(),
                    self.inner.channel.clone(),
                    Arc::clone(&self.inner.hub),
                )
            })
            .await;
        listener.ready(Duration::from_secs(2)).await;
    }
}

fn db_err(e: sqlx::Error) -> stem::Error {
    stem::Error::broker(e)
}

fn backend_err(e: sqlx::Error) -> stem::Error {
    stem::Error::backend(e)
}

/// Open a broker and a backend on one pool (`postgres://` / `postgresql://`).
pub(crate) async fn connect(url: &str) -> Result<crate::Adapters, stem::Error> {
    let store = PgStore::connect(url, PgOptions::default()).await?;
    Ok(crate::Adapters {
        broker: Arc::new(PgBroker::new(store.clone())),
        backend: Arc::new(PgBackend::new(store, stem::backend::DEFAULT_RESULT_TTL)),
    })
}
