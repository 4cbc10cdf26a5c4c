//! The worker's fetch loop over a broker that allows two fetches in flight: under a backlog a
//! second fetch overlaps the first, yet the fetches together never ask for more deliveries
//! than there are free slots, and an idle queue is watched by one fetch only.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use stem::broker::{BoxFuture, Broker, ConsumeRequest, DeadLetter, Delivery, QueueCounts, Receipt};
use stem::envelope::Envelope;
use stem::prelude::*;
use stem::{MemoryBackend, MemoryBroker, Registry, Stem, Worker, WorkerConfig};

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
            tokio::time::sleep(Duration::from_millis(2)).await;
            let fetched = self.inner.consume(req).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_fetched_two_at_a_time_within_the_free_slots_and_an_idle_queue_by_one() {
    let broker = Arc::new(Overlapping::default());
    let backend = Arc::new(MemoryBackend::new());
    let registry = Arc::new(Registry::new().register::<varied>().build().unwrap());
    let stem = Stem::builder(broker.clone(), backend.clone()).build();
    let mut config = WorkerConfig::default();
    config.concurrency = CONCURRENCY;
    config.fetch_wait = Duration::from_millis(100);
    let worker = Worker::builder(broker.clone(), backend.clone())
        .registry(registry)
        .config(config)
        .build()
        .unwrap()
        .spawn();

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
