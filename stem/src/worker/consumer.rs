//! The fetch loop: take free slots, fetch that many deliveries, start each on its own task.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::OwnedSemaphorePermit;

use crate::broker::{BoxFuture, ConsumeRequest, Delivery};
use crate::signals::WorkerReady;

use super::{Shared, executor};

const MAX_FETCH_BACKOFF: Duration = Duration::from_secs(10);
/// How long a fetch under backlog waits for more free slots to fill a bigger batch.
const BATCH_LINGER: Duration = Duration::from_micros(500);

/// A fetch in flight: the slots it holds and what the broker answers.
type Fetch = BoxFuture<'static, (Vec<OwnedSemaphorePermit>, crate::Result<Vec<Delivery>>)>;

/// Runs until a shutdown is requested. Broker errors are logged and retried with capped,
/// jittered backoff, so a worker rides out a broker restart instead of dying or hanging.
pub(crate) async fn run(shared: &Arc<Shared>) {
    let base = ConsumeRequest {
        queues: shared.config.queues.clone(),
        max: shared.config.prefetch,
        lease: shared.config.visibility_timeout,
        wait: shared.config.fetch_wait,
        consumer: shared.worker_id.to_string(),
    };
    // Fetches in flight at once under a backlog (see `Broker::fetches_in_flight`). With one,
    // the worker sits idle for a broker round trip after every batch; with two, the next half
    // of the slots is being fetched while the other half runs. Never more than the free slots
    // are fetched for, so no delivery waits in this worker for a slot (a long task cannot
    // hold back short ones).
    let max_fetches = shared.broker.fetches_in_flight().clamp(1, shared.config.prefetch.max(1));
    let mut fetches: FuturesUnordered<Fetch> = FuturesUnordered::new();
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    let mut backlog = false;
    // After a failed fetch no new one starts until this instant; a fetch still in flight is
    // handled meanwhile, so what it delivered starts at once rather than after the pause.
    let mut paused_until: Option<tokio::time::Instant> = None;
    shared
        .signals
        .emit(|| WorkerReady { worker_id: Arc::clone(&shared.worker_id), queues: base.queues.clone() });
    loop {
        // A second fetch only under a backlog: an idle queue needs one blocked read, not two.
        let may_start =
            paused_until.is_none() && (fetches.is_empty() || (backlog && fetches.len() < max_fetches));
        tokio::select! {
            biased;
            () = shared.stop_fetching.cancelled() => return,
            () = sleep_until(paused_until), if paused_until.is_some() => paused_until = None,
            Some((permits, fetched)) = fetches.next(), if !fetches.is_empty() => {
                match fetched {
                    Ok(deliveries) => {
                        backlog = deliveries.len() == permits.len();
                        if failing {
                            tracing::info!(worker = %shared.worker_id, "broker reachable again; consuming");
                            failing = false;
                        }
                        backoff = Duration::from_millis(100);
                        start(shared, deliveries, permits);
                    }
                    Err(e) => {
                        drop(permits);
                        backlog = false;
                        failing = true;
                        let pause = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
                        tracing::error!(worker = %shared.worker_id, error = %e, retry_in = ?pause, "fetch failed");
                        paused_until = Some(tokio::time::Instant::now() + pause);
                        backoff = (backoff * 2).min(MAX_FETCH_BACKOFF);
                    }
                }
            }
            permits = free_slots(shared, backlog, max_fetches), if may_start => {
                let Some(permits) = permits else { return };
                let mut req = base.clone();
                req.max = permits.len();
                let broker = Arc::clone(&shared.broker);
                fetches.push(Box::pin(async move {
                    let fetched = broker.consume(&req).await;
                    (permits, fetched)
                }));
            }
        }
    }
}

/// Sleep until `at` (never resolves for `None`; the caller's guard keeps it unpolled then).
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Start each delivery on its own task with one of the slots fetched for it; slots left over
/// (the broker had fewer) are freed as they drop.
fn start(shared: &Arc<Shared>, deliveries: Vec<Delivery>, mut permits: Vec<OwnedSemaphorePermit>) {
    for delivery in deliveries {
        let Some(permit) = permits.pop() else { break };
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(executor::execute(Arc::clone(shared), delivery, permit));
    }
}

/// Wait for at least one free slot and take what is free, up to the prefetch; under a
/// backlog, up to the prefetch's share of each of the `fetches` that may be in flight, and
/// wait a moment for that many so one broker call carries a bigger batch (running tasks free
/// them within microseconds; an idle queue never waits here). The cap keeps the fetches
/// overlapping: tasks that end together free a whole batch's slots at once, and a fetch
/// taking them all would leave the next one nothing, so the worker would fetch one batch at
/// a time for the rest of the backlog (a Redis drain fell into that about one run in three,
/// at a fifth less throughput). `None` once the slots are closed (the worker is stopping).
async fn free_slots(
    shared: &Arc<Shared>,
    backlog: bool,
    fetches: usize,
) -> Option<Vec<OwnedSemaphorePermit>> {
    let prefetch = shared.config.prefetch;
    let aim = prefetch.div_ceil(fetches);
    let most = if backlog { aim } else { prefetch };
    let first = Arc::clone(&shared.slots).acquire_owned().await.ok()?;
    let mut permits = vec![first];
    while permits.len() < most {
        match Arc::clone(&shared.slots).try_acquire_owned() {
            Ok(p) => permits.push(p),
            Err(_) => break,
        }
    }
    if backlog && permits.len() < aim {
        let linger = tokio::time::Instant::now() + BATCH_LINGER;
        while permits.len() < aim {
            match tokio::time::timeout_at(linger, Arc::clone(&shared.slots).acquire_owned()).await {
                Ok(Ok(p)) => permits.push(p),
                _ => break,
            }
        }
    }
    Some(permits)
}
