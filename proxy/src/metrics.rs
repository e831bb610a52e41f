//! Prometheus metrics: every name in one place, the recorder, and what
//! `/metrics` renders.
//!
//! Names follow Prometheus's conventions: a `daisy_` prefix, base units
//! (`_seconds`), `_total` on counters. Labels are bounded: a task's name, a
//! gRPC code, an outcome, a state, a module; never a submission or run id.
//! Without `--http-addr` no recorder is installed and every update is a
//! no-op.

use std::{sync::OnceLock, time::Duration};

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// `Process` calls, by gRPC `code`.
pub const PROCESS_CALLS: &str = "daisy_process_calls_total";
/// `Process` latency, by gRPC `code`.
pub const PROCESS_DURATION: &str = "daisy_process_duration_seconds";
/// Task runs, by `task` (its name), `mode` (sync, async) and `outcome`.
pub const TASK_RUNS: &str = "daisy_task_runs_total";
/// Task run durations, by `task` and `mode`.
pub const TASK_DURATION: &str = "daisy_task_run_duration_seconds";
/// Runs waiting to be published (due, unconfirmed).
pub const OUTBOX_UNPUBLISHED: &str = "daisy_outbox_unpublished_runs";
/// How long the oldest due, unconfirmed run has waited.
pub const OUTBOX_OLDEST_AGE: &str = "daisy_outbox_oldest_unpublished_age_seconds";
/// Runs published with a broker confirm, by `path`: `accept` (by the
/// proxy that accepted them) or `relay` (republished by the relay).
pub const RUNS_PUBLISHED: &str = "daisy_runs_published_total";
/// Asynchronous runs by `state` (queued, running, retrying, dead), from a
/// periodic query.
pub const RUNS_BY_STATE: &str = "daisy_runs";
/// Deliveries a worker holds (prefetched or executing).
pub const WORKER_IN_FLIGHT: &str = "daisy_worker_deliveries_in_flight";
/// Runs a worker claimed.
pub const WORKER_CLAIMS: &str = "daisy_worker_claims_total";
/// Deliveries a worker acknowledged.
pub const WORKER_ACKS: &str = "daisy_worker_acks_total";
/// How claimed executions ended, by `result`: succeeded, retry, dead,
/// throttled, paced.
pub const WORKER_FINISHES: &str = "daisy_worker_finishes_total";
/// Waits for a database connection from the pool.
pub const DB_POOL_WAIT: &str = "daisy_db_pool_wait_seconds";
/// Waits for a database connection that timed out.
pub const DB_POOL_TIMEOUTS: &str = "daisy_db_pool_timeouts_total";
/// Whether a RabbitMQ connection is up (1) or not (0), by `role`
/// (publisher, consumer).
pub const BROKER_CONNECTED: &str = "daisy_broker_connected";
/// Plugin hosts alive.
pub const HOSTS_ALIVE: &str = "daisy_plugin_hosts";
/// Plugin hosts that died, by `module`.
pub const HOST_CRASHES: &str = "daisy_plugin_host_crashes_total";
/// Plugin hosts recycled (run budget, memory limit, new build), by `module`.
pub const HOST_RECYCLES: &str = "daisy_plugin_host_recycles_total";
/// Tasks quarantined now.
pub const QUARANTINED: &str = "daisy_quarantined_tasks";

/// Histogram buckets for latencies, in seconds: 100 µs to 60 s.
const BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 60.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder (once; later calls return the same
/// handle) and describes every metric. Must be called inside a Tokio
/// runtime: it spawns the recorder's upkeep.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets(&BUCKETS)?
        .install_recorder()?;
    describe();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Whether a recorder is installed (metrics are on).
pub fn enabled() -> bool {
    HANDLE.get().is_some()
}

fn describe() {
    describe_counter!(PROCESS_CALLS, "Process calls, by gRPC code.");
    describe_histogram!(
        PROCESS_DURATION,
        Unit::Seconds,
        "Process latency, by gRPC code."
    );
    describe_counter!(TASK_RUNS, "Task runs, by task, mode and outcome.");
    describe_histogram!(
        TASK_DURATION,
        Unit::Seconds,
        "Task run durations, by task and mode."
    );
    describe_gauge!(
        OUTBOX_UNPUBLISHED,
        "Due asynchronous runs not yet confirmed by the broker."
    );
    describe_gauge!(
        OUTBOX_OLDEST_AGE,
        Unit::Seconds,
        "How long the oldest due, unconfirmed run has waited."
    );
    describe_counter!(
        RUNS_PUBLISHED,
        "Runs confirmed by the broker, by path (accept, relay)."
    );
    describe_gauge!(
        RUNS_BY_STATE,
        "Asynchronous runs by state (queued, running, retrying, dead)."
    );
    describe_gauge!(WORKER_IN_FLIGHT, "Deliveries the worker holds.");
    describe_counter!(WORKER_CLAIMS, "Runs the worker claimed.");
    describe_counter!(WORKER_ACKS, "Deliveries the worker acknowledged.");
    describe_counter!(
        WORKER_FINISHES,
        "Claimed executions by how they ended (succeeded, retry, dead, throttled, paced)."
    );
    describe_histogram!(
        DB_POOL_WAIT,
        Unit::Seconds,
        "Waits for a database connection from the pool."
    );
    describe_counter!(
        DB_POOL_TIMEOUTS,
        "Waits for a database connection that timed out."
    );
    describe_gauge!(
        BROKER_CONNECTED,
        "Whether a RabbitMQ connection is up (1) or not (0), by role."
    );
    describe_gauge!(HOSTS_ALIVE, "Plugin hosts alive.");
    describe_counter!(HOST_CRASHES, "Plugin hosts that died, by module.");
    describe_counter!(HOST_RECYCLES, "Plugin hosts recycled, by module.");
    describe_gauge!(QUARANTINED, "Tasks quarantined now.");
}

/// Handles for the per-call metrics, looked up once instead of per call
/// (a lookup hashes the name and labels). `None` while metrics are off.
pub mod hot {
    use std::{
        collections::HashMap,
        sync::{Arc, OnceLock, RwLock},
    };

    use metrics::{Counter, Histogram, counter, histogram};

    /// A successful `Process`: its counter and latency histogram.
    pub fn process_ok() -> Option<&'static (Counter, Histogram)> {
        static OK: OnceLock<(Counter, Histogram)> = OnceLock::new();
        super::enabled().then(|| {
            OK.get_or_init(|| {
                (
                    counter!(super::PROCESS_CALLS, "code" => "OK"),
                    histogram!(super::PROCESS_DURATION, "code" => "OK"),
                )
            })
        })
    }

    /// Waits for a database connection.
    pub fn pool_wait() -> Option<&'static Histogram> {
        static WAIT: OnceLock<Histogram> = OnceLock::new();
        super::enabled().then(|| WAIT.get_or_init(|| histogram!(super::DB_POOL_WAIT)))
    }

    /// One task's run metrics in one mode: a counter per outcome and the
    /// duration histogram.
    pub struct TaskRuns {
        /// By outcome: succeeded, failed, timed_out, crashed.
        pub outcomes: [Counter; 4],
        /// Run durations.
        pub duration: Histogram,
    }

    /// Handles by (task name, mode).
    type ByTask = HashMap<(String, &'static str), Arc<TaskRuns>>;

    /// The handles of task `name` in `mode` (bounded by the tasks' names).
    pub fn task_runs(name: &str, mode: &'static str) -> Option<Arc<TaskRuns>> {
        static TASKS: OnceLock<RwLock<ByTask>> = OnceLock::new();
        if !super::enabled() {
            return None;
        }
        let tasks = TASKS.get_or_init(RwLock::default);
        let key = (name.to_owned(), mode);
        if let Some(found) = tasks.read().ok()?.get(&key) {
            return Some(found.clone());
        }
        let made = Arc::new(TaskRuns {
            outcomes: ["succeeded", "failed", "timed_out", "crashed"].map(|outcome| {
                counter!(super::TASK_RUNS, "task" => name.to_owned(), "mode" => mode, "outcome" => outcome)
            }),
            duration: histogram!(super::TASK_DURATION, "task" => name.to_owned(), "mode" => mode),
        });
        tasks.write().ok()?.insert(key, made.clone());
        Some(made)
    }
}
