//! `daisy`: serve the PostSubProxy gRPC service, run migrations, attach tasks
//! to forms and inspect plugins. Every flag also reads a `DAISY_*` variable.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use proxy::{
    Config, DbConfig,
    plugins::{HostConfig, Isolation, Plugins, validate_name},
    queue::{QueueConfig, QueueType},
    registry::{NewTask, Registry, RunState},
    worker::WorkerConfig,
};
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "daisy",
    version,
    about = "Pluggable post-submission tasks for form backends"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the PostSubProxy gRPC service (and relay unpublished runs).
    Serve(ServeArgs),
    /// Execute asynchronous runs from RabbitMQ.
    Worker(WorkerArgs),
    /// Inspect and retry runs.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Create or update the database schema.
    Migrate {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Attach, list and detach the tasks of forms.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Inspect the plugins directory.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Create, list and revoke API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Run one plugin library's code for serve or worker (started by them).
    #[command(hide = true)]
    PluginHost {
        /// The private copy of the library to load.
        #[arg(long)]
        library: PathBuf,
        /// The module's name.
        #[arg(long)]
        module: String,
        /// Threads running tasks.
        #[arg(long, default_value_t = 16)]
        threads: usize,
        /// Resident memory (MiB) past which a run fails and the host retires; 0: none.
        #[arg(long, default_value_t = 0)]
        memory_mib: u64,
    },
    /// Call Process on a running server and print the response as JSON.
    Process {
        /// The server's address.
        #[arg(long, env = "DAISY_SERVER", default_value = "http://127.0.0.1:50051")]
        server: String,
        /// The form's id.
        #[arg(long)]
        form: Uuid,
        /// The submission's id; a new one if not given.
        #[arg(long)]
        submission_id: Option<Uuid>,
        /// The submission, a JSON object.
        #[arg(long, default_value = "{}")]
        submission: String,
    },
}

#[derive(Args)]
struct DbArgs {
    /// PostgreSQL URL of the task registry.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/daisy",
        hide_env_values = true
    )]
    database_url: String,
    /// Most database connections to open.
    #[arg(long, env = "DAISY_DB_POOL_SIZE", default_value_t = 8)]
    db_pool_size: u32,
    /// How long a call waits for a database connection, in milliseconds.
    #[arg(long, env = "DAISY_DB_TIMEOUT_MS", default_value_t = 2000)]
    db_timeout_ms: u64,
}

impl DbArgs {
    fn config(&self) -> DbConfig {
        DbConfig {
            url: self.database_url.clone(),
            pool_size: self.db_pool_size,
            timeout: Duration::from_millis(self.db_timeout_ms),
        }
    }
}

#[derive(Args)]
struct QueueArgs {
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        hide_default_value = true
    )]
    amqp_url: String,
    /// Exchange the runs are published to.
    #[arg(long, env = "DAISY_EXCHANGE", default_value = "daisy")]
    exchange: String,
    /// Queue the workers consume; `<queue>.dead` gets the dead letters.
    #[arg(long, env = "DAISY_QUEUE", default_value = "daisy.runs")]
    queue: String,
    /// Quorum (delivery limit, replicated) or classic queue.
    #[arg(long, env = "DAISY_QUEUE_TYPE", value_enum, default_value = "quorum")]
    queue_type: QueueType,
    /// Deliveries after which a run that keeps killing workers is dead (quorum only).
    #[arg(long, env = "DAISY_DELIVERY_LIMIT", default_value_t = 5)]
    delivery_limit: u32,
    /// For an `amqps://` URL: the CA (PEM) the broker's certificate must
    /// chain to (the public web roots if not given).
    #[arg(long, env = "DAISY_AMQP_CA")]
    amqp_ca: Option<PathBuf>,
}

impl QueueArgs {
    fn config(&self) -> QueueConfig {
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
struct HostArgs {
    /// Where tasks that do not say run their plugin code: `process` (a
    /// supervised plugin host per library) or `in-process` (inside this
    /// process; a crash there takes it down).
    #[arg(long, env = "DAISY_ISOLATION", value_enum, default_value = "process")]
    isolation: Isolation,
    /// Where the secrets task configs name (`{"secret": "NAME"}`) live: one
    /// file per secret, mode 0600 or stricter.
    #[arg(long, env = "DAISY_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
    /// Load only the library builds whose SHA-256 this file lists (one per
    /// line, as `sha256sum` prints them).
    #[arg(long, env = "DAISY_PLUGIN_SHA256")]
    plugin_sha256: Option<PathBuf>,
    /// Plugin host processes per library.
    #[arg(long, env = "DAISY_HOSTS_PER_MODULE", default_value_t = 1)]
    hosts_per_module: usize,
    /// Threads running tasks in each plugin host.
    #[arg(long, env = "DAISY_HOST_THREADS", default_value_t = 16)]
    host_threads: usize,
    /// Resident memory (MiB) a plugin host may reach; the run that passes it
    /// fails and the host is recycled. 0: no limit.
    #[arg(long, env = "DAISY_HOST_MEMORY_MIB", default_value_t = 1024)]
    host_memory_mib: u64,
    /// Runs after which a plugin host is recycled. 0: no limit.
    #[arg(long, env = "DAISY_HOST_MAX_RUNS", default_value_t = 0)]
    host_max_runs: u64,
    /// Seconds a plugin host may sit idle before it exits.
    #[arg(long, env = "DAISY_HOST_IDLE_SECS", default_value_t = 300)]
    host_idle_secs: u64,
    /// How long loading a library in a new plugin host may take, in milliseconds.
    #[arg(long, env = "DAISY_HOST_START_TIMEOUT_MS", default_value_t = 10_000)]
    host_start_timeout_ms: u64,
    /// An environment variable plugin hosts may see (repeatable); they
    /// always get PATH, HOME, LANG and TZ, and nothing else.
    #[arg(long = "plugin-env", env = "DAISY_PLUGIN_ENV", value_delimiter = ',')]
    plugin_env: Vec<String>,
    /// Crashes of its host with a task's run in flight that quarantine the task.
    #[arg(long, env = "DAISY_QUARANTINE_AFTER", default_value_t = 3)]
    quarantine_after: u32,
    /// Seconds over which those crashes count, and how long a quarantine lasts.
    #[arg(long, env = "DAISY_QUARANTINE_WINDOW_SECS", default_value_t = 600)]
    quarantine_window_secs: u64,
}

impl HostArgs {
    fn config(&self) -> anyhow::Result<HostConfig> {
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
struct WorkerArgs {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    queue: QueueArgs,
    #[command(flatten)]
    plugins: PluginsArgs,
    #[command(flatten)]
    hosts: HostArgs,
    /// Deliveries held at once; their claims and outcomes are written in
    /// batches, so more in flight means fewer database round trips per run.
    #[arg(long, env = "DAISY_PREFETCH", default_value_t = 256)]
    prefetch: u16,
    /// How many runs may execute at once (the rest of the prefetched
    /// deliveries wait their turn).
    #[arg(long, env = "DAISY_MAX_CONCURRENT_TASKS", default_value_t = 64)]
    max_concurrent_tasks: usize,
    /// Delay before the first retry, in milliseconds; doubles per attempt.
    #[arg(long, env = "DAISY_RETRY_BASE_MS", default_value_t = 1000)]
    retry_base_ms: u64,
    /// Longest delay between retries, in milliseconds.
    #[arg(long, env = "DAISY_RETRY_MAX_MS", default_value_t = 300_000)]
    retry_max_ms: u64,
    /// How long in all a run may wait on an API's Retry-After (a 429, say)
    /// without those waits using its attempts, in milliseconds.
    #[arg(long, env = "DAISY_MAX_THROTTLED_MS", default_value_t = 3_600_000)]
    max_throttled_ms: u64,
    /// This worker's name in the attempt log (default: host and pid).
    #[arg(long, env = "DAISY_WORKER_NAME")]
    name: Option<String>,
    /// A run that was in flight in this many crashes of its plugin host is
    /// dead (its neighbours in those crashes are retried as usual).
    #[arg(long, env = "DAISY_MAX_CRASHES", default_value_t = 3)]
    max_crashes: u32,
    /// Seconds a claimed run stays this worker's without an extension; the
    /// worker extends the runs it executes every third of it, and the relay
    /// re-queues a run whose lease expired.
    #[arg(long, env = "DAISY_LEASE_SECS", default_value_t = 30)]
    lease_secs: u64,
}

#[derive(Subcommand)]
enum RunsCommand {
    /// List runs, newest first.
    List {
        /// Only runs in this state (queued, running, succeeded, retrying, dead).
        #[arg(long)]
        state: Option<RunState>,
        /// Only this form's runs.
        #[arg(long)]
        form: Option<Uuid>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Show a submission's runs through a running server's GetRuns.
    Get {
        /// The submission's id.
        submission: Uuid,
        /// The server's address.
        #[arg(long, env = "DAISY_SERVER", default_value = "http://127.0.0.1:50051")]
        server: String,
        /// Wait up to this many seconds for every run to finish.
        #[arg(long)]
        wait: Option<u64>,
    },
    /// Delete finished runs (succeeded or dead), their attempts and their
    /// submissions older than a given age, in small batches; queued,
    /// running and retrying runs are never touched.
    Prune {
        /// How old: a number with `d` (days), `h` (hours) or `m` (minutes), e.g. `30d`.
        #[arg(long, value_parser = parse_age)]
        older_than: Duration,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Re-queue a dead run (or every dead one) once its cause is fixed.
    Retry {
        /// The run to retry.
        #[arg(required_unless_present = "dead", conflicts_with = "dead")]
        run: Option<Uuid>,
        /// Retry every dead asynchronous run.
        #[arg(long)]
        dead: bool,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Args)]
struct PluginsArgs {
    /// Directory holding the plugin libraries (lib<module>.so).
    #[arg(long, env = "DAISY_PLUGINS_DIR", default_value = "plugins")]
    plugins_dir: PathBuf,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on. Anything but loopback needs TLS and API keys
    /// (or --insecure).
    #[arg(long, env = "DAISY_ADDR", default_value = "127.0.0.1:50051")]
    addr: String,
    /// The TLS certificate chain (PEM); with --tls-key, serves TLS only.
    #[arg(long, env = "DAISY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM).
    #[arg(long, env = "DAISY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates chaining to this CA (PEM): mutual TLS.
    #[arg(long, env = "DAISY_CLIENT_CA", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// `token`: every call needs `authorization: Bearer <API key>`; `none`:
    /// no keys. Default: none on a loopback address, token anywhere else.
    #[arg(long, env = "DAISY_AUTH", value_enum)]
    auth: Option<proxy::auth::AuthMode>,
    /// Serve a non-loopback address without TLS or without API keys.
    #[arg(long, env = "DAISY_INSECURE")]
    insecure: bool,
    /// Serve gRPC reflection on a non-loopback address too (it always is on loopback).
    #[arg(long, env = "DAISY_REFLECTION")]
    reflection: bool,
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    plugins: PluginsArgs,
    #[command(flatten)]
    hosts: HostArgs,
    /// Largest request accepted, in bytes; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DAISY_MAX_REQUEST_BYTES", default_value_t = 1024 * 1024)]
    max_request_bytes: usize,
    /// How many task runs may be in flight at once.
    #[arg(long, env = "DAISY_MAX_CONCURRENT_TASKS", default_value_t = 64)]
    max_concurrent_tasks: usize,
    /// Deepest nesting of objects and lists a submission may have.
    #[arg(long, env = "DAISY_MAX_DEPTH", default_value_t = 32)]
    max_depth: usize,
    /// Most keys a submission may hold, over all its objects.
    #[arg(long, env = "DAISY_MAX_KEYS", default_value_t = 10_000)]
    max_keys: usize,
    /// Longest string or key in a submission, in bytes.
    #[arg(long, env = "DAISY_MAX_STRING_BYTES", default_value_t = 65_536)]
    max_string_bytes: usize,
    #[command(flatten)]
    queue: QueueArgs,
    /// How long the relay leaves a new run to the accepting proxy, in milliseconds.
    #[arg(long, env = "DAISY_OUTBOX_GRACE_MS", default_value_t = 5000)]
    outbox_grace_ms: u64,
    /// How often the relay looks for unpublished runs, in milliseconds.
    #[arg(long, env = "DAISY_RELAY_INTERVAL_MS", default_value_t = 500)]
    relay_interval_ms: u64,
    /// Re-queue runs published but never picked up, or claimed but never
    /// finished, after this many seconds; keep it above the longest task timeout.
    #[arg(long, env = "DAISY_STALE_AFTER_SECS", default_value_t = 900)]
    stale_after_secs: u64,
    /// Delete finished runs, their attempts and submissions after this many
    /// days, continuously (0: keep everything).
    #[arg(long, env = "DAISY_RETAIN_DAYS", default_value_t = 0)]
    retain_days: u64,
    /// Which synchronous runs are recorded in the run log: `all` (GetRuns
    /// shows every run) or `failed` (one row less per successful task run).
    #[arg(long, env = "DAISY_SYNC_RUN_LOG", value_enum, default_value = "all")]
    sync_run_log: proxy::SyncRunLog,
}

/// A task's rate limit.
#[derive(clap::Args)]
struct RateArgs {
    /// Start at most this many of its runs a minute, across all workers,
    /// evenly spaced (asynchronous tasks; see README "Quotas").
    #[arg(long, value_name = "PER_MINUTE", value_parser = clap::value_parser!(i32).range(1..))]
    rate_limit: Option<i32>,
    /// Share the pace with every task of this group (one API account's
    /// quota used by many forms); needs --rate-limit.
    #[arg(long, requires = "rate_limit")]
    rate_group: Option<String>,
}

#[derive(Subcommand)]
enum TaskCommand {
    /// Attach a plugin task to a form.
    Attach {
        /// The form's id.
        #[arg(long)]
        form: Uuid,
        /// A name for the task, shown in results.
        #[arg(long)]
        name: String,
        /// The plugin module: the library lib<module>.so in the plugins directory.
        #[arg(long)]
        module: String,
        /// The task inside the plugin.
        #[arg(long)]
        func: String,
        /// Run it on a worker instead of inside Process.
        #[arg(long = "async")]
        is_async: bool,
        /// The task's configuration, a JSON document.
        #[arg(long, default_value = "{}")]
        config: String,
        /// How long one run may take, in milliseconds.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: i32,
        /// How many attempts an asynchronous run gets.
        #[arg(long, default_value_t = 5)]
        max_attempts: i32,
        /// Attach it disabled.
        #[arg(long)]
        disabled: bool,
        /// Where its plugin code runs; the server's `--isolation` if not given.
        #[arg(long, value_enum)]
        isolation: Option<Isolation>,
        #[command(flatten)]
        rate: RateArgs,
        /// Attach even when the config does not fit the schema the plugin
        /// declares for it.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        plugins: PluginsArgs,
    },
    /// List attached tasks.
    List {
        /// Only this form's tasks.
        #[arg(long)]
        form: Option<Uuid>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Set or remove a task's rate limit.
    Limit {
        /// The task's id.
        id: Uuid,
        #[command(flatten)]
        rate: RateArgs,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Detach a task.
    Detach {
        /// The task's id.
        id: Uuid,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a key and print its token, once, on the last line of stdout.
    Create {
        /// A unique name for the key (who holds it).
        #[arg(long)]
        name: String,
        /// A form the key may use (repeat for several).
        #[arg(
            long = "form",
            required_unless_present_any = ["all_forms", "admin"],
            conflicts_with = "all_forms"
        )]
        forms: Vec<Uuid>,
        /// The key may use every form.
        #[arg(long)]
        all_forms: bool,
        /// An admin key: every form, `runs retry`, the console.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List the keys: names, scopes and last use, never tokens.
    List {
        #[command(flatten)]
        db: DbArgs,
    },
    /// Revoke a key; every running serve stops accepting it within a second.
    Revoke {
        /// The key's name.
        name: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// List the libraries in the plugins directory, their tasks, whether
    /// they load, and (from the database) which tasks are quarantined.
    List {
        #[command(flatten)]
        plugins: PluginsArgs,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Start a new plugin: a crate with one task, a typed config, unit tests
    /// and a README, outside any workspace.
    New {
        /// The crate's name (its library is lib<name>.so, `-` read as `_`).
        name: String,
        /// The directory to create it in (new, or empty).
        #[arg(long)]
        dir: PathBuf,
        /// The plugin-api to build against: a crate directory, or a version;
        /// the plugin-api this Daisy was built from if not given.
        #[arg(long)]
        plugin_api: Option<String>,
    },
    /// Show one plugin library: its tasks and the JSON Schema each declares
    /// for its config.
    Show {
        /// The module: the library lib<module>.so in the plugins directory.
        module: String,
        #[command(flatten)]
        plugins: PluginsArgs,
    },
}

/// Parses an age such as `30d`, `12h` or `90m`.
fn parse_age(value: &str) -> Result<Duration, String> {
    let (number, unit) = value.split_at(value.len().saturating_sub(1));
    let seconds = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        _ => return Err(format!("'{value}': give a number with d, h or m, e.g. 30d")),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("'{value}': give a number with d, h or m, e.g. 30d"))?;
    number
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("'{value}' is too long"))
}

/// glibc gives each thread that allocates its own malloc arena, up to eight
/// per core, and an arena keeps what it once held. With 64 blocking threads
/// that is most of `daisy serve`'s resident memory (BENCHMARKS.md: peak RSS
/// 59.5 MiB with the default, 42.5-52.8 MiB with two, on 2 cores;
/// throughput within noise). One arena per core (at least two),
/// unless `MALLOC_ARENA_MAX` says otherwise.
fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = libc::c_int::try_from(cores.max(2)).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only tunes the allocator; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, arenas);
        }
    }
}

fn main() {
    cap_malloc_arenas();
    let code = match try_main() {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("error: {err:#}");
            1
        }
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // libpq's OpenSSL registers an atexit cleanup that crashes the process
    // when a connection-pool thread is still in a TLS handshake at exit.
    // Everything is flushed and shut down by now, so leave without atexit.
    // SAFETY: `_exit` ends the process; no Rust code runs after it.
    unsafe { libc::_exit(code) }
}

fn try_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::PluginHost {
        library,
        module,
        threads,
        memory_mib,
    } = cli.command
    {
        proxy::plugins::host::main(proxy::plugins::host::HostArgs {
            library,
            module,
            threads,
            memory_limit_mib: memory_mib,
        });
    }
    // The server logs what it does; one-shot commands only what went wrong.
    let default_filter = match cli.command {
        Command::Serve(_) | Command::Worker(_) => "info,tower=warn,h2=warn,amqprs=warn",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::PluginHost { .. } => unreachable!("handled before logging starts"),
        Command::Serve(args) => serve(args),
        Command::Worker(args) => {
            let config = WorkerConfig {
                db: args.db.config(),
                queue: args.queue.config(),
                hosts: args.hosts.config()?,
                isolation: args.hosts.isolation,
                plugins_dir: args.plugins.plugins_dir,
                prefetch: args.prefetch,
                max_concurrent_tasks: args.max_concurrent_tasks,
                retry_base: Duration::from_millis(args.retry_base_ms),
                retry_max: Duration::from_millis(args.retry_max_ms),
                max_throttled: Duration::from_millis(args.max_throttled_ms),
                http_addr: None,
                max_crashes: args.max_crashes.max(1),
                lease: Duration::from_secs(args.lease_secs.max(1)),
                name: args.name.unwrap_or_else(|| {
                    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
                    format!("{}-{}", host.trim(), std::process::id())
                }),
            };
            tokio::runtime::Runtime::new()
                .context("starting the runtime")?
                .block_on(proxy::worker::run(config, shutdown_signal()))
        }
        Command::Runs(command) => runs(command),
        Command::Migrate { db } => {
            let applied = Registry::new(&db.config())
                .migrate()
                .context("migrating the task registry")?;
            if applied.is_empty() {
                println!("database is up to date");
            }
            for version in applied {
                println!("applied migration {version}");
            }
            Ok(())
        }
        Command::Task(command) => task(command),
        Command::Key(command) => key(command),
        Command::Plugin(PluginCommand::List { plugins, db }) => {
            plugin_list(&plugins.plugins_dir, &db)
        }
        Command::Plugin(PluginCommand::New {
            name,
            dir,
            plugin_api,
        }) => {
            let module = proxy::scaffold::new_plugin(&name, &dir, plugin_api.as_deref())?;
            println!(
                "created plugin '{name}' in {}: `cargo build --release` there, then drop target/release/{} into the plugins directory and attach its task `greet` (module {module})",
                dir.display(),
                proxy::plugins::library_file_name(&module)
            );
            Ok(())
        }
        Command::Plugin(PluginCommand::Show { module, plugins }) => {
            plugin_show(&plugins.plugins_dir, &module)
        }
        Command::Process {
            server,
            form,
            submission_id,
            submission,
        } => {
            let submission: serde_json::Value =
                serde_json::from_str(&submission).context("--submission is not valid JSON")?;
            let submission_id = submission_id.unwrap_or_else(Uuid::new_v4);
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let response = runtime.block_on(proxy::grpc::call_process(
                &server,
                &form.to_string(),
                &submission_id.to_string(),
                submission,
            ))?;
            println!("{}", serde_json::to_string_pretty(&response)?);
            Ok(())
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.addr)
            .await
            .with_context(|| format!("listening on {}", args.addr))?;
        let security = proxy::security::decide(
            listener.local_addr()?,
            proxy::security::Requested {
                auth: args.auth,
                tls: args
                    .tls_cert
                    .zip(args.tls_key)
                    .map(|(cert, key)| proxy::security::TlsFiles {
                        cert,
                        key,
                        client_ca: args.client_ca,
                    }),
                reflection: args.reflection,
                insecure: args.insecure,
            },
        )
        .map_err(|refusal| anyhow::anyhow!(refusal))?;
        let config = Config {
            db: args.db.config(),
            hosts: args.hosts.config()?,
            isolation: args.hosts.isolation,
            plugins_dir: args.plugins.plugins_dir,
            max_request_bytes: args.max_request_bytes,
            limits: proxy::grpc::Limits {
                max_depth: args.max_depth.max(1),
                max_keys: args.max_keys,
                max_string_bytes: args.max_string_bytes,
            },
            max_concurrent_tasks: args.max_concurrent_tasks,
            queue: args.queue.config(),
            outbox_grace: Duration::from_millis(args.outbox_grace_ms),
            relay_interval: Duration::from_millis(args.relay_interval_ms),
            stale_after: Duration::from_secs(args.stale_after_secs),
            sync_run_log: args.sync_run_log,
            retain: (args.retain_days > 0)
                .then(|| Duration::from_secs(args.retain_days.saturating_mul(86_400))),
            security,
            http_addr: None,
        };
        proxy::run(listener, config, shutdown_signal()).await
    })
}

/// Completes on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: finishing in-flight calls");
}

fn key(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Create {
            name,
            forms,
            all_forms,
            admin,
            db,
        } => {
            anyhow::ensure!(
                !name.trim().is_empty() && name.len() <= 100,
                "--name must be 1 to 100 characters"
            );
            let token = proxy::auth::new_token().context("drawing a random token")?;
            Registry::new(&db.config())
                .create_key(&proxy::registry::NewKey {
                    name: &name,
                    token_sha256: &proxy::auth::token_hash(&token),
                    forms: (!all_forms && !admin).then_some(forms.as_slice()),
                    admin,
                })
                .with_context(|| format!("creating key '{name}' (is the name taken?)"))?;
            eprintln!("created key '{name}'; its token follows, shown this once:");
            println!("{token}");
            Ok(())
        }
        KeyCommand::List { db } => {
            let keys = Registry::new(&db.config()).keys().context("listing keys")?;
            println!(
                "{:<24}  {:<6}  {:<20}  {:<20}  {:<20}  FORMS",
                "NAME", "ADMIN", "CREATED", "LAST USED", "REVOKED"
            );
            let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map_or_else(
                    || "-".to_owned(),
                    |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
                )
            };
            for k in keys {
                let forms = match &k.forms {
                    None => "all".to_owned(),
                    Some(forms) => forms
                        .iter()
                        .flatten()
                        .map(Uuid::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                };
                println!(
                    "{:<24}  {:<6}  {:<20}  {:<20}  {:<20}  {forms}",
                    k.name,
                    k.admin,
                    when(Some(k.created_at)),
                    when(k.last_used_at),
                    when(k.revoked_at),
                );
            }
            Ok(())
        }
        KeyCommand::Revoke { name, db } => {
            let revoked = Registry::new(&db.config())
                .revoke_key(&name)
                .context("revoking the key")?;
            anyhow::ensure!(revoked, "no active key named '{name}'");
            println!("revoked key '{name}'");
            Ok(())
        }
    }
}

/// A rate group's name: 1 to 200 characters, no control characters.
fn check_rate_group(rate: &RateArgs) -> anyhow::Result<()> {
    if let Some(group) = &rate.rate_group {
        anyhow::ensure!(
            (1..=200).contains(&group.chars().count()) && !group.chars().any(char::is_control),
            "--rate-group must be 1 to 200 characters, without control characters"
        );
    }
    Ok(())
}

fn task(command: TaskCommand) -> anyhow::Result<()> {
    match command {
        TaskCommand::Attach {
            form,
            name,
            module,
            func,
            is_async,
            config,
            timeout_ms,
            max_attempts,
            disabled,
            isolation,
            rate,
            force,
            db,
            plugins,
        } => {
            validate_name("module", &module)?;
            validate_name("func", &func)?;
            let config: serde_json::Value =
                serde_json::from_str(&config).context("--config is not valid JSON")?;
            anyhow::ensure!(timeout_ms > 0, "--timeout-ms must be positive");
            anyhow::ensure!(max_attempts > 0, "--max-attempts must be positive");
            refuse_paths(&config, "", force)?;
            check_plugin(&plugins.plugins_dir, &module, &func, &config, force)?;
            check_rate_group(&rate)?;
            let registry = Registry::new(&db.config());
            let task = registry
                .attach(&NewTask {
                    form_id: form,
                    name,
                    module,
                    func,
                    is_async,
                    config,
                    enabled: !disabled,
                    timeout_ms,
                    max_attempts,
                    isolation: isolation.map(|i| i.as_str().to_owned()),
                })
                .context("attaching the task")?;
            if rate.rate_limit.is_some() {
                registry
                    .set_rate_limit(task.id, rate.rate_limit, rate.rate_group.as_deref())
                    .context("setting the task's rate limit")?;
            }
            println!("{}", task.id);
            Ok(())
        }
        TaskCommand::Limit { id, rate, db } => {
            check_rate_group(&rate)?;
            let found = Registry::new(&db.config())
                .set_rate_limit(id, rate.rate_limit, rate.rate_group.as_deref())
                .context("setting the task's rate limit")?;
            anyhow::ensure!(found, "no task with id {id}");
            match (rate.rate_limit, rate.rate_group) {
                (None, _) => println!("task {id}: no rate limit"),
                (Some(n), None) => println!("task {id}: at most {n} runs a minute"),
                (Some(n), Some(group)) => {
                    println!("task {id}: at most {n} runs a minute, shared by rate group '{group}'")
                }
            }
            Ok(())
        }
        TaskCommand::List { form, db } => {
            let tasks = Registry::new(&db.config())
                .list(form)
                .context("listing tasks")?;
            println!(
                "{:<36}  {:<36}  {:<16}  {:<24}  {:<5}  {:<7}  {:<10}  {:<12}  CONFIG",
                "ID", "FORM", "NAME", "MODULE::FUNC", "MODE", "ENABLED", "ISOLATION", "RATE"
            );
            for t in tasks {
                let rate = match (t.rate_per_minute, &t.rate_group) {
                    (None, _) => "-".to_owned(),
                    (Some(n), None) => format!("{n}/min"),
                    (Some(n), Some(group)) => format!("{n}/min:{group}"),
                };
                println!(
                    "{:<36}  {:<36}  {:<16}  {:<24}  {:<5}  {:<7}  {:<10}  {:<12}  {}",
                    t.id,
                    t.form_id,
                    t.name,
                    format!("{}::{}", t.module, t.func),
                    if t.is_async { "async" } else { "sync" },
                    t.enabled,
                    t.isolation.as_deref().unwrap_or("default"),
                    rate,
                    t.config
                );
            }
            Ok(())
        }
        TaskCommand::Detach { id, db } => {
            let found = Registry::new(&db.config())
                .detach(id)
                .context("detaching the task")?;
            anyhow::ensure!(found, "no task with id {id}");
            println!("detached {id}");
            Ok(())
        }
    }
}

fn runs(command: RunsCommand) -> anyhow::Result<()> {
    match command {
        RunsCommand::List {
            state,
            form,
            limit,
            db,
        } => {
            let runs = Registry::new(&db.config())
                .list_runs(state, form, limit)
                .context("listing runs")?;
            println!(
                "{:<36}  {:<36}  {:<16}  {:<5}  {:<9}  {:>8}  LAST ERROR",
                "RUN", "SUBMISSION", "TASK", "MODE", "STATE", "ATTEMPTS"
            );
            for r in runs {
                println!(
                    "{:<36}  {:<36}  {:<16}  {:<5}  {:<9}  {:>8}  {}",
                    r.id,
                    r.submission_id,
                    r.task_name,
                    if r.is_async { "async" } else { "sync" },
                    r.state,
                    format!("{}/{}", r.attempts, r.max_attempts),
                    r.last_error.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
        RunsCommand::Get {
            submission,
            server,
            wait,
        } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let runs = runtime.block_on(proxy::grpc::call_get_runs(
                &server,
                &submission.to_string(),
                wait.map(Duration::from_secs),
            ))?;
            println!("{}", serde_json::to_string_pretty(&runs)?);
            Ok(())
        }
        RunsCommand::Prune { older_than, db } => {
            let cutoff = chrono::Utc::now()
                - chrono::Duration::from_std(older_than).context("--older-than is too long")?;
            let (runs, submissions) = Registry::new(&db.config())
                .prune_all(cutoff, 1000)
                .context("pruning runs")?;
            println!("deleted {runs} run(s) and {submissions} submission(s) older than {cutoff}");
            Ok(())
        }
        RunsCommand::Retry { run, dead: _, db } => {
            let retried = Registry::new(&db.config())
                .retry_dead(run)
                .context("re-queueing runs")?;
            if let Some(run) = run {
                anyhow::ensure!(
                    !retried.is_empty(),
                    "run {run} is not a dead asynchronous run"
                );
            }
            for id in &retried {
                println!("re-queued {id}");
            }
            println!(
                "{} run(s) re-queued; the relay publishes them within a second",
                retried.len()
            );
            Ok(())
        }
    }
}

/// A plugin layer for the CLI's one-shot looks at the plugins directory
/// (libraries are read in a plugin host, never in the CLI's own process),
/// on a runtime of its own.
fn cli_plugins(dir: &std::path::Path) -> anyhow::Result<(tokio::runtime::Runtime, Plugins)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let program = std::env::current_exe().context("finding the daisy executable")?;
    let plugins = runtime
        .block_on(async { Plugins::new(dir, HostConfig::new(program), Isolation::Process) })
        .context("creating the plugin loader")?;
    Ok((runtime, plugins))
}

/// Refuses a config that names a file by absolute path (at `at`): configs
/// name secrets (`{"secret": "NAME"}`), never files. `force` only warns.
fn refuse_paths(config: &serde_json::Value, at: &str, force: bool) -> anyhow::Result<()> {
    match config {
        serde_json::Value::String(s) if s.starts_with('/') => {
            let why = format!(
                "--config names the file '{s}' at `{}`: task configs may not name files; put a secret in --secrets-dir and write {{\"secret\": \"NAME\"}}",
                if at.is_empty() { "/" } else { at }
            );
            if force {
                eprintln!("warning: {why} (attached anyway, --force)");
                Ok(())
            } else {
                anyhow::bail!("{why} (--force attaches anyway)")
            }
        }
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| refuse_paths(v, &format!("{at}/{i}"), force)),
        serde_json::Value::Object(fields) => fields
            .iter()
            .try_for_each(|(k, v)| refuse_paths(v, &format!("{at}/{k}"), force)),
        _ => Ok(()),
    }
}

/// Checks `config` against the schema the task's plugin declares, when its
/// library is present and declares one: a config that does not fit is
/// refused (naming each field at fault) unless `force`. Only warns when the
/// plugin is not (yet) usable, since the library may be installed later.
fn check_plugin(
    dir: &std::path::Path,
    module: &str,
    func: &str,
    config: &serde_json::Value,
    force: bool,
) -> anyhow::Result<()> {
    let Ok((runtime, plugins)) = cli_plugins(dir) else {
        return Ok(());
    };
    let inspected = runtime.block_on(plugins.inspect(module));
    plugins.shutdown();
    let info = match inspected {
        Ok(info) => info,
        Err(err) => {
            eprintln!("warning: {err}; the task will fail until that is fixed");
            return Ok(());
        }
    };
    if !info.tasks.iter().any(|t| t == func) {
        eprintln!(
            "warning: plugin '{module}' has no task '{func}' (it exports: {})",
            info.tasks.join(", ")
        );
        return Ok(());
    }
    let Some(schema) = info.schemas.get(func) else {
        return Ok(());
    };
    let Err(problems) = proxy::plugins::schema::check_config(schema, config) else {
        return Ok(());
    };
    let problems = problems.join("\n  ");
    if force {
        eprintln!(
            "warning: --config does not fit the schema of {module}::{func} (attached anyway, --force):\n  {problems}"
        );
        return Ok(());
    }
    anyhow::bail!(
        "--config does not fit the schema of {module}::{func}:\n  {problems}\n(`daisy plugin show {module}` prints the schema; --force attaches anyway)"
    )
}

fn plugin_show(dir: &std::path::Path, module: &str) -> anyhow::Result<()> {
    validate_name("module", module)?;
    let (runtime, plugins) = cli_plugins(dir)?;
    let inspected = runtime.block_on(plugins.inspect(module));
    plugins.shutdown();
    let info = inspected?;
    println!(
        "{module}: {} {} (plugin-api {}), sha256 {}",
        info.name, info.version, info.api_version, info.sha256
    );
    for task in &info.tasks {
        match info.schemas.get(task) {
            Some(schema) => println!(
                "\ntask {task}: config schema\n{}",
                serde_json::to_string_pretty(schema)?
            ),
            None => println!("\ntask {task}: no config schema declared (any JSON is accepted)"),
        }
    }
    Ok(())
}

fn plugin_list(dir: &std::path::Path, db: &DbArgs) -> anyhow::Result<()> {
    let (runtime, plugins) = cli_plugins(dir)?;
    let registry = Registry::new(&DbConfig {
        timeout: Duration::from_millis(db.db_timeout_ms.min(2000)),
        ..db.config()
    });
    let mut database_down = false;
    let modules = plugins
        .modules()
        .with_context(|| format!("reading plugins directory '{}'", dir.display()))?;
    if modules.is_empty() {
        println!("no plugin libraries in '{}'", dir.display());
    }
    for module in modules {
        match runtime.block_on(plugins.inspect(&module)) {
            Ok(info) => {
                println!(
                    "{module}\tok\t{} {} (plugin-api {})\ttasks: {}",
                    info.name,
                    info.version,
                    info.api_version,
                    info.tasks.join(", ")
                );
                if database_down {
                    continue;
                }
                match registry.quarantines(&module) {
                    Ok(quarantines) => {
                        for q in quarantines.iter().filter(|q| q.sha256 == info.sha256) {
                            println!(
                                "{module}\tquarantined\t{}: after {} crashes of its plugin host, until {} or a new build",
                                q.func,
                                q.crashes,
                                q.until.format("%Y-%m-%d %H:%M:%S UTC")
                            );
                        }
                    }
                    Err(err) => {
                        database_down = true;
                        eprintln!("warning: quarantines not shown: {err}");
                    }
                }
            }
            Err(err) => println!("{module}\terror\t{err}"),
        }
    }
    plugins.shutdown();
    Ok(())
}
