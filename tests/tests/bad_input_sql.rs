//! Bad input on the SQL adapters, with a real worker running: garbage written straight into
//! the `jobs` table (not JSON, an unknown envelope version, missing fields, not an object;
//! on SQLite also a blob payload and text in an integer column), an unregistered task and
//! arguments of the wrong type or missing. Each gives a DLQ entry with its reason
//! (`malformed-envelope`, `unregistered-task`, `invalid-args`), the worker keeps running, the
//! good tasks around the garbage all succeed, and nothing stays leased.
//!
//! Postgres needs a server (see `stem_tests::postgres`); SQLite uses a temporary file.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use stem::backend::{ResultBackend, TaskState};
use stem::broker::{Broker, DeadLetter, REASON_INVALID_ARGS, REASON_MALFORMED, REASON_UNREGISTERED};
use stem::prelude::*;
use stem::{EnqueueOptions, Envelope, Registry, Stem, Worker, WorkerConfig};
use stem_tests::postgres::PgHarness;
use stem_tests::sqlite::SqliteHarness;

const WAIT: Duration = Duration::from_secs(30);
const QUEUE: &str = "default";

#[task(name = "bad.add")]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[task(name = "bad.typed", retries = 3)]
async fn typed(count: u32, label: String) -> String {
    format!("{label}:{count}")
}

/// A row written into `jobs` by hand, and what its DLQ entry must say.
struct Garbage {
    /// The payload as stored (`None`: the adapter test writes something that is not text).
    payload: Option<&'static str>,
    /// What the dead letter's raw payload reads.
    raw: String,
    /// A fragment of the dead letter's detail.
    detail: &'static str,
}

/// Garbage every SQL adapter must survive.
fn common_garbage() -> Vec<Garbage> {
    let text =
        |payload: &'static str, detail| Garbage { payload: Some(payload), raw: payload.to_owned(), detail };
    vec![
        text("this is not JSON", "not JSON"),
        text("", "not JSON"),
        text(r#"{"v": 99, "id": "0190f2a4-0000-7000-8000-000000000000", "task": "bad.add"}"#, "version 99"),
        text(r#"{"v": 1, "task": "bad.add"}"#, "missing field"),
        text("[1, 2, 3]", "missing field `v`"),
        text(
            r#"{"v": 1, "id": "nope", "task": "bad.add", "args": {}, "queue": "default"}"#,
            "invalid envelope",
        ),
    ]
}

async fn dead_letters(broker: &dyn Broker, n: usize) -> Vec<DeadLetter> {
    let give_up = tokio::time::Instant::now() + WAIT;
    loop {
        let dead = broker.dlq_list(QUEUE, 0, 1000).await.unwrap();
        if dead.len() >= n || tokio::time::Instant::now() >= give_up {
            return dead;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the scenario: `insert` writes the garbage rows (while the worker runs) and returns
/// the envelope ids of any hand-written rows that hold a valid envelope and must succeed.
async fn bad_input_never_stops_a_worker<F, Fut>(
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    garbage: &[Garbage],
    insert: F,
) where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Vec<stem::TaskId>>,
{
    let registry = Arc::new(Registry::new().register::<add>().register::<typed>().build().unwrap());
    let stem = Stem::new(broker.clone(), backend.clone());
    let mut config = WorkerConfig::default();
    config.concurrency = 4;
    config.fetch_wait = Duration::from_millis(200);
    config.shutdown_grace = Duration::from_secs(10);
    config.heartbeat_interval = Duration::from_millis(200);
    let worker = Worker::builder(broker.clone(), backend.clone())
        .registry(Arc::clone(&registry))
        .producer(stem.clone())
        .config(config)
        .build()
        .unwrap()
        .spawn();

    let before = stem.enqueue(add::new(1, 1)).await.unwrap();
    assert_eq!(before.wait(WAIT).await.unwrap(), 2);

    let hand_written = insert().await;
    let ghost = stem.enqueue_raw("bad.ghost", json!({"x": 1}), EnqueueOptions::default()).await.unwrap();
    let wrong_type = stem
        .enqueue_raw("bad.typed", json!({"count": "seven", "label": "x"}), EnqueueOptions::default())
        .await
        .unwrap();
    let missing =
        stem.enqueue_raw("bad.typed", json!({"count": 1}), EnqueueOptions::default()).await.unwrap();
    let mut after = Vec::new();
    for i in 0..10 {
        after.push(stem.enqueue(add::new(i, 100)).await.unwrap());
    }

    for (i, h) in after.iter().enumerate() {
        assert_eq!(h.wait(WAIT).await.unwrap(), i as i64 + 100, "tasks after the garbage run");
    }
    for id in hand_written {
        let give_up = tokio::time::Instant::now() + WAIT;
        loop {
            let state = backend.get(id).await.unwrap().map(|s| s.state);
            if state == Some(TaskState::Succeeded) {
                break;
            }
            assert!(tokio::time::Instant::now() < give_up, "hand-written task {id}: {state:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let s = ghost.wait_status(WAIT).await.unwrap();
    assert_eq!((s.state, s.error.unwrap().kind.as_str()), (TaskState::Failed, REASON_UNREGISTERED));
    for h in [&wrong_type, &missing] {
        let s = h.wait_status(WAIT).await.unwrap();
        assert_eq!(s.state, TaskState::Failed);
        assert_eq!(s.error.as_ref().unwrap().kind, REASON_INVALID_ARGS);
    }

    let expected = garbage.len() + 3;
    let dead = dead_letters(&*broker, expected).await;
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &dead {
        *reasons.entry(d.reason.as_str()).or_default() += 1;
    }
    let want: BTreeMap<&str, usize> =
        [(REASON_MALFORMED, garbage.len()), (REASON_UNREGISTERED, 1), (REASON_INVALID_ARGS, 2)].into();
    assert_eq!(reasons, want, "one dead letter per bad input: {dead:#?}");
    let malformed: Vec<_> = dead.iter().filter(|d| d.reason == REASON_MALFORMED).collect();
    for g in garbage {
        let d = malformed
            .iter()
            .find(|d| d.raw.as_deref() == Some(g.raw.as_str()))
            .unwrap_or_else(|| panic!("no dead letter with raw payload {:?}: {malformed:#?}", g.raw));
        assert!(d.envelope.is_none());
        assert!(
            d.detail.contains(g.detail),
            "detail of {:?} should mention {:?}: {}",
            g.raw,
            g.detail,
            d.detail
        );
    }
    let ghost_dead = dead.iter().find(|d| d.reason == REASON_UNREGISTERED).unwrap();
    assert!(ghost_dead.detail.contains("bad.ghost"), "{}", ghost_dead.detail);
    assert_eq!(ghost_dead.envelope.as_ref().map(|e| e.id), Some(ghost.id()));
    let details: Vec<_> =
        dead.iter().filter(|d| d.reason == REASON_INVALID_ARGS).map(|d| d.detail.as_str()).collect();
    assert!(details.iter().any(|d| d.contains("argument `count`: invalid type")), "{details:?}");
    assert!(details.iter().any(|d| d.contains("missing argument `label`")), "{details:?}");

    // Nothing is wedged: no row stays leased or pending.
    let give_up = tokio::time::Instant::now() + WAIT;
    loop {
        let c = broker.counts(QUEUE).await.unwrap();
        if c.pending == 0 && c.in_flight == 0 && c.delayed == 0 {
            assert_eq!(c.dead as usize, expected);
            break;
        }
        assert!(tokio::time::Instant::now() < give_up, "queue never settled: {c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Still consuming after all of it.
    let last = stem.enqueue(add::new(20, 22)).await.unwrap();
    assert_eq!(last.wait(WAIT).await.unwrap(), 42, "the worker keeps going");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_bad_input_is_dead_lettered_and_the_worker_goes_on() {
    let harness = PgHarness::new();
    let ns = stem_tests::namespace();
    let store = harness.store(&ns).await;
    let broker: Arc<dyn Broker> = Arc::new(stem_adapters::postgres::PgBroker::new(store.clone()));
    let backend: Arc<dyn ResultBackend> =
        Arc::new(stem_adapters::postgres::PgBackend::new(store.clone(), Duration::from_secs(3600)));
    let garbage = common_garbage();
    let payloads: Vec<_> = garbage.iter().filter_map(|g| g.payload).collect();
    let pool = store.pool().clone();
    bad_input_never_stops_a_worker(broker, backend, &garbage, || async move {
        let sql = format!("INSERT INTO \"{ns}\".jobs (queue, payload) VALUES ($1, $2)");
        for p in payloads {
            sqlx::query(&sql).bind(QUEUE).bind(p).execute(&pool).await.unwrap();
        }
        Vec::new()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_bad_input_is_dead_lettered_and_the_worker_goes_on() {
    let harness = SqliteHarness::new();
    let store = harness.store(&stem_tests::namespace()).await;
    let broker: Arc<dyn Broker> = Arc::new(stem_adapters::sqlite::SqliteBroker::new(store.clone()));
    let backend: Arc<dyn ResultBackend> =
        Arc::new(stem_adapters::sqlite::SqliteBackend::new(store.clone(), Duration::from_secs(3600)));
    let mut garbage = common_garbage();
    let payloads: Vec<_> = garbage.iter().filter_map(|g| g.payload).collect();
    // SQLite stores whatever it is given: a blob (not even UTF-8) in the TEXT payload column.
    garbage.push(Garbage { payload: None, raw: "\u{FFFD}\u{FFFD}\0".to_owned(), detail: "not JSON" });
    let pool = store.writer().clone();
    bad_input_never_stops_a_worker(broker, backend, &garbage, || async move {
        let now = chrono::Utc::now().timestamp_millis();
        let insert = "INSERT INTO jobs (queue, run_at, payload, created_at) VALUES (?1, ?2, ?3, ?2)";
        for p in payloads {
            sqlx::query(insert).bind(QUEUE).bind(now).bind(p).execute(&pool).await.unwrap();
        }
        sqlx::query("INSERT INTO jobs (queue, run_at, payload, created_at) VALUES (?1, ?2, X'FFFE00', ?2)")
            .bind(QUEUE)
            .bind(now)
            .execute(&pool)
            .await
            .unwrap();
        // Text where an integer belongs, around a valid envelope: it still runs.
        let mut env = Envelope::new("bad.add", json!({"a": 40, "b": 2}));
        env.queue = QUEUE.to_owned();
        sqlx::query(
            "INSERT INTO jobs (queue, priority, run_at, payload, created_at) VALUES (?1, 'high', ?2, ?3, ?2)",
        )
        .bind(QUEUE)
        .bind(now)
        .bind(serde_json::to_string(&env).unwrap())
        .execute(&pool)
        .await
        .unwrap();
        vec![env.id]
    })
    .await;
}
