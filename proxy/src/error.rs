//! The library's error types.

use std::path::PathBuf;

/// A failure of the task registry (PostgreSQL).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// No connection could be had from the pool in time.
    #[error("task registry unavailable: no database connection")]
    Unavailable(#[source] diesel::r2d2::PoolError),
    /// A direct connection failed.
    #[error("task registry unavailable: cannot connect to the database")]
    Connect(#[source] diesel::ConnectionError),
    /// A query failed.
    #[error("task registry query failed")]
    Query(#[source] diesel::result::Error),
    /// Running the migrations failed.
    #[error("running migrations: {0}")]
    Migration(String),
    /// `task_runs.state` holds a value this build does not know (a newer
    /// build wrote it, or someone edited the table).
    #[error(
        "reading task_runs: unknown run state '{0}' (expected queued, running, succeeded, retrying or dead)"
    )]
    UnknownRunState(String),
}

impl From<diesel::result::Error> for RegistryError {
    /// An unknown run state reaches us as a diesel deserialization error
    /// holding a `RegistryError` (see `RunState`'s `FromSql`), wrapped in
    /// the field's error when it was read as a column: unwrap it, so that it
    /// names the value rather than reading as a failed query.
    fn from(err: diesel::result::Error) -> Self {
        use diesel::result::{DeserializeFieldError, Error};
        if let Error::DeserializationError(inner) = &err {
            let inner = inner
                .downcast_ref::<DeserializeFieldError>()
                .map_or(&**inner, |field| &*field.error);
            if let Some(RegistryError::UnknownRunState(value)) = inner.downcast_ref() {
                return RegistryError::UnknownRunState(value.clone());
            }
        }
        RegistryError::Query(err)
    }
}

impl RegistryError {
    /// Whether the database could not be reached for this call: no
    /// connection could be had, or the one in use was lost under it (closed
    /// by the server or the network, or a command could not be sent).
    pub fn is_unreachable(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error};
        matches!(
            self,
            RegistryError::Unavailable(_)
                | RegistryError::Connect(_)
                | RegistryError::Query(Error::DatabaseError(
                    DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
                    _,
                ))
        )
    }

    /// Whether trying again may succeed: the database was unreachable, the
    /// connection broke, or a transaction lost a serialization race or a
    /// deadlock. Any
    /// other failure would happen again on the same input.
    pub fn is_transient(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error};
        if self.is_unreachable() {
            return true;
        }
        match self {
            RegistryError::Query(
                Error::BrokenTransactionManager
                | Error::DatabaseError(DatabaseErrorKind::SerializationFailure, _),
            ) => true,
            // A deadlock (40P01, which diesel does not name) aborted this
            // statement to let another finish: running it again succeeds.
            // Concurrent batches that update the same rows in different
            // orders (a publish mark, a finish) can meet so.
            RegistryError::Query(Error::DatabaseError(DatabaseErrorKind::Unknown, info)) => {
                info.message().starts_with("deadlock detected")
            }
            _ => false,
        }
    }
}

/// Why a task's plugin could not be used.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// The module or func name breaks `^[A-Za-z0-9_]+$`.
    #[error("invalid {what} name '{name}': only letters, digits and '_' are allowed")]
    InvalidName {
        /// `module` or `func`.
        what: &'static str,
        /// The offending name.
        name: String,
    },
    /// No library file for the module.
    #[error("plugin module '{module}' not found: no file '{}'", path.display())]
    NotFound {
        /// The module.
        module: String,
        /// Where its library should be.
        path: PathBuf,
    },
    /// The library could not be read, copied or loaded.
    #[error("plugin module '{module}': {reason}")]
    Load {
        /// The module.
        module: String,
        /// What went wrong, naming the file.
        reason: String,
    },
    /// The library loaded but does not export the task.
    #[error("plugin module '{module}' ('{}') has no task '{func}'; it exports: {}", path.display(), available.join(", "))]
    NoSuchTask {
        /// The module.
        module: String,
        /// The library file.
        path: PathBuf,
        /// The missing task.
        func: String,
        /// What the library does export.
        available: Vec<String>,
    },
    /// The plugin refused to create the task (bad config, a panic).
    #[error("creating task '{func}' of plugin module '{module}': {reason}")]
    Create {
        /// The module.
        module: String,
        /// The task.
        func: String,
        /// The plugin's error.
        reason: String,
    },
}
