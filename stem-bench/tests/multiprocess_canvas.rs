//! A canvas carried by separate OS processes, on Redis and on Postgres: four
//! `stem-bench canvas-worker` processes run it, and the producer (`stem-bench canvas-enqueue`)
//! is another process that exits as soon as the canvas is enqueued, so nothing but the workers
//! drives it.
//!
//! Uses `STEM_TEST_REDIS_URL` (default `redis://127.0.0.1:6379/0`) and `STEM_TEST_PG_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`), each with a fresh namespace.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{Value, json};
use stem::TaskId;
use stem::backend::TaskState;
use tokio::time::Instant;

const MEMBERS: u64 = 50;
const WAIT: Duration = Duration::from_secs(90);

const WORKERS: usize = 4;

fn redis_url() -> String {
    std::env::var("STEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

fn postgres_url() -> String {
    std::env::var("STEM_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn fresh_url(base: &str) -> String {
    let ns = format!("e2ecanvas{}", uuid::Uuid::now_v7().simple());
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}ns={ns}")
}

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stem-bench"))
}

/// A `canvas-worker` process, killed on drop; its stdout lines (`member <i>`,
/// `callback <values>`) and its log are collected.
struct CanvasWorker {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    log: Arc<Mutex<String>>,
    stdout: Option<JoinHandle<()>>,
}

impl CanvasWorker {
    fn start(url: &str) -> CanvasWorker {
        let mut child = bench()
            .args(["canvas-worker", "--url", url, "--concurrency", "4", "--log-runs"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start stem-bench canvas-worker");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let l = lines.clone();
        let stdout = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        let err = child.stderr.take().unwrap();
        let g = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut log = g.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        CanvasWorker { child, lines, log, stdout: Some(stdout) }
    }

    fn ready(&self) -> bool {
        self.log.lock().unwrap().contains("canvas worker ready")
    }

    /// SIGTERM, wait for a clean exit, and return every stdout line it printed.
    async fn stop(&mut self) -> Vec<String> {
        let ok =
            Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -TERM failed");
        let give_up = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < give_up, "worker did not exit; log:\n{}", self.log.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "clean exit on SIGTERM; log:\n{}", self.log.lock().unwrap());
        // The process is gone, so its stdout is at EOF: every line has been read.
        self.stdout.take().unwrap().join().unwrap();
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for CanvasWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn members_of(lines: &[String]) -> Vec<u64> {
    lines.iter().filter_map(|l| l.strip_prefix("member ")).map(|i| i.parse().unwrap()).collect()
}

fn callbacks_of(lines: &[String]) -> Vec<Vec<u64>> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("callback "))
        .map(|v| serde_json::from_str(v).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_of_50_and_a_chain_run_by_four_worker_processes_on_redis() {
    chord_and_chain_across_worker_processes(&fresh_url(&redis_url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chord_of_50_and_a_chain_run_by_four_worker_processes_on_postgres() {
    chord_and_chain_across_worker_processes(&fresh_url(&postgres_url())).await;
}

async fn chord_and_chain_across_worker_processes(url: &str) {
    let mut workers: Vec<CanvasWorker> = (0..WORKERS).map(|_| CanvasWorker::start(url)).collect();
    let give_up = Instant::now() + Duration::from_secs(60);
    while !workers.iter().all(CanvasWorker::ready) {
        let logs: Vec<String> = workers.iter().map(|w| w.log.lock().unwrap().clone()).collect();
        assert!(Instant::now() < give_up, "workers did not start; logs:\n{}", logs.join("\n"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The producer process enqueues a chord of 50 (members sleep 50 ms, so the workers share
    // them) and a chain of five steps, prints their ids and exits.
    let out = bench()
        .args(["canvas-enqueue", "--url", url, "--members", &MEMBERS.to_string(), "--task-ms", "50"])
        .output()
        .expect("run stem-bench canvas-enqueue");
    assert!(out.status.success(), "canvas-enqueue failed: {}", String::from_utf8_lossy(&out.stderr));
    let ids: Value = serde_json::from_slice(&out.stdout).unwrap();
    let chord_id: TaskId = serde_json::from_value(ids["chord"].clone()).unwrap();
    let chain_id: TaskId = serde_json::from_value(ids["chain"].clone()).unwrap();

    // Results are read from the backend, as any process could.
    let adapters = stem_adapters::connect(url).await.unwrap();
    let chord = adapters.backend.wait(chord_id, WAIT).await.unwrap().expect("chord callback record");
    assert_eq!(chord.state, TaskState::Succeeded, "{chord:?}");
    assert_eq!(chord.result, Some(json!((0..MEMBERS).sum::<u64>())), "the callback's output");
    let chain = adapters.backend.wait(chain_id, WAIT).await.unwrap().expect("chain's last step record");
    assert_eq!(chain.state, TaskState::Succeeded, "{chain:?}");
    assert_eq!(chain.result, Some(json!(71)), "((1 + 2) * 10 + 5) * 2 + 1");

    // Let anything still queued (a duplicate callback, if there were one) run, then stop.
    let give_up = Instant::now() + WAIT;
    loop {
        let c = adapters.broker.counts("bench").await.unwrap();
        if c.pending + c.delayed + c.in_flight == 0 {
            assert_eq!(c.dead, 0, "nothing dead-lettered");
            break;
        }
        assert!(Instant::now() < give_up, "queue did not drain: {c:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut lines = Vec::new();
    for w in &mut workers {
        lines.push(w.stop().await);
    }

    let callbacks: Vec<Vec<u64>> = lines.iter().flat_map(|l| callbacks_of(l)).collect();
    assert_eq!(callbacks.len(), 1, "the chord callback ran exactly once across all workers");
    assert_eq!(callbacks[0], (0..MEMBERS).collect::<Vec<_>>(), "it got the outputs in member order");

    let ran: Vec<Vec<u64>> = lines.iter().map(|l| members_of(l)).collect();
    let busy = ran.iter().filter(|r| !r.is_empty()).count();
    assert!(busy >= 2, "members were spread over the worker processes: {ran:?}");
    let all: Vec<u64> = ran.iter().flatten().copied().collect();
    let distinct: HashSet<u64> = all.iter().copied().collect();
    assert_eq!(distinct, (0..MEMBERS).collect::<HashSet<_>>(), "every member ran");
    assert_eq!(all.len() as u64, MEMBERS, "no member ran twice");
}
