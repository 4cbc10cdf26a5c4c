//! Periodic worker heartbeats in the result backend.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::Utc;

use crate::backend::WorkerHeartbeat;
use crate::signals::WorkerHeartbeatSent;

use super::Shared;

pub(crate) async fn run(shared: Arc<Shared>) {
    let period = shared.config.heartbeat_interval;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hostname = gethostname::gethostname().to_string_lossy().into_owned();
    loop {
        tick.tick().await;
        let heartbeat = WorkerHeartbeat {
            worker_id: shared.worker_id.to_string(),
            hostname: hostname.clone(),
            pid: std::process::id(),
            queues: shared.config.queues.clone(),
            concurrency: shared.config.concurrency,
            in_flight: shared.in_flight.load(Ordering::Relaxed),
            processed: shared.processed.load(Ordering::Relaxed),
            started_at: shared.started_at,
            at: Utc::now(),
        };
        match shared.backend.heartbeat(heartbeat.clone(), period * 3).await {
            Ok(()) => shared.signals.emit(|| WorkerHeartbeatSent { heartbeat }),
            Err(e) => tracing::warn!(worker = %shared.worker_id, error = %e, "heartbeat failed"),
        }
    }
}
