//! A `--secrets-dir` for tests: one file per secret, mode 0600.

use std::{os::unix::fs::PermissionsExt, path::Path};

/// A temporary secrets directory, removed when dropped.
pub struct SecretsDir(tempfile::TempDir);

impl SecretsDir {
    /// A directory holding `secrets` (name, value).
    pub fn new(secrets: &[(&str, &str)]) -> SecretsDir {
        let dir = SecretsDir(tempfile::tempdir().expect("tempdir"));
        for (name, value) in secrets {
            dir.write(name, value);
        }
        dir
    }

    /// Writes (or replaces) secret `name`, mode 0600.
    pub fn write(&self, name: &str, value: &str) {
        let path = self.0.path().join(name);
        std::fs::write(&path, value).expect("writing a secret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    }

    /// The directory, for `--secrets-dir` (or `DAISY_SECRETS_DIR`).
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// The directory as a string, for an environment variable.
    pub fn env_value(&self) -> &str {
        self.0.path().to_str().expect("a UTF-8 temporary path")
    }
}
