//! `daisy runs`: list, show (through a running server), prune and retry runs.

use std::time::{Duration, Instant};

use anyhow::Context;
use proto::{
    json::value_to_json,
    v1::{GetRunsRequest, RunState as PbRunState, post_sub_proxy_client::PostSubProxyClient},
};
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
            let runs = runtime.block_on(call_get_runs(
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
            let pruned = Registry::new(&db.config())
                .prune_all(cutoff, 1000)
                .context("pruning runs")?;
            println!(
                "deleted {} run(s) and {} submission(s) older than {cutoff}, \
                 and {} whole day(s) of synchronous runs",
                pruned.runs, pruned.submissions, pruned.days
            );
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

/// Calls `GetRuns` on the server at `addr` and returns the runs as JSON;
/// with `wait`, polls until no run is queued, running or retrying (or the
/// wait is over).
async fn call_get_runs(
    addr: &str,
    submission_id: &str,
    wait: Option<Duration>,
) -> anyhow::Result<serde_json::Value> {
    let mut client = PostSubProxyClient::connect(addr.to_owned())
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let deadline = wait.map(|w| Instant::now() + w);
    loop {
        let runs = client
            .get_runs(GetRunsRequest {
                submission_id: submission_id.to_owned(),
            })
            .await
            .map_err(|status| {
                anyhow::anyhow!("GetRuns failed: {:?}: {}", status.code(), status.message())
            })?
            .into_inner()
            .runs;
        let settled = runs
            .iter()
            .all(|r| matches!(r.state(), PbRunState::Succeeded | PbRunState::Dead));
        if settled || deadline.is_none_or(|d| Instant::now() >= d) {
            return Ok(serde_json::Value::Array(
                runs.iter()
                    .map(|r| {
                        serde_json::json!({
                            "run_id": r.run_id,
                            "name": r.name,
                            "is_async": r.is_async,
                            "state": r.state().as_str_name(),
                            "attempts": r.attempts,
                            "last_error": r.last_error,
                            "output": r.output.as_ref().map_or(serde_json::Value::Null, value_to_json),
                        })
                    })
                    .collect(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
