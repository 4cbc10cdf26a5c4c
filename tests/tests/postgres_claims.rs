//! Postgres claims commit without waiting for their WAL flush (needs PostgreSQL: see
//! `stem_tests::postgres`). What that may cost is a claim forgotten by a crashed server: its
//! rows are `ready` again with the token they had before. These checks pin down what keeps
//! that safe: the setting never outlives the claim's own transaction, and a forgotten
//! claim's receipts stay stale after the rows are claimed again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::json;
use stem::Envelope;
use stem::broker::{Broker, ConsumeRequest, Delivery};
use stem_adapters::postgres::{PgBroker, PgOptions, PgStore};

fn req(max: usize) -> ConsumeRequest {
    ConsumeRequest {
        queues: vec!["claims".to_owned()],
        max,
        lease: Duration::from_secs(30),
        wait: Duration::ZERO,
        consumer: "claims-test".to_owned(),
    }
}

fn env(n: i64) -> Envelope {
    let mut e = Envelope::new("claims.task", json!({ "n": n }));
    e.queue = "claims".to_owned();
    e
}

async fn claim_one(broker: &PgBroker) -> Delivery {
    let mut got = broker.consume(&req(1)).await.unwrap();
    assert_eq!(got.len(), 1, "one delivery");
    got.remove(0)
}

/// On a pool of one connection, the claim and every later statement share the connection:
/// the claim's `synchronous_commit = off` must have ended with its transaction.
#[tokio::test]
async fn the_claims_commit_setting_does_not_outlive_its_transaction() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(20))
        .connect(&stem_tests::postgres::url())
        .await
        .expect("Postgres is running (scripts/services.sh)");
    let store = PgStore::from_pool(pool, &stem_tests::namespace(), PgOptions::default()).await.unwrap();
    let broker = PgBroker::new(store.clone());
    broker.publish(vec![env(1), env(2)]).await.unwrap();
    let first = claim_one(&broker).await;
    // The connection the claim ran on comes back to the pool after a second of idleness.
    let setting: String =
        sqlx::query_scalar("SHOW synchronous_commit").fetch_one(store.pool()).await.unwrap();
    assert_eq!(setting, "on", "the server's setting is back for every later statement");
    // Writes on that connection keep working as usual: the outcome path (an ack) and a claim.
    broker.ack(vec![first.receipt]).await.unwrap();
    let second = claim_one(&broker).await;
    broker.ack(vec![second.receipt]).await.unwrap();
    let left: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\".jobs", store.namespace()))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(left, 0);
}

/// A crashed server forgets a claim that had not reached the disk: the row is as before the
/// claim. The rows are then claimed again; the forgotten claim's receipt must be refused
/// (extend, ack, retry) while the new one works.
#[tokio::test]
async fn a_forgotten_claims_receipt_stays_stale_after_the_row_is_claimed_again() {
    let harness = stem_tests::postgres::PgHarness::new();
    let store = harness.store(&stem_tests::namespace()).await;
    let broker = PgBroker::new(store.clone());
    let jobs = format!("\"{}\".jobs", store.namespace());
    broker.publish(vec![env(7)]).await.unwrap();
    let (id, token, deliveries): (i64, i64, i32) =
        sqlx::query_as(&format!("SELECT id, token, deliveries FROM {jobs}"))
            .fetch_one(store.pool())
            .await
            .unwrap();

    let forgotten = claim_one(&broker).await;
    // What crash recovery leaves when the claim's commit record was lost.
    sqlx::query(&format!(
        "UPDATE {jobs} SET state = 'ready', lease_until = NULL, consumer = NULL, token = $2, \
         deliveries = $3 WHERE id = $1"
    ))
    .bind(id)
    .bind(token)
    .bind(deliveries)
    .execute(store.pool())
    .await
    .unwrap();

    let again = claim_one(&broker).await;
    assert_eq!(again.receipt.tag, forgotten.receipt.tag, "the same row");
    assert!(!again.redelivered, "the forgotten delivery never counted");
    assert_ne!(again.receipt.lease, forgotten.receipt.lease, "a token of its own");
    assert!(
        !broker.extend_lease(&forgotten.receipt, Duration::from_secs(60)).await.unwrap(),
        "the forgotten receipt cannot extend the new lease"
    );
    assert!(
        !broker.retry(forgotten.receipt.clone(), (*forgotten.envelope).clone()).await.unwrap(),
        "nor replace the row"
    );
    broker.ack(vec![forgotten.receipt.clone()]).await.unwrap();
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {jobs} WHERE state = 'leased'"))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(rows, 1, "nor finish it: the row is still leased to the new claim");

    assert!(broker.extend_lease(&again.receipt, Duration::from_secs(60)).await.unwrap());
    broker.ack(vec![again.receipt]).await.unwrap();
    let rows: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM {jobs}")).fetch_one(store.pool()).await.unwrap();
    assert_eq!(rows, 0, "the new receipt finishes the task");
}

/// A consumer that stops waiting while its claim runs (a worker shutting down drops its
/// fetch): the claimed row goes back to `ready` and the queue's counts say so.
#[tokio::test]
async fn an_abandoned_fetch_puts_its_rows_back_and_the_counts_follow() {
    let harness = stem_tests::postgres::PgHarness::new();
    let store = harness.store(&stem_tests::namespace()).await;
    let broker = PgBroker::new(store.clone());
    let jobs = format!("\"{}\".jobs", store.namespace());
    broker.publish(vec![env(1), env(2)]).await.unwrap();
    let request = req(2);
    // Polled once (the claim starts on a task of its own), then dropped.
    tokio::select! {
        biased;
        got = broker.consume(&request) => panic!("the claim cannot have answered yet: {got:?}"),
        () = std::future::ready(()) => {}
    }
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // One snapshot: claimed (a token handed out) and released (state and count restored).
        let (leased, deliveries, token): (i64, i64, i64) = sqlx::query_as(&format!(
            "SELECT count(*) FILTER (WHERE state = 'leased'), coalesce(sum(deliveries), 0)::int8, \
             coalesce(max(token), 0) FROM {jobs}"
        ))
        .fetch_one(store.pool())
        .await
        .unwrap();
        if token > 0 && leased == 0 && deliveries == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < give_up, "the rows were not released: {leased} leased");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let q = broker.counts("claims").await.unwrap();
    assert_eq!((q.pending, q.in_flight, q.delayed), (2, 0, 0), "{q:?}");
    let got = broker.consume(&req(2)).await.unwrap();
    assert_eq!(got.len(), 2, "both rows are delivered again");
    assert!(got.iter().all(|d| !d.redelivered), "the abandoned delivery never counted");
    let q = broker.counts("claims").await.unwrap();
    assert_eq!((q.pending, q.in_flight), (0, 2), "{q:?}");
}
