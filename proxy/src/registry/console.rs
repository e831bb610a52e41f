//! What the web console reads and changes: runs by filter with keyset
//! pagination, one run with its attempt log, runs per minute, and a task's
//! enabled flag. Runs come from both tables: the outbox (`task_runs`,
//! asynchronous runs) and the run log (`sync_runs`, synchronous runs, the
//! first record per submission and task; their creation time is their
//! start).

use chrono::{DateTime, Utc};
use diesel::{
    prelude::*,
    sql_types::{BigInt, Text, Timestamptz},
};
use uuid::Uuid;

use super::{
    Registry, Run, RunState,
    runs::{FIRST_RECORD, SYNC_COLUMNS, SyncRunRow, run_attempts},
    schema::{sync_runs, task_runs, tasks},
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
    /// OFFSET). Each table gives its first `limit` in the same order, on
    /// its own index, and the two are merged.
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
        let mut runs = query.load(&mut conn)?;
        // Synchronous runs end succeeded or dead.
        if filter
            .state
            .is_some_and(|s| s != RunState::Succeeded && s != RunState::Dead)
        {
            return Ok(runs);
        }
        // Placeholders are numbered as the binds are added.
        let mut binds = 0;
        let mut next = || {
            binds += 1;
            format!("${binds}")
        };
        let mut logged = diesel::sql_query(format!(
            "SELECT {SYNC_COLUMNS} FROM sync_runs s WHERE {FIRST_RECORD}"
        ))
        .into_boxed::<diesel::pg::Pg>();
        if let Some(form) = filter.form {
            logged = logged
                .sql(format!(" AND s.form_id = {}", next()))
                .bind::<diesel::sql_types::Uuid, _>(form);
        }
        if let Some(task) = &filter.task {
            logged = logged
                .sql(format!(" AND s.task_name = {}", next()))
                .bind::<Text, _>(task.clone());
        }
        if let Some(state) = filter.state {
            logged = logged
                .sql(format!(" AND s.state = {}", next()))
                .bind::<Text, _>(state);
        }
        if let Some(since) = filter.since {
            logged = logged
                .sql(format!(" AND s.started_at >= {}", next()))
                .bind::<Timestamptz, _>(since);
        }
        if let Some((at, id)) = after {
            logged = logged
                .sql(format!(
                    " AND (s.started_at, s.id) < ({}, {})",
                    next(),
                    next()
                ))
                .bind::<Timestamptz, _>(at)
                .bind::<diesel::sql_types::Uuid, _>(id);
        }
        let logged: Vec<SyncRunRow> = logged
            .sql(format!(
                " ORDER BY s.started_at DESC, s.id DESC LIMIT {}",
                next()
            ))
            .bind::<BigInt, _>(limit)
            .load(&mut conn)?;
        if !logged.is_empty() {
            runs.extend(logged.into_iter().map(Run::from));
            runs.sort_by_key(|run| std::cmp::Reverse((run.created_at, run.id)));
            runs.truncate(usize::try_from(limit).unwrap_or(0));
        }
        Ok(runs)
    }

    /// One run, if it exists: an asynchronous one, or a record of the run
    /// log (also a replay's, which lists do not show).
    pub fn run(&self, id: Uuid) -> Result<Option<Run>, RegistryError> {
        let mut conn = self.conn()?;
        let run = task_runs::table
            .find(id)
            .select(Run::as_select())
            .first(&mut conn)
            .optional()?;
        if run.is_some() {
            return Ok(run);
        }
        Ok(sync_runs::table
            .filter(sync_runs::id.eq(id))
            .select(SyncRunRow::as_select())
            .first(&mut conn)
            .optional()?
            .map(Run::from))
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
    /// Synchronous runs count by their start, every record of the run log:
    /// a replayed submission's tasks ran again, and count again.
    pub fn runs_per_minute(&self, minutes: i64) -> Result<Vec<MinuteCount>, RegistryError> {
        let mut conn = self.conn()?;
        Ok(diesel::sql_query(
            "SELECT minute, standing, sum(runs)::bigint AS runs FROM ( \
                 SELECT date_trunc('minute', created_at) AS minute, \
                        CASE WHEN state = 'succeeded' THEN 'succeeded' \
                             WHEN state IN ('dead', 'failed', 'timed_out') THEN 'failed' \
                             ELSE 'pending' END AS standing, \
                        count(*) AS runs \
                 FROM task_runs WHERE created_at >= now() - make_interval(mins => $1::int) \
                 GROUP BY 1, 2 \
                 UNION ALL \
                 SELECT date_trunc('minute', started_at), \
                        CASE WHEN state = 'succeeded' THEN 'succeeded' ELSE 'failed' END, \
                        count(*) \
                 FROM sync_runs WHERE started_at >= now() - make_interval(mins => $1::int) \
                 GROUP BY 1, 2) m \
             GROUP BY 1, 2 ORDER BY 1, 2",
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
