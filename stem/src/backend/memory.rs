//! In-memory result backend: the reference implementation of the backend contract.

use std::collections::HashMap as StdHashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{
    DEFAULT_RESULT_TTL, GroupCounts, GroupState, MemberOutcome, MemberRecord, Progress, ResultBackend,
    TaskState, TaskStatus, WorkerHeartbeat,
};
use crate::broker::BoxFuture;
use crate::envelope::TaskId;
use crate::error::{Error, Result};

type HashMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;

/// How often expired entries are swept (lazily, on writes).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// In-memory result backend. Clones share the same store.
#[derive(Clone)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
}

struct Inner {
    ttl: Duration,
    state: Mutex<State>,
}

struct State {
    records: HashMap<TaskId, (TaskStatus, Instant)>,
    waiters: HashMap<TaskId, Vec<oneshot::Sender<TaskStatus>>>,
    groups: HashMap<TaskId, (GroupState, Instant)>,
    workers: HashMap<String, (WorkerHeartbeat, Instant)>,
    last_sweep: Instant,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    /// A backend keeping results for [`DEFAULT_RESULT_TTL`].
    pub fn new() -> Self {
        Self::with_ttl(DEFAULT_RESULT_TTL)
    }

    /// A backend keeping results (and group state) for `ttl`.
    pub fn with_ttl(ttl: Duration) -> Self {
        MemoryBackend {
            inner: Arc::new(Inner {
                ttl,
                state: Mutex::new(State {
                    records: HashMap::default(),
                    waiters: HashMap::default(),
                    groups: HashMap::default(),
                    workers: HashMap::default(),
                    last_sweep: Instant::now(),
                }),
            }),
        }
    }
}

impl State {
    fn sweep(&mut self, now: Instant) {
        if now.duration_since(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        self.records.retain(|_, (_, exp)| *exp > now);
        self.groups.retain(|_, (_, exp)| *exp > now);
        self.workers.retain(|_, (_, exp)| *exp > now);
        self.waiters.retain(|_, w| {
            w.retain(|tx| !tx.is_closed());
            !w.is_empty()
        });
    }

    /// Record one member's outcome (first outcome per index wins, counted once).
    fn record_member(
        &mut self,
        group: TaskId,
        index: usize,
        outcome: MemberOutcome,
        now: Instant,
    ) -> Result<GroupCounts> {
        let Some((g, _)) = self.groups.get_mut(&group).filter(|(_, exp)| *exp > now) else {
            return Err(Error::backend(format!("group {group} does not exist or has expired")));
        };
        let Some(slot) = g.members.get_mut(index) else {
            return Err(Error::backend(format!("group {group} has no member {index}")));
        };
        if slot.is_none() {
            if outcome.state == TaskState::Succeeded {
                g.counts.succeeded += 1;
            } else {
                g.counts.failed += 1;
            }
            *slot = Some(outcome);
        }
        Ok(g.counts)
    }

    fn live(&self, id: &TaskId, now: Instant) -> Option<&TaskStatus> {
        self.records.get(id).filter(|(_, exp)| *exp > now).map(|(s, _)| s)
    }
}

impl ResultBackend for MemoryBackend {
    fn set(&self, statuses: Vec<TaskStatus>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let now = Instant::now();
            let expires = now + self.inner.ttl;
            let mut guard = self.inner.state.lock();
            let st = &mut *guard;
            st.sweep(now);
            for mut status in statuses {
                let mut slot = st.records.get_mut(&status.id).filter(|(_, exp)| *exp > now);
                if let Some((current, _)) = slot.as_deref_mut() {
                    if !status.may_replace(current) {
                        continue;
                    }
                    if status.progress.is_none() {
                        // Keep the last reported progress across state changes.
                        status.progress = current.progress.take();
                    }
                }
                if status.state.is_terminal() && !st.waiters.is_empty() {
                    if let Some(waiters) = st.waiters.remove(&status.id) {
                        for tx in waiters {
                            let _ = tx.send(status.clone());
                        }
                    }
                }
                match slot {
                    Some((current, exp)) => {
                        *current = status;
                        *exp = expires;
                    }
                    None => {
                        st.records.insert(status.id, (status, expires));
                    }
                }
            }
            Ok(())
        })
    }

    fn get(&self, id: TaskId) -> BoxFuture<'_, Result<Option<TaskStatus>>> {
        Box::pin(async move {
            let st = self.inner.state.lock();
            Ok(st.live(&id, Instant::now()).cloned())
        })
    }

    fn wait(&self, id: TaskId, timeout: Duration) -> BoxFuture<'_, Result<Option<TaskStatus>>> {
        Box::pin(async move {
            let rx = {
                let mut st = self.inner.state.lock();
                match st.live(&id, Instant::now()) {
                    Some(s) if s.state.is_terminal() => return Ok(Some(s.clone())),
                    _ => {}
                }
                let (tx, rx) = oneshot::channel();
                st.waiters.entry(id).or_default().push(tx);
                rx
            };
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(status)) => Ok(Some(status)),
                _ => {
                    let mut st = self.inner.state.lock();
                    if let Some(w) = st.waiters.get_mut(&id) {
                        w.retain(|tx| !tx.is_closed());
                    }
                    Ok(st.live(&id, Instant::now()).cloned())
                }
            }
        })
    }

    fn progress(&self, id: TaskId, progress: Progress) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut st = self.inner.state.lock();
            if let Some((status, exp)) = st.records.get_mut(&id).filter(|(_, exp)| *exp > now) {
                status.updated_at = progress.at;
                status.progress = Some(progress);
                *exp = now + self.inner.ttl;
            }
            Ok(())
        })
    }

    fn forget(&self, id: TaskId) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.inner.state.lock().records.remove(&id);
            Ok(())
        })
    }

    fn group_init(&self, group: TaskId, total: usize) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut st = self.inner.state.lock();
            st.sweep(now);
            let ttl = self.inner.ttl;
            st.groups.entry(group).or_insert_with(|| {
                let state = GroupState {
                    id: group,
                    members: vec![None; total],
                    counts: GroupCounts { total, succeeded: 0, failed: 0 },
                    claimed: false,
                };
                (state, now + ttl)
            });
            Ok(())
        })
    }

    fn group_record(
        &self,
        group: TaskId,
        index: usize,
        outcome: MemberOutcome,
    ) -> BoxFuture<'_, Result<GroupCounts>> {
        Box::pin(async move {
            let now = Instant::now();
            self.inner.state.lock().record_member(group, index, outcome, now)
        })
    }

    fn group_record_many(
        &self,
        records: Vec<MemberRecord>,
    ) -> BoxFuture<'_, Result<Vec<Result<GroupCounts>>>> {
        Box::pin(async move {
            let now = Instant::now();
            // One lock for the whole batch: each record sees the ones before it.
            let mut st = self.inner.state.lock();
            Ok(records.into_iter().map(|r| st.record_member(r.group, r.index, r.outcome, now)).collect())
        })
    }

    fn group_get(&self, group: TaskId) -> BoxFuture<'_, Result<Option<GroupState>>> {
        Box::pin(async move {
            let now = Instant::now();
            let st = self.inner.state.lock();
            Ok(st.groups.get(&group).filter(|(_, exp)| *exp > now).map(|(g, _)| g.clone()))
        })
    }

    fn chord_claim(&self, group: TaskId) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut st = self.inner.state.lock();
            match st.groups.get_mut(&group).filter(|(_, exp)| *exp > now) {
                Some((g, _)) if !g.claimed => {
                    g.claimed = true;
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
    }

    fn heartbeat(&self, heartbeat: WorkerHeartbeat, ttl: Duration) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut st = self.inner.state.lock();
            st.workers.insert(heartbeat.worker_id.clone(), (heartbeat, now + ttl));
            Ok(())
        })
    }

    fn workers(&self) -> BoxFuture<'_, Result<Vec<WorkerHeartbeat>>> {
        Box::pin(async move {
            let now = Instant::now();
            let st = self.inner.state.lock();
            let mut out: Vec<_> =
                st.workers.values().filter(|(_, exp)| *exp > now).map(|(h, _)| h.clone()).collect();
            out.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
            Ok(out)
        })
    }
}
