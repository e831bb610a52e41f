//! The lifecycle of `daisy serve` and `daisy worker`: one
//! [`CancellationToken`] that says "stop" and one [`TaskTracker`] that knows
//! what is still running.
//!
//! Each command's `run` makes one [`Lifecycle`] first and passes it down;
//! every background task it starts (the relay, the statistics and retention
//! loops, the consumers and their deliveries, the lease keeper, the batch
//! writers, the catalog's LISTEN thread, the operations listener, the gRPC
//! server) is started through it, by name. Shutdown is one sequence,
//! [`Lifecycle::shut_down`]: cancel the token, close the tracker, and wait
//! for the tracked tasks up to a deadline, naming those that did not stop.
//!
//! Two kinds of task end differently, on purpose:
//! - loops (relay, statistics, retention, consumers, the listener, the
//!   operations listener) watch the token and stop taking new work at once;
//! - writers that flush (the run log, fresh publishes, batch writers) do not
//!   watch it: they end when their last handle is dropped, which shutdown
//!   causes once the server has drained or the consumers have finished, so
//!   nothing their callers handed them is lost.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The stop signal and the tasks of one `serve` or `worker`. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    token: CancellationToken,
    tracker: TaskTracker,
    /// How many tracked tasks of each name are running, for the log.
    running: Arc<Mutex<BTreeMap<&'static str, usize>>>,
}

/// Counts one tracked task as running while it lives.
struct Running {
    name: &'static str,
    running: Arc<Mutex<BTreeMap<&'static str, usize>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = self.running.lock().expect("lifecycle lock poisoned");
        if let Some(count) = running.get_mut(self.name) {
            *count -= 1;
            if *count == 0 {
                running.remove(self.name);
            }
        }
    }
}

impl Lifecycle {
    /// A lifecycle with nothing running yet.
    pub fn new() -> Lifecycle {
        Lifecycle::default()
    }

    /// The stop signal; tasks select on `cancelled()` or poll
    /// `is_cancelled()` (a blocking thread).
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Begins shutdown: every task watching the token stops taking work.
    pub fn stop(&self) {
        self.token.cancel();
    }

    /// Stops when `signal` completes (ctrl-c, SIGTERM, a test's trigger).
    pub fn stop_on(&self, signal: impl Future<Output = ()> + Send + 'static) {
        let token = self.token.clone();
        self.spawn("shutdown signal", async move {
            tokio::select! {
                () = signal => token.cancel(),
                () = token.cancelled() => {}
            }
        });
    }

    fn enter(&self, name: &'static str) -> Running {
        *self
            .running
            .lock()
            .expect("lifecycle lock poisoned")
            .entry(name)
            .or_default() += 1;
        Running {
            name,
            running: self.running.clone(),
        }
    }

    /// Spawns `task` on the tracker under `name` (named in the log if it
    /// outlives the shutdown deadline).
    pub fn spawn<F>(&self, name: &'static str, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let running = self.enter(name);
        self.tracker.spawn(async move {
            let _running = running;
            task.await
        })
    }

    /// Runs `body` on a thread of its own named `daisy-<name>`, tracked like
    /// a task; `body` polls [`Lifecycle::token`] to know when to return.
    pub fn spawn_thread(&self, name: &'static str, body: impl FnOnce() + Send + 'static) {
        let (running, tracked) = (self.enter(name), self.tracker.token());
        std::thread::Builder::new()
            .name(format!("daisy-{name}"))
            .spawn(move || {
                let _done = (running, tracked);
                body();
            })
            .expect("spawning a thread");
    }

    /// The names of the tracked tasks still running, with their counts.
    pub fn still_running(&self) -> Vec<(&'static str, usize)> {
        let running = self.running.lock().expect("lifecycle lock poisoned");
        running.iter().map(|(name, n)| (*name, *n)).collect()
    }

    /// Shuts down: cancels the token, closes the tracker and waits up to
    /// `grace` for every tracked task to end. Whatever is still running then
    /// is logged by name and left behind (the process is about to exit).
    /// Whether everything stopped in time.
    pub async fn shut_down(&self, grace: Duration) -> bool {
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return true;
        }
        let still = self
            .still_running()
            .iter()
            .map(|(name, n)| format!("{name} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ");
        tracing::warn!(grace_ms = grace.as_millis() as u64, still_running = %still, "shutdown deadline passed; leaving what did not stop");
        false
    }
}

/// Sleeps for `delay` unless `token` is cancelled first; whether it slept
/// the whole time.
pub async fn pause(token: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = token.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_waits_for_tasks_that_stop_and_names_those_that_do_not() {
        let life = Lifecycle::new();
        let token = life.token().clone();
        life.spawn("polite", async move { token.cancelled().await });
        let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let token = life.token().clone();
        let seen = stopped.clone();
        life.spawn_thread("poller", move || {
            while !token.is_cancelled() {
                std::thread::sleep(Duration::from_millis(5));
            }
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        life.spawn("stubborn", std::future::pending::<()>());
        assert!(!life.shut_down(Duration::from_millis(200)).await);
        assert!(stopped.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(life.still_running(), [("stubborn", 1)]);
    }

    #[tokio::test]
    async fn a_signal_stops_everything_in_time() {
        let life = Lifecycle::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        life.stop_on(async move {
            let _ = rx.await;
        });
        let token = life.token().clone();
        life.spawn("loop", async move {
            while pause(&token, Duration::from_secs(60)).await {}
        });
        let _ = tx.send(());
        life.token().cancelled().await;
        assert!(life.shut_down(Duration::from_secs(5)).await);
        assert!(life.still_running().is_empty());
    }
}
