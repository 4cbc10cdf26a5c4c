//! The Postgres adapters under the contract suites.
//!
//! The server comes from `STEM_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
//! Each namespace a check asks for becomes its own schema, so checks run in parallel on one
//! database. Tests never skip: when Postgres does not answer they fail with a message saying
//! how to start it. Schemas that earlier runs left behind (named `t<uuidv7>`, older than an
//! hour) are dropped when a harness first connects.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stem::backend::ResultBackend;
use stem::broker::{BoxFuture, Broker};
use stem_adapters::postgres::{PgBackend, PgBroker, PgOptions, PgStore, PgStores};
use tokio::sync::OnceCell;

use crate::{Harness, StoreHarness, Stores};

/// Default server for the Postgres checks.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The server URL the checks use.
pub fn url() -> String {
    std::env::var("STEM_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// Opens Postgres brokers and backends: one pool per harness; every handle is a separate
/// [`PgStore`] (its own listener), as a second process would have.
#[derive(Default)]
pub struct PgHarness {
    base: OnceCell<PgStore>,
    migrated: Mutex<HashSet<String>>,
}

impl PgHarness {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store on `namespace` (migrated on first use).
    pub async fn store(&self, namespace: &str) -> PgStore {
        let base = self
            .base
            .get_or_init(|| async {
                let url = url();
                let options = PgOptions::default()
                    .connect_timeout(Duration::from_secs(3))
                    .max_connections(24)
                    .migrate(false);
                match PgStore::connect(&url, options).await {
                    Ok(s) => {
                        drop_stale_schemas(&s).await;
                        s
                    }
                    Err(e) => panic!(
                        "Postgres contract tests need a PostgreSQL server ({e}). Start one \
                         (`scripts/services.sh`) or point STEM_TEST_PG_URL at one."
                    ),
                }
            })
            .await;
        let first = self.migrated.lock().unwrap().insert(namespace.to_owned());
        PgStore::from_pool(base.pool().clone(), namespace, PgOptions::default().migrate(first))
            .await
            .unwrap_or_else(|e| panic!("opening Postgres namespace `{namespace}` failed: {e}"))
    }
}

/// Drop `t<uuidv7>` schemas of test runs that started over an hour ago.
async fn drop_stale_schemas(store: &PgStore) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname ~ '^t[0-9a-f]{32}$'")
            .fetch_all(store.pool())
            .await
            .unwrap_or_default();
    let now_ms = chrono::Utc::now().timestamp_millis();
    for name in names {
        let Ok(ms) = i64::from_str_radix(&name[1..13], 16) else { continue };
        if now_ms - ms > 3_600_000 {
            let _ =
                sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE")).execute(store.pool()).await;
        }
    }
}

impl Harness for PgHarness {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn broker(&self, namespace: &str) -> BoxFuture<'_, Arc<dyn Broker>> {
        let namespace = namespace.to_owned();
        Box::pin(async move { Arc::new(PgBroker::new(self.store(&namespace).await)) as Arc<dyn Broker> })
    }

    fn backend(&self, namespace: &str, ttl: Duration) -> BoxFuture<'_, Arc<dyn ResultBackend>> {
        let namespace = namespace.to_owned();
        Box::pin(async move {
            Arc::new(PgBackend::new(self.store(&namespace).await, ttl)) as Arc<dyn ResultBackend>
        })
    }
}

/// Opens Postgres coordination stores; each namespace is a schema.
#[derive(Default)]
pub struct PgStoreHarness {
    pg: PgHarness,
}

impl PgStoreHarness {
    pub fn new() -> Self {
        Self::default()
    }
}

impl StoreHarness for PgStoreHarness {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn stores(&self, namespace: &str) -> BoxFuture<'_, Stores> {
        let namespace = namespace.to_owned();
        Box::pin(async move {
            let stores = Arc::new(PgStores::new(self.pg.store(&namespace).await));
            Stores {
                locks: stores.clone(),
                revokes: stores.clone(),
                rate_limiter: stores.clone(),
                unique: stores,
            }
        })
    }
}
