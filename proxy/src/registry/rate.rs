//! Rate limits: paces shared by every worker, kept in `rate_slots`.
//!
//! A pace is a generic cell rate algorithm: its row holds the earliest time
//! the next run may start, and each start reserves that time and moves it
//! one interval on, in one statement. So run starts are evenly spaced
//! across all workers, there is no burst, and in any minute no more start
//! than the limit allows.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::{
    prelude::*,
    sql_types::{Double, Text, Timestamptz},
};
use uuid::Uuid;

use super::{Registry, cached::cached_sql, schema::tasks};
use crate::error::RegistryError;

/// A task's pace: where it draws its start times from, and how far apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pace {
    /// `group:<name>` for a rate group, `task:<id>` for a task alone.
    pub bucket: String,
    /// The time between two run starts.
    pub interval: Duration,
}

#[derive(QueryableByName)]
struct Slot {
    #[diesel(sql_type = Timestamptz)]
    slot: DateTime<Utc>,
}

impl Registry {
    /// Reserves the next start time of `pace`: now if it is free, else the
    /// earliest time after the starts already reserved.
    pub fn reserve_slot(&self, pace: &Pace) -> Result<DateTime<Utc>, RegistryError> {
        let mut conn = self.conn()?;
        let row: Slot = cached_sql(
            "INSERT INTO rate_slots AS r (bucket, next_at) \
             VALUES ($1, now() + make_interval(secs => $2)) \
             ON CONFLICT (bucket) DO UPDATE \
                 SET next_at = greatest(r.next_at, now()) + make_interval(secs => $2) \
             RETURNING next_at - make_interval(secs => $2) AS slot",
        )
        .bind::<Text, _>(&pace.bucket)
        .bind::<Double, _>(pace.interval.as_secs_f64())
        .get_result(&mut conn)?;
        Ok(row.slot)
    }

    /// Sets (or with `per_minute` `None`, removes) a task's rate limit;
    /// false if there is no such task.
    pub fn set_rate_limit(
        &self,
        task: Uuid,
        per_minute: Option<i32>,
        group: Option<&str>,
    ) -> Result<bool, RegistryError> {
        let mut conn = self.conn()?;
        let updated = diesel::update(tasks::table.find(task))
            .set((
                tasks::rate_per_minute.eq(per_minute),
                tasks::rate_group.eq(per_minute.and(group)),
            ))
            .execute(&mut conn)?;
        Ok(updated > 0)
    }
}
