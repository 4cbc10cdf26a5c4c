//! Coalescing of group member records: the member records of canvas tasks that finish at the
//! same time go to the backend in one [`ResultBackend::group_record_many`] call (one script
//! call on Redis) instead of one `group_record` round trip each, and every caller gets its own
//! counts back.
//!
//! A flush gathers the records that arrive within one turn of the scheduler (the executors
//! woken by the same fetch, which finish together), then sends them in one call; records
//! that arrive after it has taken the queue start the next flush. There is no timer, and a
//! flush never waits for an earlier one: an idle worker pays no delay, and a slow call holds
//! up only the records in it. (Backends without a native batch, which run every record as its
//! own `group_record` call, therefore behave as if the records were not batched.)
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
    /// A flush task is gathering records; it will take everything queued.
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

/// Gather for one scheduler turn, take the queue, send it in one call, answer each caller.
async fn flush(batcher: Arc<Batcher>, backend: Arc<dyn ResultBackend>) {
    let mut guard = FlushGuard { batcher: &batcher, taken: false };
    // One scheduler turn: executors already woken add their records to this batch.
    tokio::task::yield_now().await;
    let batch = {
        let mut queue = batcher.state.lock();
        queue.flushing = false;
        std::mem::take(&mut queue.waiting)
    };
    guard.taken = true;
    if batch.is_empty() {
        return;
    }
    // If this task ends while the call is out (a panic, its runtime shutting down), the reply
    // senders are dropped with it and every caller of the batch gets an error.
    let (records, replies): (Vec<MemberRecord>, Vec<Reply>) = batch.into_iter().unzip();
    let n = records.len();
    match backend.group_record_many(records).await {
        Ok(results) if results.len() == n => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        Ok(results) => {
            let answers = results.len();
            tracing::error!(records = n, answers, "group_record_many answered the wrong number of results");
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

/// If a flush ends before it took the queue (its task dropped while gathering, when the
/// runtime shuts down), let the next record start a new flush and fail the records queued
/// for this one (their reply senders are dropped): their callers retry their deliveries
/// instead of waiting forever.
struct FlushGuard<'a> {
    batcher: &'a Batcher,
    taken: bool,
}

impl Drop for FlushGuard<'_> {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        let waiting = {
            let mut queue = self.batcher.state.lock();
            queue.flushing = false;
            std::mem::take(&mut queue.waiting)
        };
        drop(waiting);
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

    /// Record every member from one task (`join_all` polls them all before the flush task
    /// can run on this single-threaded runtime): they form one batch.
    async fn record_all(
        backend: &Arc<dyn ResultBackend>,
        records: Vec<MemberRecord>,
    ) -> Vec<Result<GroupCounts>> {
        futures_util::future::join_all(records.into_iter().map(|r| record_member(backend, r))).await
    }

    #[tokio::test]
    async fn records_of_one_turn_go_out_in_one_call_each_with_its_own_counts() {
        let probe = Probe::new();
        let backend: Arc<dyn ResultBackend> = probe.clone();
        let g = TaskId::new();
        backend.group_init(g, 32).await.unwrap();
        let results = record_all(&backend, (0..32).map(|i| member(g, i)).collect()).await;
        let seen: Vec<usize> = results.into_iter().map(|r| r.unwrap().succeeded).collect();
        // Applied in order: each caller sees the counts right after its own record, so the
        // one applied last (and only it) sees the group complete.
        assert_eq!(seen, (1..=32).collect::<Vec<_>>());
        assert_eq!(*probe.calls.lock(), vec![32], "one call for 32 records");
    }

    #[tokio::test]
    async fn a_record_error_is_only_its_callers() {
        let probe = Probe::new();
        let backend: Arc<dyn ResultBackend> = probe.clone();
        let g = TaskId::new();
        backend.group_init(g, 2).await.unwrap();
        let results =
            record_all(&backend, vec![member(g, 0), member(TaskId::new(), 0), member(g, 7), member(g, 1)])
                .await;
        assert_eq!(*probe.calls.lock(), vec![4]);
        assert_eq!(results[0].as_ref().unwrap().succeeded, 1);
        assert!(results[1].is_err(), "unknown group");
        assert!(results[2].is_err(), "index out of range");
        assert!(results[3].as_ref().unwrap().is_done(), "the valid records of the batch are applied");
    }

    #[tokio::test]
    async fn a_slow_call_holds_up_only_its_own_records() {
        let probe = Probe::new();
        let (release, hold) = oneshot::channel();
        *probe.hold_first.lock() = Some(hold);
        let backend: Arc<dyn ResultBackend> = probe.clone();
        let g = TaskId::new();
        backend.group_init(g, 2).await.unwrap();
        let b = Arc::clone(&backend);
        let slow = tokio::spawn(async move { record_member(&b, member(g, 0)).await });
        probe.entered.notified().await;
        // The first call is held; a record arriving now goes out in a call of its own.
        assert_eq!(record_member(&backend, member(g, 1)).await.unwrap().succeeded, 1);
        release.send(()).unwrap();
        assert!(slow.await.unwrap().unwrap().is_done());
        assert_eq!(*probe.calls.lock(), vec![1, 1]);
    }

    #[tokio::test]
    async fn a_failed_call_fails_every_caller_of_that_batch_and_the_next_one_works() {
        let probe = Probe::new();
        probe.fail_calls.store(1, std::sync::atomic::Ordering::SeqCst);
        let backend: Arc<dyn ResultBackend> = probe.clone();
        let g = TaskId::new();
        backend.group_init(g, 2).await.unwrap();
        let results = record_all(&backend, vec![member(g, 0), member(g, 1)]).await;
        for r in results {
            let e = r.unwrap_err();
            assert!(e.to_string().contains("backend down"), "{e}");
        }
        assert_eq!(backend.group_get(g).await.unwrap().unwrap().counts.completed(), 0);
        // The retries (redeliveries) record them.
        let results = record_all(&backend, vec![member(g, 0), member(g, 1)]).await;
        assert!(results[1].as_ref().unwrap().is_done());
    }

    #[tokio::test]
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
