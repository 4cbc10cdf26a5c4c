//! Records outcomes in batches, then tells the broker: the result is written before the ack,
//! so a crash between the two means a redelivery, never a lost result.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::backend::TaskStatus;
use crate::broker::Receipt;
use crate::envelope::Envelope;

use super::Shared;

const MAX_BATCH: usize = 512;

/// One message to the recorder.
pub(crate) enum Record {
    /// A task started (state `running`); no broker action.
    Started(Box<TaskStatus>),
    /// An attempt ended.
    Finished { status: Option<Box<TaskStatus>>, receipt: Receipt, action: Action },
}

/// What the broker does with a finished delivery once its status is stored.
pub(crate) enum Action {
    /// Done.
    Ack,
    /// Replace with this envelope (a retry or a rate-limit delay).
    Retry(Box<Envelope>),
    /// Move to the DLQ.
    DeadLetter { envelope: Box<Envelope>, reason: &'static str, detail: String },
    /// Give back for redelivery (shutdown).
    Release,
}

/// Outcome batches being written at once. While one batch waits for its commit, the next
/// one is already on its way, so the backend can flush both with one disk write (Postgres
/// merges commits that arrive together). Within a batch, every delivery is still acked only
/// after its outcome is stored. Batches of finished-and-acked deliveries with terminal
/// records may complete out of order: a terminal record is never replaced by a late
/// `running` of the same attempt (`TaskStatus::may_replace`, which every backend applies),
/// and acks are lease-fenced. A batch that could be overtaken by a late `running` (a retry's
/// non-terminal record) or that moves deliveries (retry, dead-letter, release) waits until
/// every earlier batch is written (see [`needs_order`]).
const MAX_IN_FLIGHT: usize = 2;

/// Whether `record` must be written after every earlier batch: anything but a delivery that
/// ended with a terminal record and an ack.
fn needs_order(record: &Record) -> bool {
    match record {
        Record::Started(_) => false,
        Record::Finished { status, action, .. } => {
            !matches!(action, Action::Ack) || status.as_ref().is_some_and(|s| !s.state.is_terminal())
        }
    }
}

pub(crate) async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Record>) {
    let mut writes = JoinSet::new();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        while let Some(done) = writes.try_join_next() {
            log_panic(&shared, done);
        }
        if writes.len() >= MAX_IN_FLIGHT {
            if let Some(done) = writes.join_next().await {
                log_panic(&shared, done);
            }
            continue;
        }
        tokio::select! {
            biased;
            msg = rx.recv() => match msg {
                Some(m) => batch.push(m),
                None => break,
            },
            () = shared.recorder_done.cancelled() => {
                while let Ok(m) = rx.try_recv() {
                    batch.push(m);
                }
                process(&shared, std::mem::take(&mut batch)).await;
                break;
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let batch = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
        if batch.iter().any(needs_order) {
            while let Some(done) = writes.join_next().await {
                log_panic(&shared, done);
            }
        }
        let shared = Arc::clone(&shared);
        writes.spawn(async move { process(&shared, batch).await });
    }
    // Every write started is finished before the worker reports that it stopped.
    while let Some(done) = writes.join_next().await {
        log_panic(&shared, done);
    }
}

/// A batch whose write panicked: what it had not acked yet is redelivered after its lease.
fn log_panic(shared: &Shared, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(worker = %shared.worker_id, error = %e, "recording a batch of outcomes failed; its deliveries will be redelivered");
    }
}

/// Write the batch's records. On failure nothing is acked: the deliveries' leases lapse and
/// the tasks are redelivered, so a backend outage costs a rerun, never a lost result.
async fn write_statuses(shared: &Shared, statuses: Vec<TaskStatus>) -> bool {
    if statuses.is_empty() {
        return true;
    }
    match shared.backend.set(statuses).await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(worker = %shared.worker_id, error = %e, "recording task states failed");
            false
        }
    }
}

async fn process(shared: &Shared, batch: Vec<Record>) {
    let mut statuses = Vec::with_capacity(batch.len());
    let mut finished_records = Vec::with_capacity(batch.len());
    for record in batch {
        match record {
            Record::Started(s) => statuses.push(*s),
            Record::Finished { status, receipt, action } => {
                statuses.extend(status.map(|s| *s));
                finished_records.push((receipt, action));
            }
        }
    }
    let finished = finished_records.len() as u64;

    // The common case, every delivery simply done: one combined call, which adapters that
    // keep statuses and deliveries in one store turn into a single round trip.
    if finished_records.iter().all(|(_, action)| matches!(action, Action::Ack)) {
        let acks: Vec<Receipt> = finished_records.into_iter().map(|(receipt, _)| receipt).collect();
        if let Err(e) = shared.broker.record_and_ack(&*shared.backend, statuses, acks).await {
            tracing::error!(worker = %shared.worker_id, error = %e, "recording outcomes failed; the deliveries will be redelivered");
        }
        shared.processed.fetch_add(finished, Ordering::Relaxed);
        return;
    }

    let recorded = write_statuses(shared, statuses).await;
    let mut acks = Vec::new();
    for (receipt, action) in finished_records {
        let outcome = match action {
            // Never tell the broker a task is done when its outcome is not stored: the lease
            // expires and the task is redelivered instead.
            _ if !recorded && !matches!(action, Action::Release) => {
                tracing::error!(worker = %shared.worker_id, tag = %receipt.tag, "outcome not recorded; leaving the delivery to expire and be redelivered");
                Ok(true)
            }
            Action::Ack => {
                acks.push(receipt);
                Ok(true)
            }
            Action::Retry(envelope) => shared.broker.retry(receipt, *envelope).await,
            Action::DeadLetter { envelope, reason, detail } => {
                shared.broker.dead_letter(receipt, *envelope, reason, detail).await
            }
            Action::Release => shared.broker.nack(receipt, true).await,
        };
        match outcome {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(worker = %shared.worker_id, "lease was lost before the outcome reached the broker; another worker owns the task now")
            }
            Err(e) => {
                tracing::error!(worker = %shared.worker_id, error = %e, "broker update failed; the delivery will be redelivered")
            }
        }
    }
    if !acks.is_empty() {
        if let Err(e) = shared.broker.ack(acks).await {
            tracing::error!(worker = %shared.worker_id, error = %e, "ack failed; the deliveries will be redelivered");
        }
    }
    shared.processed.fetch_add(finished, Ordering::Relaxed);
}
