//! Typed lifecycle hooks ("signals"): connect a closure to a signal type, and the producer or
//! worker calls it at that point of a task's or worker's life.
//!
//! Task signals fire in this order for one attempt: [`TaskReceived`], [`TaskPrerun`], then one
//! of [`TaskSucceeded`], [`TaskRetried`] or [`TaskFailed`], then [`TaskPostrun`]. A task
//! skipped before running (expired, revoked) fires [`TaskReceived`] then [`TaskRevoked`].
//!
//! Listeners run inline on the worker's task, so keep them short. A listener that panics is
//! logged and skipped; it never breaks the worker.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::RwLock;

use crate::backend::{TaskFailure, TaskState, WorkerHeartbeat};
use crate::envelope::Envelope;

type Listener = Arc<dyn Fn(&dyn Any) + Send + Sync>;

mod sealed {
    pub trait Sealed {}
}

/// A signal payload type. Implemented by the types in this module only.
pub trait Signal: sealed::Sealed + Any + Send + Sync {
    #[doc(hidden)]
    const SLOT: usize;
}

macro_rules! signals {
    ($( $(#[$doc:meta])* $name:ident $slot:literal { $( $(#[$fdoc:meta])* $field:ident : $ty:ty ),* $(,)? } )*) => {
        $(
            $(#[$doc])*
            #[derive(Clone, Debug)]
            #[non_exhaustive]
            pub struct $name { $( $(#[$fdoc])* pub $field: $ty ),* }
            impl sealed::Sealed for $name {}
            impl Signal for $name { const SLOT: usize = $slot; }
        )*
    };
}

const SLOTS: usize = 14;

signals! {
    /// A producer is about to publish this envelope.
    BeforePublish 0 { /** The envelope. */ envelope: Envelope }
    /// A producer published this envelope.
    AfterPublish 1 { /** The envelope. */ envelope: Envelope }
    /// A worker received a delivery.
    TaskReceived 2 { /** The envelope. */ envelope: Arc<Envelope>, /** Worker. */ worker_id: Arc<str> }
    /// A task is about to run.
    TaskPrerun 3 { /** The envelope. */ envelope: Arc<Envelope>, /** Worker. */ worker_id: Arc<str> }
    /// A task attempt finished (after its outcome signal).
    TaskPostrun 4 {
        /** The envelope. */ envelope: Arc<Envelope>, /** Worker. */ worker_id: Arc<str>,
        /** State recorded. */ state: TaskState, /** Run time. */ duration: Duration
    }
    /// A task succeeded.
    TaskSucceeded 5 {
        /** The envelope. */ envelope: Arc<Envelope>, /** Worker. */ worker_id: Arc<str>,
        /** Result. */ result: serde_json::Value, /** Run time. */ duration: Duration
    }
    /// A task failed for good.
    TaskFailed 6 { /** The envelope. */ envelope: Arc<Envelope>, /** Worker. */ worker_id: Arc<str>, /** Error. */ error: TaskFailure }
    /// A task attempt failed and a retry was scheduled.
    TaskRetried 7 {
        /** The envelope. */ envelope: Arc<Envelope>, /** Worker. */ worker_id: Arc<str>,
        /** Error. */ error: TaskFailure, /** Delay before the retry. */ delay: Duration
    }
    /// A task was not run: revoked or expired.
    TaskRevoked 8 { /** The envelope. */ envelope: Arc<Envelope>, /** Worker. */ worker_id: Arc<str>, /** Why. */ reason: String }
    /// A task passed its soft time limit; its context is now cancelled.
    TaskSoftTimeLimit 9 { /** The envelope. */ envelope: Arc<Envelope>, /** Worker. */ worker_id: Arc<str>, /** The limit. */ limit: Duration }
    /// A worker is consuming.
    WorkerReady 10 { /** Worker. */ worker_id: Arc<str>, /** Queues. */ queues: Vec<String> }
    /// A worker stopped fetching and is draining.
    WorkerStopping 11 { /** Worker. */ worker_id: Arc<str> }
    /// A worker finished shutting down.
    WorkerShutdown 12 { /** Worker. */ worker_id: Arc<str> }
    /// A worker wrote a heartbeat.
    WorkerHeartbeatSent 13 { /** The heartbeat. */ heartbeat: WorkerHeartbeat }
}

/// A set of listeners. Clones share the same listeners.
#[derive(Clone, Default)]
pub struct Signals {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    active: [AtomicBool; SLOTS],
    listeners: [RwLock<Vec<Listener>>; SLOTS],
}

impl Signals {
    /// No listeners.
    pub fn new() -> Self {
        Self::default()
    }

    /// Call `listener` whenever signal `S` fires.
    pub fn connect<S: Signal>(&self, listener: impl Fn(&S) + Send + Sync + 'static) {
        let erased: Listener = Arc::new(move |any: &dyn Any| {
            if let Some(s) = any.downcast_ref::<S>() {
                listener(s);
            }
        });
        self.inner.listeners[S::SLOT].write().push(erased);
        self.inner.active[S::SLOT].store(true, Ordering::Release);
    }

    /// Remove every listener of `S`.
    pub fn disconnect_all<S: Signal>(&self) {
        self.inner.listeners[S::SLOT].write().clear();
        self.inner.active[S::SLOT].store(false, Ordering::Release);
    }

    /// Whether anyone listens to `S` (payloads are only built when someone does).
    pub fn is_connected<S: Signal>(&self) -> bool {
        self.inner.active[S::SLOT].load(Ordering::Acquire)
    }

    /// Fire `S`, building the payload only if someone listens.
    pub(crate) fn emit<S: Signal>(&self, make: impl FnOnce() -> S) {
        if !self.is_connected::<S>() {
            return;
        }
        let payload = make();
        let listeners: Vec<Listener> = self.inner.listeners[S::SLOT].read().clone();
        for listener in listeners {
            if std::panic::catch_unwind(AssertUnwindSafe(|| listener(&payload))).is_err() {
                tracing::warn!(signal = std::any::type_name::<S>(), "a signal listener panicked; skipped");
            }
        }
    }
}

impl std::fmt::Debug for Signals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signals").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn panicking_listener_does_not_stop_the_others() {
        let signals = Signals::new();
        let calls = Arc::new(AtomicUsize::new(0));
        signals.connect(|_: &WorkerStopping| panic!("boom"));
        let c = Arc::clone(&calls);
        signals.connect(move |s: &WorkerStopping| {
            assert_eq!(&*s.worker_id, "w1");
            c.fetch_add(1, Ordering::SeqCst);
        });
        signals.emit(|| WorkerStopping { worker_id: Arc::from("w1") });
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn payload_is_built_only_when_connected() {
        let signals = Signals::new();
        let mut built = false;
        signals.emit(|| {
            built = true;
            WorkerShutdown { worker_id: Arc::from("w") }
        });
        assert!(!built);
    }
}
