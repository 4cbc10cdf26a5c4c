//! The SQLite broker: the same `jobs` model as Postgres, written through the single writer.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sqlx::Row;
use stem::backend::{ResultBackend, TaskStatus};
use stem::broker::{
    BoxFuture, Broker, ConsumeRequest, DeadLetter, Delivery, QueueCounts, REASON_MALFORMED, Receipt,
    set_then_ack, set_then_publish,
};
use stem::envelope::{Envelope, MAX_PRIORITY};
use stem::error::Result;
use tokio::time::Instant;

use super::backend::{SET, status_rows};
use super::{SqliteBackend, SqliteStore, db_err, now_ms};
use crate::sql_shared::{dead_letter, millis};

/// Broker on the `jobs` table of a SQLite database.
///
/// A claim is one `UPDATE … WHERE id IN (SELECT … ORDER BY priority DESC, run_at, id LIMIT n)
/// RETURNING …` on the writer connection (so two claims never overlap), after putting
/// expired leases back. Each delivery bumps the row's `token`, the receipt's lease number:
/// ack, nack, retry, dead-letter and lease extension require it. Acks are one statement per
/// batch. Idle consumers wake on in-process publishes at once and poll for other processes'
/// writes (see the module docs).
#[derive(Clone, Debug)]
pub struct SqliteBroker {
    store: SqliteStore,
}

const PUBLISH: &str = "INSERT INTO jobs (queue, priority, run_at, lease_ms, task_id, payload, created_at) \
     SELECT value->>0, value->>1, coalesce(value->>2, ?2), value->>3, value->>4, value->>5, ?2 \
     FROM json_each(?1)";
const RECLAIM: &str =
    "UPDATE jobs SET state = 'ready', lease_until = NULL WHERE state = 'leased' AND lease_until <= ?1";
const CLAIM_ONE: &str = "UPDATE jobs SET state = 'leased', token = token + 1, deliveries = deliveries + 1, \
       consumer = ?4, lease_until = ?1 + coalesce(lease_ms, ?3) \
     WHERE id IN (SELECT id FROM jobs WHERE state = 'ready' AND queue = ?2 AND run_at <= ?1 \
       ORDER BY priority DESC, run_at, id LIMIT ?5) \
     RETURNING id, token, deliveries, priority, run_at, queue, payload";
const CLAIM_MANY: &str = "UPDATE jobs SET state = 'leased', token = token + 1, deliveries = deliveries + 1, \
       consumer = ?4, lease_until = ?1 + coalesce(lease_ms, ?3) \
     WHERE id IN (SELECT id FROM jobs WHERE state = 'ready' \
       AND queue IN (SELECT value FROM json_each(?2)) AND run_at <= ?1 \
       ORDER BY priority DESC, (SELECT key FROM json_each(?2) WHERE value = jobs.queue), run_at, id LIMIT ?5) \
     RETURNING id, token, deliveries, priority, run_at, queue, payload";
/// Expired leases back to ready, then the claim: one call to the connection's thread.
static RECLAIM_CLAIM_ONE: LazyLock<String> = LazyLock::new(|| format!("{RECLAIM}; {CLAIM_ONE}"));
static RECLAIM_CLAIM_MANY: LazyLock<String> = LazyLock::new(|| format!("{RECLAIM}; {CLAIM_MANY}"));
/// The records ([`SET`], `?1`–`?3`), then the lease-fenced acks (`?4`): one call inside the
/// combined transaction.
static SET_AND_ACK: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{SET}; DELETE FROM jobs WHERE state = 'leased' \
         AND (id, token) IN (SELECT value->>0, value->>1 FROM json_each(?4))"
    )
});
/// The records ([`SET`], `?1`–`?3`, `?2` being now), then the jobs (`?4`): one call inside the
/// combined transaction.
static SET_AND_PUBLISH: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{SET}; INSERT INTO jobs (queue, priority, run_at, lease_ms, task_id, payload, created_at) \
         SELECT value->>0, value->>1, coalesce(value->>2, ?2), value->>3, value->>4, value->>5, ?2 \
         FROM json_each(?4)"
    )
});
const NEXT_DUE: &str = "SELECT min(x) FROM ( \
       SELECT min(run_at) AS x FROM jobs WHERE state = 'ready' AND queue IN (SELECT value FROM json_each(?1)) \
       UNION ALL SELECT min(lease_until) FROM jobs WHERE state = 'leased')";
const MALFORMED_INSERT: &str =
    "INSERT INTO dead_letters (queue, reason, detail, payload, dead_at) VALUES (?1, ?2, ?3, ?4, ?5)";
const DELETE_ONE: &str = "DELETE FROM jobs WHERE id = ?1";
const RELEASE: &str = "UPDATE jobs SET state = 'ready', lease_until = NULL, consumer = NULL, \
       deliveries = max(deliveries - 1, 0) \
     WHERE state = 'leased' AND (id, token) IN (SELECT value->>0, value->>1 FROM json_each(?1))";
const ACK: &str = "DELETE FROM jobs WHERE state = 'leased' \
     AND (id, token) IN (SELECT value->>0, value->>1 FROM json_each(?1))";
const NACK_REQUEUE: &str = "UPDATE jobs SET state = 'ready', lease_until = NULL, consumer = NULL \
     WHERE id = ?1 AND token = ?2 AND state = 'leased'";
const NACK_DROP: &str = "DELETE FROM jobs WHERE id = ?1 AND token = ?2 AND state = 'leased'";
const RETRY: &str = "UPDATE jobs SET state = 'ready', lease_until = NULL, consumer = NULL, deliveries = 0, \
       queue = ?3, priority = ?4, run_at = ?5, lease_ms = ?6, payload = ?7 \
     WHERE id = ?1 AND token = ?2 AND state = 'leased'";
const EXTEND: &str = "UPDATE jobs SET lease_until = ?3 + ?4 \
     WHERE id = ?1 AND token = ?2 AND state = 'leased' AND lease_until > ?3";
const DEAD_INSERT: &str =
    "INSERT INTO dead_letters (queue, reason, detail, payload, dead_at) VALUES (?1, ?2, ?3, ?4, ?5)";
const DLQ_LIST: &str = "SELECT id, queue, reason, detail, payload, dead_at FROM dead_letters \
     WHERE queue = ?1 ORDER BY id LIMIT ?3 OFFSET ?2";
const DLQ_GET: &str =
    "SELECT id, queue, reason, detail, payload, dead_at FROM dead_letters WHERE queue = ?1 AND id = ?2";
const DLQ_SELECT: &str = "SELECT id, payload FROM dead_letters WHERE queue = ?1 \
     AND (json_array_length(?2) = 0 OR id IN (SELECT value FROM json_each(?2))) ORDER BY id";
const DLQ_DELETE: &str = "DELETE FROM dead_letters WHERE id IN (SELECT value FROM json_each(?1))";
const DLQ_PURGE: &str = "DELETE FROM dead_letters WHERE queue = ?1";
const PURGE: &str = "DELETE FROM jobs WHERE queue = ?1 AND state = 'ready'";
/// Row and lease totals come from the counter row the `jobs` triggers keep; expired leases
/// and delayed rows are index range scans (one seek per priority for the delayed ones).
const COUNTS: &str = "SELECT \
       coalesce((SELECT jobs FROM queue_counts WHERE queue = ?1), 0), \
       coalesce((SELECT leased FROM queue_counts WHERE queue = ?1), 0), \
       (SELECT count(*) FROM jobs WHERE state = 'leased' AND lease_until <= ?2 AND queue = ?1), \
       (SELECT count(*) FROM jobs WHERE state = 'ready' AND queue = ?1 \
          AND priority IN (0, 1, 2, 3, 4, 5, 6, 7, 8, 9) AND run_at > ?2), \
       (SELECT count(*) FROM dead_letters WHERE queue = ?1)";
const SUBSCRIBE: &str =
    "INSERT INTO broadcast_subscriptions (channel, subscriber) VALUES (?1, ?2) ON CONFLICT DO NOTHING";
const UNSUBSCRIBE: &str = "DELETE FROM broadcast_subscriptions WHERE channel = ?1 AND subscriber = ?2";
const UNSUBSCRIBE_INBOX: &str = "DELETE FROM broadcast_messages WHERE channel = ?1 AND subscriber = ?2";
const BROADCAST: &str = "INSERT INTO broadcast_messages (channel, subscriber, payload) \
     SELECT channel, subscriber, ?2 FROM broadcast_subscriptions WHERE channel = ?1";
const TAKE_BROADCAST: &str = "DELETE FROM broadcast_messages WHERE id IN (SELECT id FROM broadcast_messages \
       WHERE channel = ?1 AND subscriber = ?2 ORDER BY id LIMIT ?3) RETURNING id, payload";

fn parse_tag(receipt: &Receipt) -> Option<(i64, i64)> {
    Some((receipt.tag.parse().ok()?, i64::try_from(receipt.lease).ok()?))
}

fn from_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// The JSON array of rows [`PUBLISH`] inserts.
fn job_rows(envelopes: &[Envelope]) -> Result<String> {
    let mut rows = Vec::with_capacity(envelopes.len());
    for env in envelopes {
        let payload = serde_json::to_string(env).map_err(stem::Error::broker)?;
        rows.push(serde_json::json!([
            env.queue,
            env.priority.min(MAX_PRIORITY),
            env.not_before.map(|t| t.timestamp_millis()),
            env.visibility_timeout.map(millis),
            env.id.to_string(),
            payload,
        ]));
    }
    serde_json::to_string(&rows).map_err(stem::Error::broker)
}

type DeadRow = (i64, String, String, String, String, i64);

fn dead((id, queue, reason, detail, payload, at): DeadRow) -> DeadLetter {
    dead_letter(id, queue, reason, detail, payload, from_ms(at))
}

impl SqliteBroker {
    /// A broker on `store`.
    pub fn new(store: SqliteStore) -> Self {
        SqliteBroker { store }
    }

    /// The store this broker runs on.
    pub fn store(&self) -> &SqliteStore {
        &self.store
    }

    async fn claim(&self, req: &ConsumeRequest) -> Result<Vec<Delivery>> {
        let w = self.store.writer();
        let now = now_ms();
        let queues = if req.queues.len() == 1 {
            req.queues[0].clone()
        } else {
            serde_json::to_string(&req.queues).map_err(stem::Error::broker)?
        };
        let sql = if req.queues.len() == 1 { &*RECLAIM_CLAIM_ONE } else { &*RECLAIM_CLAIM_MANY };
        let rows = sqlx::query(sql)
            .bind(now)
            .bind(queues)
            .bind(millis(req.lease))
            .bind(&req.consumer)
            .bind(i64::try_from(req.max).unwrap_or(i64::MAX))
            .fetch_all(w)
            .await
            .map_err(db_err)?;
        // SQLite keeps whatever a row was given, whatever the column's type: a row written by
        // hand may hold text in `priority` or a blob in `payload`. Nothing here may fail
        // after the claim (the batch is leased already), so every column has a fallback and
        // a payload that is not an envelope goes to the DLQ.
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.try_get(0).map_err(db_err)?;
            let token: i64 = row.try_get(1).unwrap_or(0);
            let deliveries: i64 = row.try_get(2).unwrap_or(1);
            let priority: i64 = row.try_get(3).unwrap_or(0);
            let run_at: i64 = row.try_get(4).unwrap_or(0);
            let queue: String =
                row.try_get(5).unwrap_or_else(|_| req.queues.first().cloned().unwrap_or_default());
            let payload: Vec<u8> = row.try_get(6).unwrap_or_default();
            claimed.push((priority, run_at, id, token, deliveries, queue, payload));
        }
        let rank = |q: &str| req.queues.iter().position(|x| x == q).unwrap_or(usize::MAX);
        claimed.sort_by(|a, b| {
            b.0.cmp(&a.0).then(rank(&a.5).cmp(&rank(&b.5))).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
        });
        let mut out = Vec::with_capacity(claimed.len());
        let mut names: Vec<Arc<str>> = Vec::new();
        for (_, _, id, token, deliveries, queue, payload) in claimed {
            match Envelope::from_json(&payload) {
                Ok(env) => {
                    let q = match names.iter().find(|q| ***q == *queue) {
                        Some(q) => Arc::clone(q),
                        None => {
                            let q: Arc<str> = Arc::from(queue.as_str());
                            names.push(Arc::clone(&q));
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
                    // A failure here must not lose the batch's good deliveries: the row stays
                    // leased and is moved when it comes back after its lease.
                    let raw = String::from_utf8_lossy(&payload);
                    match self.move_malformed(id, &queue, &e.to_string(), &raw).await {
                        Ok(()) => {
                            tracing::warn!(id, queue, error = %e, "malformed envelope moved to the DLQ")
                        }
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

    /// Move row `id` to the DLQ as `malformed-envelope`, with its payload as (lossy) text.
    async fn move_malformed(&self, id: i64, queue: &str, why: &str, raw: &str) -> Result<()> {
        let mut tx = self.store.writer().begin_with("BEGIN IMMEDIATE").await.map_err(db_err)?;
        sqlx::query(MALFORMED_INSERT)
            .bind(queue)
            .bind(REASON_MALFORMED)
            .bind(why)
            .bind(raw)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        sqlx::query(DELETE_ONE).bind(id).execute(&mut *tx).await.map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    /// [`claim`](Self::claim) on a task of its own (see [`crate::detached`]): deliveries
    /// nobody takes any more are put back at once, their delivery count restored.
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
        let pairs: Vec<(i64, i64)> = deliveries.iter().filter_map(|d| parse_tag(&d.receipt)).collect();
        let released = match serde_json::to_string(&pairs) {
            Ok(json) => sqlx::query(RELEASE).bind(json).execute(self.store.writer()).await.map_err(db_err),
            Err(e) => Err(stem::Error::broker(e)),
        };
        match released {
            Ok(_) => {
                self.wake();
                tracing::debug!(n = deliveries.len(), "released deliveries of an abandoned fetch");
            }
            Err(e) => tracing::warn!(
                n = deliveries.len(), error = %e,
                "releasing deliveries of an abandoned fetch failed; they come back when their lease lapses"
            ),
        }
    }

    async fn next_due(&self, queues: &[String]) -> Result<Option<i64>> {
        let queues = serde_json::to_string(queues).map_err(stem::Error::broker)?;
        sqlx::query_scalar::<_, Option<i64>>(NEXT_DUE)
            .bind(queues)
            .fetch_one(self.store.reader())
            .await
            .map_err(db_err)
    }

    fn wake(&self) {
        self.store.hub().jobs.notify_waiters();
    }

    /// `backend` when it is a [`SqliteBackend`] on this broker's database.
    fn same_store<'b>(&self, backend: &'b dyn ResultBackend) -> Option<&'b SqliteBackend> {
        let sq = backend.as_any()?.downcast_ref::<SqliteBackend>()?;
        sq.store().same_as(&self.store).then_some(sq)
    }
}

impl Broker for SqliteBroker {
    fn publish(&self, envelopes: Vec<Envelope>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if envelopes.is_empty() {
                return Ok(());
            }
            let rows = job_rows(&envelopes)?;
            sqlx::query(PUBLISH)
                .bind(rows)
                .bind(now_ms())
                .execute(self.store.writer())
                .await
                .map_err(db_err)?;
            self.wake();
            Ok(())
        })
    }

    fn consume<'a>(&'a self, req: &'a ConsumeRequest) -> BoxFuture<'a, Result<Vec<Delivery>>> {
        Box::pin(async move {
            let give_up = Instant::now() + req.wait;
            if req.max == 0 {
                return Ok(Vec::new());
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
                if let Some(due) = self.next_due(&req.queues).await? {
                    let ms = u64::try_from(due.saturating_sub(now_ms()).max(0)).unwrap_or(0) + 1;
                    wake = wake.min(Instant::now() + Duration::from_millis(ms));
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
            let pairs: Vec<(i64, i64)> = receipts.iter().filter_map(parse_tag).collect();
            if pairs.is_empty() {
                return Ok(());
            }
            let json = serde_json::to_string(&pairs).map_err(stem::Error::broker)?;
            sqlx::query(ACK).bind(json).execute(self.store.writer()).await.map_err(db_err)?;
            Ok(())
        })
    }

    /// With a [`SqliteBackend`] on the same database: the records and the acks are written
    /// in one transaction (one commit). Otherwise the default (set, then ack).
    fn record_and_ack<'a>(
        &'a self,
        backend: &'a dyn ResultBackend,
        statuses: Vec<TaskStatus>,
        receipts: Vec<Receipt>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let Some(sq) = self.same_store(backend).filter(|_| !statuses.is_empty() && !receipts.is_empty())
            else {
                return set_then_ack(self, backend, statuses, receipts).await;
            };
            let Some(rows) = status_rows(statuses)? else { return self.ack(receipts).await };
            let pairs: Vec<(i64, i64)> = receipts.iter().filter_map(parse_tag).collect();
            let acks = serde_json::to_string(&pairs).map_err(stem::Error::broker)?;
            let mut tx = self.store.writer().begin_with("BEGIN IMMEDIATE").await.map_err(db_err)?;
            let written: Vec<(String, bool)> = sqlx::query_as(&SET_AND_ACK)
                .bind(rows)
                .bind(now_ms())
                .bind(millis(sq.ttl()))
                .bind(acks)
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
            sq.written(&written);
            Ok(())
        })
    }

    /// With a [`SqliteBackend`] on the same database: the records and the jobs are written
    /// in one transaction, so a task becomes visible together with its `queued` record.
    /// Otherwise the default (set, then publish).
    fn record_and_publish<'a>(
        &'a self,
        backend: &'a dyn ResultBackend,
        statuses: Vec<TaskStatus>,
        envelopes: Vec<Envelope>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let Some(sq) = self.same_store(backend).filter(|_| !statuses.is_empty() && !envelopes.is_empty())
            else {
                return set_then_publish(self, backend, statuses, envelopes).await;
            };
            let Some(rows) = status_rows(statuses)? else { return self.publish(envelopes).await };
            let jobs = job_rows(&envelopes)?;
            let mut tx = self.store.writer().begin_with("BEGIN IMMEDIATE").await.map_err(db_err)?;
            let written: Vec<(String, bool)> = sqlx::query_as(&SET_AND_PUBLISH)
                .bind(rows)
                .bind(now_ms())
                .bind(millis(sq.ttl()))
                .bind(jobs)
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
            sq.written(&written);
            self.wake();
            Ok(())
        })
    }

    fn nack(&self, receipt: Receipt, requeue: bool) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let Some((id, token)) = parse_tag(&receipt) else { return Ok(false) };
            let sql = if requeue { NACK_REQUEUE } else { NACK_DROP };
            let r =
                sqlx::query(sql).bind(id).bind(token).execute(self.store.writer()).await.map_err(db_err)?;
            let found = r.rows_affected() > 0;
            if found && requeue {
                self.wake();
            }
            Ok(found)
        })
    }

    fn retry(&self, receipt: Receipt, envelope: Envelope) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let Some((id, token)) = parse_tag(&receipt) else { return Ok(false) };
            let payload = serde_json::to_string(&envelope).map_err(stem::Error::broker)?;
            let r = sqlx::query(RETRY)
                .bind(id)
                .bind(token)
                .bind(&envelope.queue)
                .bind(i64::from(envelope.priority.min(MAX_PRIORITY)))
                .bind(envelope.not_before.map_or_else(now_ms, |t| t.timestamp_millis()))
                .bind(envelope.visibility_timeout.map(millis))
                .bind(payload)
                .execute(self.store.writer())
                .await
                .map_err(db_err)?;
            let found = r.rows_affected() > 0;
            if found {
                self.wake();
            }
            Ok(found)
        })
    }

    fn extend_lease<'a>(&'a self, receipt: &'a Receipt, lease: Duration) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let Some((id, token)) = parse_tag(receipt) else { return Ok(false) };
            let r = sqlx::query(EXTEND)
                .bind(id)
                .bind(token)
                .bind(now_ms())
                .bind(millis(lease))
                .execute(self.store.writer())
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
            let mut tx = self.store.writer().begin_with("BEGIN IMMEDIATE").await.map_err(db_err)?;
            let r = sqlx::query(NACK_DROP).bind(id).bind(token).execute(&mut *tx).await.map_err(db_err)?;
            if r.rows_affected() == 0 {
                return Ok(false);
            }
            sqlx::query(DEAD_INSERT)
                .bind(&*receipt.queue)
                .bind(reason)
                .bind(detail)
                .bind(payload)
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
            Ok(true)
        })
    }

    fn dlq_list<'a>(
        &'a self,
        queue: &'a str,
        offset: usize,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>>> {
        Box::pin(async move {
            let rows: Vec<DeadRow> = sqlx::query_as(DLQ_LIST)
                .bind(queue)
                .bind(i64::try_from(offset).unwrap_or(i64::MAX))
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(self.store.reader())
                .await
                .map_err(db_err)?;
            Ok(rows.into_iter().map(dead).collect())
        })
    }

    fn dlq_get<'a>(&'a self, queue: &'a str, id: &'a str) -> BoxFuture<'a, Result<Option<DeadLetter>>> {
        Box::pin(async move {
            let Ok(id) = id.parse::<i64>() else { return Ok(None) };
            let row: Option<DeadRow> = sqlx::query_as(DLQ_GET)
                .bind(queue)
                .bind(id)
                .fetch_optional(self.store.reader())
                .await
                .map_err(db_err)?;
            Ok(row.map(dead))
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
            let wanted = serde_json::to_string(&wanted).map_err(stem::Error::broker)?;
            let mut tx = self.store.writer().begin_with("BEGIN IMMEDIATE").await.map_err(db_err)?;
            let rows: Vec<(i64, String)> = sqlx::query_as(DLQ_SELECT)
                .bind(queue)
                .bind(wanted)
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
            let ids_json = serde_json::to_string(&taken).map_err(stem::Error::broker)?;
            sqlx::query(DLQ_DELETE).bind(ids_json).execute(&mut *tx).await.map_err(db_err)?;
            sqlx::query(PUBLISH)
                .bind(job_rows(&envs)?)
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
            self.wake();
            Ok(taken.len())
        })
    }

    fn dlq_purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            let r = sqlx::query(DLQ_PURGE).bind(queue).execute(self.store.writer()).await.map_err(db_err)?;
            Ok(usize::try_from(r.rows_affected()).unwrap_or(usize::MAX))
        })
    }

    fn purge<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            let r = sqlx::query(PURGE).bind(queue).execute(self.store.writer()).await.map_err(db_err)?;
            Ok(usize::try_from(r.rows_affected()).unwrap_or(usize::MAX))
        })
    }

    fn counts<'a>(&'a self, queue: &'a str) -> BoxFuture<'a, Result<QueueCounts>> {
        Box::pin(async move {
            let (total, leased, expired, delayed, dead): (i64, i64, i64, i64, i64) = sqlx::query_as(COUNTS)
                .bind(queue)
                .bind(now_ms())
                .fetch_one(self.store.reader())
                .await
                .map_err(db_err)?;
            let n = |x: i64| u64::try_from(x).unwrap_or(0);
            Ok(QueueCounts {
                pending: n(total - leased - delayed + expired),
                delayed: n(delayed),
                in_flight: n(leased - expired),
                dead: n(dead),
            })
        })
    }

    fn subscribe<'a>(&'a self, channel: &'a str, subscriber: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            sqlx::query(SUBSCRIBE)
                .bind(channel)
                .bind(subscriber)
                .execute(self.store.writer())
                .await
                .map_err(db_err)?;
            Ok(())
        })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str, subscriber: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut tx = self.store.writer().begin_with("BEGIN IMMEDIATE").await.map_err(db_err)?;
            for sql in [UNSUBSCRIBE, UNSUBSCRIBE_INBOX] {
                sqlx::query(sql).bind(channel).bind(subscriber).execute(&mut *tx).await.map_err(db_err)?;
            }
            tx.commit().await.map_err(db_err)
        })
    }

    fn broadcast<'a>(&'a self, channel: &'a str, envelope: Envelope) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let payload = serde_json::to_string(&envelope).map_err(stem::Error::broker)?;
            sqlx::query(BROADCAST)
                .bind(channel)
                .bind(payload)
                .execute(self.store.writer())
                .await
                .map_err(db_err)?;
            self.store.hub().broadcast.notify_waiters();
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
            let hub = Arc::clone(self.store.hub());
            loop {
                let notified = hub.broadcast.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let mut rows: Vec<(i64, String)> = sqlx::query_as(TAKE_BROADCAST)
                    .bind(channel)
                    .bind(subscriber)
                    .bind(i64::try_from(max).unwrap_or(i64::MAX))
                    .fetch_all(self.store.writer())
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
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep_until(give_up.min(now + self.store.fallback_poll())) => {}
                }
            }
        })
    }
}
