//! [`Group`]: members run in parallel; the output is their outputs in member order.

use std::marker::PhantomData;

use super::{Canvas, Chord, Step};

/// A typed group: every member runs after a step whose output is `In` (partial members all
/// receive it) and outputs `Out`; the group outputs `Vec<Out>` in member order.
///
/// ```
/// # use stem::prelude::*;
/// # use stem::canvas::{Group, NoInput};
/// # #[task(name = "doc.group.add")] async fn add(a: i64, b: i64) -> i64 { a + b }
/// let group: Group<NoInput, i64> = Group::of((0..100).map(|i| add::new(i, i)));
/// ```
pub struct Group<In, Out> {
    members: Vec<Canvas>,
    _types: PhantomData<fn(In) -> Out>,
}

impl<In, Out> Default for Group<In, Out> {
    fn default() -> Self {
        Group { members: Vec::new(), _types: PhantomData }
    }
}

impl<In, Out> Group<In, Out> {
    /// An empty group (enqueueing an empty group is an error; add members first).
    pub fn new() -> Self {
        Self::default()
    }

    /// A group of `members`.
    pub fn of<S, I>(members: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Step<In, Output = Out>,
    {
        Group { members: members.into_iter().map(Step::into_canvas).collect(), _types: PhantomData }
    }

    /// Add one member; every member has the same output type.
    pub fn member<S: Step<In, Output = Out>>(mut self, member: S) -> Self {
        self.members.push(member.into_canvas());
        self
    }

    /// A chord: this group, then `body` receiving the members' outputs in member order.
    pub fn chord<S: Step<Vec<Out>>>(self, body: S) -> Chord<In, S::Output> {
        Chord::new(self, body)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the group has no member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub(crate) fn into_members(self) -> Vec<Canvas> {
        self.members
    }
}

impl<In, Out> Step<In> for Group<In, Out> {
    type Output = Vec<Out>;
    fn into_canvas(self) -> Canvas {
        Canvas::Group(self.members)
    }
}

impl<In, Out> From<Group<In, Out>> for Canvas {
    fn from(g: Group<In, Out>) -> Self {
        Canvas::Group(g.members)
    }
}

impl<In, Out> Clone for Group<In, Out> {
    fn clone(&self) -> Self {
        Group { members: self.members.clone(), _types: PhantomData }
    }
}

impl<In, Out> std::fmt::Debug for Group<In, Out> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Group").field(&self.members).finish()
    }
}
