//! Beat's schedule table on Postgres: a small API over `schedules`.

use chrono::{DateTime, Utc};
use stem::error::Result;

use super::{PgStore, backend_err};

/// One schedule entry as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleRow {
    /// Entry name (primary key).
    pub id: String,
    /// The entry (task, arguments, cadence, ...) as JSON; Beat defines its shape.
    pub spec: serde_json::Value,
    /// Disabled entries never fire.
    pub enabled: bool,
    /// When the entry fires next.
    pub next_run_at: Option<DateTime<Utc>>,
    /// When it last fired.
    pub last_run_at: Option<DateTime<Utc>>,
}

/// The `schedules` table of one namespace.
///
/// [`PgSchedules::advance`] is a compare-and-set on `next_run_at`: when several Beat
/// processes see the same due entry, exactly one of them moves it forward, and only that one
/// fires it.
#[derive(Clone, Debug)]
pub struct PgSchedules {
    store: PgStore,
}

type Row = (String, String, bool, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

fn row((id, spec, enabled, next_run_at, last_run_at): Row) -> Result<ScheduleRow> {
    let spec = serde_json::from_str(&spec).map_err(stem::Error::backend)?;
    Ok(ScheduleRow { id, spec, enabled, next_run_at, last_run_at })
}

impl PgSchedules {
    /// The schedules of `store`'s namespace.
    pub fn new(store: PgStore) -> Self {
        PgSchedules { store }
    }

    /// Insert or replace an entry.
    pub async fn put(&self, entry: &ScheduleRow) -> Result<()> {
        let s = self.store.schema();
        sqlx::query(&format!(
            "INSERT INTO {s}.schedules (id, spec, enabled, next_run_at, last_run_at, updated_at) \
             VALUES ($1, $2::jsonb, $3, $4, $5, now()) \
             ON CONFLICT (id) DO UPDATE SET spec = EXCLUDED.spec, enabled = EXCLUDED.enabled, \
               next_run_at = EXCLUDED.next_run_at, last_run_at = EXCLUDED.last_run_at, updated_at = now()"
        ))
        .bind(&entry.id)
        .bind(serde_json::to_string(&entry.spec).map_err(stem::Error::backend)?)
        .bind(entry.enabled)
        .bind(entry.next_run_at)
        .bind(entry.last_run_at)
        .execute(self.store.pool())
        .await
        .map_err(backend_err)?;
        Ok(())
    }

    /// One entry.
    pub async fn get(&self, id: &str) -> Result<Option<ScheduleRow>> {
        let s = self.store.schema();
        let r: Option<Row> = sqlx::query_as(&format!(
            "SELECT id, spec::text, enabled, next_run_at, last_run_at FROM {s}.schedules WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(self.store.pool())
        .await
        .map_err(backend_err)?;
        r.map(row).transpose()
    }

    /// Every entry, by name.
    pub async fn list(&self) -> Result<Vec<ScheduleRow>> {
        let s = self.store.schema();
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT id, spec::text, enabled, next_run_at, last_run_at FROM {s}.schedules ORDER BY id"
        ))
        .fetch_all(self.store.pool())
        .await
        .map_err(backend_err)?;
        rows.into_iter().map(row).collect()
    }

    /// Delete an entry; returns whether it existed.
    pub async fn delete(&self, id: &str) -> Result<bool> {
        let s = self.store.schema();
        let r = sqlx::query(&format!("DELETE FROM {s}.schedules WHERE id = $1"))
            .bind(id)
            .execute(self.store.pool())
            .await
            .map_err(backend_err)?;
        Ok(r.rows_affected() > 0)
    }

    /// Enable or disable an entry; returns whether it exists.
    pub async fn set_enabled(&self, id: &str, enabled: bool) -> Result<bool> {
        let s = self.store.schema();
        let r =
            sqlx::query(&format!("UPDATE {s}.schedules SET enabled = $2, updated_at = now() WHERE id = $1"))
                .bind(id)
                .bind(enabled)
                .execute(self.store.pool())
                .await
                .map_err(backend_err)?;
        Ok(r.rows_affected() > 0)
    }

    /// Move an enabled entry from `expected` to `next` (recording `expected` as its last
    /// run); `true` for exactly one of several callers with the same `expected`.
    pub async fn advance(
        &self,
        id: &str,
        expected: DateTime<Utc>,
        next: Option<DateTime<Utc>>,
    ) -> Result<bool> {
        let s = self.store.schema();
        let r = sqlx::query(&format!(
            "UPDATE {s}.schedules SET next_run_at = $3, last_run_at = $2, updated_at = now() \
             WHERE id = $1 AND enabled AND next_run_at = $2"
        ))
        .bind(id)
        .bind(expected)
        .bind(next)
        .execute(self.store.pool())
        .await
        .map_err(backend_err)?;
        Ok(r.rows_affected() > 0)
    }
}
