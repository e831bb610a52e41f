//! Runs tasks through the plugin-host layer, bounded, each under its timeout.
//!
//! A semaphore bounds how many runs are in flight. Where the plugin code
//! runs (a plugin host, or this process) is the [`Plugins`] layer's
//! business: a run in a host that passes its timeout is answered at once
//! and its host recycled, so a hanging plugin holds neither a thread nor a
//! permit; an in-process run cannot be cancelled and keeps its blocking
//! thread until the plugin returns.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use uuid::Uuid;

use tokio::sync::Semaphore;

use crate::{plugins::Plugins, registry::TaskDef};

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The task returned this output.
    Succeeded(Output),
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
    /// The task's plugin host died with the run in flight.
    Crashed {
        /// What happened, naming the library and the cause.
        error: String,
        /// Whether this task likely caused it (it crashes more than it
        /// finishes), rather than being a neighbour in flight.
        suspect: bool,
    },
}

/// What a task returned: the JSON text its plugin wrote, parsed only by
/// whoever needs it and into what they need. The submit path turns it
/// straight into its response and its run log, with no `serde_json::Value`
/// in between; the worker parses it into a value. Whoever parses it refuses
/// text that is not JSON, naming the fault.
#[derive(Debug, Clone, PartialEq)]
pub struct Output(pub String);

impl Output {
    /// The output as a JSON value; an error naming the fault if it is not JSON.
    pub fn into_value(self) -> Result<serde_json::Value, String> {
        serde_json::from_str(&self.0).map_err(not_json)
    }

    /// The output as a protobuf `Value` for a `Process` response and, if
    /// `with_text`, its text for the run log; an error naming the fault if
    /// it is not JSON.
    pub fn into_response(
        self,
        with_text: bool,
    ) -> Result<(proto::prost_types::Value, Option<String>), String> {
        let value = proto::json::json_text_to_value(&self.0).map_err(not_json)?;
        Ok((value, with_text.then_some(self.0)))
    }
}

fn not_json(err: serde_json::Error) -> String {
    format!("plugin returned output that is not JSON: {err}")
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
    /// The submission's context (`plugin_api::Context`), JSON-encoded;
    /// empty when the backend sent none.
    pub context_json: Arc<str>,
}

/// Which run of a task this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunRef {
    /// The run's id: the same on every attempt and redelivery.
    pub id: Uuid,
    /// The attempt, from 1.
    pub attempt: u32,
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

    /// Runs each task of `runs` (first attempts, under the given run ids)
    /// concurrently on `submission`; results in the same order.
    pub async fn run_all(
        &self,
        runs: &[(&TaskDef, Uuid)],
        submission: &Submission,
    ) -> Vec<RunResult> {
        futures::future::join_all(runs.iter().map(|(task, id)| {
            self.run(
                task,
                submission,
                RunRef {
                    id: *id,
                    attempt: 1,
                },
            )
        }))
        .await
    }

    /// The plugin-host layer it runs tasks through.
    pub fn plugins(&self) -> &Arc<Plugins> {
        &self.plugins
    }

    /// Runs one task under its timeout.
    pub async fn run(&self, task: &TaskDef, submission: &Submission, run: RunRef) -> RunResult {
        let span = tracing::info_span!("task", task.id = %task.id, task.name = %task.name, task.module = %task.module);
        let started = Instant::now();
        let timeout = Duration::from_millis(u64::try_from(task.timeout_ms).unwrap_or(1).max(1));
        let timed_out = || {
            Outcome::TimedOut(format!(
                "task '{}' timed out after {} ms",
                task.name,
                timeout.as_millis()
            ))
        };
        // The plugin layer answers by the deadline itself (and recycles a
        // host whose run overstays), so only the wait for a permit is
        // bounded here.
        let outcome = match tokio::time::timeout(timeout, self.permits.acquire()).await {
            Ok(permit) => {
                let _permit = permit.expect("the executor's semaphore is never closed");
                let left = timeout.saturating_sub(started.elapsed());
                self.plugins.run(task, submission, run, left).await
            }
            Err(_) => timed_out(),
        };
        let duration = started.elapsed();
        let mode = if task.is_async { "async" } else { "sync" };
        if let Some(runs) = crate::metrics::hot::task_runs(&task.name, mode) {
            let outcome = match &outcome {
                Outcome::Succeeded(_) => 0,
                Outcome::Failed { .. } => 1,
                Outcome::TimedOut(_) => 2,
                Outcome::Crashed { .. } => 3,
            };
            runs.outcomes[outcome].increment(1);
            runs.duration.record(duration);
        }
        span.in_scope(|| match &outcome {
            Outcome::Succeeded(_) => {
                tracing::debug!(duration_us = duration.as_micros() as u64, "task succeeded")
            }
            Outcome::Failed { error, .. } => tracing::warn!(error = %error, "task failed"),
            Outcome::TimedOut(error) => tracing::warn!(error = %error, "task timed out"),
            Outcome::Crashed { error, .. } => {
                tracing::error!(error = %error, "task's plugin host crashed")
            }
        });
        RunResult { outcome, duration }
    }
}

#[cfg(test)]
mod tests {
    use super::Output;

    #[test]
    fn output_text_becomes_what_its_value_would_and_bad_text_is_named() {
        let value = serde_json::json!({"flags": ["late", 3], "ok": true, "score": 0.25});
        let text = Output(value.to_string());
        let (proto, logged) = text.clone().into_response(true).expect("JSON");
        assert_eq!(proto, proto::json::json_to_value(value.clone()));
        assert_eq!(logged, Some(value.to_string()));
        assert_eq!(text.clone().into_response(false).map(|r| r.1), Ok(None));
        assert_eq!(text.into_value(), Ok(value.clone()));

        let bad = Output("{\"unclosed\": ".into());
        let err = bad.clone().into_response(true).expect_err("not JSON");
        assert!(
            err.starts_with("plugin returned output that is not JSON"),
            "{err}"
        );
        let err = bad.into_value().expect_err("not JSON");
        assert!(
            err.starts_with("plugin returned output that is not JSON"),
            "{err}"
        );
    }
}
