//! Which library files Daisy trusts: owned by its user or root, writable by
//! no one else, not a symlink out of the plugins directory, and (with
//! `--plugin-sha256`) a listed build.

use std::{collections::HashSet, fs, os::unix::fs::MetadataExt, path::Path, sync::Arc};

/// Which builds may be loaded: `--plugin-sha256 FILE`, one SHA-256 (hex) per
/// line, as `sha256sum` prints them (anything after the hash is ignored).
#[derive(Debug, Clone, Default)]
pub struct AllowList(Option<Arc<HashSet<String>>>);

impl AllowList {
    /// Every build that passes the file checks.
    pub fn any() -> AllowList {
        AllowList(None)
    }

    /// Only the builds listed in `path`.
    pub fn from_file(path: &Path) -> std::io::Result<AllowList> {
        let text = fs::read_to_string(path)?;
        let hashes = text
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|hash| !hash.starts_with('#'))
            .map(str::to_ascii_lowercase)
            .collect();
        Ok(AllowList(Some(Arc::new(hashes))))
    }

    pub(super) fn admits(&self, sha256: &str) -> bool {
        self.0.as_ref().is_none_or(|hashes| hashes.contains(sha256))
    }
}

/// Whether `meta` belongs to Daisy's user or root; if not, why not.
pub fn owned_by_daisy(meta: &fs::Metadata) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() == me || meta.uid() == 0 {
        Ok(())
    } else {
        Err(format!(
            "it belongs to uid {}, neither Daisy's user (uid {me}) nor root",
            meta.uid()
        ))
    }
}

/// Daisy trusts a library file only as sshd trusts `authorized_keys`: the
/// plugins directory and the file must belong to Daisy's user or root and
/// be writable by no one else, and a symlink must not lead out of the
/// directory. `path` is `dir`'s library file; `opened` is the metadata of
/// the descriptor that is read.
pub(super) fn check_trusted(dir: &Path, path: &Path, opened: &fs::Metadata) -> Result<(), String> {
    let trusted = |what: &str, shown: &Path, meta: &fs::Metadata| {
        owned_by_daisy(meta)
            .map_err(|owner| format!("refusing {what} '{}': {owner}", shown.display()))?;
        if meta.mode() & 0o022 != 0 {
            return Err(format!(
                "refusing {what} '{}': it is writable by {} (mode {:o}); `chmod go-w` it",
                shown.display(),
                if meta.mode() & 0o002 != 0 {
                    "anyone"
                } else {
                    "its group"
                },
                meta.mode() & 0o7777
            ));
        }
        Ok(())
    };
    let dir_meta =
        fs::metadata(dir).map_err(|err| format!("reading '{}': {err}", dir.display()))?;
    trusted("the plugins directory", dir, &dir_meta)?;
    let link =
        fs::symlink_metadata(path).map_err(|err| format!("reading '{}': {err}", path.display()))?;
    if link.file_type().is_symlink() {
        let target = fs::canonicalize(path)
            .map_err(|err| format!("resolving '{}': {err}", path.display()))?;
        let home =
            fs::canonicalize(dir).map_err(|err| format!("resolving '{}': {err}", dir.display()))?;
        if target.parent() != Some(home.as_path()) {
            return Err(format!(
                "refusing '{}': it is a symlink to '{}', outside the plugins directory",
                path.display(),
                target.display()
            ));
        }
    }
    if !opened.is_file() {
        return Err(format!("refusing '{}': not a regular file", path.display()));
    }
    trusted("the library", path, opened)
}
