//! The per-form cache of attached tasks, kept fresh by LISTEN/NOTIFY.
//!
//! `Process` must not query PostgreSQL on every call, so each form's task
//! list is cached (an empty list too) and dropped when the registry's
//! listener reports a change to that form.
//!
//! Consistency: a list loaded from the database is cached only if no change
//! was reported while it was being loaded (the `epoch` check) and only while
//! the listener is connected; otherwise a change could be missed and a stale
//! list kept forever. When the listener (re)connects, everything is dropped,
//! since changes made while it was away went unseen. When the database is
//! unreachable, cached forms keep being served from the cache.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use uuid::Uuid;

use crate::{
    error::RegistryError,
    registry::{Change, Registry, TaskDef},
};

/// A form's tasks, shared by every call that runs them.
pub type FormTasks = Arc<[TaskDef]>;

#[derive(Default)]
struct State {
    forms: RwLock<HashMap<Uuid, FormTasks>>,
    /// Bumped on every reported change.
    epoch: AtomicU64,
    /// Whether the listener is connected, i.e. changes are being seen.
    listening: AtomicBool,
}

impl State {
    fn apply(&self, change: Change) {
        let mut forms = self.forms.write().expect("catalog lock poisoned");
        self.epoch.fetch_add(1, Ordering::SeqCst);
        match change {
            Change::Form(form) => {
                forms.remove(&form);
            }
            Change::Reset => {
                forms.clear();
                self.listening.store(true, Ordering::SeqCst);
            }
            Change::Lost => self.listening.store(false, Ordering::SeqCst),
        }
    }
}

/// The cached view of the registry used by `Process`.
pub struct Catalog {
    registry: Registry,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").finish_non_exhaustive()
    }
}

impl Catalog {
    /// Starts the change listener; `on_change` runs after each reported change.
    pub fn start(registry: Registry, on_change: impl Fn(Change) + Send + 'static) -> Catalog {
        let state = Arc::new(State::default());
        let stop = Arc::new(AtomicBool::new(false));
        registry.listen(Duration::from_millis(500), stop.clone(), {
            let state = state.clone();
            move |change| {
                state.apply(change);
                on_change(change);
            }
        });
        Catalog {
            registry,
            state,
            stop,
        }
    }

    /// The tasks of `form`, from the cache or else from the database.
    pub async fn tasks(&self, form: Uuid) -> Result<FormTasks, RegistryError> {
        if let Some(found) = self.cached(form) {
            return Ok(found);
        }
        let epoch = self.state.epoch.load(Ordering::SeqCst);
        let registry = self.registry.clone();
        let loaded: FormTasks = tokio::task::spawn_blocking(move || registry.tasks_for_form(form))
            .await
            .expect("registry query panicked")?
            .into();
        let mut forms = self.state.forms.write().expect("catalog lock poisoned");
        if self.state.listening.load(Ordering::SeqCst)
            && self.state.epoch.load(Ordering::SeqCst) == epoch
        {
            forms.insert(form, loaded.clone());
        }
        Ok(loaded)
    }

    /// The cached tasks of `form`, if any.
    pub fn cached(&self, form: Uuid) -> Option<FormTasks> {
        let forms = self.state.forms.read().expect("catalog lock poisoned");
        forms.get(&form).cloned()
    }
}

impl Drop for Catalog {
    fn drop(&mut self) {
        // The listener notices within one poll and closes its connection; no
        // join, so dropping never blocks the runtime.
        self.stop.store(true, Ordering::Relaxed);
    }
}
