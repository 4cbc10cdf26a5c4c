//! What the multi-process tests share, whatever the adapter: `stem-bench` child processes
//! (workers, `enqueue`, `count`), polling with deadlines, and the scenarios themselves, each
//! run on a URL with a namespace of its own.

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stem::EnqueueOptions;

/// `url` with `?ns=<fresh name>` (or `&ns=`): `t` and 32 hex digits of a UUIDv7, so leftovers
/// of an interrupted run can be recognised by name and age.
pub(crate) fn with_fresh_namespace(url: &str) -> String {
    let ns = format!("t{}", uuid::Uuid::now_v7().simple());
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}ns={ns}")
}

/// The `stem-bench` binary.
pub(crate) fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stem-bench"))
}

/// A `stem-bench worker` child process, killed on drop, whose stdout `ran <i>` lines and
/// stderr log are collected.
pub(crate) struct Worker {
    pub(crate) child: Child,
    runs: Arc<Mutex<Vec<u64>>>,
    log: Arc<Mutex<String>>,
}

impl Worker {
    pub(crate) fn start(url: &str, extra: &[&str]) -> Worker {
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

    /// Task indices this worker ran, in order, repeats included.
    pub(crate) fn runs(&self) -> Vec<u64> {
        self.runs.lock().unwrap().clone()
    }

    /// Everything the worker logged so far.
    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Whether the process is still running.
    pub(crate) fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub(crate) fn sigterm(&self) {
        let ok =
            Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -TERM failed");
    }

    /// SIGKILL: no shutdown, leases left behind.
    pub(crate) fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Wait for exit; returns whether it exited with success.
    pub(crate) fn wait_exit(&mut self, within: Duration) -> bool {
        let give_up = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(Instant::now() < give_up, "worker did not exit; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then assert a clean exit within 30 s.
    pub(crate) fn stop(mut self) {
        self.sigterm();
        assert!(self.wait_exit(Duration::from_secs(30)), "clean exit on SIGTERM; log:\n{}", self.log());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `stem-bench args…` to completion and parse its JSON output.
pub(crate) fn run_json(args: &[&str]) -> Value {
    let out = bench().args(args).output().expect("run stem-bench");
    assert!(out.status.success(), "stem-bench {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}"))
}

/// `stem-bench enqueue`: tasks `0..tasks` of `task_ms` each, in their own process.
pub(crate) fn enqueue(url: &str, tasks: u64, task_ms: u64) {
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

/// `stem-bench count`: `{succeeded, failed, pending, dead}` of the enqueued run.
pub(crate) fn count(url: &str) -> Value {
    run_json(&["count", "--url", url])
}

/// Poll `f` every 50 ms until it holds; panic after `within`.
pub(crate) fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let give_up = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < give_up, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Poll `count` until `n` tasks succeeded; returns the last counts.
pub(crate) fn wait_succeeded(url: &str, n: u64, within: Duration) -> Value {
    let mut last = json!(null);
    wait_until(&format!("{n} succeeded"), within, || {
        last = count(url);
        last["succeeded"] == json!(n)
    });
    last
}

/// A free TCP port on loopback (bound and released).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// How many entries of `runs` repeat an earlier one; asserts that every index in `0..total`
/// ran.
pub(crate) fn ran_twice(runs: &[u64], total: u64) -> usize {
    let distinct: HashSet<_> = runs.iter().copied().collect();
    assert_eq!(distinct.len() as u64, total, "every task ran");
    assert!(distinct.iter().all(|i| *i < total), "only enqueued tasks ran");
    runs.len() - distinct.len()
}

/// A producer in this process enqueues 50 tasks and awaits each result, computed by a worker
/// process (the wait is woken across processes).
pub(crate) async fn producer_awaits_results_computed_by_a_worker_process(url: &str) {
    let worker = Worker::start(url, &[]);
    let adapters = stem_adapters::connect(url).await.unwrap();
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
    worker.stop();
}

/// 2,000 tasks of 5 ms; worker A is SIGKILLed after 400 of them, worker B (started after)
/// finishes: all 2,000 succeed, nothing fails, nothing is left. Returns how many ran twice
/// (asserted to be at most what A can have had in flight).
pub(crate) fn sigkill_mid_drain_loses_nothing(url: &str) -> usize {
    enqueue(url, 2000, 5);
    let lease = ["--visibility-timeout-ms", "2000"];
    let mut a = Worker::start(url, &lease);
    wait_until("worker A to run 400 tasks", Duration::from_secs(60), || a.runs().len() >= 400);
    a.sigkill();
    let b = Worker::start(url, &lease);
    let c = wait_succeeded(url, 2000, Duration::from_secs(120));
    assert_eq!(
        (c["failed"].clone(), c["pending"].clone(), c["dead"].clone()),
        (json!(0), json!(0), json!(0))
    );
    let mut all = a.runs();
    all.extend(b.runs());
    let twice = ran_twice(&all, 2000);
    // A fetches only for free slots (16) and claims in batches of at most that.
    assert!(twice <= 64, "only the killed worker's in-flight tasks may run twice, got {twice}");
    b.stop();
    twice
}

/// 300 tasks of 100 ms; worker A gets SIGTERM after 40: it finishes and records what it runs,
/// exits 0 and leaves nothing leased; worker B finishes the rest, and no task runs twice.
pub(crate) async fn sigterm_during_a_drain_finishes_in_flight_and_loses_nothing(url: &str) {
    enqueue(url, 300, 100);
    let mut a = Worker::start(url, &[]);
    wait_until("worker A to run 40 tasks", Duration::from_secs(60), || a.runs().len() >= 40);
    a.sigterm();
    assert!(a.wait_exit(Duration::from_secs(30)), "graceful exit with status 0; log:\n{}", a.log());
    let adapters = stem_adapters::connect(url).await.unwrap();
    let q = adapters.broker.counts("bench").await.unwrap();
    assert_eq!(q.in_flight, 0, "nothing left leased by the stopped worker");
    let c = count(url);
    let done = c["succeeded"].as_u64().unwrap();
    assert_eq!(done as usize, a.runs().len(), "every task it started finished and was recorded");
    assert_eq!(c["pending"].as_u64().unwrap() + done, 300);
    let b = Worker::start(url, &[]);
    wait_succeeded(url, 300, Duration::from_secs(120));
    let mut all = a.runs();
    all.extend(b.runs());
    assert_eq!(ran_twice(&all, 300), 0, "no task ran twice after a graceful shutdown");
    b.stop();
}
