//! The LISTEN side: one connection per [`PgStore`](super::PgStore) listening on the
//! namespace's channel and turning notifications into in-process wake-ups.
//!
//! Payloads: `j` (jobs became ready), `b` (a broadcast message), `S<uuid>,<uuid>,…` (tasks
//! reached a terminal state; `s<uuid>`, one task, is read too). After a lost connection the listener reconnects by itself and wakes
//! every waiter, since notifications may have been missed in between.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use stem::TaskId;
use tokio::sync::{oneshot, watch};

use crate::sql_shared::Hub;

/// Handle to the listening task; dropping it stops the task.
pub(crate) struct Listener {
    ready: watch::Receiver<bool>,
    _stop: oneshot::Sender<()>,
}

impl Listener {
    pub(crate) fn spawn(pool: PgPool, channel: String, hub: Arc<Hub>) -> Self {
        let (ready_tx, ready) = watch::channel(false);
        let (stop, stop_rx) = oneshot::channel();
        // A dedicated one-connection pool: the listening connection never takes a slot of the
        // command pool, and a reconnect opens a fresh connection.
        let options = pool.connect_options().as_ref().clone();
        let own = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options);
        tokio::spawn(run(own, channel, hub, ready_tx, stop_rx));
        Listener { ready, _stop: stop }
    }

    /// Wait until the connection listens (at most `within`).
    pub(crate) async fn ready(&self, within: Duration) {
        let mut rx = self.ready.clone();
        let _ = tokio::time::timeout(within, rx.wait_for(|r| *r)).await;
    }
}

async fn run(
    pool: PgPool,
    channel: String,
    hub: Arc<Hub>,
    ready: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(&channel).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            _ = &mut stop => return,
            r = connected => match r {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, channel, "LISTEN failed; waiters fall back to polling");
                    tokio::select! {
                        _ = &mut stop => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(100);
        let _ = ready.send(true);
        hub.wake_all();
        loop {
            let next = tokio::select! {
                _ = &mut stop => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => dispatch(&hub, n.payload()),
                // The connection dropped and was re-established: anything may have been missed.
                Ok(None) => hub.wake_all(),
                Err(e) => {
                    tracing::warn!(error = %e, channel, "LISTEN connection lost; reconnecting");
                    let _ = ready.send(false);
                    hub.wake_all();
                    break;
                }
            }
        }
    }
}

fn dispatch(hub: &Hub, payload: &str) {
    match payload.as_bytes().first() {
        Some(b'j') => hub.jobs.notify_waiters(),
        Some(b'b') => hub.broadcast.notify_waiters(),
        Some(b's' | b'S') => {
            if hub.has_waiters() {
                for id in payload[1..].split(',') {
                    match id.parse::<TaskId>() {
                        Ok(id) => hub.task_done(id),
                        Err(_) => hub.wake_all(),
                    }
                }
            }
        }
        _ => hub.wake_all(),
    }
}
