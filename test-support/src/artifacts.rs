//! The workspace's build output: the `daisy` binary and the plugin
//! libraries of a [`Profile`] (tests use the debug build, `daisy-bench` the
//! release one), and plugins directories to install the libraries in.

use std::path::{Path, PathBuf};

/// Which of cargo's builds to take binaries and plugin libraries from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Profile {
    /// `target/debug`, built by `cargo build --workspace`: what tests run.
    #[default]
    Debug,
    /// `target/release`, built by `cargo build --release --workspace`: what
    /// `daisy-bench` measures.
    Release,
}

impl Profile {
    /// Where cargo put this build's output.
    pub fn dir(self) -> PathBuf {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
            .join(match self {
                Profile::Debug => "debug",
                Profile::Release => "release",
            })
    }

    /// The built `daisy` binary.
    pub fn daisy_bin(self) -> PathBuf {
        self.built("daisy")
    }

    /// The built library of plugin crate `krate` (its lib name, e.g. `testkit`).
    pub fn built_plugin(self, krate: &str) -> PathBuf {
        self.built(&library_file_name(krate))
    }

    /// `file` in this build's output, which must be there.
    fn built(self, file: &str) -> PathBuf {
        let path = self.dir().join(file);
        let build = match self {
            Profile::Debug => "`cargo build --workspace` (`make test` does)",
            Profile::Release => "`cargo build --release --workspace` (`make bench` does)",
        };
        assert!(
            path.exists(),
            "{} is missing: build it first with {build}",
            path.display()
        );
        path
    }
}

/// The debug build's library of plugin crate `krate` (its lib name, e.g.
/// `testkit`).
pub fn built_plugin(krate: &str) -> PathBuf {
    Profile::Debug.built_plugin(krate)
}

/// The debug build's `daisy` binary.
pub fn daisy_bin() -> PathBuf {
    Profile::Debug.daisy_bin()
}

/// The platform's file name for the library of plugin module `module`.
pub fn library_file_name(module: &str) -> String {
    format!(
        "{}{module}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// A plugins directory of its own.
pub struct PluginsDir(pub tempfile::TempDir);

impl Default for PluginsDir {
    fn default() -> Self {
        Self::new()
    }
}

impl PluginsDir {
    /// An empty plugins directory.
    pub fn new() -> PluginsDir {
        PluginsDir(tempfile::tempdir().expect("creating a plugins directory"))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Installs plugin crate `krate`'s library from the debug build as
    /// module `module`, the way an operator would: `cp` over whatever file is
    /// there.
    pub fn install(&self, krate: &str, module: &str) {
        self.install_built(Profile::Debug, krate, module);
    }

    /// [`PluginsDir::install`] from `profile`'s build.
    pub fn install_built(&self, profile: Profile, krate: &str, module: &str) {
        std::fs::copy(profile.built_plugin(krate), self.module_path(module))
            .expect("installing a plugin");
    }

    /// Where module `module`'s library goes.
    pub fn module_path(&self, module: &str) -> PathBuf {
        self.path().join(library_file_name(module))
    }
}
