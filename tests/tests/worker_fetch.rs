//! The worker's fetch loop over a broker that allows two fetches in flight: under a backlog a
//! second fetch overlaps the first, yet the fetches together never ask for more deliveries
//! than there are free slots, an idle queue is watched by one fetch only, and a failed fetch
//! pauses new fetches without holding back what the other one delivered.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use stem::broker::{BoxFuture, Broker, ConsumeRequest, DeadLetter, Delivery, QueueCounts, Receipt};
use stem::envelope::Envelope;
use stem::prelude::*;
use stem::{MemoryBackend, MemoryBroker, Registry, Stem, Worker, WorkerConfig, WorkerHandle};

const WAIT: Duration = Duration::from_secs(30);
const CONCURRENCY: usize = 8;

/// Tasks running right now, counted by the task itself.
static RUNNING: AtomicUsize = AtomicUsize::new(0);

#[task(name = "fetch.varied")]
async fn varied(i: u32) -> u32 {
    RUNNING.fetch_add(1, Ordering::SeqCst);
    // Uneven lengths, so slots come free one by one rather than all at once.
    tokio::time::sleep(Duration::from_millis(u64::from(1 + i % 4 * 2))).await;
    RUNNING.fetch_sub(1, Ordering::SeqCst);
    i
}

/// An in-memory broker whose fetches take a round trip's time and may overlap, and which
/// records how they overlapped.
#[derive(Default)]
struct Overlapping {
    inner: MemoryBroker,
    /// Fetches in flight now, the most ever seen, and the slots they ask for now.
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    asked: AtomicUsize,
    /// Times a fetch would have asked for more than the free slots.
    oversubscribed: AtomicUsize,
    /// How many deliveries each fetch asked for, in order.
    sizes: Mutex<Vec<usize>>,
    /// A successful fetch's round trip (at least 2 ms). Every `fail_every`-th fetch (0: none)
    /// fails instead, after `fail_after`.
    ok_after: Duration,
    fail_every: usize,
    fail_after: Duration,
    calls: AtomicUsize,
    /// When fetches failed, and when each successful one returned what.
    failed_at: Mutex<Vec<Instant>>,
    returned: Mutex<Vec<(Instant, Vec<stem::TaskId>)>>,
}

impl Broker for Overlapping {
    fn publish(&self, envelopes: Vec<Envelope>) -> BoxFuture<'_, stem::Result<()>> {
        self.inner.publish(envelopes)
    }
    fn consume<'a>(&'a self, req: &'a ConsumeRequest) -> BoxFuture<'a, stem::Result<Vec<Delivery>>> {
        Box::pin(async move {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            let asked = self.asked.fetch_add(req.max, Ordering::SeqCst) + req.max;
            // Slots held by running tasks plus those asked for by every fetch in flight.
            if RUNNING.load(Ordering::SeqCst) + asked > CONCURRENCY {
                self.oversubscribed.fetch_add(1, Ordering::SeqCst);
            }
            self.sizes.lock().unwrap().push(req.max);
            let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let fails = self.fail_every > 0 && call.is_multiple_of(self.fail_every);
            // When the round trip ends, whenever the worker gets round to polling it.
            let done_at = Instant::now()
                + if fails { self.fail_after } else { self.ok_after.max(Duration::from_millis(2)) };
            tokio::time::sleep_until(done_at).await;
            let fetched = if fails {
                self.failed_at.lock().unwrap().push(done_at);
                Err(stem::Error::backend("injected fetch failure"))
            } else {
                self.inner.consume(req).await
            };
            if let Ok(deliveries) = &fetched {
                let ids = deliveries.iter().map(|d| d.envelope.id).collect();
                self.returned.lock().unwrap().push((done_at, ids));
            }
            self.asked.fetch_sub(req.max, Ordering::SeqCst);
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            fetched
        })
    }
    fn fetches_in_flight(&self) -> usize {
        2
    }
    fn ack(&self, receipts: Vec<Receipt>) -> BoxFuture<'_, stem::Result<()>> {
        self.inner.ack(receipts)
    }
    fn nack(&self, receipt: Receipt, requeue: bool) -> BoxFuture<'_, stem::Result<bool>> {
        self.inner.nack(receipt, requeue)
    }
    fn retry(&self, receipt: Receipt, envelope: Envelope) -> BoxFuture<'_, stem::Result<bool>> {
        self.inner.retry(receipt, envelope)
    }
    fn extend_lease<'a>(
        &'a self,
        receipt: &'a Receipt,
        lease: Duration,
    ) -> BoxFuture<'a, stem::Result<bool>> {
        self.inner.extend_lease(receipt, lease)
    }
    fn dead_letter(
        &self,
        receipt: Receipt,
        envelope: Envelope,
        reason: &str,
        detail: String,
    ) -> BoxFuture<'_, stem::Result<bool>> {
        self.inner.dead_letter(receipt, envelope, reason, detail)
    }
    fn dlq_list<'a>(
        &'a self,
        queue: &'a str,
        offset: usize,
        limit: usize,
    ) -> BoxFuture<'a, stem::Result<Vec<DeadLetter>>> {
        self.inner.dlq_list(queue, offset, limit)
    }
    fn dlq_get<'a>(&'a self, queue: &'a str, id: &'a str) -> BoxFuture<'a, stem::Result<Option<DeadLetter>>> {
        self.inner.dlq_get(queue, id)
    }
    fn dlq_replay<'a>(
        &'a self,
        queue: &'a str,
        ids: &'a [String],
        delay: Option<Duration>,
    ) -> BoxFuture<'a, stem::Result<usize>> {
        self.inner.dlq_replay(queue, ids, delay)
    }
    fn dlq_purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, stem::Result<usize>> {
        self.inner.dlq_purge(queue)
    }
    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, stem::Result<usize>> {
        self.inner.purge(queue)
    }
    fn counts<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, stem::Result<QueueCounts>> {
        self.inner.counts(queue)
    }
    fn subscribe<'a>(&'a self, channel: &'a str, subscriber: &'a str) -> BoxFuture<'a, stem::Result<()>> {
        self.inner.subscribe(channel, subscriber)
    }
    fn unsubscribe<'a>(&'a self, channel: &'a str, subscriber: &'a str) -> BoxFuture<'a, stem::Result<()>> {
        self.inner.unsubscribe(channel, subscriber)
    }
    fn broadcast<'a>(&'a self, channel: &'a str, envelope: Envelope) -> BoxFuture<'a, stem::Result<()>> {
        self.inner.broadcast(channel, envelope)
    }
    fn consume_broadcast<'a>(
        &'a self,
        channel: &'a str,
        subscriber: &'a str,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'a, stem::Result<Vec<Envelope>>> {
        self.inner.consume_broadcast(channel, subscriber, max, wait)
    }
}

/// A producer on `broker` with an in-memory backend, and workers started on demand.
struct Harness {
    broker: Arc<Overlapping>,
    backend: Arc<MemoryBackend>,
    stem: Stem,
}

impl Harness {
    fn new(broker: Overlapping) -> Self {
        let broker = Arc::new(broker);
        let backend = Arc::new(MemoryBackend::new());
        let stem = Stem::builder(broker.clone(), backend.clone()).build();
        Harness { broker, backend, stem }
    }

    /// A worker with [`CONCURRENCY`] slots that runs task `T`.
    fn start<T: stem::Task>(&self) -> WorkerHandle {
        let mut config = WorkerConfig::default();
        config.concurrency = CONCURRENCY;
        config.fetch_wait = Duration::from_millis(100);
        Worker::builder(self.broker.clone(), self.backend.clone())
            .registry(Registry::new().register::<T>().build().unwrap())
            .config(config)
            .build()
            .unwrap()
            .spawn()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_fetched_two_at_a_time_within_the_free_slots_and_an_idle_queue_by_one() {
    let h = Harness::new(Overlapping::default());
    let (broker, stem) = (&h.broker, &h.stem);
    let worker = h.start::<varied>();

    // Idle: the queue is watched by one fetch at a time, however long it stays empty.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(broker.peak.load(Ordering::SeqCst), 1, "an idle queue gets one fetch at a time");

    // A backlog: every task runs once and succeeds; fetches overlapped, never beyond the slots.
    let handles = stem.enqueue_many((0..400).map(varied::new)).await.unwrap();
    for (i, h) in (0u32..).zip(handles) {
        assert_eq!(h.wait(WAIT).await.unwrap(), i);
    }
    assert_eq!(broker.peak.load(Ordering::SeqCst), 2, "a second fetch overlapped the first, and no third");
    assert_eq!(broker.oversubscribed.load(Ordering::SeqCst), 0, "fetches asked for more than the free slots");
    // Results are stored before their deliveries are acked; a shutdown flushes the acks.
    worker.shutdown().await.unwrap();
    let counts = broker.counts("default").await.unwrap();
    assert_eq!((counts.pending, counts.in_flight), (0, 0), "every delivery finished");
}

#[task(name = "fetch.instant")]
async fn instant(i: u32) -> u32 {
    i
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instant_tasks_keep_two_fetches_of_half_the_slots_in_flight() {
    // Tasks that end at once free every slot of a batch together: a fetch that then took all
    // the free slots would leave no slot for a second one, and the worker would fall back to
    // one fetch at a time for the rest of the backlog.
    let h = Harness::new(Overlapping::default());
    let handles = h.stem.enqueue_many((0..400).map(instant::new)).await.unwrap();
    let worker = h.start::<instant>();
    for (i, h) in (0u32..).zip(handles) {
        assert_eq!(h.wait(WAIT).await.unwrap(), i);
    }
    worker.shutdown().await.unwrap();
    let sizes = h.broker.sizes.lock().unwrap().clone();
    assert_eq!(sizes.first(), Some(&CONCURRENCY), "the first fetch takes every free slot");
    let half = CONCURRENCY / 2;
    // The backlog lasts until the last fetches come back short; until then every fetch asks
    // for half the slots, so two are in flight.
    let backlog = &sizes[1..sizes.len().saturating_sub(3)];
    assert!(backlog.len() > 40, "fetches under the backlog: {sizes:?}");
    assert!(
        backlog.iter().all(|n| *n <= half),
        "a fetch under a backlog took more than half the slots: {sizes:?}"
    );
    assert_eq!(h.broker.peak.load(Ordering::SeqCst), 2, "two fetches overlapped");
}

/// When each task started.
static STARTED: Mutex<Vec<(stem::TaskId, Instant)>> = Mutex::new(Vec::new());

#[task(name = "fetch.stamped")]
async fn stamped(ctx: TaskContext, i: u32) -> u32 {
    STARTED.lock().unwrap().push((ctx.id(), Instant::now()));
    tokio::time::sleep(Duration::from_millis(u64::from(1 + i % 3))).await;
    i
}

#[tokio::test(start_paused = true)]
async fn a_failed_fetch_pauses_new_fetches_but_not_what_the_other_fetch_delivered() {
    // The second fetch of a pair fails well before the first comes back.
    let h = Harness::new(Overlapping {
        ok_after: Duration::from_millis(5),
        fail_every: 3,
        fail_after: Duration::from_millis(1),
        ..Default::default()
    });
    let broker = &h.broker;
    let handles = h.stem.enqueue_many((0..300).map(stamped::new)).await.unwrap();
    let worker = h.start::<stamped>();
    for (i, h) in (0u32..).zip(handles) {
        assert_eq!(h.wait(WAIT).await.unwrap(), i, "every task runs despite the failed fetches");
    }
    worker.shutdown().await.unwrap();

    let failed_at = broker.failed_at.lock().unwrap().clone();
    let returned = broker.returned.lock().unwrap().clone();
    let started: HashMap<_, _> = STARTED.lock().unwrap().iter().copied().collect();
    // A failure pauses new fetches for at least 50 ms (half the first backoff). Deliveries of
    // a fetch that came back during such a pause still start at once.
    let pause = Duration::from_millis(50);
    let mut during_a_pause = 0;
    for (at, ids) in &returned {
        if failed_at.iter().any(|f| f < at && *at < *f + pause) {
            during_a_pause += ids.len();
        }
        for id in ids {
            let began = started[id];
            assert!(
                began - *at < Duration::from_millis(5),
                "delivered at {at:?}, started {:?} later",
                began - *at
            );
        }
    }
    assert!(failed_at.len() >= 3, "failures were injected: {}", failed_at.len());
    assert!(during_a_pause > 0, "some deliveries came back while new fetches were paused");
}
