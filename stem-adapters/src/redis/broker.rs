//! The Redis broker: one stream per queue and priority with one consumer group (whose pending
//! entries are the leases), delays in a sorted set, a hash-backed DLQ, and a stream per
//! broadcast channel.

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

/// How often, at least, a consumer under a backlog runs the consume script (which promotes due
/// delayed envelopes and takes back expired leases) instead of the plain `XREADGROUP` fast
/// path.
const SCRIPT_EVERY: Duration = Duration::from_millis(250);

/// A finish skips the fencing script while every receipt's lease certainly holds for at least
/// this much longer (see `Receipt::held_until`). While a lease holds, nobody else can have
/// taken the delivery: its token is still the receipt's and no later attempt of the task
/// exists, which is all the script would check. The margin covers the time the plain
/// commands take to reach Redis; were they held up longer (a stalled connection), the worst
/// they could do is what the script allows anyway: this attempt's terminal record replaces
/// the same attempt's terminal record of a redelivery, and the ack removes a delivery whose
/// task has its outcome stored.
const FENCE_MARGIN: Duration = Duration::from_secs(5);

/// A broker on Redis streams. Cheap to clone; clones share connections.
#[derive(Clone, Debug)]
pub struct RedisBroker {
    conn: RedisConnection,
    keys: Keys,
    /// Streams known to have their consumer group, so publishing skips creating it.
    grouped: Arc<Mutex<HashSet<String>>>,
    /// What the last fetches saw, to choose between the script and the fast path.
    fast: Arc<Mutex<FastPath>>,
}

/// What decides whether a fetch may skip the consume script (see `RedisBroker::plan`).
#[derive(Debug)]
struct FastPath {
    /// The one queue and priority stream that held entries at the last script call.
    single: Option<(String, u8)>,
    /// The last fetch came back full.
    backlog: bool,
    /// When the script last ran, and when it last looked for expired leases.
    script_at: std::time::Instant,
    reclaim_at: std::time::Instant,
    /// The last fast fetch took what was left of the busy stream while the other priority
    /// streams were empty: the id of the stream's last entry, so the next fetch can block on
    /// the streams' ends at once instead of asking the script.
    drained: Option<String>,
    /// A blocking read just saw new entries in the busy stream and nowhere else.
    woken: bool,
}

/// How the next fetch goes (see `RedisBroker::plan`).
enum Plan {
    /// The consume script.
    Script,
    /// A plain `XREADGROUP` on this priority stream of the one queue.
    Native(u8),
    /// Nothing to fetch: block on these stream positions for at most this long.
    Block(Vec<String>, Duration),
}

impl Default for FastPath {
    fn default() -> Self {
        let now = std::time::Instant::now();
        FastPath {
            single: None,
            backlog: false,
            script_at: now,
            reclaim_at: now,
            drained: None,
            woken: false,
        }
    }
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

/// Append receipts grouped by stream, as `scripts/ack_lib.lua` takes them: per stream its
/// queue, priority, lowest and highest entry id and number of receipts, then `(entry id,
/// token)` for each. Receipts whose tag is not `<priority>:<entry id>` cannot be live and are
/// left out.
fn push_receipts(eval: &mut Eval, receipts: &[Receipt]) {
    for ((queue, p), list) in by_stream(receipts) {
        let lo = list.iter().min_by_key(|e| e.order).map_or("0-0", |e| e.id);
        let hi = list.iter().max_by_key(|e| e.order).map_or("0-0", |e| e.id);
        eval.arg(queue).arg(p).arg(lo).arg(hi).arg(list.len());
        for e in list {
            eval.arg(e.id).arg(e.token);
        }
    }
}

/// A receipt's stream entry.
struct Entry<'r> {
    id: &'r str,
    /// The id as `(ms, seq)`, for ordering.
    order: (u64, u64),
    token: u64,
}

/// Receipts grouped by stream `(queue, priority)`, in order of first appearance; receipts
/// whose tag is not `{priority}:{ms}-{seq}` are left out.
fn by_stream(receipts: &[Receipt]) -> Vec<((&str, u8), Vec<Entry<'_>>)> {
    let entries = receipts.iter().filter_map(|r| {
        let (p, id) = r.tag.split_once(':')?;
        let (ms, seq) = id.split_once('-')?;
        let order = (ms.parse().ok()?, seq.parse().ok()?);
        Some(((&*r.queue, p.parse::<u8>().ok()?), Entry { id, order, token: r.lease }))
    });
    super::grouped(entries, |(stream, _)| Some(*stream))
        .into_iter()
        .map(|(stream, list)| (stream, list.into_iter().map(|(_, e)| e).collect()))
        .collect()
}

/// Run `calls` (pipelines of one batch's chunks) in order, with up to two in flight: the next
/// chunk is encoded while the server stores the one before it, instead of each side waiting
/// for the other. Stops at the first error (chunks already sent may have been stored, which
/// at-least-once delivery allows).
async fn in_flight_pairs<F: std::future::Future<Output = Result<()>>>(
    calls: impl Iterator<Item = F>,
) -> Result<()> {
    let mut in_flight = futures_util::stream::FuturesOrdered::new();
    for call in calls {
        if in_flight.len() >= 2 {
            if let Some(done) = futures_util::StreamExt::next(&mut in_flight).await {
                done?;
            }
        }
        in_flight.push_back(call);
    }
    while let Some(done) = futures_util::StreamExt::next(&mut in_flight).await {
        done?;
    }
    Ok(())
}

/// The consumer name a lease is held under: `{worker}~{lease ms}` (see `keys.rs`).
fn lease_owner(consumer: &str, lease_ms: u64) -> String {
    concat3(consumer, '~', itoa::Buffer::new().format(lease_ms))
}

/// A receipt's tag, `{priority}:{entry id}` (one per delivery).
fn tag(priority: u8, id: &str) -> String {
    concat3(itoa::Buffer::new().format(priority), ':', id)
}

/// `a`, `sep`, `b` in one allocation (no `core::fmt`: these are built per fetch or per task).
fn concat3(a: &str, sep: char, b: &str) -> String {
    let mut out = String::with_capacity(a.len() + sep.len_utf8() + b.len());
    out.push_str(a);
    out.push(sep);
    out.push_str(b);
    out
}

/// Whether every receipt's lease holds for at least [`FENCE_MARGIN`] more.
fn leases_held(receipts: &[Receipt]) -> bool {
    let Some(limit) = std::time::Instant::now().checked_add(FENCE_MARGIN) else { return false };
    receipts.iter().all(|r| r.held_until.is_some_and(|t| t > limit))
}

/// Append `XACK` and `XDEL` of the receipts' entries to `pipe`, one pair per stream.
fn push_plain_acks(pipe: &mut redis::Pipeline, keys: &Keys, receipts: &[Receipt]) {
    for ((queue, p), list) in by_stream(receipts) {
        let ids: Vec<&str> = list.into_iter().map(|e| e.id).collect();
        let key = keys.stream(queue, p);
        pipe.cmd("XACK").arg(&key).arg(super::keys::GROUP).arg(&ids);
        pipe.cmd("XDEL").arg(key).arg(&ids);
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

/// The envelope of a stream entry (its field `e`), or, for an entry without one, all of its
/// fields as text (the dead letter's `raw`).
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

fn parse_consume(v: Value) -> Result<(Consumed, u16)> {
    let Value::Array(items) = v else {
        return Err(unexpected("consume", &v));
    };
    let n = items.first().and_then(int).ok_or_else(|| err("consume: missing count"))?;
    let mask = items.get(1).and_then(int).and_then(|m| u16::try_from(m).ok()).unwrap_or(0);
    if n == 0 {
        let next_due =
            items.get(2).and_then(int).and_then(|ms| u64::try_from(ms).ok()).map(Duration::from_millis);
        let last_ids = items.iter().skip(3).filter_map(string).collect();
        return Ok((Consumed::Idle { next_due, last_ids }, mask));
    }
    let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    let mut it = items.into_iter().skip(2);
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
    Ok((Consumed::Deliveries(out), mask))
}

impl RedisBroker {
    /// A broker in `namespace` on `conn`.
    pub fn new(conn: RedisConnection, namespace: &str) -> Self {
        RedisBroker { conn, keys: Keys::new(namespace), grouped: Arc::default(), fast: Arc::default() }
    }

    /// The key names this broker uses.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn cmd(&self) -> ConnectionManager {
        self.conn.commands()
    }

    /// Append the commands that store `envelopes` to `pipe`, one answer each, after whatever
    /// `pipe` holds (callers read only the answers before them). They are not marked ignored:
    /// the client parses every answer anyway, and marking one costs a hash-set insert and, per
    /// answer, a lookup.
    ///
    /// Plain commands, no script: appending to a stream needs no check. A connection lost
    /// mid-pipeline may leave part of a batch stored; the caller's retry then publishes some
    /// envelopes twice, which at-least-once delivery allows. The streams' groups must exist
    /// already (see [`Self::ensure_groups`]).
    fn push_publish(&self, pipe: &mut redis::Pipeline, envelopes: &[Envelope]) -> Result<()> {
        let now = Utc::now().timestamp_millis();
        // The stream of the previous envelope: a batch mostly goes to one queue and priority,
        // whose key is then built once instead of per envelope.
        let mut last: Option<(&str, u8, String)> = None;
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
                pipe.cmd("ZADD").arg(self.keys.delayed(&env.queue)).arg(due).arg(member);
            } else {
                let stream = match &last {
                    Some((q, p, key)) if *q == env.queue && *p == priority => key,
                    _ => &last.insert((&env.queue, priority, self.keys.stream(&env.queue, priority))).2,
                };
                let xadd = pipe.cmd("XADD").arg(stream).arg("*").arg("e").arg(json);
                if let Some(v) = vis {
                    xadd.arg("v").arg(v);
                }
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

    /// Make sure the streams `envelopes` go to have their groups, before a batch's chunks go
    /// out: then no chunk waits on a group's creation, so the chunks are sent in their order
    /// and envelopes keep their publish order within a priority.
    async fn ensure_groups(&self, envelopes: &[Envelope]) -> Result<()> {
        // Delayed envelopes' streams too: one may fall due before `push_publish` looks at it.
        let mut last: Option<(&str, u8)> = None;
        for env in envelopes {
            let at = (env.queue.as_str(), env.priority.min(MAX_PRIORITY));
            if last != Some(at) {
                self.ensure_group(&self.keys.stream(at.0, at.1)).await?;
                last = Some(at);
            }
        }
        Ok(())
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

    /// One fetch: the native fast path when it applies, else the consume script. Undecodable
    /// entries become dead letters.
    async fn consume_once(&self, req: &ConsumeRequest) -> Result<(Vec<Delivery>, Consumed)> {
        let names: Arc<[Arc<str>]> = req.queues.iter().map(|q| Arc::from(q.as_str())).collect();
        let fast = match self.plan(req) {
            Plan::Script => None,
            Plan::Native(p) => Some(p),
            Plan::Block(last_ids, until) => {
                return Ok((Vec::new(), Consumed::Idle { next_due: Some(until), last_ids }));
            }
        };
        // Every lease handed out by this fetch starts after this instant.
        let sent = std::time::Instant::now();
        let consumed = self.fetch_detached(fast, req.clone(), Arc::clone(&names)).await?;
        let raws = match consumed {
            Consumed::Deliveries(raws) => raws,
            idle => return Ok((Vec::new(), idle)),
        };
        let mut out = Vec::with_capacity(raws.len());
        for raw in raws {
            let Some(queue) = names.get(raw.queue) else {
                continue;
            };
            let mut receipt =
                Receipt { queue: Arc::clone(queue), tag: raw.tag, lease: raw.token, held_until: None };
            let parsed = if raw.has_envelope {
                Envelope::from_json(&raw.payload).map_err(|e| e.to_string())
            } else {
                Err("stream entry has no `e` field".to_owned())
            };
            match parsed {
                Ok(envelope) => {
                    // The lease is the consumer's until the entry's own one is set (right after
                    // the read, see `fetch_native`): the shorter of the two holds throughout.
                    let lease = envelope.visibility_timeout.map_or(req.lease, |v| v.min(req.lease));
                    receipt.held_until = sent.checked_add(lease);
                    out.push(Delivery { envelope: Arc::new(envelope), receipt, redelivered: raw.token > 1 })
                }
                Err(why) => self.dead_letter_malformed(receipt, &raw.payload, why).await?,
            }
        }
        Ok((out, Consumed::Deliveries(Vec::new())))
    }

    /// Whether this fetch may skip the script. It may when it consumes one queue whose
    /// entries sit in one priority stream (as the last calls saw it) and the script ran
    /// recently enough to have promoted due delayed envelopes and taken back expired leases
    /// (at least every [`SCRIPT_EVERY`]). Then, under a backlog (the last fetch came back
    /// full) or right after a blocking read saw new entries there, it is a plain
    /// `XREADGROUP`; when the last fetch emptied the stream, it blocks on the streams' ends
    /// at once (for no longer than the script may wait).
    fn plan(&self, req: &ConsumeRequest) -> Plan {
        let [queue] = req.queues.as_slice() else { return Plan::Script };
        let mut fast = self.fast.lock();
        let left = SCRIPT_EVERY.saturating_sub(fast.script_at.elapsed());
        let p = match &fast.single {
            Some((q, p)) if q == queue && !left.is_zero() => *p,
            _ => return Plan::Script,
        };
        if fast.backlog || std::mem::take(&mut fast.woken) {
            return Plan::Native(p);
        }
        match fast.drained.take() {
            // Empty streams have no entries at all, so any entry there is new.
            Some(last) => Plan::Block(
                (0..=MAX_PRIORITY)
                    .rev()
                    .map(|q| if q == p { last.clone() } else { "0-0".to_owned() })
                    .collect(),
                left,
            ),
            None => Plan::Script,
        }
    }

    /// Fetch on a task of its own (see [`crate::detached`]): the call always completes, and
    /// deliveries nobody takes any more are given back at once.
    async fn fetch_detached(
        &self,
        fast: Option<u8>,
        req: ConsumeRequest,
        queues: Arc<[Arc<str>]>,
    ) -> Result<Consumed> {
        let (this, back) = (self.clone(), self.clone());
        let fetch = async move {
            match fast {
                Some(p) => this.fetch_native(&req, p).await,
                None => this.fetch_script(&req).await,
            }
        };
        crate::detached::fetch_detached(fetch, move |unwanted| {
            let (broker, queues) = (back.clone(), Arc::clone(&queues));
            Box::pin(async move {
                if let Consumed::Deliveries(raws) = unwanted {
                    broker.release_unwanted(raws, &queues).await;
                }
            })
        })
        .await
    }

    /// The consume script: delayed promotion, expired leases, every priority in order.
    async fn fetch_script(&self, req: &ConsumeRequest) -> Result<Consumed> {
        let reclaim = {
            let fast = self.fast.lock();
            fast.reclaim_at.elapsed() >= SCRIPT_EVERY || !fast.backlog
        };
        let mut e = self.eval(&scripts::CONSUME);
        e.arg(&req.consumer).arg(req.max).arg(millis(req.lease)).arg(u8::from(reclaim)).arg(req.queues.len());
        for q in &req.queues {
            e.arg(q);
        }
        let (consumed, mask) = parse_consume(e.run::<Value>(&mut self.cmd()).await.map_err(err)?)?;
        let mut fast = self.fast.lock();
        fast.script_at = std::time::Instant::now();
        if reclaim {
            fast.reclaim_at = fast.script_at;
        }
        fast.single = match req.queues.as_slice() {
            [q] if mask.count_ones() == 1 => Some((q.clone(), mask.trailing_zeros() as u8)),
            _ => None,
        };
        // Stream ends recorded for another fetch (maybe of another queue) are no guide now.
        fast.drained = None;
        fast.backlog = matches!(&consumed, Consumed::Deliveries(d) if d.len() >= req.max);
        Ok(consumed)
    }

    /// The fast path: a plain `XREADGROUP` on the queue's one busy stream (the PEL is the
    /// lease, so nothing else needs recording), with `XLEN` of the other priority streams in
    /// the same pipeline so that a newly used priority sends the next fetch back to the
    /// script.
    async fn fetch_native(&self, req: &ConsumeRequest, priority: u8) -> Result<Consumed> {
        let queue = req.queues.first().map(String::as_str).unwrap_or_default();
        let lease = millis(req.lease);
        let owner = lease_owner(&req.consumer, lease);
        let mut pipe = redis::pipe();
        pipe.cmd("XREADGROUP")
            .arg("GROUP")
            .arg(super::keys::GROUP)
            .arg(&owner)
            .arg("COUNT")
            .arg(req.max)
            .arg("STREAMS")
            .arg(self.keys.stream(queue, priority))
            .arg(">");
        for p in (0..=MAX_PRIORITY).filter(|p| *p != priority) {
            pipe.cmd("XLEN").arg(self.keys.stream(queue, p));
        }
        // Server errors come back as answers and are looked for here, at the top level only:
        // otherwise the client walks every value of every envelope looking for one, which was
        // a twentieth of a worker's instructions.
        pipe.ignore_errors();
        let answers: Vec<Value> = match pipe.query_async::<Vec<Value>>(&mut self.cmd()).await {
            // E.g. the group vanished: the script knows how to recover.
            Ok(a) if a.iter().any(|v| matches!(v, Value::ServerError(_))) => {
                self.fast.lock().single = None;
                return self.fetch_script(req).await;
            }
            Ok(a) => a,
            Err(e) if e.code().is_some() => {
                self.fast.lock().single = None;
                return self.fetch_script(req).await;
            }
            Err(e) => return Err(err(e)),
        };
        let mut answers = answers.into_iter();
        let entries = answers.next().map(stream_entries).unwrap_or_default();
        let others_busy = answers.any(|a| int(&a).is_some_and(|n| n > 0));
        let last_id = entries.last().map(|(id, _)| id.clone());
        let mut own_leases = redis::pipe();
        let mut raws = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            if let Some(v) = own_lease(&fields).filter(|v| *v != lease) {
                own_leases
                    .cmd("XCLAIM")
                    .arg(self.keys.stream(queue, priority))
                    .arg(super::keys::GROUP)
                    .arg(lease_owner(&req.consumer, v))
                    .arg(0)
                    .arg(&id)
                    .arg("JUSTID")
                    .ignore();
            }
            let (has_envelope, payload) = entry_payload(fields);
            raws.push(Raw { queue: 0, tag: tag(priority, &id), token: 1, has_envelope, payload });
        }
        if !own_leases.is_empty() {
            own_leases.query_async::<()>(&mut self.cmd()).await.map_err(err)?;
        }
        let mut fast = self.fast.lock();
        fast.backlog = raws.len() >= req.max;
        if others_busy {
            fast.single = None;
        }
        // Fewer entries than asked for: the read reached the stream's end, so nothing newer
        // than the last one exists there (ids only grow), and the other streams were empty.
        fast.drained = last_id.filter(|_| !fast.backlog && !others_busy);
        Ok(Consumed::Deliveries(raws))
    }

    /// Record and ack for deliveries whose leases hold, in one `MULTI`/`EXEC` and in this
    /// order: records that are not terminal (a task's `running` state) through the fencing
    /// script, since they must never replace an outcome; terminal records with plain `SET`s
    /// and their completion messages, and `HDEL`s of the `queued` records they supersede;
    /// then `XACK` and `XDEL` per stream. The transaction is what keeps "no ack without its
    /// record": a server that refuses writes (out of memory) refuses the whole of it, where a
    /// plain pipeline would run the acks after the refused `SET`s.
    async fn finish_plain(
        &self,
        b: &RedisBackend,
        statuses: Vec<TaskStatus>,
        receipts: &[Receipt],
    ) -> Result<()> {
        let (terminal, running): (Vec<_>, Vec<_>) = statuses.into_iter().partition(|s| s.state.is_terminal());
        let mut pipe = redis::pipe();
        pipe.atomic().ignore_errors();
        if !running.is_empty() {
            pipe.add_command(b.set_fenced_call(&running)?.command().clone());
        }
        b.push_terminals(&mut pipe, &terminal)?;
        b.push_drop_queued(&mut pipe, &terminal);
        push_plain_acks(&mut pipe, &self.keys, receipts);
        if pipe.is_empty() {
            return Ok(());
        }
        let answers: Vec<Value> = pipe.query_async(&mut self.cmd()).await.map_err(err)?;
        let mut script_missing = false;
        for (i, answer) in answers.iter().enumerate() {
            if let Value::ServerError(e) = answer {
                if i == 0 && !running.is_empty() && e.code() == "NOSCRIPT" {
                    script_missing = true;
                    continue;
                }
                return Err(err(format!("finishing deliveries: {} {}", e.code(), e.details().unwrap_or(""))));
            }
        }
        if script_missing {
            // After the terminal records: the script refuses a `running` record over one.
            b.set_fenced(running).await?;
        }
        Ok(())
    }

    /// Give back deliveries nobody waited for (released: the next consume that looks for
    /// expired leases redelivers them first).
    async fn release_unwanted(&self, raws: Vec<Raw>, queues: &[Arc<str>]) {
        let n = raws.len();
        for raw in raws {
            let Some(queue) = queues.get(raw.queue) else { continue };
            let receipt =
                Receipt { queue: Arc::clone(queue), tag: raw.tag, lease: raw.token, held_until: None };
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
        let woke: Value = self.run_blocking(&cmd, block).await?;
        // New entries in one queue's one stream only: the next fetch may go straight to it.
        if let ([queue], [key]) = (req.queues.as_slice(), streams_with_entries(&woke).as_slice()) {
            // One queue: `keys` runs from priority 9 down to 0.
            let at = keys.iter().position(|k| k.as_bytes() == *key);
            if let Some(p) = at.and_then(|i| MAX_PRIORITY.checked_sub(u8::try_from(i).ok()?)) {
                let mut fast = self.fast.lock();
                fast.single = Some((queue.clone(), p));
                fast.woken = true;
            }
        }
        Ok(())
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
            self.ensure_groups(&envelopes).await?;
            in_flight_pairs(envelopes.chunks(PUBLISH_CHUNK).map(|chunk| async move {
                let mut pipe = redis::pipe();
                self.push_publish(&mut pipe, chunk)?;
                pipe.query_async::<()>(&mut self.cmd()).await.map_err(err)
            }))
            .await
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
            match colocated {
                // Per chunk one pipeline, records first (slot hashes, or `SET … NX` for ids that
                // are not time-ordered), then the chunk's envelopes, so every task's record is
                // stored before its envelope can be read. A `SET … NX` that met an existing
                // record (an id enqueued again) goes through the fencing script afterwards,
                // which never lets it replace an outcome; reads prefer a task's own record to
                // its slot-hash one for the same reason.
                Some(b)
                    if statuses.len() == envelopes.len()
                        && statuses.iter().all(|s| s.state == TaskState::Queued) =>
                {
                    self.ensure_groups(&envelopes).await?;
                    let chunks = statuses.chunks(PUBLISH_CHUNK).zip(envelopes.chunks(PUBLISH_CHUNK));
                    in_flight_pairs(chunks.map(|(statuses, envelopes)| async move {
                        let mut pipe = redis::pipe();
                        let writes = b.push_create_queued(&mut pipe, statuses)?;
                        self.push_publish(&mut pipe, envelopes)?;
                        let answers: Vec<Value> = pipe.query_async(&mut self.cmd()).await.map_err(err)?;
                        let records = &answers[..writes.commands().min(answers.len())];
                        b.finish_create_queued(statuses, records, &writes).await
                    }))
                    .await
                }
                _ => set_then_publish(self, backend, statuses, envelopes).await,
            }
        })
    }

    /// Two: a fetch under a backlog is a plain `XREADGROUP` pipelined on the shared
    /// connection, and with a second one in flight the worker runs one half of its slots'
    /// tasks while the other half's round trip passes (measured in docs/benchmarks.md).
    fn fetches_in_flight(&self) -> usize {
        2
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
                // Every lease certainly holds: plain commands, no script (see FENCE_MARGIN).
                Some(b)
                    if statuses.len() <= FINISH_CHUNK
                        && receipts.len() <= FINISH_CHUNK
                        && leases_held(&receipts) =>
                {
                    self.finish_plain(b, statuses, &receipts).await
                }
                // One script: the records, then the acks, atomically and in one round trip.
                Some(b) if statuses.len() <= FINISH_CHUNK && receipts.len() <= FINISH_CHUNK => {
                    let mut e = self.eval(&scripts::FINISH);
                    e.arg(millis(b.ttl()).max(1)).arg(statuses.len());
                    for s in &statuses {
                        push_status_args(&mut e, &self.keys, s)?;
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
            if requeue && n == 1 {
                // Our next fetch runs the script and looks for released leases first.
                self.fast.lock().single = None;
            }
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

/// The keys of the streams an `XREAD` answer (RESP2: `[[key, entries], …]`) holds entries
/// for.
fn streams_with_entries(v: &Value) -> Vec<&[u8]> {
    let Value::Array(streams) = v else { return Vec::new() };
    streams
        .iter()
        .filter_map(|s| match s.as_sequence()? {
            [key, Value::Array(entries)] if !entries.is_empty() => bytes(key),
            _ => None,
        })
        .collect()
}

/// `(entry id, fields)` of an XREADGROUP answer (entries of every stream it names, in order).
fn stream_entries(v: Value) -> Vec<(String, Vec<Value>)> {
    let Value::Array(streams) = v else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for stream in streams {
        let Value::Array(mut parts) = stream else { continue };
        let Some(Value::Array(entries)) = parts.pop() else { continue };
        for entry in entries {
            let Value::Array(mut pair) = entry else { continue };
            let fields = match pair.pop() {
                Some(Value::Array(fields)) => fields,
                _ => Vec::new(),
            };
            let Some(id) = pair.pop().as_ref().and_then(string) else { continue };
            out.push((id, fields));
        }
    }
    out
}

/// The lease length (ms) an envelope asks for: the entry's field `v`.
fn own_lease(fields: &[Value]) -> Option<u64> {
    fields
        .chunks_exact(2)
        .find(|kv| bytes(&kv[0]) == Some(b"v"))
        .and_then(|kv| int(&kv[1]))
        .and_then(|v| u64::try_from(v).ok())
}

/// `(entry id, field e)` of an XREADGROUP answer on one stream.
fn broadcast_entries(v: Value) -> Vec<(String, Option<Vec<u8>>)> {
    stream_entries(v)
        .into_iter()
        .map(|(id, fields)| {
            let env =
                fields.chunks_exact(2).find(|kv| bytes(&kv[0]) == Some(b"e")).and_then(|kv| bytes(&kv[1]));
            (id, env.map(<[u8]>::to_vec))
        })
        .collect()
}

fn decode_dead(id: &str, json: &[u8]) -> Result<DeadLetter> {
    let mut dead: DeadLetter = serde_json::from_slice(json)?;
    dead.id = id.to_owned();
    Ok(dead)
}
