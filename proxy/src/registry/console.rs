//! What the web console reads and changes: runs by filter with keyset
//! pagination, one run with its attempt log, runs per minute, and a task's
//! enabled flag.

use chrono::{DateTime, Utc};
use diesel::{
    prelude::*,
    sql_types::{BigInt, Text, Timestamptz},
};
use uuid::Uuid;

use super::{
    Registry, Run, RunState,
    runs::run_attempts,
    schema::{task_runs, tasks},
};
use crate::error::RegistryError;

/// Which runs a console page lists.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunFilter {
    /// Only this form's.
    pub form: Option<Uuid>,
    /// Only runs of tasks with this name.
    pub task: Option<String>,
    /// Only runs in this state.
    pub state: Option<RunState>,
    /// Only runs created at or after this time.
    pub since: Option<DateTime<Utc>>,
}

/// One execution of a run, as the console shows it.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = run_attempts, check_for_backend(diesel::pg::Pg))]
pub struct AttemptRecord {
    /// Its number, from 1.
    pub attempt: i32,
    /// The worker that ran it.
    pub worker: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// How it ended.
    pub outcome: String,
    /// Why it failed.
    pub error: Option<String>,
}

/// Runs created in one minute, by how they stand.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct MinuteCount {
    /// The minute.
    #[diesel(sql_type = Timestamptz)]
    pub minute: DateTime<Utc>,
    /// `succeeded`, `failed` (dead, or a failed synchronous run) or `pending`.
    #[diesel(sql_type = Text)]
    pub standing: String,
    /// How many.
    #[diesel(sql_type = BigInt)]
    pub runs: i64,
}

impl Registry {
    /// Up to `limit` runs matching `filter`, newest first, created before
    /// `after` (the last row of the previous page: keyset pagination, no
    /// OFFSET).
    pub fn runs_page(
        &self,
        filter: &RunFilter,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<Vec<Run>, RegistryError> {
        let mut conn = self.conn()?;
        let mut query = task_runs::table
            .order((task_runs::created_at.desc(), task_runs::id.desc()))
            .limit(limit)
            .select(Run::as_select())
            .into_boxed();
        if let Some(form) = filter.form {
            query = query.filter(task_runs::form_id.eq(form));
        }
        if let Some(task) = &filter.task {
            query = query.filter(task_runs::task_name.eq(task.clone()));
        }
        if let Some(state) = filter.state {
            query = query.filter(task_runs::state.eq(state));
        }
        if let Some(since) = filter.since {
            query = query.filter(task_runs::created_at.ge(since));
        }
        if let Some((at, id)) = after {
            query = query.filter(
                task_runs::created_at
                    .lt(at)
                    .or(task_runs::created_at.eq(at).and(task_runs::id.lt(id))),
            );
        }
        Ok(query.load(&mut conn)?)
    }

    /// One run, if it exists.
    pub fn run(&self, id: Uuid) -> Result<Option<Run>, RegistryError> {
        let mut conn = self.conn()?;
        Ok(task_runs::table
            .find(id)
            .select(Run::as_select())
            .first(&mut conn)
            .optional()?)
    }

    /// A run's executions, with their workers and errors, in order.
    pub fn attempt_log(&self, run: Uuid) -> Result<Vec<AttemptRecord>, RegistryError> {
        let mut conn = self.conn()?;
        Ok(run_attempts::table
            .filter(run_attempts::run_id.eq(run))
            .order((run_attempts::started_at, run_attempts::attempt))
            .select(AttemptRecord::as_select())
            .load(&mut conn)?)
    }

    /// Runs created in each minute of the last `minutes`, by standing.
    pub fn runs_per_minute(&self, minutes: i64) -> Result<Vec<MinuteCount>, RegistryError> {
        let mut conn = self.conn()?;
        Ok(diesel::sql_query(
            "SELECT date_trunc('minute', created_at) AS minute, \
                    CASE WHEN state = 'succeeded' THEN 'succeeded' \
                         WHEN state IN ('dead', 'failed', 'timed_out') THEN 'failed' \
                         ELSE 'pending' END AS standing, \
                    count(*) AS runs \
             FROM task_runs WHERE created_at >= now() - make_interval(mins => $1::int) \
             GROUP BY 1, 2 ORDER BY 1",
        )
        .bind::<BigInt, _>(minutes)
        .load(&mut conn)?)
    }

    /// Re-queues the dead asynchronous runs that match `filter` (at most
    /// 10,000 at once) with a fresh set of attempts; returns their ids.
    pub fn retry_dead_matching(&self, filter: &RunFilter) -> Result<Vec<Uuid>, RegistryError> {
        let filter = RunFilter {
            state: Some(RunState::Dead),
            ..filter.clone()
        };
        let ids: Vec<Uuid> = self
            .runs_page(&filter, None, 10_000)?
            .into_iter()
            .filter(|run| run.is_async)
            .map(|run| run.id)
            .collect();
        self.retry_dead_ids(&ids)
    }

    /// Enables or disables a task; false if there is no such task.
    pub fn set_task_enabled(&self, task: Uuid, enabled: bool) -> Result<bool, RegistryError> {
        let mut conn = self.conn()?;
        Ok(diesel::update(tasks::table.find(task))
            .set(tasks::enabled.eq(enabled))
            .execute(&mut conn)?
            > 0)
    }
}
