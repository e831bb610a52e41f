//! Retention: deleting what is finished and old, in small batches, and
//! dropping the run log's old days whole.

use chrono::{DateTime, Utc};
use diesel::{prelude::*, sql_types::Timestamptz};

use super::Registry;
use crate::error::RegistryError;

/// What one [`Registry::prune`] (or [`Registry::prune_all`]) removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Runs deleted row by row: finished asynchronous runs, and synchronous
    /// runs of the run log's default partition.
    pub runs: usize,
    /// Submissions deleted.
    pub submissions: usize,
    /// Day partitions of the run log dropped whole.
    pub days: usize,
}

impl Pruned {
    /// Whether nothing was removed (nothing is left to prune).
    pub fn is_empty(&self) -> bool {
        *self == Pruned::default()
    }
}

impl Registry {
    /// Drops the run log's day partitions that end before `cutoff` (a day
    /// straddling it stays whole: synchronous runs are kept up to a day
    /// longer than asked), then deletes up to `batch` synchronous runs of
    /// its default partition started before `cutoff`, up to `batch`
    /// finished asynchronous runs (succeeded or dead) created before
    /// `cutoff`, with their attempts, and up to `batch` submissions created
    /// before `cutoff` that have no runs left. Queued, running and retrying
    /// runs, and their submissions, are never touched. Also drops paces
    /// unused for a day. Call again until it returns an empty [`Pruned`].
    pub fn prune(&self, cutoff: DateTime<Utc>, batch: i64) -> Result<Pruned, RegistryError> {
        let days = self.drop_sync_run_days_before(cutoff)?;
        let logged = self.prune_sync_run_default(cutoff, batch)?;
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
        Ok(Pruned {
            runs: runs + logged,
            submissions,
            days,
        })
    }

    /// [`Registry::prune`] until nothing older than `cutoff` is left to
    /// delete; returns the totals.
    pub fn prune_all(&self, cutoff: DateTime<Utc>, batch: i64) -> Result<Pruned, RegistryError> {
        let mut total = Pruned::default();
        loop {
            let pruned = self.prune(cutoff, batch)?;
            if pruned.is_empty() {
                return Ok(total);
            }
            total.runs += pruned.runs;
            total.submissions += pruned.submissions;
            total.days += pruned.days;
        }
    }
}
