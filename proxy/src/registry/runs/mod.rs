//! Runs on two tables: asynchronous runs in `task_runs`, the outbox (with
//! `submissions`, `task_run_attempts` and the view over both,
//! `run_attempts`), and finished synchronous runs in `sync_runs`, the
//! append-only run log partitioned by day. Split by the actor that queries
//! them:
//!
//! - [`outbox`]: accepting submissions and publishing their runs (the
//!   accepting proxy and the relay);
//! - [`execution`]: claiming, leasing and finishing runs (the workers);
//! - [`log`]: recording finished synchronous runs (the run log) and
//!   keeping its day partitions;
//! - [`read`]: listing runs from both tables and attempts, retrying dead
//!   runs (`GetRuns`, the CLI).
//!
//! This module holds what they share: the row and its state.

mod execution;
mod log;
mod outbox;
mod read;

pub use execution::{ClaimRequest, Claimed, DeadLetter, Finish};
pub use log::SyncRun;
pub(crate) use log::SyncRunRow;
pub use outbox::{Acceptance, Accepted, Replay};
pub use read::Attempt;
pub(crate) use read::{FIRST_RECORD, SYNC_COLUMNS};

use chrono::{DateTime, Utc};
use diesel::{
    deserialize::{self, FromSql, FromSqlRow},
    expression::AsExpression,
    pg::{Pg, PgValue},
    prelude::*,
    serialize::{self, Output, ToSql},
    sql_types::Text,
};
use uuid::Uuid;

use super::schema::task_runs;
use crate::error::RegistryError;

/// A new run's id: a UUIDv7, time-ordered (monotonic within this process),
/// so each table's primary-key index takes new runs at its right edge
/// instead of at a random leaf: fewer pages dirtied and written per insert
/// on the submit path. Nothing reads an order into ids: runs from
/// several processes interleave, and lists order by time columns.
pub fn new_run_id() -> Uuid {
    Uuid::now_v7()
}

diesel::table! {
    /// A view (not a table; `diesel print-schema` leaves it out): every
    /// execution of a run, those retried (`task_run_attempts`) and the one
    /// that ended it (recorded on `task_runs`, by `finished_by`).
    run_attempts (run_id, attempt, started_at) {
        run_id -> Uuid,
        attempt -> Int4,
        worker -> Text,
        started_at -> Timestamptz,
        finished_at -> Timestamptz,
        outcome -> Text,
        error -> Nullable<Text>,
    }
}

/// Where a run is in its life: `task_runs.state` and `sync_runs.state`,
/// `text` columns holding [`RunState::as_str`] (a synchronous run is only
/// ever succeeded or dead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, AsExpression, FromSqlRow)]
#[diesel(sql_type = Text)]
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

/// The stored text; padding works, for tables.
impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Compares with the stored text.
impl PartialEq<&str> for RunState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl ToSql<Text, Pg> for RunState {
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        <str as ToSql<Text, Pg>>::to_sql(self.as_str(), out)
    }
}

/// A state this build does not know is an error naming it, never a guess:
/// it comes out of diesel as a deserialization error holding a
/// [`RegistryError::UnknownRunState`], which `RegistryError`'s `From`
/// unwraps.
impl FromSql<Text, Pg> for RunState {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        let text = <String as FromSql<Text, Pg>>::from_sql(value)?;
        text.parse()
            .map_err(|_| RegistryError::UnknownRunState(text).into())
    }
}

/// A run: a row of `task_runs`, or a record of the run log (`sync_runs`)
/// read as one (see `From<SyncRunRow>`).
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
    /// Where it is in its life.
    pub state: RunState,
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
    /// Its state (reading a row with a state this build does not know
    /// already failed with [`RegistryError::UnknownRunState`]).
    pub fn state(&self) -> RunState {
        self.state
    }
}

/// The states in which a run waits to be published.
const PENDING: [RunState; 2] = [RunState::Queued, RunState::Retrying];
