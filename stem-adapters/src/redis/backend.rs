//! The Redis result backend: status records (fields of slot hashes, or keys, with a TTL;
//! fenced by a Lua script where a write could replace another), progress beside them, terminal
//! writes published for `wait`, groups and chord claims (see `groups.rs`), heartbeats in a
//! hash with an expiry index.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::{PushInfo, PushKind, Value};
use stem::TaskId;
use stem::backend::{
    GroupCounts, GroupState, MemberOutcome, MemberRecord, Progress, ResultBackend, TaskState, TaskStatus,
    WorkerHeartbeat,
};
use stem::broker::BoxFuture;
use stem::{Error, Result};
use tokio::sync::{OnceCell, mpsc, oneshot};

use super::RedisConnection;
use super::groups;
use super::keys::Keys;
use super::scripts::{self, Eval};

/// How long finished waits gather before their channels are unsubscribed together.
const UNSUBSCRIBE_BATCH_DELAY: Duration = Duration::from_millis(20);

/// Most records written by one script call.
const SET_CHUNK: usize = 2_000;

fn err(e: impl Into<stem::error::BoxError>) -> Error {
    Error::backend(e)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A result backend on Redis. Cheap to clone; clones share connections and waiters.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("namespace", &self.inner.keys.namespace())
            .field("ttl", &self.inner.ttl)
            .finish_non_exhaustive()
    }
}

type Waiter = (u64, oneshot::Sender<TaskStatus>);

/// What a waiter heard first: the completion message, or its own read of the record.
enum First {
    Pushed(std::result::Result<TaskStatus, oneshot::error::RecvError>),
    Read(Result<Option<TaskStatus>>),
}

pub(super) struct Inner {
    conn: RedisConnection,
    pub(super) keys: Keys,
    pub(super) ttl: Duration,
    /// Group totals seen, for recording members without a script (see `groups.rs`).
    pub(super) totals: groups::Totals,
    /// Tasks being waited on here, each with its waiters.
    waiters: Mutex<HashMap<TaskId, Vec<Waiter>>>,
    next_waiter: AtomicU64,
    /// The pub/sub connection, opened on the first `wait`.
    pubsub: OnceCell<ConnectionManager>,
    /// Channels subscribed; changed only under this lock so (un)subscribes never interleave.
    subscribed: tokio::sync::Mutex<HashSet<TaskId>>,
    /// Channels nobody may wait on any more, unsubscribed in batches off the waiting path.
    unsubscribe_queue: Mutex<Vec<TaskId>>,
    unsubscribing: AtomicBool,
}

impl RedisBackend {
    /// A backend in `namespace` on `conn` keeping records for `ttl`.
    pub fn new(conn: RedisConnection, namespace: &str, ttl: Duration) -> Self {
        RedisBackend {
            inner: Arc::new(Inner {
                conn,
                keys: Keys::new(namespace),
                ttl,
                totals: groups::Totals::default(),
                waiters: Mutex::new(HashMap::new()),
                next_waiter: AtomicU64::new(0),
                pubsub: OnceCell::new(),
                subscribed: tokio::sync::Mutex::new(HashSet::new()),
                unsubscribe_queue: Mutex::new(Vec::new()),
                unsubscribing: AtomicBool::new(false),
            }),
        }
    }

    /// The key names this backend uses.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// Whether this backend lives on `conn` under `keys`' namespace, so a broker there may
    /// write its records in the same script as its acks.
    pub(crate) fn colocated_with(&self, conn: &RedisConnection, keys: &Keys) -> bool {
        self.inner.conn.same_as(conn) && self.inner.keys == *keys
    }

    /// How long records are kept.
    pub(crate) fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// Append the commands writing `queued` records to `pipe`, ahead of the commands that
    /// publish their envelopes (see `RedisBroker::record_and_publish`).
    pub(crate) fn push_create_queued(
        &self,
        pipe: &mut redis::Pipeline,
        statuses: &[TaskStatus],
    ) -> Result<QueuedWrites> {
        self.inner.push_create_queued(pipe, statuses)
    }

    /// Given the answers to [`Self::push_create_queued`]'s commands, write the records that
    /// met an existing one through the fencing script.
    pub(crate) async fn finish_create_queued(
        &self,
        statuses: &[TaskStatus],
        answers: &[Value],
        writes: &QueuedWrites,
    ) -> Result<()> {
        let missed = writes.missed(statuses, answers);
        if missed.is_empty() { Ok(()) } else { self.set_fenced(missed).await }
    }

    /// Append `HDEL`s removing the `queued` records of these tasks from their slot hashes
    /// (their own record, written now, supersedes them).
    pub(crate) fn push_drop_queued<'s>(
        &self,
        pipe: &mut redis::Pipeline,
        statuses: impl IntoIterator<Item = &'s TaskStatus>,
    ) {
        for (hash, ids) in by_queued_hash(&self.inner.keys, statuses) {
            pipe.cmd("HDEL").arg(hash).arg(ids);
        }
    }

    /// The fencing script's call writing `statuses` (at most one chunk), for a pipeline.
    pub(crate) fn set_fenced_call(&self, statuses: &[TaskStatus]) -> Result<Eval> {
        let mut e = self.inner.eval(&scripts::SET_STATUS);
        e.arg(millis(self.inner.ttl));
        for s in statuses {
            push_status_args(&mut e, &self.inner.keys, s)?;
        }
        Ok(e)
    }

    /// Append the plain commands that store the terminal records `statuses` of deliveries
    /// whose leases are known to hold (see `RedisBroker::record_and_ack`): one `HSET` per
    /// record slot hash (plus its `PEXPIRE`), or `SET` with the TTL for an id that has none;
    /// removal of the separate progress key when a record carries its progress itself; the
    /// completion messages. Stored values and messages are the fencing script's, byte for
    /// byte.
    pub(crate) fn push_terminals(&self, pipe: &mut redis::Pipeline, statuses: &[TaskStatus]) -> Result<()> {
        let keys = &self.inner.keys;
        let ttl = millis(self.inner.ttl);
        let mut values = Vec::with_capacity(statuses.len());
        for s in statuses {
            values.push(stored_value(s)?);
        }
        let mut id_buf = [0u8; 36];
        for (slot, members) in super::grouped(statuses.iter().zip(&values), |(s, _)| Keys::slot(s.id)) {
            let hash = keys.record_hash(slot);
            pipe.cmd("HSET").arg(&hash);
            for (s, value) in members {
                pipe.arg(&*s.id.0.as_hyphenated().encode_lower(&mut id_buf)).arg(value);
            }
            pipe.cmd("PEXPIRE").arg(hash).arg(ttl);
        }
        for (s, value) in statuses.iter().zip(values) {
            if Keys::slot(s.id).is_none() {
                pipe.cmd("SET").arg(keys.record(s.id)).arg(&value).arg("PX").arg(ttl);
            }
            if s.progress.is_some() {
                pipe.cmd("DEL").arg(keys.progress(s.id));
            }
            pipe.cmd("PUBLISH").arg(keys.done(s.id)).arg(value);
        }
        Ok(())
    }

    /// Write records through the fencing script, then drop the `queued` records that
    /// terminal ones supersede.
    pub(crate) async fn set_fenced(&self, statuses: Vec<TaskStatus>) -> Result<()> {
        let inner = &self.inner;
        for chunk in statuses.chunks(SET_CHUNK) {
            self.set_fenced_call(chunk)?.run::<()>(&mut inner.cmd()).await.map_err(err)?;
            let mut drop = redis::pipe();
            self.push_drop_queued(&mut drop, chunk.iter().filter(|s| s.state.is_terminal()));
            if !drop.is_empty() {
                drop.query_async::<()>(&mut inner.cmd()).await.map_err(err)?;
            }
        }
        Ok(())
    }
}

/// Task ids (as text) grouped by the slot hash holding their `queued` record, for the ids
/// that have one.
fn by_queued_hash<'s>(
    keys: &Keys,
    statuses: impl IntoIterator<Item = &'s TaskStatus>,
) -> Vec<(String, Vec<String>)> {
    super::grouped(statuses, |s| Keys::slot(s.id))
        .into_iter()
        .map(|(slot, members)| {
            let mut buf = [0u8; 36];
            let ids =
                members.iter().map(|s| s.id.0.as_hyphenated().encode_lower(&mut buf).to_owned()).collect();
            (keys.queued_hash(slot), ids)
        })
        .collect()
}

/// Which answers of the commands `push_create_queued` appended are `SET … NX`es, and of
/// which status: an answer `nil` there means the task already had a record.
#[derive(Debug, Default)]
pub(crate) struct QueuedWrites {
    /// Per command, in order: the index of the status it writes with `SET … NX`, or `None`
    /// for a slot hash's `HSET` or `PEXPIRE`.
    commands: Vec<Option<usize>>,
}

impl QueuedWrites {
    /// How many commands were appended (their answers come first in the pipeline's).
    pub(crate) fn commands(&self) -> usize {
        self.commands.len()
    }

    /// The statuses whose `SET … NX` found an existing record.
    fn missed(&self, statuses: &[TaskStatus], answers: &[Value]) -> Vec<TaskStatus> {
        self.commands
            .iter()
            .zip(answers)
            .filter_map(|(at, answer)| match (at, answer) {
                (Some(i), Value::Nil) => statuses.get(*i).cloned(),
                _ => None,
            })
            .collect()
    }
}

/// Append one record's four script arguments (see `scripts/status_lib.lua`).
pub(crate) fn push_status_args(e: &mut Eval, keys: &Keys, s: &TaskStatus) -> Result<()> {
    let value = stored_value(s)?;
    // Same text as the id's Display, without an allocation.
    let mut id_buf = [0u8; 36];
    e.arg(&*s.id.0.as_hyphenated().encode_lower(&mut id_buf))
        .arg(u8::from(s.progress.is_some()))
        .arg(value)
        .arg(keys.record_slot(s.id).unwrap_or_default());
    Ok(())
}

/// A record as stored: `"<attempt>:<terminal>:0|<json>"` (the fencing script reads the
/// prefix without decoding the JSON).
fn stored_value(s: &TaskStatus) -> Result<Vec<u8>> {
    let mut value = Vec::with_capacity(512);
    value.extend_from_slice(itoa::Buffer::new().format(s.attempt).as_bytes());
    value.extend_from_slice(if s.state.is_terminal() { b":1:0|" } else { b":0:0|" });
    s.write_json(&mut value)?;
    Ok(value)
}

/// `"<attempt>:<terminal>:<progress>|<json>"` → the JSON part.
fn record_json(stored: &[u8]) -> &[u8] {
    match stored.iter().position(|b| *b == b'|') {
        Some(i) => &stored[i + 1..],
        None => stored,
    }
}

fn decode_status(json: &[u8], progress: Option<&[u8]>) -> Result<TaskStatus> {
    let mut status: TaskStatus = serde_json::from_slice(json)?;
    if let Some(p) = progress {
        let p: Progress = serde_json::from_slice(p)?;
        if p.at > status.updated_at {
            status.updated_at = p.at;
        }
        status.progress = Some(p);
    }
    Ok(status)
}

impl Inner {
    pub(super) fn cmd(&self) -> ConnectionManager {
        self.conn.commands()
    }

    pub(super) fn eval(&self, script: &'static std::sync::LazyLock<redis::Script>) -> Eval {
        let mut e = Eval::new(script);
        e.arg(self.keys.namespace());
        e
    }

    /// Write `queued` records (pipelined); returns the ones that found a record of their
    /// own, which need the fencing rules.
    async fn create_queued(&self, statuses: Vec<TaskStatus>) -> Result<Vec<TaskStatus>> {
        let mut left = Vec::new();
        for chunk in statuses.chunks(SET_CHUNK) {
            let mut pipe = redis::pipe();
            let writes = self.push_create_queued(&mut pipe, chunk)?;
            let answers: Vec<Value> = pipe.query_async(&mut self.cmd()).await.map_err(err)?;
            left.extend(writes.missed(chunk, &answers));
        }
        Ok(left)
    }

    /// Append the commands writing `queued` records to `pipe`: for time-ordered ids one
    /// `HSET` per slot hash (plus its `PEXPIRE`), since a task's first record is far the most
    /// frequent write and a hash field costs Redis a fraction of a key with its own expiry;
    /// for other ids `SET record value PX ttl NX`. A slot hash's field never hides anything:
    /// reads take a task's own record key first.
    fn push_create_queued(
        &self,
        pipe: &mut redis::Pipeline,
        statuses: &[TaskStatus],
    ) -> Result<QueuedWrites> {
        let ttl = millis(self.ttl);
        let mut writes = QueuedWrites::default();
        for (i, s) in statuses.iter().enumerate().filter(|(_, s)| Keys::slot(s.id).is_none()) {
            pipe.cmd("SET").arg(self.keys.record(s.id)).arg(stored_value(s)?).arg("PX").arg(ttl).arg("NX");
            writes.commands.push(Some(i));
        }
        let mut id_buf = [0u8; 36];
        for (slot, members) in super::grouped(statuses, |s| Keys::slot(s.id)) {
            let hash = self.keys.queued_hash(slot);
            pipe.cmd("HSET").arg(&hash);
            for s in members {
                pipe.arg(&*s.id.0.as_hyphenated().encode_lower(&mut id_buf)).arg(stored_value(s)?);
            }
            pipe.cmd("PEXPIRE").arg(hash).arg(ttl);
            writes.commands.extend([None, None]);
        }
        Ok(writes)
    }

    async fn get(&self, id: TaskId) -> Result<Option<TaskStatus>> {
        let progress = self.keys.progress(id);
        type Stored = Option<Vec<u8>>;
        let (record, progress, queued): (Stored, Stored, Stored) =
            match (self.keys.record_slot(id), self.keys.queued(id)) {
                (Some(records), Some(queued)) => {
                    let field = id.to_string();
                    redis::pipe()
                        .cmd("HGET")
                        .arg(records)
                        .arg(&field)
                        .cmd("GET")
                        .arg(progress)
                        .cmd("HGET")
                        .arg(queued)
                        .arg(&field)
                        .query_async(&mut self.cmd())
                        .await
                        .map_err(err)?
                }
                _ => {
                    let (r, p) = redis::cmd("MGET")
                        .arg(self.keys.record(id))
                        .arg(progress)
                        .query_async(&mut self.cmd())
                        .await
                        .map_err(err)?;
                    (r, p, None)
                }
            };
        record.or(queued).map(|r| decode_status(record_json(&r), progress.as_deref())).transpose()
    }

    async fn pubsub(self: &Arc<Self>) -> Result<ConnectionManager> {
        let conn = self
            .pubsub
            .get_or_try_init(|| async {
                let (tx, rx) = mpsc::unbounded_channel();
                let conn = self.conn.pubsub(tx).await.map_err(err)?;
                tokio::spawn(pushes(Arc::downgrade(self), rx));
                Ok::<_, Error>(conn)
            })
            .await?;
        Ok(conn.clone())
    }

    /// Make the subscription to `id`'s channel match whether anybody here waits for it.
    async fn sync_subscription(self: &Arc<Self>, id: TaskId) -> Result<()> {
        let mut conn = self.pubsub().await?;
        let mut subscribed = self.subscribed.lock().await;
        let wanted = self.waiters.lock().contains_key(&id);
        match (wanted, subscribed.contains(&id)) {
            (true, false) => {
                // Marked before the command goes out: a waiter that gives up mid-subscribe
                // (its completion arrived first) leaves an entry `unsubscribe_later` clears,
                // never a channel subscribed behind our back.
                subscribed.insert(id);
                if let Err(e) = conn.subscribe(self.keys.done(id)).await {
                    subscribed.remove(&id);
                    return Err(err(e));
                }
            }
            (false, true) => {
                subscribed.remove(&id);
                conn.unsubscribe(self.keys.done(id)).await.map_err(err)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn remove_waiter(&self, id: TaskId, token: u64) {
        let mut waiters = self.waiters.lock();
        if let Some(list) = waiters.get_mut(&id) {
            list.retain(|(t, _)| *t != token);
            if list.is_empty() {
                waiters.remove(&id);
            }
        }
    }

    fn wake(&self, id: TaskId, status: &TaskStatus) -> bool {
        let Some(list) = self.waiters.lock().remove(&id) else {
            return false;
        };
        for (_, tx) in list {
            let _ = tx.send(status.clone());
        }
        true
    }

    /// Drop the subscription for `id` in the background once nobody waits for it. Batched:
    /// one UNSUBSCRIBE for many channels, never on a waiter's path.
    fn unsubscribe_later(self: &Arc<Self>, id: TaskId) {
        self.unsubscribe_queue.lock().push(id);
        if self.unsubscribing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(UNSUBSCRIBE_BATCH_DELAY).await;
                let ids = std::mem::take(&mut *this.unsubscribe_queue.lock());
                if let Err(e) = this.unsubscribe_idle(ids).await {
                    tracing::debug!(error = %e, "unsubscribe failed");
                }
                this.unsubscribing.store(false, Ordering::Release);
                if this.unsubscribe_queue.lock().is_empty() || this.unsubscribing.swap(true, Ordering::AcqRel)
                {
                    return;
                }
            }
        });
    }

    async fn unsubscribe_idle(&self, ids: Vec<TaskId>) -> Result<()> {
        let Some(mut conn) = self.pubsub.get().cloned() else {
            return Ok(());
        };
        let mut subscribed = self.subscribed.lock().await;
        let idle: Vec<TaskId> = {
            let waiters = self.waiters.lock();
            ids.into_iter().filter(|id| !waiters.contains_key(id) && subscribed.contains(id)).collect()
        };
        if idle.is_empty() {
            return Ok(());
        }
        for id in &idle {
            subscribed.remove(id);
        }
        let channels: Vec<String> = idle.iter().map(|id| self.keys.done(*id)).collect();
        conn.unsubscribe(channels).await.map_err(err)
    }

    async fn wait(self: &Arc<Self>, id: TaskId, timeout: Duration) -> Result<Option<TaskStatus>> {
        let (tx, mut rx) = oneshot::channel();
        let token = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        self.waiters.lock().entry(id).or_default().push((token, tx));
        let deadline = tokio::time::Instant::now() + timeout;
        let ready = async {
            self.sync_subscription(id).await?;
            // Read after subscribing: a completion between the two is seen either way.
            self.get(id).await
        };
        // The completion may be published while the read is still on its way (the worker
        // is often quicker than the two round trips): take whichever answers first.
        let first = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                biased;
                pushed = &mut rx => First::Pushed(pushed),
                read = ready => First::Read(read),
            }
        });
        let current = match first.await {
            Ok(First::Pushed(Ok(status))) => {
                self.unsubscribe_later(id);
                return Ok(Some(status));
            }
            Ok(First::Read(Ok(current))) => current,
            Ok(First::Read(Err(e))) => {
                self.remove_waiter(id, token);
                self.unsubscribe_later(id);
                return Err(e);
            }
            // Dropped senders cannot happen while the waiter is listed; read the record anyway.
            Ok(First::Pushed(Err(_))) | Err(_) => {
                self.remove_waiter(id, token);
                self.unsubscribe_later(id);
                return self.get(id).await;
            }
        };
        if current.as_ref().is_some_and(|s| s.state.is_terminal()) {
            self.remove_waiter(id, token);
            self.unsubscribe_later(id);
            return Ok(current);
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(status)) => {
                self.unsubscribe_later(id);
                Ok(Some(status))
            }
            _ => {
                self.remove_waiter(id, token);
                self.unsubscribe_later(id);
                self.get(id).await
            }
        }
    }

    /// After a reconnect, completions published while the link was down are lost: re-read
    /// every awaited record once the connection (and its resubscriptions) is back.
    async fn recheck_after_reconnect(self: Arc<Self>) {
        let mut pause = Duration::from_millis(50);
        loop {
            let Some(mut conn) = self.pubsub.get().cloned() else {
                return;
            };
            if redis::cmd("PING").query_async::<()>(&mut conn).await.is_ok() {
                break;
            }
            if self.waiters.lock().is_empty() {
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
        let ids: Vec<TaskId> = self.waiters.lock().keys().copied().collect();
        for id in ids {
            match self.get(id).await {
                Ok(Some(s)) if s.state.is_terminal() => {
                    if self.wake(id, &s) {
                        self.unsubscribe_later(id);
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, task = %id, "re-reading a waited-for record failed"),
            }
        }
    }
}

/// Route pub/sub pushes to waiters; ends when the backend is dropped.
async fn pushes(inner: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<PushInfo>) {
    while let Some(push) = rx.recv().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match push.kind {
            PushKind::Message => on_message(&inner, &push.data),
            PushKind::Disconnection => {
                tracing::debug!("result backend pub/sub connection lost; reconnecting");
                tokio::spawn(Arc::clone(&inner).recheck_after_reconnect());
            }
            _ => {}
        }
    }
}

fn on_message(inner: &Arc<Inner>, data: &[Value]) {
    let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) = (data.first(), data.get(1))
    else {
        return;
    };
    let prefix = inner.keys.done_prefix();
    let Some(id) = channel
        .strip_prefix(prefix.as_bytes())
        .and_then(|id| std::str::from_utf8(id).ok())
        .and_then(|id| id.parse::<TaskId>().ok())
    else {
        return;
    };
    let (value, progress) = match payload.iter().position(|b| *b == b'\n') {
        Some(i) => (&payload[..i], Some(&payload[i + 1..])),
        None => (&payload[..], None),
    };
    let json = record_json(value);
    match decode_status(json, progress) {
        Ok(status) => {
            if inner.wake(id, &status) {
                inner.unsubscribe_later(id);
            }
        }
        Err(e) => tracing::warn!(error = %e, task = %id, "undecodable completion message"),
    }
}

impl ResultBackend for RedisBackend {
    fn set(&self, statuses: Vec<TaskStatus>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            // A producer's `queued` records are first writes: plain commands in one pipeline
            // (slot hashes, or `SET NX`), and only those that met an existing record go
            // through the fencing script.
            let statuses = if statuses.iter().all(|s| s.state == TaskState::Queued) {
                self.inner.create_queued(statuses).await?
            } else {
                statuses
            };
            self.set_fenced(statuses).await
        })
    }

    fn get(&self, id: TaskId) -> BoxFuture<'_, Result<Option<TaskStatus>>> {
        Box::pin(self.inner.get(id))
    }

    fn wait(&self, id: TaskId, timeout: Duration) -> BoxFuture<'_, Result<Option<TaskStatus>>> {
        Box::pin(self.inner.wait(id, timeout))
    }

    fn progress(&self, id: TaskId, progress: Progress) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut e = inner.eval(&scripts::PROGRESS);
            e.arg(millis(inner.ttl))
                .arg(id.to_string())
                .arg(serde_json::to_vec(&progress)?)
                .arg(inner.keys.queued(id).unwrap_or_default())
                .arg(inner.keys.record_slot(id).unwrap_or_default());
            e.run::<()>(&mut inner.cmd()).await.map_err(err)
        })
    }

    fn forget(&self, id: TaskId) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut pipe = redis::pipe();
            pipe.cmd("DEL").arg(inner.keys.record(id)).arg(inner.keys.progress(id));
            for hash in [inner.keys.record_slot(id), inner.keys.queued(id)].into_iter().flatten() {
                pipe.cmd("HDEL").arg(hash).arg(id.to_string());
            }
            pipe.query_async::<()>(&mut inner.cmd()).await.map_err(err)
        })
    }

    fn group_init(&self, group: TaskId, total: usize) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut e = inner.eval(&scripts::GROUP_INIT);
            e.arg(millis(inner.ttl)).arg(group.to_string()).arg(total);
            e.run::<()>(&mut inner.cmd()).await.map_err(err)
        })
    }

    fn group_record(
        &self,
        group: TaskId,
        index: usize,
        outcome: MemberOutcome,
    ) -> BoxFuture<'_, Result<GroupCounts>> {
        Box::pin(async move { groups::record(&self.inner, group, index, &outcome).await })
    }

    /// Successes of groups whose total this backend has seen go out as plain commands in one
    /// `MULTI`; the rest as one `group_record_many` script call per 1,000 records. Atomic like
    /// `group_record` and idempotent per index either way (see `groups.rs`).
    fn group_record_many(
        &self,
        records: Vec<MemberRecord>,
    ) -> BoxFuture<'_, Result<Vec<Result<GroupCounts>>>> {
        Box::pin(async move { groups::record_many(&self.inner, records).await })
    }

    fn group_get(&self, group: TaskId) -> BoxFuture<'_, Result<Option<GroupState>>> {
        Box::pin(async move { groups::get(&self.inner, group).await })
    }

    fn chord_claim(&self, group: TaskId) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut e = inner.eval(&scripts::CHORD_CLAIM);
            e.arg(group.to_string());
            let won: i64 = e.run(&mut inner.cmd()).await.map_err(err)?;
            Ok(won == 1)
        })
    }

    fn heartbeat(&self, heartbeat: WorkerHeartbeat, ttl: Duration) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut e = inner.eval(&scripts::HEARTBEAT);
            e.arg(&heartbeat.worker_id).arg(serde_json::to_vec(&heartbeat)?).arg(millis(ttl));
            e.run::<()>(&mut inner.cmd()).await.map_err(err)
        })
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn workers(&self) -> BoxFuture<'_, Result<Vec<WorkerHeartbeat>>> {
        Box::pin(async move {
            let inner = &self.inner;
            let found: Vec<Option<Vec<u8>>> =
                inner.eval(&scripts::WORKERS).run(&mut inner.cmd()).await.map_err(err)?;
            let mut out = found
                .into_iter()
                .flatten()
                .map(|j| serde_json::from_slice::<WorkerHeartbeat>(&j))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            out.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
            Ok(out)
        })
    }
}
