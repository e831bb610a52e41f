//! The plugin loader: finds, loads and caches plugin libraries and task
//! instances. The only module that calls into `plugin_api::host`.
//!
//! - Module `M` lives in `<dir>/libM.so` (the platform's library naming);
//!   module and func names must match `^[A-Za-z0-9_]+$`, so no row can point
//!   outside the directory.
//! - A library is loaded at first use from a *private copy* in a temporary
//!   directory. Copying means an install that rewrites the file in place
//!   (`cp new.so plugins/libM.so`) never touches mapped code, and the
//!   dynamic loader, which reuses a library already open under the same path,
//!   really loads each new build.
//! - Every lookup compares the file's metadata with the loaded build's; a
//!   changed file is loaded afresh for new runs. Old builds stay mapped (a
//!   Rust library cannot be unloaded safely), and runs already holding their
//!   instances finish on them.
//! - Load failures are cached per build, so a corrupt file is not re-read on
//!   every call, and reported only to the tasks that use it.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use plugin_api::host::{Library, TaskHandle};
use uuid::Uuid;

use crate::{error::PluginError, registry::TaskDef};

/// The file name the platform gives the library of `module`.
pub fn library_file_name(module: &str) -> String {
    format!(
        "{}{module}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// Checks a module or func name against `^[A-Za-z0-9_]+$`.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), PluginError> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Ok(())
    } else {
        Err(PluginError::InvalidName {
            what,
            name: name.to_owned(),
        })
    }
}

/// What identifies one build of a library file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
    ctime: (i64, i64),
}

impl Fingerprint {
    fn of(meta: &fs::Metadata) -> Self {
        Fingerprint {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// One loaded build of a library.
#[derive(Debug)]
pub struct Loaded {
    /// The loaded library.
    pub library: Library,
    /// The file in the plugins directory it was copied from.
    pub path: PathBuf,
    /// Distinguishes builds of the same module; never reused.
    generation: u64,
}

/// A library, or why it could not be loaded.
pub type LoadResult = Result<Arc<Loaded>, PluginError>;

struct LibEntry {
    fingerprint: Fingerprint,
    loaded: Result<Arc<Loaded>, PluginError>,
}

struct Instance {
    form: Uuid,
    generation: u64,
    func: String,
    config: serde_json::Value,
    handle: Arc<TaskHandle>,
}

/// The plugin loader; share it behind an `Arc`.
pub struct Plugins {
    dir: PathBuf,
    private: tempfile::TempDir,
    libs: Mutex<HashMap<String, LibEntry>>,
    /// Serialises loads so two runs never load the same build twice.
    load_lock: Mutex<()>,
    instances: Mutex<HashMap<Uuid, Instance>>,
    /// Serialises task creation (see [`Plugins::instance`]).
    create_lock: Mutex<()>,
    generations: AtomicU64,
}

impl std::fmt::Debug for Plugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugins").field("dir", &self.dir).finish()
    }
}

impl Plugins {
    /// A loader for the libraries in `dir`; private copies go to a new
    /// temporary directory, removed when the loader is dropped.
    pub fn new(dir: impl Into<PathBuf>) -> std::io::Result<Plugins> {
        Ok(Plugins {
            dir: dir.into(),
            private: tempfile::Builder::new()
                .prefix("daisy-plugins-")
                .tempdir()?,
            libs: Mutex::default(),
            load_lock: Mutex::default(),
            instances: Mutex::default(),
            create_lock: Mutex::default(),
            generations: AtomicU64::new(1),
        })
    }

    /// The current build of `module`, loading it if the file is new or changed.
    /// Blocking: it may copy and load a library.
    pub fn library(&self, module: &str) -> Result<Arc<Loaded>, PluginError> {
        validate_name("module", module)?;
        let path = self.dir.join(library_file_name(module));
        let fingerprint = match fs::metadata(&path) {
            Ok(meta) => Fingerprint::of(&meta),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(PluginError::NotFound {
                    module: module.to_owned(),
                    path,
                });
            }
            Err(err) => {
                return Err(PluginError::Load {
                    module: module.to_owned(),
                    reason: format!("reading '{}': {err}", path.display()),
                });
            }
        };
        if let Some(found) = self.cached(module, fingerprint) {
            return found;
        }
        let _loading = self.load_lock.lock().expect("plugin load lock poisoned");
        if let Some(found) = self.cached(module, fingerprint) {
            return found;
        }
        let loaded = self.load(module, &path).map(Arc::new);
        match &loaded {
            Ok(lib) => tracing::info!(
                plugin.module = module,
                plugin.path = %path.display(),
                plugin.version = lib.library.version(),
                "loaded plugin library"
            ),
            Err(err) => {
                tracing::warn!(plugin.module = module, error = %err, "plugin library failed to load")
            }
        }
        self.libs.lock().expect("plugin cache poisoned").insert(
            module.to_owned(),
            LibEntry {
                fingerprint,
                loaded: loaded.clone(),
            },
        );
        loaded
    }

    fn cached(
        &self,
        module: &str,
        fingerprint: Fingerprint,
    ) -> Option<Result<Arc<Loaded>, PluginError>> {
        let libs = self.libs.lock().expect("plugin cache poisoned");
        libs.get(module)
            .filter(|entry| entry.fingerprint == fingerprint)
            .map(|entry| entry.loaded.clone())
    }

    fn load(&self, module: &str, path: &Path) -> Result<Loaded, PluginError> {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let copy = self
            .private
            .path()
            .join(format!("{generation}-{}", library_file_name(module)));
        let load_error = |reason: String| PluginError::Load {
            module: module.to_owned(),
            reason,
        };
        fs::copy(path, &copy)
            .map_err(|err| load_error(format!("copying '{}': {err}", path.display())))?;
        let library = Library::load(&copy);
        // The mapping outlives the file; removing it now leaves nothing behind.
        let _ = fs::remove_file(&copy);
        let library = library.map_err(|err| {
            // Name the file the operator installed, not our private copy.
            load_error(
                err.to_string()
                    .replace(&copy.display().to_string(), &path.display().to_string()),
            )
        })?;
        Ok(Loaded {
            library,
            path: path.to_owned(),
            generation,
        })
    }

    /// The instance of `task` for the current build of its library, created
    /// from its config when the build, func or config changed. Blocking: it
    /// may load a library and runs the plugin's constructor.
    pub fn instance(&self, task: &TaskDef) -> Result<Arc<TaskHandle>, PluginError> {
        validate_name("func", &task.func)?;
        let loaded = self.library(&task.module)?;
        let cached = || {
            let instances = self.instances.lock().expect("instance cache poisoned");
            instances
                .get(&task.id)
                .filter(|i| {
                    i.generation == loaded.generation
                        && i.func == task.func
                        && i.config == task.config
                })
                .map(|i| i.handle.clone())
        };
        if let Some(handle) = cached() {
            return Ok(handle);
        }
        // One creation at a time, so concurrent first runs share one instance
        // (and its token cache, its connections) instead of each making one.
        let _creating = self.create_lock.lock().expect("create lock poisoned");
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
                    generation: loaded.generation,
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
        self.instances
            .lock()
            .expect("instance cache poisoned")
            .retain(|_, instance| instance.form != form);
    }

    /// Every library file in the directory, in name order, with its load result.
    /// Used by `daisy plugin list`.
    pub fn scan(&self) -> std::io::Result<Vec<(String, LoadResult)>> {
        let (prefix, suffix) = (std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
        let mut modules: Vec<String> = fs::read_dir(&self.dir)?
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let module = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
                validate_name("module", module).ok()?;
                Some(module.to_owned())
            })
            .collect();
        modules.sort();
        Ok(modules
            .into_iter()
            .map(|m| {
                let loaded = self.library(&m);
                (m, loaded)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_the_directory_are_refused() {
        for bad in ["", "../etc", "a/b", "a.b", "lib echo", "échο", "a\0b"] {
            assert!(validate_name("module", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["echo", "Sheets_2", "_x"] {
            assert!(validate_name("module", good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn missing_library_names_module_and_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plugins = Plugins::new(dir.path()).expect("loader");
        let err = plugins.library("nope").expect_err("no such library");
        let message = err.to_string();
        assert!(message.contains("'nope'"), "{message}");
        assert!(message.contains(&library_file_name("nope")), "{message}");
    }
}
