//! The tasks' crash records: strikes, probation and quarantine. A crash
//! fails every run in flight on its host, so blame is decided by each
//! task's record of crashes against clean runs.

use std::{
    collections::VecDeque,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use super::{Supervisor, builds::Build};

/// Called with each new quarantine.
pub type QuarantineHook = Arc<dyn Fn(Quarantined) + Send + Sync>;

/// A task quarantined in one library build.
#[derive(Debug, Clone)]
pub struct Quarantined {
    /// The module.
    pub module: String,
    /// The build's SHA-256.
    pub sha256: String,
    /// The task.
    pub func: String,
    /// The crashes that put it there.
    pub crashes: usize,
    /// When it ends.
    pub until: std::time::SystemTime,
}

/// Where a task may run now.
pub(super) enum Standing {
    Clear,
    Probation,
    Quarantined(String),
}

/// A task's record since its first crash within the window. A crash fails
/// every run in flight on its host, so the tasks beside the culprit get
/// strikes too; but they also finish runs cleanly, and the culprit does not.
#[derive(Default)]
pub(super) struct Strikes {
    /// Crashes with the task in flight: when, and which host (pid).
    pub(super) crashes: VecDeque<(Instant, u32)>,
    /// Runs of the task that finished cleanly since its first strike.
    pub(super) clean: usize,
    pub(super) until: Option<Instant>,
}

impl Strikes {
    /// Whether this task, rather than its neighbours, likely crashes its host.
    pub(super) fn suspect(&self) -> bool {
        self.clean < self.crashes.len()
    }
}

impl Supervisor {
    /// Whether `func` of `build` runs as usual, on probation (in a host of
    /// its own, while its record makes it a suspect), or not at all.
    pub(super) fn standing(&self, build: &Build, func: &str) -> Standing {
        if self.striking.load(Ordering::Acquire) == 0 {
            return Standing::Clear; // the hot path: no task has crashed lately
        }
        let mut quarantine = self.quarantine.lock().expect("quarantine poisoned");
        let key = (build.sha256.clone(), func.to_owned());
        let Some(strikes) = quarantine.get_mut(&key) else {
            return Standing::Clear;
        };
        let now = Instant::now();
        if let Some(until) = strikes.until.filter(|&u| u > now) {
            return Standing::Quarantined(format!(
                "task '{func}' of plugin '{}' is quarantined after {} crashes of its plugin host; it runs again once a new build is dropped in, or in {} s",
                build.module,
                strikes.crashes.len(),
                (until - now).as_secs() + 1
            ));
        }
        // A quarantine that ended, or a record whose crashes are all older
        // than the window, is forgotten.
        let stale = strikes
            .crashes
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) > self.config.quarantine_window);
        if strikes.until.is_some() || stale {
            quarantine.remove(&key);
            self.striking.fetch_sub(1, Ordering::AcqRel);
            count_quarantined(&quarantine);
            return Standing::Clear;
        }
        if strikes.suspect() {
            Standing::Probation
        } else {
            Standing::Clear
        }
    }

    /// Notes a clean run of a task with strikes against it.
    pub(super) fn clean_run(&self, build: &Build, func: &str) {
        if self.striking.load(Ordering::Acquire) == 0 {
            return; // the hot path: no task has crashed lately
        }
        let mut quarantine = self.quarantine.lock().expect("quarantine poisoned");
        if let Some(strikes) = quarantine.get_mut(&(build.sha256.clone(), func.to_owned())) {
            strikes.clean += 1;
        }
    }

    /// Records that `func`'s run was in flight when host `pid` crashed;
    /// returns whether the task is a likely cause.
    pub(super) fn strike(&self, build: &Build, func: &str, pid: u32) -> bool {
        let mut quarantine = self.quarantine.lock().expect("quarantine poisoned");
        let key = (build.sha256.clone(), func.to_owned());
        if !quarantine.contains_key(&key) {
            self.striking.fetch_add(1, Ordering::AcqRel);
        }
        let strikes = quarantine.entry(key).or_default();
        if strikes.crashes.iter().any(|&(_, p)| p == pid) {
            return strikes.suspect(); // one crash, several runs of the task in flight
        }
        let now = Instant::now();
        strikes.crashes.push_back((now, pid));
        while strikes
            .crashes
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > self.config.quarantine_window)
        {
            strikes.crashes.pop_front();
        }
        let count = strikes.crashes.len();
        if strikes.until.is_none()
            && count >= self.config.quarantine_after.max(1) as usize
            && strikes.suspect()
        {
            strikes.until = Some(now + self.config.quarantine_window);
            tracing::error!(
                plugin.module = %build.module,
                task.func = func,
                plugin.sha256 = %build.sha256,
                crashes = count,
                "task quarantined: it was running in {count} crashes of its plugin host; its runs fail until a new build is dropped in or {} s pass",
                self.config.quarantine_window.as_secs()
            );
            if let Some(hook) = self.on_quarantine.lock().expect("hook poisoned").clone() {
                hook(Quarantined {
                    module: build.module.clone(),
                    sha256: build.sha256.clone(),
                    func: func.to_owned(),
                    crashes: count,
                    until: std::time::SystemTime::now() + self.config.quarantine_window,
                });
            }
            let suspect = strikes.suspect();
            count_quarantined(&quarantine);
            return suspect;
        }
        strikes.suspect()
    }
}

/// Sets the quarantined-tasks gauge from the records.
fn count_quarantined<K>(records: &std::collections::HashMap<K, Strikes>) {
    let now = Instant::now();
    let quarantined = records
        .values()
        .filter(|s| s.until.is_some_and(|u| u > now))
        .count();
    ::metrics::gauge!(crate::metrics::QUARANTINED).set(quarantined as f64);
}
