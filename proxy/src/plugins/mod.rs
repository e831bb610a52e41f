//! The plugin-host layer: the only part of Daisy that names
//! `plugin_api::host`. Everything else runs a task through [`Plugins`].
//!
//! A task runs in one of two places:
//! - **in a plugin host** ([`Isolation::Process`], the default): a child
//!   process per library build (`daisy plugin-host`), supervised by
//!   [`supervisor`] (builds, slots, quarantine), each process handled by
//!   [`host_process`] (spawning, calls, its death) and spoken to over a
//!   socket pair ([`wire`]); the code inside the process is [`host`]. A
//!   crash, hang or leak costs only that library's runs in flight.
//! - **in-process** ([`Isolation::InProcess`], opt-in per task or as the
//!   default): loaded into this process by [`inproc`] and run on the
//!   blocking pool; fastest, and trusted with the whole process.
//!
//! [`files`] owns the plugins directory: names, completeness checks and
//! private copies.

pub mod files;
pub mod host;
mod host_process;
mod inproc;
pub mod schema;
mod secrets;
pub mod supervisor;
mod wire;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use plugin_api::host::RunInput;
use uuid::Uuid;

pub use self::{
    files::{AllowList, library_file_name, validate_name},
    secrets::Secrets,
    supervisor::{HostConfig, Quarantined},
};
use self::{
    inproc::InProcess,
    supervisor::{Call, CallError, Supervisor},
    wire::ErrorKind,
};
use crate::{
    error::PluginError,
    executor::{Outcome, Output, RunRef, Submission},
    registry::TaskDef,
};

/// Where a task's plugin code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Isolation {
    /// In a supervised plugin-host process (the default).
    #[default]
    Process,
    /// Inside this process: for trusted, latency-critical plugins only.
    InProcess,
}

impl Isolation {
    /// The value of the `tasks.isolation` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Process => "process",
            Isolation::InProcess => "in_process",
        }
    }

    /// Parses the `tasks.isolation` column.
    pub fn parse(value: &str) -> Option<Isolation> {
        match value {
            "process" => Some(Isolation::Process),
            "in_process" => Some(Isolation::InProcess),
            _ => None,
        }
    }
}

/// What a library build is, as read by a plugin host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryInfo {
    /// The plugin crate's name.
    pub name: String,
    /// The plugin crate's version.
    pub version: String,
    /// The plugin-api version it was built against.
    pub api_version: String,
    /// The tasks it exports.
    pub tasks: Vec<String>,
    /// The JSON Schema of each task's config, for the tasks that declare one.
    pub schemas: std::collections::BTreeMap<String, serde_json::Value>,
    /// Its contents' SHA-256 (hex).
    pub sha256: String,
    /// Its quarantined tasks, with how many crashes put them there.
    pub quarantined: Vec<(String, usize)>,
}

/// Runs tasks' plugin code, in hosts or in-process; share it behind an `Arc`.
#[derive(Debug)]
pub struct Plugins {
    dir: PathBuf,
    inproc: Arc<InProcess>,
    hosts: Arc<Supervisor>,
    default: Isolation,
    secrets: Secrets,
}

impl Plugins {
    /// Plugins from `dir`, run in hosts as `hosts` says unless a task (or
    /// `default`) asks for in-process. Needs a tokio runtime.
    pub fn new(
        dir: impl Into<PathBuf>,
        hosts: HostConfig,
        default: Isolation,
    ) -> std::io::Result<Plugins> {
        let dir = dir.into();
        Ok(Plugins {
            inproc: Arc::new(InProcess::new(&dir, hosts.allowed.clone())?),
            secrets: Secrets::new(hosts.secrets_dir.clone()),
            hosts: Supervisor::new(&dir, hosts)?,
            dir,
            default,
        })
    }

    /// Where `task` runs.
    pub fn isolation(&self, task: &TaskDef) -> Isolation {
        task.isolation
            .as_deref()
            .and_then(Isolation::parse)
            .unwrap_or(self.default)
    }

    /// Runs `task` on `submission`, answered within `timeout`.
    pub async fn run(
        &self,
        task: &TaskDef,
        submission: &Submission,
        run: RunRef,
        timeout: Duration,
    ) -> Outcome {
        if let Err(err) = validate_name("func", &task.func) {
            return failed(err);
        }
        // Secrets named in the config are read here, never stored with it.
        let resolved;
        let task = match self.secrets.resolve(&task.config) {
            Ok(None) => task,
            Ok(Some(config)) => {
                resolved = TaskDef {
                    config,
                    ..task.clone()
                };
                &resolved
            }
            Err(reason) => return failed(Secrets::error(&task.module, reason)),
        };
        let timed_out = || {
            Outcome::TimedOut(format!(
                "task '{}' timed out after {} ms",
                task.name, task.timeout_ms
            ))
        };
        match self.isolation(task) {
            Isolation::Process => {
                let config = task.config.to_string();
                let mut run_id = Uuid::encode_buffer();
                let call = Call {
                    module: &task.module,
                    task_id: task.id,
                    func: &task.func,
                    config_json: &config,
                    form_id: &submission.form_id,
                    submission_id: &submission.submission_id,
                    submission_json: &submission.json,
                    context_json: &submission.context_json,
                    run_id: run.id.hyphenated().encode_lower(&mut run_id),
                    attempt: run.attempt,
                };
                let deadline = tokio::time::Instant::now() + timeout;
                match self.hosts.call(call, deadline).await {
                    Ok(reply) => from_reply(task, reply),
                    Err(CallError::Plugin(err)) => failed(err),
                    Err(CallError::Quarantined(why)) => Outcome::Failed {
                        error: why,
                        retryable: true,
                        retry_after: None,
                    },
                    Err(CallError::HostDied { error, suspect }) => {
                        Outcome::Crashed { error, suspect }
                    }
                    Err(CallError::TimedOut) => timed_out(),
                }
            }
            Isolation::InProcess => {
                let (inproc, task2, submission) =
                    (self.inproc.clone(), task.clone(), submission.clone());
                let work = tokio::task::spawn_blocking(move || {
                    let started = Instant::now();
                    let outcome = run_in_process(&inproc, &task2, &submission, run);
                    if started.elapsed() > timeout {
                        tracing::warn!(
                            task.name = %task2.name,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "in-process task finished after its timeout; its result was discarded"
                        );
                    }
                    outcome
                });
                match tokio::time::timeout(timeout, work).await {
                    Ok(Ok(outcome)) => outcome,
                    Ok(Err(join)) => Outcome::Failed {
                        error: format!("task runner failed: {join}"),
                        retryable: true,
                        retry_after: None,
                    },
                    Err(_) => timed_out(),
                }
            }
        }
    }

    /// Forgets the in-process instances of `form`'s tasks (its tasks changed).
    pub fn forget_form(&self, form: Uuid) {
        self.inproc.forget_form(form);
    }

    /// What module `module`'s library is, read by a plugin host.
    pub async fn inspect(&self, module: &str) -> Result<LibraryInfo, PluginError> {
        self.hosts.inspect(module).await
    }

    /// The modules whose libraries are in the plugins directory, by name.
    pub fn modules(&self) -> std::io::Result<Vec<String>> {
        modules_in(&self.dir)
    }

    /// Records each new quarantine in `registry`, where `daisy plugin list`
    /// reads it.
    pub fn record_quarantines_in(&self, registry: crate::registry::Registry) {
        self.hosts.on_quarantine(Arc::new(move |q: Quarantined| {
            let registry = registry.clone();
            let record = crate::registry::Quarantine {
                module: q.module,
                sha256: q.sha256,
                func: q.func,
                crashes: i32::try_from(q.crashes).unwrap_or(i32::MAX),
                until: q.until.into(),
            };
            // Off the caller's thread: it may be an async one.
            std::thread::spawn(move || {
                if let Err(err) = registry.record_quarantine(&record) {
                    tracing::warn!(error = %err, "recording a quarantine failed");
                }
            });
        }));
    }

    /// Stops every plugin host.
    pub fn shutdown(&self) {
        self.hosts.shutdown();
    }
}

/// The modules whose libraries are in `dir`, by name.
pub fn modules_in(dir: &Path) -> std::io::Result<Vec<String>> {
    let (prefix, suffix) = (std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    let mut modules: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let module = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
            validate_name("module", module).ok()?;
            Some(module.to_owned())
        })
        .collect();
    modules.sort();
    Ok(modules)
}

fn failed(err: PluginError) -> Outcome {
    Outcome::Failed {
        error: err.to_string(),
        retryable: false,
        retry_after: None,
    }
}

fn from_reply(task: &TaskDef, reply: wire::Reply) -> Outcome {
    if let Some(error) = reply.error {
        let kind = ErrorKind::try_from(error.kind).unwrap_or(ErrorKind::Permanent);
        return match kind {
            ErrorKind::Create => failed(PluginError::Create {
                module: task.module.clone(),
                func: task.func.clone(),
                reason: error.message,
            }),
            ErrorKind::Permanent | ErrorKind::Retryable | ErrorKind::OverMemory => {
                Outcome::Failed {
                    error: error.message,
                    retryable: kind != ErrorKind::Permanent,
                    retry_after: (error.retry_after_ms > 0)
                        .then(|| Duration::from_millis(error.retry_after_ms)),
                }
            }
        };
    }
    // Parsed by whoever needs it, into what they need (see `Output`).
    match reply.output_json {
        Some(text) => Outcome::Succeeded(Output(text)),
        None => Outcome::Failed {
            error: "the plugin host sent an empty reply".into(),
            retryable: true,
            retry_after: None,
        },
    }
}

fn run_in_process(
    plugins: &InProcess,
    task: &TaskDef,
    submission: &Submission,
    run: RunRef,
) -> Outcome {
    let handle = match plugins.instance(task) {
        Ok(handle) => handle,
        Err(err) => return failed(err),
    };
    let input = RunInput {
        form_id: &submission.form_id,
        submission_id: &submission.submission_id,
        submission_json: &submission.json,
        attempt: run.attempt,
        run_id: &run.id.to_string(),
        context_json: &submission.context_json,
    };
    match handle.run_json(input) {
        Ok(text) => Outcome::Succeeded(Output(text)),
        Err(err) => Outcome::Failed {
            error: err.message().to_owned(),
            retryable: err.is_retryable(),
            retry_after: err.retry_after(),
        },
    }
}
