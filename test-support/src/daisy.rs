//! Real `daisy` processes: a [`Launcher`] starts `daisy serve` and `daisy
//! worker` on a database, a plugins directory and queues, either tuned for
//! tests (the debug build) or as shipped (the release build, for
//! `daisy-bench`); each runs as a [`Daisy`], a [`Process`] killed when
//! dropped whose memory can be read from `/proc`.

use std::{
    net::SocketAddr,
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use proto::v1::post_sub_proxy_client::PostSubProxyClient;
use tonic::transport::Channel;

use crate::{
    artifacts::Profile,
    broker::TestQueue,
    net::{connect, free_port},
};

/// How tests run `daisy worker`: fast retries, and Retry-After waits that
/// stop sparing attempts after 10 s in all.
pub const WORKER_ARGS: &[&str] = &[
    "worker",
    "--retry-base-ms",
    "200",
    "--retry-max-ms",
    "2000",
    "--max-throttled-ms",
    "10000",
];

/// What tests add to `daisy serve --addr <addr>`: the outbox relay looks
/// for stranded runs soon.
const TEST_SERVE_ARGS: &[&str] = &["--outbox-grace-ms", "1000", "--relay-interval-ms", "200"];

/// A child process, killed with SIGKILL (and reaped) when dropped.
pub struct Process(Child);

impl Process {
    /// Takes charge of `child`.
    pub fn new(child: Child) -> Process {
        Process(child)
    }

    /// SIGKILL, and wait for it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM (a graceful stop), then waits up to `limit` for it to exit;
    /// its exit status, or `None` if it is still running.
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Whether it has exited (and so can be restarted).
    pub fn exited(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(Some(_)))
    }

    /// Its peak resident memory so far (`VmHWM`), while it runs.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        status_kib(self.0.id(), "VmHWM:")
    }

    /// The resident memory (`VmRSS`) of each of its child processes now:
    /// for `daisy`, its plugin hosts.
    pub fn children_rss_kib(&self) -> Vec<u64> {
        let threads = std::fs::read_dir(format!("/proc/{}/task", self.0.id()));
        threads
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|thread| std::fs::read_to_string(thread.path().join("children")).ok())
            .flat_map(|children| {
                children
                    .split_whitespace()
                    .filter_map(|pid| pid.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .filter_map(|pid| status_kib(pid, "VmRSS:"))
            .collect()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `kB` field of `/proc/<pid>/status`, if the process is there.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Starts `daisy` processes on one database, plugins directory and queues.
pub struct Launcher {
    bin: PathBuf,
    env: Vec<(String, String)>,
    serve_args: &'static [&'static str],
    worker_args: &'static [&'static str],
    logs: Option<PathBuf>,
}

impl Launcher {
    /// For tests: the debug build, tuned to show outages and retries within
    /// seconds (database timeouts of 500 ms, leases of 3 s, the queue's
    /// delivery limit, [`WORKER_ARGS`], a fast outbox relay), logging at
    /// `DAISY_TEST_LOG`'s level (`error` by default). `amqp_url` may go
    /// through a relay.
    pub fn test(db_url: &str, plugins: &Path, queue: &TestQueue, amqp_url: &str) -> Launcher {
        let log = std::env::var("DAISY_TEST_LOG").unwrap_or_else(|_| "error".into());
        Launcher {
            serve_args: TEST_SERVE_ARGS,
            worker_args: WORKER_ARGS,
            ..Launcher::on(Profile::Debug, db_url, plugins, queue, amqp_url)
        }
        .env(&[
            ("DAISY_DELIVERY_LIMIT", &queue.delivery_limit.to_string()),
            ("DAISY_DB_TIMEOUT_MS", "500"),
            // A killed worker's runs are taken over once their lease expires.
            ("DAISY_LEASE_SECS", "3"),
            ("RUST_LOG", &log),
        ])
    }

    /// As shipped, for `daisy-bench`: the release build with Daisy's own
    /// settings, logging errors only.
    pub fn release(db_url: &str, plugins: &Path, queue: &TestQueue) -> Launcher {
        Launcher::on(Profile::Release, db_url, plugins, queue, &queue.url)
            .env(&[("RUST_LOG", "error")])
    }

    /// `profile`'s `daisy` on a database, plugins directory and queues, with
    /// Daisy's own settings.
    fn on(
        profile: Profile,
        db_url: &str,
        plugins: &Path,
        queue: &TestQueue,
        amqp_url: &str,
    ) -> Launcher {
        Launcher {
            bin: profile.daisy_bin(),
            env: Vec::new(),
            serve_args: &[],
            worker_args: &["worker"],
            logs: None,
        }
        .env(&[
            ("DATABASE_URL", db_url),
            ("DAISY_PLUGINS_DIR", path_str(plugins)),
            ("AMQP_URL", amqp_url),
            ("DAISY_EXCHANGE", &queue.exchange),
            ("DAISY_QUEUE", &queue.queue),
        ])
    }

    /// Adds `env` to every process's environment (over what is there).
    pub fn env(mut self, env: &[(&str, &str)]) -> Launcher {
        self.env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// The same, but starting the `daisy` binary at `bin` (another build,
    /// for A/B comparisons).
    pub fn with_bin(&self, bin: &Path) -> Launcher {
        Launcher {
            bin: bin.to_owned(),
            env: self.env.clone(),
            serve_args: self.serve_args,
            worker_args: self.worker_args,
            logs: self.logs.clone(),
        }
    }

    /// Sends each process's stderr to a file of its own in `dir`
    /// (`00-serve.log`, `01-worker.log`, …) instead of the test's.
    pub fn logs(mut self, dir: &Path) -> Launcher {
        self.logs = Some(dir.to_owned());
        self
    }

    /// Starts `daisy serve` on `addr` with `extra` flags (TLS, keys).
    pub fn serve(&self, addr: SocketAddr, extra: &[&str]) -> Daisy {
        let addr_arg = addr.to_string();
        let head = ["serve", "--addr", &addr_arg];
        let args = head.iter().chain(self.serve_args).chain(extra);
        Daisy {
            process: self.start(args.copied().collect()),
            addr: Some(addr),
        }
    }

    /// Starts `daisy worker` with `extra` flags.
    pub fn worker(&self, extra: &[&str]) -> Daisy {
        Daisy {
            process: self.start(self.worker_args.iter().chain(extra).copied().collect()),
            addr: None,
        }
    }

    /// Starts `daisy` with `args`, the first of which is the command.
    fn start(&self, args: Vec<&str>) -> Process {
        let mut command = Command::new(&self.bin);
        command
            .args(&args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        if let Some(dir) = &self.logs {
            command.stderr(log_file(dir, args[0]));
        }
        Process::new(
            command
                .spawn()
                .unwrap_or_else(|err| panic!("starting daisy {}: {err}", args[0])),
        )
    }
}

/// `path` as a string, for an environment variable.
fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// A new log file for a process of `kind` (serve, worker) in `dir`.
fn log_file(dir: &Path, kind: &str) -> std::fs::File {
    let n = std::fs::read_dir(dir).map_or(0, |d| d.count());
    std::fs::File::create(dir.join(format!("{n:02}-{kind}.log"))).expect("creating a log file")
}

/// A `daisy` process (serve or worker), killed with SIGKILL when dropped; a
/// [`Process`] with, for `serve`, the address it listens on.
pub struct Daisy {
    process: Process,
    /// For `serve`: where it listens.
    pub addr: Option<SocketAddr>,
}

impl Daisy {
    /// Starts `daisy serve`, tuned for tests, on a free port; `amqp_url` may
    /// go through a relay.
    pub fn serve(db_url: &str, plugins: &Path, queue: &TestQueue, amqp_url: &str) -> Daisy {
        Self::serve_at(free_port(), db_url, plugins, queue, amqp_url)
    }

    /// Starts `daisy serve`, tuned for tests, on `addr`.
    pub fn serve_at(
        addr: SocketAddr,
        db_url: &str,
        plugins: &Path,
        queue: &TestQueue,
        amqp_url: &str,
    ) -> Daisy {
        Self::serve_with(addr, db_url, plugins, queue, amqp_url, &[])
    }

    /// Starts `daisy serve`, tuned for tests, on `addr` with `extra` flags
    /// (TLS, keys).
    pub fn serve_with(
        addr: SocketAddr,
        db_url: &str,
        plugins: &Path,
        queue: &TestQueue,
        amqp_url: &str,
        extra: &[&str],
    ) -> Daisy {
        Launcher::test(db_url, plugins, queue, amqp_url).serve(addr, extra)
    }

    /// Starts `daisy worker`, tuned for tests ([`WORKER_ARGS`]), with `extra`
    /// flags.
    pub fn worker(
        db_url: &str,
        plugins: &Path,
        queue: &TestQueue,
        amqp_url: &str,
        extra: &[&str],
    ) -> Daisy {
        Launcher::test(db_url, plugins, queue, amqp_url).worker(extra)
    }

    /// A client of `serve`, once it accepts connections.
    pub async fn client(&self) -> PostSubProxyClient<Channel> {
        PostSubProxyClient::new(connect(self.addr.expect("a serve process")).await)
    }
}

impl Deref for Daisy {
    type Target = Process;

    fn deref(&self) -> &Process {
        &self.process
    }
}

impl DerefMut for Daisy {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// Polls `GetRuns` until `done` holds for the runs, or panics after `limit`.
pub async fn wait_for_runs(
    client: &mut PostSubProxyClient<Channel>,
    submission_id: &str,
    limit: Duration,
    done: impl Fn(&[proto::v1::Run]) -> bool,
) -> Vec<proto::v1::Run> {
    let started = Instant::now();
    loop {
        let runs = client
            .get_runs(proto::v1::GetRunsRequest {
                submission_id: submission_id.to_owned(),
            })
            .await
            .map(|r| r.into_inner().runs);
        if let Ok(runs) = &runs {
            if done(runs) {
                return runs.clone();
            }
        }
        assert!(started.elapsed() < limit, "runs never got there: {runs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read_for_a_process_and_its_children() {
        let mut shell = Process::new(
            Command::new("sh")
                .args(["-c", "sleep 3 & wait"])
                .spawn()
                .expect("starting sh"),
        );
        let started = Instant::now();
        while shell.children_rss_kib().is_empty() {
            assert!(started.elapsed() < Duration::from_secs(5), "no child seen");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(shell.peak_rss_kib().is_some_and(|kib| kib > 0));
        assert!(shell.children_rss_kib().iter().all(|&kib| kib > 0));
        shell.kill();
        assert_eq!(shell.peak_rss_kib(), None, "read after it was reaped");
    }
}
