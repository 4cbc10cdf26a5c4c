//! Canvas: tasks composed into **chains**, **groups** and **chords**, nested freely, with
//! `link` / `link_error` callbacks.
//!
//! Build one with the `canvas!` macro (sugar over the typed builders here) or with the
//! builders directly, then enqueue it with [`Stem::enqueue_canvas`](crate::Stem::enqueue_canvas):
//!
//! ```
//! use std::time::Duration;
//! use stem::prelude::*;
//!
//! #[task(name = "doc.canvas.add")]
//! async fn add(a: i64, b: i64) -> i64 { a + b }
//! #[task(name = "doc.canvas.sum")]
//! async fn sum(values: Vec<i64>) -> i64 { values.iter().sum() }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let app = StemApp::in_memory().await?;
//! // add(1, 2) → add(3, 10) → add(13, 100): each step receives the previous output first.
//! let chain = app.enqueue_canvas(canvas!(chain[add(1, 2), add(10), add(100)])).await?;
//! assert_eq!(chain.wait(Duration::from_secs(5)).await?, 113);
//! // Two adds in parallel, then `sum` of their results in member order.
//! let chord = app.enqueue_canvas(canvas!(chord[add(1, 1), add(2, 2)] => sum())).await?;
//! assert_eq!(chord.wait(Duration::from_secs(5)).await?, 6);
//! app.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! # Typing
//!
//! Every piece implements [`Step<In>`]: "can run after a step whose output is `In`", with the
//! piece's own `Output`. A full call (`add::new(1, 2)`, a [`Signature`](crate::Signature)) is
//! *immutable*: it runs after anything and ignores the previous output. A *partial* call
//! (`add::partial(10)`, a [`Partial`]) lacks its first argument and is a `Step<First>` only,
//! where `First` is the type of that parameter; so rustc checks, for every chain step, that the
//! previous output is what the step takes. A group of members with output `T` outputs `Vec<T>`
//! in member order; a chord is a group followed by a callback that takes that `Vec<T>`. The
//! top of a canvas runs after nothing: it must be a [`Step<NoInput>`].
//!
//! # Execution
//!
//! Nothing is driven by the producer. Each task's envelope carries its [`Continuation`]: the
//! next chain step (already built, with a pre-assigned id), the group slot it fills, the
//! callbacks to run. The worker that finishes a task for good (succeeded, or failed / cancelled
//! after its retries; never on a retry) runs the continuation **before** the task's status is
//! written and its delivery acked, so a crash means a redelivery and the bookkeeping runs
//! again: group slots are recorded idempotently per member index, and every start of a later
//! step, group completion and callback is claimed once in the backend
//! ([`ResultBackend::chord_claim`](crate::ResultBackend::chord_claim)), so a redelivery never
//! starts a step twice. See `docs/canvas.md` for the guarantees in full.

mod batch;
mod callbacks;
mod chain;
mod chord;
mod group;
mod handle;
mod plan;
mod runtime;
mod signature;
mod wire;

pub use callbacks::{CanvasFailure, Linked, StepExt};
pub use chain::Chain;
pub use chord::Chord;
pub use group::Group;
pub use handle::CanvasHandle;
pub use plan::{Continuation, Deferred, Node};
pub use signature::{Partial, PartialTask, TaskCall};

pub(crate) use runtime::report;

/// The task name of the status record a group keeps (its result is the members' results).
pub const GROUP_TASK_NAME: &str = "stem.group";

/// An untyped canvas: tasks by name with JSON arguments, composed into chains, groups and
/// chords. The typed builders ([`Chain`], [`Group`], [`Chord`]) and `canvas!` produce one;
/// build one directly for shapes only known at run time. Its output is untyped JSON.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Canvas {
    /// One task call.
    Task(Box<TaskCall>),
    /// Steps run one after the other, each (if partial) receiving the previous output.
    Chain(Vec<Canvas>),
    /// Members run in parallel; the output is their outputs in member order.
    Group(Vec<Canvas>),
    /// A group (the header) whose outputs, in member order, go to `body` when every member
    /// succeeded. A failing member fails the chord: the body never runs.
    Chord {
        /// The parallel members.
        header: Vec<Canvas>,
        /// The callback, receiving the header's outputs.
        body: Box<Canvas>,
    },
    /// A canvas with callbacks: `links` start with its output when it succeeds, `errbacks`
    /// with a [`CanvasFailure`] when it fails. Neither changes the canvas's own outcome.
    Linked {
        /// The canvas.
        node: Box<Canvas>,
        /// Run on success.
        links: Vec<Canvas>,
        /// Run on failure.
        errbacks: Vec<Canvas>,
    },
}

impl Canvas {
    /// This canvas with `link` started with its output when it succeeds.
    pub fn link(self, link: impl Into<Canvas>) -> Canvas {
        self.with_callback(link.into(), true)
    }

    /// This canvas with `errback` started (with a [`CanvasFailure`] if it is partial) when it
    /// fails.
    pub fn link_error(self, errback: impl Into<Canvas>) -> Canvas {
        self.with_callback(errback.into(), false)
    }

    fn with_callback(self, callback: Canvas, on_success: bool) -> Canvas {
        let (node, mut links, mut errbacks) = match self {
            Canvas::Linked { node, links, errbacks } => (node, links, errbacks),
            other => (Box::new(other), Vec::new(), Vec::new()),
        };
        if on_success {
            links.push(callback)
        } else {
            errbacks.push(callback)
        }
        Canvas::Linked { node, links, errbacks }
    }
}

impl From<TaskCall> for Canvas {
    fn from(call: TaskCall) -> Self {
        Canvas::Task(Box::new(call))
    }
}

/// The input of the first step of a canvas: nothing. A canvas can be enqueued when it is a
/// [`Step<NoInput>`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NoInput;

/// A canvas piece that can run after a step whose output is `In`.
///
/// Implemented by [`Signature`](crate::Signature) (immutable: any `In`), [`Partial`] (only
/// the type of its first parameter), [`Chain`], [`Group`], [`Chord`], [`Linked`] and the
/// untyped [`Canvas`] / [`TaskCall`] (any `In`, JSON output).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot run after a step whose output is `{In}`",
    label = "this step does not take `{In}` as its first argument",
    note = "a partial step (`task(..)` in `canvas!`, `task::partial(..)`) receives the previous step's output as its first argument, so that argument's type must be `{In}`",
    note = "mark the step immutable with `~task(..)` (or pass `task::new(..)`) if it should not receive the previous output"
)]
pub trait Step<In> {
    /// What this piece outputs when it succeeds.
    type Output;
    /// The untyped canvas.
    fn into_canvas(self) -> Canvas;
}

impl<In> Step<In> for Canvas {
    type Output = serde_json::Value;
    fn into_canvas(self) -> Canvas {
        self
    }
}
