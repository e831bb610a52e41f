//! Retention: deleting what is finished and old, in small batches.

use chrono::{DateTime, Utc};
use diesel::{prelude::*, sql_types::Timestamptz};

use super::Registry;
use crate::error::RegistryError;

impl Registry {
    /// Deletes up to `batch` finished runs (succeeded or dead) created before
    /// `cutoff`, with their attempts, then up to `batch` submissions created
    /// before `cutoff` that have no runs left. Queued, running and retrying
    /// runs, and their submissions, are never touched. Returns how many
    /// runs and submissions went (and drops paces unused for a day); call again until both are 0.
    pub fn prune(
        &self,
        cutoff: DateTime<Utc>,
        batch: i64,
    ) -> Result<(usize, usize), RegistryError> {
        let mut conn = self.conn()?;
        // Attempts go with their runs (ON DELETE CASCADE).
        let runs = diesel::sql_query(
            "DELETE FROM task_runs WHERE id IN ( \
                 SELECT id FROM task_runs \
                 WHERE state IN ('succeeded', 'dead') AND created_at < $1 \
                 LIMIT $2)",
        )
        .bind::<Timestamptz, _>(cutoff)
        .bind::<diesel::sql_types::BigInt, _>(batch)
        .execute(&mut conn)?;
        let submissions = diesel::sql_query(
            "DELETE FROM submissions WHERE id IN ( \
                 SELECT s.id FROM submissions s \
                 WHERE s.created_at < $1 \
                   AND NOT EXISTS (SELECT 1 FROM task_runs r WHERE r.submission_id = s.id) \
                 LIMIT $2)",
        )
        .bind::<Timestamptz, _>(cutoff)
        .bind::<diesel::sql_types::BigInt, _>(batch)
        .execute(&mut conn)?;
        // Paces unused for a day (a detached task's, say): a small table.
        diesel::sql_query("DELETE FROM rate_slots WHERE next_at < now() - interval '1 day'")
            .execute(&mut conn)?;
        Ok((runs, submissions))
    }

    /// [`Registry::prune`] until nothing older than `cutoff` is left to
    /// delete; returns the totals.
    pub fn prune_all(
        &self,
        cutoff: DateTime<Utc>,
        batch: i64,
    ) -> Result<(usize, usize), RegistryError> {
        let (mut runs, mut submissions) = (0, 0);
        loop {
            let (r, s) = self.prune(cutoff, batch)?;
            runs += r;
            submissions += s;
            if r == 0 && s == 0 {
                return Ok((runs, submissions));
            }
        }
    }
}
