//! End-to-end runs with producer and workers as separate OS processes on Redis: results
//! awaited by the producer, a worker SIGKILLed mid-drain, SIGTERM during a drain, and a
//! worker riding out a Redis restart.
//!
//! Uses `STEM_TEST_REDIS_URL` (default `redis://127.0.0.1:6379/0`) with a fresh namespace per
//! test; the restart test runs its own `redis-server` on a free port.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr, missing_docs)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stem::EnqueueOptions;

fn base_url() -> String {
    std::env::var("STEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

fn fresh_url(base: &str) -> String {
    let ns = format!("e2e{}", uuid::Uuid::now_v7().simple());
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}ns={ns}")
}

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stem-bench"))
}

/// A child process killed on drop, whose stdout `ran <i>` lines are collected.
struct Worker {
    child: Child,
    runs: Arc<Mutex<Vec<u64>>>,
    log: Arc<Mutex<String>>,
}

impl Worker {
    fn start(url: &str, extra: &[&str]) -> Worker {
        let mut child = bench()
            .args(["worker", "--url", url, "--concurrency", "16", "--log-runs"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start stem-bench worker");
        let runs = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().unwrap();
        let r = runs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(i) = line.strip_prefix("ran ").and_then(|i| i.parse().ok()) {
                    r.lock().unwrap().push(i);
                }
            }
        });
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = l.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Worker { child, runs, log }
    }

    fn runs(&self) -> Vec<u64> {
        self.runs.lock().unwrap().clone()
    }

    fn sigterm(&self) {
        let ok =
            Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -TERM failed");
    }

    /// Wait for exit; returns whether it exited with success.
    fn wait_exit(&mut self, within: Duration) -> bool {
        let give_up = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(Instant::now() < give_up, "worker did not exit; log:\n{}", self.log.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_json(args: &[&str]) -> Value {
    let out = bench().args(args).output().expect("run stem-bench");
    assert!(out.status.success(), "stem-bench {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}"))
}

fn enqueue(url: &str, tasks: u64, task_ms: u64) {
    let v = run_json(&[
        "enqueue",
        "--url",
        url,
        "--tasks",
        &tasks.to_string(),
        "--task-ms",
        &task_ms.to_string(),
    ]);
    assert_eq!(v["enqueued"], json!(tasks));
}

fn count(url: &str) -> Value {
    run_json(&["count", "--url", url])
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let give_up = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < give_up, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_succeeded(url: &str, n: u64, within: Duration) -> Value {
    let mut last = json!(null);
    wait_until(&format!("{n} succeeded"), within, || {
        last = count(url);
        last["succeeded"] == json!(n)
    });
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_awaits_results_computed_by_a_worker_process() {
    let url = fresh_url(&base_url());
    let mut worker = Worker::start(&url, &[]);
    let adapters = stem_adapters::connect(&url).await.unwrap();
    let stem = stem::Stem::new(adapters.broker, adapters.backend);
    let mut handles = Vec::new();
    for i in 0..50u64 {
        let h = stem.enqueue_raw(
            "bench.echo",
            json!({"i": i, "ms": 1}),
            EnqueueOptions::default().queue("bench"),
        );
        handles.push(h.await.unwrap());
    }
    for (i, h) in handles.iter().enumerate() {
        assert_eq!(h.wait(Duration::from_secs(30)).await.unwrap(), json!(i));
    }
    worker.sigterm();
    assert!(worker.wait_exit(Duration::from_secs(30)), "clean exit on SIGTERM");
}

#[test]
fn sigkill_mid_drain_loses_nothing() {
    let url = fresh_url(&base_url());
    enqueue(&url, 2000, 5);
    let lease = ["--visibility-timeout-ms", "2000"];
    let mut a = Worker::start(&url, &lease);
    wait_until("worker A to run 400 tasks", Duration::from_secs(60), || a.runs().len() >= 400);
    a.child.kill().unwrap(); // SIGKILL: no shutdown, leases left behind
    a.child.wait().unwrap();
    let mut b = Worker::start(&url, &lease);
    let c = wait_succeeded(&url, 2000, Duration::from_secs(120));
    assert_eq!(
        (c["failed"].clone(), c["pending"].clone(), c["dead"].clone()),
        (json!(0), json!(0), json!(0))
    );
    let mut all = a.runs();
    all.extend(b.runs());
    let distinct: HashSet<_> = all.iter().copied().collect();
    assert_eq!(distinct.len(), 2000, "every task ran");
    let twice = all.len() - distinct.len();
    eprintln!("SIGKILL mid-drain: all 2000 succeeded; {twice} ran twice (in flight on the killed worker)");
    assert!(twice <= 64, "only the killed worker's in-flight tasks may run twice, got {twice}");
    b.sigterm();
    assert!(b.wait_exit(Duration::from_secs(30)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_drain_finishes_in_flight_and_loses_nothing() {
    let url = fresh_url(&base_url());
    enqueue(&url, 300, 100);
    let mut a = Worker::start(&url, &[]);
    wait_until("worker A to run 40 tasks", Duration::from_secs(60), || a.runs().len() >= 40);
    a.sigterm();
    assert!(a.wait_exit(Duration::from_secs(30)), "graceful exit with status 0");
    let adapters = stem_adapters::connect(&url).await.unwrap();
    let q = adapters.broker.counts("bench").await.unwrap();
    assert_eq!(q.in_flight, 0, "nothing left leased by the stopped worker");
    let c = count(&url);
    let done = c["succeeded"].as_u64().unwrap();
    assert_eq!(done as usize, a.runs().len(), "every task it started finished and was recorded");
    assert_eq!(c["pending"].as_u64().unwrap() + done, 300);
    let mut b = Worker::start(&url, &[]);
    wait_succeeded(&url, 300, Duration::from_secs(120));
    let total = a.runs().len() + b.runs().len();
    assert_eq!(total, 300, "no task ran twice after a graceful shutdown");
    b.sigterm();
    assert!(b.wait_exit(Duration::from_secs(30)));
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn a_worker_survives_a_redis_restart() {
    let port = free_port();
    let server = PrivateRedis::start(port);
    let url = format!("redis://127.0.0.1:{}/0?ns=restart", server.port);
    let mut worker = Worker::start(&url, &[]);
    enqueue(&url, 50, 1);
    wait_succeeded(&url, 50, Duration::from_secs(60));

    // Restart the server: everything it held is gone (no persistence).
    drop(server);
    std::thread::sleep(Duration::from_secs(1));
    let _server = PrivateRedis::start(port);

    enqueue(&url, 50, 1);
    wait_succeeded(&url, 50, Duration::from_secs(90));
    let log = worker.log.lock().unwrap().clone();
    assert!(log.contains("fetch failed"), "the outage was logged:\n{log}");
    assert!(log.contains("broker reachable again"), "the reconnect was logged:\n{log}");
    worker.sigterm();
    assert!(worker.wait_exit(Duration::from_secs(30)));
}
