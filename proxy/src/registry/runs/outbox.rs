//! The outbox: accepting submissions (with their replay checks) and handing
//! their runs to the broker, by the accepting proxy or by the relay.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::{PENDING, RunState};
use crate::{
    error::RegistryError,
    registry::{
        Registry, TaskDef,
        schema::{submissions, task_runs},
    },
};

/// A run created (or found, on a replay) by [`Registry::accept`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The run's id.
    pub run_id: Uuid,
    /// Its task.
    pub task_id: Uuid,
    /// Whether it still needs publishing.
    pub unpublished: bool,
}

/// Why a replayed `submission_id` was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// It is stored with another form or another payload; the message says which.
    Conflict(String),
}

/// One submission's asynchronous tasks to accept.
#[derive(Debug, Clone)]
pub struct Acceptance {
    /// The form.
    pub form: Uuid,
    /// The submission (the idempotency key).
    pub submission: Uuid,
    /// The submission's payload, kept for the workers.
    pub payload: serde_json::Value,
    /// The submission's context (`plugin_api::Context`), when the backend
    /// sent one; not part of a replay's identity.
    pub context: Option<serde_json::Value>,
    /// The form's enabled asynchronous tasks.
    pub tasks: Vec<TaskDef>,
    /// The W3C traceparent of the call that accepted it, stored with its runs.
    pub trace: Option<String>,
}

/// A stored submission, as a replay is checked against it.
#[derive(Queryable, Selectable)]
#[diesel(table_name = submissions, check_for_backend(diesel::pg::Pg))]
struct StoredSubmission {
    id: Uuid,
    form_id: Uuid,
    payload: serde_json::Value,
}

/// A run [`Registry::accept`] created or found.
#[derive(Queryable, Selectable)]
#[diesel(table_name = task_runs, check_for_backend(diesel::pg::Pg))]
struct FoundRun {
    submission_id: Uuid,
    id: Uuid,
    task_id: Uuid,
    published_at: Option<DateTime<Utc>>,
    state: RunState,
}

impl Registry {
    /// Stores each submission and one queued run per asynchronous task, all
    /// in one transaction (group commit across concurrent `Process` calls).
    /// New runs become due for the relay after `grace`, in which the
    /// accepting proxy publishes them itself. Runs that already exist (a
    /// replay, a concurrent duplicate) are found instead of created. For each request, in order:
    /// its runs, or [`Replay::Conflict`] when its `submission_id` is already
    /// stored with another form or another payload (nothing is written for
    /// it then; the other requests go ahead).
    pub fn accept(
        &self,
        requests: &[Acceptance],
        grace: Duration,
    ) -> Result<Vec<Result<Vec<Accepted>, Replay>>, RegistryError> {
        let mut conn = self.conn()?;
        let due = Utc::now() + chrono::Duration::from_std(grace).unwrap_or_default();
        // Rows go in key order so concurrent batches lock in the same order.
        let mut subs: Vec<&Acceptance> = requests.iter().collect();
        subs.sort_by_key(|r| r.submission);
        let submission_rows: Vec<_> = subs
            .iter()
            .map(|r| {
                (
                    submissions::id.eq(r.submission),
                    submissions::form_id.eq(r.form),
                    submissions::payload.eq(&r.payload),
                    submissions::context.eq(&r.context),
                )
            })
            .collect();
        let ids: Vec<Uuid> = subs.iter().map(|r| r.submission).collect();
        let (conflicts, found): (Vec<Option<Replay>>, Vec<FoundRun>) = conn.transaction(|conn| {
            let inserted: Vec<Uuid> = diesel::insert_into(submissions::table)
                .values(&submission_rows)
                .on_conflict_do_nothing()
                .returning(submissions::id)
                .get_results(conn)?;
            // Submissions already stored: a replay must match what is stored,
            // or it would run this form's tasks on another form's payload.
            let replayed: Vec<Uuid> = ids.iter().filter(|id| !inserted.contains(id)).copied().collect();
            // One verdict per request (not per id: of two concurrent
            // duplicates that differ, the first stored one is fine).
            let mut conflicts: Vec<Option<Replay>> = vec![None; requests.len()];
            let mut order: Vec<usize> = (0..requests.len()).collect();
            order.sort_by_key(|&i| requests[i].submission);
            for (n, &later) in order.iter().enumerate() {
                let later_request = &requests[later];
                let earlier = order[..n]
                    .iter()
                    .map(|&i| &requests[i])
                    .find(|r| r.submission == later_request.submission);
                if let Some(first) = earlier {
                    if first.form != later_request.form || first.payload != later_request.payload {
                        conflicts[later] = Some(Replay::Conflict(format!(
                            "submission_id {} is being submitted twice at once with different forms or submissions",
                            later_request.submission
                        )));
                    }
                }
            }
            if !replayed.is_empty() {
                let stored: HashMap<Uuid, (Uuid, serde_json::Value)> = submissions::table
                    .filter(submissions::id.eq_any(&replayed))
                    .select(StoredSubmission::as_select())
                    .load(conn)?
                    .into_iter()
                    .map(|s| (s.id, (s.form_id, s.payload)))
                    .collect();
                for (i, request) in requests.iter().enumerate() {
                    let Some((form, payload)) = stored.get(&request.submission) else {
                        continue;
                    };
                    let id = request.submission;
                    if *form != request.form {
                        conflicts[i] = Some(Replay::Conflict(format!(
                            "submission_id {id} was already submitted for form {form}, not {}",
                            request.form
                        )));
                    } else if *payload != request.payload {
                        conflicts[i] = Some(Replay::Conflict(format!(
                            "submission_id {id} was already submitted with a different submission; a replay must send the same one"
                        )));
                    }
                }
            }
            let mut runs: Vec<_> = requests
                .iter()
                .zip(&conflicts)
                .filter(|(_, conflict)| conflict.is_none())
                .map(|(r, _)| r)
                .flat_map(|r| r.tasks.iter().map(move |t| (r, t)))
                .map(|(r, t)| {
                    (
                        (r.submission, t.id),
                        (
                            task_runs::id.eq(Uuid::new_v4()),
                            task_runs::submission_id.eq(r.submission),
                            task_runs::form_id.eq(r.form),
                            task_runs::task_id.eq(t.id),
                            task_runs::task_name.eq(t.name.clone()),
                            task_runs::is_async.eq(true),
                            task_runs::state.eq(RunState::Queued),
                            task_runs::max_attempts.eq(t.max_attempts),
                            task_runs::next_attempt_at.eq(due),
                            task_runs::trace_context.eq(r.trace.clone()),
                        ),
                    )
                })
                .collect();
            runs.sort_by_key(|(key, _)| *key);
            runs.dedup_by_key(|(key, _)| *key);
            let expected = runs.len();
            let runs: Vec<_> = runs.into_iter().map(|(_, row)| row).collect();
            let mut found: Vec<FoundRun> = diesel::insert_into(task_runs::table)
                .values(&runs)
                .on_conflict((task_runs::submission_id, task_runs::task_id))
                .do_nothing()
                .returning(FoundRun::as_returning())
                .get_results(conn)?;
            // Runs that existed already (a replay, a concurrent duplicate)
            // are read back; in the normal case every run was just created.
            if found.len() < expected {
                let created: Vec<Uuid> = found.iter().map(|run| run.id).collect();
                found.extend(
                    task_runs::table
                        .filter(task_runs::submission_id.eq_any(&ids))
                        .filter(task_runs::is_async.eq(true))
                        .filter(task_runs::id.ne_all(created))
                        .select(FoundRun::as_select())
                        .load::<FoundRun>(conn)?,
                );
            }
            Ok::<_, diesel::result::Error>((conflicts, found))
        })?;
        Ok(requests
            .iter()
            .zip(conflicts)
            .map(|(r, conflict)| {
                if let Some(conflict) = conflict {
                    return Err(conflict);
                }
                Ok(found
                    .iter()
                    .filter(|run| {
                        run.submission_id == r.submission
                            && r.tasks.iter().any(|t| t.id == run.task_id)
                    })
                    .map(|run| Accepted {
                        run_id: run.id,
                        task_id: run.task_id,
                        unpublished: run.published_at.is_none() && PENDING.contains(&run.state),
                    })
                    .collect())
            })
            .collect())
    }

    /// Records that the broker confirmed these freshly accepted runs. A run
    /// a worker has claimed meanwhile is left alone: marking a run that is
    /// already `retrying` published would hide its retry from the relay, and
    /// a claimed run needs no mark (the relay publishes only pending runs),
    /// so a mark that comes after the claims writes nothing.
    pub fn mark_published(&self, runs: &[Uuid]) -> Result<(), RegistryError> {
        let mut conn = self.conn()?;
        diesel::update(
            task_runs::table
                .filter(task_runs::id.eq_any(runs))
                .filter(task_runs::published_at.is_null())
                .filter(task_runs::state.eq(RunState::Queued))
                .filter(task_runs::attempts.eq(0)),
        )
        .set(task_runs::published_at.eq(diesel::dsl::now))
        .execute(&mut conn)?;
        Ok(())
    }

    /// One relay pass: locks up to `limit` due, unconfirmed runs (skipping
    /// rows another relay holds), hands their ids and trace contexts to `publish`, and marks the
    /// ones it confirmed, all in one transaction. Returns how many it confirmed.
    pub fn relay_batch(
        &self,
        limit: i64,
        publish: impl FnOnce(&[(Uuid, Option<String>)]) -> Vec<Uuid>,
    ) -> Result<usize, RegistryError> {
        let mut conn = self.conn()?;
        conn.transaction(|conn| {
            let due: Vec<(Uuid, Option<String>)> = task_runs::table
                .filter(task_runs::published_at.is_null())
                .filter(task_runs::state.eq_any(PENDING))
                .filter(task_runs::next_attempt_at.le(diesel::dsl::now))
                .order(task_runs::next_attempt_at)
                .limit(limit)
                .select((task_runs::id, task_runs::trace_context))
                .for_update()
                .skip_locked()
                .load(conn)?;
            if due.is_empty() {
                return Ok(0);
            }
            let confirmed = publish(&due);
            diesel::update(task_runs::table.filter(task_runs::id.eq_any(&confirmed)))
                .set(task_runs::published_at.eq(diesel::dsl::now))
                .execute(conn)?;
            Ok(confirmed.len())
        })
    }

    /// Hands back to the relay asynchronous runs that went quiet: published
    /// more than `stale` ago but never picked up (the message was lost, say a
    /// purged queue), or claimed by a worker whose lease expired (it stopped
    /// extending it). A run that executes for long keeps its lease extended,
    /// so task timeouts need not stay below `stale`. Returns how many.
    pub fn requeue_stale(&self, stale: Duration) -> Result<usize, RegistryError> {
        let mut conn = self.conn()?;
        let cutoff = Utc::now() - chrono::Duration::from_std(stale).unwrap_or_default();
        let unpicked = diesel::update(
            task_runs::table
                .filter(task_runs::is_async.eq(true))
                .filter(task_runs::state.eq_any(PENDING))
                .filter(task_runs::published_at.lt(cutoff)),
        )
        .set((
            task_runs::published_at.eq(None::<DateTime<Utc>>),
            task_runs::next_attempt_at.eq(diesel::dsl::now),
            task_runs::updated_at.eq(diesel::dsl::now),
        ))
        .execute(&mut conn)?;
        // A running run is orphaned once its lease expired: its worker
        // stopped extending it (it died, or lost the database). Runs claimed
        // without a lease fall back to `stale` since they started.
        let orphaned = diesel::update(
            task_runs::table
                .filter(task_runs::is_async.eq(true))
                .filter(task_runs::state.eq(RunState::Running))
                .filter(
                    task_runs::lease_until
                        .lt(diesel::dsl::now)
                        .or(task_runs::lease_until
                            .is_null()
                            .and(task_runs::started_at.lt(cutoff))),
                ),
        )
        .set((
            task_runs::state.eq(RunState::Retrying),
            task_runs::last_error.eq("no result from the worker that claimed it; re-queued"),
            task_runs::published_at.eq(None::<DateTime<Utc>>),
            task_runs::next_attempt_at.eq(diesel::dsl::now),
            task_runs::updated_at.eq(diesel::dsl::now),
        ))
        .execute(&mut conn)?;
        Ok(unpicked + orphaned)
    }
}
