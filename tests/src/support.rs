//! A small harness for worker tests: in-memory adapters, a producer, signals, one worker.

use std::sync::Arc;
use std::time::Duration;

use stem::backend::TaskStatus;
use stem::broker::DeadLetter;
use stem::{
    MemoryBackend, MemoryBroker, Registry, Signals, Stem, TaskId, Worker, WorkerConfig, WorkerHandle,
};

/// In-memory broker and backend with a producer; start and stop workers on them.
pub struct TestApp {
    pub broker: Arc<MemoryBroker>,
    pub backend: Arc<MemoryBackend>,
    pub signals: Signals,
    pub stem: Stem,
    pub registry: Arc<Registry>,
}

impl TestApp {
    pub fn new(registry: Registry) -> Self {
        let registry = Arc::new(registry.build().expect("registry"));
        let broker = Arc::new(MemoryBroker::new());
        let backend = Arc::new(MemoryBackend::new());
        let signals = Signals::new();
        let stem = Stem::builder(broker.clone(), backend.clone()).signals(signals.clone()).build();
        TestApp { broker, backend, signals, stem, registry }
    }

    /// A worker config suited to tests: fast fetch wakeups, short grace.
    pub fn config(&self) -> WorkerConfig {
        let mut c = WorkerConfig::default();
        c.concurrency = 4;
        c.fetch_wait = Duration::from_millis(200);
        c.shutdown_grace = Duration::from_secs(10);
        c.heartbeat_interval = Duration::from_millis(200);
        c
    }

    pub fn start(&self, config: WorkerConfig) -> WorkerHandle {
        Worker::builder(self.broker.clone(), self.backend.clone())
            .registry(Arc::clone(&self.registry))
            .signals(self.signals.clone())
            .producer(self.stem.clone())
            .config(config)
            .build()
            .expect("worker")
            .spawn()
    }

    pub fn start_default(&self) -> WorkerHandle {
        self.start(self.config())
    }

    pub async fn status(&self, id: TaskId) -> TaskStatus {
        use stem::ResultBackend;
        self.backend.get(id).await.unwrap().expect("status record")
    }

    /// The DLQ of `queue` once it holds at least `n` entries (the worker dead-letters right
    /// after recording the failure, so a waiter can see the failure a moment earlier).
    pub async fn dead(&self, queue: &str, n: usize) -> Vec<DeadLetter> {
        use stem::Broker;
        let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let dead = self.broker.dlq_list(queue, 0, 1000).await.unwrap();
            if dead.len() >= n || tokio::time::Instant::now() >= give_up {
                return dead;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
