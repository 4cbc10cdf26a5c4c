//! Transactional enqueue on Postgres: a task enqueued inside a transaction exists if and only
//! if the transaction commits (needs PostgreSQL: see `stem_tests::postgres`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use stem::{Registry, Signature, Stem, TaskContext, TaskError, TaskOptions, Worker};
use stem_adapters::postgres::{PgBackend, PgBroker, enqueue_tx};
use stem_tests::postgres::PgHarness;

static RUNS: AtomicU32 = AtomicU32::new(0);

struct Double;
impl stem::Task for Double {
    type Args = (u64,);
    type Output = u64;
    const NAME: &'static str = "postgres_tx.double";
    const PARAMS: &'static [&'static str] = &["x"];
    const OPTIONS: TaskOptions = TaskOptions::new();
    async fn run(_ctx: TaskContext, (x,): (u64,)) -> Result<u64, TaskError> {
        RUNS.fetch_add(1, Ordering::SeqCst);
        Ok(x * 2)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_is_visible_iff_the_transaction_commits() {
    let harness = PgHarness::new();
    let store = harness.store(&stem_tests::namespace()).await;
    let broker = Arc::new(PgBroker::new(store.clone()));
    let backend = Arc::new(PgBackend::new(store.clone(), Duration::from_secs(3600)));
    let stem = Stem::new(broker.clone(), backend.clone());
    let worker = Worker::builder(broker.clone(), backend.clone())
        .registry(Registry::new().register::<Double>().build().unwrap())
        .build()
        .unwrap()
        .spawn();
    let table = format!("\"{}\".jobs", store.namespace());

    // Rolled back: the job row and the queued record vanish with the transaction.
    let mut tx = store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap();
    let rolled_back = enqueue_tx(&stem, &store, &mut tx, Signature::<Double>::new((20,))).await.unwrap();
    let in_tx: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}")).fetch_one(&mut *tx).await.unwrap();
    assert_eq!(in_tx, 1, "the transaction sees its own job row");
    assert!(
        stem.handle::<u64>(rolled_back.id()).status().await.unwrap().is_none(),
        "invisible before commit"
    );
    tx.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(RUNS.load(Ordering::SeqCst), 0, "a rolled-back enqueue never runs");
    assert!(rolled_back.status().await.unwrap().is_none(), "no queued record after rollback");
    let c = stem::Broker::counts(&*broker, "default").await.unwrap();
    assert_eq!((c.pending, c.delayed, c.in_flight), (0, 0, 0));

    // Committed: the worker (already waiting on LISTEN) runs it and the result is awaited.
    let mut tx = store.pool().begin().await.unwrap();
    let committed = enqueue_tx(&stem, &store, &mut tx, Signature::<Double>::new((21,))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(RUNS.load(Ordering::SeqCst), 0, "nothing runs before the commit");
    tx.commit().await.unwrap();
    let t0 = std::time::Instant::now();
    assert_eq!(committed.wait(Duration::from_secs(10)).await.unwrap(), 42);
    assert!(t0.elapsed() < Duration::from_secs(3), "woken by NOTIFY at commit: {:?}", t0.elapsed());
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);
    worker.shutdown().await.unwrap();
}
