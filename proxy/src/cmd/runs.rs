//! `daisy runs`: list, show (through a running server), prune and retry runs.

use std::time::Duration;

use anyhow::Context;
use proxy::registry::Registry;

use crate::cli::RunsCommand;

/// `daisy runs`.
pub(crate) fn run(command: RunsCommand) -> anyhow::Result<()> {
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
