//! The flag groups the commands share, and what they become in the
//! library's configs.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Args;
use proxy::{
    DbConfig,
    plugins::{HostConfig, Isolation},
    queue::{QueueConfig, QueueType},
};

#[derive(Args)]
pub(crate) struct DbArgs {
    /// PostgreSQL URL of the task registry.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/daisy",
        hide_env_values = true
    )]
    pub(crate) database_url: String,
    /// Most database connections to open.
    #[arg(long, env = "DAISY_DB_POOL_SIZE", default_value_t = 8)]
    pub(crate) db_pool_size: u32,
    /// How long a call waits for a database connection, in milliseconds.
    #[arg(long, env = "DAISY_DB_TIMEOUT_MS", default_value_t = 2000)]
    pub(crate) db_timeout_ms: u64,
}

impl DbArgs {
    pub(crate) fn config(&self) -> DbConfig {
        DbConfig {
            url: self.database_url.clone(),
            pool_size: self.db_pool_size,
            timeout: Duration::from_millis(self.db_timeout_ms),
        }
    }
}

#[derive(Args)]
pub(crate) struct QueueArgs {
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub(crate) amqp_url: String,
    /// Exchange the runs are published to.
    #[arg(long, env = "DAISY_EXCHANGE", default_value = "daisy")]
    pub(crate) exchange: String,
    /// Queue the workers consume; `<queue>.dead` gets the dead letters.
    #[arg(long, env = "DAISY_QUEUE", default_value = "daisy.runs")]
    pub(crate) queue: String,
    /// Quorum (delivery limit, replicated) or classic queue.
    #[arg(long, env = "DAISY_QUEUE_TYPE", value_enum, default_value = "quorum")]
    pub(crate) queue_type: QueueType,
    /// Deliveries after which a run that keeps killing workers is dead (quorum only).
    #[arg(long, env = "DAISY_DELIVERY_LIMIT", default_value_t = 5)]
    pub(crate) delivery_limit: u32,
    /// For an `amqps://` URL: the CA (PEM) the broker's certificate must
    /// chain to (the public web roots if not given).
    #[arg(long, env = "DAISY_AMQP_CA")]
    pub(crate) amqp_ca: Option<PathBuf>,
}

impl QueueArgs {
    pub(crate) fn config(&self) -> QueueConfig {
        QueueConfig {
            url: self.amqp_url.clone(),
            exchange: self.exchange.clone(),
            queue: self.queue.clone(),
            queue_type: self.queue_type,
            delivery_limit: self.delivery_limit,
            confirm_timeout: Duration::from_secs(10),
            ca_file: self.amqp_ca.clone(),
        }
    }
}

#[derive(Args)]
pub(crate) struct HostArgs {
    /// Where tasks that do not say run their plugin code: `process` (a
    /// supervised plugin host per library) or `in-process` (inside this
    /// process; a crash there takes it down).
    #[arg(long, env = "DAISY_ISOLATION", value_enum, default_value = "process")]
    pub(crate) isolation: Isolation,
    /// Where the secrets task configs name (`{"secret": "NAME"}`) live: one
    /// file per secret, mode 0600 or stricter.
    #[arg(long, env = "DAISY_SECRETS_DIR")]
    pub(crate) secrets_dir: Option<PathBuf>,
    /// Load only the library builds whose SHA-256 this file lists (one per
    /// line, as `sha256sum` prints them).
    #[arg(long, env = "DAISY_PLUGIN_SHA256")]
    plugin_sha256: Option<PathBuf>,
    /// Plugin host processes per library.
    #[arg(long, env = "DAISY_HOSTS_PER_MODULE", default_value_t = 1)]
    pub(crate) hosts_per_module: usize,
    /// Threads running tasks in each plugin host.
    #[arg(long, env = "DAISY_HOST_THREADS", default_value_t = 16)]
    pub(crate) host_threads: usize,
    /// Resident memory (MiB) a plugin host may reach; the run that passes it
    /// fails and the host is recycled. 0: no limit.
    #[arg(long, env = "DAISY_HOST_MEMORY_MIB", default_value_t = 1024)]
    pub(crate) host_memory_mib: u64,
    /// Runs after which a plugin host is recycled. 0: no limit.
    #[arg(long, env = "DAISY_HOST_MAX_RUNS", default_value_t = 0)]
    pub(crate) host_max_runs: u64,
    /// Seconds a plugin host may sit idle before it exits.
    #[arg(long, env = "DAISY_HOST_IDLE_SECS", default_value_t = 300)]
    pub(crate) host_idle_secs: u64,
    /// How long loading a library in a new plugin host may take, in milliseconds.
    #[arg(long, env = "DAISY_HOST_START_TIMEOUT_MS", default_value_t = 10_000)]
    pub(crate) host_start_timeout_ms: u64,
    /// An environment variable plugin hosts may see (repeatable); they
    /// always get PATH, HOME, LANG and TZ, and nothing else.
    #[arg(long = "plugin-env", env = "DAISY_PLUGIN_ENV", value_delimiter = ',')]
    pub(crate) plugin_env: Vec<String>,
    /// Crashes of its host with a task's run in flight that quarantine the task.
    #[arg(long, env = "DAISY_QUARANTINE_AFTER", default_value_t = 3)]
    pub(crate) quarantine_after: u32,
    /// Seconds over which those crashes count, and how long a quarantine lasts.
    #[arg(long, env = "DAISY_QUARANTINE_WINDOW_SECS", default_value_t = 600)]
    pub(crate) quarantine_window_secs: u64,
}

impl HostArgs {
    pub(crate) fn config(&self) -> anyhow::Result<HostConfig> {
        let program = std::env::current_exe().context("finding the daisy executable")?;
        for name in &self.plugin_env {
            anyhow::ensure!(
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "--plugin-env {name:?} is not an environment variable name"
            );
            anyhow::ensure!(
                !matches!(name.as_str(), "DATABASE_URL" | "AMQP_URL"),
                "--plugin-env {name}: Daisy's own secrets are never passed to plugins"
            );
        }
        Ok(HostConfig {
            hosts_per_module: self.hosts_per_module.max(1),
            threads_per_host: self.host_threads.max(1),
            memory_limit_mib: self.host_memory_mib,
            max_runs: self.host_max_runs,
            idle_timeout: Duration::from_secs(self.host_idle_secs.max(1)),
            start_timeout: Duration::from_millis(self.host_start_timeout_ms.max(1)),
            env: self.plugin_env.clone(),
            quarantine_after: self.quarantine_after.max(1),
            quarantine_window: Duration::from_secs(self.quarantine_window_secs.max(1)),
            allowed: match &self.plugin_sha256 {
                Some(path) => proxy::plugins::AllowList::from_file(path).with_context(|| {
                    format!(
                        "reading the --plugin-sha256 allow-list '{}'",
                        path.display()
                    )
                })?,
                None => proxy::plugins::AllowList::any(),
            },
            secrets_dir: self.secrets_dir.clone(),
            ..HostConfig::new(program)
        })
    }
}

#[derive(Args)]
pub(crate) struct WorkerArgs {
    #[command(flatten)]
    pub(crate) db: DbArgs,
    #[command(flatten)]
    pub(crate) queue: QueueArgs,
    #[command(flatten)]
    pub(crate) plugins: PluginsArgs,
    #[command(flatten)]
    pub(crate) hosts: HostArgs,
    /// Deliveries held at once; their claims and outcomes are written in
    /// batches, so more in flight means fewer database round trips per run.
    #[arg(long, env = "DAISY_PREFETCH", default_value_t = 256)]
    pub(crate) prefetch: u16,
    /// How many runs may execute at once (the rest of the prefetched
    /// deliveries wait their turn).
    #[arg(long, env = "DAISY_MAX_CONCURRENT_TASKS", default_value_t = 64)]
    pub(crate) max_concurrent_tasks: usize,
    /// Delay before the first retry, in milliseconds; doubles per attempt.
    #[arg(long, env = "DAISY_RETRY_BASE_MS", default_value_t = 1000)]
    pub(crate) retry_base_ms: u64,
    /// Longest delay between retries, in milliseconds.
    #[arg(long, env = "DAISY_RETRY_MAX_MS", default_value_t = 300_000)]
    pub(crate) retry_max_ms: u64,
    /// How long in all a run may wait on an API's Retry-After (a 429, say)
    /// without those waits using its attempts, in milliseconds.
    #[arg(long, env = "DAISY_MAX_THROTTLED_MS", default_value_t = 3_600_000)]
    pub(crate) max_throttled_ms: u64,
    /// This worker's name in the attempt log (default: host and pid).
    #[arg(long, env = "DAISY_WORKER_NAME")]
    pub(crate) name: Option<String>,
    /// A run that was in flight in this many crashes of its plugin host is
    /// dead (its neighbours in those crashes are retried as usual).
    #[arg(long, env = "DAISY_MAX_CRASHES", default_value_t = 3)]
    pub(crate) max_crashes: u32,
    /// Seconds a claimed run stays this worker's without an extension; the
    /// worker extends the runs it executes every third of it, and the relay
    /// re-queues a run whose lease expired.
    #[arg(long, env = "DAISY_LEASE_SECS", default_value_t = 30)]
    pub(crate) lease_secs: u64,
    /// On SIGTERM or ctrl-c, how long to wait for the runs in flight to finish
    /// before exiting anyway, in seconds (keep it below the orchestrator's
    /// kill timeout: Kubernetes' default grace period is 30 s).
    #[arg(long, env = "DAISY_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub(crate) shutdown_grace_secs: u64,
    /// Serve /metrics, /healthz and /readyz here (loopback only); off if
    /// not given.
    #[arg(long, env = "DAISY_HTTP_ADDR")]
    pub(crate) http_addr: Option<std::net::SocketAddr>,
}

#[derive(Args)]
pub(crate) struct PluginsArgs {
    /// Directory holding the plugin libraries (lib<module>.so).
    #[arg(long, env = "DAISY_PLUGINS_DIR", default_value = "plugins")]
    pub(crate) plugins_dir: PathBuf,
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on. Anything but loopback needs TLS and API keys
    /// (or --insecure).
    #[arg(long, env = "DAISY_ADDR", default_value = "127.0.0.1:50051")]
    pub(crate) addr: String,
    /// The TLS certificate chain (PEM); with --tls-key, serves TLS only.
    #[arg(long, env = "DAISY_TLS_CERT", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM).
    #[arg(long, env = "DAISY_TLS_KEY", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Require client certificates chaining to this CA (PEM): mutual TLS.
    #[arg(long, env = "DAISY_CLIENT_CA", requires = "tls_cert")]
    pub(crate) client_ca: Option<PathBuf>,
    /// `token`: every call needs `authorization: Bearer <API key>`; `none`:
    /// no keys. Default: none on a loopback address, token anywhere else.
    #[arg(long, env = "DAISY_AUTH", value_enum)]
    pub(crate) auth: Option<proxy::auth::AuthMode>,
    /// Serve a non-loopback address without TLS or without API keys.
    #[arg(long, env = "DAISY_INSECURE")]
    pub(crate) insecure: bool,
    /// Serve gRPC reflection on a non-loopback address too (it always is on loopback).
    #[arg(long, env = "DAISY_REFLECTION")]
    pub(crate) reflection: bool,
    #[command(flatten)]
    pub(crate) db: DbArgs,
    #[command(flatten)]
    pub(crate) plugins: PluginsArgs,
    #[command(flatten)]
    pub(crate) hosts: HostArgs,
    /// Largest request accepted, in bytes; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DAISY_MAX_REQUEST_BYTES", default_value_t = 1024 * 1024)]
    pub(crate) max_request_bytes: usize,
    /// How many task runs may be in flight at once.
    #[arg(long, env = "DAISY_MAX_CONCURRENT_TASKS", default_value_t = 64)]
    pub(crate) max_concurrent_tasks: usize,
    /// Deepest nesting of objects and lists a submission may have.
    #[arg(long, env = "DAISY_MAX_DEPTH", default_value_t = 32)]
    pub(crate) max_depth: usize,
    /// Most keys a submission may hold, over all its objects.
    #[arg(long, env = "DAISY_MAX_KEYS", default_value_t = 10_000)]
    pub(crate) max_keys: usize,
    /// Longest string or key in a submission, in bytes.
    #[arg(long, env = "DAISY_MAX_STRING_BYTES", default_value_t = 65_536)]
    pub(crate) max_string_bytes: usize,
    #[command(flatten)]
    pub(crate) queue: QueueArgs,
    /// How long the relay leaves a new run to the accepting proxy, in milliseconds.
    #[arg(long, env = "DAISY_OUTBOX_GRACE_MS", default_value_t = 5000)]
    pub(crate) outbox_grace_ms: u64,
    /// How often the relay looks for unpublished runs, in milliseconds.
    #[arg(long, env = "DAISY_RELAY_INTERVAL_MS", default_value_t = 500)]
    pub(crate) relay_interval_ms: u64,
    /// Re-queue runs published but never picked up, or claimed but never
    /// finished, after this many seconds; keep it above the longest task timeout.
    #[arg(long, env = "DAISY_STALE_AFTER_SECS", default_value_t = 900)]
    pub(crate) stale_after_secs: u64,
    /// Delete finished runs, their attempts and submissions after this many
    /// days, continuously (0: keep everything).
    #[arg(long, env = "DAISY_RETAIN_DAYS", default_value_t = 0)]
    pub(crate) retain_days: u64,
    /// Which synchronous runs are recorded in the run log: `all` (GetRuns
    /// shows every run) or `failed` (one row less per successful task run).
    #[arg(long, env = "DAISY_SYNC_RUN_LOG", value_enum, default_value = "all")]
    pub(crate) sync_run_log: proxy::SyncRunLog,
    /// On SIGTERM or ctrl-c, how long to wait for the calls in flight to finish
    /// before exiting anyway, in seconds (keep it below the orchestrator's
    /// kill timeout: Kubernetes' default grace period is 30 s).
    #[arg(long, env = "DAISY_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub(crate) shutdown_grace_secs: u64,
    /// Serve /metrics, /healthz and /readyz here (loopback only); off if
    /// not given.
    #[arg(long, env = "DAISY_HTTP_ADDR")]
    pub(crate) http_addr: Option<std::net::SocketAddr>,
}

/// A task's rate limit.
#[derive(clap::Args)]
pub(crate) struct RateArgs {
    /// Start at most this many of its runs a minute, across all workers,
    /// evenly spaced (asynchronous tasks; see README "Quotas").
    #[arg(long, value_name = "PER_MINUTE", value_parser = clap::value_parser!(i32).range(1..))]
    pub(crate) rate_limit: Option<i32>,
    /// Share the pace with every task of this group (one API account's
    /// quota used by many forms); needs --rate-limit.
    #[arg(long, requires = "rate_limit")]
    pub(crate) rate_group: Option<String>,
}
