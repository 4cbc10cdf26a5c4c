//! `link` / `link_error`: callbacks started when a canvas piece succeeds or fails.

use std::marker::PhantomData;

use serde::{Deserialize, Serialize};

use super::{Canvas, Step};
use crate::envelope::TaskId;

/// What an error callback receives (as its first argument, when it is partial): which piece
/// failed and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanvasFailure {
    /// The failed task (or group) id.
    pub task_id: TaskId,
    /// Error kind.
    pub kind: String,
    /// Error message.
    pub message: String,
}

/// A canvas piece with callbacks attached; built by [`StepExt::link`] and
/// [`StepExt::link_error`].
pub struct Linked<In, Out> {
    canvas: Canvas,
    _types: PhantomData<fn(In) -> Out>,
}

impl<In, Out> Step<In> for Linked<In, Out> {
    type Output = Out;
    fn into_canvas(self) -> Canvas {
        self.canvas
    }
}

impl<In, Out> From<Linked<In, Out>> for Canvas {
    fn from(l: Linked<In, Out>) -> Self {
        l.canvas
    }
}

impl<In, Out> Clone for Linked<In, Out> {
    fn clone(&self) -> Self {
        Linked { canvas: self.canvas.clone(), _types: PhantomData }
    }
}

impl<In, Out> std::fmt::Debug for Linked<In, Out> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Linked").field(&self.canvas).finish()
    }
}

/// Callbacks on any typed canvas piece.
///
/// Callbacks are side branches: they run after the piece (a link with its output, an error
/// callback with a [`CanvasFailure`]), each exactly once, and do not change the piece's own
/// outcome or what runs after it.
pub trait StepExt<In>: Step<In> + Sized {
    /// Start `link` with this piece's output when it succeeds.
    fn link<L: Step<Self::Output>>(self, link: L) -> Linked<In, Self::Output> {
        Linked { canvas: self.into_canvas().link(link.into_canvas()), _types: PhantomData }
    }

    /// Start `errback` (with a [`CanvasFailure`] if it is partial) when this piece fails.
    fn link_error<E: Step<CanvasFailure>>(self, errback: E) -> Linked<In, Self::Output> {
        Linked { canvas: self.into_canvas().link_error(errback.into_canvas()), _types: PhantomData }
    }
}

impl<In, S: Step<In>> StepExt<In> for S {}
