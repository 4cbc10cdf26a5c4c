//! Runs one delivery: checks (expired, registered, rate limit, arguments), then the task under
//! its time limits with lease renewal, then hands the outcome to the recorder.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use chrono::Utc;
use futures_util::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::backend::{TaskFailure, TaskState, TaskStatus};
use crate::broker::{Delivery, REASON_INVALID_ARGS, REASON_MALFORMED, REASON_UNREGISTERED, Receipt};
use crate::envelope::Envelope;
use crate::signals::{
    TaskFailed, TaskPostrun, TaskPrerun, TaskReceived, TaskRetried, TaskRevoked, TaskSoftTimeLimit,
    TaskSucceeded,
};
use crate::task::context::Lease;
use crate::task::{ErasedFuture, KIND_HARD_TIME_LIMIT, KIND_PANIC, TaskContext, TaskEntry, TaskError};

use super::Shared;
use super::recorder::{Action, Record};
use super::retry::{Decision, decide};

/// How a supervised run ended.
enum Run {
    Done(Result<serde_json::Value, TaskError>),
    /// Revoked with `terminate` while running: dropped, recorded as cancelled.
    Terminated,
    /// Cold shutdown: the task was dropped and its delivery goes back to the broker.
    Released,
}

pub(crate) async fn execute(shared: Arc<Shared>, delivery: Delivery, permit: OwnedSemaphorePermit) {
    let Delivery { envelope, receipt, redelivered } = delivery;
    if redelivered {
        tracing::debug!(task = %envelope.task, id = %envelope.id, "redelivered");
    }
    let env = envelope;
    // Canvas: a chain/group/chord task carries its continuation; keep the envelope for it.
    let canvas = env.canvas.is_some().then(|| Arc::clone(&env));
    let mut record = prepare_and_run(&shared, env, receipt).await;
    let mut slot = Some(permit);
    let mut reporting = None;
    if let Some(env) = canvas {
        // The canvas bookkeeping (member records batched with other members', next steps,
        // callbacks) waits on the backend, not on the task: it gives the task's slot to the
        // next delivery and holds a reporting permit instead. Those bound how many
        // deliveries wait so, and a shutdown takes them all before it stops the recorder, so
        // no outcome is left without a recorder.
        reporting = Arc::clone(&shared.reporting).try_acquire_owned().ok();
        if reporting.is_some() {
            free_slot(&shared, &mut slot);
        }
        record = report_canvas(&shared, &env, redelivered, record).await;
    }
    if shared.record_tx.send(record).await.is_err() {
        tracing::error!(worker = %shared.worker_id, "recorder stopped; outcome dropped, the delivery will be redelivered");
    }
    free_slot(&shared, &mut slot);
    drop(reporting);
}

/// Give the delivery's worker slot back (once).
fn free_slot(shared: &Shared, slot: &mut Option<OwnedSemaphorePermit>) {
    if slot.take().is_some() {
        shared.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Canvas: once a canvas task ended for good (terminal status; never on a retry), carry its
/// outcome on (next chain step, group count, chord callback, callbacks) BEFORE its status is
/// written and its delivery acked. That bookkeeping is idempotent, so when it fails the
/// delivery is put back (same attempt, 1 s later) instead of acked, and the rerun redoes it.
async fn report_canvas(shared: &Shared, env: &Arc<Envelope>, redelivered: bool, record: Record) -> Record {
    let Record::Finished { status: Some(status), receipt, action } = record else { return record };
    if !status.state.is_terminal() {
        return Record::Finished { status: Some(status), receipt, action };
    }
    match crate::canvas::report(&shared.producer, env, &status, redelivered).await {
        Ok(()) => Record::Finished { status: Some(status), receipt, action },
        // What the envelope carries does not read (only found out when its group completes):
        // running it again cannot help, so it goes to the DLQ with the reason.
        Err(crate::Error::Encode(e)) => {
            tracing::error!(task = %env.task, id = %env.id, error = %e, "canvas continuation unreadable; dead-lettered");
            let detail = format!("canvas continuation: {e}");
            Record::Finished {
                status: Some(status),
                receipt,
                action: Action::DeadLetter {
                    envelope: Box::new((**env).clone()),
                    reason: REASON_MALFORMED,
                    detail,
                },
            }
        }
        Err(e) => {
            tracing::error!(task = %env.task, id = %env.id, error = %e, "canvas bookkeeping failed; the task will run again");
            let mut again = (**env).clone();
            again.not_before = Some(Utc::now() + chrono::Duration::seconds(1));
            Record::Finished { status: None, receipt, action: Action::Retry(Box::new(again)) }
        }
    }
}

fn finished(status: Option<TaskStatus>, receipt: Receipt, action: Action) -> Record {
    Record::Finished { status: status.map(Box::new), receipt, action }
}

fn failed_status(env: &Envelope, worker: &Arc<str>, failure: TaskFailure) -> TaskStatus {
    let mut s = TaskStatus::for_envelope(env, TaskState::Failed);
    s.error = Some(failure);
    s.worker_id = Some(Arc::clone(worker));
    s
}

async fn prepare_and_run(shared: &Arc<Shared>, env: Arc<Envelope>, receipt: Receipt) -> Record {
    let worker_id = &shared.worker_id;
    let signals = &shared.signals;
    signals.emit(|| TaskReceived { envelope: Arc::clone(&env), worker_id: Arc::clone(worker_id) });

    if env.expires.is_some() && env.is_expired(Utc::now()) {
        let mut status = TaskStatus::for_envelope(&env, TaskState::Cancelled);
        status.error = Some(TaskFailure::new("expired", format!("task expired at {:?}", env.expires), false));
        status.worker_id = Some(Arc::clone(worker_id));
        signals.emit(|| TaskRevoked {
            envelope: Arc::clone(&env),
            worker_id: Arc::clone(worker_id),
            reason: "expired".to_owned(),
        });
        return finished(Some(status), receipt, Action::Ack);
    }

    if let Some(store) = &shared.revokes {
        match store.get(env.id).await {
            Ok(Some(revocation)) => return revoked(shared, env, receipt, &revocation.reason, None),
            Ok(None) => {}
            Err(e) => tracing::warn!(id = %env.id, error = %e, "revoke check failed; running the task"),
        }
    }

    let Some(entry) = shared.registry.get(&env.task) else {
        let detail = format!("no task named `{}` is registered on worker {worker_id}", env.task);
        tracing::warn!(task = %env.task, id = %env.id, "unregistered task; dead-lettered");
        let status =
            failed_status(&env, worker_id, TaskFailure::new(REASON_UNREGISTERED, detail.clone(), false));
        let envelope = Arc::unwrap_or_clone(env);
        return finished(
            Some(status),
            receipt,
            Action::DeadLetter { envelope: Box::new(envelope), reason: REASON_UNREGISTERED, detail },
        );
    };

    if let Some(limit) = entry.options.rate_limit {
        let denied = match &shared.shared_limiter {
            Some(limiter) => match limiter.acquire(entry.name, limit).await {
                Ok(wait) => wait,
                Err(e) => {
                    tracing::warn!(task = %env.task, error = %e, "shared rate limiter failed; using this worker's");
                    shared.limiter.try_acquire(entry.name, limit).err()
                }
            },
            None => shared.limiter.try_acquire(entry.name, limit).err(),
        };
        if let Some(wait) = denied {
            let mut envelope = Arc::unwrap_or_clone(env);
            envelope.not_before =
                Some(Utc::now() + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::zero()));
            return finished(None, receipt, Action::Retry(Box::new(envelope)));
        }
    }

    let lease_length = env.visibility_timeout.unwrap_or(shared.config.visibility_timeout);
    let ctx = TaskContext::new(
        Arc::clone(&env),
        Arc::clone(worker_id),
        shared.producer.clone(),
        Lease { broker: Arc::clone(&shared.broker), receipt: receipt.clone(), length: lease_length },
    );
    let fut = match entry.start(ctx.clone(), &env.args) {
        Ok(f) => f,
        Err(e) => {
            let detail = format!("task `{}`: {e}", env.task);
            tracing::warn!(task = %env.task, id = %env.id, error = %e, "undecodable arguments; dead-lettered");
            let status =
                failed_status(&env, worker_id, TaskFailure::new(REASON_INVALID_ARGS, detail.clone(), false));
            signals.emit(|| TaskFailed {
                envelope: Arc::clone(&env),
                worker_id: Arc::clone(worker_id),
                error: TaskFailure::new(REASON_INVALID_ARGS, detail.clone(), false),
            });
            let envelope = Arc::unwrap_or_clone(env);
            return finished(
                Some(status),
                receipt,
                Action::DeadLetter { envelope: Box::new(envelope), reason: REASON_INVALID_ARGS, detail },
            );
        }
    };

    let started_at = Utc::now();
    signals.emit(|| TaskPrerun { envelope: Arc::clone(&env), worker_id: Arc::clone(worker_id) });

    let clock = Instant::now();
    if shared.revokes.is_some() {
        shared.running.lock().insert(env.id, ctx.clone());
    }
    let run = supervise(shared, fut, &env, &ctx, &receipt, lease_length, started_at).await;
    if shared.revokes.is_some() {
        shared.running.lock().remove(&env.id);
    }
    let duration = clock.elapsed();
    // The final record carries the task's last progress itself, so no backend has to merge
    // a separately stored report into it.
    let progress = ctx.last_progress();
    drop(ctx);

    let outcome = match run {
        Run::Released => return finished(None, receipt, Action::Release),
        Run::Terminated => return revoked(shared, env, receipt, "terminated while running", progress),
        Run::Done(r) => r,
    };
    let mut status = TaskStatus::for_envelope(&env, TaskState::Succeeded);
    status.started_at = Some(started_at);
    status.worker_id = Some(Arc::clone(worker_id));
    status.progress = progress;
    let (record, state) = match outcome {
        Ok(value) => {
            signals.emit(|| TaskSucceeded {
                envelope: Arc::clone(&env),
                worker_id: Arc::clone(worker_id),
                result: value.clone(),
                duration,
            });
            if !env.ignore_result {
                status.result = Some(value);
            }
            (finished(Some(status), receipt, Action::Ack), TaskState::Succeeded)
        }
        Err(error) => on_error(shared, &env, entry, status, receipt, &error),
    };
    signals.emit(|| TaskPostrun {
        envelope: Arc::clone(&env),
        worker_id: Arc::clone(worker_id),
        state,
        duration,
    });
    record
}

/// Record a revoked task as cancelled and finish its delivery.
fn revoked(
    shared: &Shared,
    env: Arc<Envelope>,
    receipt: Receipt,
    reason: &str,
    progress: Option<crate::backend::Progress>,
) -> Record {
    let mut status = TaskStatus::for_envelope(&env, TaskState::Cancelled);
    status.progress = progress;
    status.error = Some(TaskFailure::new("revoked", reason, false));
    status.worker_id = Some(Arc::clone(&shared.worker_id));
    tracing::info!(task = %env.task, id = %env.id, reason, "revoked; not run");
    shared.signals.emit(|| TaskRevoked {
        envelope: Arc::clone(&env),
        worker_id: Arc::clone(&shared.worker_id),
        reason: reason.to_owned(),
    });
    finished(Some(status), receipt, Action::Ack)
}

fn on_error(
    shared: &Shared,
    env: &Arc<Envelope>,
    entry: &TaskEntry,
    mut status: TaskStatus,
    receipt: Receipt,
    error: &TaskError,
) -> (Record, TaskState) {
    let worker_id = &shared.worker_id;
    let failure = TaskFailure::from(error);
    status.error = Some(failure.clone());
    match decide(env, &entry.options, error) {
        Decision::Retry { delay } => {
            tracing::info!(task = %env.task, id = %env.id, attempt = env.attempt, error = %error, retry_in = ?delay, "retrying");
            status.state = TaskState::Retried;
            status.finished_at = None;
            let mut next = (**env).clone();
            next.attempt += 1;
            next.not_before =
                Some(Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX));
            shared.signals.emit(|| TaskRetried {
                envelope: Arc::clone(env),
                worker_id: Arc::clone(worker_id),
                error: failure.clone(),
                delay,
            });
            (finished(Some(status), receipt, Action::Retry(Box::new(next))), TaskState::Retried)
        }
        Decision::Fail { reason } => {
            tracing::warn!(task = %env.task, id = %env.id, attempt = env.attempt, error = %error, reason, "task failed");
            status.state = TaskState::Failed;
            status.finished_at = Some(Utc::now());
            shared.signals.emit(|| TaskFailed {
                envelope: Arc::clone(env),
                worker_id: Arc::clone(worker_id),
                error: failure.clone(),
            });
            let detail = failure.to_string();
            let envelope = (**env).clone();
            (
                finished(
                    Some(status),
                    receipt,
                    Action::DeadLetter { envelope: Box::new(envelope), reason, detail },
                ),
                TaskState::Failed,
            )
        }
    }
}

fn panicked(env: &Envelope, panic: &(dyn Any + Send)) -> TaskError {
    let message = if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "task panicked".to_owned()
    };
    tracing::error!(task = %env.task, id = %env.id, panic = %message, "task panicked");
    TaskError::new(KIND_PANIC, format!("task panicked: {message}"))
}

/// Drive the task future while enforcing the hard limit, firing the soft limit, renewing the
/// lease before it runs out, and giving up the task on a cold shutdown.
async fn supervise(
    shared: &Shared,
    fut: ErasedFuture,
    env: &Arc<Envelope>,
    ctx: &TaskContext,
    receipt: &Receipt,
    lease: Duration,
    started_at: chrono::DateTime<Utc>,
) -> Run {
    let fut = AssertUnwindSafe(fut).catch_unwind();
    tokio::pin!(fut);
    // A task that finishes on its first poll is never observably running: skip that record.
    if let Poll::Ready(out) = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        return Run::Done(out.unwrap_or_else(|panic| Err(panicked(env, &*panic))));
    }
    if shared.config.track_started {
        let mut status = TaskStatus::for_envelope(env, TaskState::Running);
        status.started_at = Some(started_at);
        status.worker_id = Some(Arc::clone(&shared.worker_id));
        // Batched with other records; the final record carries started_at too.
        let _ = shared.record_tx.send(Record::Started(Box::new(status))).await;
    }
    let start = Instant::now();
    let hard_at = env.hard_time_limit.map(|d| start + d);
    let mut soft_at = env.soft_time_limit.map(|d| start + d);
    // Renew at a third of the lease so two renewals may fail before it lapses.
    let renew_every = (lease / 3).max(Duration::from_millis(10));
    let mut renew_at = start + renew_every;
    let release = shared.release.cancelled();
    tokio::pin!(release);
    loop {
        let next = [hard_at, soft_at, Some(renew_at)].into_iter().flatten().min().unwrap_or(renew_at);
        tokio::select! {
            biased;
            out = &mut fut => return Run::Done(out.unwrap_or_else(|panic| Err(panicked(env, &*panic)))),
            () = &mut release => return Run::Released,
            () = ctx.terminated() => return Run::Terminated,
            () = tokio::time::sleep_until(next) => {
                let now = Instant::now();
                if hard_at.is_some_and(|h| now >= h) {
                    let limit = env.hard_time_limit.unwrap_or_default();
                    tracing::warn!(task = %env.task, id = %env.id, ?limit, "hard time limit exceeded; task dropped");
                    return Run::Done(Err(TaskError::new(KIND_HARD_TIME_LIMIT, format!("exceeded the hard time limit of {limit:?}"))));
                }
                if soft_at.is_some_and(|s| now >= s) {
                    soft_at = None;
                    let limit = env.soft_time_limit.unwrap_or_default();
                    tracing::warn!(task = %env.task, id = %env.id, ?limit, "soft time limit exceeded; cancellation requested");
                    ctx.cancel();
                    shared.signals.emit(|| TaskSoftTimeLimit { envelope: Arc::clone(env), worker_id: Arc::clone(&shared.worker_id), limit });
                }
                if now >= renew_at {
                    renew_at = now + renew_every;
                    match shared.broker.extend_lease(receipt, lease).await {
                        Ok(true) => {}
                        Ok(false) => tracing::warn!(task = %env.task, id = %env.id, "lease lost; the task may run twice"),
                        Err(e) => tracing::warn!(task = %env.task, id = %env.id, error = %e, "lease renewal failed"),
                    }
                }
            }
        }
    }
}
