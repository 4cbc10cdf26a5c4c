//! [`Chain`]: steps run one after the other, each partial step receiving the previous output.

use std::marker::PhantomData;

use super::{Canvas, Step};

/// A typed chain: runs after a step whose output is `In`, outputs `Out` (its last step's).
///
/// ```
/// # use stem::prelude::*;
/// # use stem::canvas::{Chain, NoInput};
/// # #[task(name = "doc.chain.add")] async fn add(a: i64, b: i64) -> i64 { a + b }
/// // add(1, 2), then add(<3>, 10): rustc checks that `add`'s first parameter takes an i64.
/// // (`NoInput`: the chain runs first; `enqueue_canvas` infers it.)
/// let chain: Chain<NoInput, i64> = Chain::new(add::new(1, 2)).then(add::partial(10));
/// ```
pub struct Chain<In, Out> {
    steps: Vec<Canvas>,
    _types: PhantomData<fn(In) -> Out>,
}

impl<In, Out> Chain<In, Out> {
    /// A chain starting with `first`.
    pub fn new<S: Step<In, Output = Out>>(first: S) -> Self {
        Chain { steps: vec![first.into_canvas()], _types: PhantomData }
    }

    /// Append `step`, which runs after the current last step (and, if partial, receives its
    /// output as its first argument).
    pub fn then<S: Step<Out>>(self, step: S) -> Chain<In, S::Output> {
        let mut steps = self.steps;
        steps.push(step.into_canvas());
        Chain { steps, _types: PhantomData }
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Always false: a chain has a first step.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

impl<In, Out> Step<In> for Chain<In, Out> {
    type Output = Out;
    fn into_canvas(self) -> Canvas {
        Canvas::Chain(self.steps)
    }
}

impl<In, Out> From<Chain<In, Out>> for Canvas {
    fn from(c: Chain<In, Out>) -> Self {
        Canvas::Chain(c.steps)
    }
}

impl<In, Out> Clone for Chain<In, Out> {
    fn clone(&self) -> Self {
        Chain { steps: self.steps.clone(), _types: PhantomData }
    }
}

impl<In, Out> std::fmt::Debug for Chain<In, Out> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Chain").field(&self.steps).finish()
    }
}
