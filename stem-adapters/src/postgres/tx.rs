//! Transactional enqueue: the job row and its queued status are written inside the caller's
//! transaction, so the task exists if and only if the transaction commits.

use std::time::Duration;

use sqlx::{Postgres, Transaction};
use stem::backend::{DEFAULT_RESULT_TTL, TaskState, TaskStatus};
use stem::error::Result;
use stem::{Signature, Stem, Task, TaskHandle};

use super::{PgStore, backend, broker, db_err};

/// Enqueue `sig` inside `tx`, on the jobs table of `store`'s namespace.
///
/// The envelope is built by `stem` exactly as [`Stem::enqueue`] would (task defaults, call
/// options, default queue); the job row and a `queued` status record (kept for
/// [`DEFAULT_RESULT_TTL`]) are inserted with `tx`, and the NOTIFY that wakes consumers is
/// delivered by Postgres only at commit. Roll back and nothing was enqueued; commit and
/// workers see it at once. The returned handle waits through `stem`'s backend, so use a
/// [`PgBackend`](super::PgBackend) on the same namespace to see the queued record.
///
/// Unique calls (`unique_for`) are refused with [`stem::Error::Config`]: the unique claim
/// lives outside the transaction. Publish signals are not emitted.
///
/// ```no_run
/// # async fn demo(stem: stem::Stem, store: stem_adapters::postgres::PgStore,
/// #               sig: stem::Signature<impl stem::Task>) -> Result<(), stem::Error> {
/// let mut tx = store.pool().begin().await.map_err(stem::Error::broker)?;
/// // ... the application's own writes on `tx` ...
/// let handle = stem_adapters::postgres::enqueue_tx(&stem, &store, &mut tx, sig).await?;
/// tx.commit().await.map_err(stem::Error::broker)?;
/// # let _ = handle; Ok(()) }
/// ```
pub async fn enqueue_tx<T: Task>(
    stem: &Stem,
    store: &PgStore,
    tx: &mut Transaction<'_, Postgres>,
    sig: Signature<T>,
) -> Result<TaskHandle<T::Output>> {
    if sig.options.unique_for.or(T::OPTIONS.unique_for).is_some() {
        return Err(stem::Error::Config(format!(
            "task `{}` asks for unique_for, which transactional enqueue does not support",
            T::NAME
        )));
    }
    let env = stem.envelope(&sig)?;
    let id = env.id;
    let statuses = backend::StatusRows::new(vec![TaskStatus::for_envelope(&env, TaskState::Queued)])?;
    let mut rows = broker::JobRows::default();
    rows.push(&env)?;
    let sql = store.broker_sql();
    let query = statuses.bind_to(sqlx::query(&sql.record_and_publish), ttl(), store.channel());
    rows.bind_to(query).execute(&mut **tx).await.map_err(db_err)?;
    Ok(stem.handle(id))
}

fn ttl() -> Duration {
    DEFAULT_RESULT_TTL
}
