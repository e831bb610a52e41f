//! Accepting submissions: each new submission and its runs in one
//! statement, and the replay checks for those stored before.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use chrono::{DateTime, Utc};
use diesel::{
    PgConnection,
    prelude::*,
    sql_types::{Array, Integer, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid},
};
use uuid::Uuid;

use super::super::{PENDING, RunState, new_run_id};
use crate::{
    error::RegistryError,
    registry::{
        Registry, TaskDef,
        cached::cached_sql,
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
    /// Stores each submission and one queued run per asynchronous task
    /// (group commit across concurrent `Process` calls). New runs become due
    /// for the relay after `grace`, in which the accepting proxy publishes
    /// them itself. Runs that already exist (a replay, a concurrent
    /// duplicate) are found instead of created. For each request, in order:
    /// its runs, or [`Replay::Conflict`] when its `submission_id` is already
    /// stored with another form or another payload (nothing is written for
    /// it then; the other requests go ahead).
    ///
    /// New submissions and their runs are one statement (one round trip,
    /// atomic without a transaction of its own, prepared once per
    /// connection); only replays take a second, transactional step.
    pub fn accept(
        &self,
        requests: &[Acceptance],
        grace: Duration,
    ) -> Result<Vec<Result<Vec<Accepted>, Replay>>, RegistryError> {
        let mut conn = self.conn()?;
        let due = Utc::now() + chrono::Duration::from_std(grace).unwrap_or_default();
        let mut conflicts = twins_that_differ(requests);
        let (fresh, mut found) = insert_new(&mut conn, requests, &conflicts, due)?;
        // Whatever the statement did not store whole was stored before (a
        // replay, or a concurrent duplicate that committed first).
        let replayed: Vec<usize> = (0..requests.len())
            .filter(|&i| conflicts[i].is_none())
            .filter(|&i| {
                let r = &requests[i];
                let runs = found.iter().filter(|run| run.submission_id == r.submission);
                !fresh.contains(&r.submission) || runs.count() < r.tasks.len()
            })
            .collect();
        if !replayed.is_empty() {
            conn.transaction(|conn| {
                replay(conn, requests, &replayed, &mut conflicts, &mut found, due)
            })?;
        }
        Ok(requests
            .iter()
            .zip(conflicts)
            .map(|(r, conflict)| match conflict {
                Some(conflict) => Err(conflict),
                None => Ok(found
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
                    .collect()),
            })
            .collect())
    }
}

/// New submissions and their runs, in one statement: a run row only where
/// its submission row was inserted by the same statement, so a replay
/// writes nothing here. Then one row per inserted submission and run (the
/// submission alone when it has no runs).
const INSERT_NEW: &str = "\
    WITH new_submissions AS ( \
        INSERT INTO submissions (id, form_id, payload, context) \
        SELECT * FROM unnest($1, $2, $3, $4) \
        ON CONFLICT DO NOTHING \
        RETURNING id \
    ), new_runs AS ( \
        INSERT INTO task_runs (id, submission_id, form_id, task_id, task_name, is_async, \
                               state, max_attempts, next_attempt_at, trace_context) \
        SELECT r.id, r.submission_id, r.form_id, r.task_id, r.task_name, true, \
               $12, r.max_attempts, $13, r.trace_context \
        FROM unnest($5, $6, $7, $8, $9, $10, $11) \
             AS r(id, submission_id, form_id, task_id, task_name, max_attempts, trace_context) \
        WHERE r.submission_id IN (SELECT id FROM new_submissions) \
        ON CONFLICT (submission_id, task_id) DO NOTHING \
        RETURNING submission_id, id, task_id \
    ) \
    SELECT s.id AS submission_id, r.id AS run_id, r.task_id \
    FROM new_submissions s LEFT JOIN new_runs r ON r.submission_id = s.id";

/// A row of [`INSERT_NEW`].
#[derive(QueryableByName)]
struct Inserted {
    #[diesel(sql_type = SqlUuid)]
    submission_id: Uuid,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    run_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    task_id: Option<Uuid>,
}

/// One verdict per request (not per id: of two duplicates in one batch
/// that differ, the first is fine and the later one a conflict).
fn twins_that_differ(requests: &[Acceptance]) -> Vec<Option<Replay>> {
    let mut conflicts: Vec<Option<Replay>> = vec![None; requests.len()];
    let mut order: Vec<usize> = (0..requests.len()).collect();
    // Stable: of equal ids, the first in the batch comes first.
    order.sort_by_key(|&i| requests[i].submission);
    for twins in order.chunk_by(|&a, &b| requests[a].submission == requests[b].submission) {
        let first = &requests[twins[0]];
        for &later in &twins[1..] {
            let later_request = &requests[later];
            if first.form != later_request.form || first.payload != later_request.payload {
                conflicts[later] = Some(Replay::Conflict(format!(
                    "submission_id {} is being submitted twice at once with different forms or submissions",
                    later_request.submission
                )));
            }
        }
    }
    conflicts
}

/// One run per (submission, task) of `requests`, in key order (so
/// concurrent batches lock in the same order); of twins, the first.
fn runs_of<'a>(
    requests: impl Iterator<Item = &'a Acceptance>,
) -> Vec<(&'a Acceptance, &'a TaskDef)> {
    let mut runs: Vec<(&Acceptance, &TaskDef)> = requests
        .flat_map(|r| r.tasks.iter().map(move |t| (r, t)))
        .collect();
    runs.sort_by_key(|(r, t)| (r.submission, t.id));
    runs.dedup_by_key(|(r, t)| (r.submission, t.id));
    runs
}

/// Stores the submissions that are new, with their runs ([`INSERT_NEW`]);
/// returns the ids of the submissions it stored and the runs it created.
fn insert_new(
    conn: &mut PgConnection,
    requests: &[Acceptance],
    conflicts: &[Option<Replay>],
    due: DateTime<Utc>,
) -> QueryResult<(HashSet<Uuid>, Vec<FoundRun>)> {
    // Rows go in key order (see `runs_of`); of identical twins, the first
    // is written.
    let mut subs: Vec<&Acceptance> = requests
        .iter()
        .zip(conflicts)
        .filter(|(_, conflict)| conflict.is_none())
        .map(|(r, _)| r)
        .collect();
    subs.sort_by_key(|r| r.submission);
    subs.dedup_by_key(|r| r.submission);
    if subs.is_empty() {
        return Ok((HashSet::new(), Vec::new()));
    }
    let runs = runs_of(subs.iter().copied());
    let rows: Vec<Inserted> = cached_sql(INSERT_NEW)
        .bind::<Array<SqlUuid>, _>(subs.iter().map(|r| r.submission).collect::<Vec<_>>())
        .bind::<Array<SqlUuid>, _>(subs.iter().map(|r| r.form).collect::<Vec<_>>())
        .bind::<Array<Jsonb>, _>(subs.iter().map(|r| &r.payload).collect::<Vec<_>>())
        .bind::<Array<Nullable<Jsonb>>, _>(
            subs.iter().map(|r| r.context.as_ref()).collect::<Vec<_>>(),
        )
        .bind::<Array<SqlUuid>, _>(runs.iter().map(|_| new_run_id()).collect::<Vec<_>>())
        .bind::<Array<SqlUuid>, _>(runs.iter().map(|(r, _)| r.submission).collect::<Vec<_>>())
        .bind::<Array<SqlUuid>, _>(runs.iter().map(|(r, _)| r.form).collect::<Vec<_>>())
        .bind::<Array<SqlUuid>, _>(runs.iter().map(|(_, t)| t.id).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(
            runs.iter()
                .map(|(_, t)| t.name.as_str())
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Integer>, _>(runs.iter().map(|(_, t)| t.max_attempts).collect::<Vec<_>>())
        .bind::<Array<Nullable<Text>>, _>(
            runs.iter()
                .map(|(r, _)| r.trace.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind::<Text, _>(RunState::Queued)
        .bind::<Timestamptz, _>(due)
        .load(conn)?;
    let fresh = rows.iter().map(|row| row.submission_id).collect();
    let created = rows
        .into_iter()
        .filter_map(|row| {
            Some(FoundRun {
                submission_id: row.submission_id,
                id: row.run_id?,
                task_id: row.task_id?,
                published_at: None,
                state: RunState::Queued,
            })
        })
        .collect();
    Ok((fresh, created))
}

/// The requests at `replayed` name submissions stored before: each must
/// match what is stored, or it would run this form's tasks on another
/// form's payload. Those that match get the runs they lack (a task attached
/// since) and find the runs they have; those that do not get a conflict.
fn replay(
    conn: &mut PgConnection,
    requests: &[Acceptance],
    replayed: &[usize],
    conflicts: &mut [Option<Replay>],
    found: &mut Vec<FoundRun>,
    due: DateTime<Utc>,
) -> QueryResult<()> {
    let ids: Vec<Uuid> = replayed.iter().map(|&i| requests[i].submission).collect();
    let stored: HashMap<Uuid, (Uuid, serde_json::Value)> = submissions::table
        .filter(submissions::id.eq_any(&ids))
        .select(StoredSubmission::as_select())
        .load(conn)?
        .into_iter()
        .map(|s| (s.id, (s.form_id, s.payload)))
        .collect();
    for &i in replayed {
        let request = &requests[i];
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
    let runs: Vec<_> = runs_of(
        replayed
            .iter()
            .filter(|&&i| conflicts[i].is_none())
            .map(|&i| &requests[i]),
    )
    .into_iter()
    .map(|(r, t)| {
        (
            task_runs::id.eq(new_run_id()),
            task_runs::submission_id.eq(r.submission),
            task_runs::form_id.eq(r.form),
            task_runs::task_id.eq(t.id),
            task_runs::task_name.eq(&t.name),
            task_runs::is_async.eq(true),
            task_runs::state.eq(RunState::Queued),
            task_runs::max_attempts.eq(t.max_attempts),
            task_runs::next_attempt_at.eq(due),
            task_runs::trace_context.eq(r.trace.as_deref()),
        )
    })
    .collect();
    if !runs.is_empty() {
        found.extend(
            diesel::insert_into(task_runs::table)
                .values(&runs)
                .on_conflict((task_runs::submission_id, task_runs::task_id))
                .do_nothing()
                .returning(FoundRun::as_returning())
                .get_results(conn)?,
        );
    }
    // The runs that existed already.
    let known: Vec<Uuid> = found.iter().map(|run| run.id).collect();
    found.extend(
        task_runs::table
            .filter(task_runs::submission_id.eq_any(&ids))
            .filter(task_runs::is_async.eq(true))
            .filter(task_runs::id.ne_all(known))
            .select(FoundRun::as_select())
            .load::<FoundRun>(conn)?,
    );
    Ok(())
}
