//! `daisy-bench`: runs Daisy's load scenarios with yardsticks measured in the
//! same run; `make bench` (or `make bench-quick`) is how to run it.
//!
//! Every figure is set against a yardstick from the same run, because on a
//! shared machine absolute numbers drift: a bare tonic server answering
//! `Process` with an empty response (the gRPC limit), and PostgreSQL's rate
//! of one-row insert transactions at the same concurrency (the outbox limit).
//! It starts what it needs (its own database, queues, release `daisy`
//! processes), prints a table, and writes `target/bench/report.json` and
//! `target/bench/report.md`.
//!
//! - `load`: the load generator and what it measures.
//! - `yardsticks`: the bare server and PostgreSQL's insert rate.
//! - `scenarios`: Daisy's scenarios, set against the yardsticks.
//! - `report`: the table and the JSON.
//!
//! The database, queues, plugins directory and processes come from
//! `test-support`, as in the integration tests, but with the release build
//! and Daisy's own settings.

mod ab;
mod load;
mod report;
mod scenarios;
mod yardsticks;

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};
use test_support::{Launcher, PluginsDir, Profile, TestDb, TestQueue};

#[derive(Parser)]
#[command(name = "daisy-bench")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// A few seconds per scenario, to check the harness works.
    #[arg(long)]
    quick: bool,
    /// Run only these scenario groups (repeatable): `sync` (1, 2, 3, 6),
    /// `drain` (5), `accept` (4). The yardsticks always run.
    #[arg(long, value_enum)]
    only: Vec<Group>,
    /// Runs drained in scenario 5 (default 50,000; 2,000 with --quick).
    #[arg(long)]
    drain_runs: Option<i64>,
    /// Where the report goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// The server databases are created on.
    #[arg(
        long,
        env = "DAISY_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    admin_url: String,
    /// The broker.
    #[arg(
        long,
        env = "DAISY_BENCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
}

/// Scenario groups `--only` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Group {
    /// Scenarios 1, 2, 3 and 6: the synchronous path.
    Sync,
    /// Scenario 5: workers draining accepted runs.
    Drain,
    /// Scenario 4: the accept rate.
    Accept,
}

impl Cli {
    fn wants(&self, group: Group) -> bool {
        self.only.is_empty() || self.only.contains(&group)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Internal: the bare yardstick server.
    BareServer {
        /// Where to listen.
        #[arg(long)]
        addr: SocketAddr,
    },
    /// This build's `daisy serve` against another build's, in alternate
    /// rounds on one form with one synchronous echo task.
    Ab(ab::Ab),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Some(Cmd::BareServer { addr }) => runtime.block_on(yardsticks::bare_server(addr)),
        Some(Cmd::Ab(ref ab)) => runtime.block_on(ab::run(&Env::new(&cli), ab)),
        None => runtime.block_on(scenarios::run(&Env::new(&cli), &cli)),
    }
}

/// What the scenarios run against, the run's own and dropped when it ends,
/// whatever happened: a migrated database, queues, a plugins directory with
/// echo and testkit, and release `daisy` processes started on them (by the
/// scenarios, which stop them before these go).
struct Env {
    /// Starts `daisy serve` and `daisy worker`.
    daisy: Launcher,
    /// Daisy's database.
    db: TestDb,
    _queue: TestQueue,
    _plugins: PluginsDir,
}

impl Env {
    fn new(cli: &Cli) -> Env {
        let db = TestDb::create(&cli.admin_url, "daisy_bench");
        db.migrate(&Profile::Release.daisy_bin());
        let queue = TestQueue::create(&cli.amqp_url, "daisy.bench");
        let plugins = PluginsDir::new();
        for plugin in ["echo", "testkit"] {
            plugins.install_built(Profile::Release, plugin, plugin);
        }
        Env {
            daisy: Launcher::release(&db.url, plugins.path(), &queue),
            db,
            _queue: queue,
            _plugins: plugins,
        }
    }
}
