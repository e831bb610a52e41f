//! The `daisy` command line: the commands and their flags (clap). Every
//! flag also reads a `DAISY_*` variable.
//!
//! - this module: [`Cli`], [`Command`] and the subcommands of `runs`,
//!   `task`, `key` and `plugin`;
//! - [`args`]: the flag groups, and what they become in the library's
//!   configs (`DbArgs::config`, `QueueArgs::config`, `HostArgs::config`).

mod args;

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use proxy::{plugins::Isolation, registry::RunState};
use uuid::Uuid;

pub(crate) use self::args::{DbArgs, PluginsArgs, RateArgs, ServeArgs, WorkerArgs};

#[derive(Parser)]
#[command(
    name = "daisy",
    version,
    about = "Pluggable post-submission tasks for form backends"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
    /// How log lines are written to stderr: `text` (colours only on a
    /// terminal) or `json` (one object per line, for log shippers).
    #[arg(
        long,
        global = true,
        env = "DAISY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub(crate) log_format: LogFormat,
    /// serve, worker: export trace spans to this OTLP/gRPC collector
    /// (`http://127.0.0.1:4317`); none are exported without it.
    #[arg(long, global = true, env = "DAISY_OTLP_ENDPOINT")]
    pub(crate) otlp_endpoint: Option<String>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// For people: colours when stderr is a terminal, none otherwise.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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

#[derive(Subcommand)]
pub(crate) enum RunsCommand {
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

#[derive(Subcommand)]
pub(crate) enum TaskCommand {
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
pub(crate) enum KeyCommand {
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
pub(crate) enum PluginCommand {
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
