//! Worker runtime: time limits, leases and redelivery, shutdown, concurrency and prefetch,
//! rate limits, priorities, progress, lineage, heartbeats and signals.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use stem::backend::{ResultBackend, TaskState};
use stem::broker::{Broker, ConsumeRequest};
use stem::prelude::*;
use stem::signals::{
    AfterPublish, BeforePublish, TaskPostrun, TaskPrerun, TaskReceived, TaskRetried, TaskSoftTimeLimit,
    TaskSucceeded, WorkerHeartbeatSent, WorkerReady, WorkerShutdown, WorkerStopping,
};
use stem::{Registry, WaitError};
use stem_tests::support::TestApp;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(30);

static HARD_FINISHED: AtomicBool = AtomicBool::new(false);
static HARD_RUNS: AtomicU32 = AtomicU32::new(0);

#[task(name = "runtime.hard", retries = 1, hard_time_limit = "1s", backoff_base = "100ms")]
async fn hard_limited() {
    HARD_RUNS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    HARD_FINISHED.store(true, Ordering::SeqCst);
}

#[tokio::test(start_paused = true)]
async fn hard_time_limit_drops_the_task_and_takes_the_retry_path() {
    let app = TestApp::new(Registry::new().register::<hard_limited>());
    let worker = app.start_default();
    let t0 = Instant::now();
    let h = app.stem.enqueue(hard_limited::new()).await.unwrap();
    match h.wait(Duration::from_secs(60)).await {
        Err(WaitError::Failed { error, .. }) => assert_eq!(error.kind, "hard-time-limit"),
        other => panic!("expected hard-time-limit failure, got {other:?}"),
    }
    assert_eq!(HARD_RUNS.load(Ordering::SeqCst), 2, "the first attempt was retried");
    assert!(t0.elapsed() < Duration::from_secs(5), "dropped at the limit, not after the sleep");
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(!HARD_FINISHED.load(Ordering::SeqCst), "the dropped future never resumes");
    worker.shutdown().await.unwrap();
}

#[task(name = "runtime.soft", soft_time_limit = "1s")]
async fn soft_limited(ctx: TaskContext) -> String {
    tokio::select! {
        () = ctx.cancelled() => format!("stopped cleanly (cancelled={})", ctx.is_cancelled()),
        () = tokio::time::sleep(Duration::from_secs(10)) => "ran to the end".to_owned(),
    }
}

#[tokio::test(start_paused = true)]
async fn soft_time_limit_is_a_cancellation_the_task_observes() {
    let app = TestApp::new(Registry::new().register::<soft_limited>());
    let fired = Arc::new(AtomicU32::new(0));
    let f = fired.clone();
    app.signals.connect(move |s: &TaskSoftTimeLimit| {
        assert_eq!(s.limit, Duration::from_secs(1));
        f.fetch_add(1, Ordering::SeqCst);
    });
    let worker = app.start_default();
    let h = app.stem.enqueue(soft_limited::new()).await.unwrap();
    assert_eq!(h.wait(Duration::from_secs(60)).await.unwrap(), "stopped cleanly (cancelled=true)");
    assert_eq!(fired.load(Ordering::SeqCst), 1, "soft-limit event fired once");
    worker.shutdown().await.unwrap();
}

static ORPHAN_RUNS: AtomicU32 = AtomicU32::new(0);

#[task(name = "runtime.orphan")]
async fn orphan(n: u32) -> u32 {
    ORPHAN_RUNS.fetch_add(1, Ordering::SeqCst);
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_delivery_is_redelivered_after_its_lease() {
    let app = TestApp::new(Registry::new().register::<orphan>());
    let h = app.stem.enqueue(orphan::new(7)).await.unwrap();
    // A "worker" takes the task under a short lease and dies without acking.
    let stolen = app
        .broker
        .consume(&ConsumeRequest {
            queues: vec!["default".into()],
            max: 1,
            lease: Duration::from_millis(300),
            wait: Duration::from_secs(1),
            consumer: "dead-worker".into(),
        })
        .await
        .unwrap();
    assert_eq!(stolen.len(), 1);
    let worker = app.start_default();
    assert_eq!(h.wait(WAIT).await.unwrap(), 7);
    assert_eq!(ORPHAN_RUNS.load(Ordering::SeqCst), 1);
    worker.shutdown().await.unwrap();
}

static LONG_RUNS: AtomicU32 = AtomicU32::new(0);

#[task(name = "runtime.long", visibility_timeout = "300ms")]
async fn long_running() -> u32 {
    LONG_RUNS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_task_renews_its_lease_and_runs_once() {
    let app = TestApp::new(Registry::new().register::<long_running>());
    let w1 = app.start_default();
    let w2 = app.start_default();
    let h = app.stem.enqueue(long_running::new()).await.unwrap();
    assert_eq!(h.wait(WAIT).await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(LONG_RUNS.load(Ordering::SeqCst), 1, "lease renewal kept the second worker from taking it");
    w1.shutdown().await.unwrap();
    w2.shutdown().await.unwrap();
}

static GRACEFUL_DONE: AtomicU32 = AtomicU32::new(0);

#[task(name = "runtime.graceful")]
async fn graceful(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    GRACEFUL_DONE.fetch_add(1, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_running_tasks_finish() {
    let app = TestApp::new(Registry::new().register::<graceful>());
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    app.signals.connect(move |_: &WorkerStopping| o.lock().unwrap().push("stopping"));
    let o = order.clone();
    app.signals.connect(move |_: &WorkerShutdown| o.lock().unwrap().push("shutdown"));
    let worker = app.start_default();
    let handles = app.stem.enqueue_many((0..3).map(|_| graceful::new(400))).await.unwrap();
    // Wait until they run, then ask to stop.
    while app.broker.counts("default").await.unwrap().in_flight < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    worker.shutdown().await.unwrap();
    assert_eq!(GRACEFUL_DONE.load(Ordering::SeqCst), 3, "in-flight tasks finished before shutdown returned");
    for h in handles {
        assert_eq!(h.status().await.unwrap().unwrap().state, TaskState::Succeeded);
    }
    assert_eq!(*order.lock().unwrap(), vec!["stopping", "shutdown"]);
    let c = app.broker.counts("default").await.unwrap();
    assert_eq!((c.pending, c.in_flight), (0, 0));
}

#[task(name = "runtime.counted")]
async fn counted(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Poll `f` until it holds, for at most `WAIT`.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let give_up = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < give_up, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_handle_counts_running_and_processed_deliveries() {
    let app = TestApp::new(Registry::new().register::<counted>());
    let worker = app.start_default();
    assert_eq!((worker.in_flight(), worker.processed()), (0, 0));
    let handles = app.stem.enqueue_many((0..3).map(|_| counted::new(400))).await.unwrap();
    eventually("three tasks run", || worker.in_flight() == 3).await;
    assert_eq!(worker.processed(), 0, "nothing finished while they all still run");
    for h in handles {
        h.wait(WAIT).await.unwrap();
    }
    // The record is stored before the ack, and the count moves after the ack.
    eventually("three deliveries are processed", || worker.processed() == 3).await;
    assert_eq!(worker.in_flight(), 0);
    let more = app.stem.enqueue_many((0..5).map(|_| counted::new(0))).await.unwrap();
    for h in more {
        h.wait(WAIT).await.unwrap();
    }
    eventually("eight deliveries are processed", || worker.processed() == 8).await;
    worker.shutdown().await.unwrap();
}

static SLOW_MODE: AtomicBool = AtomicBool::new(true);
static RELEASED_DONE: AtomicU32 = AtomicU32::new(0);

#[task(name = "runtime.release")]
async fn releasable() -> u32 {
    if SLOW_MODE.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    RELEASED_DONE.fetch_add(1, Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_grace_releases_unfinished_tasks_for_redelivery() {
    let app = TestApp::new(Registry::new().register::<releasable>());
    let mut config = app.config();
    config.shutdown_grace = Duration::from_millis(300);
    let worker = app.start(config);
    let handles = app.stem.enqueue_many((0..3).map(|_| releasable::new())).await.unwrap();
    while app.broker.counts("default").await.unwrap().in_flight < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t0 = Instant::now();
    worker.shutdown().await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "shutdown did not wait for the 60 s tasks");
    let c = app.broker.counts("default").await.unwrap();
    assert_eq!((c.pending, c.in_flight), (3, 0), "unfinished tasks went back to the queue");
    SLOW_MODE.store(false, Ordering::SeqCst);
    let worker = app.start_default();
    for h in &handles {
        h.wait(WAIT).await.unwrap();
    }
    assert_eq!(RELEASED_DONE.load(Ordering::SeqCst), 3, "nothing lost");
    worker.shutdown().await.unwrap();
}

static RUNNING_NOW: AtomicUsize = AtomicUsize::new(0);
static RUNNING_PEAK: AtomicUsize = AtomicUsize::new(0);

#[task(name = "runtime.bounded")]
async fn bounded() {
    let now = RUNNING_NOW.fetch_add(1, Ordering::SeqCst) + 1;
    RUNNING_PEAK.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    RUNNING_NOW.fetch_sub(1, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_bounded() {
    let app = TestApp::new(Registry::new().register::<bounded>());
    let mut config = app.config();
    config.concurrency = 3;
    let worker = app.start(config);
    let handles = app.stem.enqueue_many((0..12).map(|_| bounded::new())).await.unwrap();
    for h in handles {
        h.wait(WAIT).await.unwrap();
    }
    assert_eq!(RUNNING_PEAK.load(Ordering::SeqCst), 3, "never more than the limit, and the limit is used");
    worker.shutdown().await.unwrap();
}

#[task(name = "runtime.slow")]
async fn slow() {
    tokio::time::sleep(Duration::from_secs(3)).await;
}

#[task(name = "runtime.quick")]
async fn quick(i: u32) -> u32 {
    i
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_task_never_holds_short_ones_hostage() {
    let app = TestApp::new(Registry::new().register::<slow>().register::<quick>());
    let mut config = app.config();
    config.concurrency = 2;
    let worker = app.start(config);
    let long = app.stem.enqueue(slow::new()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    let shorts = app.stem.enqueue_many((0..20).map(quick::new)).await.unwrap();
    for h in shorts {
        h.wait(WAIT).await.unwrap();
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "short tasks ran on the free slot: {:?}", t0.elapsed());
    assert_eq!(
        long.status().await.unwrap().unwrap().state,
        TaskState::Running,
        "the long one is still running"
    );
    worker.shutdown().await.unwrap();
}

static PRIORITY_ORDER: Mutex<Vec<u8>> = Mutex::new(Vec::new());

#[task(name = "runtime.prioritized")]
async fn prioritized(p: u8) {
    PRIORITY_ORDER.lock().unwrap().push(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_runs_first() {
    let app = TestApp::new(Registry::new().register::<prioritized>());
    let mut handles = Vec::new();
    for p in [1u8, 9, 4, 9, 0] {
        handles.push(app.stem.enqueue(prioritized::new(p).priority(p)).await.unwrap());
    }
    let mut config = app.config();
    config.concurrency = 1;
    let worker = app.start(config);
    for h in handles {
        h.wait(WAIT).await.unwrap();
    }
    assert_eq!(*PRIORITY_ORDER.lock().unwrap(), vec![9, 9, 4, 1, 0]);
    worker.shutdown().await.unwrap();
}

static RATE_RUNS: Mutex<Vec<Instant>> = Mutex::new(Vec::new());

#[task(name = "runtime.rate_limited", rate_limit = "2/s")]
async fn rate_limited(i: u32) -> u32 {
    RATE_RUNS.lock().unwrap().push(Instant::now());
    i
}

#[tokio::test(start_paused = true)]
async fn rate_limited_tasks_are_delayed_not_failed() {
    let app = TestApp::new(Registry::new().register::<rate_limited>());
    let worker = app.start_default();
    let t0 = Instant::now();
    let handles = app.stem.enqueue_many((0..6).map(rate_limited::new)).await.unwrap();
    for (i, h) in handles.iter().enumerate() {
        assert_eq!(h.wait(Duration::from_secs(60)).await.unwrap(), i as u32, "every task succeeds");
    }
    let runs = RATE_RUNS.lock().unwrap().clone();
    assert_eq!(runs.len(), 6);
    // A burst of 2, then one every 500 ms: the 6th starts no earlier than 1.9 s in.
    let last = runs.iter().max().unwrap().duration_since(t0);
    assert!(last >= Duration::from_millis(1900), "{last:?}");
    for w in 0..runs.len() {
        let window = runs
            .iter()
            .filter(|t| **t >= runs[w] && t.duration_since(runs[w]) < Duration::from_millis(999))
            .count();
        // Bucket of 2 refilling 2/s: at most 2 + 1.998 starts in any 999 ms window.
        assert!(window <= 3, "{window} starts within one second");
    }
    worker.shutdown().await.unwrap();
}

#[task(name = "runtime.progress")]
async fn reports_progress(ctx: TaskContext) -> Result<(), TaskError> {
    ctx.progress(0.25, Some(json!({"stage": "download"}))).await?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    ctx.progress(0.75, None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_persisted_while_running() {
    let app = TestApp::new(Registry::new().register::<reports_progress>());
    let worker = app.start_default();
    let h = app.stem.enqueue(reports_progress::new()).await.unwrap();
    let give_up = Instant::now() + WAIT;
    let seen = loop {
        if let Some(p) = h.status().await.unwrap().and_then(|s| s.progress) {
            break p;
        }
        assert!(Instant::now() < give_up);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!((seen.fraction - 0.25).abs() < 1e-9);
    assert_eq!(seen.data, Some(json!({"stage": "download"})));
    h.wait(WAIT).await.unwrap();
    let last = h.status().await.unwrap().unwrap().progress.unwrap();
    assert!((last.fraction - 0.75).abs() < 1e-9);
    worker.shutdown().await.unwrap();
}

#[task(name = "runtime.leaf")]
async fn leaf(ctx: TaskContext) -> (String, String) {
    let env = ctx.envelope();
    (
        env.parent_id.map(|p| p.to_string()).unwrap_or_default(),
        env.root_id.map(|r| r.to_string()).unwrap_or_default(),
    )
}

#[task(name = "runtime.middle")]
async fn middle(ctx: TaskContext) -> Result<(String, String), TaskError> {
    let child = ctx.enqueue(leaf::new()).await.map_err(TaskError::retryable)?;
    Ok((ctx.id().to_string(), child.id().to_string()))
}

#[task(name = "runtime.root")]
async fn root(ctx: TaskContext) -> Result<String, TaskError> {
    let child = ctx.enqueue(middle::new()).await.map_err(TaskError::retryable)?;
    Ok(child.id().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_tasks_carry_parent_and_root_ids() {
    let app = TestApp::new(Registry::new().register::<root>().register::<middle>().register::<leaf>());
    let worker = app.start_default();
    let r = app.stem.enqueue(root::new()).await.unwrap();
    let middle_id: stem::TaskId = r.wait(WAIT).await.unwrap().parse().unwrap();
    let m = app.stem.handle::<(String, String)>(middle_id);
    let (m_id, leaf_id) = m.wait(WAIT).await.unwrap();
    assert_eq!(m_id, middle_id.to_string());
    let l = app.stem.handle::<(String, String)>(leaf_id.parse().unwrap());
    let (leaf_parent, leaf_root) = l.wait(WAIT).await.unwrap();
    assert_eq!(leaf_parent, middle_id.to_string());
    assert_eq!(leaf_root, r.id().to_string(), "the root id is the first task of the tree");
    let ms = app.status(middle_id).await;
    assert_eq!((ms.parent_id, ms.root_id), (Some(r.id()), Some(r.id())));
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_written_while_the_worker_runs() {
    let app = TestApp::new(Registry::new().register::<quick>());
    let beats = Arc::new(AtomicU32::new(0));
    let b = beats.clone();
    app.signals.connect(move |_: &WorkerHeartbeatSent| {
        b.fetch_add(1, Ordering::SeqCst);
    });
    let worker = app.start_default();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let workers = app.backend.workers().await.unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].pid, std::process::id());
    assert!(beats.load(Ordering::SeqCst) >= 2);
    worker.shutdown().await.unwrap();
}

#[task(name = "runtime.once_flaky", retries = 1, backoff_base = "10ms")]
async fn once_flaky(ctx: TaskContext) -> Result<u32, TaskError> {
    if ctx.attempt() == 0 { Err(TaskError::retryable("first try fails")) } else { Ok(1) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_fire_in_order_and_a_failing_listener_is_harmless() {
    let app = TestApp::new(Registry::new().register::<once_flaky>());
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    macro_rules! record {
        ($ty:ty, $label:expr) => {{
            let l = log.clone();
            app.signals.connect(move |_: &$ty| l.lock().unwrap().push($label.to_owned()));
        }};
    }
    app.signals.connect(|_: &TaskPrerun| panic!("a broken listener"));
    record!(BeforePublish, "before_publish");
    record!(AfterPublish, "after_publish");
    record!(TaskReceived, "received");
    record!(TaskPrerun, "prerun");
    record!(TaskRetried, "retried");
    record!(TaskSucceeded, "succeeded");
    record!(TaskPostrun, "postrun");
    record!(WorkerReady, "ready");
    let worker = app.start_default();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let h = app.stem.enqueue(once_flaky::new()).await.unwrap();
    assert_eq!(h.wait(WAIT).await.unwrap(), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    worker.shutdown().await.unwrap();
    let log = log.lock().unwrap().clone();
    // The producer's AfterPublish races with the worker receiving the task; everything else
    // has a fixed order.
    let publish_at = log.iter().position(|s| s == "before_publish").unwrap();
    let after_at = log.iter().position(|s| s == "after_publish").unwrap();
    assert!(publish_at < after_at);
    let worker_side: Vec<_> = log.iter().filter(|s| *s != "after_publish").map(String::as_str).collect();
    assert_eq!(
        worker_side,
        vec![
            "ready",
            "before_publish",
            "received",
            "prerun",
            "retried",
            "postrun",
            "received",
            "prerun",
            "succeeded",
            "postrun"
        ]
    );
}
