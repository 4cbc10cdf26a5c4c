//! Terminates running tasks revoked with `terminate`.

use std::sync::Arc;

use super::Shared;

pub(crate) async fn run(shared: Arc<Shared>) {
    let Some(store) = shared.revokes.clone() else { return };
    let mut tick = tokio::time::interval(shared.config.revoke_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if shared.running.lock().is_empty() {
            continue;
        }
        match store.list().await {
            Ok(revoked) => {
                let running = shared.running.lock();
                for r in revoked.iter().filter(|r| r.terminate) {
                    if let Some(ctx) = running.get(&r.task_id) {
                        tracing::warn!(id = %r.task_id, reason = %r.reason, "terminating revoked task");
                        ctx.terminate();
                    }
                }
            }
            Err(e) => tracing::warn!(worker = %shared.worker_id, error = %e, "reading revokes failed"),
        }
    }
}
