//! The supervisor: Daisy's side of the plugin hosts.
//!
//! One [`Build`] per module's current library build, each with
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

use std::{
    collections::{HashMap, HashSet, VecDeque},
    os::{fd::OwnedFd, unix::process::ExitStatusExt},
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use prost::Message;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    sync::{Notify, mpsc, oneshot},
};

use super::{
    LibraryInfo,
    files::{self, AllowList, Copies, Fingerprint, SnapshotError},
    wire::{self, Create, ErrorKind, Hello, Reply, Request},
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

/// Variables every host gets (when Daisy has them).
const BASE_ENV: [&str; 4] = ["PATH", "HOME", "LANG", "TZ"];

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

/// Called with each new quarantine.
pub type QuarantineHook = Arc<dyn Fn(Quarantined) + Send + Sync>;

/// A task quarantined in one library build.
#[derive(Debug, Clone)]
pub struct Quarantined {
    /// The module.
    pub module: String,
    /// The build's SHA-256.
    pub sha256: String,
    /// The task.
    pub func: String,
    /// The crashes that put it there.
    pub crashes: usize,
    /// When it ends.
    pub until: std::time::SystemTime,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Module {
    /// Held while a build of this module is read and its first host starts.
    loading: tokio::sync::Mutex<()>,
    current: Mutex<Option<Arc<Build>>>,
    /// The last file state that could not be loaded, and why.
    failed: Mutex<Option<(Fingerprint, PluginError)>>,
}

/// One loaded build of a library, and its hosts.
struct Build {
    module: String,
    fingerprint: Mutex<Fingerprint>,
    sha256: String,
    copy: PathBuf,
    info: LibraryInfo,
    slots: Vec<Slot>,
    next_slot: AtomicUsize,
    /// A host of its own for each task on probation, so that a task
    /// suspected of crashing its host crashes only its own runs, and the
    /// tasks beside it prove themselves clean.
    probation: Mutex<HashMap<String, Arc<Slot>>>,
    /// Set when a newer build replaced it and its copy was removed: a call
    /// that picked it just before then moves on to the current build
    /// instead of starting a host from a file that is gone.
    retired: AtomicBool,
}

#[derive(Default)]
struct Slot {
    host: Mutex<Option<Arc<Host>>>,
    /// Held while a host for this slot starts.
    starting: tokio::sync::Mutex<()>,
    /// This slot's hosts that crashed since one last answered a run
    /// cleanly, for the respawn backoff; shared with its host.
    crashes_in_a_row: Arc<AtomicUsize>,
}

/// Where a task may run now.
enum Standing {
    Clear,
    Probation,
    Quarantined(String),
}

/// A task's record since its first crash within the window. A crash fails
/// every run in flight on its host, so the tasks beside the culprit get
/// strikes too; but they also finish runs cleanly, and the culprit does not.
#[derive(Default)]
struct Strikes {
    /// Crashes with the task in flight: when, and which host (pid).
    crashes: VecDeque<(Instant, u32)>,
    /// Runs of the task that finished cleanly since its first strike.
    clean: usize,
    until: Option<Instant>,
}

impl Strikes {
    /// Whether this task, rather than its neighbours, likely crashes its host.
    fn suspect(&self) -> bool {
        self.clean < self.crashes.len()
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

    fn module(&self, name: &str) -> Arc<Module> {
        let mut modules = self.modules.lock().expect("modules poisoned");
        // Every call comes here: look up without allocating a key.
        if let Some(module) = modules.get(name) {
            return module.clone();
        }
        modules.entry(name.to_owned()).or_default().clone()
    }

    /// The build to use now. A changed file is read and started by the
    /// first call that sees it; meanwhile, and if it turns out incomplete
    /// or broken, the other calls keep using the current build.
    async fn build(&self, name: &str) -> Result<Arc<Build>, PluginError> {
        let (path, fingerprint) = files::fingerprint(&self.dir, name)?;
        let module = self.module(name);
        let current = module.current.lock().expect("build poisoned").clone();
        if let Some(build) = &current {
            if *build.fingerprint.lock().expect("fingerprint poisoned") == fingerprint {
                return Ok(build.clone());
            }
        }
        if let Some((failed, err)) = &*module.failed.lock().expect("failure poisoned") {
            if *failed == fingerprint {
                return current.ok_or_else(|| err.clone());
            }
        }
        let _loading = match &current {
            Some(build) => match module.loading.try_lock() {
                Ok(guard) => guard,
                Err(_) => return Ok(build.clone()),
            },
            None => module.loading.lock().await,
        };
        // Someone may have loaded it while we waited.
        let (path, fingerprint) =
            files::fingerprint(&self.dir, name).unwrap_or((path, fingerprint));
        let current = module.current.lock().expect("build poisoned").clone();
        if let Some(build) = &current {
            if *build.fingerprint.lock().expect("fingerprint poisoned") == fingerprint {
                return Ok(build.clone());
            }
        }
        let started = Instant::now();
        let snapshot = loop {
            let copies = &self.copies;
            // Blocking I/O on this thread, but only when a new build
            // appears (a few ms for a library of some MiB), and it must work
            // on the CLI's single-threaded runtime too.
            let result = copies.snapshot(name, &path, current.as_ref().map(|b| b.sha256.as_str()));
            match result {
                Ok(snapshot) => break snapshot,
                Err(SnapshotError::Unchanged(fingerprint)) => {
                    // Same contents (a `touch`, or the same file copied again).
                    let build = current.expect("unchanged from the current build");
                    *build.fingerprint.lock().expect("fingerprint poisoned") = fingerprint;
                    return Ok(build);
                }
                Err(SnapshotError::Incomplete(why)) => match &current {
                    Some(build) => {
                        tracing::debug!(plugin.module = name, reason = %why, "new library build not complete yet; the current one keeps serving");
                        return Ok(build.clone());
                    }
                    None if started.elapsed() < Duration::from_secs(2) => {
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                    None => {
                        return Err(PluginError::Load {
                            module: name.to_owned(),
                            reason: format!("{why}; is it still being written?"),
                        });
                    }
                },
                Err(SnapshotError::Failed(err)) => {
                    return self.failed(&module, fingerprint, err, current);
                }
            }
        };
        let slots: Vec<Slot> = (0..self.config.hosts_per_module.max(1))
            .map(|_| Slot::default())
            .collect();
        let (host, hello) = match Host::start(
            &self.config,
            name,
            &snapshot.copy,
            slots[0].crashes_in_a_row.clone(),
        )
        .await
        {
            Ok(started) => started,
            Err(err) => {
                let _ = std::fs::remove_file(&snapshot.copy);
                return self.failed(&module, fingerprint, err, current);
            }
        };
        *slots[0].host.lock().expect("slot poisoned") = Some(host);
        let build = Arc::new(Build {
            module: name.to_owned(),
            fingerprint: Mutex::new(snapshot.fingerprint),
            sha256: snapshot.sha256.clone(),
            copy: snapshot.copy,
            info: LibraryInfo {
                name: hello.name,
                version: hello.version,
                api_version: hello.api_version,
                tasks: hello.tasks,
                schemas: hello
                    .schemas
                    .into_iter()
                    .filter_map(|(task, json)| Some((task, serde_json::from_str(&json).ok()?)))
                    .collect(),
                sha256: snapshot.sha256.clone(),
                quarantined: Vec::new(),
            },
            slots,
            next_slot: AtomicUsize::new(0),
            probation: Mutex::default(),
            retired: AtomicBool::new(false),
        });
        tracing::info!(
            plugin.module = name,
            plugin.path = %path.display(),
            plugin.version = %build.info.version,
            plugin.sha256 = %build.sha256,
            "loaded plugin library in a host"
        );
        *module.failed.lock().expect("failure poisoned") = None;
        let old = module
            .current
            .lock()
            .expect("build poisoned")
            .replace(build.clone());
        if let Some(old) = old {
            old.retire_all(self.config.recycle_grace);
        }
        Ok(build)
    }

    fn failed(
        &self,
        module: &Module,
        fingerprint: Fingerprint,
        err: PluginError,
        current: Option<Arc<Build>>,
    ) -> Result<Arc<Build>, PluginError> {
        match &current {
            Some(_) => {
                tracing::error!(error = %err, "the new build of a plugin library cannot be used; the current build keeps serving")
            }
            None => tracing::warn!(error = %err, "plugin library failed to load"),
        }
        *module.failed.lock().expect("failure poisoned") = Some((fingerprint, err.clone()));
        current.ok_or(err)
    }

    /// A live host of `build` for `call`: the task's own while it is on
    /// probation, else the next slot's.
    async fn host_for(
        &self,
        call: &Call<'_>,
        build: &Arc<Build>,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<Host>, CallError> {
        if !build.info.tasks.iter().any(|t| t == call.func) {
            return Err(CallError::Plugin(PluginError::NoSuchTask {
                module: call.module.to_owned(),
                path: self.dir.join(files::library_file_name(call.module)),
                func: call.func.to_owned(),
                available: build.info.tasks.clone(),
            }));
        }
        let probation = match self.standing(build, call.func) {
            Standing::Quarantined(why) => return Err(CallError::Quarantined(why)),
            Standing::Probation => Some(
                build
                    .probation
                    .lock()
                    .expect("probation poisoned")
                    .entry(call.func.to_owned())
                    .or_default()
                    .clone(),
            ),
            Standing::Clear => None,
        };
        let slot = match &probation {
            Some(slot) => slot,
            None => {
                &build.slots[build.next_slot.fetch_add(1, Ordering::Relaxed) % build.slots.len()]
            }
        };
        match tokio::time::timeout_at(deadline, self.host(build, slot)).await {
            Ok(Ok(host)) => Ok(host),
            Ok(Err(err)) => Err(CallError::Plugin(err)),
            Err(_) => Err(CallError::TimedOut),
        }
    }

    /// The live host in `slot` of `build`, starting one if there is none.
    async fn host(&self, build: &Arc<Build>, slot: &Slot) -> Result<Arc<Host>, PluginError> {
        let usable = || {
            slot.host
                .lock()
                .expect("slot poisoned")
                .clone()
                .filter(|h| h.usable())
        };
        if let Some(host) = usable() {
            return Ok(host);
        }
        let _starting = slot.starting.lock().await;
        if let Some(host) = usable() {
            return Ok(host);
        }
        let replaced = slot.host.lock().expect("slot poisoned").take();
        let in_a_row = match replaced {
            Some(old) if old.crashed() => slot.crashes_in_a_row.fetch_add(1, Ordering::AcqRel) + 1,
            _ => slot.crashes_in_a_row.load(Ordering::Acquire),
        };
        // The first restart is immediate; crashes in a row (no clean run
        // in between) back off: 50 ms, doubling, up to 3.2 s.
        if in_a_row >= 2 {
            let delay = Duration::from_millis(50 << (in_a_row - 2).min(6));
            tokio::time::sleep(delay).await;
        }
        let (host, _) = Host::start(
            &self.config,
            &build.module,
            &build.copy,
            slot.crashes_in_a_row.clone(),
        )
        .await?;
        *slot.host.lock().expect("slot poisoned") = Some(host.clone());
        Ok(host)
    }

    /// Whether `func` of `build` runs as usual, on probation (in a host of
    /// its own, while its record makes it a suspect), or not at all.
    fn standing(&self, build: &Build, func: &str) -> Standing {
        if self.striking.load(Ordering::Acquire) == 0 {
            return Standing::Clear; // the hot path: no task has crashed lately
        }
        let mut quarantine = self.quarantine.lock().expect("quarantine poisoned");
        let key = (build.sha256.clone(), func.to_owned());
        let Some(strikes) = quarantine.get_mut(&key) else {
            return Standing::Clear;
        };
        let now = Instant::now();
        if let Some(until) = strikes.until.filter(|&u| u > now) {
            return Standing::Quarantined(format!(
                "task '{func}' of plugin '{}' is quarantined after {} crashes of its plugin host; it runs again once a new build is dropped in, or in {} s",
                build.module,
                strikes.crashes.len(),
                (until - now).as_secs() + 1
            ));
        }
        // A quarantine that ended, or a record whose crashes are all older
        // than the window, is forgotten.
        let stale = strikes
            .crashes
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) > self.config.quarantine_window);
        if strikes.until.is_some() || stale {
            quarantine.remove(&key);
            self.striking.fetch_sub(1, Ordering::AcqRel);
            return Standing::Clear;
        }
        if strikes.suspect() {
            Standing::Probation
        } else {
            Standing::Clear
        }
    }

    /// Notes a clean run of a task with strikes against it.
    fn clean_run(&self, build: &Build, func: &str) {
        if self.striking.load(Ordering::Acquire) == 0 {
            return; // the hot path: no task has crashed lately
        }
        let mut quarantine = self.quarantine.lock().expect("quarantine poisoned");
        if let Some(strikes) = quarantine.get_mut(&(build.sha256.clone(), func.to_owned())) {
            strikes.clean += 1;
        }
    }

    /// Records that `func`'s run was in flight when host `pid` crashed;
    /// returns whether the task is a likely cause.
    fn strike(&self, build: &Build, func: &str, pid: u32) -> bool {
        let mut quarantine = self.quarantine.lock().expect("quarantine poisoned");
        let key = (build.sha256.clone(), func.to_owned());
        if !quarantine.contains_key(&key) {
            self.striking.fetch_add(1, Ordering::AcqRel);
        }
        let strikes = quarantine.entry(key).or_default();
        if strikes.crashes.iter().any(|&(_, p)| p == pid) {
            return strikes.suspect(); // one crash, several runs of the task in flight
        }
        let now = Instant::now();
        strikes.crashes.push_back((now, pid));
        while strikes
            .crashes
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > self.config.quarantine_window)
        {
            strikes.crashes.pop_front();
        }
        let count = strikes.crashes.len();
        if strikes.until.is_none()
            && count >= self.config.quarantine_after.max(1) as usize
            && strikes.suspect()
        {
            strikes.until = Some(now + self.config.quarantine_window);
            tracing::error!(
                plugin.module = %build.module,
                task.func = func,
                plugin.sha256 = %build.sha256,
                crashes = count,
                "task quarantined: it was running in {count} crashes of its plugin host; its runs fail until a new build is dropped in or {} s pass",
                self.config.quarantine_window.as_secs()
            );
            if let Some(hook) = self.on_quarantine.lock().expect("hook poisoned").clone() {
                hook(Quarantined {
                    module: build.module.clone(),
                    sha256: build.sha256.clone(),
                    func: func.to_owned(),
                    crashes: count,
                    until: std::time::SystemTime::now() + self.config.quarantine_window,
                });
            }
        }
        strikes.suspect()
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

impl Build {
    fn retire_all(&self, grace: Duration) {
        self.retired.store(true, Ordering::Release);
        let probation: Vec<Arc<Slot>> = self
            .probation
            .lock()
            .expect("probation poisoned")
            .drain()
            .map(|(_, slot)| slot)
            .collect();
        for slot in self.slots.iter().chain(probation.iter().map(|s| &**s)) {
            if let Some(host) = slot.host.lock().expect("slot poisoned").take() {
                host.retire(grace);
            }
        }
        let _ = std::fs::remove_file(&self.copy);
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

/// One host process.
struct Host {
    module: String,
    pid: u32,
    frames: mpsc::UnboundedSender<Vec<u8>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Reply, String>>>>,
    /// Instances whose definition this host has been sent; held while
    /// sending, so the definition always precedes its first use.
    defined: Mutex<HashSet<u64>>,
    next_id: AtomicU64,
    inflight: AtomicUsize,
    runs: AtomicU64,
    retiring: AtomicBool,
    /// Set when Daisy kills it (retired), so its death is not a crash.
    killed: AtomicBool,
    dead: AtomicBool,
    kill: Notify,
    last_used: Mutex<Instant>,
    /// How long it may finish other calls once a timeout retires it.
    grace: Duration,
    /// Its slot's count of crashes in a row, reset by a clean run.
    in_a_row: Arc<AtomicUsize>,
}

impl Host {
    /// Starts a host for the library copy at `library` and waits for its Hello.
    async fn start(
        config: &HostConfig,
        module: &str,
        library: &std::path::Path,
        in_a_row: Arc<AtomicUsize>,
    ) -> Result<(Arc<Host>, Hello), PluginError> {
        let error = |reason: String| PluginError::Load {
            module: module.to_owned(),
            reason,
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|err| error(format!("creating a socket pair: {err}")))?;
        let mut command = tokio::process::Command::new(&config.program);
        command
            .arg("plugin-host")
            .arg("--library")
            .arg(library)
            .arg("--module")
            .arg(module)
            .arg("--threads")
            .arg(config.threads_per_host.max(1).to_string())
            .arg("--memory-mib")
            .arg(config.memory_limit_mib.to_string())
            .env_clear()
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for name in BASE_ENV
            .iter()
            .copied()
            .chain(config.env.iter().map(String::as_str))
        {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        // The host must not outlive Daisy, even when Daisy is SIGKILLed.
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches only this process.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|err| {
            error(format!(
                "starting a plugin host ('{}'): {err}",
                config.program.display()
            ))
        })?;
        let pid = child.id().unwrap_or(0);
        for (stream, out) in [
            (
                "stdout",
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ),
            (
                "stderr",
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ),
        ] {
            if let Some(out) = out {
                tokio::spawn(forward_output(module.to_owned(), pid, stream, out));
            }
        }
        ours.set_nonblocking(true)
            .map_err(|err| error(format!("setting up the host's socket: {err}")))?;
        let socket = tokio::net::UnixStream::from_std(ours)
            .map_err(|err| error(format!("setting up the host's socket: {err}")))?;
        let (mut reader, writer) = socket.into_split();
        let hello =
            match tokio::time::timeout(config.start_timeout, wire::read_async(&mut reader)).await {
                Ok(Ok(Some(body))) => Hello::decode(&body[..])
                    .map_err(|err| error(format!("the plugin host sent a bad hello: {err}")))?,
                Ok(_) => {
                    let status = child.wait().await.ok();
                    return Err(error(format!(
                        "plugin host died while loading the library: {}",
                        describe(status)
                    )));
                }
                Err(_) => {
                    return Err(error(format!(
                        "loading the library took longer than {} ms",
                        config.start_timeout.as_millis()
                    )));
                }
            };
        if !hello.error.is_empty() {
            return Err(error(hello.error.replace(
                &library.display().to_string(),
                &format!("plugins/{}", files::library_file_name(module)),
            )));
        }
        let (frames, queued) = mpsc::unbounded_channel();
        let host = Arc::new(Host {
            module: module.to_owned(),
            pid,
            frames,
            pending: Mutex::default(),
            defined: Mutex::default(),
            next_id: AtomicU64::new(1),
            inflight: AtomicUsize::new(0),
            runs: AtomicU64::new(0),
            retiring: AtomicBool::new(false),
            killed: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            kill: Notify::new(),
            last_used: Mutex::new(Instant::now()),
            grace: config.recycle_grace,
            in_a_row,
        });
        tokio::spawn(write_frames(writer, queued));
        tokio::spawn(read_replies(host.clone(), reader, child));
        tracing::debug!(
            plugin.module = module,
            host.pid = pid,
            "plugin host started"
        );
        Ok((host, hello))
    }

    fn usable(&self) -> bool {
        !self.dead.load(Ordering::Acquire) && !self.retiring.load(Ordering::Acquire)
    }

    fn crashed(&self) -> bool {
        self.dead.load(Ordering::Acquire) && !self.killed.load(Ordering::Acquire)
    }

    async fn call(self: &Arc<Self>, call: &Call<'_>, deadline: tokio::time::Instant) -> CallResult {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending poisoned")
            .insert(id, reply);
        let _inflight = InFlight::enter(self, id);
        let instance = instance_key(call);
        let mut request = Request {
            id,
            instance,
            create: None,
            form_id: call.form_id.to_owned(),
            submission_id: call.submission_id.to_owned(),
            submission_json: call.submission_json.to_owned(),
            attempt: call.attempt,
            run_id: call.run_id.to_owned(),
            context_json: call.context_json.to_owned(),
        };
        {
            let mut defined = self.defined.lock().expect("defined poisoned");
            if defined.insert(instance) {
                request.create = Some(Create {
                    func: call.func.to_owned(),
                    config_json: call.config_json.to_owned(),
                });
            }
            let mut frame = Vec::new();
            wire::encode(&request, &mut frame);
            if self.frames.send(frame).is_err() {
                defined.remove(&instance);
            }
        }
        // The host may have died between being picked and the request being
        // registered; its reader sets `dead` before it fails what is pending,
        // so a request registered after that is failed here, not left to
        // wait for its deadline.
        let mut answer = answer;
        if self.dead.load(Ordering::Acquire) {
            return match answer.try_recv() {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(cause)) => Err(CallError::HostDied {
                    error: format!("plugin host for '{}' died: {cause}", self.module),
                    suspect: true,
                }),
                Err(_) => Err(CallError::HostDied {
                    error: format!("plugin host for '{}' died", self.module),
                    suspect: true,
                }),
            };
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(cause))) => Err(CallError::HostDied {
                error: format!("plugin host for '{}' died: {cause}", self.module),
                suspect: true,
            }),
            Ok(Err(_)) => Err(CallError::HostDied {
                error: format!("plugin host for '{}' died", self.module),
                suspect: true,
            }),
            Err(_) => {
                tracing::warn!(plugin.module = %self.module, host.pid = self.pid, "a run passed its timeout; recycling its plugin host");
                self.retire(self.grace);
                Err(CallError::TimedOut)
            }
        }
    }

    /// New calls go elsewhere; the process is killed once its calls finish,
    /// or after `grace`.
    fn retire(self: &Arc<Self>, grace: Duration) {
        if self.retiring.swap(true, Ordering::AcqRel) {
            return;
        }
        if self.inflight.load(Ordering::Acquire) == 0 || grace.is_zero() {
            self.kill_now();
            return;
        }
        let host = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if let Some(host) = host.upgrade() {
                host.kill_now();
            }
        });
    }

    fn kill_now(&self) {
        if !self.dead.load(Ordering::Acquire) {
            self.killed.store(true, Ordering::Release);
            self.kill.notify_one();
        }
    }
}

/// Counts a call in flight; on drop (answered, timed out or cancelled)
/// forgets it, and kills a retiring host whose last call it was.
struct InFlight<'a> {
    host: &'a Arc<Host>,
    id: u64,
}

impl<'a> InFlight<'a> {
    fn enter(host: &'a Arc<Host>, id: u64) -> Self {
        host.inflight.fetch_add(1, Ordering::AcqRel);
        *host.last_used.lock().expect("last use poisoned") = Instant::now();
        InFlight { host, id }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.host
            .pending
            .lock()
            .expect("pending poisoned")
            .remove(&self.id);
        *self.host.last_used.lock().expect("last use poisoned") = Instant::now();
        if self.host.inflight.fetch_sub(1, Ordering::AcqRel) == 1
            && self.host.retiring.load(Ordering::Acquire)
        {
            self.host.kill_now();
        }
    }
}

/// Identifies a task instance: the task, its func and its config.
fn instance_key(call: &Call<'_>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    (call.task_id, call.func, call.config_json).hash(&mut hasher);
    hasher.finish()
}

async fn write_frames(
    mut socket: tokio::net::unix::OwnedWriteHalf,
    mut frames: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    while let Some(mut batch) = frames.recv().await {
        while let Ok(more) = frames.try_recv() {
            batch.extend_from_slice(&more);
        }
        if socket.write_all(&batch).await.is_err() {
            return;
        }
    }
}

async fn read_replies(
    host: Arc<Host>,
    mut socket: tokio::net::unix::OwnedReadHalf,
    mut child: tokio::process::Child,
) {
    loop {
        tokio::select! {
            frame = wire::read_async(&mut socket) => match frame {
                Ok(Some(body)) => match Reply::decode(&body[..]) {
                    Ok(reply) => {
                        let waiting = host.pending.lock().expect("pending poisoned").remove(&reply.id);
                        if let Some(waiting) = waiting {
                            let _ = waiting.send(Ok(reply));
                        }
                    }
                    Err(err) => {
                        tracing::error!(plugin.module = %host.module, error = %err, "plugin host sent a bad frame; killing it");
                        let _ = child.start_kill();
                        break;
                    }
                },
                Ok(None) | Err(_) => break,
            },
            () = host.kill.notified() => {
                let _ = child.start_kill();
            }
        }
    }
    let status = child.wait().await.ok();
    host.dead.store(true, Ordering::Release);
    let cause = describe(status);
    let pending: Vec<_> = host
        .pending
        .lock()
        .expect("pending poisoned")
        .drain()
        .collect();
    if !host.killed.load(Ordering::Acquire) {
        tracing::error!(
            plugin.module = %host.module,
            host.pid = host.pid,
            cause = %cause,
            runs_in_flight = pending.len(),
            "plugin host died"
        );
    }
    for (_, waiting) in pending {
        let _ = waiting.send(Err(cause.clone()));
    }
}

/// "SIGSEGV", "exit code 3", ...
fn describe(status: Option<std::process::ExitStatus>) -> String {
    let Some(status) = status else {
        return "unknown cause".into();
    };
    if let Some(signal) = status.signal() {
        return signal_name(signal);
    }
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => "unknown cause".into(),
    }
}

fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGINT => "SIGINT",
        _ => return format!("signal {signal}"),
    };
    name.to_owned()
}

/// Sends a host's output to Daisy's log, a line an event, tagged with its library.
async fn forward_output(
    module: String,
    pid: u32,
    stream: &'static str,
    out: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
) {
    let mut lines = tokio::io::BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line: String = line.chars().take(4096).collect();
        tracing::warn!(plugin.module = %module, host.pid = pid, stream, "{line}");
    }
}
