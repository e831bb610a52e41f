//! The gRPC edge: the `PostSubProxy` service. The only module that sees
//! generated protobuf types; errors become `tonic::Status` here and only here.

mod limits;
mod status;

use std::{sync::Arc, time::Instant};

use chrono::Utc;
pub use proto::json::{json_to_value, struct_to_json, struct_to_json_text, value_to_json};
use proto::v1::{
    Enqueued, GetRunsRequest, GetRunsResponse, Outcome as PbOutcome, ProcessRequest,
    ProcessResponse, Run as PbRun, RunState as PbRunState, SubmissionContext, TaskResult,
    post_sub_proxy_server::PostSubProxy,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

pub use self::limits::Limits;
use self::limits::Refusal;
pub use self::status::edge_statuses;
use self::status::{code_name, registry_status};

use crate::{
    SyncRunLog,
    auth::{Key, Keys},
    catalog::Catalog,
    executor::{Executor, Outcome, Submission},
    outbox::{Acceptor, Outbox},
    queue::Outgoing,
    registry::{Acceptance, Registry, Replay, RunState, SyncRun, TaskDef, new_run_id},
    run_log::RunLog,
};

/// The `PostSubProxy` service.
#[derive(Debug, Clone)]
pub struct Service {
    catalog: Arc<Catalog>,
    executor: Executor,
    registry: Registry,
    acceptor: Acceptor,
    outbox: Outbox,
    run_log: RunLog,
    sync_run_log: SyncRunLog,
    limits: Limits,
    /// The API keys calls must carry; `None`: no authentication.
    keys: Option<Arc<Keys>>,
}

impl Service {
    /// A service answering from `catalog`, running synchronous tasks on
    /// `executor`, committing asynchronous ones through `acceptor`,
    /// publishing them through `outbox`, logging synchronous runs to
    /// `run_log` (those `sync_run_log` selects) and reading runs from
    /// `registry`.
    pub fn new(
        catalog: Arc<Catalog>,
        executor: Executor,
        registry: Registry,
        acceptor: Acceptor,
        outbox: Outbox,
        run_log: RunLog,
        sync_run_log: SyncRunLog,
    ) -> Service {
        Service {
            catalog,
            executor,
            registry,
            acceptor,
            outbox,
            run_log,
            sync_run_log,
            limits: Limits::default(),
            keys: None,
        }
    }

    /// The same service, checking submissions against `limits`.
    pub fn with_limits(mut self, limits: Limits) -> Service {
        self.limits = limits;
        self
    }

    /// The same service, requiring every call to carry one of `keys`.
    pub fn with_keys(mut self, keys: Arc<Keys>) -> Service {
        self.keys = Some(keys);
        self
    }

    /// The same service, requiring API keys if `keys` is given.
    pub fn with_keys_if(self, keys: Option<Arc<Keys>>) -> Service {
        match keys {
            Some(keys) => self.with_keys(keys),
            None => self,
        }
    }

    /// The call's API key, when the service requires one.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<Option<Arc<Key>>, Status> {
        self.keys
            .as_ref()
            .map(|keys| keys.authenticate(request.metadata()))
            .transpose()
    }
}

/// A request's context as tasks see it (`plugin_api::Context`'s JSON form).
fn context_to_json(context: SubmissionContext) -> serde_json::Value {
    serde_json::json!({
        "organisation_id": context.organisation_id,
        "owner_emails": context.owner_emails,
        "submitter": context.submitter,
        "locale": context.locale,
    })
}

fn parse_uuid(field: &str, value: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(value)
        .map_err(|_| Status::invalid_argument(format!("{field} is not a UUID: '{value}'")))
}

impl Service {
    /// `Process`, without the metrics around it.
    async fn process_call(
        &self,
        request: Request<ProcessRequest>,
    ) -> Result<Response<ProcessResponse>, Status> {
        let key = self.authenticate(&request)?;
        let span = tracing::Span::current();
        // The trace its asynchronous runs belong to: this call's span when
        // spans are exported, else the caller's traceparent as it came.
        let trace = crate::trace::traceparent_of(&span).or_else(|| {
            request
                .metadata()
                .get(crate::trace::TRACEPARENT)
                .and_then(|v| v.to_str().ok())
                .filter(|v| crate::trace::is_traceparent(v))
                .map(str::to_owned)
        });
        let request = request.into_inner();
        span.record("form.id", request.form_id.as_str());
        span.record("submission.id", request.submission_id.as_str());
        let form = parse_uuid("form_id", &request.form_id)?;
        if let Some(key) = key.filter(|key| !key.may_use(form)) {
            return Err(key.denied(form));
        }
        let submission_id = parse_uuid("submission_id", &request.submission_id)?;
        let submission = request
            .submission
            .ok_or_else(|| Status::invalid_argument("submission is missing"))?;
        self.limits
            .check(&submission)
            .map_err(|refusal| Status::invalid_argument(refusal.0))?;
        let context = request
            .context
            .map(|context| {
                self.limits.check_context(&context)?;
                Ok(context_to_json(context))
            })
            .transpose()
            .map_err(|refusal: Refusal| Status::invalid_argument(refusal.0))?;

        let started = Instant::now();
        let tasks = self
            .catalog
            .tasks(form)
            .await
            .map_err(Box::new)
            .map_err(registry_status)?;
        let sync: Vec<_> = tasks.iter().filter(|t| t.enabled && !t.is_async).collect();
        let later: Vec<_> = tasks.iter().filter(|t| t.enabled && t.is_async).collect();
        if sync.is_empty() && later.is_empty() {
            return Ok(Response::new(ProcessResponse::default()));
        }
        // The payload as a JSON value only for the outbox's row; tasks get text.
        let payload = (!later.is_empty()).then(|| struct_to_json(&submission));
        let submission = Submission {
            form_id: request.form_id,
            submission_id: request.submission_id,
            json: struct_to_json_text(&submission).into(),
            context_json: context
                .as_ref()
                .map_or_else(String::new, |c| c.to_string())
                .into(),
        };

        // The outbox commit and the synchronous tasks run side by side.
        let accept = async {
            let Some(payload) = payload else {
                return Ok(Ok(Vec::new()));
            };
            self.acceptor
                .accept(Acceptance {
                    form,
                    submission: submission_id,
                    payload,
                    context,
                    tasks: later.iter().map(|t| (*t).clone()).collect(),
                    trace: trace.clone(),
                })
                .await
        };
        let sync_started = Utc::now();
        let sync: Vec<(&TaskDef, Uuid)> = sync.into_iter().map(|t| (t, new_run_id())).collect();
        let (accepted, runs) = tokio::join!(accept, self.executor.run_all(&sync, &submission));
        let accepted = accepted
            .map_err(registry_status)?
            .map_err(|Replay::Conflict(why)| Status::already_exists(why))?;

        let traceparent: Option<Arc<str>> = trace.map(Into::into);
        let fresh: Vec<Outgoing> = accepted
            .iter()
            .filter(|a| a.unpublished)
            .map(|a| Outgoing {
                run: a.run_id,
                traceparent: traceparent.clone(),
            })
            .collect();
        if !fresh.is_empty() {
            self.outbox.publish_soon(fresh);
        }
        let enqueued = later
            .iter()
            .filter_map(|task| {
                let run = accepted.iter().find(|a| a.task_id == task.id)?;
                Some(Enqueued {
                    task_id: task.id.to_string(),
                    name: task.name.clone(),
                    run_id: run.run_id.to_string(),
                })
            })
            .collect();

        let mut log = Vec::with_capacity(sync.len());
        let results = sync
            .iter()
            .zip(runs)
            .map(|((task, run_id), run)| {
                // The output for the response, and its text for the run log.
                let (outcome, output, text, error) = match run.outcome {
                    Outcome::Succeeded(output) => {
                        match output.into_response(self.sync_run_log == SyncRunLog::All) {
                            Ok((proto, text)) => {
                                (PbOutcome::Succeeded, Some(proto), text, String::new())
                            }
                            Err(error) => (PbOutcome::Failed, None, None, error),
                        }
                    }
                    Outcome::Failed { error, .. } | Outcome::Crashed { error, .. } => {
                        (PbOutcome::Failed, None, None, error)
                    }
                    Outcome::TimedOut(error) => (PbOutcome::TimedOut, None, None, error),
                };
                let logged =
                    outcome != PbOutcome::Succeeded || self.sync_run_log == SyncRunLog::All;
                if logged {
                    log.push(SyncRun {
                        id: *run_id,
                        submission_id,
                        form_id: form,
                        task_id: task.id,
                        task_name: task.name.clone(),
                        state: if outcome == PbOutcome::Succeeded {
                            RunState::Succeeded
                        } else {
                            RunState::Dead
                        },
                        last_error: (!error.is_empty()).then(|| error.clone()),
                        output: text,
                        started_at: sync_started,
                        finished_at: sync_started
                            + chrono::Duration::from_std(run.duration).unwrap_or_default(),
                    });
                }
                TaskResult {
                    task_id: task.id.to_string(),
                    name: task.name.clone(),
                    outcome: outcome.into(),
                    output,
                    error,
                    duration_us: run.duration.as_micros() as u64,
                }
            })
            .collect();
        self.run_log.record(log);
        tracing::debug!(
            sync = sync.len(),
            enqueued = later.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "processed"
        );
        Ok(Response::new(ProcessResponse { results, enqueued }))
    }
}

#[tonic::async_trait]
impl PostSubProxy for Service {
    async fn process(
        &self,
        request: Request<ProcessRequest>,
    ) -> Result<Response<ProcessResponse>, Status> {
        let started = std::time::Instant::now();
        let span = tracing::info_span!(
            "process",
            form.id = tracing::field::Empty,
            submission.id = tracing::field::Empty,
        );
        // The caller's trace goes on (its parent is set before it starts).
        if let Some(traceparent) = request
            .metadata()
            .get(crate::trace::TRACEPARENT)
            .and_then(|v| v.to_str().ok())
        {
            crate::trace::continue_trace(&span, traceparent);
        }
        let answer = tracing::Instrument::instrument(self.process_call(request), span).await;
        match (&answer, crate::metrics::hot::process_ok()) {
            (Ok(_), Some((calls, latency))) => {
                calls.increment(1);
                latency.record(started.elapsed());
            }
            (Err(status), Some(_)) => {
                let code = code_name(status.code());
                ::metrics::counter!(crate::metrics::PROCESS_CALLS, "code" => code).increment(1);
                ::metrics::histogram!(crate::metrics::PROCESS_DURATION, "code" => code)
                    .record(started.elapsed());
            }
            (_, None) => {}
        }
        answer
    }

    #[tracing::instrument(name = "get_runs", skip_all, fields(submission.id))]
    async fn get_runs(
        &self,
        request: Request<GetRunsRequest>,
    ) -> Result<Response<GetRunsResponse>, Status> {
        let key = self.authenticate(&request)?;
        let request = request.into_inner();
        tracing::Span::current().record("submission.id", request.submission_id.as_str());
        let submission = parse_uuid("submission_id", &request.submission_id)?;
        let registry = self.registry.clone();
        let runs = tokio::task::spawn_blocking(move || registry.runs_for_submission(submission))
            .await
            .expect("run query panicked")
            .map_err(Box::new)
            .map_err(registry_status)?;
        // A submission of a form the key may not use is not shown.
        if let Some(key) = key {
            if let Some(run) = runs.iter().find(|run| !key.may_use(run.form_id)) {
                return Err(key.denied(run.form_id));
            }
        }
        let runs = runs
            .into_iter()
            .map(|run| PbRun {
                run_id: run.id.to_string(),
                task_id: run.task_id.to_string(),
                name: run.task_name.clone(),
                state: match run.state() {
                    RunState::Queued => PbRunState::Queued,
                    RunState::Running => PbRunState::Running,
                    RunState::Succeeded => PbRunState::Succeeded,
                    RunState::Retrying => PbRunState::Retrying,
                    RunState::Dead => PbRunState::Dead,
                }
                .into(),
                attempts: u32::try_from(run.attempts).unwrap_or(0),
                last_error: run.last_error.unwrap_or_default(),
                output: run.output.map(json_to_value),
                is_async: run.is_async,
            })
            .collect();
        Ok(Response::new(GetRunsResponse { runs }))
    }
}
