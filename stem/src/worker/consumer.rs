//! The fetch loop: take free slots, fetch that many deliveries, start each on its own task.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::broker::ConsumeRequest;
use crate::signals::WorkerReady;

use super::{Shared, executor};

const MAX_FETCH_BACKOFF: Duration = Duration::from_secs(10);
/// How long a fetch under backlog waits for more free slots to fill a bigger batch.
const BATCH_LINGER: Duration = Duration::from_micros(500);

/// Runs until a shutdown is requested. Broker errors are logged and retried with capped,
/// jittered backoff, so a worker rides out a broker restart instead of dying or hanging.
pub(crate) async fn run(shared: &Arc<Shared>) {
    let mut req = ConsumeRequest {
        queues: shared.config.queues.clone(),
        max: shared.config.prefetch,
        lease: shared.config.visibility_timeout,
        wait: shared.config.fetch_wait,
        consumer: shared.worker_id.to_string(),
    };
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    let mut backlog = false;
    shared
        .signals
        .emit(|| WorkerReady { worker_id: Arc::clone(&shared.worker_id), queues: req.queues.clone() });
    loop {
        // Fetch only for free slots: a delivery never waits in this worker for a slot.
        let first = tokio::select! {
            biased;
            () = shared.stop_fetching.cancelled() => return,
            permit = Arc::clone(&shared.slots).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let mut permits = vec![first];
        while permits.len() < shared.config.prefetch {
            match Arc::clone(&shared.slots).try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        // Under a backlog (the last fetch was full), wait a moment for more slots to free up so
        // one broker call carries a bigger batch; running tasks free them within microseconds,
        // and an idle queue never waits here.
        if backlog && permits.len() < shared.config.prefetch {
            let linger = tokio::time::Instant::now() + BATCH_LINGER;
            while permits.len() < shared.config.prefetch {
                match tokio::time::timeout_at(linger, Arc::clone(&shared.slots).acquire_owned()).await {
                    Ok(Ok(p)) => permits.push(p),
                    _ => break,
                }
            }
        }
        req.max = permits.len();
        let fetched = tokio::select! {
            biased;
            () = shared.stop_fetching.cancelled() => return,
            r = shared.broker.consume(&req) => r,
        };
        match fetched {
            Ok(deliveries) => {
                backlog = deliveries.len() == req.max;
                if failing {
                    tracing::info!(worker = %shared.worker_id, "broker reachable again; consuming");
                    failing = false;
                }
                backoff = Duration::from_millis(100);
                for delivery in deliveries {
                    let Some(permit) = permits.pop() else { break };
                    shared.in_flight.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(executor::execute(Arc::clone(shared), delivery, permit));
                }
            }
            Err(e) => {
                drop(permits);
                failing = true;
                let pause = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
                tracing::error!(worker = %shared.worker_id, error = %e, retry_in = ?pause, "fetch failed");
                tokio::select! {
                    () = shared.stop_fetching.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
                backoff = (backoff * 2).min(MAX_FETCH_BACKOFF);
            }
        }
    }
}
