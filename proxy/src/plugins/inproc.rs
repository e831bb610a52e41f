//! In-process plugins: libraries loaded into `daisy serve` or `daisy worker`
//! itself, for tasks that opt in with `isolation = 'in_process'` (trusted,
//! latency-critical plugins). A crash here takes the whole process down;
//! that is the price of the opt-in.
//!
//! - A library is loaded at first use from a private copy (see
//!   [`super::files`]), so a file still being written is never loaded and
//!   the dynamic loader, which reuses a library already open under the
//!   same path, really loads each new build.
//! - Every lookup compares the file's fingerprint with the loaded build's;
//!   a changed, complete file is loaded afresh for new runs, while an
//!   incomplete one leaves the current build serving. Old builds stay
//!   mapped (a Rust library cannot be unloaded safely), and runs already
//!   holding their instances finish on them.
//! - Load failures are cached per file state, and reported only to the
//!   tasks that use that library.
//! - Locks are per module (loading) and per task (creating), so one
//!   library's slow initialiser or constructor never delays another's.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use plugin_api::host::{Library, TaskHandle};
use uuid::Uuid;

use super::files::{self, AllowList, Copies, Fingerprint, SnapshotError};
use crate::{error::PluginError, registry::TaskDef};

/// One loaded build of a library.
#[derive(Debug)]
pub struct Loaded {
    /// The loaded library.
    pub library: Library,
    /// The file in the plugins directory it was copied from.
    pub path: PathBuf,
    /// Its contents' SHA-256.
    pub sha256: String,
}

struct LibEntry {
    fingerprint: Fingerprint,
    loaded: Result<Arc<Loaded>, PluginError>,
}

struct Instance {
    form: Uuid,
    build: String,
    func: String,
    config: serde_json::Value,
    handle: Arc<TaskHandle>,
}

/// The in-process loader; share it behind an `Arc`.
pub struct InProcess {
    dir: PathBuf,
    copies: Copies,
    libs: Mutex<HashMap<String, LibEntry>>,
    /// One lock per module, held while that module's library loads.
    loading: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    instances: Mutex<HashMap<Uuid, Instance>>,
    /// One lock per task, held while its instance is created.
    creating: Mutex<HashMap<Uuid, Arc<Mutex<()>>>>,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess").field("dir", &self.dir).finish()
    }
}

fn lock_for<K: std::hash::Hash + Eq + Clone>(
    locks: &Mutex<HashMap<K, Arc<Mutex<()>>>>,
    key: &K,
) -> Arc<Mutex<()>> {
    locks
        .lock()
        .expect("lock table poisoned")
        .entry(key.clone())
        .or_default()
        .clone()
}

impl InProcess {
    /// A loader for the libraries in `dir`.
    pub fn new(dir: impl Into<PathBuf>, allowed: AllowList) -> std::io::Result<InProcess> {
        Ok(InProcess {
            dir: dir.into(),
            copies: Copies::new(allowed)?,
            libs: Mutex::default(),
            loading: Mutex::default(),
            instances: Mutex::default(),
            creating: Mutex::default(),
        })
    }

    /// The current build of `module`, loading it if the file is new or
    /// changed. Blocking: it may copy and load a library.
    pub fn library(&self, module: &str) -> Result<Arc<Loaded>, PluginError> {
        let (path, fingerprint) = files::fingerprint(&self.dir, module)?;
        let cached = self.cached(module);
        if let Some(entry) = cached.as_ref().filter(|(f, _)| *f == fingerprint) {
            return entry.1.clone();
        }
        let lock = lock_for(&self.loading, &module.to_owned());
        let _loading = lock.lock().expect("load lock poisoned");
        let current = self.cached(module);
        if let Some(entry) = current.as_ref().filter(|(f, _)| *f == fingerprint) {
            return entry.1.clone();
        }
        let serving = current.and_then(|(_, loaded)| loaded.ok());
        let started = Instant::now();
        let snapshot = loop {
            let serving_sha = serving.as_ref().map(|l| l.sha256.as_str());
            match self.copies.snapshot(module, &path, serving_sha) {
                Ok(snapshot) => break snapshot,
                Err(SnapshotError::Unchanged(fingerprint)) => {
                    let same = serving.expect("unchanged from the serving build");
                    self.remember(module, fingerprint, Ok(same.clone()));
                    return Ok(same);
                }
                // The current build keeps serving until the new one is whole.
                Err(SnapshotError::Incomplete(_)) if serving.is_some() => {
                    return Ok(serving.expect("checked"));
                }
                Err(SnapshotError::Incomplete(why)) => {
                    if started.elapsed() > Duration::from_secs(2) {
                        return Err(PluginError::Load {
                            module: module.to_owned(),
                            reason: format!("{why}; is it still being written?"),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(25));
                }
                Err(SnapshotError::Failed(err)) => {
                    self.remember(module, fingerprint, Err(err.clone()));
                    return Err(err);
                }
            }
        };
        let library = Library::load(&snapshot.copy);
        // The mapping outlives the file; removing it now leaves nothing behind.
        let _ = std::fs::remove_file(&snapshot.copy);
        let loaded = library
            .map(|library| {
                Arc::new(Loaded {
                    library,
                    path: path.clone(),
                    sha256: snapshot.sha256,
                })
            })
            .map_err(|err| PluginError::Load {
                module: module.to_owned(),
                // Name the file the operator installed, not our private copy.
                reason: err.to_string().replace(
                    &snapshot.copy.display().to_string(),
                    &path.display().to_string(),
                ),
            });
        match &loaded {
            Ok(lib) => tracing::info!(
                plugin.module = module,
                plugin.path = %path.display(),
                plugin.version = lib.library.version(),
                "loaded plugin library in-process"
            ),
            Err(err) => {
                tracing::warn!(plugin.module = module, error = %err, "plugin library failed to load")
            }
        }
        self.remember(module, snapshot.fingerprint, loaded.clone());
        loaded
    }

    fn cached(&self, module: &str) -> Option<(Fingerprint, Result<Arc<Loaded>, PluginError>)> {
        let libs = self.libs.lock().expect("plugin cache poisoned");
        libs.get(module)
            .map(|entry| (entry.fingerprint, entry.loaded.clone()))
    }

    fn remember(
        &self,
        module: &str,
        fingerprint: Fingerprint,
        loaded: Result<Arc<Loaded>, PluginError>,
    ) {
        self.libs.lock().expect("plugin cache poisoned").insert(
            module.to_owned(),
            LibEntry {
                fingerprint,
                loaded,
            },
        );
    }

    /// The instance of `task` for the current build of its library, created
    /// from its config when the build, func or config changed. Blocking: it
    /// may load a library and runs the plugin's constructor.
    pub fn instance(&self, task: &TaskDef) -> Result<Arc<TaskHandle>, PluginError> {
        files::validate_name("func", &task.func)?;
        let loaded = self.library(&task.module)?;
        let cached = || {
            let instances = self.instances.lock().expect("instance cache poisoned");
            instances
                .get(&task.id)
                .filter(|i| {
                    i.build == loaded.sha256 && i.func == task.func && i.config == task.config
                })
                .map(|i| i.handle.clone())
        };
        if let Some(handle) = cached() {
            return Ok(handle);
        }
        // One creation per task at a time, so concurrent first runs share
        // one instance (and its token cache, its connections).
        let lock = lock_for(&self.creating, &task.id);
        let _creating = lock.lock().expect("create lock poisoned");
        if let Some(handle) = cached() {
            return Ok(handle);
        }
        if !loaded.library.tasks().any(|t| t == task.func) {
            return Err(PluginError::NoSuchTask {
                module: task.module.clone(),
                path: loaded.path.clone(),
                func: task.func.clone(),
                available: loaded.library.tasks().map(str::to_owned).collect(),
            });
        }
        let handle = loaded
            .library
            .instantiate(&task.func, &task.config.to_string())
            .map(Arc::new)
            .map_err(|err| PluginError::Create {
                module: task.module.clone(),
                func: task.func.clone(),
                reason: err.to_string(),
            })?;
        self.instances
            .lock()
            .expect("instance cache poisoned")
            .insert(
                task.id,
                Instance {
                    form: task.form_id,
                    build: loaded.sha256.clone(),
                    func: task.func.clone(),
                    config: task.config.clone(),
                    handle: handle.clone(),
                },
            );
        Ok(handle)
    }

    /// Forgets the instances of `form`'s tasks (its tasks changed), so
    /// detached tasks do not pile up.
    pub fn forget_form(&self, form: Uuid) {
        let mut instances = self.instances.lock().expect("instance cache poisoned");
        let gone: Vec<Uuid> = instances
            .iter()
            .filter(|(_, i)| i.form == form)
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            instances.remove(id);
        }
        drop(instances);
        let mut creating = self.creating.lock().expect("lock table poisoned");
        for id in gone {
            creating.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_names_module_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plugins = InProcess::new(dir.path(), AllowList::any()).expect("loader");
        let err = plugins.library("nope").expect_err("no such library");
        let message = err.to_string();
        assert!(message.contains("'nope'"), "{message}");
        assert!(
            message.contains(&files::library_file_name("nope")),
            "{message}"
        );
    }
}
