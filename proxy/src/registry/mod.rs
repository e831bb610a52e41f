//! The task registry on PostgreSQL: the only module that talks diesel.
//!
//! Holds the connection pool, the embedded migrations and the `tasks`
//! queries used by the server and the CLI. The blocking LISTEN loop that
//! reports changes to a form's tasks is in `listen`; the queries on runs, one
//! module per actor, are in `runs`.

pub mod cached;
mod console;
mod keys;
mod listen;
mod pool;
mod rate;
mod retention;
mod runs;
mod schema;
mod stats;

pub use console::{AttemptRecord, MinuteCount, RunFilter};
pub use keys::{NewKey, StoredKey};
pub use listen::Change;
pub use rate::Pace;
pub use retention::Pruned;
pub use stats::RunStats;

pub use runs::{
    Acceptance, Accepted, Attempt, ClaimRequest, Claimed, DeadLetter, Finish, Replay, Run,
    RunState, SyncRun, new_run_id,
};

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use diesel::{
    prelude::*,
    r2d2::{Pool, PooledConnection},
};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use uuid::Uuid;

use crate::error::RegistryError;

use self::schema::tasks;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

/// One task attached to a form: a row of `tasks`.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = tasks, check_for_backend(diesel::pg::Pg))]
pub struct TaskDef {
    /// The task's id.
    pub id: Uuid,
    /// The form it is attached to.
    pub form_id: Uuid,
    /// A name for people, returned in results.
    pub name: String,
    /// The plugin library: `lib<module>.so` in the plugins directory.
    pub module: String,
    /// The task inside the library.
    pub func: String,
    /// Runs on a worker (true) or inside `Process` (false).
    #[diesel(column_name = async_status)]
    pub is_async: bool,
    /// The task's configuration, handed to the plugin when it is created.
    pub config: serde_json::Value,
    /// Disabled tasks are kept but not run.
    pub enabled: bool,
    /// How long one run may take.
    pub timeout_ms: i32,
    /// How many attempts an asynchronous run gets.
    pub max_attempts: i32,
    /// When the task was attached; results come in this order.
    pub created_at: DateTime<Utc>,
    /// `process`, `in_process`, or `None` for the server's default.
    pub isolation: Option<String>,
    /// At most this many runs start a minute, across all workers.
    pub rate_per_minute: Option<i32>,
    /// Tasks of one group share one pace; without one, the task has its own.
    pub rate_group: Option<String>,
}

impl TaskDef {
    /// The task's pace, if it has a rate limit: the bucket it draws from
    /// (its group, or its own id) and the interval between run starts.
    pub fn pace(&self) -> Option<rate::Pace> {
        let per_minute = u32::try_from(self.rate_per_minute?)
            .ok()
            .filter(|&n| n > 0)?;
        Some(rate::Pace {
            bucket: self
                .rate_group
                .as_ref()
                .map_or_else(|| format!("task:{}", self.id), |g| format!("group:{g}")),
            interval: Duration::from_secs(60) / per_minute,
        })
    }
}

/// A task to attach to a form.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = tasks)]
pub struct NewTask {
    /// The form to attach it to.
    pub form_id: Uuid,
    /// A name for people.
    pub name: String,
    /// The plugin library.
    pub module: String,
    /// The task inside the library.
    pub func: String,
    /// Runs on a worker (true) or inside `Process` (false).
    #[diesel(column_name = async_status)]
    pub is_async: bool,
    /// The task's configuration.
    pub config: serde_json::Value,
    /// Whether it runs.
    pub enabled: bool,
    /// How long one run may take.
    pub timeout_ms: i32,
    /// How many attempts an asynchronous run gets.
    pub max_attempts: i32,
    /// `process`, `in_process`, or `None` for the server's default.
    pub isolation: Option<String>,
}

/// A task of one plugin build, quarantined after crashing its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    /// The library's module.
    pub module: String,
    /// The build's SHA-256.
    pub sha256: String,
    /// The task inside it.
    pub func: String,
    /// Crashes that put it there.
    pub crashes: i32,
    /// When it ends (unless a new build comes first).
    pub until: DateTime<Utc>,
}

/// Connection settings for the registry.
#[derive(Clone)]
pub struct DbConfig {
    /// `postgres://` URL; may hold a password, so it is never logged.
    pub url: String,
    /// Most connections the pool opens.
    pub pool_size: u32,
    /// How long a call waits for a connection before it fails.
    pub timeout: Duration,
}

impl std::fmt::Debug for DbConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("DbConfig")
            .field("url", &"<redacted>")
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The task registry: a connection pool and the queries on `tasks`.
#[derive(Clone)]
pub struct Registry {
    pool: Pool<pool::Manager>,
    url: Arc<str>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// Builds the pool without connecting: a registry can start while the
    /// database is down, and connects when it is back.
    pub fn new(config: &DbConfig) -> Registry {
        let pool = Pool::builder()
            .max_size(config.pool_size.max(1))
            // Connections are opened on demand; none are kept warm for nothing.
            .min_idle(Some(0))
            .connection_timeout(config.timeout)
            // r2d2 logs connection errors on its own; ours name the operation.
            .error_handler(Box::new(diesel::r2d2::NopErrorHandler))
            .build_unchecked(pool::Manager::new(&config.url));
        Registry {
            pool,
            url: config.url.as_str().into(),
        }
    }

    pub(crate) fn conn(&self) -> Result<PooledConnection<pool::Manager>, RegistryError> {
        let wait = crate::metrics::hot::pool_wait().map(|h| (h, std::time::Instant::now()));
        let conn = self.pool.get();
        if let Some((histogram, started)) = wait {
            histogram.record(started.elapsed());
        }
        conn.map_err(|err| {
            ::metrics::counter!(crate::metrics::DB_POOL_TIMEOUTS).increment(1);
            RegistryError::Unavailable(err)
        })
    }

    /// Runs the embedded migrations; returns the versions it applied.
    pub fn migrate(&self) -> Result<Vec<String>, RegistryError> {
        let mut conn = self.conn()?;
        let applied = conn
            .run_pending_migrations(MIGRATIONS)
            .map_err(|err| RegistryError::Migration(err.to_string()))?;
        Ok(applied.iter().map(|v| v.to_string()).collect())
    }

    /// The tasks attached to `form`, in the order they were attached.
    pub fn tasks_for_form(&self, form: Uuid) -> Result<Vec<TaskDef>, RegistryError> {
        let mut conn = self.conn()?;
        Ok(tasks::table
            .filter(tasks::form_id.eq(form))
            .order((tasks::created_at, tasks::id))
            .select(TaskDef::as_select())
            .load(&mut conn)?)
    }

    /// Every task, or those of one form.
    pub fn list(&self, form: Option<Uuid>) -> Result<Vec<TaskDef>, RegistryError> {
        let mut conn = self.conn()?;
        let mut query = tasks::table
            .order((tasks::form_id, tasks::created_at, tasks::id))
            .select(TaskDef::as_select())
            .into_boxed();
        if let Some(form) = form {
            query = query.filter(tasks::form_id.eq(form));
        }
        Ok(query.load(&mut conn)?)
    }

    /// Attaches a task to a form.
    pub fn attach(&self, task: &NewTask) -> Result<TaskDef, RegistryError> {
        let mut conn = self.conn()?;
        Ok(diesel::insert_into(tasks::table)
            .values(task)
            .returning(TaskDef::as_returning())
            .get_result(&mut conn)?)
    }

    /// Records that a plugin build's task is quarantined (or that its
    /// quarantine was extended).
    pub fn record_quarantine(&self, q: &Quarantine) -> Result<(), RegistryError> {
        use self::schema::plugin_quarantines::dsl as pq;
        let mut conn = self.conn()?;
        diesel::insert_into(pq::plugin_quarantines)
            .values((
                pq::sha256.eq(&q.sha256),
                pq::func.eq(&q.func),
                pq::module.eq(&q.module),
                pq::crashes.eq(q.crashes),
                pq::quarantined_until.eq(q.until),
            ))
            .on_conflict((pq::sha256, pq::func))
            .do_update()
            .set((pq::crashes.eq(q.crashes), pq::quarantined_until.eq(q.until)))
            .execute(&mut conn)?;
        Ok(())
    }

    /// The quarantines still in force for builds of `module`.
    pub fn quarantines(&self, module: &str) -> Result<Vec<Quarantine>, RegistryError> {
        use self::schema::plugin_quarantines::dsl as pq;
        let mut conn = self.conn()?;
        Ok(pq::plugin_quarantines
            .filter(pq::module.eq(module))
            .filter(pq::quarantined_until.gt(diesel::dsl::now))
            .order(pq::func)
            .select((
                pq::module,
                pq::sha256,
                pq::func,
                pq::crashes,
                pq::quarantined_until,
            ))
            .load::<(String, String, String, i32, DateTime<Utc>)>(&mut conn)?
            .into_iter()
            .map(|(module, sha256, func, crashes, until)| Quarantine {
                module,
                sha256,
                func,
                crashes,
                until,
            })
            .collect())
    }

    /// Detaches a task; false if there was no such task.
    pub fn detach(&self, id: Uuid) -> Result<bool, RegistryError> {
        let mut conn = self.conn()?;
        let deleted = diesel::delete(tasks::table.find(id)).execute(&mut conn)?;
        Ok(deleted > 0)
    }
}
