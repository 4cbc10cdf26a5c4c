//! Checks for the coordination stores, run against every adapter's stores.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use stem::backend::TaskState;
use stem::store::Revocation;
use stem::{
    MemoryBackend, MemoryBroker, RateLimit, Registry, Stem, TaskContext, TaskError, TaskId, TaskOptions,
    WaitError, Worker,
};
use tokio::time::Instant;

use crate::{StoreHarness, namespace};

pub async fn lock_ownership_and_expiry(h: &impl StoreHarness) {
    let s = h.stores(&namespace()).await;
    // Long enough that the six calls below finish inside it on a loaded machine.
    let ttl = Duration::from_secs(2);
    assert!(s.locks.acquire("beat", "a", ttl).await.unwrap(), "{}: free lock is taken", h.name());
    assert!(!s.locks.acquire("beat", "b", ttl).await.unwrap(), "held lock is refused");
    assert!(s.locks.acquire("beat", "a", ttl).await.unwrap(), "the holder may re-acquire");
    assert_eq!(s.locks.owner("beat").await.unwrap().as_deref(), Some("a"));
    assert!(!s.locks.renew("beat", "b", ttl).await.unwrap(), "only the owner renews");
    assert!(!s.locks.release("beat", "b",).await.unwrap(), "only the owner releases");
    assert!(s.locks.renew("beat", "a", ttl).await.unwrap());
    // Expiry: after the TTL another owner can take it.
    let give_up = Instant::now() + Duration::from_secs(10);
    while !s.locks.acquire("beat", "b", ttl).await.unwrap() {
        assert!(Instant::now() < give_up, "lock never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.locks.owner("beat").await.unwrap().as_deref(), Some("b"));
    assert!(!s.locks.renew("beat", "a", ttl).await.unwrap(), "an expired holder cannot renew");
    assert!(s.locks.release("beat", "b").await.unwrap());
    assert_eq!(s.locks.owner("beat").await.unwrap(), None);
}

pub async fn revokes_persist_across_handles(h: &impl StoreHarness) {
    let ns = namespace();
    let a = h.stores(&ns).await;
    let id = TaskId::new();
    let r = Revocation { task_id: id, terminate: true, reason: "operator".into(), at: Utc::now() };
    a.revokes.revoke(r.clone(), Duration::from_secs(600)).await.unwrap();
    // A second handle (another process, a restarted worker) sees it.
    let b = h.stores(&ns).await;
    assert_eq!(b.revokes.get(id).await.unwrap(), Some(r.clone()), "{}", h.name());
    assert!(b.revokes.list().await.unwrap().contains(&r));
    assert_eq!(b.revokes.get(TaskId::new()).await.unwrap(), None);
}

pub async fn unique_claims_return_the_existing_task(h: &impl StoreHarness) {
    let s = h.stores(&namespace()).await;
    let (first, second) = (TaskId::new(), TaskId::new());
    assert_eq!(s.unique.claim("k", first, Duration::from_millis(500)).await.unwrap(), None);
    assert_eq!(s.unique.claim("k", second, Duration::from_millis(500)).await.unwrap(), Some(first));
    assert_eq!(s.unique.claim("other", second, Duration::from_millis(500)).await.unwrap(), None);
    s.unique.release("other").await.unwrap();
    assert_eq!(s.unique.claim("other", first, Duration::from_secs(5)).await.unwrap(), None);
    let give_up = Instant::now() + Duration::from_secs(5);
    while s.unique.claim("k", second, Duration::from_secs(5)).await.unwrap().is_some() {
        assert!(Instant::now() < give_up, "unique claim never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

static RATE_STARTS: Mutex<Vec<Instant>> = Mutex::new(Vec::new());

struct Limited;
impl stem::Task for Limited {
    type Args = (u32,);
    type Output = u32;
    const NAME: &'static str = "store_contract.limited";
    const PARAMS: &'static [&'static str] = &["i"];
    const OPTIONS: TaskOptions = TaskOptions::new().rate_limit(RateLimit::new(4, Duration::from_secs(1)));
    async fn run(_ctx: TaskContext, (i,): (u32,)) -> Result<u32, TaskError> {
        RATE_STARTS.lock().unwrap().push(Instant::now());
        Ok(i)
    }
}

pub async fn rate_limit_is_shared_by_two_workers(h: &impl StoreHarness) {
    let ns = namespace();
    let broker = Arc::new(MemoryBroker::new());
    let backend = Arc::new(MemoryBackend::new());
    let registry = Arc::new(Registry::new().register::<Limited>().build().unwrap());
    let mut workers = Vec::new();
    for _ in 0..2 {
        let stores = h.stores(&ns).await;
        workers.push(
            Worker::builder(broker.clone(), backend.clone())
                .registry(Arc::clone(&registry))
                .rate_limiter(stores.rate_limiter)
                .concurrency(4)
                .build()
                .unwrap()
                .spawn(),
        );
    }
    let stem = Stem::new(broker, backend);
    let t0 = Instant::now();
    let handles = stem.enqueue_many((0..12).map(|i| stem::Signature::<Limited>::new((i,)))).await.unwrap();
    for h in &handles {
        h.wait(Duration::from_secs(30)).await.unwrap();
    }
    let starts = RATE_STARTS.lock().unwrap().clone();
    assert_eq!(starts.len(), 12, "every task ran, none failed");
    // 4 at once, then one per 250 ms across both workers: the last starts ~2 s in.
    let last = starts.iter().max().unwrap().duration_since(t0);
    assert!(last >= Duration::from_millis(1700), "{}: limit not shared: last start at {last:?}", h.name());
    // A token bucket of 4 refilling 4/s allows at most 4 + 3.6 starts in any 900 ms window.
    for &s in &starts {
        let window =
            starts.iter().filter(|t| **t >= s && t.duration_since(s) < Duration::from_millis(900)).count();
        assert!(window <= 7, "{window} starts within 900 ms across two workers");
    }
    for w in workers {
        w.shutdown().await.unwrap();
    }
}

static REVOKE_RUNS: AtomicU32 = AtomicU32::new(0);

struct Revocable;
impl stem::Task for Revocable {
    type Args = (u64,);
    type Output = ();
    const NAME: &'static str = "store_contract.revocable";
    const PARAMS: &'static [&'static str] = &["ms"];
    const OPTIONS: TaskOptions = TaskOptions::new();
    async fn run(_ctx: TaskContext, (ms,): (u64,)) -> Result<(), TaskError> {
        REVOKE_RUNS.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(())
    }
}

pub async fn revoked_task_never_starts_and_terminate_cancels_a_running_one(h: &impl StoreHarness) {
    let ns = namespace();
    let broker = Arc::new(MemoryBroker::new());
    let backend = Arc::new(MemoryBackend::new());
    let producer_stores = h.stores(&ns).await;
    let stem = Stem::builder(broker.clone(), backend.clone()).revoke_store(producer_stores.revokes).build();
    // Revoked while queued, before any worker exists: it must never start.
    let queued = stem.enqueue(stem::Signature::<Revocable>::new((0,))).await.unwrap();
    stem.revoke(queued.id(), false, "not needed").await.unwrap();
    let worker_stores = h.stores(&ns).await;
    let mut config = stem::WorkerConfig::default();
    config.revoke_poll = Duration::from_millis(100);
    let worker = Worker::builder(broker, backend)
        .registry(Registry::new().register::<Revocable>().build().unwrap())
        .revoke_store(worker_stores.revokes)
        .config(config)
        .build()
        .unwrap()
        .spawn();
    match queued.wait(Duration::from_secs(10)).await {
        Err(WaitError::Cancelled { reason, .. }) => assert_eq!(reason.unwrap().message, "not needed"),
        other => panic!("{}: expected cancelled, got {other:?}", h.name()),
    }
    assert_eq!(REVOKE_RUNS.load(Ordering::SeqCst), 0, "a revoked task never starts");
    // Running for a minute; a terminate revoke cancels it promptly.
    let running = stem.enqueue(stem::Signature::<Revocable>::new((60_000,))).await.unwrap();
    let give_up = Instant::now() + Duration::from_secs(10);
    while REVOKE_RUNS.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < give_up);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    stem.revoke(running.id(), true, "operator").await.unwrap();
    assert!(matches!(running.wait(Duration::from_secs(10)).await, Err(WaitError::Cancelled { .. })));
    assert!(t0.elapsed() < Duration::from_secs(5), "terminated promptly");
    assert_eq!(running.status().await.unwrap().unwrap().state, TaskState::Cancelled);
    worker.shutdown().await.unwrap();
}
