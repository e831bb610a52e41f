//! The outbox: accepting submissions (with their replay checks, in
//! [`accept`]) and handing their runs to the broker, by the accepting proxy
//! (its publish marks) or by the relay.

mod accept;

pub use accept::{Acceptance, Accepted, Replay};

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::{PENDING, RunState};
use crate::{
    error::RegistryError,
    registry::{Registry, schema::task_runs},
};

impl Registry {
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
