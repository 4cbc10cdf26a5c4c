//! The LISTEN side: one connection per [`PgStore`](super::PgStore) listening on the
//! namespace's channel and turning notifications into in-process wake-ups.
//!
//! Payloads: `j` (jobs became ready), `b` (a broadcast message), `S<uuid>,<uuid>,…` (tasks
//! reached a terminal state; `s<uuid>`, one task, is read too). A lost connection is logged at
//! once (it is usually the first sign of a server outage); the listener then reconnects by
//! itself with capped backoff, logging each failed attempt, and wakes every waiter, since
//! notifications may have been missed in between. Meanwhile consumers and waiters fall back to
//! polling.

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
        // command pool, and a reconnect opens a fresh connection. The pool keeps retrying a
        // refused connection until its acquire timeout: keep that short so an outage is
        // reported every few seconds.
        let options = pool.connect_options().as_ref().clone();
        let own = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(RECONNECT_ATTEMPT)
            .connect_lazy_with(options);
        tokio::spawn(run(own, channel, hub, ready_tx, stop_rx));
        Listener { ready, _stop: stop }
    }

    /// Wait until the connection has listened once (at most `within`). After a later loss,
    /// nobody waits: consumers and waiters poll until the listener is back, and it wakes
    /// them all when it is.
    pub(crate) async fn ready(&self, within: Duration) {
        let mut rx = self.ready.clone();
        let _ = tokio::time::timeout(within, rx.wait_for(|r| *r)).await;
    }
}

/// How long one reconnect attempt may take.
const RECONNECT_ATTEMPT: Duration = Duration::from_secs(3);

async fn run(
    pool: PgPool,
    channel: String,
    hub: Arc<Hub>,
    ready: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut listened_before = false;
    loop {
        let connected = async {
            let mut l = PgListener::connect_with(&pool).await?;
            // Report a lost connection at once instead of reconnecting inside `try_recv`.
            l.eager_reconnect(false);
            l.listen(&channel).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            _ = &mut stop => return,
            r = connected => match r {
                Ok(l) => l,
                Err(e) => {
                    let error = match e {
                        sqlx::Error::PoolTimedOut => format!("no connection within {RECONNECT_ATTEMPT:?}"),
                        e => e.to_string(),
                    };
                    tracing::warn!(error, channel, retry_in = ?backoff, "LISTEN failed; waiters fall back to polling");
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
        if listened_before {
            tracing::info!(channel, "LISTEN connection to Postgres re-established");
        }
        listened_before = true;
        let _ = ready.send(true);
        hub.wake_all();
        loop {
            let next = tokio::select! {
                _ = &mut stop => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => dispatch(&hub, n.payload()),
                // The connection dropped (a server shutdown ends it this way).
                Ok(None) => {
                    tracing::warn!(channel, "lost the LISTEN connection to Postgres; reconnecting");
                    hub.wake_all();
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, channel, "LISTEN connection failed; reconnecting");
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
