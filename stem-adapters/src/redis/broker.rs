//! The Redis broker: one stream per queue and priority with one consumer group, leases in a
//! sorted set, delays in a sorted set, a hash-backed DLQ, and a stream per broadcast channel.

use std::sync::Arc;
use std::time::Duration;

use std::collections::HashSet;

use chrono::Utc;
use parking_lot::Mutex;
use redis::Value;
use redis::aio::ConnectionManager;
use stem::backend::{ResultBackend, TaskState, TaskStatus};
use stem::broker::{
    BoxFuture, Broker, ConsumeRequest, DeadLetter, Delivery, QueueCounts, REASON_MALFORMED, Receipt,
    set_then_ack, set_then_publish,
};
use stem::envelope::MAX_PRIORITY;
use stem::{Envelope, Error, Result};
use tokio::time::Instant;

use super::backend::{RedisBackend, push_status_args};
use super::keys::Keys;
use super::scripts::{self, Eval};
use super::{Blocking, RedisConnection};

/// Most envelopes stored by one script call.
const PUBLISH_CHUNK: usize = 2_000;
/// Most receipts finished by one script call.
const ACK_CHUNK: usize = 2_000;
/// Most records (and receipts) the combined record-and-ack script takes in one call.
const FINISH_CHUNK: usize = 2_000;
/// Broadcast streams keep about this many messages for slow subscribers.
const BROADCAST_MAXLEN: usize = 10_000;
/// Extra time granted to a blocking read before the client gives up on it.
const BLOCK_SLACK: Duration = Duration::from_secs(5);

/// A broker on Redis streams. Cheap to clone; clones share connections.
#[derive(Clone, Debug)]
pub struct RedisBroker {
    conn: RedisConnection,
    keys: Keys,
    /// Streams known to have their consumer group, so publishing skips creating it.
    grouped: Arc<Mutex<HashSet<String>>>,
}

fn err(e: impl Into<stem::error::BoxError>) -> Error {
    Error::broker(e)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Arguments that store one envelope: queue, priority, due ms (0 = now), lease ms or ''.
fn push_store_args(eval: &mut Eval, env: &Envelope) -> Result<()> {
    let json = env.to_json()?;
    let due = env.not_before.map_or(0, |t| t.timestamp_millis().max(0));
    let vis = env.visibility_timeout.map(|v| millis(v).to_string()).unwrap_or_default();
    eval.arg(&env.queue).arg(env.priority.min(MAX_PRIORITY)).arg(due).arg(vis).arg(json);
    Ok(())
}

/// Append receipts grouped by queue, as `scripts/ack_lib.lua` takes them: per queue its name,
/// the number of receipts, then `(tag, token)` for each.
fn push_receipts(eval: &mut Eval, receipts: &[Receipt]) {
    let mut done = vec![false; receipts.len()];
    for (i, r) in receipts.iter().enumerate() {
        if done[i] {
            continue;
        }
        let same: Vec<usize> =
            (i..receipts.len()).filter(|&j| !done[j] && receipts[j].queue == r.queue).collect();
        eval.arg(&*r.queue).arg(same.len());
        for j in same {
            done[j] = true;
            eval.arg(&receipts[j].tag).arg(receipts[j].lease);
        }
    }
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => bytes(other).and_then(|b| std::str::from_utf8(b).ok()?.parse().ok()),
    }
}

fn string(v: &Value) -> Option<String> {
    bytes(v).map(|b| String::from_utf8_lossy(b).into_owned())
}

fn unexpected(what: &str, v: &Value) -> Error {
    err(format!("unexpected answer from Redis to {what}: {v:?}"))
}

/// One delivery as the consume script reports it.
struct Raw {
    queue: usize,
    tag: String,
    token: u64,
    has_envelope: bool,
    payload: Vec<u8>,
}

enum Consumed {
    Deliveries(Vec<Raw>),
    /// Nothing ready: when something may become due, and the stream positions to block on.
    Idle {
        next_due: Option<Duration>,
        last_ids: Vec<String>,
    },
}

/// The envelope of a stream entry whose first field is not `e` (its field `e` if it has one
/// elsewhere), or, for an entry without one, all of its fields as text (the dead letter's `raw`).
fn entry_payload(fields: Vec<Value>) -> (bool, Vec<u8>) {
    let mut text = Vec::new();
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if bytes(&k) == Some(b"e") {
            if let Value::BulkString(b) = v {
                return (true, b);
            }
            return (true, bytes(&v).map(<[u8]>::to_vec).unwrap_or_default());
        }
        for part in [&k, &v] {
            if !text.is_empty() {
                text.push(b' ');
            }
            text.extend_from_slice(bytes(part).unwrap_or_default());
        }
    }
    (false, text)
}

fn parse_consume(v: Value) -> Result<Consumed> {
    let Value::Array(items) = v else {
        return Err(unexpected("consume", &v));
    };
    let n = items.first().and_then(int).ok_or_else(|| err("consume: missing count"))?;
    if n == 0 {
        let next_due =
            items.get(1).and_then(int).and_then(|ms| u64::try_from(ms).ok()).map(Duration::from_millis);
        let last_ids = items.iter().skip(2).filter_map(string).collect();
        return Ok(Consumed::Idle { next_due, last_ids });
    }
    let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    let mut it = items.into_iter().skip(1);
    while let (Some(q), Some(p), Some(id), Some(token), Some(fields)) =
        (it.next(), it.next(), it.next(), it.next(), it.next())
    {
        let (Some(q), Some(p), Some(id), Some(token)) = (int(&q), bytes(&p), bytes(&id), int(&token)) else {
            return Err(err("consume: malformed delivery in script answer"));
        };
        let mut tag = String::with_capacity(p.len() + 1 + id.len());
        tag.push_str(&String::from_utf8_lossy(p));
        tag.push(':');
        tag.push_str(&String::from_utf8_lossy(id));
        let (has_envelope, payload) = match fields {
            Value::BulkString(envelope) => (true, envelope),
            Value::Array(fields) => entry_payload(fields),
            other => return Err(unexpected("consume (entry payload)", &other)),
        };
        out.push(Raw {
            queue: usize::try_from(q - 1).unwrap_or(0),
            tag,
            token: u64::try_from(token).unwrap_or(0),
            has_envelope,
            payload,
        });
    }
    Ok(Consumed::Deliveries(out))
}

impl RedisBroker {
    /// A broker in `namespace` on `conn`.
    pub fn new(conn: RedisConnection, namespace: &str) -> Self {
        RedisBroker { conn, keys: Keys::new(namespace), grouped: Arc::default() }
    }

    /// The key names this broker uses.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn cmd(&self) -> ConnectionManager {
        self.conn.commands()
    }

    /// Append the commands that store `envelopes` to `pipe` (their answers are ignored).
    ///
    /// Plain commands, no script: appending to a stream needs no check. A connection lost
    /// mid-pipeline may leave part of a batch stored; the caller's retry then publishes some
    /// envelopes twice, which at-least-once delivery allows.
    async fn push_publish(&self, pipe: &mut redis::Pipeline, envelopes: &[Envelope]) -> Result<()> {
        let now = Utc::now().timestamp_millis();
        for env in envelopes {
            let json = env.to_json()?;
            let priority = env.priority.min(MAX_PRIORITY);
            let due = env.not_before.map_or(0, |t| t.timestamp_millis().max(0));
            let vis = env.visibility_timeout.map(millis);
            if due > now {
                // Same member format as `store` in scripts/common.lua.
                let mut member =
                    format!("{priority}|{}|", vis.map(|v| v.to_string()).unwrap_or_default()).into_bytes();
                member.extend_from_slice(&json);
                pipe.cmd("ZADD").arg(self.keys.delayed(&env.queue)).arg(due).arg(member).ignore();
            } else {
                let stream = self.keys.stream(&env.queue, priority);
                self.ensure_group(&stream).await?;
                let xadd = pipe.cmd("XADD").arg(stream).arg("*").arg("e").arg(json);
                if let Some(v) = vis {
                    xadd.arg("v").arg(v);
                }
                xadd.ignore();
            }
        }
        Ok(())
    }

    /// `backend` as a [`RedisBackend`] on this broker's connection and namespace, whose writes
    /// may share this broker's scripts and pipelines.
    fn same_store<'b>(&self, backend: &'b dyn ResultBackend) -> Option<&'b RedisBackend> {
        let redis = backend.as_any()?.downcast_ref::<RedisBackend>()?;
        redis.colocated_with(&self.conn, &self.keys).then_some(redis)
    }

    /// Create `stream` and its consumer group unless this broker already did (or saw them).
    async fn ensure_group(&self, stream: &str) -> Result<()> {
        if self.grouped.lock().contains(stream) {
            return Ok(());
        }
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(super::keys::GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.cmd())
            .await;
        match created {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(err(e)),
        }
        self.grouped.lock().insert(stream.to_owned());
        Ok(())
    }

    fn eval(&self, script: &'static std::sync::LazyLock<redis::Script>) -> Eval {
        let mut e = Eval::new(script);
        e.arg(self.keys.namespace());
        e
    }

    async fn receipt_call(
        &self,
        script: &'static std::sync::LazyLock<redis::Script>,
        receipt: &Receipt,
        extra: impl FnOnce(&mut Eval) -> Result<()>,
    ) -> Result<i64> {
        let mut e = self.eval(script);
        e.arg(&*receipt.queue).arg(&receipt.tag).arg(receipt.lease);
        extra(&mut e)?;
        e.run(&mut self.cmd()).await.map_err(err)
    }

    /// One pass of the consume script; turns undecodable entries into dead letters.
    async fn consume_once(&self, req: &ConsumeRequest) -> Result<(Vec<Delivery>, Consumed)> {
        let mut e = self.eval(&scripts::CONSUME);
        e.arg(&req.consumer).arg(req.max).arg(millis(req.lease)).arg(req.queues.len());
        for q in &req.queues {
            e.arg(q);
        }
        let names: Arc<[Arc<str>]> = req.queues.iter().map(|q| Arc::from(q.as_str())).collect();
        let answer = self.run_detached(e, Arc::clone(&names)).await?;
        let raws = match parse_consume(answer)? {
            Consumed::Deliveries(raws) => raws,
            idle => return Ok((Vec::new(), idle)),
        };
        let mut out = Vec::with_capacity(raws.len());
        for raw in raws {
            let Some(queue) = names.get(raw.queue) else {
                continue;
            };
            let receipt = Receipt { queue: Arc::clone(queue), tag: raw.tag, lease: raw.token };
            let parsed = if raw.has_envelope {
                Envelope::from_json(&raw.payload).map_err(|e| e.to_string())
            } else {
                Err("stream entry has no `e` field".to_owned())
            };
            match parsed {
                Ok(envelope) => {
                    out.push(Delivery { envelope: Arc::new(envelope), receipt, redelivered: raw.token > 1 })
                }
                Err(why) => self.dead_letter_malformed(receipt, &raw.payload, why).await?,
            }
        }
        Ok((out, Consumed::Deliveries(Vec::new())))
    }

    /// Run the consume script on a task of its own. A consumer that stops waiting (a worker
    /// shutting down drops its fetch) may do so after the script leased entries on the
    /// server: they would stay leased to nobody until their lease lapsed. Here the call always
    /// completes, and deliveries nobody takes any more are given back at once.
    async fn run_detached(&self, e: Eval, queues: Arc<[Arc<str>]>) -> Result<Value> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        tokio::spawn(async move {
            let answer = e.run::<Value>(&mut this.cmd()).await.map_err(err);
            if let Err(Ok(unwanted)) = tx.send(answer) {
                this.release_unwanted(unwanted, &queues).await;
            }
        });
        rx.await.map_err(|_| err("the consume call stopped before answering"))?
    }

    /// Give back every delivery in a consume answer nobody waited for (lease score 0: the
    /// next consume redelivers them first).
    async fn release_unwanted(&self, answer: Value, queues: &[Arc<str>]) {
        let Ok(Consumed::Deliveries(raws)) = parse_consume(answer) else { return };
        let n = raws.len();
        for raw in raws {
            let Some(queue) = queues.get(raw.queue) else { continue };
            let receipt = Receipt { queue: Arc::clone(queue), tag: raw.tag, lease: raw.token };
            if let Err(e) = self.nack(receipt, true).await {
                tracing::warn!(error = %e, "giving back a delivery of an abandoned fetch failed; it comes back when its lease lapses");
            }
        }
        tracing::debug!(n, "gave back the deliveries of an abandoned fetch");
    }

    async fn dead_letter_malformed(&self, receipt: Receipt, payload: &[u8], why: String) -> Result<()> {
        tracing::warn!(queue = %receipt.queue, tag = %receipt.tag, reason = %why, "undecodable envelope; dead-lettered");
        let record = DeadLetter {
            id: String::new(),
            queue: receipt.queue.to_string(),
            reason: REASON_MALFORMED.to_owned(),
            detail: why,
            envelope: None,
            raw: Some(String::from_utf8_lossy(payload).into_owned()),
            dead_at: Utc::now(),
        };
        let json = serde_json::to_vec(&record)?;
        self.receipt_call(&scripts::DEAD, &receipt, |e| {
            e.arg(json);
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Block on the queues' streams until an entry newer than `last_ids` arrives or `block`
    /// passes.
    async fn block_for_new(&self, req: &ConsumeRequest, last_ids: &[String], block: Duration) -> Result<()> {
        let mut keys = Vec::with_capacity(usize::from(MAX_PRIORITY + 1) * req.queues.len());
        for p in (0..=MAX_PRIORITY).rev() {
            for q in &req.queues {
                keys.push(self.keys.stream(q, p));
            }
        }
        if keys.len() != last_ids.len() {
            // Should not happen; fall back to a plain sleep rather than a busy loop.
            tokio::time::sleep(block).await;
            return Ok(());
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(millis(block).max(1))
            .arg("STREAMS")
            .arg(&keys)
            .arg(last_ids);
        self.run_blocking(&cmd, block).await.map(|_: Value| ())
    }

    async fn run_blocking<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd, block: Duration) -> Result<T> {
        let mut b: Blocking = self.conn.blocking().await.map_err(err)?;
        match tokio::time::timeout(block + BLOCK_SLACK, cmd.query_async(&mut b.conn)).await {
            Ok(Ok(v)) => {
                b.release();
                Ok(v)
            }
            Ok(Err(e)) => Err(err(e)),
            Err(_) => Err(err(format!("blocking read got no answer within {:?}", block + BLOCK_SLACK))),
        }
    }
}

impl Broker for RedisBroker {
    fn publish(&self, envelopes: Vec<Envelope>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            for chunk in envelopes.chunks(PUBLISH_CHUNK) {
                let mut pipe = redis::pipe();
                self.push_publish(&mut pipe, chunk).await?;
                pipe.query_async::<()>(&mut self.cmd()).await.map_err(err)?;
            }
            Ok(())
        })
    }

    fn record_and_publish<'a>(
        &'a self,
        backend: &'a dyn ResultBackend,
        statuses: Vec<TaskStatus>,
        envelopes: Vec<Envelope>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let colocated = self.same_store(backend);
            let small = statuses.len() <= PUBLISH_CHUNK && envelopes.len() <= PUBLISH_CHUNK;
            match colocated {
                // One pipeline, records first: `SET … NX` for each queued record, then the
                // envelopes. A record that met an existing one (an id enqueued again) goes
                // through the fencing script afterwards, which never lets it replace an
                // outcome.
                Some(b) if small && statuses.iter().all(|s| s.state == TaskState::Queued) => {
                    let mut pipe = redis::pipe();
                    b.push_create_queued(&mut pipe, &statuses)?;
                    self.push_publish(&mut pipe, &envelopes).await?;
                    let answers: Vec<Value> = pipe.query_async(&mut self.cmd()).await.map_err(err)?;
                    b.finish_create_queued(&statuses, &answers[..statuses.len().min(answers.len())]).await
                }
                _ => set_then_publish(self, backend, statuses, envelopes).await,
            }
        })
    }

    fn consume<'a>(&'a self, req: &'a ConsumeRequest) -> BoxFuture<'a, Result<Vec<Delivery>>> {
        Box::pin(async move {
            if req.max == 0 || req.queues.is_empty() {
                return Ok(Vec::new());
            }
            let give_up = Instant::now() + req.wait;
            loop {
                let (out, state) = self.consume_once(req).await?;
                if !out.is_empty() {
                    return Ok(out);
                }
                let Consumed::Idle { next_due, last_ids } = state else {
                    // Everything fetched was undecodable and dead-lettered: look again.
                    continue;
                };
                let left = give_up.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(Vec::new());
                }
                let block = next_due.map_or(left, |d| d.min(left)).max(Duration::from_millis(1));
                self.block_for_new(req, &last_ids, block).await?;
            }
        })
    }

    fn ack(&self, receipts: Vec<Receipt>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            for chunk in receipts.chunks(ACK_CHUNK) {
                let mut e = self.eval(&scripts::ACK);
                push_receipts(&mut e, chunk);
                e.run::<()>(&mut self.cmd()).await.map_err(err)?;
            }
            Ok(())
        })
    }

    fn record_and_ack<'a>(
        &'a self,
        backend: &'a dyn ResultBackend,
        statuses: Vec<TaskStatus>,
        receipts: Vec<Receipt>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let colocated = self.same_store(backend);
            match colocated {
                // One script: the records, then the acks, atomically and in one round trip.
                Some(b) if statuses.len() <= FINISH_CHUNK && receipts.len() <= FINISH_CHUNK => {
                    let mut e = self.eval(&scripts::FINISH);
                    e.arg(millis(b.ttl()).max(1)).arg(statuses.len());
                    for s in &statuses {
                        push_status_args(&mut e, s)?;
                    }
                    push_receipts(&mut e, &receipts);
                    e.run::<()>(&mut self.cmd()).await.map_err(err)
                }
                _ => set_then_ack(self, backend, statuses, receipts).await,
            }
        })
    }

    fn nack(&self, receipt: Receipt, requeue: bool) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let n = self
                .receipt_call(&scripts::NACK, &receipt, |e| {
                    e.arg(u8::from(requeue));
                    Ok(())
                })
                .await?;
            Ok(n == 1)
        })
    }

    fn retry(&self, receipt: Receipt, envelope: Envelope) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let n = self.receipt_call(&scripts::RETRY, &receipt, |e| push_store_args(e, &envelope)).await?;
            Ok(n == 1)
        })
    }

    fn extend_lease<'a>(&'a self, receipt: &'a Receipt, lease: Duration) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let n = self
                .receipt_call(&scripts::EXTEND, receipt, |e| {
                    e.arg(millis(lease));
                    Ok(())
                })
                .await?;
            Ok(n == 1)
        })
    }

    fn dead_letter(
        &self,
        receipt: Receipt,
        envelope: Envelope,
        reason: &str,
        detail: String,
    ) -> BoxFuture<'_, Result<bool>> {
        let record = DeadLetter {
            id: String::new(),
            queue: receipt.queue.to_string(),
            reason: reason.to_owned(),
            detail,
            envelope: Some(envelope),
            raw: None,
            dead_at: Utc::now(),
        };
        Box::pin(async move {
            let json = serde_json::to_vec(&record)?;
            let id = self
                .receipt_call(&scripts::DEAD, &receipt, |e| {
                    e.arg(json);
                    Ok(())
                })
                .await?;
            Ok(id > 0)
        })
    }

    fn dlq_list<'a>(
        &'a self,
        queue: &'a str,
        offset: usize,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>>> {
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let mut conn = self.cmd();
            let end = offset.saturating_add(limit - 1);
            let ids: Vec<String> = redis::cmd("ZRANGE")
                .arg(self.keys.dlq_index(queue))
                .arg(offset)
                .arg(end)
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let records: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
                .arg(self.keys.dlq(queue))
                .arg(&ids)
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            ids.into_iter().zip(records).filter_map(|(id, json)| json.map(|j| decode_dead(&id, &j))).collect()
        })
    }

    fn dlq_get<'a>(&'a self, queue: &'a str, id: &'a str) -> BoxFuture<'a, Result<Option<DeadLetter>>> {
        Box::pin(async move {
            let json: Option<Vec<u8>> = redis::cmd("HGET")
                .arg(self.keys.dlq(queue))
                .arg(id)
                .query_async(&mut self.cmd())
                .await
                .map_err(err)?;
            json.map(|j| decode_dead(id, &j)).transpose()
        })
    }

    fn dlq_replay<'a>(
        &'a self,
        queue: &'a str,
        ids: &'a [String],
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            let mut conn = self.cmd();
            let entries: Vec<(String, Vec<u8>)> = if ids.is_empty() {
                redis::cmd("HGETALL").arg(self.keys.dlq(queue)).query_async(&mut conn).await.map_err(err)?
            } else {
                let found: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
                    .arg(self.keys.dlq(queue))
                    .arg(ids)
                    .query_async(&mut conn)
                    .await
                    .map_err(err)?;
                ids.iter().cloned().zip(found).filter_map(|(id, j)| j.map(|j| (id, j))).collect()
            };
            let not_before = delay.and_then(|d| chrono::Duration::from_std(d).ok()).map(|d| Utc::now() + d);
            let mut e = self.eval(&scripts::REPLAY);
            e.arg(queue);
            let mut any = false;
            for (id, json) in entries {
                let Ok(dead) = decode_dead(&id, &json) else {
                    continue;
                };
                let Some(mut env) = dead.envelope else {
                    continue;
                };
                env.attempt = 0;
                env.not_before = not_before;
                e.arg(id);
                push_store_args(&mut e, &env)?;
                any = true;
            }
            if !any {
                return Ok(0);
            }
            let n: usize = e.run(&mut conn).await.map_err(err)?;
            Ok(n)
        })
    }

    fn dlq_purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            let (n,): (usize,) = redis::pipe()
                .atomic()
                .cmd("ZCARD")
                .arg(self.keys.dlq_index(queue))
                .cmd("DEL")
                .arg(self.keys.dlq(queue))
                .arg(self.keys.dlq_index(queue))
                .ignore()
                .query_async(&mut self.cmd())
                .await
                .map_err(err)?;
            Ok(n)
        })
    }

    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            let mut e = self.eval(&scripts::PURGE);
            e.arg(queue);
            e.run(&mut self.cmd()).await.map_err(err)
        })
    }

    fn counts<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueCounts>> {
        Box::pin(async move {
            let mut e = self.eval(&scripts::COUNTS);
            e.arg(queue);
            let (pending, delayed, in_flight, dead): (u64, u64, u64, u64) =
                e.run(&mut self.cmd()).await.map_err(err)?;
            Ok(QueueCounts { pending, delayed, in_flight, dead })
        })
    }

    fn subscribe<'a>(&'a self, channel: &'a str, subscriber: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.keys.broadcast(channel))
                .arg(subscriber)
                .arg("$")
                .arg("MKSTREAM")
                .query_async(&mut self.cmd())
                .await;
            match created {
                Err(e) if e.code() != Some("BUSYGROUP") => Err(err(e)),
                _ => Ok(()),
            }
        })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str, subscriber: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let destroyed: redis::RedisResult<i64> = redis::cmd("XGROUP")
                .arg("DESTROY")
                .arg(self.keys.broadcast(channel))
                .arg(subscriber)
                .query_async(&mut self.cmd())
                .await;
            match destroyed {
                // No stream means no subscription: nothing to remove.
                Err(e) if e.code() == Some("ERR") => Ok(()),
                Err(e) => Err(err(e)),
                Ok(_) => Ok(()),
            }
        })
    }

    fn broadcast<'a>(&'a self, channel: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut e = self.eval(&scripts::BROADCAST);
            e.arg(channel).arg(envelope.to_json()?).arg(BROADCAST_MAXLEN);
            e.run::<()>(&mut self.cmd()).await.map_err(err)
        })
    }

    fn consume_broadcast<'a>(
        &'a self,
        channel: &'a str,
        subscriber: &'a str,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'a, Result<Vec<Envelope>>> {
        Box::pin(async move {
            if max == 0 {
                return Ok(Vec::new());
            }
            let key = self.keys.broadcast(channel);
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP").arg(subscriber).arg(subscriber).arg("COUNT").arg(max);
            if !wait.is_zero() {
                cmd.arg("BLOCK").arg(millis(wait).max(1));
            }
            cmd.arg("STREAMS").arg(&key).arg(">");
            let answer: Value = match self.run_blocking(&cmd, wait).await {
                Ok(v) => v,
                Err(e) if e.to_string().contains("NOGROUP") => {
                    // Not subscribed: nothing will ever arrive; wait like an empty read would.
                    tokio::time::sleep(wait).await;
                    return Ok(Vec::new());
                }
                Err(e) => return Err(e),
            };
            let entries = broadcast_entries(answer);
            if entries.is_empty() {
                return Ok(Vec::new());
            }
            let ids: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
            redis::cmd("XACK")
                .arg(&key)
                .arg(subscriber)
                .arg(&ids)
                .query_async::<()>(&mut self.cmd())
                .await
                .map_err(err)?;
            let mut out = Vec::with_capacity(entries.len());
            for (id, payload) in entries {
                match payload.as_deref().map(Envelope::from_json) {
                    Some(Ok(env)) => out.push(env),
                    Some(Err(e)) => {
                        tracing::warn!(channel, id, error = %e, "undecodable broadcast message skipped")
                    }
                    None => tracing::warn!(channel, id, "broadcast entry without envelope skipped"),
                }
            }
            Ok(out)
        })
    }
}

/// `(entry id, field e)` of an XREADGROUP answer on one stream.
fn broadcast_entries(v: Value) -> Vec<(String, Option<Vec<u8>>)> {
    let Value::Array(streams) = v else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for stream in streams {
        let Value::Array(mut parts) = stream else { continue };
        let Some(Value::Array(entries)) = parts.pop() else { continue };
        for entry in entries {
            let Value::Array(mut pair) = entry else { continue };
            let fields = pair.pop();
            let Some(id) = pair.pop().as_ref().and_then(string) else { continue };
            let mut env = None;
            if let Some(Value::Array(fields)) = fields {
                let mut it = fields.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    if bytes(&k) == Some(b"e") {
                        env = bytes(&v).map(<[u8]>::to_vec);
                    }
                }
            }
            out.push((id, env));
        }
    }
    out
}

fn decode_dead(id: &str, json: &[u8]) -> Result<DeadLetter> {
    let mut dead: DeadLetter = serde_json::from_slice(json)?;
    dead.id = id.to_owned();
    Ok(dead)
}
