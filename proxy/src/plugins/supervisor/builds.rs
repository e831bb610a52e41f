//! The builds: each module's current library build, read from a verified
//! private copy, and its host slots (round-robin, plus one per task on
//! probation), each holding at most one live host, started lazily with
//! backoff after crashes in a row.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use super::{Call, CallError, Supervisor, quarantine::Standing};
use crate::{
    backoff::Policy,
    error::PluginError,
    plugins::{
        LibraryInfo,
        files::{self, Fingerprint, SnapshotError},
        host_process::Host,
    },
};

/// The wait before starting a slot's host again after its second crash in
/// a row, and on (no jitter: one slot, one waiter).
const RESPAWN: Policy = Policy::new(Duration::from_millis(50), Duration::from_millis(3200));

#[derive(Default)]
pub(super) struct Module {
    /// Held while a build of this module is read and its first host starts.
    pub(super) loading: tokio::sync::Mutex<()>,
    pub(super) current: Mutex<Option<Arc<Build>>>,
    /// The last file state that could not be loaded, and why.
    pub(super) failed: Mutex<Option<(Fingerprint, PluginError)>>,
}

/// One loaded build of a library, and its hosts.
pub(super) struct Build {
    pub(super) module: String,
    pub(super) fingerprint: Mutex<Fingerprint>,
    pub(super) sha256: String,
    pub(super) copy: PathBuf,
    pub(super) info: LibraryInfo,
    pub(super) slots: Vec<Slot>,
    pub(super) next_slot: AtomicUsize,
    /// A host of its own for each task on probation, so that a task
    /// suspected of crashing its host crashes only its own runs, and the
    /// tasks beside it prove themselves clean.
    pub(super) probation: Mutex<HashMap<String, Arc<Slot>>>,
    /// Set when a newer build replaced it and its copy was removed: a call
    /// that picked it just before then moves on to the current build
    /// instead of starting a host from a file that is gone.
    pub(super) retired: AtomicBool,
}

#[derive(Default)]
pub(super) struct Slot {
    pub(super) host: Mutex<Option<Arc<Host>>>,
    /// Held while a host for this slot starts.
    pub(super) starting: tokio::sync::Mutex<()>,
    /// This slot's hosts that crashed since one last answered a run
    /// cleanly, for the respawn backoff; shared with its host.
    pub(super) crashes_in_a_row: Arc<AtomicUsize>,
}

impl Supervisor {
    pub(super) fn module(&self, name: &str) -> Arc<Module> {
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
    pub(super) async fn build(&self, name: &str) -> Result<Arc<Build>, PluginError> {
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

    pub(super) fn failed(
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
    pub(super) async fn host_for(
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
    pub(super) async fn host(
        &self,
        build: &Arc<Build>,
        slot: &Slot,
    ) -> Result<Arc<Host>, PluginError> {
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
            let doublings = u32::try_from(in_a_row - 2).unwrap_or(u32::MAX);
            tokio::time::sleep(RESPAWN.step(doublings)).await;
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
}

impl Build {
    pub(super) fn retire_all(&self, grace: Duration) {
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
