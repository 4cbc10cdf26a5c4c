//! The Postgres broker: a `jobs` table claimed with `FOR UPDATE SKIP LOCKED`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row;
use stem::backend::{ResultBackend, TaskStatus};
use stem::broker::{
    BoxFuture, Broker, ConsumeRequest, DeadLetter, Delivery, QueueCounts, REASON_MALFORMED, Receipt,
    set_then_ack, set_then_publish,
};
use stem::envelope::{Envelope, MAX_PRIORITY};
use stem::error::Result;
use tokio::time::Instant;

use super::backend::{NOTIFY_TERMINAL, StatusRows, upsert_sql};
use super::{PgBackend, PgStore, db_err};
use crate::sql_shared::{dead_letter, millis};

/// While every claim comes back full (a backlog), expired leases are looked for this often.
const RECLAIM_EVERY_MS: i64 = 500;

/// The condition that makes a claim's transaction commit without waiting for its WAL flush:
/// `set_config(…, true)` lasts until the end of the statement's own transaction, so the
/// connection keeps the server's setting for every later statement. Evaluated once, as an
/// init plan, before the statement returns a row.
///
/// A claim that is lost because the server crashed before its WAL reached the disk is a
/// claim that never happened: its rows are `ready` again (token and delivery count as
/// before) and are delivered again. The worker holding the lost claim's receipts can neither
/// ack nor retry nor extend them: every one of those statements requires the current token,
/// and the next claim of those rows gets a token of its own (a token is the claim's time in
/// microseconds, and the server comes back later than the lost claim). Any synchronous
/// commit that follows (an outcome's record and ack, an enqueue) flushes the WAL up to
/// itself, claims included, so a stored outcome never follows a claim the server forgot.
/// Enqueues, outcomes, acks, retries and dead-letters keep the server's durability.
const ASYNC_COMMIT: &str = "(SELECT set_config('synchronous_commit', 'off', true)) IS NOT NULL";

/// Broker on a `jobs` table in the namespace's schema.
///
/// Claims take a batch in one statement (`UPDATE … FROM (SELECT … FOR UPDATE SKIP LOCKED
/// LIMIT n) RETURNING …`, which also adds the batch to the queue's `leased` counter). The
/// same statement takes back expired leases whenever the queues run short and, under a
/// backlog, at least every half second. Each delivery
/// bumps the row's `token`, which is the receipt's lease number: ack, nack, retry,
/// dead-letter and lease extension all require the token, so a stale worker touches
/// nothing. Publishes and requeues send `NOTIFY`; an idle consumer sleeps on the listener,
/// re-checking at least every [`PgOptions::fallback_poll`](super::PgOptions::fallback_poll)
/// and at the next due `run_at` or lease deadline.
#[derive(Clone)]
pub struct PgBroker {
    store: PgStore,
    sql: Arc<Sql>,
    /// Unix milliseconds from which the next claim also looks for expired leases.
    reclaim_at: Arc<AtomicI64>,
}

impl std::fmt::Debug for PgBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBroker").field("store", &self.store).finish()
    }
}

/// Statements, with the schema filled in.
pub(crate) struct Sql {
    pub(crate) publish: String,
    /// Status upsert + job inserts in one statement (the producer's path).
    pub(crate) record_and_publish: String,
    /// Status upsert + lease-fenced delete in one statement (the worker's path).
    record_and_ack: String,
    claim_one: String,
    claim_many: String,
    reclaim_one: String,
    reclaim_many: String,
    next_due: String,
    malformed: String,
    release: String,
    ack: String,
    nack_requeue: String,
    nack_drop: String,
    retry: String,
    extend: String,
    dead_letter: String,
    dlq_list: String,
    dlq_get: String,
    dlq_select: String,
    dlq_delete: String,
    dlq_purge: String,
    purge: String,
    counts: String,
    subscribe: String,
    unsubscribe: String,
    unsubscribe_inbox: String,
    broadcast: String,
    take_broadcast: String,
}

impl Sql {
    pub(crate) fn new(s: &str) -> Self {
        // Newly leased rows are added to the queue's `leased` counter by the claim itself
        // (the `jobs` triggers count inserts and deletes only, so a claim fires none).
        let count_leased = |rows: &str| {
            format!(
                "cnt AS (INSERT INTO {s}.queue_counts AS c (queue, shard, jobs, leased) \
                   SELECT queue, (txid_current() % 64)::int2, 0, count(*) FROM {rows} \
                   GROUP BY queue ORDER BY queue \
                   ON CONFLICT (queue, shard) DO UPDATE SET leased = c.leased + EXCLUDED.leased)"
            )
        };
        // The token is the claim's time in microseconds (at least one more than the last):
        // a claim lost in a server crash (see `ASYNC_COMMIT`) never hands its token out again.
        let lease = format!(
            "UPDATE {s}.jobs j SET state = 'leased', \
               token = greatest(j.token + 1, (extract(epoch FROM now()) * 1000000)::int8), \
               deliveries = j.deliveries + 1, consumer = $4, \
               lease_until = now() + coalesce(j.lease_ms, $3) * interval '1 millisecond'"
        );
        let returning = "RETURNING j.id, j.token, j.deliveries, j.priority, j.run_at, j.queue, j.payload";
        // A claim's commit does not wait for its WAL flush (see `ASYNC_COMMIT`).
        let async_commit = ASYNC_COMMIT;
        // The usual claim: due rows only.
        let claim = |filter: &str, order: &str| {
            format!(
                "WITH due AS (SELECT id FROM {s}.jobs \
                   WHERE state = 'ready' AND {filter} AND run_at <= now() \
                   ORDER BY {order} LIMIT $2 FOR UPDATE SKIP LOCKED), \
                 upd AS ({lease} FROM due WHERE j.id = due.id {returning}), \
                 {cnt} \
                 SELECT * FROM upd WHERE {async_commit}",
                cnt = count_leased("upd"),
            )
        };
        // The claim that also takes back expired leases (still leased: not counted again).
        let reclaim = |filter: &str, order: &str| {
            format!(
                "WITH expired AS (SELECT id, priority, run_at, queue FROM {s}.jobs \
                   WHERE state = 'leased' AND lease_until <= now() AND {filter} \
                   ORDER BY lease_until LIMIT $2 FOR UPDATE SKIP LOCKED), \
                 due AS (SELECT id, priority, run_at, queue FROM {s}.jobs \
                   WHERE state = 'ready' AND {filter} AND run_at <= now() \
                   ORDER BY {order} LIMIT $2 FOR UPDATE SKIP LOCKED), \
                 pick AS (SELECT id, fresh FROM \
                   (SELECT *, false AS fresh FROM expired UNION ALL SELECT *, true FROM due) c \
                   ORDER BY {order} LIMIT $2), \
                 upd AS ({lease} FROM pick WHERE j.id = pick.id {returning}, pick.fresh), \
                 {cnt} \
                 SELECT id, token, deliveries, priority, run_at, queue, payload FROM upd WHERE {async_commit}",
                cnt = count_leased("upd WHERE fresh"),
            )
        };
        Sql {
            publish: format!(
                "WITH ins AS (INSERT INTO {s}.jobs (queue, priority, run_at, lease_ms, task_id, payload) \
                   SELECT q, p, coalesce(r, now()), l, t, pl \
                   FROM unnest($1::text[], $2::int2[], $3::timestamptz[], $4::int8[], $5::uuid[], $6::text[]) \
                     AS u(q, p, r, l, t, pl) RETURNING 1) \
                 SELECT count(*) FROM (SELECT 1 FROM ins LIMIT 1) x, LATERAL (SELECT pg_notify($7, 'j')) n"
            ),
            record_and_publish: format!(
                "WITH up AS ({up}), \
                 ins AS (INSERT INTO {s}.jobs (queue, priority, run_at, lease_ms, task_id, payload) \
                   SELECT q, p, coalesce(r, now()), l, t, pl \
                   FROM unnest($10::text[], $11::int2[], $12::timestamptz[], $13::int8[], $14::uuid[], $15::text[]) \
                     AS u(q, p, r, l, t, pl) RETURNING 1) \
                 SELECT (SELECT count(*) FROM ({notify}) n), \
                   (SELECT count(pg_notify($9, 'j')) FROM (SELECT 1 FROM ins LIMIT 1) x)",
                up = upsert_sql(s),
                notify = NOTIFY_TERMINAL,
            ),
            record_and_ack: format!(
                "WITH up AS ({up}), \
                 done AS (DELETE FROM {s}.jobs j USING unnest($10::int8[], $11::int8[]) AS a(id, token) \
                   WHERE j.id = a.id AND j.token = a.token AND j.state = 'leased' RETURNING 1) \
                 SELECT (SELECT count(*) FROM ({notify}) n), (SELECT count(*) FROM done)",
                up = upsert_sql(s),
                notify = NOTIFY_TERMINAL,
            ),
            claim_one: claim("queue = $1[1]", "priority DESC, run_at, id"),
            claim_many: claim("queue = ANY($1)", "priority DESC, array_position($1, queue), run_at, id"),
            reclaim_one: reclaim("queue = $1[1]", "priority DESC, run_at, id"),
            reclaim_many: reclaim("queue = ANY($1)", "priority DESC, array_position($1, queue), run_at, id"),
            next_due: format!(
                "SELECT (EXTRACT(EPOCH FROM (least( \
                   (SELECT min(r) FROM unnest($1::text[]) q, generate_series(0, 9) p, \
                     LATERAL (SELECT run_at AS r FROM {s}.jobs WHERE state = 'ready' AND queue = q \
                       AND priority = p::int2 ORDER BY run_at LIMIT 1) x), \
                   (SELECT min(lease_until) FROM {s}.jobs WHERE lease_until IS NOT NULL AND queue = ANY($1)) \
                 ) - clock_timestamp())) * 1000)::float8"
            ),
            malformed: format!(
                "WITH d AS (DELETE FROM {s}.jobs WHERE id = $1 RETURNING queue, payload) \
                 INSERT INTO {s}.dead_letters (queue, reason, detail, payload) \
                 SELECT queue, $2, $3, payload FROM d"
            ),
            // Released rows leave the queue's `leased` counter, as in `nack_requeue`.
            release: format!(
                "WITH u AS (UPDATE {s}.jobs j SET state = 'ready', lease_until = NULL, consumer = NULL, \
                   deliveries = greatest(j.deliveries - 1, 0) \
                   FROM unnest($1::int8[], $2::int8[]) AS a(id, token) \
                   WHERE j.id = a.id AND j.token = a.token AND j.state = 'leased' RETURNING j.queue), \
                 cnt AS (INSERT INTO {s}.queue_counts AS c (queue, shard, jobs, leased) \
                   SELECT queue, (txid_current() % 64)::int2, 0, -count(*) FROM u \
                   GROUP BY queue ORDER BY queue \
                   ON CONFLICT (queue, shard) DO UPDATE SET leased = c.leased + EXCLUDED.leased) \
                 SELECT count(*) FROM (SELECT 1 FROM u LIMIT 1) x, LATERAL (SELECT pg_notify($3, 'j')) n"
            ),
            ack: format!(
                "DELETE FROM {s}.jobs j USING unnest($1::int8[], $2::int8[]) AS a(id, token) \
                 WHERE j.id = a.id AND j.token = a.token AND j.state = 'leased'"
            ),
            nack_requeue: format!(
                "WITH u AS (UPDATE {s}.jobs SET state = 'ready', lease_until = NULL, consumer = NULL \
                   WHERE id = $1 AND token = $2 AND state = 'leased' RETURNING queue), \
                 cnt AS (INSERT INTO {s}.queue_counts AS c (queue, shard, jobs, leased) \
                   SELECT queue, (txid_current() % 64)::int2, 0, -1 FROM u \
                   ON CONFLICT (queue, shard) DO UPDATE SET leased = c.leased + EXCLUDED.leased) \
                 SELECT count(*) FROM u, LATERAL (SELECT pg_notify($3, 'j')) n"
            ),
            nack_drop: format!("DELETE FROM {s}.jobs WHERE id = $1 AND token = $2 AND state = 'leased'"),
            // The row may move to another queue: both queues' counters follow.
            retry: format!(
                "WITH old AS (SELECT queue FROM {s}.jobs \
                   WHERE id = $1 AND token = $2 AND state = 'leased' FOR UPDATE), \
                 u AS (UPDATE {s}.jobs j SET state = 'ready', lease_until = NULL, consumer = NULL, \
                   deliveries = 0, queue = $3, priority = $4, run_at = coalesce($5, now()), \
                   lease_ms = $6, payload = $7 \
                   FROM old WHERE j.id = $1 RETURNING old.queue AS was, j.queue AS dest), \
                 cnt AS (INSERT INTO {s}.queue_counts AS c (queue, shard, jobs, leased) \
                   SELECT q, (txid_current() % 64)::int2, sum(dj), sum(dl) \
                   FROM (SELECT was AS q, -1 AS dj, -1 AS dl FROM u UNION ALL SELECT dest, 1, 0 FROM u) x \
                   GROUP BY q ORDER BY q \
                   ON CONFLICT (queue, shard) DO UPDATE \
                   SET jobs = c.jobs + EXCLUDED.jobs, leased = c.leased + EXCLUDED.leased) \
                 SELECT count(*) FROM u, LATERAL (SELECT pg_notify($8, 'j')) n"
            ),
            extend: format!(
                "UPDATE {s}.jobs SET lease_until = now() + $3 * interval '1 millisecond' \
                 WHERE id = $1 AND token = $2 AND state = 'leased' AND lease_until > now()"
            ),
            dead_letter: format!(
                "WITH d AS (DELETE FROM {s}.jobs WHERE id = $1 AND token = $2 AND state = 'leased' RETURNING 1) \
                 INSERT INTO {s}.dead_letters (queue, reason, detail, payload) \
                 SELECT $3, $4, $5, $6 FROM d"
            ),
            dlq_list: format!(
                "SELECT id, queue, reason, detail, payload, dead_at FROM {s}.dead_letters \
                 WHERE queue = $1 ORDER BY id OFFSET $2 LIMIT $3"
            ),
            dlq_get: format!(
                "SELECT id, queue, reason, detail, payload, dead_at FROM {s}.dead_letters \
                 WHERE queue = $1 AND id = $2"
            ),
            dlq_select: format!(
                "SELECT id, payload FROM {s}.dead_letters \
                 WHERE queue = $1 AND (cardinality($2::int8[]) = 0 OR id = ANY($2)) ORDER BY id FOR UPDATE"
            ),
            dlq_delete: format!("DELETE FROM {s}.dead_letters WHERE id = ANY($1)"),
            dlq_purge: format!("DELETE FROM {s}.dead_letters WHERE queue = $1"),
            purge: format!("DELETE FROM {s}.jobs WHERE queue = $1 AND state = 'ready'"),
            // Row and lease totals come from the counter rows the `jobs` triggers keep; only
            // the time-dependent parts are read from `jobs`, by index range scans whose cost
            // is those rows, not the queue: expired leases (the lease index) and delayed rows
            // (ten short range scans of the ready index, one per priority; with the priority
            // as a join key a generic plan cannot turn it into a filter over the whole queue).
            counts: format!(
                "WITH c AS (SELECT coalesce(sum(jobs), 0)::int8 AS total, coalesce(sum(leased), 0)::int8 AS leased \
                   FROM {s}.queue_counts WHERE queue = $1), \
                 e AS (SELECT count(*) AS expired FROM {s}.jobs \
                   WHERE state = 'leased' AND lease_until <= now() AND queue = $1), \
                 d AS (SELECT coalesce(sum(n), 0)::int8 AS delayed FROM generate_series(0, 9) p, \
                   LATERAL (SELECT count(*) AS n FROM {s}.jobs WHERE state = 'ready' AND queue = $1 \
                     AND priority = p::int2 AND run_at > now()) x) \
                 SELECT total - leased - delayed + expired, delayed, leased - expired, \
                   (SELECT count(*) FROM {s}.dead_letters WHERE queue = $1) \
                 FROM c, e, d"
            ),
            subscribe: format!(
                "INSERT INTO {s}.broadcast_subscriptions (channel, subscriber) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING"
            ),
            unsubscribe: format!(
                "DELETE FROM {s}.broadcast_subscriptions WHERE channel = $1 AND subscriber = $2"
            ),
            unsubscribe_inbox: format!(
                "DELETE FROM {s}.broadcast_messages WHERE channel = $1 AND subscriber = $2"
            ),
            broadcast: format!(
                "WITH ins AS (INSERT INTO {s}.broadcast_messages (channel, subscriber, payload) \
                   SELECT channel, subscriber, $2 FROM {s}.broadcast_subscriptions WHERE channel = $1 \
                   RETURNING 1) \
                 SELECT count(*) FROM (SELECT 1 FROM ins LIMIT 1) x, LATERAL (SELECT pg_notify($3, 'b')) n"
            ),
            take_broadcast: format!(
                "DELETE FROM {s}.broadcast_messages WHERE id IN (SELECT id FROM {s}.broadcast_messages \
                   WHERE channel = $1 AND subscriber = $2 ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) \
                 RETURNING id, payload"
            ),
        }
    }
}

/// Columns of a batch insert into `jobs`.
#[derive(Default)]
pub(crate) struct JobRows {
    pub(crate) queues: Vec<String>,
    pub(crate) priorities: Vec<i16>,
    pub(crate) run_at: Vec<Option<DateTime<Utc>>>,
    pub(crate) lease_ms: Vec<Option<i64>>,
    pub(crate) task_ids: Vec<uuid::Uuid>,
    pub(crate) payloads: Vec<String>,
}

impl JobRows {
    pub(crate) fn push(&mut self, env: &Envelope) -> Result<()> {
        self.payloads.push(serde_json::to_string(env).map_err(stem::Error::broker)?);
        self.queues.push(env.queue.clone());
        self.priorities.push(i16::from(env.priority.min(MAX_PRIORITY)));
        self.run_at.push(env.not_before);
        self.lease_ms.push(env.visibility_timeout.map(millis));
        self.task_ids.push(env.id.0);
        Ok(())
    }

    /// Bind the six column arrays as the next six parameters of `query`.
    pub(crate) fn bind_to<'q>(
        self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.queues)
            .bind(self.priorities)
            .bind(self.run_at)
            .bind(self.lease_ms)
            .bind(self.task_ids)
            .bind(self.payloads)
    }
}

fn parse_tag(receipt: &Receipt) -> Option<(i64, i64)> {
    Some((receipt.tag.parse().ok()?, i64::try_from(receipt.lease).ok()?))
}

impl PgBroker {
    /// A broker on `store`'s namespace.
    pub fn new(store: PgStore) -> Self {
        let sql = store.broker_sql();
        PgBroker { store, sql, reclaim_at: Arc::new(AtomicI64::new(0)) }
    }

    /// The store this broker runs on.
    pub fn store(&self) -> &PgStore {
        &self.store
    }

    /// `backend` when it is a [`PgBackend`] on this broker's store (same pool and namespace),
    /// whose writes can share this broker's statements.
    fn same_store<'b>(&self, backend: &'b dyn ResultBackend) -> Option<&'b PgBackend> {
        let pg = backend.as_any()?.downcast_ref::<PgBackend>()?;
        pg.store().same_as(&self.store).then_some(pg)
    }

    /// One claim round: lease up to `req.max` due rows.
    async fn claim(&self, req: &ConsumeRequest) -> Result<Vec<Delivery>> {
        let pool = self.store.pool();
        // Expired leases are looked for at least every RECLAIM_EVERY, and on every claim while
        // the queues run short (so an idle consumer takes a lapsed lease back at its deadline).
        let now = Utc::now().timestamp_millis();
        let reclaim = self.reclaim_at.load(Ordering::Relaxed) <= now;
        let sql = match (reclaim, req.queues.len() == 1) {
            (true, true) => &self.sql.reclaim_one,
            (true, false) => &self.sql.reclaim_many,
            (false, true) => &self.sql.claim_one,
            (false, false) => &self.sql.claim_many,
        };
        let mut conn = self.store.hot().await.map_err(db_err)?;
        let rows = sqlx::query(sql)
            .bind(&req.queues)
            .bind(i64::try_from(req.max).unwrap_or(i64::MAX))
            .bind(millis(req.lease))
            .bind(&req.consumer)
            .fetch_all(conn.conn())
            .await;
        let rows = conn.finish(rows).map_err(db_err)?;
        let next = if rows.len() < req.max {
            0
        } else if reclaim {
            now + RECLAIM_EVERY_MS
        } else {
            self.reclaim_at.load(Ordering::Relaxed)
        };
        self.reclaim_at.store(next, Ordering::Relaxed);
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.try_get(0).map_err(db_err)?;
            let token: i64 = row.try_get(1).map_err(db_err)?;
            let deliveries: i32 = row.try_get(2).map_err(db_err)?;
            let priority: i16 = row.try_get(3).map_err(db_err)?;
            let run_at: DateTime<Utc> = row.try_get(4).map_err(db_err)?;
            let queue: String = row.try_get(5).map_err(db_err)?;
            let payload: String = row.try_get(6).map_err(db_err)?;
            claimed.push((priority, run_at, id, token, deliveries, queue, payload));
        }
        // RETURNING has no order: restore priority, queue preference, then FIFO.
        let rank = |q: &str| req.queues.iter().position(|x| x == q).unwrap_or(usize::MAX);
        claimed.sort_by(|a, b| {
            b.0.cmp(&a.0).then(rank(&a.5).cmp(&rank(&b.5))).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
        });
        let mut out = Vec::with_capacity(claimed.len());
        let mut queue_names: Vec<Arc<str>> = Vec::new();
        for (_, _, id, token, deliveries, queue, payload) in claimed {
            match Envelope::from_json(payload.as_bytes()) {
                Ok(env) => {
                    let q = match queue_names.iter().find(|q| ***q == *queue) {
                        Some(q) => Arc::clone(q),
                        None => {
                            let q: Arc<str> = Arc::from(queue.as_str());
                            queue_names.push(Arc::clone(&q));
                            q
                        }
                    };
                    out.push(Delivery {
                        envelope: Arc::new(env),
                        receipt: Receipt {
                            queue: q,
                            tag: id.to_string(),
                            lease: u64::try_from(token).unwrap_or(0),
                            held_until: None,
                        },
                        redelivered: deliveries > 1,
                    });
                }
                Err(e) => {
                    // The good deliveries of this batch are leased already: a failure here
                    // must not lose them. The row stays leased and comes back (and is moved
                    // again) when its lease lapses.
                    let moved = sqlx::query(&self.sql.malformed)
                        .bind(id)
                        .bind(REASON_MALFORMED)
                        .bind(e.to_string())
                        .execute(pool)
                        .await;
                    match moved {
                        Ok(_) => tracing::warn!(id, queue, error = %e, "malformed envelope moved to the DLQ"),
                        Err(db) => tracing::error!(
                            id, queue, error = %e, db_error = %db,
                            "malformed envelope could not be moved to the DLQ; retrying when its lease lapses"
                        ),
                    }
                }
            }
        }
        Ok(out)
    }

    /// [`claim`](Self::claim) on a task of its own (see [`crate::detached`]): the claim always
    /// completes, and deliveries nobody takes any more are put back at once (their delivery
    /// count restored), so a graceful shutdown leaves nothing leased.
    async fn claim_detached(&self, req: &ConsumeRequest) -> Result<Vec<Delivery>> {
        let (this, back) = (self.clone(), self.clone());
        let req = req.clone();
        crate::detached::fetch_detached(async move { this.claim(&req).await }, move |unwanted| {
            let broker = back.clone();
            Box::pin(async move { broker.release(unwanted).await })
        })
        .await
    }

    /// Put deliveries that were claimed but never handed out back to `ready`.
    async fn release(&self, deliveries: Vec<Delivery>) {
        if deliveries.is_empty() {
            return;
        }
        let (ids, tokens): (Vec<i64>, Vec<i64>) =
            deliveries.iter().filter_map(|d| parse_tag(&d.receipt)).unzip();
        let released = sqlx::query(&self.sql.release)
            .bind(ids)
            .bind(tokens)
            .bind(self.store.channel())
            .execute(self.store.pool())
            .await;
        match released {
            Ok(_) => tracing::debug!(n = deliveries.len(), "released deliveries of an abandoned fetch"),
            Err(e) => tracing::warn!(
                n = deliveries.len(), error = %e,
                "releasing deliveries of an abandoned fetch failed; they come back when their lease lapses"
            ),
        }
    }

    /// Milliseconds until the next delayed row is due or lease expires, if any.
    async fn next_due(&self, queues: &[String]) -> Result<Option<f64>> {
        let mut conn = self.store.hot().await.map_err(db_err)?;
        let due = sqlx::query_scalar::<_, Option<f64>>(&self.sql.next_due)
            .bind(queues)
            .fetch_one(conn.conn())
            .await;
        conn.finish(due).map_err(db_err)
    }

    async fn insert(&self, envelopes: &[Envelope]) -> Result<()> {
        let mut rows = JobRows::default();
        for env in envelopes {
            rows.push(env)?;
        }
        let mut conn = self.store.hot().await.map_err(db_err)?;
        let done = rows
            .bind_to(sqlx::query(&self.sql.publish))
            .bind(self.store.channel())
            .execute(conn.conn())
            .await;
        conn.finish(done).map_err(db_err)?;
        Ok(())
    }
}

impl Broker for PgBroker {
    fn publish(&self, envelopes: Vec<Envelope>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if envelopes.is_empty() {
                return Ok(());
            }
            self.insert(&envelopes).await
        })
    }

    fn consume<'a>(&'a self, req: &'a ConsumeRequest) -> BoxFuture<'a, Result<Vec<Delivery>>> {
        Box::pin(async move {
            let give_up = Instant::now() + req.wait;
            if req.max == 0 {
                return Ok(Vec::new());
            }
            if !req.wait.is_zero() {
                self.store.listening().await;
            }
            let hub = Arc::clone(self.store.hub());
            loop {
                let notified = hub.jobs.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let out = self.claim_detached(req).await?;
                if !out.is_empty() {
                    return Ok(out);
                }
                let now = Instant::now();
                if now >= give_up {
                    return Ok(Vec::new());
                }
                let mut wake = give_up.min(now + self.store.fallback_poll());
                if let Some(ms) = self.next_due(&req.queues).await? {
                    let due = Duration::from_secs_f64((ms.max(0.0) + 1.0) / 1000.0);
                    wake = wake.min(Instant::now() + due);
                }
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(wake) => {}
                }
            }
        })
    }

    fn ack(&self, receipts: Vec<Receipt>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let (ids, tokens): (Vec<i64>, Vec<i64>) = receipts.iter().filter_map(parse_tag).unzip();
            if ids.is_empty() {
                return Ok(());
            }
            let mut conn = self.store.hot().await.map_err(db_err)?;
            let done = sqlx::query(&self.sql.ack).bind(ids).bind(tokens).execute(conn.conn()).await;
            conn.finish(done).map_err(db_err)?;
            Ok(())
        })
    }

    /// With a [`PgBackend`] on the same store: one statement (one transaction, one WAL
    /// flush) upserts the records (fenced as in [`ResultBackend::set`], with the NOTIFY for
    /// waiters) and deletes the leased rows whose token still matches. Otherwise the default
    /// (set, then ack).
    fn record_and_ack<'a>(
        &'a self,
        backend: &'a dyn ResultBackend,
        statuses: Vec<TaskStatus>,
        receipts: Vec<Receipt>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let Some(pg) = self.same_store(backend).filter(|_| !statuses.is_empty() && !receipts.is_empty())
            else {
                return set_then_ack(self, backend, statuses, receipts).await;
            };
            let rows = StatusRows::new(statuses)?;
            let mut acks: Vec<(i64, i64)> = receipts.iter().filter_map(parse_tag).collect();
            acks.sort_unstable();
            let (ids, tokens): (Vec<i64>, Vec<i64>) = acks.into_iter().unzip();
            let mut conn = self.store.hot().await.map_err(db_err)?;
            let done = rows
                .bind_to(sqlx::query(&self.sql.record_and_ack), pg.ttl(), self.store.channel())
                .bind(ids)
                .bind(tokens)
                .execute(conn.conn())
                .await;
            conn.finish(done).map_err(db_err)?;
            pg.maybe_sweep();
            Ok(())
        })
    }

    /// With a [`PgBackend`] on the same store: one statement writes the records and inserts
    /// the jobs (and sends the NOTIFY that wakes consumers), so a task becomes visible
    /// together with its `queued` record. Otherwise the default (set, then publish).
    fn record_and_publish<'a>(
        &'a self,
        backend: &'a dyn ResultBackend,
        statuses: Vec<TaskStatus>,
        envelopes: Vec<Envelope>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let Some(pg) = self.same_store(backend).filter(|_| !statuses.is_empty() && !envelopes.is_empty())
            else {
                return set_then_publish(self, backend, statuses, envelopes).await;
            };
            let status_rows = StatusRows::new(statuses)?;
            let mut job_rows = JobRows::default();
            for env in &envelopes {
                job_rows.push(env)?;
            }
            let query = status_rows.bind_to(
                sqlx::query(&self.sql.record_and_publish),
                pg.ttl(),
                self.store.channel(),
            );
            let mut conn = self.store.hot().await.map_err(db_err)?;
            let done = job_rows.bind_to(query).execute(conn.conn()).await;
            conn.finish(done).map_err(db_err)?;
            pg.maybe_sweep();
            Ok(())
        })
    }

    fn nack(&self, receipt: Receipt, requeue: bool) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let Some((id, token)) = parse_tag(&receipt) else { return Ok(false) };
            let pool = self.store.pool();
            if requeue {
                let n: i64 = sqlx::query_scalar(&self.sql.nack_requeue)
                    .bind(id)
                    .bind(token)
                    .bind(self.store.channel())
                    .fetch_one(pool)
                    .await
                    .map_err(db_err)?;
                Ok(n > 0)
            } else {
                let r = sqlx::query(&self.sql.nack_drop)
                    .bind(id)
                    .bind(token)
                    .execute(pool)
                    .await
                    .map_err(db_err)?;
                Ok(r.rows_affected() > 0)
            }
        })
    }

    fn retry(&self, receipt: Receipt, envelope: Envelope) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let Some((id, token)) = parse_tag(&receipt) else { return Ok(false) };
            let payload = serde_json::to_string(&envelope).map_err(stem::Error::broker)?;
            let n: i64 = sqlx::query_scalar(&self.sql.retry)
                .bind(id)
                .bind(token)
                .bind(&envelope.queue)
                .bind(i16::from(envelope.priority.min(MAX_PRIORITY)))
                .bind(envelope.not_before)
                .bind(envelope.visibility_timeout.map(millis))
                .bind(payload)
                .bind(self.store.channel())
                .fetch_one(self.store.pool())
                .await
                .map_err(db_err)?;
            Ok(n > 0)
        })
    }

    fn extend_lease<'a>(&'a self, receipt: &'a Receipt, lease: Duration) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let Some((id, token)) = parse_tag(receipt) else { return Ok(false) };
            let r = sqlx::query(&self.sql.extend)
                .bind(id)
                .bind(token)
                .bind(millis(lease))
                .execute(self.store.pool())
                .await
                .map_err(db_err)?;
            Ok(r.rows_affected() > 0)
        })
    }

    fn dead_letter(
        &self,
        receipt: Receipt,
        envelope: Envelope,
        reason: &str,
        detail: String,
    ) -> BoxFuture<'_, Result<bool>> {
        let reason = reason.to_owned();
        Box::pin(async move {
            let Some((id, token)) = parse_tag(&receipt) else { return Ok(false) };
            let payload = serde_json::to_string(&envelope).map_err(stem::Error::broker)?;
            let r = sqlx::query(&self.sql.dead_letter)
                .bind(id)
                .bind(token)
                .bind(&*receipt.queue)
                .bind(reason)
                .bind(detail)
                .bind(payload)
                .execute(self.store.pool())
                .await
                .map_err(db_err)?;
            Ok(r.rows_affected() > 0)
        })
    }

    fn dlq_list<'a>(
        &'a self,
        queue: &'a str,
        offset: usize,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>>> {
        Box::pin(async move {
            let rows =
                sqlx::query_as::<_, (i64, String, String, String, String, DateTime<Utc>)>(&self.sql.dlq_list)
                    .bind(queue)
                    .bind(i64::try_from(offset).unwrap_or(i64::MAX))
                    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                    .fetch_all(self.store.pool())
                    .await
                    .map_err(db_err)?;
            Ok(rows.into_iter().map(|(id, q, r, d, p, at)| dead_letter(id, q, r, d, p, at)).collect())
        })
    }

    fn dlq_get<'a>(&'a self, queue: &'a str, id: &'a str) -> BoxFuture<'a, Result<Option<DeadLetter>>> {
        Box::pin(async move {
            let Ok(id) = id.parse::<i64>() else { return Ok(None) };
            let row =
                sqlx::query_as::<_, (i64, String, String, String, String, DateTime<Utc>)>(&self.sql.dlq_get)
                    .bind(queue)
                    .bind(id)
                    .fetch_optional(self.store.pool())
                    .await
                    .map_err(db_err)?;
            Ok(row.map(|(id, q, r, d, p, at)| dead_letter(id, q, r, d, p, at)))
        })
    }

    fn dlq_replay<'a>(
        &'a self,
        queue: &'a str,
        ids: &'a [String],
        delay: Option<Duration>,
    ) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            let wanted: Vec<i64> = ids.iter().filter_map(|i| i.parse().ok()).collect();
            if !ids.is_empty() && wanted.is_empty() {
                return Ok(0);
            }
            let mut tx = self.store.pool().begin().await.map_err(db_err)?;
            let rows = sqlx::query_as::<_, (i64, String)>(&self.sql.dlq_select)
                .bind(queue)
                .bind(&wanted)
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err)?;
            let not_before = delay.and_then(|d| chrono::Duration::from_std(d).ok()).map(|d| Utc::now() + d);
            let mut taken = Vec::new();
            let mut envs = Vec::new();
            for (id, payload) in rows {
                if let Ok(mut env) = Envelope::from_json(payload.as_bytes()) {
                    env.attempt = 0;
                    env.not_before = not_before;
                    taken.push(id);
                    envs.push(env);
                }
            }
            if taken.is_empty() {
                return Ok(0);
            }
            sqlx::query(&self.sql.dlq_delete).bind(&taken).execute(&mut *tx).await.map_err(db_err)?;
            let mut job_rows = JobRows::default();
            for env in &envs {
                job_rows.push(env)?;
            }
            job_rows
                .bind_to(sqlx::query(&self.sql.publish))
                .bind(self.store.channel())
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
            Ok(taken.len())
        })
    }

    fn dlq_purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            let r = sqlx::query(&self.sql.dlq_purge)
                .bind(queue)
                .execute(self.store.pool())
                .await
                .map_err(db_err)?;
            Ok(usize::try_from(r.rows_affected()).unwrap_or(usize::MAX))
        })
    }

    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            let r =
                sqlx::query(&self.sql.purge).bind(queue).execute(self.store.pool()).await.map_err(db_err)?;
            Ok(usize::try_from(r.rows_affected()).unwrap_or(usize::MAX))
        })
    }

    fn counts<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueCounts>> {
        Box::pin(async move {
            let (pending, delayed, in_flight, dead) = {
                let mut conn = self.store.hot().await.map_err(db_err)?;
                let row = sqlx::query_as::<_, (i64, i64, i64, i64)>(&self.sql.counts)
                    .bind(queue)
                    .fetch_one(conn.conn())
                    .await;
                conn.finish(row).map_err(db_err)?
            };
            let n = |x: i64| u64::try_from(x).unwrap_or(0);
            Ok(QueueCounts {
                pending: n(pending),
                delayed: n(delayed),
                in_flight: n(in_flight),
                dead: n(dead),
            })
        })
    }

    fn subscribe<'a>(&'a self, channel: &'a str, subscriber: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            sqlx::query(&self.sql.subscribe)
                .bind(channel)
                .bind(subscriber)
                .execute(self.store.pool())
                .await
                .map_err(db_err)?;
            Ok(())
        })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str, subscriber: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut tx = self.store.pool().begin().await.map_err(db_err)?;
            for sql in [&self.sql.unsubscribe, &self.sql.unsubscribe_inbox] {
                sqlx::query(sql).bind(channel).bind(subscriber).execute(&mut *tx).await.map_err(db_err)?;
            }
            tx.commit().await.map_err(db_err)
        })
    }

    fn broadcast<'a>(&'a self, channel: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let payload = serde_json::to_string(&envelope).map_err(stem::Error::broker)?;
            sqlx::query(&self.sql.broadcast)
                .bind(channel)
                .bind(payload)
                .bind(self.store.channel())
                .execute(self.store.pool())
                .await
                .map_err(db_err)?;
            Ok(())
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
            let give_up = Instant::now() + wait;
            if !wait.is_zero() {
                self.store.listening().await;
            }
            let hub = Arc::clone(self.store.hub());
            loop {
                let notified = hub.broadcast.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let mut rows = sqlx::query_as::<_, (i64, String)>(&self.sql.take_broadcast)
                    .bind(channel)
                    .bind(subscriber)
                    .bind(i64::try_from(max).unwrap_or(i64::MAX))
                    .fetch_all(self.store.pool())
                    .await
                    .map_err(db_err)?;
                if !rows.is_empty() || max == 0 {
                    rows.sort_by_key(|r| r.0);
                    let mut out = Vec::with_capacity(rows.len());
                    for (id, payload) in rows {
                        match Envelope::from_json(payload.as_bytes()) {
                            Ok(env) => out.push(env),
                            Err(e) => {
                                tracing::warn!(id, channel, error = %e, "dropped a malformed broadcast")
                            }
                        }
                    }
                    if !out.is_empty() || max == 0 {
                        return Ok(out);
                    }
                    continue;
                }
                let now = Instant::now();
                if now >= give_up {
                    return Ok(Vec::new());
                }
                let wake = give_up.min(now + self.store.fallback_poll());
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(wake) => {}
                }
            }
        })
    }
}
