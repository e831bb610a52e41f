//! The run log and outbox: `submissions`, `task_runs`, `task_run_attempts`.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::{
    Registry, TaskDef,
    schema::{submissions, task_run_attempts, task_runs},
};
use crate::error::RegistryError;

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Accepted, waiting for a worker.
    Queued,
    /// A worker is running it.
    Running,
    /// Done.
    Succeeded,
    /// Failed retryably; runs again at `next_attempt_at`.
    Retrying,
    /// Failed for good (permanent error, attempts or deliveries exhausted).
    Dead,
}

impl RunState {
    /// The value stored in `task_runs.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Retrying => "retrying",
            RunState::Dead => "dead",
        }
    }
}

impl std::str::FromStr for RunState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "queued" => RunState::Queued,
            "running" => RunState::Running,
            "succeeded" => RunState::Succeeded,
            "retrying" => RunState::Retrying,
            "dead" => RunState::Dead,
            other => {
                return Err(format!(
                    "unknown run state '{other}' (queued, running, succeeded, retrying, dead)"
                ));
            }
        })
    }
}

/// A row of `task_runs`.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = task_runs, check_for_backend(diesel::pg::Pg))]
pub struct Run {
    /// The run's id.
    pub id: Uuid,
    /// The submission it runs on.
    pub submission_id: Uuid,
    /// The submission's form.
    pub form_id: Uuid,
    /// The task it runs.
    pub task_id: Uuid,
    /// The task's name when the run was created.
    pub task_name: String,
    /// Asynchronous (worker) or synchronous (inside `Process`).
    pub is_async: bool,
    /// See [`RunState`]; stored as text.
    pub state: String,
    /// Executions started so far.
    pub attempts: i32,
    /// Executions allowed.
    pub max_attempts: i32,
    /// Why the last execution failed.
    pub last_error: Option<String>,
    /// What the task returned.
    pub output: Option<serde_json::Value>,
    /// When it may next be published.
    pub next_attempt_at: DateTime<Utc>,
    /// When the broker confirmed it for the current attempt.
    pub published_at: Option<DateTime<Utc>>,
    /// When the last execution started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished (succeeded or dead).
    pub finished_at: Option<DateTime<Utc>>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl Run {
    /// The parsed state.
    pub fn state(&self) -> RunState {
        self.state.parse().unwrap_or(RunState::Dead)
    }
}

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
}

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

/// A run claimed by a worker: everything needed to execute it.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The run.
    pub run_id: Uuid,
    /// Its task.
    pub task_id: Uuid,
    /// Its form.
    pub form_id: Uuid,
    /// Its submission.
    pub submission_id: Uuid,
    /// The submission's payload.
    pub payload: serde_json::Value,
    /// The submission's context, when the backend sent one.
    pub context: Option<serde_json::Value>,
    /// This execution's number, from 1.
    pub attempt: i32,
    /// Executions allowed.
    pub max_attempts: i32,
    /// When this execution started.
    pub started_at: DateTime<Utc>,
    /// How long the run has waited on APIs' Retry-After so far.
    pub throttled: Duration,
    /// The start time it reserved from its rate limit, when it was paced.
    pub slot_at: Option<DateTime<Utc>>,
}

/// A delivery's request to claim its run.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest {
    /// The run in the message.
    pub run: Uuid,
    /// Whether RabbitMQ delivered the message before.
    pub redelivered: bool,
    /// Identifies the delivery (see [`Registry::claim`]).
    pub token: Uuid,
}

/// A row returned by the claim statement.
#[derive(QueryableByName)]
struct ClaimedRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    token: Uuid,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    run_id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    task_id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    form_id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    submission_id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Jsonb)]
    payload: serde_json::Value,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Jsonb>)]
    context: Option<serde_json::Value>,
    #[diesel(sql_type = diesel::sql_types::Int4)]
    attempts: i32,
    #[diesel(sql_type = diesel::sql_types::Int4)]
    max_attempts: i32,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
    started_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = diesel::sql_types::Int8)]
    throttled_ms: i64,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>)]
    slot_at: Option<DateTime<Utc>>,
}

/// One execution of a run: (attempt, started, finished, outcome).
pub type Attempt = (i32, DateTime<Utc>, DateTime<Utc>, String);

/// How an execution ended, as the worker stores it.
#[derive(Debug, Clone)]
pub enum Finish {
    /// Done, with this output.
    Succeeded(serde_json::Value),
    /// Run again after `after`.
    Retry {
        /// Why it failed.
        error: String,
        /// The backoff.
        after: Duration,
    },
    /// Give up.
    Dead {
        /// Why.
        error: String,
    },
    /// The API throttled it: run again after `after` (its Retry-After and
    /// some jitter), without counting this execution as an attempt.
    Throttled {
        /// What the API said.
        error: String,
        /// The wait.
        after: Duration,
    },
    /// Its rate limit's next start time is `at`, which the run now holds:
    /// run it then, without counting this execution as an attempt.
    Paced {
        /// The reserved start time.
        at: DateTime<Utc>,
    },
}

const PENDING: [&str; 2] = ["queued", "retrying"];

/// What [`Registry::dead_lettered`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetter {
    /// The run was executing: now dead.
    MarkedDead,
    /// The run never started: the relay publishes it again.
    Republish,
    /// The run had already finished.
    Ignored,
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
        type Found = (Uuid, Uuid, Uuid, Option<DateTime<Utc>>, String);
        let (conflicts, found): (Vec<Option<Replay>>, Vec<Found>) = conn.transaction(|conn| {
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
                    .select((submissions::id, submissions::form_id, submissions::payload))
                    .load::<(Uuid, Uuid, serde_json::Value)>(conn)?
                    .into_iter()
                    .map(|(id, form, payload)| (id, (form, payload)))
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
                            task_runs::state.eq("queued"),
                            task_runs::max_attempts.eq(t.max_attempts),
                            task_runs::next_attempt_at.eq(due),
                        ),
                    )
                })
                .collect();
            runs.sort_by_key(|(key, _)| *key);
            runs.dedup_by_key(|(key, _)| *key);
            let runs: Vec<_> = runs.into_iter().map(|(_, row)| row).collect();
            diesel::insert_into(task_runs::table)
                .values(&runs)
                .on_conflict((task_runs::submission_id, task_runs::task_id))
                .do_nothing()
                .execute(conn)?;
            let found = task_runs::table
                .filter(task_runs::submission_id.eq_any(&ids))
                .filter(task_runs::is_async.eq(true))
                .select((
                    task_runs::submission_id,
                    task_runs::id,
                    task_runs::task_id,
                    task_runs::published_at,
                    task_runs::state,
                ))
                .load(conn)?;
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
                    .filter(|(sub, _, task, _, _)| {
                        *sub == r.submission && r.tasks.iter().any(|t| t.id == *task)
                    })
                    .map(|(_, run_id, task_id, published, state)| Accepted {
                        run_id: *run_id,
                        task_id: *task_id,
                        unpublished: published.is_none() && PENDING.contains(&state.as_str()),
                    })
                    .collect())
            })
            .collect())
    }

    /// Records that the broker confirmed these freshly accepted runs. A run
    /// a worker has claimed meanwhile is left alone: marking a run that is
    /// already `retrying` published would hide its retry from the relay.
    pub fn mark_published(&self, runs: &[Uuid]) -> Result<(), RegistryError> {
        let mut conn = self.conn()?;
        diesel::update(
            task_runs::table
                .filter(task_runs::id.eq_any(runs))
                .filter(task_runs::published_at.is_null())
                .filter(task_runs::state.eq("queued"))
                .filter(task_runs::attempts.eq(0)),
        )
        .set(task_runs::published_at.eq(diesel::dsl::now))
        .execute(&mut conn)?;
        Ok(())
    }

    /// One relay pass: locks up to `limit` due, unconfirmed runs (skipping
    /// rows another relay holds), hands their ids to `publish`, and marks the
    /// ones it confirmed, all in one transaction. Returns how many it confirmed.
    pub fn relay_batch(
        &self,
        limit: i64,
        publish: impl FnOnce(&[Uuid]) -> Vec<Uuid>,
    ) -> Result<usize, RegistryError> {
        let mut conn = self.conn()?;
        conn.transaction(|conn| {
            let due: Vec<Uuid> = task_runs::table
                .filter(task_runs::published_at.is_null())
                .filter(task_runs::state.eq_any(PENDING))
                .filter(task_runs::next_attempt_at.le(diesel::dsl::now))
                .order(task_runs::next_attempt_at)
                .limit(limit)
                .select(task_runs::id)
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
                .filter(task_runs::state.eq("running"))
                .filter(
                    task_runs::lease_until
                        .lt(diesel::dsl::now)
                        .or(task_runs::lease_until
                            .is_null()
                            .and(task_runs::started_at.lt(cutoff))),
                ),
        )
        .set((
            task_runs::state.eq("retrying"),
            task_runs::last_error.eq("no result from the worker that claimed it; re-queued"),
            task_runs::published_at.eq(None::<DateTime<Utc>>),
            task_runs::next_attempt_at.eq(diesel::dsl::now),
            task_runs::updated_at.eq(diesel::dsl::now),
        ))
        .execute(&mut conn)?;
        Ok(unpicked + orphaned)
    }

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

    /// Claims runs for execution, one statement for the whole batch: only a
    /// queued run, a retrying one whose backoff has passed (a duplicate
    /// message does not skip it), or a running one whose message RabbitMQ
    /// redelivered and whose lease expired (its worker died; a live lease
    /// means its worker is still executing it, and a broker blip requeued
    /// the message). Each request's `token` identifies its
    /// delivery: retrying a claim after an ambiguous commit finds the claim
    /// already ours and takes it again without counting another attempt.
    /// Returns one answer per request, in order; `None` means another
    /// delivery already handled the run (or holds it).
    pub fn claim(
        &self,
        requests: &[ClaimRequest],
        lease: Duration,
    ) -> Result<Vec<Option<Claimed>>, RegistryError> {
        use diesel::sql_types::{Array, Bool, Double, Uuid as SqlUuid};
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn()?;
        let rows: Vec<ClaimedRow> = diesel::sql_query(
            "UPDATE task_runs t SET \
                 state = 'running', \
                 attempts = CASE WHEN t.claim_token IS NOT DISTINCT FROM i.token \
                            THEN t.attempts ELSE t.attempts + 1 END, \
                 claim_token = i.token, started_at = now(), updated_at = now(), \
                 lease_until = now() + make_interval(secs => $4) \
             FROM unnest($1, $2, $3) AS i(id, redelivered, token), submissions s \
             WHERE t.id = i.id AND s.id = t.submission_id \
               AND (t.state = 'queued' \
                    OR (t.state = 'retrying' AND t.next_attempt_at <= now()) \
                    OR (t.state = 'running' AND (t.claim_token = i.token \
                        OR (i.redelivered AND (t.lease_until IS NULL OR t.lease_until < now()))))) \
             RETURNING i.token, t.id AS run_id, t.task_id, t.form_id, t.submission_id, \
                       s.payload, s.context, t.attempts, t.max_attempts, t.started_at, \
                       t.throttled_ms, t.slot_at",
        )
        .bind::<Array<SqlUuid>, _>(requests.iter().map(|r| r.run).collect::<Vec<_>>())
        .bind::<Array<Bool>, _>(requests.iter().map(|r| r.redelivered).collect::<Vec<_>>())
        .bind::<Array<SqlUuid>, _>(requests.iter().map(|r| r.token).collect::<Vec<_>>())
        .bind::<Double, _>(lease.as_secs_f64())
        .load(&mut conn)?;
        let mut by_token: std::collections::HashMap<Uuid, ClaimedRow> =
            rows.into_iter().map(|row| (row.token, row)).collect();
        Ok(requests
            .iter()
            .map(|r| {
                by_token.remove(&r.token).map(|row| Claimed {
                    run_id: row.run_id,
                    task_id: row.task_id,
                    form_id: row.form_id,
                    submission_id: row.submission_id,
                    payload: row.payload,
                    context: row.context,
                    attempt: row.attempts,
                    max_attempts: row.max_attempts,
                    started_at: row.started_at.unwrap_or_else(Utc::now),
                    throttled: Duration::from_millis(u64::try_from(row.throttled_ms).unwrap_or(0)),
                    slot_at: row.slot_at,
                })
            })
            .collect())
    }

    /// Whether `run` is executing under a live lease (its worker is still
    /// extending it).
    pub fn held_by_live_lease(&self, run: Uuid) -> Result<bool, RegistryError> {
        let mut conn = self.conn()?;
        let lease: Option<Option<DateTime<Utc>>> = task_runs::table
            .find(run)
            .filter(task_runs::state.eq("running"))
            .select(task_runs::lease_until)
            .first(&mut conn)
            .optional()?;
        Ok(lease.flatten().is_some_and(|until| until > Utc::now()))
    }

    /// Extends the leases of runs a worker is executing (those still
    /// `running` under its claims) to `lease` from now.
    pub fn extend_leases(
        &self,
        held: &[(Uuid, Uuid)],
        lease: Duration,
    ) -> Result<usize, RegistryError> {
        use diesel::sql_types::{Array, Double, Uuid as SqlUuid};
        if held.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn()?;
        Ok(diesel::sql_query(
            "UPDATE task_runs t SET lease_until = now() + make_interval(secs => $3) \
             FROM unnest($1, $2) AS h(id, token) \
             WHERE t.id = h.id AND t.claim_token = h.token AND t.state = 'running'",
        )
        .bind::<Array<SqlUuid>, _>(held.iter().map(|(run, _)| *run).collect::<Vec<_>>())
        .bind::<Array<SqlUuid>, _>(held.iter().map(|(_, token)| *token).collect::<Vec<_>>())
        .bind::<Double, _>(lease.as_secs_f64())
        .execute(&mut conn)?)
    }

    /// Stores how each execution ended, if the run is still that execution's
    /// (a redelivery may have taken it over), and logs the attempts: one
    /// statement for the whole batch.
    pub fn finish(
        &self,
        worker: &str,
        finished: &[(Claimed, Finish)],
    ) -> Result<(), RegistryError> {
        use diesel::sql_types::{
            Array, Int4, Int8, Jsonb, Nullable, Text, Timestamptz, Uuid as SqlUuid,
        };
        if finished.is_empty() {
            return Ok(());
        }
        let now = Utc::now();
        let mut ids = Vec::with_capacity(finished.len());
        let mut attempts = Vec::with_capacity(finished.len());
        let mut states = Vec::with_capacity(finished.len());
        let mut outputs = Vec::with_capacity(finished.len());
        let mut errors = Vec::with_capacity(finished.len());
        let mut next_at = Vec::with_capacity(finished.len());
        let mut started = Vec::with_capacity(finished.len());
        let mut waited = Vec::with_capacity(finished.len());
        // Checked: no delay, however large, can overflow the time
        // arithmetic (a year is the most it ever means).
        let after_now = |after: &Duration| {
            chrono::Duration::from_std(*after)
                .ok()
                .and_then(|d| now.checked_add_signed(d))
                .unwrap_or_else(|| now + chrono::Duration::days(365))
                .min(now + chrono::Duration::days(365))
        };
        for (claimed, finish) in finished {
            ids.push(claimed.run_id);
            attempts.push(claimed.attempt);
            started.push(claimed.started_at);
            let (kind, output, error, at) = match finish {
                Finish::Succeeded(output) => ("succeeded", Some(output), None, None),
                Finish::Retry { error, after } => (
                    "retrying",
                    None,
                    Some(error.as_str()),
                    Some(after_now(after)),
                ),
                Finish::Dead { error } => ("dead", None, Some(error.as_str()), None),
                Finish::Throttled { error, after } => (
                    "throttled",
                    None,
                    Some(error.as_str()),
                    Some(after_now(after)),
                ),
                Finish::Paced { at } => ("paced", None, None, Some(*at)),
            };
            waited.push(match finish {
                Finish::Throttled { after, .. } => {
                    i64::try_from(after.as_millis()).unwrap_or(i64::MAX)
                }
                _ => 0,
            });
            states.push(kind);
            outputs.push(output);
            errors.push(error);
            next_at.push(at);
        }
        let mut conn = self.conn()?;
        // A throttled or paced execution gives its attempt back and is not
        // logged as one; a paced run keeps its last error and holds its slot.
        diesel::sql_query(
            "WITH i AS (SELECT * FROM unnest($1, $2, $3, $4, $5, $6, $7, $9) \
                        AS i(id, attempt, kind, output, error, next_at, started_at, waited_ms)), \
             stored AS (UPDATE task_runs t SET \
                 state = CASE WHEN i.kind IN ('throttled', 'paced') THEN 'retrying' ELSE i.kind END, \
                 attempts = CASE WHEN i.kind IN ('throttled', 'paced') \
                            THEN t.attempts - 1 ELSE t.attempts END, \
                 output = CASE WHEN i.kind = 'succeeded' THEN i.output ELSE t.output END, \
                 last_error = CASE WHEN i.kind = 'paced' THEN t.last_error ELSE i.error END, \
                 next_attempt_at = COALESCE(i.next_at, t.next_attempt_at), \
                 published_at = CASE WHEN i.kind IN ('retrying', 'throttled', 'paced') \
                                THEN NULL ELSE t.published_at END, \
                 finished_at = CASE WHEN i.kind IN ('retrying', 'throttled', 'paced') \
                               THEN t.finished_at ELSE now() END, \
                 throttled_ms = t.throttled_ms + i.waited_ms, \
                 slot_at = CASE WHEN i.kind = 'paced' THEN i.next_at END, \
                 updated_at = now() \
               FROM i WHERE t.id = i.id AND t.state = 'running' AND t.attempts = i.attempt) \
             INSERT INTO task_run_attempts (run_id, attempt, worker, started_at, finished_at, outcome, error) \
             SELECT id, attempt, $8, started_at, now(), kind, error FROM i \
             WHERE i.kind NOT IN ('throttled', 'paced') \
             ON CONFLICT DO NOTHING",
        )
        .bind::<Array<SqlUuid>, _>(ids)
        .bind::<Array<Int4>, _>(attempts)
        .bind::<Array<Text>, _>(states)
        .bind::<Array<Nullable<Jsonb>>, _>(outputs)
        .bind::<Array<Nullable<Text>>, _>(errors)
        .bind::<Array<Nullable<Timestamptz>>, _>(next_at)
        .bind::<Array<Timestamptz>, _>(started)
        .bind::<Text, _>(worker)
        .bind::<Array<Int8>, _>(waited)
        .execute(&mut conn)?;
        Ok(())
    }

    /// Handles a dead-lettered message (the queue's delivery limit was
    /// reached). A run a worker was executing is the one that kept killing
    /// workers: it is marked dead with `reason`. A run that never started was
    /// only prefetched by dying workers: it is handed back to the relay.
    /// Finished runs are left alone.
    pub fn dead_lettered(&self, run: Uuid, reason: &str) -> Result<DeadLetter, RegistryError> {
        let mut conn = self.conn()?;
        let killed = diesel::update(
            task_runs::table
                .find(run)
                .filter(task_runs::state.eq("running")),
        )
        .set((
            task_runs::state.eq("dead"),
            task_runs::last_error.eq(reason),
            task_runs::finished_at.eq(diesel::dsl::now),
            task_runs::updated_at.eq(diesel::dsl::now),
        ))
        .execute(&mut conn)?;
        if killed > 0 {
            return Ok(DeadLetter::MarkedDead);
        }
        let requeued = diesel::update(
            task_runs::table
                .find(run)
                .filter(task_runs::state.eq_any(PENDING)),
        )
        .set((
            task_runs::published_at.eq(None::<DateTime<Utc>>),
            task_runs::next_attempt_at.eq(diesel::dsl::now),
            task_runs::updated_at.eq(diesel::dsl::now),
        ))
        .execute(&mut conn)?;
        Ok(if requeued > 0 {
            DeadLetter::Republish
        } else {
            DeadLetter::Ignored
        })
    }

    /// Every run of a submission, in creation order.
    pub fn runs_for_submission(&self, submission: Uuid) -> Result<Vec<Run>, RegistryError> {
        let mut conn = self.conn()?;
        Ok(task_runs::table
            .filter(task_runs::submission_id.eq(submission))
            .order((task_runs::created_at, task_runs::id))
            .select(Run::as_select())
            .load(&mut conn)?)
    }

    /// Runs, newest first, filtered by state and form.
    pub fn list_runs(
        &self,
        state: Option<RunState>,
        form: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Run>, RegistryError> {
        let mut conn = self.conn()?;
        let mut query = task_runs::table
            .order((task_runs::created_at.desc(), task_runs::id))
            .limit(limit)
            .select(Run::as_select())
            .into_boxed();
        if let Some(state) = state {
            query = query.filter(task_runs::state.eq(state.as_str()));
        }
        if let Some(form) = form {
            query = query.filter(task_runs::form_id.eq(form));
        }
        Ok(query.load(&mut conn)?)
    }

    /// Re-queues dead asynchronous runs (one, or all) with a fresh set of
    /// attempts; returns the ids re-queued.
    pub fn retry_dead(&self, run: Option<Uuid>) -> Result<Vec<Uuid>, RegistryError> {
        let mut conn = self.conn()?;
        let mut target = task_runs::table
            .filter(task_runs::state.eq("dead"))
            .filter(task_runs::is_async.eq(true))
            .into_boxed();
        if let Some(run) = run {
            target = target.filter(task_runs::id.eq(run));
        }
        let ids: Vec<Uuid> = target.select(task_runs::id).load(&mut conn)?;
        diesel::update(task_runs::table.filter(task_runs::id.eq_any(&ids)))
            .set((
                task_runs::state.eq("queued"),
                task_runs::attempts.eq(0),
                task_runs::throttled_ms.eq(0),
                task_runs::slot_at.eq(None::<DateTime<Utc>>),
                task_runs::next_attempt_at.eq(diesel::dsl::now),
                task_runs::published_at.eq(None::<DateTime<Utc>>),
                task_runs::finished_at.eq(None::<DateTime<Utc>>),
                task_runs::updated_at.eq(diesel::dsl::now),
            ))
            .execute(&mut conn)?;
        Ok(ids)
    }

    /// The executions of a run, in order.
    pub fn attempts(&self, run: Uuid) -> Result<Vec<Attempt>, RegistryError> {
        let mut conn = self.conn()?;
        Ok(task_run_attempts::table
            .filter(task_run_attempts::run_id.eq(run))
            .order((task_run_attempts::started_at, task_run_attempts::attempt))
            .select((
                task_run_attempts::attempt,
                task_run_attempts::started_at,
                task_run_attempts::finished_at,
                task_run_attempts::outcome,
            ))
            .load(&mut conn)?)
    }
}
