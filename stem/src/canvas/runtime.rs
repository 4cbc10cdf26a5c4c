//! Running a canvas: starting pieces (producer and workers alike) and, in the worker that
//! finishes a canvas task for good, carrying its outcome along the task's continuation.
//!
//! Every side effect that must happen once is claimed in the backend first, keyed by what it
//! starts: a later step or callback by its first id ([`Node::start_id`]), a group's
//! completion by the group id (`chord_claim`). A redelivered task therefore finds the claims
//! taken and starts nothing twice. The one gap (a worker dying between a claim and the
//! publish it guards) is closed by the redelivery too: a redelivered task whose claim is taken
//! but whose target has no record yet does the work itself.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures_util::{StreamExt, TryStreamExt};
use serde_json::Value;

use super::batch;
use super::plan::{Continuation, Deferred, Node};
use super::{CanvasFailure, GROUP_TASK_NAME};
use crate::backend::{
    GroupState, MemberOutcome, MemberRecord, ResultBackend, TaskFailure, TaskState, TaskStatus,
};
use crate::envelope::{Envelope, TaskId};
use crate::error::{Error, Result};
use crate::producer::Stem;

/// Most envelopes of one canvas start published in one call.
const PUBLISH_BATCH: usize = 1_000;

/// Publish calls of one canvas start in flight at once.
const PUBLISH_IN_FLIGHT: usize = 4;

/// What starting pieces of a canvas needs done, in order: groups created, envelopes
/// published, then the groups' own `queued` records (the proof a group was started).
#[derive(Default)]
pub(crate) struct Effects {
    inits: Vec<(TaskId, usize)>,
    envelopes: Vec<Envelope>,
    groups: Vec<TaskStatus>,
}

impl Effects {
    /// Start `node` (if partial, with `input` as its first argument); `cont` applies when it
    /// ends.
    pub(crate) fn start(
        &mut self,
        node: Node,
        input: Option<&Value>,
        cont: Continuation,
        now: DateTime<Utc>,
    ) {
        match node {
            Node::Task { mut env, receives, countdown_ms } => {
                if let (Some(param), Some(value), Value::Object(args)) = (receives, input, &mut env.args) {
                    args.insert(param, value.clone());
                }
                if let Some(ms) = countdown_ms {
                    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
                    env.not_before = now.checked_add_signed(chrono::Duration::milliseconds(ms));
                }
                env.created_at = now;
                env.canvas = match cont {
                    Continuation::Done => None,
                    cont => Some(Box::new(cont)),
                };
                self.envelopes.push(*env);
            }
            Node::Chain { steps } => {
                let mut steps = steps.into_iter();
                let Some(first) = steps.next() else { return };
                let rest: Vec<Node> = steps.collect();
                let cont = rest.into_iter().rev().fold(cont, |then, next| Continuation::Then {
                    next: Box::new(next),
                    then: Box::new(then),
                });
                self.start(first, input, cont, now);
            }
            Node::Group { id, members } => {
                self.inits.push((id, members.len()));
                self.groups.push(group_status(id, TaskState::Queued, None, None, now));
                // One continuation for all members, written once (see `Deferred`).
                let then = Deferred::new(cont);
                for (index, member) in members.into_iter().enumerate() {
                    let then = then.clone();
                    self.start(member, input, Continuation::Member { group: id, index, then }, now);
                }
            }
            Node::Linked { node, links, errbacks } => {
                self.start(*node, input, Continuation::Links { links, errbacks, then: Box::new(cont) }, now);
            }
        }
    }

    /// Do it: create the groups, publish the tasks, record the groups as queued.
    pub(crate) async fn apply(self, stem: &Stem) -> Result<()> {
        let backend = stem.backend();
        futures_util::future::try_join_all(self.inits.iter().map(|(id, n)| backend.group_init(*id, *n)))
            .await?;
        // A big group goes out in batches, a few in flight at once, so the first members are
        // ready for workers while the rest are still being sent (and each batch is small
        // enough for an adapter to store records and envelopes together).
        let mut envelopes = self.envelopes.into_iter();
        let batches = std::iter::from_fn(|| {
            let batch: Vec<Envelope> = envelopes.by_ref().take(PUBLISH_BATCH).collect();
            (!batch.is_empty()).then_some(batch)
        });
        futures_util::stream::iter(batches.map(|batch| stem.publish(batch)))
            .buffered(PUBLISH_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        if !self.groups.is_empty() {
            backend.set(self.groups).await?;
        }
        Ok(())
    }
}

/// A status record for a group (its result is the members' outputs in member order).
fn group_status(
    id: TaskId,
    state: TaskState,
    result: Option<Value>,
    error: Option<TaskFailure>,
    now: DateTime<Utc>,
) -> TaskStatus {
    TaskStatus {
        id,
        task: GROUP_TASK_NAME.to_owned(),
        state,
        result,
        error,
        attempt: 0,
        queued_at: Some(now),
        started_at: None,
        finished_at: state.is_terminal().then_some(now),
        updated_at: now,
        worker_id: None,
        progress: None,
        meta: serde_json::Map::new(),
        parent_id: None,
        root_id: None,
    }
}

/// The key of the claim that starts a piece once (never equal to a task or group id).
fn start_claim(id: TaskId) -> TaskId {
    const SALT: u128 = 0x5354_454d_2d63_616e_7661_732d_7374_6172; // "STEM-canvas-star"
    TaskId(uuid::Uuid::from_u128(id.0.as_u128() ^ SALT))
}

/// Carry a finished canvas task's outcome along its continuation. Called by the worker after
/// the task ended for good (`status` is terminal) and before its status is written and its
/// delivery acked; safe to call again for the same task (a redelivery).
pub(crate) async fn report(
    stem: &Stem,
    env: &Envelope,
    status: &TaskStatus,
    redelivered: bool,
) -> Result<()> {
    let Some(cont) = env.canvas.as_deref() else { return Ok(()) };
    let outcome = match status.state {
        TaskState::Succeeded => Ok(status.result.clone().unwrap_or(Value::Null)),
        _ => Err(failure_of(env.id, status.error.as_ref())),
    };
    let mut run = Propagation { stem, backend: stem.backend(), redelivered, finals: Vec::new() };
    run.run(cont, outcome, env.id).await
}

fn failure_of(id: TaskId, error: Option<&TaskFailure>) -> CanvasFailure {
    match error {
        Some(e) => CanvasFailure { task_id: id, kind: e.kind.clone(), message: e.message.clone() },
        None => {
            CanvasFailure { task_id: id, kind: "unknown".to_owned(), message: "no error recorded".to_owned() }
        }
    }
}

struct Propagation<'a> {
    stem: &'a Stem,
    backend: &'a Arc<dyn ResultBackend>,
    redelivered: bool,
    /// Records written last: completed groups and steps that will never run.
    finals: Vec<TaskStatus>,
}

impl Propagation<'_> {
    /// Walk the continuation by reference: only what is started gets copied, so a group
    /// member whose group is not complete yet copies nothing.
    async fn run(
        &mut self,
        mut cont: &Continuation,
        mut outcome: Result<Value, CanvasFailure>,
        mut source: TaskId,
    ) -> Result<()> {
        loop {
            match cont {
                Continuation::Done => break,
                Continuation::Links { links, errbacks, then } => {
                    match &outcome {
                        Ok(value) => {
                            for link in links {
                                self.start_once(link.clone(), Some(value), Continuation::Done).await?;
                            }
                        }
                        Err(failure) => {
                            let value = serde_json::to_value(failure)?;
                            for errback in errbacks {
                                self.start_once(errback.clone(), Some(&value), Continuation::Done).await?;
                            }
                        }
                    }
                    cont = then;
                }
                Continuation::Then { next, then } => match outcome {
                    Ok(value) => {
                        // What follows `next` travels with it.
                        self.start_once((**next).clone(), Some(&value), (**then).clone()).await?;
                        break;
                    }
                    Err(failure) => {
                        self.skip(next, &failure);
                        outcome = Err(failure);
                        cont = then;
                    }
                },
                Continuation::Member { group, index, then } => {
                    let (group, index) = (*group, *index);
                    let member = match &outcome {
                        Ok(value) => MemberOutcome {
                            task_id: source,
                            state: TaskState::Succeeded,
                            result: Some(value.clone()),
                            error: None,
                        },
                        Err(f) => MemberOutcome {
                            task_id: source,
                            state: TaskState::Failed,
                            result: None,
                            error: Some(TaskFailure::new(f.kind.clone(), f.message.clone(), false)),
                        },
                    };
                    // Batched with the member records of other tasks finishing now (one
                    // backend call for all of them); the counts are this record's own.
                    let record = MemberRecord { group, index, outcome: member };
                    let counts = batch::record_member(self.backend, record).await?;
                    // The group is complete, or failed: exactly one member carries it on.
                    // (Every member that sees a failure claims, not only failed ones: a failed
                    // member's rerun may succeed, and the slot keeps its first outcome.)
                    if counts.failed == 0 && !counts.is_done() {
                        break;
                    }
                    // Read what follows before claiming, so an unreadable continuation (an
                    // encoding error: the worker dead-letters the delivery instead of
                    // retrying it) never takes the claim with it.
                    let next = then.get()?;
                    if !self.backend.chord_claim(group).await? && !self.take_over(group).await? {
                        break;
                    }
                    let state = self.backend.group_get(group).await?.ok_or_else(|| {
                        Error::backend(format!("group {group} expired before it completed"))
                    })?;
                    outcome = group_outcome(&state);
                    let now = Utc::now();
                    self.finals.push(match &outcome {
                        Ok(values) => {
                            group_status(group, TaskState::Succeeded, Some(values.clone()), None, now)
                        }
                        Err(f) => group_status(group, TaskState::Failed, None, Some(failure_record(f)), now),
                    });
                    source = group;
                    cont = next;
                }
            }
        }
        if !self.finals.is_empty() {
            self.backend.set(std::mem::take(&mut self.finals)).await?;
        }
        Ok(())
    }

    /// Start `node` unless it was started already (claimed by its first id).
    async fn start_once(&mut self, node: Node, input: Option<&Value>, cont: Continuation) -> Result<()> {
        let marker = node.start_id();
        let key = start_claim(marker);
        self.backend.group_init(key, 1).await?;
        if !self.backend.chord_claim(key).await? {
            // Started already; unless this is a redelivery after the claimer died before
            // publishing (the started piece has no record yet).
            if !self.redelivered || self.backend.get(marker).await?.is_some() {
                return Ok(());
            }
            tracing::warn!(step = %marker, "canvas step claimed but never started; starting it now");
        }
        let mut effects = Effects::default();
        effects.start(node, input, cont, Utc::now());
        effects.apply(self.stem).await
    }

    /// After losing a group's claim: on a redelivery, take over if the winner never finished
    /// (the group has no terminal record).
    async fn take_over(&self, group: TaskId) -> Result<bool> {
        if !self.redelivered {
            return Ok(false);
        }
        let done = self.backend.get(group).await?.is_some_and(|s| s.state.is_terminal());
        if !done {
            tracing::warn!(%group, "canvas group claimed but never completed; completing it now");
        }
        Ok(!done)
    }

    /// `node` will never run because an earlier step failed: record its tasks and groups as
    /// failed with that error, so nothing waits on them.
    fn skip(&mut self, node: &Node, failure: &CanvasFailure) {
        let mut ids = Vec::new();
        node.result_ids(&mut ids);
        let now = Utc::now();
        for (id, task) in ids {
            let mut status = group_status(id, TaskState::Failed, None, Some(failure_record(failure)), now);
            status.task = task;
            self.finals.push(status);
        }
    }
}

fn failure_record(f: &CanvasFailure) -> TaskFailure {
    TaskFailure::new(f.kind.clone(), f.message.clone(), false)
}

/// A complete or failed group's outcome: the first failed member (in member order), else
/// every output in member order.
fn group_outcome(state: &GroupState) -> Result<Value, CanvasFailure> {
    let failed = state.members.iter().flatten().find(|m| m.state != TaskState::Succeeded);
    if let Some(m) = failed {
        return Err(failure_of(m.task_id, m.error.as_ref()));
    }
    Ok(Value::Array(
        state
            .members
            .iter()
            .map(|m| m.as_ref().and_then(|m| m.result.clone()).unwrap_or(Value::Null))
            .collect(),
    ))
}
