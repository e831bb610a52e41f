//! The host side: loading a plugin library and running its tasks.
//!
//! Daisy's plugin loader is the only user. Each library is loaded on its own
//! with `lib_header_from_path` + `init_root_module` (never
//! `RootModule::load_from*`, which caches one library per interface type,
//! abi_stable issue #92). A loaded library is never unloaded: task objects
//! point into its code, and unloading Rust libraries is not safe.

use std::path::{Path, PathBuf};

use abi_stable::{
    library::{LibraryError, RootModule, lib_header_from_path},
    std_types::{RErr, ROk, RStr},
};

use crate::{
    TaskError, Value,
    ffi::{ErrorKind, FfiError, FfiInput, FfiRunMore, PluginModRef, TaskBaseBox, v1_0},
};

/// Why a library could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The dynamic loader refused the file (missing, not a library, corrupt).
    #[error("cannot open plugin library '{path}': {reason}")]
    Open {
        /// The library file.
        path: PathBuf,
        /// What the dynamic loader said.
        reason: String,
    },
    /// The file is a library, but exports no Daisy plugin.
    #[error("'{path}' is not a Daisy plugin: it exports no plugin header")]
    NotAPlugin {
        /// The library file.
        path: PathBuf,
    },
    /// Built against an incompatible plugin-api.
    #[error(
        "'{path}' was built against plugin-api {library}, but this Daisy uses plugin-api {host}; rebuild the plugin against plugin-api {host}"
    )]
    IncompatibleVersion {
        /// The library file.
        path: PathBuf,
        /// The plugin-api version the library was built against.
        library: String,
        /// The plugin-api version of this host.
        host: String,
    },
    /// Same version, but the interface's types differ (a mismatched build).
    #[error(
        "'{path}' (plugin-api {library}) does not match this Daisy's plugin-api {host} interface layout: {detail}"
    )]
    IncompatibleLayout {
        /// The library file.
        path: PathBuf,
        /// The plugin-api version the library was built against.
        library: String,
        /// The plugin-api version of this host.
        host: String,
        /// abi_stable's description of the difference.
        detail: String,
    },
    /// The library's root module failed to initialise.
    #[error("plugin '{path}' failed to initialise: {reason}")]
    Init {
        /// The library file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// A loaded plugin library.
#[derive(Clone, Copy)]
pub struct Library {
    module: Module,
    api_version: &'static str,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("name", &self.name())
            .field("version", &self.version())
            .field("api_version", &self.api_version)
            .finish()
    }
}

/// Whether a library built against plugin-api `library` can be loaded by
/// this host: same major version, and for `0.x` the same minor.
fn compatible(library: &str, host: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut parts = v.split('.');
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    };
    match (parse(library), parse(host)) {
        (Some((lmaj, lmin)), Some((hmaj, hmin))) => lmaj == hmaj && (hmaj != 0 || lmin == hmin),
        _ => false,
    }
}

/// A library's root module, as the minor it was built against laid it out.
#[derive(Clone, Copy)]
enum Module {
    Current(PluginModRef),
    V1_0(v1_0::PluginModRef),
}

/// Whether `version` is a 1.0.x: loaded through [`v1_0`]'s layout.
fn is_v1_0(version: &str) -> bool {
    let mut parts = version.split('.');
    parts.next() == Some("1") && parts.next() == Some("0")
}

impl Library {
    /// Loads the library at `path`, checking its interface version and layout.
    ///
    /// Loading runs the library's native initialisers: only load files from a
    /// directory you trust. The library stays mapped for the life of the
    /// process, so load a private copy if the file may be rewritten in place.
    pub fn load(path: &Path) -> Result<Library, LoadError> {
        let header = lib_header_from_path(path).map_err(|err| match err {
            LibraryError::OpenError { err, .. } => LoadError::Open {
                path: path.to_owned(),
                reason: err.to_string(),
            },
            LibraryError::GetSymbolError { .. } => LoadError::NotAPlugin {
                path: path.to_owned(),
            },
            other => LoadError::Init {
                path: path.to_owned(),
                reason: other.to_string(),
            },
        })?;
        let library = header.version_strings().version.as_str();
        let host = <PluginModRef as RootModule>::VERSION_STRINGS
            .version
            .as_str();
        if !compatible(library, host) {
            return Err(LoadError::IncompatibleVersion {
                path: path.to_owned(),
                library: library.to_owned(),
                host: host.to_owned(),
            });
        }
        let layout_error = |err: LibraryError| match err {
            LibraryError::AbiInstability(detail) => LoadError::IncompatibleLayout {
                path: path.to_owned(),
                library: library.to_owned(),
                host: host.to_owned(),
                detail: detail.to_string(),
            },
            LibraryError::IncompatibleVersionNumber { .. } => LoadError::IncompatibleVersion {
                path: path.to_owned(),
                library: library.to_owned(),
                host: host.to_owned(),
            },
            other => LoadError::Init {
                path: path.to_owned(),
                reason: other.to_string(),
            },
        };
        let module = if is_v1_0(library) {
            Module::V1_0(
                header
                    .init_root_module::<v1_0::PluginModRef>()
                    .map_err(layout_error)?,
            )
        } else {
            Module::Current(
                header
                    .init_root_module::<PluginModRef>()
                    .map_err(layout_error)?,
            )
        };
        Ok(Library {
            module,
            api_version: library,
        })
    }

    /// The plugin crate's name.
    pub fn name(&self) -> &'static str {
        match self.module {
            Module::Current(m) => m.name().as_str(),
            Module::V1_0(m) => m.name().as_str(),
        }
    }

    /// The plugin crate's version.
    pub fn version(&self) -> &'static str {
        match self.module {
            Module::Current(m) => m.version().as_str(),
            Module::V1_0(m) => m.version().as_str(),
        }
    }

    /// The plugin-api version the library was built against.
    pub fn api_version(&self) -> &'static str {
        self.api_version
    }

    /// The names of the tasks the library exports.
    pub fn tasks(&self) -> impl Iterator<Item = &'static str> {
        let tasks = match self.module {
            Module::Current(m) => m.tasks(),
            Module::V1_0(m) => m.tasks(),
        };
        tasks.as_slice().iter().map(|t| t.as_str())
    }

    /// The JSON Schema task `func` declares for its config: `None` when the
    /// library was built against plugin-api 1.0, does not export `func`, or
    /// takes an untyped config (a schema that admits anything).
    pub fn config_schema(&self, func: &str) -> Option<Value> {
        let Module::Current(module) = self.module else {
            return None;
        };
        let schema = module.config_schema()?;
        let json = schema(RStr::from(func)).into_option()?;
        let schema: Value = serde_json::from_str(json.as_str()).ok()?;
        let admits_anything = schema == Value::Bool(true)
            || schema
                .as_object()
                .is_some_and(|o| o.keys().all(|k| k.starts_with('$') || k == "title"));
        (!admits_anything).then_some(schema)
    }

    /// Creates task `func` from its JSON config. Runs plugin code.
    pub fn instantiate(&self, func: &str, config: &str) -> Result<TaskHandle, TaskError> {
        let (func, config) = (RStr::from(func), RStr::from(config));
        match self.module {
            Module::Current(m) => match (m.new_task())(func, config) {
                ROk(task) => Ok(TaskHandle(Instance::Current(task))),
                RErr(err) => Err(err.into()),
            },
            Module::V1_0(m) => match (m.new_task())(func, config) {
                ROk(task) => Ok(TaskHandle(Instance::V1_0(task))),
                RErr(err) => Err(err.into()),
            },
        }
    }
}

/// The host's view of one run's input; the submission is already JSON-encoded
/// so that several tasks can share one encoding.
#[derive(Debug, Clone, Copy)]
pub struct RunInput<'a> {
    /// The form's id.
    pub form_id: &'a str,
    /// The submission's id.
    pub submission_id: &'a str,
    /// The submission, JSON-encoded.
    pub submission_json: &'a str,
    /// The attempt number, from 1.
    pub attempt: u32,
    /// The run's id.
    pub run_id: &'a str,
    /// The submission's context, JSON-encoded; empty when there is none.
    pub context_json: &'a str,
}

/// A task instance created by a loaded library.
pub struct TaskHandle(Instance);

enum Instance {
    Current(TaskBaseBox),
    V1_0(v1_0::TaskBaseBox),
}

impl std::fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TaskHandle")
    }
}

impl TaskHandle {
    /// Runs the task. Blocks for as long as the plugin does.
    pub fn run(&self, input: RunInput<'_>) -> Result<Value, TaskError> {
        let json = self.run_json(input)?;
        serde_json::from_str(&json).map_err(|err| {
            TaskError::permanent(format!("plugin returned output that is not JSON: {err}"))
        })
    }

    /// Runs the task and gives its output as the JSON text the plugin
    /// returned, unparsed: for a caller that passes it on as text or parses
    /// it into something other than a [`Value`]. The plugin promised JSON;
    /// whoever parses it must still refuse text that is not. Blocks for as
    /// long as the plugin does.
    pub fn run_json(&self, input: RunInput<'_>) -> Result<String, TaskError> {
        let more = FfiRunMore {
            run_id: input.run_id.into(),
            context_json: input.context_json.into(),
        };
        let input = FfiInput {
            form_id: input.form_id.into(),
            submission_id: input.submission_id.into(),
            submission_json: input.submission_json.into(),
            attempt: input.attempt,
        };
        let ran = match &self.0 {
            Instance::Current(task) => task.run_with(input, more),
            // 1.0 knows nothing of run ids and context.
            Instance::V1_0(task) => task.run(input),
        };
        match ran {
            ROk(json) => Ok(json.into_string()),
            RErr(err) => Err(err.into()),
        }
    }
}

impl From<FfiError> for TaskError {
    fn from(err: FfiError) -> Self {
        TaskError {
            message: err.message.into_string(),
            retryable: err.kind == ErrorKind::Retryable,
            retry_after: (err.retry_after_ms > 0)
                .then(|| std::time::Duration::from_millis(err.retry_after_ms)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::compatible;

    #[test]
    fn compatibility_follows_semver_for_the_interface() {
        assert!(compatible("0.1.0", "0.1.0"));
        assert!(compatible("0.1.3", "0.1.0"));
        assert!(!compatible("0.2.0", "0.1.0"));
        assert!(!compatible("0.0.9", "0.1.0"));
        assert!(compatible("1.4.0", "1.0.0"));
        assert!(!compatible("2.0.0", "1.0.0"));
        assert!(!compatible("garbage", "1.0.0"));
    }
}
