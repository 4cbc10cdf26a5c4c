//! [`Chord`]: a group whose outputs, in member order, go to one callback.

use std::marker::PhantomData;

use super::{Canvas, Group, Step};

/// A typed chord: the header group runs, then the body receives `Vec<header output>` in member
/// order and its output is the chord's.
///
/// The body is started exactly once, by the worker that records the last member, even with
/// many workers. A member that fails (after its retries) fails the chord: the body never runs,
/// the chord's error callbacks run once, and the chord's status is `failed` with that
/// member's error.
pub struct Chord<In, Out> {
    header: Vec<Canvas>,
    body: Canvas,
    _types: PhantomData<fn(In) -> Out>,
}

impl<In, Out> Chord<In, Out> {
    /// `header`, then `body` with the header's outputs.
    pub fn new<H, S>(header: Group<In, H>, body: S) -> Self
    where
        S: Step<Vec<H>, Output = Out>,
    {
        Chord { header: header.into_members(), body: body.into_canvas(), _types: PhantomData }
    }
}

impl<In, Out> Step<In> for Chord<In, Out> {
    type Output = Out;
    fn into_canvas(self) -> Canvas {
        Canvas::Chord { header: self.header, body: Box::new(self.body) }
    }
}

impl<In, Out> From<Chord<In, Out>> for Canvas {
    fn from(c: Chord<In, Out>) -> Self {
        Canvas::Chord { header: c.header, body: Box::new(c.body) }
    }
}

impl<In, Out> Clone for Chord<In, Out> {
    fn clone(&self) -> Self {
        Chord { header: self.header.clone(), body: self.body.clone(), _types: PhantomData }
    }
}

impl<In, Out> std::fmt::Debug for Chord<In, Out> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chord").field("header", &self.header).field("body", &self.body).finish()
    }
}
