//! Canvas checks (chains, groups, chords, nesting, callbacks) run against every adapter.
//!
//! Each check takes a fresh namespace and runs the canvas on separate worker instances that
//! share only the adapter (their own broker and backend handles, their own producers), as
//! separate processes would. Side effects are counted per check under a unique tag, and
//! counted only after the queue is drained and the workers are shut down, so "exactly once"
//! and "never" are asserted on a quiet system, never after a hopeful sleep.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use stem::backend::{
    GroupCounts, GroupState, MemberOutcome, MemberRecord, Progress, ResultBackend, TaskState, TaskStatus,
    WorkerHeartbeat,
};
use stem::broker::{BoxFuture, Broker};
use stem::canvas::{CanvasFailure, Group, NoInput, StepExt};
use stem::prelude::*;
use stem::{Registry, TaskId, Worker, WorkerConfig, WorkerHandle};
use tokio::time::Instant;

use crate::{Harness, namespace};

const TTL: Duration = Duration::from_secs(3600);
const WAIT: Duration = Duration::from_secs(60);

/// Values recorded by tasks, per tag (one tag per check).
static RECORDS: LazyLock<Mutex<HashMap<String, Vec<serde_json::Value>>>> = LazyLock::new(Default::default);

fn record(tag: &str, value: impl serde::Serialize) {
    let value = serde_json::to_value(value).unwrap();
    RECORDS.lock().unwrap().entry(tag.to_owned()).or_default().push(value);
}

fn records(tag: &str) -> Vec<serde_json::Value> {
    RECORDS.lock().unwrap().get(tag).cloned().unwrap_or_default()
}

#[task(name = "canvas.add")]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[task(name = "canvas.mul")]
async fn mul(a: i64, b: i64) -> i64 {
    a * b
}

/// The chord callback: counts its runs under `tag`.
#[task(name = "canvas.sum")]
async fn sum(values: Vec<i64>, tag: String) -> i64 {
    record(&tag, &values);
    values.iter().sum()
}

/// Records `n` under `tag` and passes it on.
#[task(name = "canvas.note")]
async fn note(n: i64, tag: String) -> i64 {
    record(&tag, n);
    n
}

/// Fails (after one retry) when `a == bad`.
#[task(name = "canvas.fail_if", retries = 1, backoff_base = "10ms", backoff_jitter = false)]
async fn fail_if(a: i64, bad: i64, tag: String) -> Result<i64, TaskError> {
    if a == bad {
        record(&format!("{tag}:attempts"), a);
        return Err(TaskError::new("boom", format!("member {a} failed")));
    }
    Ok(a)
}

/// An error callback: records the failure it receives.
#[task(name = "canvas.on_error")]
async fn on_error(failure: CanvasFailure, tag: String) {
    record(&tag, failure);
}

/// Reports progress twice while running, then returns `n`.
#[task(name = "canvas.progress")]
async fn reports_progress(ctx: TaskContext, n: i64) -> Result<i64, TaskError> {
    ctx.progress(0.25, Some(serde_json::json!({"stage": "first"}))).await?;
    tokio::time::sleep(Duration::from_millis(30)).await;
    ctx.progress(0.75, None).await?;
    Ok(n)
}

fn registry() -> Arc<Registry> {
    Arc::new(
        Registry::new()
            .register::<reports_progress>()
            .register::<add>()
            .register::<mul>()
            .register::<sum>()
            .register::<note>()
            .register::<fail_if>()
            .register::<on_error>()
            .build()
            .unwrap(),
    )
}

/// A producer and `workers` worker instances on one namespace of `h`.
pub struct CanvasEnv {
    pub stem: Stem,
    pub broker: Arc<dyn Broker>,
    pub backend: Arc<dyn ResultBackend>,
    workers: Vec<WorkerHandle>,
    pub tag: String,
}

impl CanvasEnv {
    pub async fn new(h: &impl Harness, workers: usize) -> Self {
        Self::with_ttl(h, workers, TTL).await
    }

    /// Like [`CanvasEnv::new`], with every backend handle keeping results for `ttl`.
    pub async fn with_ttl(h: &impl Harness, workers: usize, ttl: Duration) -> Self {
        Self::build(h, workers, ttl, |b| b).await
    }

    /// Like [`CanvasEnv::new`], each worker's backend handle passed through `wrap` first.
    pub async fn with_worker_backends(
        h: &impl Harness,
        workers: usize,
        wrap: impl Fn(Arc<dyn ResultBackend>) -> Arc<dyn ResultBackend>,
    ) -> Self {
        Self::build(h, workers, TTL, wrap).await
    }

    async fn build(
        h: &impl Harness,
        workers: usize,
        ttl: Duration,
        wrap: impl Fn(Arc<dyn ResultBackend>) -> Arc<dyn ResultBackend>,
    ) -> Self {
        let ns = namespace();
        let broker = h.broker(&ns).await;
        let backend = h.backend(&ns, ttl).await;
        let registry = registry();
        let stem =
            Stem::builder(Arc::clone(&broker), Arc::clone(&backend)).registry(Arc::clone(&registry)).build();
        let mut handles = Vec::new();
        for _ in 0..workers {
            let mut config = WorkerConfig::default();
            config.concurrency = 8;
            config.fetch_wait = Duration::from_millis(200);
            config.heartbeat_interval = Duration::from_millis(500);
            config.shutdown_grace = Duration::from_secs(10);
            // Each worker has its own adapter handles and its own producer.
            let worker = Worker::builder(h.broker(&ns).await, wrap(h.backend(&ns, ttl).await))
                .registry(Arc::clone(&registry))
                .config(config)
                .build()
                .unwrap();
            handles.push(worker.spawn());
        }
        CanvasEnv { stem, broker, backend, workers: handles, tag: ns }
    }

    /// Wait until the queue is empty (nothing pending, delayed or in flight), then stop the
    /// workers: every side effect has happened by then.
    pub async fn drain(self) {
        let give_up = Instant::now() + WAIT;
        loop {
            let c = self.broker.counts("default").await.unwrap();
            if c.pending == 0 && c.delayed == 0 && c.in_flight == 0 {
                break;
            }
            assert!(Instant::now() < give_up, "queue did not drain: {c:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for w in self.workers {
            w.shutdown().await.unwrap();
        }
    }

    /// Stop the workers gracefully, whatever is left in the queue.
    pub async fn shutdown(self) {
        for w in self.workers {
            w.shutdown().await.unwrap();
        }
    }

    /// Wait until `tag` has `n` records.
    pub async fn until_records(&self, tag: &str, n: usize) {
        let give_up = Instant::now() + WAIT;
        while records(tag).len() < n {
            assert!(Instant::now() < give_up, "{tag}: {} of {n} records", records(tag).len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub async fn group_of_100_returns_results_in_order(h: &impl Harness) {
    let env = CanvasEnv::new(h, 2).await;
    let group: Group<NoInput, i64> = Group::of((0..100).map(|i| mul::new(i, 2)));
    let handle = env.stem.enqueue_canvas(group).await.unwrap();
    let results = handle.wait(WAIT).await.unwrap();
    assert_eq!(results, (0..100).map(|i| i * 2).collect::<Vec<i64>>(), "{}: member order", h.name());
    let counts = handle.progress().await.unwrap().expect("group state");
    assert_eq!((counts.total, counts.succeeded, counts.failed, counts.completed()), (100, 100, 0, 100));
    let status = handle.status().await.unwrap().unwrap();
    assert_eq!(status.state, TaskState::Succeeded);
    env.drain().await;
}

pub async fn chain_of_5_passes_results_along(h: &impl Harness) {
    let env = CanvasEnv::new(h, 2).await;
    // 1+2 = 3 → 3*2 = 6 → 6+4 = 10 → 10*3 = 30 → note(30)
    let tag = env.tag.clone();
    let chain = canvas!(chain[add(1, 2), mul(2), add(4), mul(3), note(tag.clone())]);
    let handle = env.stem.enqueue_canvas(chain).await.unwrap();
    assert_eq!(handle.wait(WAIT).await.unwrap(), 30, "{}", h.name());
    env.drain().await;
    assert_eq!(records(&tag), vec![serde_json::json!(30)], "the last step ran once");
}

pub async fn chord_of_50_on_4_workers_calls_back_exactly_once(h: &impl Harness) {
    let env = CanvasEnv::new(h, 4).await;
    let tag = env.tag.clone();
    let header: Group<NoInput, i64> = Group::of((0..50).map(|i| add::new(i, 1000)));
    let chord = header.chord(sum::partial(tag.clone()));
    let handle = env.stem.enqueue_canvas(chord).await.unwrap();
    let expected: i64 = (0..50).map(|i| i + 1000).sum();
    assert_eq!(handle.wait(WAIT).await.unwrap(), expected, "{}", h.name());
    let counts = handle.progress().await.unwrap().expect("header state");
    assert_eq!((counts.succeeded, counts.failed), (50, 0));
    env.drain().await;
    let calls = records(&tag);
    assert_eq!(calls.len(), 1, "{}: the callback ran exactly once", h.name());
    let got: Vec<i64> = serde_json::from_value(calls[0].clone()).unwrap();
    assert_eq!(got, (0..50).map(|i| i + 1000).collect::<Vec<_>>(), "member order, not completion order");
}

pub async fn failing_chain_step_stops_later_steps(h: &impl Harness) {
    let env = CanvasEnv::new(h, 2).await;
    let tag = env.tag.clone();
    // add(1, 1) = 2 → fail_if(2, bad = 2) fails after its retry → note never runs.
    let chain = canvas!(chain[add(1, 1), fail_if(2, tag.clone()), note(tag.clone())]);
    let handle = env.stem.enqueue_canvas(chain).await.unwrap();
    match handle.wait(WAIT).await {
        Err(WaitError::Failed { error, .. }) => {
            assert_eq!((error.kind.as_str(), error.message.as_str()), ("boom", "member 2 failed"))
        }
        other => panic!("{}: the chain must fail, got {other:?}", h.name()),
    }
    env.drain().await;
    assert!(records(&tag).is_empty(), "a step after the failed one never runs");
    assert_eq!(records(&format!("{tag}:attempts")).len(), 2, "the failing step ran its retry first");
}

pub async fn failing_chord_member_runs_error_callback_once(h: &impl Harness) {
    let env = CanvasEnv::new(h, 4).await;
    let tag = env.tag.clone();
    let errors = format!("{tag}:errors");
    let header: Group<NoInput, i64> = Group::of((0..10).map(|i| fail_if::new(i, 7, tag.clone())));
    let chord = header.chord(sum::partial(tag.clone())).link_error(on_error::partial(errors.clone()));
    let handle = env.stem.enqueue_canvas(chord).await.unwrap();
    match handle.wait(WAIT).await {
        Err(WaitError::Failed { error, .. }) => {
            assert_eq!((error.kind.as_str(), error.message.as_str()), ("boom", "member 7 failed"))
        }
        other => panic!("{}: the chord must fail, got {other:?}", h.name()),
    }
    let status = handle.status().await.unwrap().unwrap();
    assert_eq!(status.state, TaskState::Failed);
    env.until_records(&errors, 1).await;
    env.drain().await;
    assert!(records(&tag).is_empty(), "{}: the chord callback never runs", h.name());
    let failures = records(&errors);
    assert_eq!(failures.len(), 1, "{}: the error callback runs exactly once", h.name());
    let failure: CanvasFailure = serde_json::from_value(failures[0].clone()).unwrap();
    assert_eq!((failure.kind.as_str(), failure.message.as_str()), ("boom", "member 7 failed"));
}

pub async fn chain_of_groups(h: &impl Harness) {
    let env = CanvasEnv::new(h, 2).await;
    let tag = env.tag.clone();
    // [2, 4] → 6 → [6+1, 6*2] = [7, 12] → 19
    let c = canvas!(chain[
        group[add(1, 1), add(2, 2)],
        sum(tag.clone()),
        group[add(1), mul(2)],
        sum(tag.clone()),
    ]);
    let handle = env.stem.enqueue_canvas(c).await.unwrap();
    assert_eq!(handle.wait(WAIT).await.unwrap(), 19, "{}", h.name());
    env.drain().await;
    assert_eq!(records(&tag), vec![serde_json::json!([2, 4]), serde_json::json!([7, 12])]);
}

pub async fn chord_inside_a_chain(h: &impl Harness) {
    let env = CanvasEnv::new(h, 2).await;
    let tag = env.tag.clone();
    // 3 → chord[3+1, 3*2] = [4, 6] → 10 → 110
    let c = canvas!(chain[add(1, 2), chord[add(1), mul(2)] => sum(tag.clone()), add(100)]);
    let handle = env.stem.enqueue_canvas(c).await.unwrap();
    assert_eq!(handle.wait(WAIT).await.unwrap(), 110, "{}", h.name());
    env.drain().await;
    assert_eq!(records(&tag), vec![serde_json::json!([4, 6])]);
}

pub async fn group_of_chains(h: &impl Harness) {
    let env = CanvasEnv::new(h, 2).await;
    let c = canvas!(group[chain[add(1, 1), mul(3)], chain[add(2, 2), mul(3), add(1)], mul(5, 5)]);
    let handle = env.stem.enqueue_canvas(c).await.unwrap();
    assert_eq!(handle.wait(WAIT).await.unwrap(), vec![6, 13, 25], "{}", h.name());
    env.drain().await;
}

pub async fn chord_with_chains_in_its_header(h: &impl Harness) {
    let env = CanvasEnv::new(h, 2).await;
    let tag = env.tag.clone();
    // Header: [chain 2 → 20, chain 4 → 40, inner chord sum([1]) = 1] → sum([20, 40, 1]) = 61.
    let c = canvas!(chord[
        chain[add(1, 1), mul(10)],
        chain[add(2, 2), mul(10)],
        chord[add(0, 1)] => sum(tag.clone()),
    ] => sum(tag.clone()));
    let handle = env.stem.enqueue_canvas(c).await.unwrap();
    assert_eq!(handle.wait(WAIT).await.unwrap(), 61, "{}", h.name());
    env.drain().await;
    assert_eq!(records(&tag), vec![serde_json::json!([1]), serde_json::json!([20, 40, 1])]);
}

pub async fn link_and_link_error(h: &impl Harness) {
    let env = CanvasEnv::new(h, 2).await;
    let tag = env.tag.clone();
    let ok = format!("{tag}:ok");
    let err = format!("{tag}:err");
    // Success: the link gets the output, the error callback does not run.
    let linked = add::new(20, 22).link(note::partial(ok.clone())).link_error(on_error::partial(err.clone()));
    let handle = env.stem.enqueue_canvas(linked).await.unwrap();
    assert_eq!(handle.wait(WAIT).await.unwrap(), 42);
    // Failure: the error callback gets the failure, the link does not run.
    let failing = fail_if::new(5, 5, tag.clone())
        .link(note::partial(ok.clone()))
        .link_error(on_error::partial(err.clone()));
    let failed = env.stem.enqueue_canvas(failing).await.unwrap();
    assert!(matches!(failed.wait(WAIT).await, Err(WaitError::Failed { .. })));
    env.until_records(&ok, 1).await;
    env.until_records(&err, 1).await;
    env.drain().await;
    assert_eq!(records(&ok), vec![serde_json::json!(42)], "{}: link ran once with the output", h.name());
    let failures = records(&err);
    assert_eq!(failures.len(), 1, "{}: error callback ran once", h.name());
    let failure: CanvasFailure = serde_json::from_value(failures[0].clone()).unwrap();
    assert_eq!(failure.task_id, failed.id());
    assert_eq!(failure.message, "member 5 failed");
}

pub async fn immutable_steps_ignore_the_previous_output(h: &impl Harness) {
    let env = CanvasEnv::new(h, 2).await;
    let tag = env.tag.clone();
    // 3 → ~add(10, 20) ignores 3 → 30 → add(<30>, 5) = 35 → ~note(7) ignores 35 → 7
    let c = canvas!(chain[add(1, 2), ~add(10, 20), add(5), ~note(7, tag.clone())]);
    let handle = env.stem.enqueue_canvas(c).await.unwrap();
    assert_eq!(handle.wait(WAIT).await.unwrap(), 7, "{}", h.name());
    // The partial step received 30 as its first argument `a`.
    let c = canvas!(chain[~add(10, 20), add(5)]);
    assert_eq!(env.stem.enqueue_canvas(c).await.unwrap().wait(WAIT).await.unwrap(), 35);
    env.drain().await;
    assert_eq!(records(&tag), vec![serde_json::json!(7)]);
}

/// Not a canvas shape but a worker check that needs the same environment: the last progress
/// a task reported stays on its final record (the record carries it), whatever the adapter
/// does with separately stored reports when the outcome is written.
pub async fn progress_reported_by_a_task_stays_on_its_final_record(h: &impl Harness) {
    let env = CanvasEnv::new(h, 1).await;
    let handles: Vec<_> = {
        let mut v = Vec::new();
        for n in 0..8 {
            v.push(env.stem.enqueue(reports_progress::new(n)).await.unwrap());
        }
        v
    };
    for (n, handle) in (0..).zip(&handles) {
        assert_eq!(handle.wait(WAIT).await.unwrap(), n);
        let status = env.backend.get(handle.id()).await.unwrap().expect("a record");
        assert_eq!(status.state, TaskState::Succeeded);
        let progress = status.progress.expect("the final record keeps the progress");
        assert!((progress.fraction - 0.75).abs() < 1e-9, "the last report: {progress:?}");
    }
    env.drain().await;
}

pub async fn group_progress_counts_failures(h: &impl Harness) {
    let env = CanvasEnv::new(h, 2).await;
    let tag = env.tag.clone();
    let group: Group<NoInput, i64> = Group::of((0..6).map(|i| fail_if::new(i, 3, tag.clone())));
    let handle = env.stem.enqueue_canvas(group).await.unwrap();
    assert!(matches!(handle.wait(WAIT).await, Err(WaitError::Failed { .. })), "{}", h.name());
    env.drain().await;
    let counts = handle.progress().await.unwrap().expect("group state");
    assert_eq!((counts.total, counts.succeeded, counts.failed), (6, 5, 1));
    let state = handle.group_state().await.unwrap().unwrap();
    assert_eq!(state.members[3].as_ref().map(|m| m.state), Some(TaskState::Failed));
    assert_eq!(state.members[4].as_ref().and_then(|m| m.result.clone()), Some(serde_json::json!(4)));
}

/// At-least-once delivery: every first envelope of a chord-in-a-chain is delivered twice (as a
/// redelivery would). Members are recorded once per index and every later start is claimed,
/// so the callback and the step after it still run exactly once.
pub async fn duplicate_deliveries_start_nothing_twice(h: &impl Harness) {
    let env = CanvasEnv::new(h, 4).await;
    let tag = env.tag.clone();
    let after = format!("{tag}:after");
    let published = Arc::new(Mutex::new(Vec::new()));
    let signals = stem::Signals::new();
    let sink = Arc::clone(&published);
    signals.connect(move |e: &stem::signals::BeforePublish| sink.lock().unwrap().push(e.envelope.clone()));
    let stem = Stem::builder(Arc::clone(&env.broker), Arc::clone(&env.backend)).signals(signals).build();
    let header: Group<NoInput, i64> = Group::of((0..20).map(|i| add::new(i, 1)));
    let c =
        stem::canvas::Chain::new(header.chord(sum::partial(tag.clone()))).then(note::partial(after.clone()));
    let handle = stem.enqueue_canvas(c).await.unwrap();
    let copies = std::mem::take(&mut *published.lock().unwrap());
    assert_eq!(copies.len(), 20);
    assert!(copies.iter().all(|e| e.canvas.is_some()), "members carry their continuation");
    env.broker.publish(copies).await.unwrap();
    let expected: i64 = (1..=20).sum();
    assert_eq!(handle.wait(WAIT).await.unwrap(), expected, "{}", h.name());
    env.drain().await;
    assert_eq!(records(&tag).len(), 1, "{}: the chord callback ran once", h.name());
    assert_eq!(records(&after), vec![serde_json::json!(expected)], "{}: the next step ran once", h.name());
}

/// Group and chord state (counters, member slots, the claim) and the records expire with the
/// backend's result TTL, like any result.
pub async fn canvas_state_expires_with_the_result_ttl(h: &impl Harness) {
    let ttl = Duration::from_secs(4);
    let env = CanvasEnv::with_ttl(h, 2, ttl).await;
    let tag = env.tag.clone();
    let header: Group<NoInput, i64> = Group::of((0..5).map(|i| add::new(i, 1)));
    let handle = env.stem.enqueue_canvas(header.chord(sum::partial(tag.clone()))).await.unwrap();
    assert_eq!(handle.wait(WAIT).await.unwrap(), 15, "{}", h.name());
    let counts = handle.progress().await.unwrap().expect("header state before the TTL");
    assert_eq!(counts.succeeded, 5);
    env.drain().await;
    let give_up = Instant::now() + ttl + Duration::from_secs(10);
    loop {
        let group = handle.progress().await.unwrap();
        let record = handle.status().await.unwrap();
        if group.is_none() && record.is_none() {
            break;
        }
        assert!(
            Instant::now() < give_up,
            "{}: canvas state outlived the TTL (group {group:?}, callback record {:?})",
            h.name(),
            record.map(|r| r.state)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(records(&tag).len(), 1, "{}: the callback ran once", h.name());
}

/// A backend handle whose group member records fail (as a backend outage would) until
/// `failures` calls have failed, and answer only after `delay` (a slow backend); everything
/// else goes to the real backend.
struct FailingMemberRecords {
    inner: Arc<dyn ResultBackend>,
    failures: Arc<AtomicUsize>,
    delay: Duration,
}

impl FailingMemberRecords {
    fn fail(&self) -> bool {
        self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }
}

impl ResultBackend for FailingMemberRecords {
    fn set(&self, statuses: Vec<TaskStatus>) -> BoxFuture<'_, stem::Result<()>> {
        self.inner.set(statuses)
    }
    fn get(&self, id: TaskId) -> BoxFuture<'_, stem::Result<Option<TaskStatus>>> {
        self.inner.get(id)
    }
    fn wait(&self, id: TaskId, timeout: Duration) -> BoxFuture<'_, stem::Result<Option<TaskStatus>>> {
        self.inner.wait(id, timeout)
    }
    fn progress(&self, id: TaskId, progress: Progress) -> BoxFuture<'_, stem::Result<()>> {
        self.inner.progress(id, progress)
    }
    fn forget(&self, id: TaskId) -> BoxFuture<'_, stem::Result<()>> {
        self.inner.forget(id)
    }
    fn group_init(&self, group: TaskId, total: usize) -> BoxFuture<'_, stem::Result<()>> {
        self.inner.group_init(group, total)
    }
    fn group_record(
        &self,
        group: TaskId,
        index: usize,
        outcome: MemberOutcome,
    ) -> BoxFuture<'_, stem::Result<GroupCounts>> {
        if self.fail() {
            return Box::pin(async { Err(stem::Error::backend("member records are down")) });
        }
        self.inner.group_record(group, index, outcome)
    }
    fn group_record_many(
        &self,
        records: Vec<MemberRecord>,
    ) -> BoxFuture<'_, stem::Result<Vec<stem::Result<GroupCounts>>>> {
        if self.fail() {
            return Box::pin(async { Err(stem::Error::backend("member records are down")) });
        }
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.inner.group_record_many(records).await
        })
    }
    fn group_get(&self, group: TaskId) -> BoxFuture<'_, stem::Result<Option<GroupState>>> {
        self.inner.group_get(group)
    }
    fn chord_claim(&self, group: TaskId) -> BoxFuture<'_, stem::Result<bool>> {
        self.inner.chord_claim(group)
    }
    fn heartbeat(&self, heartbeat: WorkerHeartbeat, ttl: Duration) -> BoxFuture<'_, stem::Result<()>> {
        self.inner.heartbeat(heartbeat, ttl)
    }
    fn workers(&self) -> BoxFuture<'_, stem::Result<Vec<WorkerHeartbeat>>> {
        self.inner.workers()
    }
}

/// Member bookkeeping that fails (the backend's member records down for the first calls)
/// puts the deliveries back instead of acking them: the members run again, every member is
/// still counted once, and the chord calls back exactly once with the outputs in order.
pub async fn failed_member_records_retry_the_delivery(h: &impl Harness) {
    let failures = Arc::new(AtomicUsize::new(3));
    let f = Arc::clone(&failures);
    let env = CanvasEnv::with_worker_backends(h, 2, move |inner| {
        Arc::new(FailingMemberRecords { inner, failures: Arc::clone(&f), delay: Duration::ZERO })
            as Arc<dyn ResultBackend>
    })
    .await;
    let tag = env.tag.clone();
    let runs = format!("{tag}:runs");
    let header: Group<NoInput, i64> = Group::of((0..30).map(|i| note::new(i, runs.clone())));
    let handle = env.stem.enqueue_canvas(header.chord(sum::partial(tag.clone()))).await.unwrap();
    assert_eq!(handle.wait(WAIT).await.unwrap(), (0..30).sum::<i64>(), "{}", h.name());
    env.drain().await;
    assert_eq!(failures.load(Ordering::SeqCst), 0, "{}: the member records failed", h.name());
    let ran = records(&runs);
    assert!(ran.len() > 30, "{}: members whose bookkeeping failed ran again ({} runs)", h.name(), ran.len());
    let distinct: std::collections::HashSet<i64> = ran.iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(distinct.len(), 30, "{}: every member ran", h.name());
    let counts = handle.progress().await.unwrap().expect("header state");
    assert_eq!((counts.total, counts.succeeded, counts.failed), (30, 30, 0), "{}: counted once", h.name());
    let calls = records(&tag);
    assert_eq!(calls.len(), 1, "{}: the callback ran exactly once", h.name());
    assert_eq!(calls[0], serde_json::json!((0..30).collect::<Vec<i64>>()), "{}: member order", h.name());
}

/// A graceful shutdown while members' bookkeeping is out (member records answer slowly, and a
/// member gives its slot back while it waits) still records and acks every member that ran:
/// nothing is left leased, and every member that ran is counted.
pub async fn shutdown_waits_for_member_bookkeeping(h: &impl Harness) {
    let env = CanvasEnv::with_worker_backends(h, 1, |inner| {
        Arc::new(FailingMemberRecords {
            inner,
            failures: Arc::new(AtomicUsize::new(0)),
            delay: Duration::from_millis(300),
        }) as Arc<dyn ResultBackend>
    })
    .await;
    let tag = env.tag.clone();
    let runs = format!("{tag}:runs");
    // More members than the worker takes at once (16 running, 64 reporting).
    let members = 120;
    let header: Group<NoInput, i64> = Group::of((0..members).map(|i| note::new(i, runs.clone())));
    let handle = env.stem.enqueue_canvas(header.chord(sum::partial(tag.clone()))).await.unwrap();
    env.until_records(&runs, 1).await;
    let broker = Arc::clone(&env.broker);
    env.shutdown().await;
    // A fetch the stopping consumer abandoned is given back by the adapter right after.
    let give_up = Instant::now() + Duration::from_secs(5);
    let c = loop {
        let c = broker.counts("default").await.unwrap();
        if c.in_flight == 0 || Instant::now() > give_up {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(c.in_flight, 0, "{}: a graceful shutdown leaves nothing leased: {c:?}", h.name());
    let ran: std::collections::HashSet<i64> = records(&runs).iter().map(|v| v.as_i64().unwrap()).collect();
    let counts = handle.progress().await.unwrap().expect("header state");
    assert_eq!(counts.completed(), ran.len(), "{}: every member that ran is counted", h.name());
    // Once every member ran, the callback is what waits.
    let callback_waits = u64::from(ran.len() == members as usize && records(&tag).is_empty());
    assert_eq!(
        c.pending,
        members as u64 - ran.len() as u64 + callback_waits,
        "{}: the rest wait for the next worker",
        h.name()
    );
}
