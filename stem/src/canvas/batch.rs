//! Coalescing of group member records: the member records of canvas tasks that finish at the
//! same time go to the backend in one [`ResultBackend::group_record_many`] call (one script
//! call on Redis) instead of one `group_record` round trip each, and every caller gets its own
//! counts back.
//!
//! This is group commit: per backend handle, at most one batch is in flight; records that
//! arrive meanwhile wait for it and form the next batch. There is no timer: the flush waits
//! only for one turn of the scheduler (so executors that are ready to run right now add their
//! records first), then sends whatever is queued. An idle worker therefore pays no delay,
//! and a busy one sends about one call per round of finished deliveries.
//!
//! Guarantees are those of `group_record`, per caller: a caller returns only once its own
//! record was applied (or with an error, and the worker then retries the delivery, never
//! acking it without its record); a record's error (an expired group, say) is that caller's
//! alone. Nothing waits forever: the flush runs on its own task, and if it ends without
//! answering (a panic, a runtime shutting down) every waiting caller gets an error.
//!
//! The batching state is kept per backend handle (the `Arc` the worker's producer holds) in a
//! process-wide table of weak references, so worker instances on separate handles keep
//! separate batches and an entry never keeps a backend alive.

use std::sync::{Arc, LazyLock, Weak};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::backend::{GroupCounts, MemberRecord, ResultBackend};
use crate::error::{Error, Result};

/// Most records sent in one call.
const MAX_BATCH: usize = 512;

/// Why a caller's record has no answer of its own.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    /// The batch call failed as a whole.
    #[error("recording {records} group members failed: {message}")]
    Failed { records: usize, message: String },
    /// The backend answered a different number of records than it was sent.
    #[error("the backend answered {answers} results for {records} group member records")]
    Mismatch { records: usize, answers: usize },
    /// The flush ended before it answered (panicked, or its runtime shut down).
    #[error("the group member batch was abandoned before it was written")]
    Abandoned,
}

type Reply = oneshot::Sender<Result<GroupCounts>>;

/// The batching state of one backend handle.
struct Batcher {
    backend: Weak<dyn ResultBackend>,
    state: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<(MemberRecord, Reply)>,
    /// A flush task is running; it takes everything queued before it stops.
    flushing: bool,
}

/// Every backend handle that records members, by address (weak: entries die with the handle).
static BATCHERS: LazyLock<Mutex<Vec<Arc<Batcher>>>> = LazyLock::new(Default::default);

fn same_backend(a: &Weak<dyn ResultBackend>, b: &Arc<dyn ResultBackend>) -> bool {
    // Compare the data addresses only; the vtable part of the pointers plays no role.
    std::ptr::addr_eq(a.as_ptr(), Arc::as_ptr(b))
}

fn batcher_for(backend: &Arc<dyn ResultBackend>) -> Arc<Batcher> {
    let mut all = BATCHERS.lock();
    if let Some(b) = all.iter().find(|b| same_backend(&b.backend, backend)) {
        return Arc::clone(b);
    }
    // A dead handle's entry still holds its (weak) allocation, so its address cannot have
    // been reused by `backend`; drop such entries now.
    all.retain(|b| b.backend.strong_count() > 0);
    let b = Arc::new(Batcher { backend: Arc::downgrade(backend), state: Mutex::new(Queue::default()) });
    all.push(Arc::clone(&b));
    b
}

/// Record one member's outcome, batched with the records of other tasks finishing now;
/// returns the group's counts after this record, as `group_record` does.
pub(crate) async fn record_member(
    backend: &Arc<dyn ResultBackend>,
    record: MemberRecord,
) -> Result<GroupCounts> {
    let batcher = batcher_for(backend);
    let (tx, rx) = oneshot::channel();
    let start_flush = {
        let mut queue = batcher.state.lock();
        queue.waiting.push((record, tx));
        !std::mem::replace(&mut queue.flushing, true)
    };
    if start_flush {
        tokio::spawn(flush(batcher, Arc::clone(backend)));
    }
    rx.await.map_err(|_| Error::backend(BatchError::Abandoned))?
}

/// Send queued records until the queue is empty.
async fn flush(batcher: Arc<Batcher>, backend: Arc<dyn ResultBackend>) {
    let mut guard = FlushGuard { batcher: &batcher, in_flight: Vec::new(), done: false };
    // One scheduler turn: executors already woken add their records to this batch.
    tokio::task::yield_now().await;
    loop {
        let batch = {
            let mut queue = batcher.state.lock();
            if queue.waiting.is_empty() {
                queue.flushing = false;
                guard.done = true;
                return;
            }
            let take = queue.waiting.len().min(MAX_BATCH);
            queue.waiting.drain(..take).collect::<Vec<_>>()
        };
        let records: Vec<MemberRecord>;
        (records, guard.in_flight) = batch.into_iter().unzip();
        let n = records.len();
        let answer = backend.group_record_many(records).await;
        let replies = std::mem::take(&mut guard.in_flight);
        match answer {
            Ok(results) if results.len() == n => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Ok(results) => {
                let answers = results.len();
                tracing::error!(
                    records = n,
                    answers,
                    "group_record_many answered the wrong number of results"
                );
                for reply in replies {
                    let _ = reply.send(Err(Error::backend(BatchError::Mismatch { records: n, answers })));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for reply in replies {
                    let failed = BatchError::Failed { records: n, message: message.clone() };
                    let _ = reply.send(Err(Error::backend(failed)));
                }
            }
        }
    }
}

/// If a flush ends without emptying the queue (a panic, or its task dropped when the runtime
/// shuts down), let the next record start a new flush, then fail the records of the batch in
/// flight and those still queued (their reply senders are dropped): their callers retry their
/// deliveries instead of waiting forever. The flag is cleared first, so a caller that retries
/// at once starts a new flush.
struct FlushGuard<'a> {
    batcher: &'a Batcher,
    in_flight: Vec<Reply>,
    done: bool,
}

impl Drop for FlushGuard<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let waiting = {
            let mut queue = self.batcher.state.lock();
            queue.flushing = false;
            std::mem::take(&mut queue.waiting)
        };
        drop(waiting);
        self.in_flight.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::TaskId;
    use crate::backend::{MemberOutcome, MemoryBackend, Progress, TaskState, TaskStatus, WorkerHeartbeat};
    use crate::broker::BoxFuture;
    use tokio::sync::Notify;

    /// A memory backend that logs the size of every `group_record_many` call, can hold the
    /// first call until released, and can fail whole calls.
    struct Probe {
        inner: MemoryBackend,
        calls: Mutex<Vec<usize>>,
        entered: Notify,
        hold_first: Mutex<Option<oneshot::Receiver<()>>>,
        fail_calls: std::sync::atomic::AtomicUsize,
        panic_calls: std::sync::atomic::AtomicUsize,
    }

    impl Probe {
        fn new() -> Arc<Self> {
            Arc::new(Probe {
                inner: MemoryBackend::new(),
                calls: Mutex::new(Vec::new()),
                entered: Notify::new(),
                hold_first: Mutex::new(None),
                fail_calls: 0.into(),
                panic_calls: 0.into(),
            })
        }
    }

    impl ResultBackend for Probe {
        fn set(&self, statuses: Vec<TaskStatus>) -> BoxFuture<'_, Result<()>> {
            self.inner.set(statuses)
        }
        fn get(&self, id: TaskId) -> BoxFuture<'_, Result<Option<TaskStatus>>> {
            self.inner.get(id)
        }
        fn wait(&self, id: TaskId, timeout: Duration) -> BoxFuture<'_, Result<Option<TaskStatus>>> {
            self.inner.wait(id, timeout)
        }
        fn progress(&self, id: TaskId, progress: Progress) -> BoxFuture<'_, Result<()>> {
            self.inner.progress(id, progress)
        }
        fn forget(&self, id: TaskId) -> BoxFuture<'_, Result<()>> {
            self.inner.forget(id)
        }
        fn group_init(&self, group: TaskId, total: usize) -> BoxFuture<'_, Result<()>> {
            self.inner.group_init(group, total)
        }
        fn group_record(
            &self,
            group: TaskId,
            index: usize,
            outcome: MemberOutcome,
        ) -> BoxFuture<'_, Result<GroupCounts>> {
            self.inner.group_record(group, index, outcome)
        }
        fn group_record_many(
            &self,
            records: Vec<MemberRecord>,
        ) -> BoxFuture<'_, Result<Vec<Result<GroupCounts>>>> {
            Box::pin(async move {
                use std::sync::atomic::Ordering::SeqCst;
                self.calls.lock().push(records.len());
                self.entered.notify_one();
                let hold = self.hold_first.lock().take();
                if let Some(hold) = hold {
                    let _ = hold.await;
                }
                if self.panic_calls.load(SeqCst) > 0 {
                    self.panic_calls.fetch_sub(1, SeqCst);
                    panic!("probe: group_record_many panicked");
                }
                if self.fail_calls.load(SeqCst) > 0 {
                    self.fail_calls.fetch_sub(1, SeqCst);
                    return Err(Error::backend("probe: backend down"));
                }
                self.inner.group_record_many(records).await
            })
        }
        fn group_get(&self, group: TaskId) -> BoxFuture<'_, Result<Option<crate::backend::GroupState>>> {
            self.inner.group_get(group)
        }
        fn chord_claim(&self, group: TaskId) -> BoxFuture<'_, Result<bool>> {
            self.inner.chord_claim(group)
        }
        fn heartbeat(&self, heartbeat: WorkerHeartbeat, ttl: Duration) -> BoxFuture<'_, Result<()>> {
            self.inner.heartbeat(heartbeat, ttl)
        }
        fn workers(&self) -> BoxFuture<'_, Result<Vec<WorkerHeartbeat>>> {
            self.inner.workers()
        }
    }

    fn member(group: TaskId, index: usize) -> MemberRecord {
        MemberRecord {
            group,
            index,
            outcome: MemberOutcome {
                task_id: TaskId::new(),
                state: TaskState::Succeeded,
                result: Some(serde_json::json!(index)),
                error: None,
            },
        }
    }

    fn queued(backend: &Arc<dyn ResultBackend>) -> usize {
        batcher_for(backend).state.lock().waiting.len()
    }

    /// Wait (without sleeping) until `n` records are queued behind the batch in flight.
    async fn until_queued(backend: &Arc<dyn ResultBackend>, n: usize) {
        while queued(backend) < n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_arriving_during_a_call_go_out_together_with_their_own_counts() {
        let probe = Probe::new();
        let (release, hold) = oneshot::channel();
        *probe.hold_first.lock() = Some(hold);
        let backend: Arc<dyn ResultBackend> = probe.clone();
        let g = TaskId::new();
        backend.group_init(g, 32).await.unwrap();

        let b = Arc::clone(&backend);
        let first = tokio::spawn(async move { record_member(&b, member(g, 0)).await });
        probe.entered.notified().await;
        let mut rest = Vec::new();
        for index in 1..32 {
            let b = Arc::clone(&backend);
            rest.push(tokio::spawn(async move { record_member(&b, member(g, index)).await }));
        }
        until_queued(&backend, 31).await;
        release.send(()).unwrap();

        assert_eq!(first.await.unwrap().unwrap().succeeded, 1);
        let mut seen: Vec<usize> = Vec::new();
        for r in rest {
            let counts = r.await.unwrap().unwrap();
            assert_eq!(counts.total, 32);
            seen.push(counts.succeeded);
        }
        seen.sort_unstable();
        // One batch of 31 applied in order: each caller sees the counts right after its own
        // record, so the one applied last (and only it) sees the group complete.
        assert_eq!(seen, (2..=32).collect::<Vec<_>>());
        assert_eq!(*probe.calls.lock(), vec![1, 31], "two calls for 32 records");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_error_is_only_its_callers() {
        let probe = Probe::new();
        let (release, hold) = oneshot::channel();
        *probe.hold_first.lock() = Some(hold);
        let backend: Arc<dyn ResultBackend> = probe.clone();
        let g = TaskId::new();
        backend.group_init(g, 2).await.unwrap();

        let b = Arc::clone(&backend);
        let first = tokio::spawn(async move { record_member(&b, member(g, 0)).await });
        probe.entered.notified().await;
        let b = Arc::clone(&backend);
        let unknown = tokio::spawn(async move { record_member(&b, member(TaskId::new(), 0)).await });
        let b = Arc::clone(&backend);
        let out_of_range = tokio::spawn(async move { record_member(&b, member(g, 7)).await });
        let b = Arc::clone(&backend);
        let ok = tokio::spawn(async move { record_member(&b, member(g, 1)).await });
        until_queued(&backend, 3).await;
        release.send(()).unwrap();

        first.await.unwrap().unwrap();
        assert!(unknown.await.unwrap().is_err(), "unknown group");
        assert!(out_of_range.await.unwrap().is_err(), "index out of range");
        let counts = ok.await.unwrap().unwrap();
        assert!(counts.is_done(), "the valid record of the same batch is applied: {counts:?}");
        assert_eq!(*probe.calls.lock(), vec![1, 3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_call_fails_every_caller_of_that_batch_and_the_next_one_works() {
        let probe = Probe::new();
        probe.fail_calls.store(1, std::sync::atomic::Ordering::SeqCst);
        let backend: Arc<dyn ResultBackend> = probe.clone();
        let g = TaskId::new();
        backend.group_init(g, 1).await.unwrap();
        let e = record_member(&backend, member(g, 0)).await.unwrap_err();
        assert!(e.to_string().contains("backend down"), "{e}");
        assert_eq!(backend.group_get(g).await.unwrap().unwrap().counts.completed(), 0);
        // The retry (a redelivery) records it.
        assert!(record_member(&backend, member(g, 0)).await.unwrap().is_done());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_call_fails_its_callers_instead_of_leaving_them_waiting() {
        let probe = Probe::new();
        probe.panic_calls.store(1, std::sync::atomic::Ordering::SeqCst);
        let backend: Arc<dyn ResultBackend> = probe.clone();
        let g = TaskId::new();
        backend.group_init(g, 1).await.unwrap();
        assert!(record_member(&backend, member(g, 0)).await.is_err());
        // The next record starts a new flush.
        assert!(record_member(&backend, member(g, 0)).await.unwrap().is_done());
    }

    #[tokio::test]
    async fn separate_handles_keep_separate_batchers() {
        let a: Arc<dyn ResultBackend> = Arc::new(MemoryBackend::new());
        let b: Arc<dyn ResultBackend> = Arc::new(MemoryBackend::new());
        assert!(!Arc::ptr_eq(&batcher_for(&a), &batcher_for(&b)));
        assert!(Arc::ptr_eq(&batcher_for(&a), &batcher_for(&Arc::clone(&a))));
        let weak = Arc::downgrade(&batcher_for(&a));
        drop(a);
        // A dead handle's entry goes when the next new handle registers.
        let _c = batcher_for(&(Arc::new(MemoryBackend::new()) as Arc<dyn ResultBackend>));
        assert!(weak.upgrade().is_none());
    }
}
