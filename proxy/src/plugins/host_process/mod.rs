//! One plugin-host process as Daisy sees it: [`Host`] spawns `daisy
//! plugin-host` with a scrubbed environment and one end of a socket pair,
//! waits for its `Hello`, sends requests and matches the replies to their
//! calls by id, and retires or kills it. The code that runs inside the
//! process is [`super::host`]; which host a call goes to is decided by
//! [`super::supervisor`].
//!
//! `io` holds the host's tasks: the writer (whatever frames are queued, in
//! one write), the reader (replies to their calls; when the socket closes,
//! it reaps the process and fails what is pending with the cause) and the
//! forwarding of the host's output to the log.

mod io;

use std::{
    collections::{HashMap, HashSet},
    os::fd::OwnedFd,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use prost::Message;
use tokio::sync::{Notify, oneshot};

use self::io::{Frames, describe, forward_output, read_replies, write_frames};
use super::{
    files,
    supervisor::{Call, CallError, CallResult, HostConfig},
    wire::{self, Create, Hello, Reply, Request},
};
use crate::error::PluginError;

/// Variables every host gets (when Daisy has them).
const BASE_ENV: [&str; 4] = ["PATH", "HOME", "LANG", "TZ"];

/// One host process.
pub(super) struct Host {
    module: String,
    pub(super) pid: u32,
    frames: Arc<Frames>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Reply, String>>>>,
    /// Instances whose definition this host has been sent; held while
    /// sending, so the definition always precedes its first use.
    defined: Mutex<HashSet<u64>>,
    next_id: AtomicU64,
    pub(super) inflight: AtomicUsize,
    pub(super) runs: AtomicU64,
    retiring: AtomicBool,
    /// Set when Daisy kills it (retired), so its death is not a crash.
    killed: AtomicBool,
    dead: AtomicBool,
    kill: Notify,
    pub(super) last_used: Mutex<Instant>,
    /// How long it may finish other calls once a timeout retires it.
    grace: Duration,
    /// Its slot's count of crashes in a row, reset by a clean run.
    pub(super) in_a_row: Arc<AtomicUsize>,
}

impl Host {
    /// Starts a host for the library copy at `library` and waits for its Hello.
    pub(super) async fn start(
        config: &HostConfig,
        module: &str,
        library: &std::path::Path,
        in_a_row: Arc<AtomicUsize>,
    ) -> Result<(Arc<Host>, Hello), PluginError> {
        let error = |reason: String| PluginError::Load {
            module: module.to_owned(),
            reason,
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|err| error(format!("creating a socket pair: {err}")))?;
        let mut command = tokio::process::Command::new(&config.program);
        command
            .arg("plugin-host")
            .arg("--library")
            .arg(library)
            .arg("--module")
            .arg(module)
            .arg("--threads")
            .arg(config.threads_per_host.max(1).to_string())
            .arg("--memory-mib")
            .arg(config.memory_limit_mib.to_string())
            .env_clear()
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for name in BASE_ENV
            .iter()
            .copied()
            .chain(config.env.iter().map(String::as_str))
        {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        // The host must not outlive Daisy, even when Daisy is SIGKILLed.
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches only this process.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|err| {
            error(format!(
                "starting a plugin host ('{}'): {err}",
                config.program.display()
            ))
        })?;
        let pid = child.id().unwrap_or(0);
        for (stream, out) in [
            (
                "stdout",
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ),
            (
                "stderr",
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ),
        ] {
            if let Some(out) = out {
                tokio::spawn(forward_output(module.to_owned(), pid, stream, out));
            }
        }
        ours.set_nonblocking(true)
            .map_err(|err| error(format!("setting up the host's socket: {err}")))?;
        let socket = tokio::net::UnixStream::from_std(ours)
            .map_err(|err| error(format!("setting up the host's socket: {err}")))?;
        let (mut reader, writer) = socket.into_split();
        let hello =
            match tokio::time::timeout(config.start_timeout, wire::read_async(&mut reader)).await {
                Ok(Ok(Some(body))) => Hello::decode(&body[..])
                    .map_err(|err| error(format!("the plugin host sent a bad hello: {err}")))?,
                Ok(_) => {
                    let status = child.wait().await.ok();
                    return Err(error(format!(
                        "plugin host died while loading the library: {}",
                        describe(status)
                    )));
                }
                Err(_) => {
                    return Err(error(format!(
                        "loading the library took longer than {} ms",
                        config.start_timeout.as_millis()
                    )));
                }
            };
        if !hello.error.is_empty() {
            return Err(error(hello.error.replace(
                &library.display().to_string(),
                &format!("plugins/{}", files::library_file_name(module)),
            )));
        }
        let frames = Arc::new(Frames::new(writer));
        let host = Arc::new(Host {
            module: module.to_owned(),
            pid,
            frames: frames.clone(),
            pending: Mutex::default(),
            defined: Mutex::default(),
            next_id: AtomicU64::new(1),
            inflight: AtomicUsize::new(0),
            runs: AtomicU64::new(0),
            retiring: AtomicBool::new(false),
            killed: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            kill: Notify::new(),
            last_used: Mutex::new(Instant::now()),
            grace: config.recycle_grace,
            in_a_row,
        });
        tokio::spawn(write_frames(frames));
        ::metrics::gauge!(crate::metrics::HOSTS_ALIVE).increment(1.0);
        tokio::spawn(read_replies(host.clone(), reader, child));
        tracing::debug!(
            plugin.module = module,
            host.pid = pid,
            "plugin host started"
        );
        Ok((host, hello))
    }

    pub(super) fn usable(&self) -> bool {
        !self.dead.load(Ordering::Acquire) && !self.retiring.load(Ordering::Acquire)
    }

    pub(super) fn crashed(&self) -> bool {
        self.dead.load(Ordering::Acquire) && !self.killed.load(Ordering::Acquire)
    }

    pub(super) async fn call(
        self: &Arc<Self>,
        call: &Call<'_>,
        deadline: tokio::time::Instant,
    ) -> CallResult {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.pending
            .lock()
            .expect("pending poisoned")
            .insert(id, reply);
        let _inflight = InFlight::enter(self, id);
        let instance = instance_key(call);
        let mut request = Request {
            id,
            instance,
            create: None,
            form_id: call.form_id.to_owned(),
            submission_id: call.submission_id.to_owned(),
            submission_json: call.submission_json.to_owned(),
            attempt: call.attempt,
            run_id: call.run_id.to_owned(),
            context_json: call.context_json.to_owned(),
        };
        {
            let mut defined = self.defined.lock().expect("defined poisoned");
            if defined.insert(instance) {
                request.create = Some(Create {
                    func: call.func.to_owned(),
                    config_json: call.config_json.to_owned(),
                });
            }
            let mut frame = Vec::new();
            wire::encode(&request, &mut frame);
            // Batched when other calls are in flight on this host.
            let batch = self.inflight.load(Ordering::Relaxed) > 1;
            if !self.frames.send(&frame, batch) {
                defined.remove(&instance);
            }
        }
        // The host may have died between being picked and the request being
        // registered; its reader sets `dead` before it fails what is pending,
        // so a request registered after that is failed here, not left to
        // wait for its deadline.
        let mut answer = answer;
        if self.dead.load(Ordering::Acquire) {
            return match answer.try_recv() {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(cause)) => Err(CallError::HostDied {
                    error: format!("plugin host for '{}' died: {cause}", self.module),
                    suspect: true,
                }),
                Err(_) => Err(CallError::HostDied {
                    error: format!("plugin host for '{}' died", self.module),
                    suspect: true,
                }),
            };
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(cause))) => Err(CallError::HostDied {
                error: format!("plugin host for '{}' died: {cause}", self.module),
                suspect: true,
            }),
            Ok(Err(_)) => Err(CallError::HostDied {
                error: format!("plugin host for '{}' died", self.module),
                suspect: true,
            }),
            Err(_) => {
                tracing::warn!(plugin.module = %self.module, host.pid = self.pid, "a run passed its timeout; recycling its plugin host");
                self.retire(self.grace);
                Err(CallError::TimedOut)
            }
        }
    }

    /// New calls go elsewhere; the process is killed once its calls finish,
    /// or after `grace`.
    pub(super) fn retire(self: &Arc<Self>, grace: Duration) {
        if self.retiring.swap(true, Ordering::AcqRel) {
            return;
        }
        if self.inflight.load(Ordering::Acquire) == 0 || grace.is_zero() {
            self.kill_now();
            return;
        }
        let host = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if let Some(host) = host.upgrade() {
                host.kill_now();
            }
        });
    }

    fn kill_now(&self) {
        if !self.dead.load(Ordering::Acquire) {
            self.killed.store(true, Ordering::Release);
            self.kill.notify_one();
        }
    }
}

/// Counts a call in flight; on drop (answered, timed out or cancelled)
/// forgets it, and kills a retiring host whose last call it was.
struct InFlight<'a> {
    host: &'a Arc<Host>,
    id: u64,
}

impl<'a> InFlight<'a> {
    fn enter(host: &'a Arc<Host>, id: u64) -> Self {
        host.inflight.fetch_add(1, Ordering::AcqRel);
        *host.last_used.lock().expect("last use poisoned") = Instant::now();
        InFlight { host, id }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // The writer task ends, and with it the socket's writing end.
        self.frames.close();
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.host
            .pending
            .lock()
            .expect("pending poisoned")
            .remove(&self.id);
        *self.host.last_used.lock().expect("last use poisoned") = Instant::now();
        if self.host.inflight.fetch_sub(1, Ordering::AcqRel) == 1
            && self.host.retiring.load(Ordering::Acquire)
        {
            self.host.kill_now();
        }
    }
}

/// Identifies a task instance: the task, its func and its config.
fn instance_key(call: &Call<'_>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    (call.task_id, call.func, call.config_json).hash(&mut hasher);
    hasher.finish()
}
