//! The wire form of a canvas: [`Node`]s with every envelope built and every id assigned when
//! the canvas is enqueued, and the [`Continuation`] each task's envelope carries.

use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::signature::{ENCODE_ERROR, NOT_AN_OBJECT};
use super::{Canvas, TaskCall};
use crate::envelope::{Envelope, TaskId};
use crate::error::{Error, Result};
use crate::producer::Stem;
use crate::task::{ArgsError, TaskOptions};

/// One planned piece of a canvas, as it travels in envelopes (read by `wire.rs`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "k", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Node {
    /// A task, its envelope ready to publish.
    Task {
        /// The envelope (id pre-assigned).
        env: Box<Envelope>,
        /// The parameter receiving the previous output (`None`: immutable).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        receives: Option<String>,
        /// Delay from the moment the step is started, in milliseconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        countdown_ms: Option<u64>,
    },
    /// Steps one after the other (never empty).
    Chain {
        /// The steps.
        steps: Vec<Node>,
    },
    /// Members in parallel, counted in the backend under `id` (never empty).
    Group {
        /// Group id: the backend's counters and the group's own status record.
        id: TaskId,
        /// The members.
        members: Vec<Node>,
    },
    /// A piece with callbacks.
    Linked {
        /// The piece.
        node: Box<Node>,
        /// Started with its output on success.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        links: Vec<Node>,
        /// Started with a `CanvasFailure` on failure.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        errbacks: Vec<Node>,
    },
}

/// What happens when a piece of a canvas ends for good: carried by every canvas task's
/// envelope, run by the worker that finishes the task (read by `wire.rs`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "k", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Continuation {
    /// Nothing more.
    Done,
    /// On success start `next` with the output, then `then` applies to `next`; on failure
    /// `next` is marked failed (it never runs) and the failure goes on to `then`.
    Then {
        /// The next step.
        next: Box<Node>,
        /// What follows it.
        then: Box<Continuation>,
    },
    /// Record the outcome as member `index` of group `group`; when the group is complete (or
    /// a member failed), its outcome goes on to `then`, exactly once.
    Member {
        /// Group id.
        group: TaskId,
        /// Member index.
        index: usize,
        /// What follows the group: shared by every member and read only by the one that
        /// carries the group on (see [`Deferred`]).
        then: Deferred,
    },
    /// Start callbacks, then go on to `then` with the same outcome.
    Links {
        /// Started on success.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        links: Vec<Node>,
        /// Started on failure.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        errbacks: Vec<Node>,
        /// What follows.
        then: Box<Continuation>,
    },
}

impl Node {
    /// The id whose status record carries this piece's outcome: a task's own id, a group's
    /// id, a chain's last step's.
    pub fn result_id(&self) -> TaskId {
        match self {
            Node::Task { env, .. } => env.id,
            Node::Chain { steps } => steps.last().map_or_else(TaskId::new, Node::result_id),
            Node::Group { id, .. } => *id,
            Node::Linked { node, .. } => node.result_id(),
        }
    }

    /// The id of the first record written when this piece is started (its first task, or its
    /// group): the key of the claim that starts it once, and the proof that it was started.
    pub(crate) fn start_id(&self) -> TaskId {
        match self {
            Node::Task { env, .. } => env.id,
            Node::Chain { steps } => steps.first().map_or_else(TaskId::new, Node::start_id),
            Node::Group { id, .. } => *id,
            Node::Linked { node, .. } => node.start_id(),
        }
    }

    /// Every task and group id inside, callbacks excluded (they are marked when skipped).
    pub(crate) fn result_ids(&self, out: &mut Vec<(TaskId, String)>) {
        match self {
            Node::Task { env, .. } => out.push((env.id, env.task.clone())),
            Node::Chain { steps } => steps.iter().for_each(|s| s.result_ids(out)),
            Node::Group { id, members } => {
                members.iter().for_each(|m| m.result_ids(out));
                out.push((*id, super::GROUP_TASK_NAME.to_owned()));
            }
            Node::Linked { node, .. } => node.result_ids(out),
        }
    }

    /// The group whose progress a handle reports: the root group, or a chord's header.
    pub(crate) fn progress_group(&self) -> Option<TaskId> {
        match self {
            Node::Group { id, .. } => Some(*id),
            Node::Chain { steps } if steps.len() == 2 => match &steps[0] {
                Node::Group { id, .. } => Some(*id),
                _ => None,
            },
            Node::Linked { node, .. } => node.progress_group(),
            _ => None,
        }
    }
}

/// Turn a canvas into nodes: build every envelope (task defaults overridden by call options),
/// assign every id, refuse empty groups and chains and bad arguments.
pub(crate) fn plan(stem: &Stem, canvas: Canvas) -> Result<Node> {
    let now = Utc::now();
    plan_at(stem, canvas, now)
}

fn plan_at(stem: &Stem, canvas: Canvas, now: DateTime<Utc>) -> Result<Node> {
    Ok(match canvas {
        Canvas::Task(call) => plan_task(stem, *call, now)?,
        Canvas::Chain(steps) => {
            if steps.is_empty() {
                return Err(Error::Config("a canvas chain needs at least one step".to_owned()));
            }
            let steps = steps.into_iter().map(|s| plan_at(stem, s, now)).collect::<Result<Vec<_>>>()?;
            Node::Chain { steps }
        }
        Canvas::Group(members) => plan_group(stem, members, now)?,
        Canvas::Chord { header, body } => {
            let group = plan_group(stem, header, now)?;
            let body = plan_at(stem, *body, now)?;
            Node::Chain { steps: vec![group, body] }
        }
        Canvas::Linked { node, links, errbacks } => {
            let node = Box::new(plan_at(stem, *node, now)?);
            let links = links.into_iter().map(|c| plan_at(stem, c, now)).collect::<Result<Vec<_>>>()?;
            let errbacks = errbacks.into_iter().map(|c| plan_at(stem, c, now)).collect::<Result<Vec<_>>>()?;
            Node::Linked { node, links, errbacks }
        }
    })
}

fn plan_group(stem: &Stem, members: Vec<Canvas>, now: DateTime<Utc>) -> Result<Node> {
    if members.is_empty() {
        return Err(Error::Config("a canvas group needs at least one member".to_owned()));
    }
    let members = members.into_iter().map(|m| plan_at(stem, m, now)).collect::<Result<Vec<_>>>()?;
    Ok(Node::Group { id: TaskId::new(), members })
}

fn plan_task(stem: &Stem, call: TaskCall, now: DateTime<Utc>) -> Result<Node> {
    if let Some(Value::String(e)) = call.args.get(ENCODE_ERROR) {
        return Err(Error::Config(format!("task `{}`: {e}", call.task)));
    }
    if call.args.contains_key(NOT_AN_OBJECT) {
        return Err(Error::Args(ArgsError::NotAnObject("not an object")));
    }
    let defaults = match call.defaults {
        Some(d) => d,
        None => match stem.registry() {
            Some(reg) => reg.get(&call.task).ok_or_else(|| Error::UnknownTask(call.task.clone()))?.options,
            None => TaskOptions::new(),
        },
    };
    let mut env = stem.build_envelope(&call.task, Value::Object(call.args), &defaults, &call.options);
    env.created_at = now;
    let countdown_ms = call.options.countdown.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Ok(Node::Task { env: Box::new(env), receives: call.receives, countdown_ms })
}

/// A continuation kept as its JSON text until it is needed.
///
/// Every member of a group carries what follows the group (a chord's callback with its whole
/// envelope), but only the member that completes the group acts on it. So it is written once
/// for all members when the canvas is enqueued (clones share the text), and a worker reads it
/// only when its member carries the group on; every other member's envelope just passes it
/// through as text.
#[derive(Clone)]
pub struct Deferred(Arc<DeferredInner>);

struct DeferredInner {
    parsed: OnceLock<Continuation>,
    text: OnceLock<Box<RawValue>>,
}

impl Deferred {
    /// Wrap a continuation built in this process.
    pub fn new(continuation: Continuation) -> Self {
        Deferred(Arc::new(DeferredInner { parsed: OnceLock::from(continuation), text: OnceLock::new() }))
    }

    /// A continuation read from the wire, parsed when first asked for.
    pub(crate) fn from_text(text: Box<RawValue>) -> Self {
        Deferred(Arc::new(DeferredInner { parsed: OnceLock::new(), text: OnceLock::from(text) }))
    }

    /// The continuation (parsed now if it came from the wire).
    pub fn get(&self) -> std::result::Result<&Continuation, serde_json::Error> {
        if let Some(c) = self.0.parsed.get() {
            return Ok(c);
        }
        let text = self.0.text.get().map_or("null", |t| t.get());
        let parsed: Continuation = serde_json::from_str(text)?;
        // Another thread may have parsed it meanwhile; either value is the same.
        Ok(self.0.parsed.get_or_init(|| parsed))
    }

    /// The JSON text, written now (once for all clones) if it was built in this process.
    fn text(&self) -> std::result::Result<&RawValue, serde_json::Error> {
        if let Some(t) = self.0.text.get() {
            return Ok(t);
        }
        let text = match self.0.parsed.get() {
            Some(c) => serde_json::value::to_raw_value(c)?,
            None => serde_json::value::to_raw_value(&Continuation::Done)?,
        };
        Ok(self.0.text.get_or_init(|| text))
    }
}

impl From<Continuation> for Deferred {
    fn from(c: Continuation) -> Self {
        Deferred::new(c)
    }
}

impl Serialize for Deferred {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.text().map_err(serde::ser::Error::custom)?.serialize(s)
    }
}

impl PartialEq for Deferred {
    /// Equal when they mean the same continuation (the texts may differ in key order).
    fn eq(&self, other: &Self) -> bool {
        match (self.get(), other.get()) {
            (Ok(a), Ok(b)) => a == b,
            _ => self.text().ok().map(RawValue::get) == other.text().ok().map(RawValue::get),
        }
    }
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0.parsed.get(), self.0.text.get()) {
            (Some(c), _) => c.fmt(f),
            (None, Some(t)) => write!(f, "Deferred({})", t.get()),
            (None, None) => f.write_str("Deferred(?)"),
        }
    }
}
