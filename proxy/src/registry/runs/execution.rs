//! Execution: a worker claims runs, keeps their leases alive, and stores how
//! each execution ended; dead-lettered messages end here too.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::{PENDING, RunState};
use crate::{
    error::RegistryError,
    registry::{Registry, cached::cached_sql, schema::task_runs},
};

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
    ///
    /// The claimable states are tested in a `CASE`, which the planner cannot
    /// turn into an index condition: a claim finds its runs by primary key
    /// whatever the statistics say. (As an `OR` of states, a burst of queued
    /// runs under statistics that knew none made it read every queued run
    /// through the state index into a hash join, 70-120 ms a claim.)
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
        let rows: Vec<ClaimedRow> = cached_sql(
            "UPDATE task_runs t SET \
                 state = 'running', \
                 attempts = CASE WHEN t.claim_token IS NOT DISTINCT FROM i.token \
                            THEN t.attempts ELSE t.attempts + 1 END, \
                 claim_token = i.token, started_at = now(), updated_at = now(), \
                 lease_until = now() + make_interval(secs => $4) \
             FROM unnest($1, $2, $3) AS i(id, redelivered, token), submissions s \
             WHERE t.id = i.id AND s.id = t.submission_id \
               AND CASE t.state \
                     WHEN 'queued' THEN true \
                     WHEN 'retrying' THEN t.next_attempt_at <= now() \
                     WHEN 'running' THEN t.claim_token = i.token \
                       OR (i.redelivered AND (t.lease_until IS NULL OR t.lease_until < now())) \
                     ELSE false END \
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
            .filter(task_runs::state.eq(RunState::Running))
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
        Ok(cached_sql(
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
                Finish::Succeeded(output) => {
                    (RunState::Succeeded.as_str(), Some(output), None, None)
                }
                Finish::Retry { error, after } => (
                    RunState::Retrying.as_str(),
                    None,
                    Some(error.as_str()),
                    Some(after_now(after)),
                ),
                Finish::Dead { error } => {
                    (RunState::Dead.as_str(), None, Some(error.as_str()), None)
                }
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
        // The execution that ends the run is recorded on the run itself
        // (`finished_by`); only a retried one adds a row to
        // `task_run_attempts`, as does a stale execution (its run another
        // delivery has taken over): it is logged, not stored.
        cached_sql(
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
                 finished_by = CASE WHEN i.kind IN ('succeeded', 'dead') THEN $8 END, \
                 throttled_ms = t.throttled_ms + i.waited_ms, \
                 slot_at = CASE WHEN i.kind = 'paced' THEN i.next_at END, \
                 updated_at = now() \
               FROM i WHERE t.id = i.id AND t.state = 'running' AND t.attempts = i.attempt \
               RETURNING i.id, i.attempt, i.kind, i.error, i.started_at) \
             INSERT INTO task_run_attempts (run_id, attempt, worker, started_at, finished_at, outcome, error) \
             SELECT id, attempt, $8, started_at, now(), kind, error FROM stored \
             WHERE kind = 'retrying' \
             UNION ALL \
             SELECT id, attempt, $8, started_at, now(), kind, error FROM i \
             WHERE i.kind NOT IN ('throttled', 'paced') AND NOT EXISTS \
               (SELECT 1 FROM stored s WHERE s.id = i.id AND s.attempt = i.attempt) \
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
                .filter(task_runs::state.eq(RunState::Running)),
        )
        .set((
            task_runs::state.eq(RunState::Dead),
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
}
