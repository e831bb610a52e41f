//! Runs tasks: on tokio's blocking pool, bounded, each under its timeout.
//!
//! Plugin code is native and may block, so every run (and every library load
//! and task creation, which run plugin code too) happens on the blocking
//! pool. A semaphore bounds how many runs are in flight. A run that times out
//! cannot be cancelled: its thread keeps its permit until the plugin returns,
//! so a plugin that hangs uses up permits instead of creating threads without
//! limit, and the log says so.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use plugin_api::host::RunInput;
use tokio::sync::Semaphore;

use crate::{plugins::Plugins, registry::TaskDef};

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The task returned this output.
    Succeeded(serde_json::Value),
    /// The task, its plugin or its library failed; the message says why.
    Failed {
        /// What went wrong.
        error: String,
        /// Whether a retry may help.
        retryable: bool,
        /// The plugin's earliest useful retry (an API's Retry-After).
        retry_after: Option<Duration>,
    },
    /// The task did not finish within its `timeout_ms`.
    TimedOut(String),
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// How it ended.
    pub outcome: Outcome,
    /// How long it took, waiting for a permit included.
    pub duration: Duration,
}

/// What every task of one submission runs on.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The form's id.
    pub form_id: String,
    /// The submission's id.
    pub submission_id: String,
    /// The submission, JSON-encoded once for all tasks.
    pub json: Arc<str>,
}

/// Runs tasks through the plugin loader.
#[derive(Debug, Clone)]
pub struct Executor {
    plugins: Arc<Plugins>,
    permits: Arc<Semaphore>,
}

impl Executor {
    /// An executor running at most `max_concurrent` tasks at once.
    pub fn new(plugins: Arc<Plugins>, max_concurrent: usize) -> Executor {
        Executor {
            plugins,
            permits: Arc::new(Semaphore::new(max_concurrent.max(1))),
        }
    }

    /// Runs `tasks` concurrently on `submission`; results in the same order.
    pub async fn run_all(
        &self,
        tasks: &[&TaskDef],
        submission: &Submission,
        attempt: u32,
    ) -> Vec<RunResult> {
        futures::future::join_all(
            tasks
                .iter()
                .map(|task| self.run((*task).clone(), submission.clone(), attempt)),
        )
        .await
    }

    /// Runs one task under its timeout.
    pub async fn run(&self, task: TaskDef, submission: Submission, attempt: u32) -> RunResult {
        let span = tracing::info_span!("task", task.id = %task.id, task.name = %task.name, task.module = %task.module);
        let started = Instant::now();
        let timeout = Duration::from_millis(u64::try_from(task.timeout_ms).unwrap_or(1).max(1));
        let name = task.name.clone();
        let work = async {
            let permit = self
                .permits
                .clone()
                .acquire_owned()
                .await
                .expect("the executor's semaphore is never closed");
            let plugins = self.plugins.clone();
            let handle = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let started = Instant::now();
                let outcome = run_blocking(&plugins, &task, &submission, attempt);
                if started.elapsed() > timeout {
                    tracing::warn!(
                        task.name = %task.name,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "task finished after its timeout; its result was discarded"
                    );
                }
                outcome
            });
            handle.await
        };
        let outcome = match tokio::time::timeout(timeout, work).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(join)) => Outcome::Failed {
                error: format!("task runner failed: {join}"),
                retryable: true,
                retry_after: None,
            },
            Err(_) => Outcome::TimedOut(format!(
                "task '{name}' timed out after {} ms",
                timeout.as_millis()
            )),
        };
        let duration = started.elapsed();
        span.in_scope(|| match &outcome {
            Outcome::Succeeded(_) => {
                tracing::debug!(duration_us = duration.as_micros() as u64, "task succeeded")
            }
            Outcome::Failed { error, .. } => tracing::warn!(error = %error, "task failed"),
            Outcome::TimedOut(error) => tracing::warn!(error = %error, "task timed out"),
        });
        RunResult { outcome, duration }
    }
}

fn run_blocking(
    plugins: &Plugins,
    task: &TaskDef,
    submission: &Submission,
    attempt: u32,
) -> Outcome {
    let handle = match plugins.instance(task) {
        Ok(handle) => handle,
        Err(err) => {
            return Outcome::Failed {
                error: err.to_string(),
                retryable: false,
                retry_after: None,
            };
        }
    };
    let input = RunInput {
        form_id: &submission.form_id,
        submission_id: &submission.submission_id,
        submission_json: &submission.json,
        attempt,
    };
    match handle.run(input) {
        Ok(output) => Outcome::Succeeded(output),
        Err(err) => Outcome::Failed {
            error: err.message().to_owned(),
            retryable: err.is_retryable(),
            retry_after: err.retry_after(),
        },
    }
}
