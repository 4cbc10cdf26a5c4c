//! `StemApp`: producer, broker, backend and a worker wired together in one process.

use std::ops::Deref;
use std::sync::Arc;

#[cfg(feature = "auto-register")]
use crate::backend::MemoryBackend;
use crate::backend::ResultBackend;
use crate::broker::Broker;
#[cfg(feature = "auto-register")]
use crate::broker::MemoryBroker;
use crate::error::Result;
use crate::producer::Stem;
use crate::signals::Signals;
use crate::store::{MemoryRevokeStore, MemoryUniqueStore};
use crate::task::Registry;
use crate::worker::{Worker, WorkerConfig, WorkerHandle};

/// A producer plus a running worker in one process; derefs to [`Stem`] for enqueueing.
pub struct StemApp {
    stem: Stem,
    worker: WorkerHandle,
    registry: Arc<Registry>,
}

impl StemApp {
    /// In-memory broker and backend, every `#[task]` in the binary, and a worker consuming
    /// the default queue plus every queue a registered task names.
    #[cfg(feature = "auto-register")]
    pub async fn in_memory() -> Result<Self> {
        Self::start(
            Arc::new(MemoryBroker::new()),
            Arc::new(MemoryBackend::new()),
            Registry::from_inventory()?,
            WorkerConfig::default(),
        )
        .await
    }

    /// Wire `registry` on `broker` and `backend` and start a worker with `config` (its queues
    /// are extended with every queue a registered task names).
    pub async fn start(
        broker: Arc<dyn Broker>,
        backend: Arc<dyn ResultBackend>,
        registry: Registry,
        mut config: WorkerConfig,
    ) -> Result<Self> {
        let registry = Arc::new(registry);
        for q in registry.queues() {
            if !config.queues.iter().any(|c| c == q) {
                config.queues.push(q.to_owned());
            }
        }
        let signals = Signals::new();
        // One process: in-memory revoke and unique stores are shared by producer and worker.
        let revokes = Arc::new(MemoryRevokeStore::new());
        let stem = Stem::builder(Arc::clone(&broker), Arc::clone(&backend))
            .signals(signals.clone())
            .registry(Arc::clone(&registry))
            .revoke_store(revokes.clone())
            .unique_store(Arc::new(MemoryUniqueStore::new()))
            .build();
        let worker = Worker::builder(broker, backend)
            .registry(Arc::clone(&registry))
            .revoke_store(revokes)
            .signals(signals)
            .producer(stem.clone())
            .config(config)
            .build()?
            .spawn();
        Ok(StemApp { stem, worker, registry })
    }

    /// The producer.
    pub fn stem(&self) -> &Stem {
        &self.stem
    }

    /// The registered tasks.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Stop the worker gracefully.
    pub async fn shutdown(self) -> Result<()> {
        self.worker.shutdown().await
    }
}

impl Deref for StemApp {
    type Target = Stem;
    fn deref(&self) -> &Stem {
        &self.stem
    }
}
