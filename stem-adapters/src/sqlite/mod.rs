//! SQLite adapters: [`SqliteBroker`], [`SqliteBackend`] and [`SqliteStores`], the same SQL
//! model as the Postgres adapters on one database file.
//!
//! A [`SqliteStore`] opens the file in WAL mode with a busy timeout and keeps two pools: a
//! writer pool of exactly one connection (every write goes through it, so writes never
//! contend inside the process) and a small reader pool (WAL lets reads run beside the
//! writer). Opening the same file twice in one process returns the same store, so every
//! handle shares the writer and the wake-ups.
//!
//! Wake-ups: SQLite has no LISTEN/NOTIFY. Within a process, publishes, requeues, broadcasts
//! and terminal status writes wake waiters at once through `tokio::sync::Notify`. Another
//! process writing the same file is noticed by a fallback poll: idle consumers and result
//! waiters re-check every [`SqliteOptions::fallback_poll`] (default 250 ms), and a consumer
//! also wakes at the next due `run_at` or lease deadline. See `docs/sqlite.md`.
//!
//! URLs: `sqlite://path/to/file.db`, `sqlite:relative.db`, `sqlite://file.db?mode=rwc`,
//! `sqlite::memory:` (one connection, nothing survives the process). The file is created if
//! missing. One file is one namespace: `?ns=name` selects a sibling file (`jobs.db?ns=billing`
//! opens `jobs.billing.db`).

mod backend;
mod broker;
mod stores;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

pub use backend::SqliteBackend;
pub use broker::SqliteBroker;
pub use stores::SqliteStores;

use crate::sql_shared::{Hub, split_namespace};

/// The embedded migrations (`stem-adapters/migrations/sqlite`).
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// Stores opened in this process, by file: a second open of the same file shares them.
static OPEN: Mutex<Option<HashMap<PathBuf, Weak<StoreInner>>>> = Mutex::new(None);

/// Settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// How long a write waits for another process's write lock (default 5 s).
    pub busy_timeout: Duration,
    /// Reader connections (default 4).
    pub readers: u32,
    /// How often idle consumers and result waiters re-check for writes by other processes
    /// (default 250 ms).
    pub fallback_poll: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout: Duration::from_secs(5),
            readers: 4,
            fallback_poll: Duration::from_millis(250),
        }
    }
}

impl SqliteOptions {
    /// Set [`SqliteOptions::fallback_poll`].
    pub fn fallback_poll(mut self, d: Duration) -> Self {
        self.fallback_poll = d;
        self
    }
}

/// One database file: a single-connection writer pool, a reader pool and in-process
/// wake-ups. Clones are cheap and share everything.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    writer: SqlitePool,
    reader: SqlitePool,
    hub: Arc<Hub>,
    masked: String,
    options: SqliteOptions,
    /// The database file (`None` in memory).
    path: Option<PathBuf>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("url", &self.inner.masked).finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Open (creating if needed) the database named by `url` and apply the migrations.
    pub async fn connect(url: &str, options: SqliteOptions) -> Result<Self, stem::Error> {
        let masked = crate::url::mask(url);
        let (driver, namespace) = split_namespace(url)?;
        let connect = SqliteConnectOptions::from_str(&driver)
            .map_err(|e| stem::Error::Config(format!("invalid SQLite URL `{masked}`: {e}")))?;
        let in_memory = driver.contains(":memory:") || driver.contains("mode=memory");
        // One file is one namespace: a non-default `ns` selects a sibling file
        // (`jobs.db?ns=billing` opens `jobs.billing.db`).
        let connect = if namespace == crate::url::DEFAULT_NAMESPACE || in_memory {
            connect
        } else {
            let path = connect.get_filename().to_path_buf();
            let stem_name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let file = match path.extension() {
                Some(ext) => format!("{stem_name}.{namespace}.{}", ext.to_string_lossy()),
                None => format!("{stem_name}.{namespace}"),
            };
            connect.filename(path.with_file_name(file))
        };
        let key = (!in_memory).then(|| {
            let p = connect.get_filename();
            std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
        });
        if let Some(key) = &key {
            let open = OPEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(inner) = open.as_ref().and_then(|m| m.get(key)).and_then(Weak::upgrade) {
                return Ok(SqliteStore { inner });
            }
        }
        let connect = connect
            .create_if_missing(true)
            .journal_mode(if in_memory { SqliteJournalMode::Memory } else { SqliteJournalMode::Wal })
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(options.busy_timeout)
            .foreign_keys(false);
        let fail =
            |e: sqlx::Error| stem::Error::Config(format!("cannot open SQLite database `{masked}`: {e}"));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(connect.clone())
            .await
            .map_err(fail)?;
        MIGRATOR
            .run(&writer)
            .await
            .map_err(|e| stem::Error::Config(format!("migrating SQLite database `{masked}` failed: {e}")))?;
        let reader = if in_memory {
            writer.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(options.readers.max(1))
                .min_connections(0)
                .acquire_timeout(Duration::from_secs(30))
                .connect_lazy_with(connect)
        };
        let inner = Arc::new(StoreInner {
            writer,
            reader,
            hub: Arc::new(Hub::default()),
            masked,
            options,
            path: key.clone(),
        });
        if let Some(key) = key {
            let mut open = OPEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let map = open.get_or_insert_with(HashMap::new);
            map.retain(|_, w| w.strong_count() > 0);
            // Another task may have opened it meanwhile: keep the first.
            if let Some(existing) = map.get(&key).and_then(Weak::upgrade) {
                return Ok(SqliteStore { inner: existing });
            }
            map.insert(key, Arc::downgrade(&inner));
        }
        Ok(SqliteStore { inner })
    }

    /// The pool every write goes through (one connection).
    pub fn writer(&self) -> &SqlitePool {
        &self.inner.writer
    }

    /// Whether `other` is the same database (stores opened on one file share everything).
    pub fn same_as(&self, other: &SqliteStore) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The pool for reads.
    pub fn reader(&self) -> &SqlitePool {
        &self.inner.reader
    }

    /// The URL, password masked.
    pub fn masked_url(&self) -> &str {
        &self.inner.masked
    }

    /// The database file this store opened (its namespace's sibling file for a `?ns=`
    /// URL); `None` for an in-memory database.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    pub(crate) fn hub(&self) -> &Arc<Hub> {
        &self.inner.hub
    }

    pub(crate) fn fallback_poll(&self) -> Duration {
        self.inner.options.fallback_poll
    }
}

/// Now, in Unix milliseconds (SQLite stores times as integers).
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn db_err(e: sqlx::Error) -> stem::Error {
    stem::Error::broker(e)
}

fn backend_err(e: sqlx::Error) -> stem::Error {
    stem::Error::backend(e)
}

/// Open a broker and a backend on one database (`sqlite:`).
pub(crate) async fn connect(url: &str) -> Result<crate::Adapters, stem::Error> {
    let store = SqliteStore::connect(url, SqliteOptions::default()).await?;
    Ok(crate::Adapters {
        broker: Arc::new(SqliteBroker::new(store.clone())),
        backend: Arc::new(SqliteBackend::new(store, stem::backend::DEFAULT_RESULT_TTL)),
    })
}
