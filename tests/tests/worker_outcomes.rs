//! Worker outcomes: success, retries and backoff, fatal errors, DLQ reasons, bad input,
//! expiry, panics.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::json;
use stem::backend::TaskState;
use stem::prelude::*;
use stem::signals::{TaskRetried, TaskRevoked};
use stem::{EnqueueOptions, Registry, WaitError};
use stem_tests::support::TestApp;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(30);

#[task(name = "outcomes.add")]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_records_result_and_metadata() {
    let app = TestApp::new(Registry::new().register::<add>());
    let worker = app.start_default();
    let h = app.stem.enqueue(add::new(20, 22).meta("tenant", "acme")).await.unwrap();
    assert_eq!(h.wait(WAIT).await.unwrap(), 42);
    let s = app.status(h.id()).await;
    assert_eq!(s.state, TaskState::Succeeded);
    assert_eq!(s.result, Some(json!(42)));
    assert!(s.started_at.is_some() && s.finished_at.is_some() && s.worker_id.is_some());
    assert_eq!(s.meta.get("tenant"), Some(&json!("acme")));
    worker.shutdown().await.unwrap();
}

static FLAKY_RUNS: AtomicU32 = AtomicU32::new(0);

#[task(name = "outcomes.flaky", retries = 3, backoff_base = "10ms", backoff_jitter = false)]
async fn flaky(ctx: TaskContext) -> Result<u32, TaskError> {
    FLAKY_RUNS.fetch_add(1, Ordering::SeqCst);
    if ctx.attempt() < 2 {
        return Err(TaskError::new("transient", format!("attempt {} failed", ctx.attempt())));
    }
    Ok(ctx.attempt())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_until_success() {
    let app = TestApp::new(Registry::new().register::<flaky>());
    let retried = std::sync::Arc::new(AtomicU32::new(0));
    let r = retried.clone();
    app.signals.connect(move |_: &TaskRetried| {
        r.fetch_add(1, Ordering::SeqCst);
    });
    let worker = app.start_default();
    let h = app.stem.enqueue(flaky::new()).await.unwrap();
    assert_eq!(h.wait(WAIT).await.unwrap(), 2, "third attempt (attempt 2) succeeds");
    assert_eq!(FLAKY_RUNS.load(Ordering::SeqCst), 3);
    assert_eq!(retried.load(Ordering::SeqCst), 2);
    assert_eq!(app.status(h.id()).await.attempt, 2);
    assert!(app.dead("default", 0).await.is_empty(), "a retry is not a dead letter");
    worker.shutdown().await.unwrap();
}

static ALWAYS_RUNS: AtomicU32 = AtomicU32::new(0);

#[task(name = "outcomes.always_fails", retries = 2, backoff_base = "10ms")]
async fn always_fails() -> Result<(), TaskError> {
    ALWAYS_RUNS.fetch_add(1, Ordering::SeqCst);
    Err(TaskError::new("boom", "it always fails"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_fail_and_dead_letter() {
    let app = TestApp::new(Registry::new().register::<always_fails>());
    let worker = app.start_default();
    let h = app.stem.enqueue(always_fails::new()).await.unwrap();
    match h.wait(WAIT).await {
        Err(WaitError::Failed { error, .. }) => {
            assert_eq!(error.kind, "boom");
            assert_eq!(error.message, "it always fails");
        }
        other => panic!("expected failure, got {other:?}"),
    }
    assert_eq!(ALWAYS_RUNS.load(Ordering::SeqCst), 3, "one run plus two retries");
    let dead = app.dead("default", 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "max-retries-exceeded");
    assert!(dead[0].detail.contains("it always fails"));
    assert_eq!(dead[0].envelope.as_ref().unwrap().attempt, 2);
    assert_eq!(app.status(h.id()).await.state, TaskState::Failed);
    worker.shutdown().await.unwrap();
}

static BACKOFF_TIMES: Mutex<Vec<Instant>> = Mutex::new(Vec::new());

#[task(name = "outcomes.backoff", retries = 4, backoff_base = "1s", backoff_max = "3s")]
async fn backoff_probe() -> Result<(), TaskError> {
    BACKOFF_TIMES.lock().unwrap().push(Instant::now());
    Err(TaskError::retryable("again"))
}

#[tokio::test(start_paused = true)]
async fn backoff_is_exponential_jittered_and_capped() {
    let app = TestApp::new(Registry::new().register::<backoff_probe>());
    let worker = app.start_default();
    let h = app.stem.enqueue(backoff_probe::new()).await.unwrap();
    assert!(h.wait(Duration::from_secs(120)).await.is_err());
    let times = BACKOFF_TIMES.lock().unwrap().clone();
    assert_eq!(times.len(), 5);
    // Nominal delays 1s, 2s, 3s (capped), 3s; equal jitter keeps each in [nominal/2, nominal].
    let nominal = [1000u64, 2000, 3000, 3000];
    for (i, pair) in times.windows(2).enumerate() {
        let gap = pair[1].duration_since(pair[0]);
        let lo = Duration::from_millis(nominal[i] / 2);
        let hi = Duration::from_millis(nominal[i] + 250);
        assert!(gap >= lo && gap <= hi, "retry {} waited {gap:?}, expected within [{lo:?}, {hi:?}]", i + 1);
    }
    worker.shutdown().await.unwrap();
}

static FATAL_RUNS: AtomicU32 = AtomicU32::new(0);

#[task(name = "outcomes.fatal", retries = 5)]
async fn fatal() -> Result<(), TaskError> {
    FATAL_RUNS.fetch_add(1, Ordering::SeqCst);
    Err(TaskError::fatal("bad request"))
}

static FILTERED_RUNS: AtomicU32 = AtomicU32::new(0);

#[task(name = "outcomes.filtered", retries = 5, retry_for = ["timeout"], backoff_base = "10ms")]
async fn filtered(kind: String) -> Result<(), TaskError> {
    let n = FILTERED_RUNS.fetch_add(1, Ordering::SeqCst);
    // The first attempt fails with a retried kind, the second with one that is not.
    Err(TaskError::new(if n == 0 { "timeout".to_owned() } else { kind }, "nope"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_errors_and_filtered_kinds_are_not_retried() {
    let app = TestApp::new(Registry::new().register::<fatal>().register::<filtered>());
    let worker = app.start_default();
    let a = app.stem.enqueue(fatal::new()).await.unwrap();
    let b = app.stem.enqueue(filtered::new("http")).await.unwrap();
    assert!(matches!(a.wait(WAIT).await, Err(WaitError::Failed { .. })));
    assert!(matches!(b.wait(WAIT).await, Err(WaitError::Failed { .. })));
    assert_eq!(FATAL_RUNS.load(Ordering::SeqCst), 1, "fatal is never retried");
    assert_eq!(FILTERED_RUNS.load(Ordering::SeqCst), 2, "`timeout` retried once, `http` not");
    let reasons: Vec<_> = app.dead("default", 2).await.into_iter().map(|d| d.reason).collect();
    assert_eq!(reasons, vec!["task-failed", "task-failed"]);
    worker.shutdown().await.unwrap();
}

static EXPLICIT_TIMES: Mutex<Vec<Instant>> = Mutex::new(Vec::new());

#[task(name = "outcomes.explicit_retry", retries = 1)]
async fn explicit_retry(ctx: TaskContext) -> Result<String, TaskError> {
    EXPLICIT_TIMES.lock().unwrap().push(Instant::now());
    if ctx.attempt() == 0 {
        return Err(ctx.retry(Duration::from_secs(7)));
    }
    Ok("done".to_owned())
}

#[tokio::test(start_paused = true)]
async fn explicit_retry_uses_its_delay() {
    let app = TestApp::new(Registry::new().register::<explicit_retry>());
    let worker = app.start_default();
    let h = app.stem.enqueue(explicit_retry::new()).await.unwrap();
    assert_eq!(h.wait(Duration::from_secs(60)).await.unwrap(), "done");
    let t = EXPLICIT_TIMES.lock().unwrap().clone();
    let gap = t[1].duration_since(t[0]);
    assert!(gap >= Duration::from_secs(7) && gap < Duration::from_secs(8), "{gap:?}");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_task_is_dead_lettered_and_worker_goes_on() {
    let app = TestApp::new(Registry::new().register::<add>());
    let worker = app.start_default();
    let ghost = app.stem.enqueue_raw("outcomes.ghost", json!({}), EnqueueOptions::default()).await.unwrap();
    let status = ghost.wait_status(WAIT).await.unwrap();
    assert_eq!(status.state, TaskState::Failed);
    assert_eq!(status.error.unwrap().kind, "unregistered-task");
    let dead = app.dead("default", 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "unregistered-task");
    assert!(dead[0].detail.contains("outcomes.ghost"));
    let h = app.stem.enqueue(add::new(1, 1)).await.unwrap();
    assert_eq!(h.wait(WAIT).await.unwrap(), 2, "the worker keeps going");
    worker.shutdown().await.unwrap();
}

/// What follows a group travels as text and is read only by the member that completes the
/// group; if it does not read, that member is dead-lettered with the reason (never retried
/// forever), the group's claim is left alone, and the worker goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_group_continuation_is_dead_lettered() {
    use stem::backend::ResultBackend as _;
    use stem::broker::Broker as _;
    let app = TestApp::new(Registry::new().register::<add>());
    let group = stem::TaskId::new();
    app.backend.group_init(group, 1).await.unwrap();
    let mut member = stem::Envelope::new("outcomes.add", json!({ "a": 1, "b": 2 }));
    member.canvas = Some(Box::new(
        serde_json::from_value(json!({
            "k": "member", "group": group, "index": 0, "then": { "k": "sideways" }
        }))
        .unwrap(),
    ));
    app.broker.publish(vec![member.clone()]).await.unwrap();
    let worker = app.start_default();
    let dead = app.dead("default", 1).await;
    assert_eq!(dead[0].reason, "malformed-envelope");
    assert!(
        dead[0].detail.contains("canvas continuation") && dead[0].detail.contains("sideways"),
        "{}",
        dead[0].detail
    );
    assert_eq!(dead[0].envelope.as_ref().unwrap().id, member.id);
    let state = app.backend.group_get(group).await.unwrap().unwrap();
    assert!(!state.claimed, "the claim is still there for a replay that can read it");
    let h = app.stem.enqueue(add::new(1, 1)).await.unwrap();
    assert_eq!(h.wait(WAIT).await.unwrap(), 2, "the worker keeps going");
    worker.shutdown().await.unwrap();
}

static TYPED_RUNS: AtomicU32 = AtomicU32::new(0);

#[task(name = "outcomes.typed", retries = 3)]
async fn typed(count: u32, label: String) -> String {
    TYPED_RUNS.fetch_add(1, Ordering::SeqCst);
    format!("{label}:{count}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_arguments_fail_once_with_a_clear_reason() {
    let app = TestApp::new(Registry::new().register::<typed>());
    let worker = app.start_default();
    let wrong = app
        .stem
        .enqueue_raw("outcomes.typed", json!({"count": "seven", "label": "x"}), EnqueueOptions::default())
        .await
        .unwrap();
    let missing =
        app.stem.enqueue_raw("outcomes.typed", json!({"count": 1}), EnqueueOptions::default()).await.unwrap();
    for h in [&wrong, &missing] {
        let s = h.wait_status(WAIT).await.unwrap();
        assert_eq!(s.state, TaskState::Failed);
        assert_eq!(s.error.as_ref().unwrap().kind, "invalid-args");
        assert!(!s.error.unwrap().retryable);
    }
    let dead = app.dead("default", 2).await;
    assert_eq!(dead.len(), 2, "each dead-lettered once, never retried");
    assert!(dead.iter().all(|d| d.reason == "invalid-args"));
    let details: Vec<_> = dead.iter().map(|d| d.detail.as_str()).collect();
    assert!(details.iter().any(|d| d.contains("argument `count`: invalid type")), "{details:?}");
    assert!(details.iter().any(|d| d.contains("missing argument `label`")), "{details:?}");
    assert_eq!(TYPED_RUNS.load(Ordering::SeqCst), 0, "the task never ran");
    let ok = app.stem.enqueue(typed::new(3, "ok")).await.unwrap();
    assert_eq!(ok.wait(WAIT).await.unwrap(), "ok:3");
    worker.shutdown().await.unwrap();
}

static EXPIRED_RUNS: AtomicU32 = AtomicU32::new(0);

#[task(name = "outcomes.expiring")]
async fn expiring() {
    EXPIRED_RUNS.fetch_add(1, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tasks_are_cancelled_not_run() {
    let app = TestApp::new(Registry::new().register::<expiring>());
    let revoked = std::sync::Arc::new(Mutex::new(Vec::new()));
    let r = revoked.clone();
    app.signals.connect(move |s: &TaskRevoked| r.lock().unwrap().push(s.reason.clone()));
    let h = app.stem.enqueue(expiring::new().expires_in(Duration::from_millis(50))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let worker = app.start_default();
    assert!(matches!(h.wait(WAIT).await, Err(WaitError::Cancelled { .. })));
    assert_eq!(EXPIRED_RUNS.load(Ordering::SeqCst), 0);
    assert_eq!(*revoked.lock().unwrap(), vec!["expired".to_owned()]);
    worker.shutdown().await.unwrap();
}

static PANIC_RUNS: AtomicU32 = AtomicU32::new(0);

#[task(name = "outcomes.panics", retries = 1, backoff_base = "10ms")]
async fn panics() -> u32 {
    PANIC_RUNS.fetch_add(1, Ordering::SeqCst);
    panic!("kaboom")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_the_attempt_not_the_worker() {
    let app = TestApp::new(Registry::new().register::<panics>().register::<add>());
    let worker = app.start_default();
    let h = app.stem.enqueue(panics::new()).await.unwrap();
    match h.wait(WAIT).await {
        Err(WaitError::Failed { error, .. }) => {
            assert_eq!(error.kind, "panic");
            assert!(error.message.contains("kaboom"));
        }
        other => panic!("expected failure, got {other:?}"),
    }
    assert_eq!(PANIC_RUNS.load(Ordering::SeqCst), 2, "a panic takes the retry path");
    let ok = app.stem.enqueue(add::new(2, 2)).await.unwrap();
    assert_eq!(ok.wait(WAIT).await.unwrap(), 4);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_and_by_name_enqueue() {
    let app = TestApp::new(Registry::new().register::<add>());
    let worker = app.start_default();
    let handles = app.stem.enqueue_many((0..100).map(|i| add::new(i, i))).await.unwrap();
    for (i, h) in handles.iter().enumerate() {
        assert_eq!(h.wait(WAIT).await.unwrap(), 2 * i as i64);
    }
    let raw = app
        .stem
        .enqueue_raw("outcomes.add", json!({"a": 5, "b": 6}), EnqueueOptions::default())
        .await
        .unwrap();
    assert_eq!(raw.wait(WAIT).await.unwrap(), json!(11));
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_payload_is_refused_at_enqueue_and_nothing_is_stored() {
    use stem::Broker;
    let app = TestApp::new(Registry::new().register::<typed>());
    let stem = stem::Stem::builder(app.broker.clone(), app.backend.clone()).max_payload_bytes(1024).build();
    let err = match stem.enqueue(typed::new(1, "x".repeat(4096))).await {
        Err(e) => e,
        Ok(h) => panic!("an oversized task was accepted: {}", h.id()),
    };
    assert!(matches!(err, stem::Error::PayloadTooLarge { size, limit: 1024, .. } if size > 4096), "{err}");
    assert!(err.to_string().contains("outcomes.typed"), "{err}");
    assert_eq!(app.broker.counts("default").await.unwrap().pending, 0, "nothing was published");
    let ok = stem.enqueue(typed::new(1, "small")).await.unwrap();
    assert_eq!(app.broker.counts("default").await.unwrap().pending, 1);
    assert!(ok.status().await.unwrap().is_some());
}
