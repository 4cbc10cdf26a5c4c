//! Workers: pull deliveries from the broker with bounded concurrency, run tasks, record the
//! outcome in the result backend, then ack.
//!
//! - [`consumer`]: the fetch loop (fetches only as many deliveries as there are free slots,
//!   so a long task never holds short ones hostage).
//! - [`executor`]: one delivery: checks, run under time limits and lease renewal, outcome.
//! - [`recorder`]: writes outcomes in batches, then acks / retries / dead-letters.
//! - [`retry`]: the retry decision. [`rate_limit`]: per-worker token buckets.
//! - [`heartbeat`]: worker heartbeats. [`shutdown`]: OS signals.

mod consumer;
mod executor;
mod heartbeat;
mod rate_limit;
mod recorder;
mod retry;
mod revoke;
mod shutdown;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::ResultBackend;
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::producer::Stem;
use crate::signals::{Signals, WorkerShutdown, WorkerStopping};
use crate::store::{RateLimiter, RevokeStore};
use crate::task::{Registry, TaskContext};

/// Finished canvas deliveries whose bookkeeping may be out at once, per slot: enough that the
/// fetches, member records and outcome writes of several batches overlap (a batch's
/// bookkeeping is two round trips, its run often none).
const REPORTING_PER_SLOT: usize = 4;

/// Settings of one worker.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// Queues to consume (default `["default"]`).
    pub queues: Vec<String>,
    /// Tasks running at once (default 16).
    pub concurrency: usize,
    /// Most deliveries fetched in one broker call (default: `concurrency`). The worker never
    /// holds more deliveries than it has free slots.
    pub prefetch: usize,
    /// Lease length for tasks that set none (default 15 s); renewed while a task runs.
    pub visibility_timeout: Duration,
    /// How long a graceful shutdown waits for running tasks before releasing them (default 30 s).
    pub shutdown_grace: Duration,
    /// Heartbeat period (default 5 s); heartbeats expire after three periods.
    pub heartbeat_interval: Duration,
    /// How long one fetch blocks when queues are empty (default 1 s).
    pub fetch_wait: Duration,
    /// Record a `running` state when a task starts (default true).
    pub track_started: bool,
    /// Random per-process identity (never a configured name, so replicas never collide).
    pub worker_id: String,
    /// How often running tasks are checked against the revoke store (default 1 s).
    pub revoke_poll: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let short = uuid::Uuid::new_v4().simple().to_string();
        WorkerConfig {
            queues: vec![crate::envelope::DEFAULT_QUEUE.to_owned()],
            concurrency: 16,
            prefetch: 0,
            visibility_timeout: Duration::from_secs(15),
            shutdown_grace: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            fetch_wait: Duration::from_secs(1),
            track_started: true,
            worker_id: format!("{host}-{}-{}", std::process::id(), &short[..8]),
            revoke_poll: Duration::from_secs(1),
        }
    }
}

/// Builder for [`Worker`].
pub struct WorkerBuilder {
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    registry: Option<Arc<Registry>>,
    signals: Option<Signals>,
    producer: Option<Stem>,
    config: WorkerConfig,
    revokes: Option<Arc<dyn RevokeStore>>,
    rate_limiter: Option<Arc<dyn RateLimiter>>,
}

impl WorkerBuilder {
    /// Check a revoke store before each task starts, and terminate running tasks revoked
    /// with `terminate`.
    pub fn revoke_store(mut self, store: Arc<dyn RevokeStore>) -> Self {
        self.revokes = Some(store);
        self
    }
    /// Enforce task rate limits through a limiter shared by all workers (default: per worker).
    pub fn rate_limiter(mut self, limiter: Arc<dyn RateLimiter>) -> Self {
        self.rate_limiter = Some(limiter);
        self
    }
    /// Tasks this worker runs (default: every `#[task]` in the binary).
    pub fn registry(mut self, registry: impl Into<Arc<Registry>>) -> Self {
        self.registry = Some(registry.into());
        self
    }
    /// Queues to consume.
    pub fn queues<I, S>(mut self, queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.queues = queues.into_iter().map(Into::into).collect();
        self
    }
    /// Tasks running at once.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n.max(1);
        self
    }
    /// Most deliveries per fetch.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.config.prefetch = n;
        self
    }
    /// Default lease length.
    pub fn visibility_timeout(mut self, d: Duration) -> Self {
        self.config.visibility_timeout = d;
        self
    }
    /// Grace period for a graceful shutdown.
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.config.shutdown_grace = d;
        self
    }
    /// Heartbeat period.
    pub fn heartbeat_interval(mut self, d: Duration) -> Self {
        self.config.heartbeat_interval = d;
        self
    }
    /// Record `running` on start.
    pub fn track_started(mut self, on: bool) -> Self {
        self.config.track_started = on;
        self
    }
    /// Signal listeners.
    pub fn signals(mut self, signals: Signals) -> Self {
        self.signals = Some(signals);
        self
    }
    /// Producer used by tasks for child tasks (default: one on the same broker and backend).
    pub fn producer(mut self, producer: Stem) -> Self {
        self.producer = Some(producer);
        self
    }
    /// Replace the whole config.
    pub fn config(mut self, config: WorkerConfig) -> Self {
        self.config = config;
        self
    }

    /// Finish; fails if the default registry has duplicate task names.
    pub fn build(self) -> Result<Worker> {
        let registry = match self.registry {
            Some(r) => r,
            #[cfg(feature = "auto-register")]
            None => Arc::new(Registry::from_inventory()?),
            #[cfg(not(feature = "auto-register"))]
            None => {
                return Err(Error::Config("no task registry given (auto-register is off)".to_owned()));
            }
        };
        let signals = self.signals.unwrap_or_default();
        let producer = self.producer.unwrap_or_else(|| {
            Stem::builder(Arc::clone(&self.broker), Arc::clone(&self.backend))
                .signals(signals.clone())
                .registry(Arc::clone(&registry))
                .build()
        });
        let mut config = self.config;
        if config.prefetch == 0 {
            config.prefetch = config.concurrency;
        }
        if config.queues.is_empty() {
            return Err(Error::Config("a worker needs at least one queue".to_owned()));
        }
        let (record_tx, record_rx) = mpsc::channel(config.concurrency.max(64) * 4);
        let shared = Arc::new(Shared {
            worker_id: Arc::from(config.worker_id.as_str()),
            slots: Arc::new(Semaphore::new(config.concurrency)),
            reporting: Arc::new(Semaphore::new(config.concurrency * REPORTING_PER_SLOT)),
            config,
            registry,
            broker: self.broker,
            backend: self.backend,
            producer,
            signals,
            limiter: rate_limit::RateLimiter::default(),
            shared_limiter: self.rate_limiter,
            revokes: self.revokes,
            running: parking_lot::Mutex::new(std::collections::HashMap::new()),
            record_tx,
            stop_fetching: CancellationToken::new(),
            release: CancellationToken::new(),
            recorder_done: CancellationToken::new(),
            in_flight: AtomicUsize::new(0),
            processed: AtomicU64::new(0),
            started_at: Utc::now(),
        });
        Ok(Worker { shared, record_rx: Some(record_rx) })
    }
}

/// State shared by the worker's loops and running tasks.
pub(crate) struct Shared {
    pub(crate) config: WorkerConfig,
    pub(crate) worker_id: Arc<str>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) backend: Arc<dyn ResultBackend>,
    pub(crate) producer: Stem,
    pub(crate) signals: Signals,
    pub(crate) limiter: rate_limit::RateLimiter,
    pub(crate) shared_limiter: Option<Arc<dyn RateLimiter>>,
    pub(crate) revokes: Option<Arc<dyn RevokeStore>>,
    /// Running tasks by id (tracked only with a revoke store, for `terminate`).
    pub(crate) running: parking_lot::Mutex<std::collections::HashMap<crate::TaskId, TaskContext>>,
    pub(crate) slots: Arc<Semaphore>,
    /// Deliveries whose task ended and whose canvas bookkeeping is still out (they gave
    /// their slot back); a shutdown takes every permit before it stops the recorder.
    pub(crate) reporting: Arc<Semaphore>,
    pub(crate) record_tx: mpsc::Sender<recorder::Record>,
    /// Warm shutdown: stop fetching, let running tasks finish.
    pub(crate) stop_fetching: CancellationToken,
    /// Cold shutdown: drop running tasks and release their leases.
    pub(crate) release: CancellationToken,
    /// Every slot is free again: the recorder may drain and exit.
    pub(crate) recorder_done: CancellationToken,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) processed: AtomicU64,
    pub(crate) started_at: DateTime<Utc>,
}

/// A worker, built with [`Worker::builder`]; run it with [`Worker::run`] or [`Worker::spawn`].
pub struct Worker {
    shared: Arc<Shared>,
    record_rx: Option<mpsc::Receiver<recorder::Record>>,
}

/// Stops a running worker.
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

impl ShutdownHandle {
    /// Begin a graceful shutdown: stop fetching, let running tasks finish within the grace
    /// period, then release the rest back to the broker.
    pub fn shutdown(&self) {
        self.shared.stop_fetching.cancel();
    }
}

/// A worker running on a spawned task.
pub struct WorkerHandle {
    shutdown: ShutdownHandle,
    join: JoinHandle<Result<()>>,
}

impl WorkerHandle {
    /// Shut down gracefully and wait until the worker has stopped.
    pub async fn shutdown(self) -> Result<()> {
        self.shutdown.shutdown();
        self.join.await.map_err(|e| Error::Config(format!("worker task failed: {e}")))?
    }

    /// A handle that can stop the worker from elsewhere.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Deliveries this worker has finished handling since it started: outcome recorded and
    /// the broker told (or, when that failed, the delivery left to be redelivered). The
    /// `processed` figure of its heartbeats.
    pub fn processed(&self) -> u64 {
        self.shutdown.shared.processed.load(Ordering::Relaxed)
    }

    /// Deliveries running now (the `in_flight` figure of its heartbeats).
    pub fn in_flight(&self) -> usize {
        self.shutdown.shared.in_flight.load(Ordering::Relaxed)
    }

    /// Wait for the worker to stop (after a shutdown was requested elsewhere).
    pub async fn join(self) -> Result<()> {
        self.join.await.map_err(|e| Error::Config(format!("worker task failed: {e}")))?
    }
}

impl Worker {
    /// Configure a worker on `broker` and `backend`.
    pub fn builder(broker: Arc<dyn Broker>, backend: Arc<dyn ResultBackend>) -> WorkerBuilder {
        WorkerBuilder {
            broker,
            backend,
            registry: None,
            signals: None,
            producer: None,
            config: WorkerConfig::default(),
            revokes: None,
            rate_limiter: None,
        }
    }

    /// This worker's identity.
    pub fn id(&self) -> &str {
        &self.shared.worker_id
    }

    /// A handle that can stop the worker.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle { shared: Arc::clone(&self.shared) }
    }

    /// Run on a new tokio task.
    pub fn spawn(self) -> WorkerHandle {
        let shutdown = self.shutdown_handle();
        WorkerHandle { shutdown, join: tokio::spawn(self.run()) }
    }

    /// Run until Ctrl-C or SIGTERM, then shut down gracefully.
    pub async fn run_until_signal(self) -> Result<()> {
        let handle = self.shutdown_handle();
        let stop = self.shared.stop_fetching.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown::terminate_signal() => {
                    tracing::info!("shutdown signal received; draining");
                    handle.shutdown();
                }
                () = stop.cancelled() => {}
            }
        });
        self.run().await
    }

    /// Run until a shutdown is requested through a [`ShutdownHandle`].
    pub async fn run(mut self) -> Result<()> {
        let shared = Arc::clone(&self.shared);
        let Some(record_rx) = self.record_rx.take() else {
            return Err(Error::Config("worker already ran".to_owned()));
        };
        tracing::info!(
            worker = %shared.worker_id,
            queues = ?shared.config.queues,
            concurrency = shared.config.concurrency,
            tasks = ?shared.registry.names(),
            "worker starting"
        );
        let recorder = tokio::spawn(recorder::run(Arc::clone(&shared), record_rx));
        let heartbeats = tokio::spawn(heartbeat::run(Arc::clone(&shared)));
        let revoker = shared.revokes.is_some().then(|| tokio::spawn(revoke::run(Arc::clone(&shared))));

        consumer::run(&shared).await;

        shared.signals.emit(|| WorkerStopping { worker_id: Arc::clone(&shared.worker_id) });
        tracing::info!(worker = %shared.worker_id, in_flight = shared.in_flight.load(Ordering::Relaxed), "worker stopping");
        let all = u32::try_from(shared.config.concurrency).unwrap_or(u32::MAX);
        let drained =
            tokio::time::timeout(shared.config.shutdown_grace, shared.slots.acquire_many(all)).await;
        if drained.is_err() {
            tracing::warn!(
                worker = %shared.worker_id,
                grace = ?shared.config.shutdown_grace,
                "grace period over; releasing running tasks for redelivery"
            );
            shared.release.cancel();
            // Released tasks return at their next poll; their slots come back promptly.
            let _ = shared.slots.acquire_many(all).await;
        }
        drop(drained);
        // Canvas bookkeeping still out hands its outcomes to the recorder first.
        let reporting = u32::try_from(shared.config.concurrency * REPORTING_PER_SLOT).unwrap_or(u32::MAX);
        let _ = shared.reporting.acquire_many(reporting).await;
        shared.recorder_done.cancel();
        let _ = recorder.await;
        heartbeats.abort();
        if let Some(r) = revoker {
            r.abort();
        }
        shared.signals.emit(|| WorkerShutdown { worker_id: Arc::clone(&shared.worker_id) });
        tracing::info!(worker = %shared.worker_id, processed = shared.processed.load(Ordering::Relaxed), "worker stopped");
        Ok(())
    }
}
