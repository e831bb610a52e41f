//! Library files: names, builds, and private copies that are never loaded
//! half-written.
//!
//! The plugins directory is the trust boundary. Module names match
//! `^[A-Za-z0-9_]+$`, so no task row can point outside it. A library is
//! never loaded from the directory itself: it is read once through one file
//! descriptor, streamed into a private copy and its hash, checked for
//! completeness, and the copy is checked again before anything loads it. A
//! file that `cp` is still writing fails the completeness check, and
//! whoever asked keeps using the build it already has. The completeness
//! check (ELF headers, segments and section table within the file) is
//! `elf`; which files and builds Daisy trusts at all is `trust`.

use std::{
    fs,
    io::Write,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::SystemTime,
};

use sha2::{Digest, Sha256};

use crate::error::PluginError;

mod elf;
mod trust;

pub use elf::check_file_complete;
use trust::check_trusted;
pub use trust::{AllowList, owned_by_daisy};

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

/// What identifies one state of a library file; any write, `touch` or
/// rename changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
    ctime: (i64, i64),
}

impl Fingerprint {
    /// The fingerprint of `meta`.
    pub fn of(meta: &fs::Metadata) -> Self {
        Fingerprint {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            modified: meta.modified().ok(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The current fingerprint of module `module`'s file in `dir`.
pub fn fingerprint(dir: &Path, module: &str) -> Result<(PathBuf, Fingerprint), PluginError> {
    validate_name("module", module)?;
    let path = dir.join(library_file_name(module));
    match fs::metadata(&path) {
        Ok(meta) => Ok((path, Fingerprint::of(&meta))),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err(PluginError::NotFound {
            module: module.to_owned(),
            path,
        }),
        Err(err) => Err(PluginError::Load {
            module: module.to_owned(),
            reason: format!("reading '{}': {err}", path.display()),
        }),
    }
}

/// A complete, private copy of one build of a library.
#[derive(Debug)]
pub struct Snapshot {
    /// The private copy, safe to load.
    pub copy: PathBuf,
    /// The installed file's fingerprint when it was read.
    pub fingerprint: Fingerprint,
    /// SHA-256 of the contents, in hex: the build's identity.
    pub sha256: String,
}

/// Why a snapshot could not be taken.
#[derive(Debug)]
pub enum SnapshotError {
    /// The file is still being written (or was left truncated): try later.
    Incomplete(String),
    /// The file cannot be used.
    Failed(PluginError),
    /// The contents are those of the build already serving (a `touch`, or
    /// the same file copied again): nothing was copied.
    Unchanged(Fingerprint),
}

/// Private copies of library files, in a temporary directory removed when
/// this is dropped.
#[derive(Debug)]
pub struct Copies {
    dir: tempfile::TempDir,
    next: AtomicU64,
    allowed: AllowList,
}

impl Copies {
    /// A new directory for private copies of the builds `allowed` admits.
    pub fn new(allowed: AllowList) -> std::io::Result<Copies> {
        Ok(Copies {
            dir: tempfile::Builder::new()
                .prefix("daisy-plugins-")
                .tempdir()?,
            next: AtomicU64::new(1),
            allowed,
        })
    }

    /// Opens `path` (module `module`'s library) once, checks that Daisy may
    /// trust it, reads it through that one descriptor, checks that it is
    /// complete and was not changing meanwhile, and writes a private copy,
    /// unless its contents hash to `serving` (the build already in use).
    pub fn snapshot(
        &self,
        module: &str,
        path: &Path,
        serving: Option<&str>,
    ) -> Result<Snapshot, SnapshotError> {
        let failed = |reason: String| {
            SnapshotError::Failed(PluginError::Load {
                module: module.to_owned(),
                reason,
            })
        };
        let mut file = fs::File::open(path)
            .map_err(|err| failed(format!("opening '{}': {err}", path.display())))?;
        let copy = self.dir.path().join(format!(
            "{}-{}",
            self.next.fetch_add(1, Ordering::Relaxed),
            library_file_name(module)
        ));
        let written = self.write_copy(&mut file, path, &copy, serving, failed);
        if written.is_err() {
            let _ = fs::remove_file(&copy);
        }
        let (fingerprint, sha256) = written?;
        Ok(Snapshot {
            copy,
            fingerprint,
            sha256,
        })
    }
}

impl Copies {
    /// [`Copies::snapshot`]'s copy: `file` streams through a small buffer
    /// into `copy` and its hash (a library of some MiB never sits in memory,
    /// where it would stay in the process's peak resident memory), then the
    /// checks; the copy is read back and hashed again. Returns the file's
    /// fingerprint and SHA-256; the caller removes the copy on an error.
    fn write_copy(
        &self,
        file: &mut fs::File,
        path: &Path,
        copy: &Path,
        serving: Option<&str>,
        failed: impl Fn(String) -> SnapshotError,
    ) -> Result<(Fingerprint, String), SnapshotError> {
        let reading = |err: std::io::Error| failed(format!("reading '{}': {err}", path.display()));
        let copying = |err: std::io::Error| failed(format!("copying '{}': {err}", path.display()));
        let before = file.metadata().map_err(reading)?;
        let out = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(copy)
            .map_err(copying)?;
        let mut tee = Tee {
            out: &out,
            hasher: Sha256::new(),
        };
        let len = std::io::copy(file, &mut tee).map_err(copying)?;
        let after = file.metadata().map_err(reading)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        check_trusted(dir, path, &after).map_err(&failed)?;
        let fingerprint = Fingerprint::of(&before);
        if fingerprint != Fingerprint::of(&after) || len != after.len() {
            return Err(SnapshotError::Incomplete(format!(
                "'{}' changed while it was read",
                path.display()
            )));
        }
        check_file_complete(&out, len).map_err(|why| {
            SnapshotError::Incomplete(format!("'{}' is incomplete: {why}", path.display()))
        })?;
        let sha256 = hex(&tee.hasher.finalize());
        if serving == Some(sha256.as_str()) {
            return Err(SnapshotError::Unchanged(fingerprint));
        }
        if !self.allowed.admits(&sha256) {
            return Err(failed(format!(
                "refusing '{}': its build (sha256 {sha256}) is not in the --plugin-sha256 allow-list",
                path.display()
            )));
        }
        out.sync_data().map_err(copying)?;
        drop(out);
        // Check the copy as the loader will see it.
        let copied = fs::File::open(copy).and_then(|mut copied| {
            let mut hasher = Sha256::new();
            std::io::copy(&mut copied, &mut hasher)?;
            Ok(hex(&hasher.finalize()))
        });
        if copied.ok().as_deref() != Some(sha256.as_str()) {
            return Err(failed(format!(
                "the private copy of '{}' differs from what was read",
                path.display()
            )));
        }
        Ok((fingerprint, sha256))
    }
}

/// Writes to a file and a hash at once.
struct Tee<'a> {
    out: &'a fs::File,
    hasher: Sha256,
}

impl Write for Tee<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
    fn snapshot_refuses_a_truncated_file_and_copies_a_whole_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let copies = Copies::new(AllowList::any()).expect("copies");
        let whole = fs::read(std::env::current_exe().expect("test binary")).expect("reading");
        let path = dir.path().join("libx.so");
        fs::write(&path, &whole[..whole.len() / 3]).expect("writing");
        assert!(matches!(
            copies.snapshot("x", &path, None),
            Err(SnapshotError::Incomplete(_))
        ));
        fs::write(&path, &whole).expect("writing");
        let snapshot = copies.snapshot("x", &path, None).expect("a whole file");
        assert_eq!(fs::read(&snapshot.copy).expect("copy"), whole);
        assert_eq!(snapshot.sha256.len(), 64);
    }

    #[test]
    fn the_same_contents_again_make_no_copy_and_the_allow_list_is_enforced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let whole = fs::read(std::env::current_exe().expect("test binary")).expect("reading");
        let path = dir.path().join("libx.so");
        fs::write(&path, &whole).expect("writing");
        let copies = Copies::new(AllowList::any()).expect("copies");
        let first = copies.snapshot("x", &path, None).expect("copied");
        let copied = || fs::read_dir(copies.dir.path()).expect("copies").count();
        assert_eq!(copied(), 1);
        // A `touch`: new metadata, same contents.
        let file = fs::File::options().append(true).open(&path).expect("open");
        file.set_modified(SystemTime::now() + std::time::Duration::from_secs(5))
            .expect("touch");
        assert!(matches!(
            copies.snapshot("x", &path, Some(&first.sha256)),
            Err(SnapshotError::Unchanged(_))
        ));
        assert_eq!(copied(), 1, "a touch made a new copy");

        let list = dir.path().join("allowed.txt");
        fs::write(&list, format!("{}  libx.so\n", "0".repeat(64))).expect("list");
        let strict = Copies::new(AllowList::from_file(&list).expect("list")).expect("copies");
        let Err(SnapshotError::Failed(err)) = strict.snapshot("x", &path, None) else {
            panic!("a build outside the allow-list was copied");
        };
        assert!(err.to_string().contains("allow-list"), "{err}");
        fs::write(&list, format!("{}  libx.so\n", first.sha256)).expect("list");
        let listed = Copies::new(AllowList::from_file(&list).expect("list")).expect("copies");
        listed.snapshot("x", &path, None).expect("a listed build");
    }
}
