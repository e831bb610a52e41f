//! The supervisor: Daisy's side of the plugin hosts.
//!
//! One `Build` per module's current library build, each with
//! `hosts_per_module` slots for host processes, started lazily on first use.
//! A call picks a slot round-robin, sends its request over the host's socket
//! and waits for the reply with that id; many calls share one host, and the
//! host's writer task sends whatever is queued in one write.
//!
//! - A host that dies fails exactly the calls in flight on it, naming the
//!   cause; the next call starts a new host (immediately after one crash,
//!   with growing backoff after several in a row).
//! - A call past its deadline is answered at once and its host *retires*:
//!   new calls go to a new host, and the old one is killed once its other
//!   calls finish, or after a grace period.
//! - A host retires after `max_runs` runs, when it reports itself over its
//!   memory limit, and when idle for `idle_timeout`.
//! - A crash fails every run in flight on its host, so blame is decided by
//!   each task's record: a task that has crashed more often than it has run
//!   cleanly is on *probation*, and its runs go to a host of its own, where
//!   a crash can only be its fault and its neighbours prove themselves clean.
//! - A task (build and func) whose runs were in flight in
//!   `quarantine_after` crashes within `quarantine_window`, and that is
//!   still a suspect, is quarantined: its runs fail at once until the
//!   window passes or a new build arrives.
//! - Nothing global is held while plugin code runs: loading a build holds
//!   only its module's lock, and constructors run inside the hosts.
//!
//! `builds` loads each module's current build and keeps its host slots;
//! `quarantine` keeps the tasks' crash records (probation, quarantine). One
//! host process, as Daisy sees it, is `plugins::host_process`; the code that
//! runs inside it is [`super::host`].

mod builds;
mod quarantine;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

pub use self::quarantine::{QuarantineHook, Quarantined};
use self::{
    builds::{Module, Slot},
    quarantine::Strikes,
};
use super::{
    LibraryInfo,
    files::{AllowList, Copies},
    wire::{ErrorKind, Reply},
};
use crate::error::PluginError;

/// How plugin hosts are run.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The `daisy` executable (its hidden `plugin-host` subcommand).
    pub program: PathBuf,
    /// Host processes per library build.
    pub hosts_per_module: usize,
    /// Threads running tasks in each host.
    pub threads_per_host: usize,
    /// Resident memory a host may reach before it is recycled; 0: no limit.
    pub memory_limit_mib: u64,
    /// Runs after which a host is recycled; 0: no limit.
    pub max_runs: u64,
    /// A host with nothing to do for this long exits.
    pub idle_timeout: Duration,
    /// How long a host may take to load its library.
    pub start_timeout: Duration,
    /// How long a retiring host may finish its other calls before it is killed.
    pub recycle_grace: Duration,
    /// Environment variables passed on to hosts, besides PATH, HOME, LANG, TZ.
    pub env: Vec<String>,
    /// Crashes within the window that quarantine a task.
    pub quarantine_after: u32,
    /// How long crashes are remembered, and a quarantine lasts.
    pub quarantine_window: Duration,
    /// Which builds may be loaded (`--plugin-sha256`), in hosts and in-process.
    pub allowed: AllowList,
    /// Where the secrets that task configs name live (`--secrets-dir`).
    pub secrets_dir: Option<PathBuf>,
}

impl HostConfig {
    /// Defaults, with `program` as the `daisy` executable.
    pub fn new(program: PathBuf) -> HostConfig {
        HostConfig {
            program,
            hosts_per_module: 1,
            threads_per_host: 16,
            memory_limit_mib: 1024,
            max_runs: 0,
            idle_timeout: Duration::from_secs(300),
            start_timeout: Duration::from_secs(10),
            recycle_grace: Duration::from_secs(10),
            env: Vec::new(),
            quarantine_after: 3,
            quarantine_window: Duration::from_secs(600),
            allowed: AllowList::any(),
            secrets_dir: None,
        }
    }
}

/// What one call to a host came to.
#[derive(Debug)]
pub enum CallError {
    /// The library cannot be used (missing, refused, still being written).
    Plugin(PluginError),
    /// The task is quarantined.
    Quarantined(String),
    /// The host died with the call in flight. `suspect`: this task's record
    /// (crashes against clean runs) makes it a likely cause, rather than a
    /// neighbour that happened to be in flight.
    HostDied {
        /// What happened, naming the library and the cause.
        error: String,
        /// Whether this task likely caused it.
        suspect: bool,
    },
    /// The deadline passed; the host is being recycled.
    TimedOut,
}

/// The outcome of a run in a host.
pub type CallResult = Result<Reply, CallError>;

/// A task to run: what identifies its instance in a host.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The module (library).
    pub module: &'a str,
    /// The task's id.
    pub task_id: uuid::Uuid,
    /// The task inside the library.
    pub func: &'a str,
    /// The task's JSON config.
    pub config_json: &'a str,
    /// The form's id.
    pub form_id: &'a str,
    /// The submission's id.
    pub submission_id: &'a str,
    /// The submission, JSON-encoded.
    pub submission_json: &'a str,
    /// The submission's context, JSON-encoded (empty for none).
    pub context_json: &'a str,
    /// The run's id.
    pub run_id: &'a str,
    /// The attempt, from 1.
    pub attempt: u32,
}

/// Daisy's plugin hosts; share it behind an `Arc`.
pub struct Supervisor {
    config: HostConfig,
    dir: PathBuf,
    copies: Copies,
    modules: Mutex<HashMap<String, Arc<Module>>>,
    quarantine: Mutex<HashMap<(String, String), Strikes>>,
    /// How many tasks have a record in `quarantine` (0: skip the lock).
    striking: AtomicUsize,
    /// Told of each quarantine (to record it where `plugin list` reads it).
    on_quarantine: Mutex<Option<QuarantineHook>>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// A supervisor for the libraries in `dir`.
    pub fn new(dir: impl Into<PathBuf>, config: HostConfig) -> std::io::Result<Arc<Supervisor>> {
        let copies = Copies::new(config.allowed.clone())?;
        let supervisor = Arc::new(Supervisor {
            config,
            dir: dir.into(),
            copies,
            modules: Mutex::default(),
            quarantine: Mutex::default(),
            striking: AtomicUsize::new(0),
            on_quarantine: Mutex::new(None),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap(Arc::downgrade(&supervisor)));
        }
        Ok(supervisor)
    }

    /// Runs one call in a host of its module's current build, answered by
    /// `deadline` at the latest.
    pub async fn call(&self, call: Call<'_>, deadline: tokio::time::Instant) -> CallResult {
        // A build replaced (and its copy removed) just after this call
        // picked it cannot start a host: the call moves on, once, to the
        // build that replaced it.
        let mut attempts_left = 2;
        let (build, host) = loop {
            attempts_left -= 1;
            let build = match tokio::time::timeout_at(deadline, self.build(call.module)).await {
                Ok(Ok(build)) => build,
                Ok(Err(err)) => return Err(CallError::Plugin(err)),
                Err(_) => return Err(CallError::TimedOut),
            };
            match self.host_for(&call, &build, deadline).await {
                Ok(host) => break (build, host),
                Err(CallError::Plugin(_))
                    if attempts_left > 0 && build.retired.load(Ordering::Acquire) => {}
                Err(err) => return Err(err),
            }
        };
        let mut result = host.call(&call, deadline).await;
        match &mut result {
            // Runs cut short because Daisy stopped a retiring host are not
            // crashes: they count against no task.
            Err(CallError::HostDied { suspect, .. }) => {
                *suspect = host.crashed() && self.strike(&build, call.func, host.pid);
            }
            Ok(reply) => {
                if reply.error.is_none() {
                    self.clean_run(&build, call.func);
                    if host.in_a_row.load(Ordering::Relaxed) > 0 {
                        host.in_a_row.store(0, Ordering::Release);
                    }
                }
                let runs = host.runs.fetch_add(1, Ordering::Relaxed) + 1;
                let over_memory = reply
                    .error
                    .as_ref()
                    .is_some_and(|e| e.kind == ErrorKind::OverMemory as i32);
                if over_memory {
                    tracing::warn!(
                        plugin.module = call.module,
                        host.pid = host.pid,
                        "plugin host went over its memory limit; recycling it"
                    );
                    host.retire(self.config.recycle_grace);
                } else if self.config.max_runs > 0 && runs >= self.config.max_runs {
                    tracing::info!(
                        plugin.module = call.module,
                        host.pid = host.pid,
                        runs,
                        "plugin host reached its run budget; recycling it"
                    );
                    host.retire(self.config.recycle_grace);
                }
            }
            _ => {}
        }
        result
    }

    /// What the module's current build is, loading it if need be (a host
    /// is started to read it).
    pub async fn inspect(&self, module: &str) -> Result<LibraryInfo, PluginError> {
        let build = self.build(module).await?;
        let mut info = build.info.clone();
        info.quarantined = self
            .quarantine
            .lock()
            .expect("quarantine poisoned")
            .iter()
            .filter(|((sha, _), s)| {
                *sha == build.sha256 && s.until.is_some_and(|u| u > Instant::now())
            })
            .map(|((_, func), s)| (func.clone(), s.crashes.len()))
            .collect();
        Ok(info)
    }

    /// Sets what is told of each new quarantine.
    pub fn on_quarantine(&self, hook: QuarantineHook) {
        *self.on_quarantine.lock().expect("hook poisoned") = Some(hook);
    }

    /// Kills every host now.
    pub fn shutdown(&self) {
        let modules: Vec<_> = self
            .modules
            .lock()
            .expect("modules poisoned")
            .drain()
            .collect();
        for (_, module) in modules {
            if let Some(build) = module.current.lock().expect("build poisoned").take() {
                build.retire_all(Duration::ZERO);
            }
        }
    }

    /// Retires hosts idle for longer than the idle timeout.
    fn reap_idle(&self) {
        let modules: Vec<_> = self
            .modules
            .lock()
            .expect("modules poisoned")
            .values()
            .cloned()
            .collect();
        for module in modules {
            let Some(build) = module.current.lock().expect("build poisoned").clone() else {
                continue;
            };
            let probation: Vec<Arc<Slot>> = build
                .probation
                .lock()
                .expect("probation poisoned")
                .values()
                .cloned()
                .collect();
            for slot in build.slots.iter().chain(probation.iter().map(|s| &**s)) {
                let idle = slot
                    .host
                    .lock()
                    .expect("slot poisoned")
                    .clone()
                    .filter(|h| {
                        h.inflight.load(Ordering::Acquire) == 0
                            && h.last_used.lock().expect("last use poisoned").elapsed()
                                > self.config.idle_timeout
                    });
                if let Some(host) = idle {
                    tracing::debug!(plugin.module = %build.module, host.pid = host.pid, "stopping an idle plugin host");
                    host.retire(Duration::ZERO);
                }
            }
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn reap(supervisor: Weak<Supervisor>) {
    let every = match supervisor.upgrade() {
        Some(s) => {
            (s.config.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
        }
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        match supervisor.upgrade() {
            Some(s) => s.reap_idle(),
            None => return,
        }
    }
}
