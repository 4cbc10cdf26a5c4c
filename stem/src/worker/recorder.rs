//! Records outcomes in batches, then tells the broker: the result is written before the ack,
//! so a crash between the two means a redelivery, never a lost result.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::backend::TaskStatus;
use crate::broker::Receipt;
use crate::envelope::Envelope;

use super::Shared;

const MAX_BATCH: usize = 512;
const WRITE_ATTEMPTS: u32 = 5;

/// One message to the recorder.
pub(crate) enum Record {
    /// A task started (state `running`); no broker action.
    Started(TaskStatus),
    /// An attempt ended.
    Finished { status: Option<TaskStatus>, receipt: Receipt, action: Action },
}

/// What the broker does with a finished delivery once its status is stored.
pub(crate) enum Action {
    /// Done.
    Ack,
    /// Replace with this envelope (a retry or a rate-limit delay).
    Retry(Envelope),
    /// Move to the DLQ.
    DeadLetter { envelope: Envelope, reason: &'static str, detail: String },
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

async fn write_statuses(shared: &Shared, statuses: &[TaskStatus]) -> bool {
    if statuses.is_empty() {
        return true;
    }
    let mut pause = Duration::from_millis(50);
    for attempt in 1..=WRITE_ATTEMPTS {
        match shared.backend.set(statuses).await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(worker = %shared.worker_id, error = %e, attempt, "recording task states failed");
                if attempt < WRITE_ATTEMPTS {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
    false
}

async fn process(shared: &Shared, batch: Vec<Record>) {
    let mut statuses = Vec::with_capacity(batch.len());
    let mut finished_records = Vec::with_capacity(batch.len());
    for record in batch {
        match record {
            Record::Started(s) => statuses.push(s),
            Record::Finished { status, receipt, action } => {
                statuses.extend(status);
                finished_records.push((receipt, action));
            }
        }
    }
    let recorded = write_statuses(shared, &statuses).await;
    drop(statuses);

    let mut acks = Vec::new();
    let mut finished = 0u64;
    for (receipt, action) in finished_records {
        finished += 1;
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
            Action::Retry(envelope) => shared.broker.retry(receipt, envelope).await,
            Action::DeadLetter { envelope, reason, detail } => {
                shared.broker.dead_letter(receipt, envelope, reason, detail).await
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
