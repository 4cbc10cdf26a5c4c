//! Redis-only result backend behaviour beyond the shared contract (needs Redis; see
//! `STEM_TEST_REDIS_URL`, default `redis://127.0.0.1:6379/0`).

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use stem::Envelope;
use stem::backend::{ResultBackend, TaskState, TaskStatus};
use stem_adapters::redis::{RedisBackend, RedisConnection, RedisOptions};

/// Many waiters whose completions race their own subscribe-then-read (some written before
/// the wait starts, some while it subscribes, some later) all get the terminal record, and
/// none of them leaves its completion channel subscribed.
#[tokio::test]
async fn racing_completions_reach_every_waiter_and_leave_no_subscription_behind() {
    let url = std::env::var("STEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let ns = format!("t{}", uuid::Uuid::now_v7().simple());
    let parsed = stem_adapters::url::parse(&format!("{url}?ns={ns}")).unwrap();
    let conn = RedisConnection::connect(&parsed, RedisOptions::default())
        .await
        .unwrap_or_else(|e| panic!("these tests need Redis at {url}: {e}"));
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

    let client = redis::Client::open(url.as_str()).unwrap();
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
