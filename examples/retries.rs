//! Retries with exponential backoff, an explicit `ctx.retry`, and the dead-letter queue.
//!
//! ```text
//! cargo run --example retries
//! ```

#![allow(clippy::print_stdout, clippy::expect_used)]

use std::time::Duration;

use stem::prelude::*;

/// Fails twice with a retryable error, then succeeds.
#[task(name = "demo.flaky", retries = 5, backoff_base = "100ms", backoff_max = "2s")]
async fn flaky(ctx: TaskContext) -> Result<String, TaskError> {
    match ctx.attempt() {
        0 => Err(TaskError::new("timeout", "upstream timed out")),
        1 => Err(ctx.retry(Duration::from_millis(250))),
        n => Ok(format!("succeeded on attempt {n}")),
    }
}

/// Never succeeds; ends in the dead-letter queue.
#[task(name = "demo.doomed", retries = 2, backoff_base = "50ms")]
async fn doomed() -> Result<(), TaskError> {
    Err(TaskError::new("upstream", "service unavailable"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("warn").init();
    let app = StemApp::in_memory().await?;

    let ok = app.enqueue(flaky::new()).await?;
    println!("flaky: {}", ok.wait(Duration::from_secs(10)).await?);

    let bad = app.enqueue(doomed::new()).await?;
    println!("doomed: {}", bad.wait(Duration::from_secs(10)).await.expect_err("it fails"));
    for dead in app.broker().dlq_list("default", 0, 10).await? {
        println!("dead letter {}: reason={} detail={}", dead.id, dead.reason, dead.detail);
    }
    app.shutdown().await?;
    Ok(())
}
