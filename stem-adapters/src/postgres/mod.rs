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

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres};
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
    /// Connections kept between single statements of the frequent paths (see [`Hot`]).
    hot: parking_lot::Mutex<Vec<(PoolConnection<Postgres>, std::time::Instant)>>,
    /// Whether the task giving idle kept connections back to the pool runs.
    hot_sweeper: std::sync::atomic::AtomicBool,
}

/// Connections opened and warmed when a store connects (see [`PgStore::warm_up`]).
const WARM_CONNECTIONS: usize = 4;
/// At most this many connections stay checked out between statements, per store.
const HOT_MAX: usize = 2;
/// A kept connection unused for this long goes back to the pool instead.
const HOT_IDLE: Duration = Duration::from_secs(1);
/// A pooled connection idle for longer than this is pinged before use (see `connect`).
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// A connection for one statement of a frequent path (claims, combined writes, counts,
/// status reads and writes).
///
/// sqlx pings every connection given back to its pool (one more round trip for the client
/// and the server per statement). After a successful statement, [`Hot::finish`] keeps the
/// connection for the next statement instead: up to two per store, and a background task
/// gives back any kept for over a second, so an idle store holds no pool slot. A failed or
/// abandoned statement's connection goes back to the pool as usual, where sqlx checks it,
/// and the kept ones are given back too (after a server restart they would all be broken).
pub(crate) struct Hot<'a> {
    store: &'a PgStore,
    conn: PoolConnection<Postgres>,
}

impl Hot<'_> {
    /// The connection, to run one statement on.
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// Keep the connection after a success; give it (and the kept ones) back after an error.
    pub(crate) fn finish<T>(self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        let mut hot = self.store.inner.hot.lock();
        if result.is_err() {
            hot.clear();
        } else if hot.len() < HOT_MAX {
            hot.push((self.conn, std::time::Instant::now()));
        }
        result
    }
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
    /// masked) when the server does not answer or refuses the connection (its reason, such as
    /// an unknown role or database, included).
    pub async fn connect(url: &str, options: PgOptions) -> Result<Self, stem::Error> {
        let masked = crate::url::mask(url);
        let (driver_url, namespace) = split_namespace(url)?;
        let connect_options: PgConnectOptions = driver_url
            .parse()
            .map_err(|e| stem::Error::Config(format!("invalid Postgres URL `{masked}`: {e}")))?;
        // One direct connection first: the pool would keep retrying a refused connection
        // until its acquire timeout and then report only that it timed out, where a direct
        // attempt says why (refused, unknown host, role or database rejected by the server).
        let timeout = options.connect_timeout;
        let probe = tokio::time::timeout(timeout, PgConnection::connect_with(&connect_options))
            .await
            .map_err(|_| unreachable(&masked, format!("no answer within {timeout:?}")))?
            .map_err(|e| unreachable(&masked, e))?;
        let _ = probe.close().await;
        // A ping before every checkout would cost every statement a second round trip: only
        // connections idle for over a second are checked (one that died meanwhile, e.g. in a
        // server restart, is discarded and replaced before anybody uses it).
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .min_connections(0)
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for > PING_AFTER_IDLE {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .acquire_timeout(options.connect_timeout.max(Duration::from_secs(10)))
            .connect_lazy_with(connect_options);
        let store = Self::with_pool(pool, &namespace, options, masked).await?;
        store.warm_up().await;
        Ok(store)
    }

    /// Open the connections a worker and a producer use at once ([`WARM_CONNECTIONS`]) and
    /// have each load what its first statements need: the namespace's tables and indexes into
    /// its catalog caches and the `jobs` count triggers compiled, by statements that read and
    /// write nothing. A new server process pays this on its first statement against the
    /// namespace: tens of milliseconds, and hundreds when the catalogs (large in a database
    /// holding many namespaces) are no longer in memory, e.g. after a big build evicted them.
    /// Paid here, it no longer lands on the first tasks. A failure only logs: the pool opens
    /// connections as needed anyway.
    async fn warm_up(&self) {
        let n = usize::try_from(self.inner.options.max_connections).unwrap_or(1).min(WARM_CONNECTIONS);
        let s = &self.inner.schema;
        let sql: Arc<[String]> = Arc::from([
            format!(
                "SELECT 1 FROM {s}.jobs, {s}.statuses, {s}.queue_counts, {s}.workers, {s}.dead_letters LIMIT 0"
            ),
            format!("DELETE FROM {s}.jobs WHERE false"),
            format!("INSERT INTO {s}.jobs (queue, payload) SELECT '', '' WHERE false"),
        ]);
        // Each task keeps its connection until every one is warm: n distinct connections.
        let tasks: Vec<_> =
            (0..n).map(|_| tokio::spawn(warm_one(self.inner.pool.clone(), Arc::clone(&sql)))).collect();
        let mut warmed = Vec::with_capacity(n);
        for task in tasks {
            warmed.push(task.await.unwrap_or(Err(sqlx::Error::PoolClosed)));
        }
        if let Some(Err(e)) = warmed.into_iter().find(Result::is_err) {
            tracing::warn!(error = %e, namespace = %self.inner.namespace, "warming up Postgres connections failed");
        }
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
                hot: parking_lot::Mutex::new(Vec::new()),
                hot_sweeper: std::sync::atomic::AtomicBool::new(false),
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

    /// A connection for one statement of a frequent path: a kept one if there is one (see
    /// [`Hot`]), else one from the pool.
    pub(crate) async fn hot(&self) -> Result<Hot<'_>, sqlx::Error> {
        if !self.inner.hot_sweeper.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tokio::spawn(sweep_hot(Arc::downgrade(&self.inner)));
        }
        loop {
            let kept = self.inner.hot.lock().pop();
            match kept {
                Some((conn, at)) if at.elapsed() < HOT_IDLE => return Ok(Hot { store: self, conn }),
                // Idle too long: back to the pool, which checks it.
                Some((conn, _)) => drop(conn),
                None => break,
            }
        }
        let conn = self.inner.pool.acquire().await?;
        Ok(Hot { store: self, conn })
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

/// One connection of [`PgStore::warm_up`], returned warm (and held until the caller drops it).
async fn warm_one(pool: PgPool, sql: Arc<[String]>) -> Result<PoolConnection<Postgres>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    for statement in sql.iter() {
        sqlx::query(statement).execute(&mut *conn).await?;
    }
    Ok(conn)
}

/// Every [`HOT_IDLE`], give the connections kept longer than that back to the pool; ends
/// with the store.
async fn sweep_hot(store: std::sync::Weak<StoreInner>) {
    loop {
        tokio::time::sleep(HOT_IDLE).await;
        let Some(inner) = store.upgrade() else { return };
        let stale: Vec<_> = {
            let mut hot = inner.hot.lock();
            let (keep, stale) = hot.drain(..).partition(|(_, at)| at.elapsed() < HOT_IDLE);
            *hot = keep;
            stale
        };
        drop(stale);
    }
}

fn db_err(e: sqlx::Error) -> stem::Error {
    match e {
        sqlx::Error::PoolTimedOut => stem::Error::broker(NO_CONNECTION),
        e => stem::Error::broker(e),
    }
}

fn backend_err(e: sqlx::Error) -> stem::Error {
    match e {
        sqlx::Error::PoolTimedOut => stem::Error::backend(NO_CONNECTION),
        e => stem::Error::backend(e),
    }
}

/// What a pool timeout means here: the pool retries a refused connection until it gives up.
const NO_CONNECTION: &str =
    "no Postgres connection within the pool's acquire timeout (server unreachable, or every connection busy)";

/// Open a broker and a backend on one pool (`postgres://` / `postgresql://`).
pub(crate) async fn connect(url: &str) -> Result<crate::Adapters, stem::Error> {
    let store = PgStore::connect(url, PgOptions::default()).await?;
    // Broker and backend both wait on the LISTEN connection (consumers for jobs, `wait` for
    // results): open it now rather than in the first task's round trip.
    store.listening().await;
    Ok(crate::Adapters {
        broker: Arc::new(PgBroker::new(store.clone())),
        backend: Arc::new(PgBackend::new(store, stem::backend::DEFAULT_RESULT_TTL)),
    })
}
