//! Enqueueing a canvas and the typed handle to its outcome.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde::de::DeserializeOwned;

use super::plan::{Continuation, plan};
use super::runtime::Effects;
use super::{NoInput, Step};
use crate::backend::{GroupCounts, GroupState, ResultBackend, TaskStatus};
use crate::envelope::TaskId;
use crate::error::{Error, Result};
use crate::producer::Stem;
use crate::result::{TaskHandle, WaitError};

/// A typed handle to an enqueued canvas; `T` is its output: a chain's last step's, a group's
/// `Vec` of member outputs (in member order), a chord's callback's.
pub struct CanvasHandle<T> {
    result: TaskHandle<T>,
    group: Option<TaskId>,
    backend: Arc<dyn ResultBackend>,
}

impl<T> Clone for CanvasHandle<T> {
    fn clone(&self) -> Self {
        CanvasHandle { result: self.result.clone(), group: self.group, backend: Arc::clone(&self.backend) }
    }
}

impl<T> std::fmt::Debug for CanvasHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CanvasHandle").field("id", &self.result.id()).field("group", &self.group).finish()
    }
}

impl<T> CanvasHandle<T> {
    /// The id whose status record carries the canvas's outcome (a chain's last step, a
    /// group's own id, a chord's callback).
    pub fn id(&self) -> TaskId {
        self.result.id()
    }

    /// The group whose members [`CanvasHandle::progress`] counts: the canvas's own group, or
    /// a chord's header.
    pub fn group_id(&self) -> Option<TaskId> {
        self.group
    }

    /// The handle to the outcome record.
    pub fn task_handle(&self) -> &TaskHandle<T> {
        &self.result
    }

    /// The outcome record, if any.
    pub async fn status(&self) -> Result<Option<TaskStatus>> {
        self.result.status().await
    }

    /// Members finished so far (succeeded and failed) of the group or chord header; `None`
    /// for other shapes, or once the group state expired.
    pub async fn progress(&self) -> Result<Option<GroupCounts>> {
        Ok(self.group_state().await?.map(|g| g.counts))
    }

    /// The group's (or chord header's) per-member outcomes, in member order.
    pub async fn group_state(&self) -> Result<Option<GroupState>> {
        match self.group {
            Some(id) => self.backend.group_get(id).await,
            None => Ok(None),
        }
    }

    /// Wait for a terminal record without decoding it.
    pub async fn wait_status(&self, timeout: Duration) -> Result<TaskStatus, WaitError> {
        self.result.wait_status(timeout).await
    }
}

impl<T: DeserializeOwned> CanvasHandle<T> {
    /// Wait up to `timeout` for the canvas's output. A failed step (after its retries) fails
    /// the canvas with that step's error.
    pub async fn wait(&self, timeout: Duration) -> Result<T, WaitError> {
        self.result.wait(timeout).await
    }
}

impl Stem {
    /// Enqueue a canvas (a typed [`Chain`](super::Chain), [`Group`](super::Group),
    /// [`Chord`](super::Chord), a [`Signature`](crate::Signature), `canvas!(..)`, or an
    /// untyped [`Canvas`](super::Canvas)).
    ///
    /// Every envelope is built and every id assigned now; the first tasks are published and
    /// the rest travels in their envelopes, started by the workers that finish the steps
    /// before them. Fails on an empty group or chain, on arguments that cannot be encoded,
    /// and (with a registry) on unknown task names.
    pub async fn enqueue_canvas<C>(&self, canvas: C) -> Result<CanvasHandle<C::Output>>
    where
        C: Step<NoInput>,
    {
        let node = plan(self, canvas.into_canvas())?;
        let result = node.result_id();
        let group = node.progress_group();
        let mut effects = Effects::default();
        effects.start(node, None, Continuation::Done, Utc::now());
        effects.apply(self).await.map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("canvas: {m}")),
            e => e,
        })?;
        Ok(CanvasHandle {
            result: TaskHandle::new(result, Arc::clone(self.backend())),
            group,
            backend: Arc::clone(self.backend()),
        })
    }
}
