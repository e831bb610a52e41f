//! The run log: finished synchronous runs, written after `Process` answered.

use chrono::{DateTime, Utc};
use diesel::RunQueryDsl;
use uuid::Uuid;

use crate::{error::RegistryError, registry::Registry};

/// A finished synchronous run, for the log (one attempt, never published).
#[derive(Debug, Clone)]
pub struct SyncRun {
    /// A new run id.
    pub id: Uuid,
    /// The submission.
    pub submission_id: Uuid,
    /// Its form.
    pub form_id: Uuid,
    /// The task.
    pub task_id: Uuid,
    /// The task's name.
    pub task_name: String,
    /// `succeeded` or `dead`.
    pub state: &'static str,
    /// Why it failed.
    pub last_error: Option<String>,
    /// What it returned.
    pub output: Option<serde_json::Value>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: DateTime<Utc>,
}

impl Registry {
    /// Writes finished synchronous runs; a replayed submission keeps its
    /// first record. One statement of ten array parameters whatever the
    /// batch's size, so PostgreSQL parses and plans it in constant time.
    pub fn record_sync_runs(&self, runs: &[SyncRun]) -> Result<(), RegistryError> {
        use diesel::sql_types::{Array, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid};
        if runs.is_empty() {
            return Ok(());
        }
        let column = |f: fn(&SyncRun) -> Uuid| runs.iter().map(f).collect::<Vec<_>>();
        let mut conn = self.conn()?;
        diesel::sql_query(
            "INSERT INTO task_runs (id, submission_id, form_id, task_id, task_name, is_async, \
                 state, attempts, max_attempts, last_error, output, started_at, finished_at) \
             SELECT id, submission_id, form_id, task_id, task_name, false, state, 1, 1, \
                 last_error, output, started_at, finished_at \
             FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 AS r(id, submission_id, form_id, task_id, task_name, state, last_error, \
                      output, started_at, finished_at) \
             ON CONFLICT (submission_id, task_id) DO NOTHING",
        )
        .bind::<Array<SqlUuid>, _>(column(|r| r.id))
        .bind::<Array<SqlUuid>, _>(column(|r| r.submission_id))
        .bind::<Array<SqlUuid>, _>(column(|r| r.form_id))
        .bind::<Array<SqlUuid>, _>(column(|r| r.task_id))
        .bind::<Array<Text>, _>(
            runs.iter()
                .map(|r| r.task_name.as_str())
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Text>, _>(runs.iter().map(|r| r.state).collect::<Vec<_>>())
        .bind::<Array<Nullable<Text>>, _>(
            runs.iter()
                .map(|r| r.last_error.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<Jsonb>>, _>(
            runs.iter().map(|r| r.output.as_ref()).collect::<Vec<_>>(),
        )
        .bind::<Array<Timestamptz>, _>(runs.iter().map(|r| r.started_at).collect::<Vec<_>>())
        .bind::<Array<Timestamptz>, _>(runs.iter().map(|r| r.finished_at).collect::<Vec<_>>())
        .execute(&mut conn)?;
        Ok(())
    }
}
