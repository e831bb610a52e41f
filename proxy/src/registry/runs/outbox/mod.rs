//! The outbox: accepting submissions (with their replay checks, in
//! [`accept`]) and handing their runs to the broker, by the accepting proxy
//! (its publish marks) or by the relay.

mod accept;

pub use accept::{Acceptance, Accepted, Replay};

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::{
    prelude::*,
    sql_types::{Array, Text, Uuid as SqlUuid},
};
use uuid::Uuid;

use super::{PENDING, RunState};
use crate::{
    error::RegistryError,
    registry::{Registry, cached::cached_sql, schema::task_runs},
};

impl Registry {
    /// Records that the broker confirmed these freshly accepted runs. A run
    /// a worker has claimed meanwhile is left alone: marking a run that is
    /// already `retrying` published would hide its retry from the relay, and
    /// a claimed run needs no mark (the relay publishes only pending runs),
    /// so a mark that comes after the claims writes nothing.
    pub fn mark_published(&self, runs: &[Uuid]) -> Result<(), RegistryError> {
        let mut conn = self.conn()?;
        // The conditions are one CASE so that no index but the primary key
        // serves them: written plainly they imply the relay's partial index
        // (unpublished runs), which the planner then reads whole whenever
        // its statistics call it empty, as they do after a quiet spell, just
        // when a backlog makes it large and marks frequent.
        cached_sql(
            "UPDATE task_runs SET published_at = now() \
             WHERE id = ANY($1) \
               AND CASE WHEN published_at IS NULL AND attempts = 0 \
                        THEN state = $2 ELSE false END",
        )
        .bind::<Array<SqlUuid>, _>(runs)
        .bind::<Text, _>(RunState::Queued)
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
