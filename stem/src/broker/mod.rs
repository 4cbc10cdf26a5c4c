//! Brokers store envelopes and deliver them to workers under a lease.
//!
//! The [`Broker`] trait is object safe: a worker holds `Arc<dyn Broker>` so the adapter can be
//! chosen at run time from a URL. Every method is batch-friendly (publish many, consume up to
//! `max`, ack many) so that a streams store (Redis) and a SQL store can implement it with one
//! round trip per batch.

pub mod memory;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::backend::{ResultBackend, TaskStatus};
use crate::envelope::Envelope;
use crate::error::Result;

pub use memory::MemoryBroker;

/// A boxed, `Send` future: what object-safe adapter traits return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Dead-letter reason: no task of that name is registered on the worker.
pub const REASON_UNREGISTERED: &str = "unregistered-task";
/// Dead-letter reason: the arguments do not match the task's parameters.
pub const REASON_INVALID_ARGS: &str = "invalid-args";
/// Dead-letter reason: every retry was used.
pub const REASON_MAX_RETRIES: &str = "max-retries-exceeded";
/// Dead-letter reason: the task failed with an error that may not be retried.
pub const REASON_FATAL: &str = "task-failed";
/// Dead-letter reason: the stored bytes are not a readable envelope.
pub const REASON_MALFORMED: &str = "malformed-envelope";

/// Proof of one delivery, handed back to ack, nack, retry or dead-letter it.
///
/// A receipt is valid while its lease lasts. Once the lease expires and the broker
/// redelivers the task, operations with the old receipt are refused, so a stale worker cannot
/// ack (or retry) a delivery someone else now owns.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Receipt {
    /// Queue the delivery came from.
    pub queue: Arc<str>,
    /// Broker-specific delivery tag (stream entry id, row id, ...).
    pub tag: String,
    /// Lease token for fencing (increases with each delivery of the same task).
    pub lease: u64,
    /// Until when, by this process's monotonic clock, the lease is certainly still held: the
    /// broker counts the lease from before it asked for the delivery, so the lease cannot have
    /// lapsed on the server earlier. Brokers may skip fencing checks that a lease known to be
    /// live makes unnecessary. `None`: the broker does not say. Renewals do not move it, and it
    /// means nothing once the holder gave the delivery back (nack, retry, dead-letter).
    pub held_until: Option<std::time::Instant>,
}

/// One leased envelope.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// The task (shared: the worker hands it to the task context without copying).
    pub envelope: Arc<Envelope>,
    /// What to hand back.
    pub receipt: Receipt,
    /// Whether this task was delivered before (its earlier lease expired or was released).
    pub redelivered: bool,
}

/// What a consumer asks for.
#[derive(Clone, Debug)]
pub struct ConsumeRequest {
    /// Queues to read, in order of preference for equal priorities.
    pub queues: Vec<String>,
    /// At most this many deliveries.
    pub max: usize,
    /// Lease length for envelopes that do not set their own visibility timeout.
    pub lease: Duration,
    /// Block up to this long when nothing is ready.
    pub wait: Duration,
    /// Identity of the consuming worker (random per process).
    pub consumer: String,
}

/// A dead-lettered task and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Entry id inside the queue's DLQ.
    pub id: String,
    /// Queue the task came from.
    pub queue: String,
    /// Machine-readable reason (`unregistered-task`, `invalid-args`, ...).
    pub reason: String,
    /// Human-readable details.
    pub detail: String,
    /// The task, when it could be decoded.
    pub envelope: Option<Envelope>,
    /// The raw payload, when it could not.
    pub raw: Option<String>,
    /// When it was dead-lettered.
    pub dead_at: DateTime<Utc>,
}

/// Sizes of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounts {
    /// Ready to deliver now.
    pub pending: u64,
    /// Waiting for their `not_before`.
    pub delayed: u64,
    /// Delivered and leased.
    pub in_flight: u64,
    /// In the dead-letter queue.
    pub dead: u64,
}

/// [`Broker::record_and_publish`]'s default: [`ResultBackend::set`], then [`Broker::publish`].
/// For adapters whose override cannot combine the two in a given case.
pub async fn set_then_publish<B: Broker + ?Sized>(
    broker: &B,
    backend: &dyn ResultBackend,
    statuses: Vec<TaskStatus>,
    envelopes: Vec<Envelope>,
) -> Result<()> {
    if !statuses.is_empty() {
        backend.set(statuses).await?;
    }
    if !envelopes.is_empty() {
        broker.publish(envelopes).await?;
    }
    Ok(())
}

/// [`Broker::record_and_ack`]'s default: [`ResultBackend::set`], then [`Broker::ack`]. For
/// adapters whose override cannot combine the two in a given case.
pub async fn set_then_ack<B: Broker + ?Sized>(
    broker: &B,
    backend: &dyn ResultBackend,
    statuses: Vec<TaskStatus>,
    receipts: Vec<Receipt>,
) -> Result<()> {
    if !statuses.is_empty() {
        backend.set(statuses).await?;
    }
    if !receipts.is_empty() {
        broker.ack(receipts).await?;
    }
    Ok(())
}

/// Stores and delivers envelopes.
///
/// Semantics every implementation keeps (checked by the shared contract suite):
/// at-least-once delivery under a lease; redelivery after the lease expires; lease renewal
/// that never duplicates the task; delays kept in the store; priorities 0–9 (higher first,
/// FIFO within a priority); a dead-letter queue with reasons; broadcast channels that give
/// each subscriber each message once.
pub trait Broker: Send + Sync + 'static {
    /// Store envelopes; those with a future `not_before` are held until due.
    fn publish(&self, envelopes: Vec<Envelope>) -> BoxFuture<'_, Result<()>>;

    /// The producer's path: store the `queued` records in `backend`, then publish `envelopes`.
    ///
    /// The default calls [`ResultBackend::set`], then [`Broker::publish`]. A broker whose
    /// backend lives in the same store (see [`ResultBackend::as_any`]) may override it to send
    /// both in one round trip, keeping the records ahead of the envelopes so a fast worker's
    /// outcome is never overwritten by a late `queued` record.
    fn record_and_publish<'a>(
        &'a self,
        backend: &'a dyn ResultBackend,
        statuses: Vec<TaskStatus>,
        envelopes: Vec<Envelope>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(set_then_publish(self, backend, statuses, envelopes))
    }

    /// Lease up to `req.max` ready envelopes, waiting up to `req.wait` for the first.
    fn consume<'a>(&'a self, req: &'a ConsumeRequest) -> BoxFuture<'a, Result<Vec<Delivery>>>;

    /// How many [`Broker::consume`] calls a worker may keep in flight at once while its queues
    /// have a backlog, each for a share of its free slots (it never fetches for more slots
    /// than are free). The default, one, suits a broker that pays most per call (a database
    /// transaction per claim); a broker whose fetch is one cheap command on a pipelined
    /// connection answers more, so that one fetch's round trip passes while the tasks of the
    /// other run.
    fn fetches_in_flight(&self) -> usize {
        1
    }

    /// Finish deliveries. Receipts whose lease was lost are ignored.
    fn ack(&self, receipts: Vec<Receipt>) -> BoxFuture<'_, Result<()>>;

    /// The worker's hot path: store `statuses` in `backend`, then finish `receipts`.
    ///
    /// The default calls [`ResultBackend::set`], then [`Broker::ack`]. An adapter whose broker
    /// and backend live in the same store (see [`ResultBackend::as_any`]) overrides it to do
    /// both in one round trip or transaction, keeping the rule that a delivery is finished only
    /// once its status is stored. On error nothing may be assumed: the statuses may or may not
    /// be stored and the deliveries may or may not be finished (unfinished ones are
    /// redelivered when their lease expires).
    fn record_and_ack<'a>(
        &'a self,
        backend: &'a dyn ResultBackend,
        statuses: Vec<TaskStatus>,
        receipts: Vec<Receipt>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(set_then_ack(self, backend, statuses, receipts))
    }

    /// Give a delivery back: `requeue` makes it ready again at once, otherwise it is dropped.
    /// Returns `false` when the lease was already lost.
    fn nack(&self, receipt: Receipt, requeue: bool) -> BoxFuture<'_, Result<bool>>;

    /// Atomically finish a delivery and store `envelope` in its place (a retry or a delay:
    /// `envelope.not_before` says when it is due). Returns `false` when the lease was lost, in
    /// which case nothing is stored.
    fn retry(&self, receipt: Receipt, envelope: Envelope) -> BoxFuture<'_, Result<bool>>;

    /// Extend a lease to `lease` from now without duplicating the task. Returns `false` when
    /// the lease was already lost.
    fn extend_lease<'a>(&'a self, receipt: &'a Receipt, lease: Duration) -> BoxFuture<'a, Result<bool>>;

    /// Atomically finish a delivery and move its envelope to the queue's DLQ.
    fn dead_letter(
        &self,
        receipt: Receipt,
        envelope: Envelope,
        reason: &str,
        detail: String,
    ) -> BoxFuture<'_, Result<bool>>;

    /// DLQ entries of `queue`, oldest first.
    fn dlq_list<'a>(
        &'a self,
        queue: &'a str,
        offset: usize,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>>>;

    /// One DLQ entry.
    fn dlq_get<'a>(&'a self, queue: &'a str, id: &'a str) -> BoxFuture<'a, Result<Option<DeadLetter>>>;

    /// Publish DLQ entries again (all when `ids` is empty), with fresh retries, after `delay`.
    /// Returns how many were replayed; entries without a decodable envelope stay.
    fn dlq_replay<'a>(
        &'a self,
        queue: &'a str,
        ids: &'a [String],
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<usize>>;

    /// Drop every DLQ entry of `queue`; returns how many.
    fn dlq_purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<usize>>;

    /// Drop every pending and delayed envelope of `queue` (not in-flight ones).
    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<usize>>;

    /// Sizes of `queue`.
    fn counts<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueCounts>>;

    /// Register `subscriber` on broadcast `channel`; it receives messages published from now on.
    fn subscribe<'a>(&'a self, channel: &'a str, subscriber: &'a str) -> BoxFuture<'a, Result<()>>;

    /// Remove a subscription.
    fn unsubscribe<'a>(&'a self, channel: &'a str, subscriber: &'a str) -> BoxFuture<'a, Result<()>>;

    /// Deliver `envelope` once to every current subscriber of `channel`.
    fn broadcast<'a>(&'a self, channel: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<()>>;

    /// Take up to `max` broadcast messages for `subscriber`, waiting up to `wait`.
    fn consume_broadcast<'a>(
        &'a self,
        channel: &'a str,
        subscriber: &'a str,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'a, Result<Vec<Envelope>>>;
}
