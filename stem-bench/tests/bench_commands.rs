//! The measuring commands (`drain`, `chord`) on every adapter URL, given as the docs give
//! them (no `ns=`): each runs, prints its figures, and leaves no namespace of its own behind
//! (Redis keys, a Postgres schema, a SQLite sibling file).
//!
//! Uses `STEM_TEST_REDIS_URL` (default `redis://127.0.0.1:6379/0`) and `STEM_TEST_PG_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::{Command, Stdio};

use serde_json::Value;
use stem_adapters::postgres::{PgOptions, PgStore};

fn redis_url() -> String {
    std::env::var("STEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

fn postgres_url() -> String {
    std::env::var("STEM_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Run `stem-bench args..`; its process id and the JSON line it printed. Fails the test on a
/// non-zero exit, with what the command wrote.
fn bench(args: &[&str]) -> (u32, Value) {
    let child = Command::new(env!("CARGO_BIN_EXE_stem-bench"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start stem-bench");
    let pid = child.id();
    let out = child.wait_with_output().expect("stem-bench ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stem-bench {args:?} failed ({}):\n{stdout}\n{stderr}", out.status);
    let line = stdout.lines().last().unwrap_or_default();
    let json = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
    (pid, json)
}

/// `drain` of 300 tasks and `chord` of 30 members on `url`; the process ids of the two runs.
fn drain_and_chord(url: &str) -> [u32; 2] {
    let (drain_pid, drain) = bench(&["drain", "--url", url, "--tasks", "300", "--concurrency", "4"]);
    assert_eq!(drain["tasks"], 300, "{drain}");
    assert!(drain["drain_rate"].as_f64().unwrap() > 0.0, "{drain}");
    assert!(drain["enqueue_rate"].as_f64().unwrap() > 0.0, "{drain}");
    let (chord_pid, chord) = bench(&["chord", "--url", url, "--members", "30"]);
    assert_eq!(chord["members"], 30, "{chord}");
    assert_eq!(chord["callbacks"], 1, "{chord}");
    assert!(chord["members_per_s"].as_f64().unwrap() > 0.0, "{chord}");
    [drain_pid, chord_pid]
}

#[test]
fn drain_and_chord_run_in_memory() {
    drain_and_chord("memory://");
}

#[test]
fn drain_and_chord_run_on_sqlite() {
    let dir = std::env::temp_dir().join(format!("stem-bench-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("bench.db").display());
    drain_and_chord(&url);
    // Each run had a sibling file of its own and removed it.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_chord_on_redis_leave_no_keys_behind() {
    let url = redis_url();
    let pids = drain_and_chord(&url);
    let mut conn =
        redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    for pid in pids {
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("bench_{pid}_*")).query_async(&mut conn).await.unwrap();
        assert!(keys.is_empty(), "run {pid} left {} keys, e.g. {:?}", keys.len(), keys.first());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_chord_on_postgres_leave_no_schema_behind() {
    let url = postgres_url();
    let pids = drain_and_chord(&url);
    let store = PgStore::connect(&url, PgOptions::default().migrate(false)).await.unwrap();
    for pid in pids {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE $1")
                .bind(format!("bench\\_{pid}\\_%"))
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(left, 0, "run {pid} left its schema");
    }
}
