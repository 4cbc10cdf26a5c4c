//! # Stem
//!
//! Background tasks for Rust: producers enqueue tasks to a **broker**, **workers** run them
//! and record state and results in a **result backend**.
//!
//! ```
//! use std::time::Duration;
//! use stem::prelude::*;
//!
//! #[task(name = "doc.add")]
//! async fn add(a: i64, b: i64) -> i64 {
//!     a + b
//! }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let app = StemApp::in_memory().await?;
//! let handle = app.enqueue(add::new(2, 3)).await?;
//! assert_eq!(handle.wait(Duration::from_secs(5)).await?, 5);
//! app.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! The pipeline reads off the modules: [`producer`] → [`broker`] → [`worker`] → [`backend`];
//! tasks are defined in [`task`] (with `#[task]`), results are awaited through [`result`];
//! chains, groups and chords are built in [`canvas`] (with `canvas!`).

extern crate self as stem;

pub mod app;
pub mod backend;
pub mod broker;
pub mod canvas;
pub mod envelope;
pub mod error;
mod json;
pub mod prelude;
pub mod producer;
pub mod result;
pub mod signals;
pub mod store;
pub mod task;
mod timestamp;
pub mod worker;

#[doc(hidden)]
pub mod __private;

pub use app::StemApp;
pub use backend::{MemoryBackend, ResultBackend, TaskState, TaskStatus};
pub use broker::{Broker, MemoryBroker};
pub use canvas::{Canvas, CanvasHandle};
pub use envelope::{Envelope, TaskId};
pub use error::{Error, Result};
pub use producer::Stem;
pub use result::{TaskHandle, WaitError};
pub use signals::Signals;
pub use task::{
    Backoff, EnqueueOptions, RateLimit, Registry, RegistryError, Signature, Task, TaskContext, TaskError,
    TaskOptions,
};
pub use worker::{Worker, WorkerConfig, WorkerHandle};

#[cfg(feature = "macros")]
pub use stem_macros::{canvas, task};
