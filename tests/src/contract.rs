//! The checks. Each takes a harness and a fresh namespace; timing bounds are generous.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use stem::backend::{
    GroupCounts, MemberOutcome, MemberRecord, Progress, TaskFailure, TaskState, TaskStatus, WorkerHeartbeat,
};
use stem::broker::{Broker, ConsumeRequest, Delivery};
use stem::{Envelope, TaskId};
use tokio::time::Instant;

use crate::{Harness, namespace};

const TTL: Duration = Duration::from_secs(3600);

fn env(queue: &str, n: i64) -> Envelope {
    let mut e = Envelope::new("contract.task", json!({ "n": n }));
    e.queue = queue.to_owned();
    e
}

fn req(queues: &[&str], max: usize, lease: Duration, wait: Duration) -> ConsumeRequest {
    ConsumeRequest {
        queues: queues.iter().map(|q| (*q).to_owned()).collect(),
        max,
        lease,
        wait,
        consumer: format!("c-{}", uuid::Uuid::now_v7().simple()),
    }
}

fn n_of(d: &Delivery) -> i64 {
    d.envelope.args["n"].as_i64().unwrap()
}

async fn broker(h: &impl Harness) -> Arc<dyn Broker> {
    h.broker(&namespace()).await
}

/// Consume until `want` deliveries arrived or `within` passed.
async fn consume_n(b: &dyn Broker, r: &ConsumeRequest, want: usize, within: Duration) -> Vec<Delivery> {
    let give_up = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < give_up {
        let mut r = r.clone();
        r.max = want - out.len();
        r.wait = give_up.saturating_duration_since(Instant::now()).min(Duration::from_millis(500));
        out.extend(b.consume(&r).await.unwrap());
    }
    out
}

pub async fn publish_consume_ack(h: &impl Harness) {
    let b = broker(h).await;
    b.publish((0..3).map(|n| env("q", n)).collect()).await.unwrap();
    assert_eq!(b.counts("q").await.unwrap().pending, 3, "{}", h.name());
    let r = req(&["q"], 10, Duration::from_secs(30), Duration::from_secs(2));
    let got = consume_n(&*b, &r, 3, Duration::from_secs(5)).await;
    assert_eq!(got.iter().map(n_of).collect::<Vec<_>>(), vec![0, 1, 2], "FIFO within a priority");
    assert!(got.iter().all(|d| !d.redelivered));
    let counts = b.counts("q").await.unwrap();
    assert_eq!((counts.pending, counts.in_flight), (0, 3));
    b.ack(got.into_iter().map(|d| d.receipt).collect()).await.unwrap();
    let counts = b.counts("q").await.unwrap();
    assert_eq!((counts.pending, counts.in_flight), (0, 0));
    let again =
        b.consume(&req(&["q"], 10, Duration::from_secs(30), Duration::from_millis(200))).await.unwrap();
    assert!(again.is_empty(), "acked deliveries never come back");
}

/// The producer's and the worker's combined calls (`record_and_publish`, `record_and_ack`),
/// on a broker and backend of the same namespace, as an adapter's `connect` builds them.
pub async fn combined_record_publish_and_ack(h: &impl Harness) {
    let ns = namespace();
    let b = h.broker(&ns).await;
    let k = h.backend(&ns, TTL).await;
    let envs = vec![env("q", 0), env("q", 1)];
    let queued: Vec<_> = envs.iter().map(|e| TaskStatus::for_envelope(e, TaskState::Queued)).collect();
    b.record_and_publish(&*k, queued.clone(), envs.clone()).await.unwrap();
    for e in &envs {
        assert_eq!(
            k.get(e.id).await.unwrap().unwrap().state,
            TaskState::Queued,
            "{}: queued recorded",
            h.name()
        );
    }
    let r = req(&["q"], 10, Duration::from_secs(30), Duration::from_secs(2));
    let got = consume_n(&*b, &r, 2, Duration::from_secs(5)).await;
    let first = got.iter().find(|d| d.envelope.id == envs[0].id).unwrap();
    let mut done = TaskStatus::for_envelope(&first.envelope, TaskState::Succeeded);
    done.result = Some(json!("ok"));
    b.record_and_ack(&*k, vec![done.clone()], vec![first.receipt.clone()]).await.unwrap();
    assert_eq!(
        k.get(envs[0].id).await.unwrap().unwrap().result,
        Some(json!("ok")),
        "{}: outcome stored",
        h.name()
    );
    let counts = b.counts("q").await.unwrap();
    assert_eq!(
        (counts.pending, counts.in_flight),
        (0, 1),
        "{}: only the acked delivery is finished",
        h.name()
    );

    // The same id enqueued again: its `queued` record never replaces the stored outcome, and
    // the envelope is delivered again.
    b.record_and_publish(&*k, vec![queued[0].clone()], vec![envs[0].clone()]).await.unwrap();
    assert_eq!(
        k.get(envs[0].id).await.unwrap().unwrap().state,
        TaskState::Succeeded,
        "{}: a queued record never replaces an outcome",
        h.name()
    );
    let again = consume_n(&*b, &r, 1, Duration::from_secs(5)).await;
    assert_eq!(again[0].envelope.id, envs[0].id);
    // Both remaining deliveries finished in one call.
    let second = got.iter().find(|d| d.envelope.id == envs[1].id).unwrap();
    b.record_and_ack(&*k, Vec::new(), vec![second.receipt.clone(), again[0].receipt.clone()]).await.unwrap();
    let counts = b.counts("q").await.unwrap();
    assert_eq!((counts.pending, counts.in_flight), (0, 0), "{}", h.name());
}

pub async fn consume_blocks_until_publish(h: &impl Harness) {
    let b = broker(h).await;
    let b2 = Arc::clone(&b);
    let started = Instant::now();
    let waiter = tokio::spawn(async move {
        b2.consume(&req(&["q"], 1, Duration::from_secs(30), Duration::from_secs(10))).await.unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.publish(vec![env("q", 7)]).await.unwrap();
    let got = waiter.await.unwrap();
    assert_eq!(got.len(), 1, "a blocked consumer is woken by a publish");
    assert_eq!(n_of(&got[0]), 7);
    assert!(started.elapsed() < Duration::from_secs(5), "woken promptly, not at the end of its wait");
}

pub async fn nack_with_and_without_requeue(h: &impl Harness) {
    let b = broker(h).await;
    b.publish(vec![env("q", 1)]).await.unwrap();
    let r = req(&["q"], 1, Duration::from_secs(30), Duration::from_secs(2));
    let d = consume_n(&*b, &r, 1, Duration::from_secs(5)).await.remove(0);
    assert!(b.nack(d.receipt, true).await.unwrap());
    let d = consume_n(&*b, &r, 1, Duration::from_secs(5)).await.remove(0);
    assert!(d.redelivered, "a requeued delivery is marked redelivered");
    assert_eq!(n_of(&d), 1);
    assert!(b.nack(d.receipt.clone(), false).await.unwrap());
    assert!(!b.nack(d.receipt, false).await.unwrap(), "a finished receipt is refused");
    let counts = b.counts("q").await.unwrap();
    assert_eq!((counts.pending, counts.in_flight), (0, 0), "nack without requeue drops the task");
}

pub async fn lease_expiry_redelivers(h: &impl Harness) {
    let b = broker(h).await;
    b.publish(vec![env("q", 1)]).await.unwrap();
    let lease = Duration::from_millis(300);
    let first =
        consume_n(&*b, &req(&["q"], 1, lease, Duration::from_secs(2)), 1, Duration::from_secs(5)).await;
    assert_eq!(first.len(), 1);
    let t0 = Instant::now();
    // Not acked: the lease lapses and the task comes back.
    let again =
        consume_n(&*b, &req(&["q"], 1, lease, Duration::from_secs(5)), 1, Duration::from_secs(10)).await;
    assert_eq!(again.len(), 1, "{}: an expired lease is redelivered", h.name());
    assert!(t0.elapsed() >= Duration::from_millis(150), "not before the lease ran out");
    assert_eq!(again[0].envelope.id, first[0].envelope.id);
    assert!(again[0].redelivered);
    b.ack(vec![again[0].receipt.clone()]).await.unwrap();
    assert_eq!(b.counts("q").await.unwrap().in_flight, 0);
}

pub async fn stale_receipt_is_refused(h: &impl Harness) {
    let b = broker(h).await;
    b.publish(vec![env("q", 1)]).await.unwrap();
    let lease = Duration::from_millis(200);
    let old = consume_n(&*b, &req(&["q"], 1, lease, Duration::from_secs(2)), 1, Duration::from_secs(5))
        .await
        .remove(0);
    let new = consume_n(
        &*b,
        &req(&["q"], 1, Duration::from_secs(30), Duration::from_secs(5)),
        1,
        Duration::from_secs(10),
    )
    .await
    .remove(0);
    assert_eq!(old.envelope.id, new.envelope.id);
    assert!(
        !b.extend_lease(&old.receipt, Duration::from_secs(30)).await.unwrap(),
        "stale lease cannot be renewed"
    );
    let mut retry = (*old.envelope).clone();
    retry.attempt += 1;
    assert!(!b.retry(old.receipt.clone(), retry).await.unwrap(), "stale receipt cannot schedule a retry");
    b.ack(vec![old.receipt]).await.unwrap();
    assert_eq!(b.counts("q").await.unwrap().in_flight, 1, "a stale ack does not finish the new delivery");
    b.ack(vec![new.receipt]).await.unwrap();
    let c = b.counts("q").await.unwrap();
    assert_eq!((c.pending, c.delayed, c.in_flight), (0, 0, 0));
}

pub async fn renewal_keeps_delivery_hidden_without_duplicating(h: &impl Harness) {
    let b = broker(h).await;
    b.publish(vec![env("q", 1)]).await.unwrap();
    // Renewed well before it lapses even when a renewal waits on a loaded machine; the loop
    // outlives several leases.
    let lease = Duration::from_secs(1);
    let d = consume_n(&*b, &req(&["q"], 1, lease, Duration::from_secs(2)), 1, Duration::from_secs(5))
        .await
        .remove(0);
    let until = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < until {
        assert!(b.extend_lease(&d.receipt, lease).await.unwrap(), "renewal of a live lease succeeds");
        let other = b.consume(&req(&["q"], 1, lease, Duration::from_millis(100))).await.unwrap();
        assert!(other.is_empty(), "a renewed delivery stays hidden");
    }
    let c = b.counts("q").await.unwrap();
    assert_eq!((c.pending, c.in_flight), (0, 1), "renewal never duplicates the task");
    b.ack(vec![d.receipt]).await.unwrap();
    assert!(b.consume(&req(&["q"], 1, lease, Duration::from_millis(700))).await.unwrap().is_empty());
}

pub async fn delayed_delivery_waits_in_the_store(h: &impl Harness) {
    let b = broker(h).await;
    let mut e = env("q", 1);
    e.not_before = Some(Utc::now() + chrono::Duration::milliseconds(800));
    b.publish(vec![e]).await.unwrap();
    let c = b.counts("q").await.unwrap();
    assert_eq!((c.pending, c.delayed), (0, 1), "a future task is held by the store, not delivered");
    let t0 = Instant::now();
    let early =
        b.consume(&req(&["q"], 1, Duration::from_secs(30), Duration::from_millis(200))).await.unwrap();
    assert!(early.is_empty());
    let got = consume_n(
        &*b,
        &req(&["q"], 1, Duration::from_secs(30), Duration::from_secs(5)),
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(got.len(), 1);
    assert!(t0.elapsed() >= Duration::from_millis(500), "delivered only when due");
    assert!(t0.elapsed() < Duration::from_secs(6), "delivered promptly once due");
}

pub async fn retry_replaces_delivery_with_delayed_envelope(h: &impl Harness) {
    let b = broker(h).await;
    b.publish(vec![env("q", 1)]).await.unwrap();
    let r = req(&["q"], 1, Duration::from_secs(30), Duration::from_secs(2));
    let d = consume_n(&*b, &r, 1, Duration::from_secs(5)).await.remove(0);
    let mut next = (*d.envelope).clone();
    next.attempt = 1;
    next.not_before = Some(Utc::now() + chrono::Duration::milliseconds(500));
    assert!(b.retry(d.receipt, next).await.unwrap());
    let c = b.counts("q").await.unwrap();
    assert_eq!((c.pending, c.delayed, c.in_flight), (0, 1, 0));
    let again = consume_n(&*b, &r, 1, Duration::from_secs(5)).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].envelope.attempt, 1);
    assert_eq!(again[0].envelope.id, d.envelope.id);
}

pub async fn priorities_order_delivery(h: &impl Harness) {
    let b = broker(h).await;
    let mut envs = Vec::new();
    for (n, p) in [(0, 0u8), (1, 5), (2, 9), (3, 5), (4, 3), (5, 9)] {
        let mut e = env("q", n);
        e.priority = p;
        envs.push(e);
    }
    b.publish(envs).await.unwrap();
    let got = consume_n(
        &*b,
        &req(&["q"], 6, Duration::from_secs(30), Duration::from_secs(2)),
        6,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        got.iter().map(n_of).collect::<Vec<_>>(),
        vec![2, 5, 1, 3, 4, 0],
        "{}: higher priority first, FIFO within a priority",
        h.name()
    );
}

pub async fn queues_are_separate(h: &impl Harness) {
    let b = broker(h).await;
    b.publish(vec![env("a", 1), env("b", 2)]).await.unwrap();
    let got = consume_n(
        &*b,
        &req(&["a"], 5, Duration::from_secs(30), Duration::from_secs(1)),
        5,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(got.iter().map(n_of).collect::<Vec<_>>(), vec![1]);
    let got_b = consume_n(
        &*b,
        &req(&["a", "b"], 5, Duration::from_secs(30), Duration::from_secs(1)),
        1,
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(got_b.iter().map(n_of).collect::<Vec<_>>(), vec![2]);
}

pub async fn dead_letter_lifecycle(h: &impl Harness) {
    let b = broker(h).await;
    b.publish(vec![env("q", 1), env("q", 2)]).await.unwrap();
    let r = req(&["q"], 2, Duration::from_secs(30), Duration::from_secs(2));
    let got = consume_n(&*b, &r, 2, Duration::from_secs(5)).await;
    for d in got {
        let mut e = (*d.envelope).clone();
        e.attempt = 3;
        let detail = format!("boom {}", n_of(&d));
        assert!(b.dead_letter(d.receipt, e, "max-retries-exceeded", detail).await.unwrap());
    }
    let c = b.counts("q").await.unwrap();
    assert_eq!((c.pending, c.in_flight, c.dead), (0, 0, 2));
    let list = b.dlq_list("q", 0, 10).await.unwrap();
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|d| d.reason == "max-retries-exceeded" && d.queue == "q"));
    assert_eq!(list[0].detail, "boom 1");
    let one = b.dlq_get("q", &list[1].id).await.unwrap().expect("entry by id");
    assert_eq!(one.envelope.as_ref().unwrap().args["n"], 2);
    assert_eq!(b.dlq_list("q", 1, 10).await.unwrap().len(), 1, "offset pages");
    // Replay one with a delay: it waits in the store, then comes back with fresh retries.
    let replayed =
        b.dlq_replay("q", std::slice::from_ref(&list[0].id), Some(Duration::from_millis(400))).await.unwrap();
    assert_eq!(replayed, 1);
    let c = b.counts("q").await.unwrap();
    assert_eq!((c.delayed, c.dead), (1, 1));
    let back = consume_n(
        &*b,
        &req(&["q"], 1, Duration::from_secs(30), Duration::from_secs(3)),
        1,
        Duration::from_secs(6),
    )
    .await;
    assert_eq!(back.len(), 1);
    assert_eq!(n_of(&back[0]), 1);
    assert_eq!(back[0].envelope.attempt, 0, "replay starts over");
    assert_eq!(b.dlq_purge("q").await.unwrap(), 1);
    assert!(b.dlq_list("q", 0, 10).await.unwrap().is_empty());
    assert!(b.dlq_get("q", &list[1].id).await.unwrap().is_none());
}

pub async fn purge_drops_pending_and_delayed(h: &impl Harness) {
    let b = broker(h).await;
    let mut later = env("q", 9);
    later.not_before = Some(Utc::now() + chrono::Duration::seconds(60));
    b.publish(vec![env("q", 1), env("q", 2), later, env("other", 3)]).await.unwrap();
    assert_eq!(b.purge("q").await.unwrap(), 3);
    let c = b.counts("q").await.unwrap();
    assert_eq!((c.pending, c.delayed), (0, 0));
    assert_eq!(b.counts("other").await.unwrap().pending, 1, "other queues untouched");
}

pub async fn broadcast_reaches_every_subscriber_once(h: &impl Harness) {
    let b = broker(h).await;
    b.subscribe("control", "w1").await.unwrap();
    b.subscribe("control", "w2").await.unwrap();
    b.broadcast("control", env("control", 1)).await.unwrap();
    b.broadcast("control", env("control", 2)).await.unwrap();
    b.subscribe("control", "late").await.unwrap();
    for sub in ["w1", "w2"] {
        let mut got = Vec::new();
        let give_up = Instant::now() + Duration::from_secs(5);
        while got.len() < 2 && Instant::now() < give_up {
            got.extend(b.consume_broadcast("control", sub, 10, Duration::from_millis(500)).await.unwrap());
        }
        let ns: Vec<_> = got.iter().map(|e| e.args["n"].as_i64().unwrap()).collect();
        assert_eq!(ns, vec![1, 2], "{sub} gets each message once, in order");
        let more = b.consume_broadcast("control", sub, 10, Duration::from_millis(200)).await.unwrap();
        assert!(more.is_empty(), "{sub} never gets a message twice");
    }
    let late = b.consume_broadcast("control", "late", 10, Duration::from_millis(200)).await.unwrap();
    assert!(late.is_empty(), "a subscriber only sees messages published after it subscribed");
}

pub async fn namespaces_are_isolated(h: &impl Harness) {
    let (ns1, ns2) = (namespace(), namespace());
    let b1 = h.broker(&ns1).await;
    let b2 = h.broker(&ns2).await;
    b1.publish(vec![env("q", 1)]).await.unwrap();
    assert!(
        b2.consume(&req(&["q"], 1, Duration::from_secs(30), Duration::from_millis(200)))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(b2.counts("q").await.unwrap().pending, 0);
    let same = h.broker(&ns1).await;
    assert_eq!(same.counts("q").await.unwrap().pending, 1, "the same namespace sees the same data");
    let k1 = h.backend(&ns1, TTL).await;
    let k2 = h.backend(&ns2, TTL).await;
    let s = status(TaskState::Queued, 0);
    k1.set(vec![s.clone()]).await.unwrap();
    assert!(k2.get(s.id).await.unwrap().is_none());
}

fn status(state: TaskState, attempt: u32) -> TaskStatus {
    let mut e = Envelope::new("contract.task", json!({}));
    e.attempt = attempt;
    TaskStatus::for_envelope(&e, state)
}

pub async fn backend_round_trip_and_fencing(h: &impl Harness) {
    let k = h.backend(&namespace(), TTL).await;
    let mut s = status(TaskState::Running, 1);
    s.meta.insert("tenant".into(), json!("acme"));
    k.set(vec![s.clone()]).await.unwrap();
    let got = k.get(s.id).await.unwrap().unwrap();
    assert_eq!(got, s, "{}: round trip", h.name());
    let mut done = s.clone();
    done.state = TaskState::Succeeded;
    done.result = Some(json!({"ok": [1, 2]}));
    let mut stale = s.clone();
    stale.attempt = 0;
    stale.state = TaskState::Failed;
    stale.error = Some(TaskFailure::new("boom", "stale", true));
    let mut late_running = s.clone();
    late_running.updated_at = Utc::now();
    k.set(vec![done.clone(), stale, late_running]).await.unwrap();
    let got = k.get(s.id).await.unwrap().unwrap();
    assert_eq!(got.state, TaskState::Succeeded, "older attempts and late non-terminal writes are fenced out");
    assert_eq!(got.result, done.result);
    k.forget(s.id).await.unwrap();
    assert!(k.get(s.id).await.unwrap().is_none());
}

pub async fn backend_ttl_expires_records(h: &impl Harness) {
    let ns = namespace();
    let k = h.backend(&ns, Duration::from_secs(1)).await;
    let s = status(TaskState::Succeeded, 0);
    k.set(vec![s.clone()]).await.unwrap();
    assert!(k.get(s.id).await.unwrap().is_some());
    let give_up = Instant::now() + Duration::from_secs(6);
    while k.get(s.id).await.unwrap().is_some() {
        assert!(Instant::now() < give_up, "{}: record outlived its TTL", h.name());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn backend_wait_wakes_on_completion_from_another_handle(h: &impl Harness) {
    let ns = namespace();
    let waiter_side = h.backend(&ns, TTL).await;
    let writer_side = h.backend(&ns, TTL).await;
    let s = status(TaskState::Queued, 0);
    waiter_side.set(vec![s.clone()]).await.unwrap();
    let id = s.id;
    let t0 = Instant::now();
    let waiting = tokio::spawn(async move { waiter_side.wait(id, Duration::from_secs(20)).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut done = s.clone();
    done.state = TaskState::Succeeded;
    done.result = Some(json!(42));
    writer_side.set(vec![done]).await.unwrap();
    let got = waiting.await.unwrap().unwrap();
    assert_eq!(got.state, TaskState::Succeeded);
    assert_eq!(got.result, Some(json!(42)));
    assert!(t0.elapsed() < Duration::from_secs(5), "woken by the write, not by its timeout");
    // Already terminal: returns at once.
    let t1 = Instant::now();
    let k = h.backend(&ns, TTL).await;
    assert_eq!(k.wait(id, Duration::from_secs(20)).await.unwrap().unwrap().state, TaskState::Succeeded);
    assert!(t1.elapsed() < Duration::from_secs(2));
}

pub async fn backend_wait_times_out_with_latest(h: &impl Harness) {
    let k = h.backend(&namespace(), TTL).await;
    let s = status(TaskState::Running, 0);
    k.set(vec![s.clone()]).await.unwrap();
    let t0 = Instant::now();
    let got = k.wait(s.id, Duration::from_millis(300)).await.unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(250));
    assert_eq!(got.map(|s| s.state), Some(TaskState::Running));
    assert!(k.wait(TaskId::new(), Duration::from_millis(100)).await.unwrap().is_none());
}

pub async fn backend_progress_is_stored(h: &impl Harness) {
    let k = h.backend(&namespace(), TTL).await;
    let s = status(TaskState::Running, 0);
    k.set(vec![s.clone()]).await.unwrap();
    k.progress(s.id, Progress { fraction: 0.5, data: Some(json!({"step": "render"})), at: Utc::now() })
        .await
        .unwrap();
    let got = k.get(s.id).await.unwrap().unwrap();
    let p = got.progress.expect("progress stored");
    assert!((p.fraction - 0.5).abs() < 1e-9);
    assert_eq!(p.data, Some(json!({"step": "render"})));
    let mut done = s.clone();
    done.state = TaskState::Succeeded;
    k.set(vec![done]).await.unwrap();
    assert!(k.get(s.id).await.unwrap().unwrap().progress.is_some(), "progress survives the final write");
}

fn outcome(state: TaskState, n: i64) -> MemberOutcome {
    MemberOutcome {
        task_id: TaskId::new(),
        state,
        result: (state == TaskState::Succeeded).then(|| json!(n)),
        error: (state != TaskState::Succeeded).then(|| TaskFailure::new("boom", "failed", false)),
    }
}

pub async fn group_counts_are_idempotent_per_member(h: &impl Harness) {
    let k = h.backend(&namespace(), TTL).await;
    let g = TaskId::new();
    k.group_init(g, 3).await.unwrap();
    k.group_init(g, 3).await.unwrap();
    let c = k.group_record(g, 2, outcome(TaskState::Succeeded, 20)).await.unwrap();
    assert_eq!(c, GroupCounts { total: 3, succeeded: 1, failed: 0 });
    let c = k.group_record(g, 2, outcome(TaskState::Succeeded, 99)).await.unwrap();
    assert_eq!(c.completed(), 1, "recording a member twice counts once");
    k.group_record(g, 0, outcome(TaskState::Failed, 0)).await.unwrap();
    let c = k.group_record(g, 1, outcome(TaskState::Succeeded, 10)).await.unwrap();
    assert_eq!(c, GroupCounts { total: 3, succeeded: 2, failed: 1 });
    assert!(c.is_done());
    let state = k.group_get(g).await.unwrap().unwrap();
    let results: Vec<_> = state.members.iter().map(|m| m.as_ref().and_then(|m| m.result.clone())).collect();
    assert_eq!(
        results,
        vec![None, Some(json!(10)), Some(json!(20))],
        "results kept in member order, first write wins"
    );
    assert!(
        k.group_record(TaskId::new(), 0, outcome(TaskState::Succeeded, 1)).await.is_err(),
        "unknown group"
    );
}

/// Members recorded at the same time from separate handles (every index twice, as a
/// redelivery would): each member counts once, and at least one of the calls returns the
/// group complete, so a chord is always carried on.
pub async fn concurrent_group_records_see_the_group_complete(h: &impl Harness) {
    let ns = namespace();
    let k = h.backend(&ns, TTL).await;
    let g = TaskId::new();
    k.group_init(g, 40).await.unwrap();
    let mut joins = Vec::new();
    for index in (0..40).chain(0..40) {
        let k = h.backend(&ns, TTL).await;
        let state = if index == 17 { TaskState::Failed } else { TaskState::Succeeded };
        joins.push(tokio::spawn(async move { k.group_record(g, index, outcome(state, index as i64)).await }));
    }
    let mut complete = 0;
    for j in joins {
        let c = j.await.unwrap().unwrap();
        assert!(c.completed() <= 40, "{}: {c:?}", h.name());
        complete += usize::from(c.is_done());
    }
    assert!(complete >= 1, "{}: some call must see the group complete", h.name());
    let state = k.group_get(g).await.unwrap().unwrap();
    assert_eq!(state.counts, GroupCounts { total: 40, succeeded: 39, failed: 1 }, "{}", h.name());
    assert!(state.members.iter().all(Option::is_some));
    assert_eq!(state.members[5].as_ref().and_then(|m| m.result.clone()), Some(json!(5)));
}

fn member(group: TaskId, index: usize, state: TaskState, n: i64) -> MemberRecord {
    MemberRecord { group, index, outcome: outcome(state, n) }
}

/// `group_record_many` applies each record as `group_record` would, across groups in one
/// call: one result per record in order, a bad record's error is its own, the first outcome
/// per index wins and counts once (within a call and across calls), and the record that
/// completes a group sees it complete.
pub async fn group_record_many_records_each_member_once(h: &impl Harness) {
    let k = h.backend(&namespace(), TTL).await;
    let (g1, g2) = (TaskId::new(), TaskId::new());
    k.group_init(g1, 3).await.unwrap();
    k.group_init(g2, 2).await.unwrap();
    assert!(k.group_record_many(Vec::new()).await.unwrap().is_empty(), "{}: empty batch", h.name());

    let results = k
        .group_record_many(vec![
            member(g1, 0, TaskState::Succeeded, 0),
            member(g2, 1, TaskState::Failed, 0),
            member(TaskId::new(), 0, TaskState::Succeeded, 0),
            member(g1, 3, TaskState::Succeeded, 0),
            member(g1, 1, TaskState::Succeeded, 10),
            member(g2, 0, TaskState::Succeeded, 20),
        ])
        .await
        .unwrap();
    assert_eq!(results.len(), 6, "{}: one result per record", h.name());
    assert!(results[2].is_err(), "{}: unknown group", h.name());
    assert!(results[3].is_err(), "{}: index out of range", h.name());
    let ok: Vec<GroupCounts> = [0, 1, 4, 5].iter().map(|&i| *results[i].as_ref().unwrap()).collect();
    for (c, total) in ok.iter().zip([3, 2, 3, 2]) {
        assert_eq!(c.total, total, "{}: {c:?}", h.name());
        assert!(c.completed() >= 1, "{}: counts are read after the record: {c:?}", h.name());
    }
    assert!(ok[1].is_done() || ok[3].is_done(), "{}: a record completing g2 sees it complete", h.name());
    assert!(!ok[0].is_done() && !ok[2].is_done(), "{}: g1 has a member missing", h.name());

    // A redelivery records the same indexes again (with other outcomes), plus the last one.
    let again = k
        .group_record_many(vec![
            member(g1, 1, TaskState::Failed, 0),
            member(g1, 2, TaskState::Succeeded, 30),
            member(g2, 1, TaskState::Succeeded, 99),
        ])
        .await
        .unwrap();
    let again: Vec<GroupCounts> = again.into_iter().map(Result::unwrap).collect();
    assert!(again[1].is_done(), "{}: the record completing g1 sees it complete", h.name());
    assert_eq!(again[2], GroupCounts { total: 2, succeeded: 1, failed: 1 }, "{}", h.name());

    let s1 = k.group_get(g1).await.unwrap().unwrap();
    assert_eq!(s1.counts, GroupCounts { total: 3, succeeded: 3, failed: 0 }, "{}: counted once", h.name());
    let results: Vec<_> = s1.members.iter().map(|m| m.as_ref().and_then(|m| m.result.clone())).collect();
    assert_eq!(
        results,
        vec![Some(json!(0)), Some(json!(10)), Some(json!(30))],
        "{}: first write wins",
        h.name()
    );
    let s2 = k.group_get(g2).await.unwrap().unwrap();
    assert_eq!(s2.counts, GroupCounts { total: 2, succeeded: 1, failed: 1 }, "{}", h.name());
    assert_eq!(s2.members[1].as_ref().map(|m| m.state), Some(TaskState::Failed), "{}", h.name());

    // One big call with every index twice (as concurrent redeliveries would send them).
    let g3 = TaskId::new();
    k.group_init(g3, 300).await.unwrap();
    let records = (0..300).chain(0..300).map(|i| member(g3, i, TaskState::Succeeded, i as i64)).collect();
    let results = k.group_record_many(records).await.unwrap();
    assert_eq!(results.len(), 600);
    let counts: Vec<GroupCounts> = results.into_iter().map(Result::unwrap).collect();
    assert!(counts.iter().all(|c| c.completed() <= 300), "{}", h.name());
    assert!(counts.iter().any(GroupCounts::is_done), "{}: some record sees g3 complete", h.name());
    let s3 = k.group_get(g3).await.unwrap().unwrap();
    assert_eq!(s3.counts, GroupCounts { total: 300, succeeded: 300, failed: 0 }, "{}", h.name());
    assert_eq!(s3.members[123].as_ref().and_then(|m| m.result.clone()), Some(json!(123)));
}

pub async fn chord_claim_has_exactly_one_winner(h: &impl Harness) {
    let ns = namespace();
    let k = h.backend(&ns, TTL).await;
    let g = TaskId::new();
    k.group_init(g, 50).await.unwrap();
    let mut joins = Vec::new();
    for _ in 0..50 {
        let k = h.backend(&ns, TTL).await;
        joins.push(tokio::spawn(async move { k.chord_claim(g).await.unwrap() }));
    }
    let mut winners = 0;
    for j in joins {
        winners += usize::from(j.await.unwrap());
    }
    assert_eq!(winners, 1, "{}: exactly one of 50 concurrent claimers wins", h.name());
    assert!(!k.chord_claim(g).await.unwrap());
    assert!(k.group_get(g).await.unwrap().unwrap().claimed);
}

pub async fn heartbeats_expire(h: &impl Harness) {
    let k = h.backend(&namespace(), TTL).await;
    let hb = |id: &str| WorkerHeartbeat {
        worker_id: id.to_owned(),
        hostname: "host".into(),
        pid: 1,
        queues: vec!["default".into()],
        concurrency: 4,
        in_flight: 0,
        processed: 0,
        started_at: Utc::now(),
        at: Utc::now(),
    };
    k.heartbeat(hb("short"), Duration::from_millis(500)).await.unwrap();
    k.heartbeat(hb("long"), Duration::from_secs(60)).await.unwrap();
    let ids: HashSet<_> = k.workers().await.unwrap().into_iter().map(|w| w.worker_id).collect();
    assert_eq!(ids, HashSet::from(["short".to_owned(), "long".to_owned()]));
    let give_up = Instant::now() + Duration::from_secs(6);
    loop {
        let ids: Vec<_> = k.workers().await.unwrap().into_iter().map(|w| w.worker_id).collect();
        if ids == ["long"] {
            break;
        }
        assert!(Instant::now() < give_up, "{}: heartbeat outlived its TTL: {ids:?}", h.name());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
