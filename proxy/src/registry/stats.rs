//! Cheap figures for metrics and readiness, read periodically (never per
//! scrape): each query is a range scan of a small index.

use chrono::{DateTime, Utc};
use diesel::{
    prelude::*,
    sql_types::{BigInt, Nullable, Text, Timestamptz},
};

use super::Registry;
use crate::error::RegistryError;

/// The outbox and the asynchronous runs not yet succeeded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunStats {
    /// (state, runs) for queued, running, retrying and dead runs.
    pub by_state: Vec<(String, i64)>,
    /// Due runs the broker has not confirmed.
    pub unpublished: i64,
    /// When the oldest of them became due.
    pub oldest_unpublished: Option<DateTime<Utc>>,
}

#[derive(QueryableByName)]
struct StateCount {
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = BigInt)]
    runs: i64,
}

#[derive(QueryableByName)]
struct Outbox {
    #[diesel(sql_type = BigInt)]
    unpublished: i64,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    oldest: Option<DateTime<Utc>>,
}

impl Registry {
    /// Whether the database answers.
    pub fn ping(&self) -> Result<(), RegistryError> {
        let mut conn = self.conn()?;
        diesel::sql_query("SELECT 1").execute(&mut conn)?;
        Ok(())
    }

    /// The figures behind `daisy_runs` and the outbox gauges. Succeeded runs
    /// are not counted (they are most of the table; `daisy_task_runs_total`
    /// counts them as they finish).
    pub fn run_stats(&self) -> Result<RunStats, RegistryError> {
        let mut conn = self.conn()?;
        let by_state: Vec<StateCount> = diesel::sql_query(
            "SELECT s.state, (SELECT count(*) FROM task_runs r \
                              WHERE r.state = s.state AND r.is_async) AS runs \
             FROM unnest(ARRAY['queued', 'running', 'retrying', 'dead']) AS s(state)",
        )
        .load(&mut conn)?;
        let outbox: Outbox = diesel::sql_query(
            "SELECT count(*) AS unpublished, min(next_attempt_at) AS oldest FROM task_runs \
             WHERE published_at IS NULL AND state IN ('queued', 'retrying') \
               AND next_attempt_at <= now()",
        )
        .get_result(&mut conn)?;
        Ok(RunStats {
            by_state: by_state.into_iter().map(|c| (c.state, c.runs)).collect(),
            unpublished: outbox.unpublished,
            oldest_unpublished: outbox.oldest,
        })
    }
}
