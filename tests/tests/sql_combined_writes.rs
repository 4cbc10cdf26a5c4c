//! The SQL adapters' combined writes and queue counts, on Postgres and SQLite: with a backend
//! on the same database, `record_and_ack` stores the records and finishes the deliveries in
//! one transaction and `record_and_publish` stores the `queued` records with the jobs;
//! both keep the default methods' rules (fenced records, lease-fenced acks, wake-ups).
//! `counts` reads counter rows kept by triggers, so every kind of write is checked against it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use stem::backend::{ResultBackend, TaskState, TaskStatus};
use stem::broker::{Broker, ConsumeRequest, Delivery, QueueCounts};
use stem::{Envelope, TaskId};
use stem_tests::Harness;
use stem_tests::postgres::PgHarness;
use stem_tests::sqlite::SqliteHarness;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(3600);

fn env(queue: &str, n: i64) -> Envelope {
    let mut e = Envelope::new("combined.task", json!({ "n": n }));
    e.queue = queue.to_owned();
    e
}

fn queued(envs: &[Envelope]) -> Vec<TaskStatus> {
    envs.iter().map(|e| TaskStatus::for_envelope(e, TaskState::Queued)).collect()
}

fn done(d: &Delivery) -> TaskStatus {
    let mut s = TaskStatus::for_envelope(&d.envelope, TaskState::Succeeded);
    s.result = d.envelope.args.get("n").cloned();
    s
}

fn req(queue: &str, max: usize, lease: Duration) -> ConsumeRequest {
    ConsumeRequest {
        queues: vec![queue.to_owned()],
        max,
        lease,
        wait: Duration::from_millis(500),
        consumer: format!("c-{}", uuid::Uuid::now_v7().simple()),
    }
}

/// Consume until `want` deliveries arrived (or 10 s passed).
async fn consume_n(b: &dyn Broker, queue: &str, want: usize, lease: Duration) -> Vec<Delivery> {
    let give_up = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < give_up {
        out.extend(b.consume(&req(queue, want - out.len(), lease)).await.unwrap());
    }
    assert_eq!(out.len(), want, "consumed {} of {want}", out.len());
    out
}

fn counts(pending: u64, delayed: u64, in_flight: u64, dead: u64) -> QueueCounts {
    QueueCounts { pending, delayed, in_flight, dead }
}

async fn pair(h: &impl Harness) -> (Arc<dyn Broker>, Arc<dyn ResultBackend>, String) {
    let ns = stem_tests::namespace();
    (h.broker(&ns).await, h.backend(&ns, TTL).await, ns)
}

async fn publish_record_and_ack_round_trip(h: &impl Harness) {
    let (b, k, _) = pair(h).await;
    let envs: Vec<Envelope> = (0..3).map(|n| env("q", n)).collect();
    let ids: Vec<TaskId> = envs.iter().map(|e| e.id).collect();
    b.record_and_publish(&*k, queued(&envs), envs).await.unwrap();
    for id in &ids {
        assert_eq!(k.get(*id).await.unwrap().unwrap().state, TaskState::Queued, "{}", h.name());
    }
    assert_eq!(b.counts("q").await.unwrap(), counts(3, 0, 0, 0), "{}", h.name());
    let got = consume_n(&*b, "q", 3, Duration::from_secs(30)).await;
    assert_eq!(b.counts("q").await.unwrap(), counts(0, 0, 3, 0), "{}", h.name());
    let statuses = got.iter().map(done).collect();
    b.record_and_ack(&*k, statuses, got.iter().map(|d| d.receipt.clone()).collect()).await.unwrap();
    for (n, id) in ids.iter().enumerate() {
        let s = k.get(*id).await.unwrap().unwrap();
        assert_eq!((s.state, s.result), (TaskState::Succeeded, Some(json!(n))), "{}", h.name());
    }
    assert_eq!(b.counts("q").await.unwrap(), counts(0, 0, 0, 0), "{}", h.name());
    let r = ConsumeRequest { wait: Duration::from_millis(200), ..req("q", 10, Duration::from_secs(30)) };
    assert!(b.consume(&r).await.unwrap().is_empty(), "{}: acked deliveries never come back", h.name());
}

async fn stale_receipt_records_but_does_not_finish(h: &impl Harness) {
    let (b, k, _) = pair(h).await;
    let e = env("q", 7);
    b.record_and_publish(&*k, queued(std::slice::from_ref(&e)), vec![e]).await.unwrap();
    let first = consume_n(&*b, "q", 1, Duration::from_millis(300)).await.remove(0);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let second = consume_n(&*b, "q", 1, Duration::from_secs(30)).await.remove(0);
    assert!(second.redelivered);
    // The stale worker's outcome is stored (records are fenced by attempt, not by lease), but
    // its ack touches nothing: the delivery belongs to the second worker.
    b.record_and_ack(&*k, vec![done(&first)], vec![first.receipt.clone()]).await.unwrap();
    assert_eq!(k.get(first.envelope.id).await.unwrap().unwrap().state, TaskState::Succeeded);
    assert_eq!(b.counts("q").await.unwrap(), counts(0, 0, 1, 0), "{}", h.name());
    b.record_and_ack(&*k, vec![done(&second)], vec![second.receipt.clone()]).await.unwrap();
    assert_eq!(b.counts("q").await.unwrap(), counts(0, 0, 0, 0), "{}", h.name());
}

async fn records_stay_fenced(h: &impl Harness) {
    let (b, k, _) = pair(h).await;
    let mut e = env("q", 1);
    e.attempt = 2;
    let mut newer = TaskStatus::for_envelope(&e, TaskState::Succeeded);
    newer.result = Some(json!("newer"));
    k.set(vec![newer]).await.unwrap();
    b.publish(vec![e.clone()]).await.unwrap();
    let d = consume_n(&*b, "q", 1, Duration::from_secs(30)).await.remove(0);
    let mut older = TaskStatus::for_envelope(&d.envelope, TaskState::Failed);
    older.attempt = 1;
    let mut late_running = TaskStatus::for_envelope(&d.envelope, TaskState::Running);
    late_running.attempt = 2;
    b.record_and_ack(&*k, vec![older, late_running], vec![d.receipt]).await.unwrap();
    let got = k.get(e.id).await.unwrap().unwrap();
    assert_eq!((got.state, got.result), (TaskState::Succeeded, Some(json!("newer"))), "{}", h.name());
    assert_eq!(b.counts("q").await.unwrap(), counts(0, 0, 0, 0), "{}", h.name());
}

async fn waiters_wake_for_a_big_batch(h: &impl Harness) {
    let (b, k, ns) = pair(h).await;
    let envs: Vec<Envelope> = (0..450).map(|n| env("q", n)).collect();
    let watched = [envs[0].id, envs[230].id, envs[449].id];
    b.record_and_publish(&*k, queued(&envs), envs).await.unwrap();
    let got = consume_n(&*b, "q", 450, Duration::from_secs(30)).await;
    let other = h.backend(&ns, TTL).await;
    let t0 = Instant::now();
    let waits: Vec<_> = watched
        .iter()
        .map(|id| {
            let (other, id) = (Arc::clone(&other), *id);
            tokio::spawn(async move { other.wait(id, Duration::from_secs(20)).await.unwrap() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let statuses = got.iter().map(done).collect();
    b.record_and_ack(&*k, statuses, got.iter().map(|d| d.receipt.clone()).collect()).await.unwrap();
    for w in waits {
        assert_eq!(w.await.unwrap().unwrap().state, TaskState::Succeeded, "{}", h.name());
    }
    assert!(t0.elapsed() < Duration::from_secs(3), "{}: woken by the write, not a re-check", h.name());
    assert_eq!(b.counts("q").await.unwrap(), counts(0, 0, 0, 0), "{}", h.name());
}

async fn counts_follow_every_kind_of_write(h: &impl Harness) {
    let (b, k, _) = pair(h).await;
    let mut delayed = env("q", 100);
    delayed.not_before = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    let envs: Vec<Envelope> = (0..6).map(|n| env("q", n)).chain([delayed]).collect();
    b.record_and_publish(&*k, queued(&envs), envs).await.unwrap();
    assert_eq!(b.counts("q").await.unwrap(), counts(6, 1, 0, 0), "{}: published", h.name());

    let short = consume_n(&*b, "q", 1, Duration::from_millis(200)).await.remove(0);
    let mut long = consume_n(&*b, "q", 4, Duration::from_secs(30)).await;
    assert_eq!(b.counts("q").await.unwrap(), counts(1, 1, 5, 0), "{}: leased", h.name());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(b.counts("q").await.unwrap(), counts(2, 1, 4, 0), "{}: a lease expired", h.name());
    assert!(b.extend_lease(&short.receipt, Duration::from_secs(30)).await.is_ok());

    let to_dlq = long.pop().unwrap();
    let env_dlq = (*to_dlq.envelope).clone();
    assert!(b.dead_letter(to_dlq.receipt, env_dlq, "test", "dead".into()).await.unwrap());
    let requeued = long.pop().unwrap();
    assert!(b.nack(requeued.receipt, true).await.unwrap());
    let moved = long.pop().unwrap();
    let mut elsewhere = (*moved.envelope).clone();
    elsewhere.queue = "other".to_owned();
    assert!(b.retry(moved.receipt, elsewhere).await.unwrap());
    assert_eq!(b.counts("q").await.unwrap(), counts(3, 1, 1, 1), "{}: dlq, requeue, move", h.name());
    assert_eq!(b.counts("other").await.unwrap(), counts(1, 0, 0, 0), "{}: moved here", h.name());

    let last = long.pop().unwrap();
    b.record_and_ack(&*k, vec![done(&last)], vec![last.receipt]).await.unwrap();
    assert_eq!(b.counts("q").await.unwrap(), counts(3, 1, 0, 1), "{}: acked", h.name());
    // The two ready rows and the expired lease.
    let mut rest = consume_n(&*b, "q", 3, Duration::from_secs(30)).await;
    assert_eq!(b.counts("q").await.unwrap(), counts(0, 1, 3, 1), "{}: all due leased", h.name());
    assert!(b.nack(rest.pop().unwrap().receipt, false).await.unwrap());
    assert!(b.nack(rest.pop().unwrap().receipt, true).await.unwrap());
    assert_eq!(b.counts("q").await.unwrap(), counts(1, 1, 1, 1), "{}: dropped, requeued", h.name());
    assert_eq!(b.purge("q").await.unwrap(), 2);
    assert_eq!(b.counts("q").await.unwrap(), counts(0, 0, 1, 1), "{}: purged", h.name());
}

macro_rules! combined_tests {
    ($module:ident, $harness:expr) => {
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn publish_record_and_ack_round_trip() {
                super::publish_record_and_ack_round_trip(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stale_receipt_records_but_does_not_finish() {
                super::stale_receipt_records_but_does_not_finish(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn records_stay_fenced() {
                super::records_stay_fenced(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn waiters_wake_for_a_big_batch() {
                super::waiters_wake_for_a_big_batch(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn counts_follow_every_kind_of_write() {
                super::counts_follow_every_kind_of_write(&$harness).await;
            }
        }
    };
}

combined_tests!(postgres, PgHarness::new());
combined_tests!(sqlite, SqliteHarness::new());
