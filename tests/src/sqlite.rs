//! The SQLite adapters under the contract suites.
//!
//! Each namespace a check asks for becomes its own database file under
//! `$TMPDIR/stem-tests-sqlite/`, so checks run in parallel. Opening the same file twice in one
//! process shares the store (one writer, shared wake-ups), as the adapter does for any
//! application. Files older than an hour are removed when a harness starts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use stem::backend::ResultBackend;
use stem::broker::{BoxFuture, Broker};
use stem_adapters::sqlite::{SqliteBackend, SqliteBroker, SqliteOptions, SqliteStore, SqliteStores};

use crate::{Harness, StoreHarness, Stores};

/// Directory holding the test databases.
pub fn dir() -> PathBuf {
    std::env::temp_dir().join("stem-tests-sqlite")
}

/// Opens SQLite brokers and backends, one database file per namespace.
pub struct SqliteHarness {
    dir: PathBuf,
}

impl Default for SqliteHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl SqliteHarness {
    pub fn new() -> Self {
        let dir = dir();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(3600));
                if old {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        SqliteHarness { dir }
    }

    /// The store of `namespace`'s file.
    pub async fn store(&self, namespace: &str) -> SqliteStore {
        let url = format!("sqlite://{}", self.dir.join(format!("{namespace}.db")).display());
        SqliteStore::connect(&url, SqliteOptions::default())
            .await
            .unwrap_or_else(|e| panic!("opening SQLite database `{url}` failed: {e}"))
    }
}

impl Harness for SqliteHarness {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn broker(&self, namespace: &str) -> BoxFuture<'_, Arc<dyn Broker>> {
        let namespace = namespace.to_owned();
        Box::pin(async move { Arc::new(SqliteBroker::new(self.store(&namespace).await)) as Arc<dyn Broker> })
    }

    fn backend(&self, namespace: &str, ttl: Duration) -> BoxFuture<'_, Arc<dyn ResultBackend>> {
        let namespace = namespace.to_owned();
        Box::pin(async move {
            Arc::new(SqliteBackend::new(self.store(&namespace).await, ttl)) as Arc<dyn ResultBackend>
        })
    }
}

/// Opens SQLite coordination stores, one database file per namespace.
#[derive(Default)]
pub struct SqliteStoreHarness {
    sqlite: SqliteHarness,
}

impl SqliteStoreHarness {
    pub fn new() -> Self {
        Self::default()
    }
}

impl StoreHarness for SqliteStoreHarness {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn stores(&self, namespace: &str) -> BoxFuture<'_, Stores> {
        let namespace = namespace.to_owned();
        Box::pin(async move {
            let stores = Arc::new(SqliteStores::new(self.sqlite.store(&namespace).await));
            Stores {
                locks: stores.clone(),
                revokes: stores.clone(),
                rate_limiter: stores.clone(),
                unique: stores,
            }
        })
    }
}
