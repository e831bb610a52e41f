//! Daisy's proxy: the `PostSubProxy` gRPC service and everything behind it.
//!
//! A form backend calls `Process` after storing a response; Daisy looks up the
//! form's tasks and runs the synchronous ones through their plugins.
//!
//! # Modules
//! - [`server`]: assembles the service and runs it (`run`).
//! - [`grpc`]: the gRPC edge; the only module that sees protobuf types.
//! - [`catalog`]: the per-form task cache, invalidated by LISTEN/NOTIFY.
//! - [`registry`]: PostgreSQL (diesel); the only module that talks diesel.
//! - [`executor`]: runs tasks through [`plugins`], bounded, under their timeouts.
//! - [`plugins`]: the plugin-host layer: runs plugin code in supervised
//!   host processes (or in-process, where a task opts in).
//! - [`batch`]: group commit of concurrent callers' database writes.
//! - [`lifecycle`]: the one stop signal and task tracker of serve and worker.
//! - [`backoff`]: the one exponential backoff (reconnects, respawns, retries).
//! - [`http`] and [`metrics`]: the operations listener and Prometheus metrics.
//! - [`error`]: the error types.

pub mod auth;
pub mod backoff;
pub mod batch;
pub mod catalog;
pub mod console;
pub mod error;
pub mod executor;
pub mod grpc;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod outbox;
pub mod plugins;
pub mod queue;
pub mod registry;
pub mod run_log;
pub mod scaffold;
pub mod security;
pub mod server;
pub mod trace;
pub mod worker;

use std::path::PathBuf;

pub use registry::DbConfig;
pub use server::run;

/// Everything `daisy serve` needs; built by the binary from flags and
/// environment, never read from the environment here.
#[derive(Debug, Clone)]
pub struct Config {
    /// The task registry's database.
    pub db: DbConfig,
    /// Where plugin libraries live.
    pub plugins_dir: PathBuf,
    /// How plugin hosts are run.
    pub hosts: plugins::HostConfig,
    /// Where tasks that do not say run their plugin code.
    pub isolation: plugins::Isolation,
    /// Requests larger than this get `RESOURCE_EXHAUSTED`.
    pub max_request_bytes: usize,
    /// What a submission may hold; beyond it, `INVALID_ARGUMENT`.
    pub limits: grpc::Limits,
    /// How many task runs may be in flight at once.
    pub max_concurrent_tasks: usize,
    /// Where asynchronous runs are queued.
    pub queue: queue::QueueConfig,
    /// How long the relay leaves a new run to the accepting proxy's publish.
    pub outbox_grace: std::time::Duration,
    /// How often the relay looks for due, unconfirmed runs.
    pub relay_interval: std::time::Duration,
    /// After how long a published-but-unclaimed or claimed-but-unfinished
    /// run is handed back to the relay; must exceed the longest task timeout.
    pub stale_after: std::time::Duration,
    /// Which synchronous runs go to the run log.
    pub sync_run_log: SyncRunLog,
    /// Delete finished runs and their submissions older than this,
    /// continuously (synchronous runs by whole days: up to a day longer);
    /// `None` keeps everything.
    pub retain: Option<std::time::Duration>,
    /// TLS, API keys and reflection.
    pub security: security::Security,
    /// Where the operations listener (metrics, health) listens, if at all.
    pub http_addr: Option<std::net::SocketAddr>,
    /// How long shutdown waits for in-flight calls and background tasks
    /// before it leaves what did not stop.
    pub shutdown_grace: std::time::Duration,
}

/// Which synchronous runs `Process` records in the run log, `sync_runs`
/// (asynchronous runs are always recorded in `task_runs`: they are the
/// outbox).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SyncRunLog {
    /// Every run: `GetRuns` shows them all. The default.
    #[default]
    All,
    /// Only failed and timed-out runs: saves one row per successful task
    /// run, which is most of the database's work on a synchronous-only form.
    Failed,
}
