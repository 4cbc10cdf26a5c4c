// A task with a `TaskContext` and a `Result` return, run end to end on the in-memory app;
// another task defined inside `main`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use stem::{StemApp, Task, TaskContext, TaskError, task};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    x: i64,
    y: i64,
}

#[task(name = "math.add", retries = 3, queue = "math")]
pub async fn add(ctx: TaskContext, a: i64, b: i64) -> Result<i64, TaskError> {
    let _ = ctx;
    Ok(a + b)
}

/// An alias whose name ends in `Result` counts as a `Result`.
type TaskResult<T> = Result<T, TaskError>;

#[task(name = "geo.shift")]
async fn shift(p: Point, by: i64) -> TaskResult<Point> {
    Ok(Point { x: p.x + by, y: p.y + by })
}

#[tokio::main]
async fn main() {
    #[task(name = "text.shout")]
    async fn shout(text: String) -> String {
        text.to_uppercase()
    }

    assert_eq!(<add as Task>::OPTIONS.retries, 3);
    assert_eq!(<add as Task>::PARAMS, ["a", "b"]);

    let app = StemApp::in_memory().await.unwrap();
    assert_eq!(app.registry().names(), ["geo.shift", "math.add", "text.shout"]);

    let h = app.enqueue(add::new(1, 2)).await.unwrap();
    assert_eq!(h.wait(Duration::from_secs(5)).await.unwrap(), 3);

    let h = app.enqueue(shift::new(Point { x: 1, y: 2 }, 10)).await.unwrap();
    assert_eq!(h.wait(Duration::from_secs(5)).await.unwrap(), Point { x: 11, y: 12 });

    let h = app.enqueue(shout::new("hi")).await.unwrap();
    assert_eq!(h.wait(Duration::from_secs(5)).await.unwrap(), "HI");

    app.shutdown().await.unwrap();
}
