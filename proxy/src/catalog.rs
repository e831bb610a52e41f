//! The per-form cache of attached tasks, kept fresh by LISTEN/NOTIFY.
//!
//! `Process` must not query PostgreSQL on every call, so each form's task
//! list is cached and dropped when the registry's listener reports a change
//! to that form.
//!
//! Bounded: at most [`MAX_FORMS`] forms with tasks (least recently used
//! first out), and forms without tasks (unknown ids, say from a caller
//! probing random ones) in a smaller cache of their own, [`MAX_UNKNOWN`]
//! entries each kept for [`UNKNOWN_TTL`], so they never push real forms out.
//!
//! Consistency: a list loaded from the database is cached only if no change
//! was reported while it was being loaded (the `epoch` check) and only while
//! the listener is connected; otherwise a change could be missed and a stale
//! list kept forever. When the listener (re)connects, everything is dropped,
//! since changes made while it was away went unseen. When the database is
//! unreachable, cached forms keep being served from the cache.

use std::{
    num::NonZeroUsize,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lru::LruCache;

use tokio_util::sync::DropGuard;
use uuid::Uuid;

use crate::{
    error::RegistryError,
    lifecycle::Lifecycle,
    registry::{Change, Registry, TaskDef},
};

/// A form's tasks, shared by every call that runs them.
pub type FormTasks = Arc<[TaskDef]>;

/// Forms with tasks kept at most.
pub const MAX_FORMS: usize = 100_000;
/// Forms without tasks kept at most.
pub const MAX_UNKNOWN: usize = 10_000;
/// How long a form without tasks is remembered.
pub const UNKNOWN_TTL: Duration = Duration::from_secs(10);

struct Forms {
    known: LruCache<Uuid, FormTasks>,
    /// Forms with no tasks, and when that was loaded.
    unknown: LruCache<Uuid, Instant>,
}

impl Forms {
    fn remove(&mut self, form: &Uuid) {
        self.known.pop(form);
        self.unknown.pop(form);
    }

    fn clear(&mut self) {
        self.known.clear();
        self.unknown.clear();
    }
}

struct State {
    forms: Mutex<Forms>,
    /// Bumped on every reported change.
    epoch: AtomicU64,
    /// Whether the listener is connected, i.e. changes are being seen.
    listening: AtomicBool,
}

impl Default for State {
    fn default() -> Self {
        let cap = |n: usize| NonZeroUsize::new(n).expect("a positive capacity");
        State {
            forms: Mutex::new(Forms {
                known: LruCache::new(cap(MAX_FORMS)),
                unknown: LruCache::new(cap(MAX_UNKNOWN)),
            }),
            epoch: AtomicU64::new(0),
            listening: AtomicBool::new(false),
        }
    }
}

impl State {
    fn apply(&self, change: Change) {
        if change == Change::Keys {
            return;
        }
        let mut forms = self.forms.lock().expect("catalog lock poisoned");
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
            Change::Keys => {}
        }
    }
}

/// The cached view of the registry used by `Process`.
pub struct Catalog {
    registry: Registry,
    state: Arc<State>,
    /// Stops the listener when the catalog goes, if shutdown has not yet:
    /// it notices within one poll and closes its connection; no join, so
    /// dropping never blocks the runtime.
    _listener: DropGuard,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").finish_non_exhaustive()
    }
}

impl Catalog {
    /// Starts the change listener, a thread on `life` that stops with it
    /// (or with the catalog); `on_change` runs after each reported change.
    pub fn start(
        registry: Registry,
        life: &Lifecycle,
        on_change: impl Fn(Change) + Send + 'static,
    ) -> Catalog {
        let state = Arc::new(State::default());
        let stop = life.token().child_token();
        life.spawn_thread("listen", {
            let (registry, state, stop) = (registry.clone(), state.clone(), stop.clone());
            move || {
                registry.listen(Duration::from_millis(500), &stop, |change| {
                    state.apply(change);
                    on_change(change);
                });
            }
        });
        Catalog {
            registry,
            state,
            _listener: stop.drop_guard(),
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
        let mut forms = self.state.forms.lock().expect("catalog lock poisoned");
        if self.state.listening.load(Ordering::SeqCst)
            && self.state.epoch.load(Ordering::SeqCst) == epoch
        {
            if loaded.is_empty() {
                forms.unknown.put(form, Instant::now());
            } else {
                forms.known.put(form, loaded.clone());
            }
        }
        Ok(loaded)
    }

    /// The cached tasks of `form`, if any.
    pub fn cached(&self, form: Uuid) -> Option<FormTasks> {
        let mut forms = self.state.forms.lock().expect("catalog lock poisoned");
        if let Some(tasks) = forms.known.get(&form) {
            return Some(tasks.clone());
        }
        match forms.unknown.get(&form) {
            Some(loaded) if loaded.elapsed() < UNKNOWN_TTL => Some(Arc::from([])),
            Some(_) => {
                forms.unknown.pop(&form);
                None
            }
            None => None,
        }
    }

    /// How many forms are cached: (with tasks, without).
    pub fn sizes(&self) -> (usize, usize) {
        let forms = self.state.forms.lock().expect("catalog lock poisoned");
        (forms.known.len(), forms.unknown.len())
    }
}
