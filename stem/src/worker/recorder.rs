//! Records outcomes in batches, then tells the broker: the result is written before the ack,
//! so a crash between the two means a redelivery, never a lost result.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

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

pub(crate) async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Record>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        tokio::select! {
            biased;
            msg = rx.recv() => match msg {
                Some(m) => batch.push(m),
                None => return,
            },
            () = shared.recorder_done.cancelled() => {
                while let Ok(m) = rx.try_recv() {
                    batch.push(m);
                }
                process(&shared, std::mem::take(&mut batch)).await;
                return;
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        process(&shared, std::mem::take(&mut batch)).await;
        batch.reserve(MAX_BATCH);
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
