//! The canvas checks on the in-memory broker and backend.

stem_tests::canvas_tests!(stem_tests::MemoryHarness::new());

/// `cargo test --release -p stem-tests --test canvas_memory -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput figure; run explicitly in release"]
async fn chord_of_10_000_throughput() {
    stem_tests::canvas_contract::chord_throughput(&stem_tests::MemoryHarness::new(), 10_000).await;
}
