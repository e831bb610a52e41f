//! The read side: runs and their attempts for `GetRuns` and the CLI, and
//! retrying dead runs. Asynchronous runs come from `task_runs`,
//! synchronous ones from the run log, `sync_runs`, where a replayed
//! submission may have more than one record per task: only the first (by
//! `started_at`, then id) is shown.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::{Run, RunState, log::SyncRunRow, run_attempts};
use crate::{
    error::RegistryError,
    registry::{
        Registry, RunFilter,
        schema::{task_run_attempts, task_runs},
    },
};

/// The columns of `sync_runs s` that [`SyncRunRow`] reads.
pub(crate) const SYNC_COLUMNS: &str = "s.id, s.submission_id, s.form_id, s.task_id, s.task_name, \
     s.state, s.error, s.output, s.started_at, s.finished_at";

/// True for the first record of its (submission, task) in the run log,
/// `sync_runs s`: a replayed submission's later records are not shown. The
/// probe is one lookup in `sync_runs_submission_idx` (of the partitions not
/// later than the row's, pruned at run time).
pub(crate) const FIRST_RECORD: &str = "NOT EXISTS (SELECT 1 FROM sync_runs e \
     WHERE e.submission_id = s.submission_id AND e.task_id = s.task_id \
       AND e.started_at <= s.started_at AND (e.started_at, e.id) < (s.started_at, s.id))";

/// One execution of a run: (attempt, started, finished, outcome).
pub type Attempt = (i32, DateTime<Utc>, DateTime<Utc>, String);

impl Registry {
    /// Every run of a submission, in creation order (a synchronous run is
    /// created when it starts), one per task: asynchronous runs from the
    /// outbox, synchronous ones the first record of each task in the run log.
    pub fn runs_for_submission(&self, submission: Uuid) -> Result<Vec<Run>, RegistryError> {
        let mut conn = self.conn()?;
        let mut runs = task_runs::table
            .filter(task_runs::submission_id.eq(submission))
            .order((task_runs::created_at, task_runs::id))
            .select(Run::as_select())
            .load(&mut conn)?;
        let logged: Vec<SyncRunRow> = diesel::sql_query(format!(
            "SELECT DISTINCT ON (s.task_id) {SYNC_COLUMNS} FROM sync_runs s \
             WHERE s.submission_id = $1 ORDER BY s.task_id, s.started_at, s.id"
        ))
        .bind::<diesel::sql_types::Uuid, _>(submission)
        .load(&mut conn)?;
        if !logged.is_empty() {
            runs.extend(logged.into_iter().map(Run::from));
            runs.sort_by_key(|run| (run.created_at, run.id));
        }
        Ok(runs)
    }

    /// Runs, newest first, filtered by state and form: the console's first
    /// page of [`Registry::runs_page`].
    pub fn list_runs(
        &self,
        state: Option<RunState>,
        form: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Run>, RegistryError> {
        let filter = RunFilter {
            form,
            state,
            ..RunFilter::default()
        };
        self.runs_page(&filter, None, limit)
    }

    /// Re-queues dead asynchronous runs (one, or all) with a fresh set of
    /// attempts; returns the ids re-queued.
    pub fn retry_dead(&self, run: Option<Uuid>) -> Result<Vec<Uuid>, RegistryError> {
        let mut conn = self.conn()?;
        let mut target = task_runs::table
            .filter(task_runs::state.eq(RunState::Dead))
            .filter(task_runs::is_async.eq(true))
            .into_boxed();
        if let Some(run) = run {
            target = target.filter(task_runs::id.eq(run));
        }
        let ids: Vec<Uuid> = target.select(task_runs::id).load(&mut conn)?;
        self.retry_dead_ids(&ids)
    }

    /// Re-queues those of `runs` that are dead and asynchronous, in one
    /// transaction; returns the ids re-queued. Each run's last execution,
    /// recorded on the run, moves to `task_run_attempts` first, so its
    /// history survives the fresh set of attempts.
    pub fn retry_dead_ids(&self, runs: &[Uuid]) -> Result<Vec<Uuid>, RegistryError> {
        let mut conn = self.conn()?;
        conn.transaction(|conn| {
            let dead = task_runs::table
                .filter(task_runs::id.eq_any(runs))
                .filter(task_runs::state.eq(RunState::Dead))
                .filter(task_runs::is_async.eq(true));
            diesel::insert_into(task_run_attempts::table)
                .values(
                    dead.clone()
                        .filter(task_runs::finished_by.is_not_null())
                        .filter(task_runs::started_at.is_not_null())
                        .filter(task_runs::finished_at.is_not_null())
                        .select((
                            task_runs::id,
                            task_runs::attempts,
                            task_runs::finished_by.assume_not_null(),
                            task_runs::started_at.assume_not_null(),
                            task_runs::finished_at.assume_not_null(),
                            task_runs::state,
                            task_runs::last_error,
                        )),
                )
                .into_columns((
                    task_run_attempts::run_id,
                    task_run_attempts::attempt,
                    task_run_attempts::worker,
                    task_run_attempts::started_at,
                    task_run_attempts::finished_at,
                    task_run_attempts::outcome,
                    task_run_attempts::error,
                ))
                .on_conflict_do_nothing()
                .execute(conn)?;
            Ok(diesel::update(dead)
                .set((
                    task_runs::state.eq(RunState::Queued),
                    task_runs::attempts.eq(0),
                    task_runs::throttled_ms.eq(0),
                    task_runs::slot_at.eq(None::<DateTime<Utc>>),
                    task_runs::next_attempt_at.eq(diesel::dsl::now),
                    task_runs::published_at.eq(None::<DateTime<Utc>>),
                    task_runs::finished_at.eq(None::<DateTime<Utc>>),
                    task_runs::finished_by.eq(None::<String>),
                    task_runs::updated_at.eq(diesel::dsl::now),
                ))
                .returning(task_runs::id)
                .get_results(conn)?)
        })
    }

    /// The executions of a run, in order.
    pub fn attempts(&self, run: Uuid) -> Result<Vec<Attempt>, RegistryError> {
        let mut conn = self.conn()?;
        Ok(run_attempts::table
            .filter(run_attempts::run_id.eq(run))
            .order((run_attempts::started_at, run_attempts::attempt))
            .select((
                run_attempts::attempt,
                run_attempts::started_at,
                run_attempts::finished_at,
                run_attempts::outcome,
            ))
            .load(&mut conn)?)
    }
}
