//! The quick start: define tasks, run an in-memory broker, backend and worker in this
//! process, enqueue, and print the results.
//!
//! ```text
//! cargo run --example quickstart
//! ```

#![allow(clippy::print_stdout, clippy::expect_used)]

use std::time::Duration;

use serde::{Deserialize, Serialize};
use stem::prelude::*;

/// A receipt produced by the `invoice.render` task.
#[derive(Debug, Serialize, Deserialize)]
struct Invoice {
    customer: String,
    total_cents: u64,
    lines: usize,
}

/// Adds two numbers.
#[task(name = "math.add")]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Renders an invoice, reporting progress as it goes; retried up to 3 times on error.
#[task(name = "invoice.render", retries = 3, queue = "invoices", soft_time_limit = "30s")]
async fn render_invoice(ctx: TaskContext, customer: String, prices: Vec<u64>) -> Result<Invoice, TaskError> {
    if prices.is_empty() {
        return Err(TaskError::fatal("an invoice needs at least one line"));
    }
    ctx.progress(0.5, None).await?;
    Ok(Invoice { customer, total_cents: prices.iter().sum(), lines: prices.len() })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("error").init();

    // Broker, result backend and a worker, all in memory, in this process.
    let app = StemApp::in_memory().await?;

    let sum = app.enqueue(add::new(2, 40)).await?;
    let invoice = app.enqueue(render_invoice::new("ACME", vec![1999, 500, 250]).priority(7)).await?;
    let bad = app.enqueue(render_invoice::new("Nobody", vec![])).await?;

    let timeout = Duration::from_secs(5);
    let value = sum.wait(timeout).await?;
    let receipt = invoice.wait(timeout).await?;
    let failure = bad.wait(timeout).await.expect_err("an empty invoice fails");
    let status = invoice.status().await?.ok_or("no status recorded")?;

    println!("math.add(2, 40) = {value}");
    println!("invoice.render = {receipt:?} (state: {}, attempt {})", status.state, status.attempt);
    println!("invoice.render([]) failed as expected: {failure}");

    app.shutdown().await?;
    Ok(())
}
