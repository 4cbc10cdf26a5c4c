//! The canvas checks on the Redis broker and backend (needs a Redis server: see
//! `stem_tests::redis`).

stem_tests::canvas_tests!(stem_tests::redis::RedisHarness::new());

/// `cargo test --release -p stem-tests --test canvas_redis -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput figure; run explicitly in release"]
async fn chord_of_10_000_throughput() {
    stem_tests::canvas_contract::chord_throughput(&stem_tests::redis::RedisHarness::new(), 10_000).await;
}
