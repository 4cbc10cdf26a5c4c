//! Redis-only broker and result backend behaviour beyond the shared contract (needs Redis;
//! see `STEM_TEST_REDIS_URL`, default `redis://127.0.0.1:6379/0`).

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use stem::Envelope;
use stem::backend::{ResultBackend, TaskState, TaskStatus};
use stem::broker::{Broker, ConsumeRequest, REASON_MALFORMED};
use stem_adapters::redis::{RedisBackend, RedisBroker, RedisConnection, RedisOptions};

/// A connection in a fresh namespace, the namespace, and a plain client for raw commands.
async fn connect() -> (RedisConnection, String, redis::Client) {
    let url = std::env::var("STEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let ns = format!("t{}", uuid::Uuid::now_v7().simple());
    let parsed = stem_adapters::url::parse(&format!("{url}?ns={ns}")).unwrap();
    let conn = RedisConnection::connect(&parsed, RedisOptions::default())
        .await
        .unwrap_or_else(|e| panic!("these tests need Redis at {url}: {e}"));
    (conn, ns, redis::Client::open(url.as_str()).unwrap())
}

async fn broker() -> (RedisBroker, redis::Client) {
    let (conn, ns, client) = connect().await;
    (RedisBroker::new(conn, &ns), client)
}

#[tokio::test]
async fn garbage_in_a_stream_is_dead_lettered_and_other_entries_still_arrive() {
    let (b, client) = broker().await;
    let mut e = Envelope::new("t", serde_json::json!({"n": 1}));
    e.queue = "q".into();
    b.publish(vec![e.clone()]).await.unwrap();
    let stream = b.keys().stream("q", 0);
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    for (field, value) in [("e", "not json"), ("e", r#"{"v": 99}"#), ("x", "no envelope field")] {
        redis::cmd("XADD").arg(&stream).arg("*").arg(field).arg(value).exec_async(&mut raw).await.unwrap();
    }
    let mut later = Envelope::new("t", serde_json::json!({"n": 2}));
    later.queue = "q".into();
    b.publish(vec![later.clone()]).await.unwrap();

    let req = ConsumeRequest {
        queues: vec!["q".into()],
        max: 10,
        lease: Duration::from_secs(30),
        wait: Duration::from_secs(1),
        consumer: "c".into(),
    };
    let mut got = Vec::new();
    for _ in 0..5 {
        got.extend(b.consume(&req).await.unwrap());
        if got.len() >= 2 {
            break;
        }
    }
    let ids: Vec<_> = got.iter().map(|d| d.envelope.id).collect();
    assert_eq!(ids, vec![e.id, later.id], "good entries are delivered in order around the garbage");
    let dead = b.dlq_list("q", 0, 10).await.unwrap();
    assert_eq!(dead.len(), 3);
    assert!(dead.iter().all(|d| d.reason == REASON_MALFORMED && d.envelope.is_none()));
    assert_eq!(dead[0].raw.as_deref(), Some("not json"));
    assert!(dead[2].raw.as_deref().unwrap().contains("no envelope field"));
    let c = b.counts("q").await.unwrap();
    assert_eq!((c.pending, c.in_flight, c.dead), (0, 2, 3));
}

fn env_at(queue: &str, n: u64, priority: u8) -> Envelope {
    let mut e = Envelope::new("t", serde_json::json!({ "n": n }));
    e.queue = queue.into();
    e.priority = priority;
    e
}

fn n_of(d: &stem::broker::Delivery) -> u64 {
    d.envelope.args["n"].as_u64().unwrap()
}

fn req(max: usize, lease: Duration) -> ConsumeRequest {
    ConsumeRequest {
        queues: vec!["q".into()],
        max,
        lease,
        wait: Duration::from_millis(500),
        consumer: "c".into(),
    }
}

/// Under a backlog on one priority, fetches skip the consume script; a task published at a
/// higher priority meanwhile is still served first, at the latest one fetch later.
#[tokio::test]
async fn a_new_priority_under_a_backlog_is_served_within_one_fetch() {
    let (b, _) = broker().await;
    b.publish((0..60).map(|n| env_at("q", n, 0)).collect()).await.unwrap();
    let lease = Duration::from_secs(30);
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.extend(b.consume(&req(10, lease)).await.unwrap().iter().map(n_of));
    }
    b.publish(vec![env_at("q", 1000, 9)]).await.unwrap();
    let first = b.consume(&req(10, lease)).await.unwrap();
    let second = b.consume(&req(10, lease)).await.unwrap();
    let got: Vec<u64> = first.iter().chain(&second).map(n_of).collect();
    let at = got.iter().position(|n| *n == 1000).expect("the priority-9 task is delivered");
    // First in the fetch that came through the script: this one, or the next.
    assert!(at == 0 || at == first.len(), "served by the fetch after the one that saw it: {got:?}");
    seen.extend(got.iter().filter(|n| **n != 1000));
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    assert_eq!(seen, sorted, "FIFO within priority 0");
}

/// While a consumer keeps fetching full batches, an expired lease of another consumer still
/// comes back (the script runs at least every quarter second), with a new token.
#[tokio::test]
async fn expired_leases_come_back_under_a_backlog() {
    let (b, _) = broker().await;
    b.publish((0..400).map(|n| env_at("q", n, 0)).collect()).await.unwrap();
    let mut short = req(1, Duration::from_millis(100));
    short.consumer = "dies".into();
    let lost = b.consume(&short).await.unwrap().remove(0);
    let t0 = std::time::Instant::now();
    let mut back = None;
    while back.is_none() && t0.elapsed() < Duration::from_secs(10) {
        let got = b.consume(&req(5, Duration::from_secs(30))).await.unwrap();
        assert!(!got.is_empty(), "the backlog lasts");
        back = got.into_iter().find(|d| d.envelope.id == lost.envelope.id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let back = back.expect("the expired lease is taken back while the backlog lasts");
    assert!(back.redelivered);
    assert!(back.receipt.lease > lost.receipt.lease, "a new token");
    b.ack(vec![lost.receipt]).await.unwrap();
    assert!(
        b.extend_lease(&back.receipt, Duration::from_secs(30)).await.unwrap(),
        "the stale ack did not finish the redelivery"
    );
    b.ack(vec![back.receipt]).await.unwrap();
}

/// Fetches that skip the script still honour an envelope's own lease (it moves to an owner
/// that says so) and still dead-letter garbage with a reason.
#[tokio::test]
async fn the_fast_path_keeps_own_leases_and_dead_letters_garbage() {
    let (b, client) = broker().await;
    b.publish((0..12).map(|n| env_at("q", n, 0)).collect()).await.unwrap();
    let stream = b.keys().stream("q", 0);
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("XADD").arg(&stream).arg("*").arg("e").arg("not json").exec_async(&mut raw).await.unwrap();
    let mut short = env_at("q", 100, 0);
    short.visibility_timeout = Some(Duration::from_millis(200));
    b.publish(vec![short.clone()]).await.unwrap();
    b.publish((12..40).map(|n| env_at("q", n, 0)).collect()).await.unwrap();

    let long = Duration::from_secs(30);
    // The first fetch runs the script; the next ones, under the backlog, are plain reads.
    let mut got = Vec::new();
    for _ in 0..3 {
        got.extend(b.consume(&req(10, long)).await.unwrap());
    }
    let first = got.iter().find(|d| d.envelope.id == short.id).expect("the short-lease task was fetched");
    assert_eq!(first.receipt.lease, 1);
    let dead = b.dlq_list("q", 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "the garbage entry is dead-lettered");
    assert_eq!((dead[0].reason.as_str(), dead[0].raw.as_deref()), (REASON_MALFORMED, Some("not json")));

    // Not acked: its own 200 ms lease lapses long before the consumer's 30 s one would.
    let t0 = std::time::Instant::now();
    let mut back = None;
    while back.is_none() && t0.elapsed() < Duration::from_secs(10) {
        back = b.consume(&req(10, long)).await.unwrap().into_iter().find(|d| d.envelope.id == short.id);
    }
    let back = back.expect("the envelope's own lease lapsed and it came back");
    assert!(back.redelivered && back.receipt.lease > first.receipt.lease);
    assert!(t0.elapsed() < Duration::from_secs(5), "back after its own lease, not the consumer's");
}

/// Once a plain read has emptied the busy stream, the next fetch blocks on the streams' ends
/// without asking the script. It still wakes for another priority and still serves a delayed
/// envelope that falls due meanwhile: the block never outlasts the quarter second within
/// which the script must run again, however long the fetch may wait.
#[tokio::test]
async fn a_consumer_that_emptied_its_stream_still_sees_other_priorities_and_delays() {
    let (b, _) = broker().await;
    let mut long = req(4, Duration::from_secs(30));
    long.wait = Duration::from_secs(10);
    let mut next = 0;
    // A full fetch (the script), then a plain read that takes the rest of the stream.
    let mut empty_the_stream = async |b: &RedisBroker| {
        b.publish((next..next + 5).map(|n| env_at("q", n, 0)).collect()).await.unwrap();
        let mut got: Vec<u64> = b.consume(&long).await.unwrap().iter().map(n_of).collect();
        got.extend(b.consume(&long).await.unwrap().iter().map(n_of));
        assert_eq!(got, (next..next + 5).collect::<Vec<_>>());
        next += 5;
    };

    // A delayed envelope that falls due while the consumer blocks.
    empty_the_stream(&b).await;
    let mut delayed = env_at("q", 100, 0);
    delayed.not_before = Some(chrono::Utc::now() + chrono::Duration::milliseconds(300));
    b.publish(vec![delayed]).await.unwrap();
    let t0 = std::time::Instant::now();
    let got = b.consume(&long).await.unwrap();
    assert_eq!(got.iter().map(n_of).collect::<Vec<_>>(), vec![100]);
    assert!(t0.elapsed() < Duration::from_secs(3), "promoted within the script's quarter second");

    // Another priority, published while the consumer blocks.
    empty_the_stream(&b).await;
    let b2 = b.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        b2.publish(vec![env_at("q", 200, 7)]).await.unwrap();
    });
    let t0 = std::time::Instant::now();
    let got = b.consume(&long).await.unwrap();
    assert_eq!(got.iter().map(n_of).collect::<Vec<_>>(), vec![200]);
    assert!(t0.elapsed() < Duration::from_secs(3), "woken, not left to the fetch's 10 s wait");
}

/// Many waiters whose completions race their own subscribe-then-read (some written before
/// the wait starts, some while it subscribes, some later) all get the terminal record, and
/// none of them leaves its completion channel subscribed.
#[tokio::test]
async fn racing_completions_reach_every_waiter_and_leave_no_subscription_behind() {
    let (conn, ns, client) = connect().await;
    let backend = Arc::new(RedisBackend::new(conn, &ns, Duration::from_secs(60)));

    let mut waits = Vec::new();
    for n in 0..200u64 {
        let env = Envelope::new("t", serde_json::json!({ "n": n }));
        let mut done = TaskStatus::for_envelope(&env, TaskState::Succeeded);
        done.result = Some(serde_json::json!(n));
        let (b, id) = (Arc::clone(&backend), env.id);
        let writer = Arc::clone(&backend);
        // Every third completion is written first; the others race the wait by a few µs.
        if n % 3 == 0 {
            writer.set(vec![done]).await.unwrap();
        } else {
            tokio::spawn(async move {
                if n % 3 == 2 {
                    tokio::task::yield_now().await;
                }
                writer.set(vec![done]).await.unwrap();
            });
        }
        waits.push(tokio::spawn(async move { (n, b.wait(id, Duration::from_secs(10)).await) }));
    }
    for w in waits {
        let (n, got) = w.await.unwrap();
        let status = got.unwrap().expect("a record");
        assert_eq!((status.state, status.result), (TaskState::Succeeded, Some(serde_json::json!(n))));
    }

    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let left: Vec<String> =
            redis::cmd("PUBSUB").arg("CHANNELS").arg(format!("{ns}:*")).query_async(&mut raw).await.unwrap();
        if left.is_empty() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "channels still subscribed: {}", left.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Entries of `stream` and the deliveries pending in its group.
async fn stream_sizes(raw: &mut redis::aio::MultiplexedConnection, stream: &str) -> (u64, u64) {
    let len: u64 = redis::cmd("XLEN").arg(stream).query_async(raw).await.unwrap();
    let pending: redis::Value =
        redis::cmd("XPENDING").arg(stream).arg("stem").query_async(raw).await.unwrap();
    let redis::Value::Array(summary) = pending else { panic!("XPENDING summary: {pending:?}") };
    let count = match summary.first() {
        Some(redis::Value::Int(n)) => u64::try_from(*n).unwrap(),
        other => panic!("XPENDING count: {other:?}"),
    };
    (len, count)
}

fn succeeded(env: &Envelope, result: serde_json::Value) -> TaskStatus {
    let mut s = TaskStatus::for_envelope(env, TaskState::Succeeded);
    s.result = Some(result);
    s
}

/// A finish well within its leases takes the plain-command path: terminal records stored and
/// announced to waiters, `running` records still fenced (never over an outcome, also when the
/// server has forgotten the scripts), and the entries acked and deleted.
#[tokio::test]
async fn a_finish_within_the_lease_stores_announces_and_removes_without_the_script() {
    let (conn, ns, client) = connect().await;
    let b = RedisBroker::new(conn.clone(), &ns);
    let backend = Arc::new(RedisBackend::new(conn, &ns, Duration::from_secs(60)));
    let envs: Vec<Envelope> = (0..3).map(|n| env_at("q", n, 0)).collect();
    let queued = envs.iter().map(|e| TaskStatus::for_envelope(e, TaskState::Queued)).collect();
    b.record_and_publish(&*backend, queued, envs.clone()).await.unwrap();
    let got = b.consume(&req(10, Duration::from_secs(60))).await.unwrap();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|d| d.receipt.held_until.is_some()), "the broker says how long the leases hold");
    let waiter = {
        let (backend, id) = (Arc::clone(&backend), envs[0].id);
        tokio::spawn(async move { backend.wait(id, Duration::from_secs(10)).await })
    };
    // A fourth task still running, reported in the same batch.
    let other = env_at("q", 99, 0);
    let mut statuses = vec![TaskStatus::for_envelope(&other, TaskState::Running)];
    statuses.extend(envs.iter().map(|e| succeeded(e, serde_json::json!(e.args["n"]))));
    let receipts = got.iter().map(|d| d.receipt.clone()).collect();

    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    // The server forgets every script: the running record must still be written.
    redis::cmd("SCRIPT").arg("FLUSH").exec_async(&mut raw).await.unwrap();
    b.record_and_ack(&*backend, statuses, receipts).await.unwrap();

    let woken = waiter.await.unwrap().unwrap().expect("the waiter sees the outcome");
    assert_eq!((woken.state, woken.result), (TaskState::Succeeded, Some(serde_json::json!(0))));
    for e in &envs {
        let s = backend.get(e.id).await.unwrap().unwrap();
        assert_eq!((s.state, s.result), (TaskState::Succeeded, Some(e.args["n"].clone())));
    }
    assert_eq!(backend.get(other.id).await.unwrap().unwrap().state, TaskState::Running);
    assert_eq!(stream_sizes(&mut raw, &b.keys().stream("q", 0)).await, (0, 0), "acked and deleted");

    // A late `running` record of a finished task is refused, on this path too.
    b.record_and_ack(&*backend, vec![TaskStatus::for_envelope(&envs[1], TaskState::Running)], Vec::new())
        .await
        .unwrap();
    assert_eq!(backend.get(envs[1].id).await.unwrap().unwrap().state, TaskState::Succeeded);
}

/// A broker and backend in a fresh namespace with one task published and leased (60 s): the
/// raw client, the envelope and the fetched deliveries.
async fn one_leased() -> (RedisBroker, RedisBackend, redis::Client, Envelope, Vec<stem::broker::Delivery>) {
    let (conn, ns, client) = connect().await;
    let b = RedisBroker::new(conn.clone(), &ns);
    let backend = RedisBackend::new(conn, &ns, Duration::from_secs(60));
    let env = env_at("q", 1, 0);
    b.publish(vec![env.clone()]).await.unwrap();
    let got = b.consume(&req(1, Duration::from_secs(60))).await.unwrap();
    (b, backend, client, env, got)
}

/// Progress reported while running is kept when the final record carries it, and the
/// separately stored report goes away with the plain write.
#[tokio::test]
async fn a_final_record_with_progress_replaces_the_stored_report() {
    let (b, backend, client, env, got) = one_leased().await;
    let progress = stem::backend::Progress { fraction: 0.5, data: None, at: chrono::Utc::now() };
    backend.progress(env.id, progress.clone()).await.unwrap();
    let mut done = succeeded(&env, serde_json::json!(1));
    done.progress = Some(progress.clone());
    b.record_and_ack(&backend, vec![done], vec![got[0].receipt.clone()]).await.unwrap();
    let s = backend.get(env.id).await.unwrap().unwrap();
    assert_eq!((s.state, s.progress), (TaskState::Succeeded, Some(progress)));
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let left: bool =
        redis::cmd("EXISTS").arg(backend.keys().progress(env.id)).query_async(&mut raw).await.unwrap();
    assert!(!left, "the separate progress key is removed");
}

/// A finish close to the end of a lease goes through the fencing script: a receipt whose
/// token is no longer the delivery's acks nothing.
#[tokio::test]
async fn a_finish_near_the_end_of_its_lease_is_fenced() {
    let (b, backend, client, env, got) = one_leased().await;
    let mut stale = got[0].receipt.clone();
    stale.lease += 1;
    stale.held_until = Some(std::time::Instant::now() + Duration::from_secs(1));
    b.record_and_ack(&backend, vec![succeeded(&env, serde_json::json!(1))], vec![stale]).await.unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    assert_eq!(stream_sizes(&mut raw, &b.keys().stream("q", 0)).await, (1, 1), "still pending");
    b.record_and_ack(&backend, Vec::new(), vec![got[0].receipt.clone()]).await.unwrap();
    assert_eq!(stream_sizes(&mut raw, &b.keys().stream("q", 0)).await, (0, 0));
}

/// Records of time-ordered ids live in slot hashes: `queued` ones in `rq`, every later state
/// in `rh`, a batch's records written with one `HSET`. Reads find them, the task's record in
/// `rh` supersedes its `queued` one and removes it, progress reported before any other record
/// is kept, progress beside a record in `rh` survives a later write that carries none, a
/// stale attempt cannot replace a record there, and `forget` removes both.
#[tokio::test]
async fn records_in_slot_hashes_behave_like_records_of_their_own() {
    let (conn, ns, client) = connect().await;
    let b = RedisBroker::new(conn.clone(), &ns);
    let backend = RedisBackend::new(conn, &ns, Duration::from_secs(60));
    let envs: Vec<Envelope> = (0..4).map(|n| env_at("q", n, 0)).collect();
    let queued = envs.iter().map(|e| TaskStatus::for_envelope(e, TaskState::Queued)).collect();
    b.record_and_publish(&backend, queued, envs.clone()).await.unwrap();
    let hash = backend.keys().queued(envs[0].id).expect("a time-ordered id");
    let records = backend.keys().record_slot(envs[0].id).expect("a time-ordered id");
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let ttl: i64 = redis::cmd("PTTL").arg(&hash).query_async(&mut raw).await.unwrap();
    assert!(ttl > 50_000, "the slot hash expires with the records' TTL: {ttl}");
    for e in &envs {
        assert_eq!(backend.get(e.id).await.unwrap().unwrap().state, TaskState::Queued);
    }

    let progress = stem::backend::Progress { fraction: 0.5, data: None, at: chrono::Utc::now() };
    backend.progress(envs[2].id, progress.clone()).await.unwrap();
    assert_eq!(backend.get(envs[2].id).await.unwrap().unwrap().progress, Some(progress.clone()));

    let got = b.consume(&req(1, Duration::from_secs(60))).await.unwrap();
    assert_eq!(got[0].envelope.id, envs[0].id);
    b.record_and_ack(&backend, vec![succeeded(&envs[0], serde_json::json!(0))], vec![got[0].receipt.clone()])
        .await
        .unwrap();
    assert_eq!(backend.get(envs[0].id).await.unwrap().unwrap().state, TaskState::Succeeded);
    let field = |id: stem::TaskId| id.to_string();
    let in_records: bool =
        redis::cmd("HEXISTS").arg(&records).arg(field(envs[0].id)).query_async(&mut raw).await.unwrap();
    assert!(in_records, "the outcome is a field of the record slot hash");
    let own: bool =
        redis::cmd("EXISTS").arg(backend.keys().record(envs[0].id)).query_async(&mut raw).await.unwrap();
    assert!(!own, "and not a key of its own");
    let ttl: i64 = redis::cmd("PTTL").arg(&records).query_async(&mut raw).await.unwrap();
    assert!(ttl > 50_000, "the record slot hash expires with the records' TTL: {ttl}");
    let left: bool =
        redis::cmd("HEXISTS").arg(&hash).arg(field(envs[0].id)).query_async(&mut raw).await.unwrap();
    assert!(!left, "the outcome's record removed the queued one");

    // A terminal record written outside a finish (a revoke, say) removes it as well.
    backend.set(vec![TaskStatus::for_envelope(&envs[1], TaskState::Cancelled)]).await.unwrap();
    assert_eq!(backend.get(envs[1].id).await.unwrap().unwrap().state, TaskState::Cancelled);

    // Progress beside a `running` record in `rh` outlives the write of the outcome.
    let mut running = TaskStatus::for_envelope(&envs[3], TaskState::Running);
    running.attempt = 1;
    backend.set(vec![running]).await.unwrap();
    backend.progress(envs[3].id, progress.clone()).await.unwrap();
    let mut done = succeeded(&envs[3], serde_json::json!(3));
    done.attempt = 1;
    backend.set(vec![done]).await.unwrap();
    let got = backend.get(envs[3].id).await.unwrap().unwrap();
    assert_eq!((got.state, got.progress), (TaskState::Succeeded, Some(progress)));
    // An older attempt never replaces it.
    backend.set(vec![TaskStatus::for_envelope(&envs[3], TaskState::Failed)]).await.unwrap();
    assert_eq!(backend.get(envs[3].id).await.unwrap().unwrap().state, TaskState::Succeeded);

    for e in &envs {
        backend.forget(e.id).await.unwrap();
        assert!(backend.get(e.id).await.unwrap().is_none());
        for hash in [backend.keys().queued(e.id).unwrap(), backend.keys().record_slot(e.id).unwrap()] {
            let left: bool =
                redis::cmd("HEXISTS").arg(hash).arg(field(e.id)).query_async(&mut raw).await.unwrap();
            assert!(!left, "nothing left for {}", e.id);
        }
    }
}

/// A task id that is not time-ordered keeps records of its own (`SET NX` for the first, the
/// fencing script after), with the same rules.
#[tokio::test]
async fn ids_that_are_not_time_ordered_keep_a_record_key_of_their_own() {
    let (conn, ns, client) = connect().await;
    let b = RedisBroker::new(conn.clone(), &ns);
    let backend = RedisBackend::new(conn, &ns, Duration::from_secs(60));
    let mut env = env_at("q", 0, 0);
    env.id = stem::TaskId(uuid::Uuid::new_v4());
    assert!(backend.keys().record_slot(env.id).is_none());
    b.record_and_publish(
        &backend,
        vec![TaskStatus::for_envelope(&env, TaskState::Queued)],
        vec![env.clone()],
    )
    .await
    .unwrap();
    let got = b.consume(&req(1, Duration::from_secs(60))).await.unwrap();
    assert_eq!(got[0].envelope.id, env.id);
    let progress = stem::backend::Progress { fraction: 0.25, data: None, at: chrono::Utc::now() };
    backend.progress(env.id, progress.clone()).await.unwrap();
    b.record_and_ack(&backend, vec![succeeded(&env, serde_json::json!(7))], vec![got[0].receipt.clone()])
        .await
        .unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let own: bool =
        redis::cmd("EXISTS").arg(backend.keys().record(env.id)).query_async(&mut raw).await.unwrap();
    assert!(own, "its record is its own key");
    let got = backend.get(env.id).await.unwrap().unwrap();
    assert_eq!((got.state, got.result), (TaskState::Succeeded, Some(serde_json::json!(7))));
    backend.set(vec![TaskStatus::for_envelope(&env, TaskState::Running)]).await.unwrap();
    assert_eq!(backend.get(env.id).await.unwrap().unwrap().state, TaskState::Succeeded, "fenced");
    backend.forget(env.id).await.unwrap();
    assert!(backend.get(env.id).await.unwrap().is_none());
}

/// A private `redis-server` on a free port (for tests that change server settings), stopped
/// on drop. Fails, never skips, when `redis-server` is not installed.
struct PrivateRedis {
    child: std::process::Child,
    port: u16,
}

impl PrivateRedis {
    fn start() -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("this test runs its own redis-server; install Redis (redis-server on PATH)");
        let server = PrivateRedis { child, port };
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(10), "private redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server that refuses writes for lack of memory refuses a plain finish as a whole: the
/// delivery stays leased (it is redelivered later), never acked without its record.
#[tokio::test]
async fn a_finish_refused_for_memory_acks_nothing() {
    let server = PrivateRedis::start();
    let url = format!("redis://127.0.0.1:{}/0?ns=oom", server.port);
    let conn = RedisConnection::connect(&stem_adapters::url::parse(&url).unwrap(), RedisOptions::default())
        .await
        .unwrap();
    let b = RedisBroker::new(conn.clone(), "oom");
    let backend = RedisBackend::new(conn, "oom", Duration::from_secs(60));
    let env = env_at("q", 1, 0);
    b.publish(vec![env.clone()]).await.unwrap();
    let got = b.consume(&req(1, Duration::from_secs(60))).await.unwrap();
    let mut raw =
        redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(1).exec_async(&mut raw).await.unwrap();
    let refused =
        b.record_and_ack(&backend, vec![succeeded(&env, serde_json::json!(1))], vec![got[0].receipt.clone()]);
    assert!(refused.await.is_err(), "the refusal is reported");
    redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(0).exec_async(&mut raw).await.unwrap();
    assert_eq!(stream_sizes(&mut raw, &b.keys().stream("q", 0)).await, (1, 1), "still leased, not acked");
    assert!(backend.get(env.id).await.unwrap().is_none(), "no record was written");
}

/// A consumer on the fetch fast path whose group is destroyed under it (its `XREADGROUP`
/// answers with an error) still gets its deliveries: the script recreates the group.
#[tokio::test]
async fn the_fast_path_recovers_when_its_group_vanishes() {
    let (conn, ns, client) = connect().await;
    let b = RedisBroker::new(conn, &ns);
    let envs: Vec<Envelope> = (0..3).map(|n| env_at("q", n, 0)).collect();
    b.publish(envs).await.unwrap();
    // A full fetch under a backlog: the next one takes the fast path.
    let first = b.consume(&req(1, Duration::from_secs(60))).await.unwrap();
    assert_eq!(first.len(), 1);
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let destroyed: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(b.keys().stream("q", 0))
        .arg("stem")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(destroyed, 1);
    let again = b.consume(&req(3, Duration::from_secs(60))).await.unwrap();
    assert!(!again.is_empty(), "the script recreated the group and delivered");
    let mut ns_seen: Vec<u64> = again.iter().map(n_of).collect();
    ns_seen.sort_unstable();
    ns_seen.dedup();
    assert_eq!(ns_seen.len(), again.len(), "each entry once: {ns_seen:?}");
}

#[tokio::test]
async fn a_batch_bigger_than_one_pipeline_stores_every_record_and_envelope() {
    let (conn, ns, _) = connect().await;
    let b = RedisBroker::new(conn.clone(), &ns);
    let backend = RedisBackend::new(conn, &ns, Duration::from_secs(60));
    // Several chunks (two pipelines in flight at once), one envelope of them delayed.
    let mut envs: Vec<Envelope> = (0..4_500)
        .map(|i| {
            let mut e = Envelope::new("t", serde_json::json!({ "i": i }));
            e.queue = "bulk".into();
            e
        })
        .collect();
    envs[3_333].not_before = Some(chrono::Utc::now() + chrono::Duration::hours(1));
    let statuses = envs.iter().map(|e| TaskStatus::for_envelope(e, TaskState::Queued)).collect();
    b.record_and_publish(&backend, statuses, envs.clone()).await.unwrap();

    let counts = b.counts("bulk").await.unwrap();
    assert_eq!((counts.pending, counts.delayed), (4_499, 1));
    for e in [&envs[0], &envs[1_999], &envs[2_000], &envs[3_333], &envs[4_499]] {
        let s = backend.get(e.id).await.unwrap().expect("a queued record");
        assert_eq!(s.state, TaskState::Queued);
    }
    // Envelopes arrive in publish order, each once.
    let req = ConsumeRequest {
        queues: vec!["bulk".into()],
        max: 1_000,
        lease: Duration::from_secs(30),
        wait: Duration::from_secs(1),
        consumer: "c".into(),
    };
    let mut got = Vec::new();
    while got.len() < 4_499 {
        let batch = b.consume(&req).await.unwrap();
        assert!(!batch.is_empty(), "only {} of 4,499 delivered", got.len());
        got.extend(batch.into_iter().map(|d| d.envelope.id));
    }
    let want: Vec<_> = envs.iter().filter(|e| e.not_before.is_none()).map(|e| e.id).collect();
    assert_eq!(got, want);
}

fn member(group: stem::TaskId, index: usize, ok: bool) -> stem::backend::MemberRecord {
    stem::backend::MemberRecord {
        group,
        index,
        outcome: stem::backend::MemberOutcome {
            task_id: stem::TaskId::new(),
            state: if ok { TaskState::Succeeded } else { TaskState::Failed },
            result: ok.then(|| serde_json::json!(index)),
            error: (!ok).then(|| stem::backend::TaskFailure::new("boom", "member failed", false)),
        },
    }
}

/// `(succeeded, failed)` of each result, or the error's text.
fn tallies(results: Vec<stem::Result<stem::backend::GroupCounts>>) -> Vec<Result<(usize, usize), String>> {
    results.into_iter().map(|r| r.map(|c| (c.succeeded, c.failed)).map_err(|e| e.to_string())).collect()
}

/// A backend in a fresh namespace with a new group of `total` members.
async fn new_group(total: usize) -> (RedisBackend, stem::TaskId, redis::Client) {
    let (conn, ns, client) = connect().await;
    let b = RedisBackend::new(conn, &ns, Duration::from_secs(60));
    let g = stem::TaskId::new();
    b.group_init(g, total).await.unwrap();
    (b, g, client)
}

#[tokio::test]
async fn member_successes_of_a_known_group_count_exactly_like_the_script() {
    let (b, g, _) = new_group(6).await;
    // The first record goes through the script, which tells the backend the group's total;
    // later batches of successes are plain commands.
    assert_eq!(tallies(b.group_record_many(vec![member(g, 0, true)]).await.unwrap()), vec![Ok((1, 0))]);
    let got = b
        .group_record_many(vec![
            member(g, 1, true),
            member(g, 1, true),
            member(g, 9, true),
            member(g, 2, true),
        ])
        .await
        .unwrap();
    let got = tallies(got);
    assert_eq!(got[0], Ok((2, 0)));
    assert_eq!(got[1], Ok((2, 0)), "the same index twice counts once");
    assert!(got[2].as_ref().unwrap_err().contains("has no member 9"), "{:?}", got[2]);
    assert_eq!(got[3], Ok((3, 0)));
    // A failure counts itself (script); a success for its index afterwards changes nothing.
    assert_eq!(tallies(b.group_record_many(vec![member(g, 3, false)]).await.unwrap()), vec![Ok((3, 1))]);
    assert_eq!(tallies(b.group_record_many(vec![member(g, 3, true)]).await.unwrap()), vec![Ok((3, 1))]);
    // The claim adds a field of its own; the counts do not move.
    assert!(b.chord_claim(g).await.unwrap());
    assert_eq!(tallies(b.group_record_many(vec![member(g, 4, true)]).await.unwrap()), vec![Ok((4, 1))]);
    let last = b.group_record_many(vec![member(g, 5, true), member(g, 0, false)]).await.unwrap();
    assert!(last[0].as_ref().unwrap().is_done(), "the record completing the group sees it complete");
    assert_eq!(
        tallies(last),
        vec![Ok((5, 1)), Ok((5, 1))],
        "a later failure of a succeeded index is ignored"
    );
    let state = b.group_get(g).await.unwrap().unwrap();
    assert_eq!((state.counts.total, state.counts.succeeded, state.counts.failed), (6, 5, 1));
    assert!(state.claimed);
    let states: Vec<_> = state.members.iter().map(|m| m.as_ref().map(|m| m.state)).collect();
    let (ok, failed) = (Some(TaskState::Succeeded), Some(TaskState::Failed));
    assert_eq!(states, vec![ok, ok, ok, failed, ok, ok], "each index keeps its first outcome");
    // The single-record call agrees.
    let one = b.group_record(g, 2, member(g, 2, true).outcome).await.unwrap();
    assert_eq!((one.succeeded, one.failed), (5, 1));
}

#[tokio::test]
async fn a_known_group_that_expired_is_unknown_and_never_comes_back_without_expiry() {
    let (b, g, client) = new_group(3).await;
    b.group_record_many(vec![member(g, 0, true)]).await.unwrap();
    let key = b.keys().group(g);
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("DEL").arg(&key).exec_async(&mut raw).await.unwrap();
    let got = tallies(b.group_record_many(vec![member(g, 1, true)]).await.unwrap());
    assert!(got[0].as_ref().unwrap_err().contains("does not exist or has expired"), "{got:?}");
    let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut raw).await.unwrap();
    assert_ne!(ttl, -1, "a group key without expiry was left behind");
    assert!(b.group_get(g).await.unwrap().is_none());
    // Recording again asks the script, which knows the group is gone.
    let again = tallies(b.group_record_many(vec![member(g, 2, true)]).await.unwrap());
    assert!(again[0].as_ref().unwrap_err().contains("does not exist or has expired"), "{again:?}");
}
