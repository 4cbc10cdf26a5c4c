//! Canvas: chains, groups and chords built with `canvas!`, run by an in-memory worker in
//! this process; prints every result.
//!
//! ```text
//! cargo run --example canvas
//! ```

#![allow(clippy::print_stdout)]

use std::time::Duration;

use stem::canvas::{CanvasFailure, Group, NoInput};
use stem::prelude::*;

const WAIT: Duration = Duration::from_secs(10);

/// Adds two numbers.
#[task(name = "canvas.add")]
async fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Multiplies two numbers.
#[task(name = "canvas.mul")]
async fn mul(a: i64, b: i64) -> i64 {
    a * b
}

/// Renders one page (pretend work).
#[task(name = "canvas.render")]
async fn render(page: u32) -> String {
    format!("<page {page}>")
}

/// Joins rendered pages: the chord callback.
#[task(name = "canvas.bind")]
async fn bind(pages: Vec<String>, title: String) -> String {
    format!("{title}: {}", pages.concat())
}

/// Fails for one input, to show error callbacks.
#[task(name = "canvas.check")]
async fn check(n: i64) -> Result<i64, TaskError> {
    if n == 3 { Err(TaskError::fatal(format!("{n} is not allowed"))) } else { Ok(n) }
}

/// Sums numbers.
#[task(name = "canvas.total")]
async fn total(values: Vec<i64>) -> i64 {
    values.iter().sum()
}

/// An error callback: receives which step failed and why.
#[task(name = "canvas.alert")]
async fn alert(failure: CanvasFailure, team: String) {
    println!("  alert to {team}: {} failed: {}", failure.task_id, failure.message);
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let app = StemApp::in_memory().await?;

    // A chain: each step after the first receives the previous output as its first argument
    // (rustc checks the types); `~` marks a step that ignores it.
    let chain = app.enqueue_canvas(canvas!(chain[add(2, 3), mul(10), ~add(1, 1), add(100)])).await?;
    println!("chain   add(2, 3) → mul(·, 10) → ~add(1, 1) → add(·, 100) = {}", chain.wait(WAIT).await?);

    // A group: results in member order, with progress counts.
    let squares: Group<NoInput, i64> = Group::of((1..=10).map(|i| mul::new(i, i)));
    let group = app.enqueue_canvas(squares).await?;
    println!("group   squares = {:?}", group.wait(WAIT).await?);
    if let Some(counts) = group.progress().await? {
        println!("        {} of {} members done, {} failed", counts.completed(), counts.total, counts.failed);
    }

    // A chord: the callback runs once, with the pages in member order.
    let chord = app.enqueue_canvas(canvas!(chord[render(1), render(2), render(3)] => bind("report"))).await?;
    println!("chord   {}", chord.wait(WAIT).await?);

    // Nesting: a chord inside a chain, with chains in its header.
    let nested = canvas!(chain[
        add(1, 1),
        chord[chain[add(1), mul(3)], chain[mul(5), add(1)]] => total(),
        mul(2),
    ]);
    println!(
        "nested  2 → [(2+1)*3, 2*5+1] → total → ·*2 = {}",
        app.enqueue_canvas(nested).await?.wait(WAIT).await?
    );

    // A failing member fails the chord: the callback never runs, the error callback runs once.
    let failing: Group<NoInput, i64> = Group::of((1..=5).map(check::new));
    let chord = failing.chord(total::partial()).link_error(alert::partial("ops"));
    match app.enqueue_canvas(chord).await?.wait(WAIT).await {
        Ok(sum) => println!("failing chord unexpectedly returned {sum}"),
        Err(e) => println!("failing chord: {e}"),
    }

    // Callbacks are side branches nobody waits on: let the queue empty before shutting down.
    while app.broker().counts("default").await?.pending + app.broker().counts("default").await?.in_flight > 0
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app.shutdown().await?;
    Ok(())
}
