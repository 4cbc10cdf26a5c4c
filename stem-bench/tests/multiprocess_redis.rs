//! End-to-end runs with producer and workers as separate OS processes on Redis: results
//! awaited by the producer, a worker SIGKILLed mid-drain, SIGTERM during a drain, and a
//! worker riding out a Redis restart. The scenarios live in `common` and also run on
//! Postgres (`multiprocess_postgres.rs`).
//!
//! Uses `STEM_TEST_REDIS_URL` (default `redis://127.0.0.1:6379/0`) with a fresh namespace per
//! test; the restart test runs its own `redis-server` on a free port.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr, missing_docs)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Worker, enqueue, free_port, wait_succeeded, wait_until};

fn base_url() -> String {
    std::env::var("STEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

fn fresh_url() -> String {
    common::with_fresh_namespace(&base_url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_awaits_results_computed_by_a_worker_process() {
    common::producer_awaits_results_computed_by_a_worker_process(&fresh_url()).await;
}

#[test]
fn sigkill_mid_drain_loses_nothing() {
    let twice = common::sigkill_mid_drain_loses_nothing(&fresh_url());
    eprintln!(
        "Redis, SIGKILL mid-drain: all 2000 succeeded; {twice} ran twice (in flight on the killed worker)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_drain_finishes_in_flight_and_loses_nothing() {
    common::sigterm_during_a_drain_finishes_in_flight_and_loses_nothing(&fresh_url()).await;
}

/// A private `redis-server` on a free port, stopped on drop.
struct PrivateRedis {
    child: Child,
    port: u16,
}

impl PrivateRedis {
    fn start(port: u16) -> PrivateRedis {
        let dir = std::env::temp_dir().join(format!("stem-e2e-redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the restart test runs its own redis-server; install Redis (redis-server on PATH)");
        let r = PrivateRedis { child, port };
        wait_until("private redis-server to accept connections", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        r
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_worker_survives_a_redis_restart() {
    let port = free_port();
    let server = PrivateRedis::start(port);
    let url = format!("redis://127.0.0.1:{}/0?ns=restart", server.port);
    let worker = Worker::start(&url, &[]);
    enqueue(&url, 50, 1);
    wait_succeeded(&url, 50, Duration::from_secs(60));

    // Restart the server: everything it held is gone (no persistence).
    drop(server);
    std::thread::sleep(Duration::from_secs(1));
    let _server = PrivateRedis::start(port);

    enqueue(&url, 50, 1);
    wait_succeeded(&url, 50, Duration::from_secs(90));
    let log = worker.log();
    assert!(log.contains("fetch failed"), "the outage was logged:\n{log}");
    assert!(log.contains("broker reachable again"), "the reconnect was logged:\n{log}");
    worker.stop();
}
