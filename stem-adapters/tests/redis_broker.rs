//! Redis-only broker behaviour beyond the shared contract (needs Redis; see
//! `STEM_TEST_REDIS_URL`, default `redis://127.0.0.1:6379/0`).

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use stem::Envelope;
use stem::broker::{Broker, ConsumeRequest, REASON_MALFORMED};
use stem_adapters::redis::{RedisBroker, RedisConnection, RedisOptions};

async fn broker() -> (RedisBroker, redis::Client) {
    let url = std::env::var("STEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let ns = format!("t{}", uuid::Uuid::now_v7().simple());
    let parsed = stem_adapters::url::parse(&format!("{url}?ns={ns}")).unwrap();
    let conn = RedisConnection::connect(&parsed, RedisOptions::default())
        .await
        .unwrap_or_else(|e| panic!("these tests need Redis at {url}: {e}"));
    (RedisBroker::new(conn, &ns), redis::Client::open(url.as_str()).unwrap())
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
