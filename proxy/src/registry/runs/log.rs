//! The run log: finished synchronous runs, written after `Process` answered,
//! into `sync_runs`, an append-only table range-partitioned by day on
//! `started_at` (UTC); and the upkeep of its day partitions.
//!
//! A row whose day has no partition goes to `sync_runs_default`, so a write
//! never fails for lack of a partition: [`Registry::prepare_sync_run_days`]
//! creates today's and the next days' ahead of time (and moves into a new
//! day anything the default partition already holds for it), and retention
//! drops whole days ([`Registry::drop_sync_run_days_before`]) and deletes
//! old rows of the default partition in batches.

use chrono::{DateTime, Days, NaiveDate, Utc};
use diesel::{PgConnection, prelude::*, sql_types::Timestamptz};
use uuid::Uuid;

use super::{Run, RunState};
use crate::{
    error::RegistryError,
    registry::{Registry, cached::cached_sql, schema::sync_runs},
};

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
    /// [`RunState::Succeeded`] or [`RunState::Dead`] (the table refuses
    /// any other).
    pub state: RunState,
    /// Why it failed.
    pub last_error: Option<String>,
    /// What it returned, as JSON text (the run log stores it as `jsonb`;
    /// text, so a record is serialized once and never cloned as a tree).
    pub output: Option<String>,
    /// When it started: the day partition it goes to.
    pub started_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: DateTime<Utc>,
}

/// A row of `sync_runs`.
#[derive(Debug, Clone, Queryable, Selectable, QueryableByName)]
#[diesel(table_name = sync_runs, check_for_backend(diesel::pg::Pg))]
pub(crate) struct SyncRunRow {
    id: Uuid,
    submission_id: Uuid,
    form_id: Uuid,
    task_id: Uuid,
    task_name: String,
    state: RunState,
    error: Option<String>,
    output: Option<serde_json::Value>,
    started_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
}

/// A logged synchronous run as a [`Run`]: one attempt of one, created (and
/// listed) at its start, never published.
impl From<SyncRunRow> for Run {
    fn from(row: SyncRunRow) -> Run {
        Run {
            id: row.id,
            submission_id: row.submission_id,
            form_id: row.form_id,
            task_id: row.task_id,
            task_name: row.task_name,
            is_async: false,
            state: row.state,
            attempts: 1,
            max_attempts: 1,
            last_error: row.error,
            output: row.output,
            next_attempt_at: row.started_at,
            published_at: None,
            started_at: Some(row.started_at),
            finished_at: Some(row.finished_at),
            created_at: row.started_at,
            updated_at: row.finished_at,
        }
    }
}

/// Serializes the upkeep of day partitions between `daisy serve`
/// processes (and `daisy runs prune`): a transaction-level advisory lock.
const PARTITIONS_LOCK: i64 = 0x6461_6973_795f_7372; // "daisy_sr"

/// How long partition upkeep waits for a table lock before giving up until
/// its next round: it must never queue the run log's inserts (or the
/// console's reads) behind it for longer.
const PARTITIONS_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '2s'";

/// The autovacuum settings of every partition of `sync_runs` (a partitioned
/// parent has no storage parameters): see the migration that made it.
const PARTITION_STORAGE: &str = "autovacuum_vacuum_insert_threshold = 500000, \
     autovacuum_vacuum_insert_scale_factor = 0, autovacuum_freeze_min_age = 0";

/// The partition of one UTC day.
fn partition_name(day: NaiveDate) -> String {
    format!("sync_runs_{}", day.format("%Y%m%d"))
}

/// `[day, day + 1)` at midnight UTC, as SQL literals.
fn day_bounds(day: NaiveDate) -> (String, String) {
    let midnight = |d: NaiveDate| format!("'{} 00:00:00+00'", d.format("%Y-%m-%d"));
    (midnight(day), midnight(day + Days::new(1)))
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    flag: bool,
}

/// Takes the partition upkeep lock for this transaction; false if another
/// process holds it (it is doing the same work).
fn lock_partitions(conn: &mut PgConnection) -> Result<bool, diesel::result::Error> {
    diesel::sql_query(PARTITIONS_LOCK_TIMEOUT).execute(conn)?;
    Ok(
        diesel::sql_query("SELECT pg_try_advisory_xact_lock($1) AS flag")
            .bind::<diesel::sql_types::BigInt, _>(PARTITIONS_LOCK)
            .get_result::<Flag>(conn)?
            .flag,
    )
}

impl Registry {
    /// Writes finished synchronous runs into `sync_runs`: one statement of
    /// ten array parameters whatever the batch's size, so PostgreSQL prepares
    /// it once per connection. Append-only: a replayed submission's
    /// runs are written again, and readers show the first record per
    /// (submission, task).
    pub fn record_sync_runs(&self, runs: &[SyncRun]) -> Result<(), RegistryError> {
        use diesel::sql_types::{Array, Nullable, Text, Uuid as SqlUuid};
        if runs.is_empty() {
            return Ok(());
        }
        let column = |f: fn(&SyncRun) -> Uuid| runs.iter().map(f).collect::<Vec<_>>();
        let mut conn = self.conn()?;
        cached_sql(
            "INSERT INTO sync_runs (id, submission_id, form_id, task_id, task_name, state, \
                 error, output, started_at, finished_at) \
             SELECT * FROM unnest($1, $2, $3, $4, $5, $6, $7, $8::jsonb[], $9, $10)",
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
        .bind::<Array<Nullable<Text>>, _>(
            runs.iter().map(|r| r.output.as_deref()).collect::<Vec<_>>(),
        )
        .bind::<Array<Timestamptz>, _>(runs.iter().map(|r| r.started_at).collect::<Vec<_>>())
        .bind::<Array<Timestamptz>, _>(runs.iter().map(|r| r.finished_at).collect::<Vec<_>>())
        .execute(&mut conn)?;
        Ok(())
    }

    /// Makes sure `sync_runs` has a partition for `from` and each of the
    /// `ahead` days after it; returns how many it created. A day's rows
    /// already in the default partition move into the new one in the same
    /// transaction. Gives up quietly (0) while another process does this,
    /// and with an error when a table lock is not granted within 2 s (the
    /// next round tries again; meanwhile rows go to the default partition).
    pub fn prepare_sync_run_days(
        &self,
        from: NaiveDate,
        ahead: u32,
    ) -> Result<usize, RegistryError> {
        let mut conn = self.conn()?;
        let mut created = 0;
        for day in (0..=ahead).filter_map(|n| from.checked_add_days(Days::new(n.into()))) {
            let made = conn.transaction(|conn| {
                if !lock_partitions(conn)? {
                    return Ok::<_, diesel::result::Error>(false);
                }
                let name = partition_name(day);
                let exists = diesel::sql_query("SELECT to_regclass($1) IS NOT NULL AS flag")
                    .bind::<diesel::sql_types::Text, _>(&name)
                    .get_result::<Flag>(conn)?
                    .flag;
                if exists {
                    return Ok(false);
                }
                let (from, to) = day_bounds(day);
                // Created beside, filled from the default partition, then
                // attached: ATTACH takes only a SHARE UPDATE EXCLUSIVE lock on
                // `sync_runs`, where CREATE ... PARTITION OF would block every
                // insert. The default partition is locked against inserts
                // first, so none of the day's rows lands there in between
                // (ATTACH would refuse).
                diesel::sql_query(format!(
                    "CREATE TABLE {name} (LIKE sync_runs INCLUDING DEFAULTS INCLUDING CONSTRAINTS) \
                     WITH ({PARTITION_STORAGE})"
                ))
                .execute(conn)?;
                diesel::sql_query("LOCK TABLE sync_runs_default IN SHARE ROW EXCLUSIVE MODE")
                    .execute(conn)?;
                diesel::sql_query(format!(
                    "WITH moved AS (DELETE FROM sync_runs_default \
                                    WHERE started_at >= {from} AND started_at < {to} RETURNING *) \
                     INSERT INTO {name} SELECT * FROM moved"
                ))
                .execute(conn)?;
                diesel::sql_query(format!(
                    "ALTER TABLE sync_runs ATTACH PARTITION {name} FOR VALUES FROM ({from}) TO ({to})"
                ))
                .execute(conn)?;
                Ok(true)
            })?;
            created += usize::from(made);
        }
        Ok(created)
    }

    /// Drops the day partitions of `sync_runs` that end at or before
    /// `cutoff` (a day straddling it stays whole until it is all older);
    /// returns how many. 0 while another process holds the upkeep lock.
    pub fn drop_sync_run_days_before(&self, cutoff: DateTime<Utc>) -> Result<usize, RegistryError> {
        let mut conn = self.conn()?;
        Ok(conn.transaction(|conn| {
            if !lock_partitions(conn)? {
                return Ok::<_, diesel::result::Error>(0);
            }
            let names = day_partitions(conn)?;
            let mut dropped = 0;
            for (day, name) in names {
                let end = day
                    .checked_add_days(Days::new(1))
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
                    .map(|t| t.and_utc());
                if end.is_some_and(|end| end <= cutoff) {
                    diesel::sql_query(format!("DROP TABLE {name}")).execute(conn)?;
                    dropped += 1;
                }
            }
            Ok(dropped)
        })?)
    }

    /// Deletes up to `batch` rows of the default partition of `sync_runs`
    /// (days that had no partition) that started before `cutoff`.
    pub(crate) fn prune_sync_run_default(
        &self,
        cutoff: DateTime<Utc>,
        batch: i64,
    ) -> Result<usize, RegistryError> {
        let mut conn = self.conn()?;
        Ok(diesel::sql_query(
            "DELETE FROM sync_runs_default WHERE ctid = ANY (ARRAY( \
                 SELECT ctid FROM sync_runs_default WHERE started_at < $1 LIMIT $2))",
        )
        .bind::<Timestamptz, _>(cutoff)
        .bind::<diesel::sql_types::BigInt, _>(batch)
        .execute(&mut conn)?)
    }

    /// The days that have a partition of `sync_runs`, in order.
    pub fn sync_run_days(&self) -> Result<Vec<NaiveDate>, RegistryError> {
        let mut conn = self.conn()?;
        Ok(day_partitions(&mut conn)?
            .into_iter()
            .map(|(day, _)| day)
            .collect())
    }
}

/// The day partitions of `sync_runs` (not the default one), oldest first.
fn day_partitions(
    conn: &mut PgConnection,
) -> Result<Vec<(NaiveDate, String)>, diesel::result::Error> {
    let names: Vec<Name> = diesel::sql_query(
        "SELECT c.relname::text AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'sync_runs'::regclass",
    )
    .load(conn)?;
    let mut days: Vec<(NaiveDate, String)> = names
        .into_iter()
        .filter_map(|Name { name }| {
            let day = NaiveDate::parse_from_str(name.strip_prefix("sync_runs_")?, "%Y%m%d").ok()?;
            Some((day, name))
        })
        .collect();
    days.sort();
    Ok(days)
}
