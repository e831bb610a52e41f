//! Test support shared by the workspace's test suites: real PostgreSQL
//! databases, real RabbitMQ exchanges and queues, built plugin libraries,
//! real `daisy` processes, and a TCP relay that cuts connections on demand.
//!
//! Every test owns what it creates and drops it afterwards, so tests run in
//! parallel and leave nothing behind. Needs PostgreSQL
//! (`DAISY_TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`, a user that may create
//! databases), RabbitMQ (`DAISY_TEST_AMQP_URL`, default the local broker),
//! and the workspace built (`make test` does it; by hand:
//! `cargo build --workspace`), since tests load the plugin libraries and run
//! the `daisy` binary from `target/debug`.

mod pki;
mod secrets;
pub use pki::{Pki, TlsRelay};
pub use secrets::SecretsDir;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use diesel::{Connection, PgConnection, RunQueryDsl};
use proto::v1::post_sub_proxy_client::PostSubProxyClient;
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::transport::Channel;
use uuid::Uuid;

/// The server that test databases are created on.
pub fn admin_url() -> String {
    std::env::var("DAISY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{db}")
}

/// `url` pointing at another host:port, e.g. a relay.
pub fn with_port(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("URL has a scheme");
    let (authority, path) = rest.split_once('/').expect("URL has a path");
    let user = authority
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    format!("{scheme}://{user}{addr}/{path}")
}

/// A database of its own, dropped when the value is.
pub struct TestDb {
    name: String,
    /// Its URL.
    pub url: String,
}

impl TestDb {
    /// Creates an empty database.
    pub fn empty() -> TestDb {
        let name = format!("daisy_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::establish(&admin_url()).expect("connecting to PostgreSQL");
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .expect("creating the test database");
        TestDb {
            url: with_database(&admin_url(), &name),
            name,
        }
    }

    /// Creates a database and applies Daisy's migrations with `daisy migrate`.
    pub fn daisy() -> TestDb {
        let db = TestDb::empty();
        let output = std::process::Command::new(daisy_bin())
            .arg("migrate")
            .env("DATABASE_URL", &db.url)
            .output()
            .expect("running daisy migrate");
        assert!(
            output.status.success(),
            "daisy migrate: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        db
    }

    /// Runs plain SQL, as an operator would with psql.
    pub fn execute(&self, sql: &str) {
        let mut conn = PgConnection::establish(&self.url).expect("connecting to the test database");
        diesel::sql_query(sql)
            .execute(&mut conn)
            .expect("running SQL");
    }

    /// Runs a query of one text column, as with `psql -tAc`; its first row.
    pub fn query_one(&self, sql: &str) -> String {
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::Text)]
            value: String,
        }
        let mut conn = PgConnection::establish(&self.url).expect("connecting to the test database");
        diesel::sql_query(format!("SELECT ({sql}) AS value"))
            .get_result::<Row>(&mut conn)
            .expect("running SQL")
            .value
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = PgConnection::establish(&admin_url()) {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin);
        }
    }
}

/// Where cargo put the workspace's build output.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("debug")
}

/// The built library of plugin crate `krate` (its lib name, e.g. `testkit`).
pub fn built_plugin(krate: &str) -> PathBuf {
    let path = target_dir().join(library_file_name(krate));
    assert!(
        path.exists(),
        "{} is missing: build the plugins first (`make test` does, or `cargo build --workspace`)",
        path.display()
    );
    path
}

/// The built `daisy` binary.
pub fn daisy_bin() -> PathBuf {
    let path = target_dir().join("daisy");
    assert!(
        path.exists(),
        "{} is missing: `cargo build --workspace` first",
        path.display()
    );
    path
}

/// The platform's file name for the library of plugin module `module`.
pub fn library_file_name(module: &str) -> String {
    format!(
        "{}{module}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// A plugins directory of its own.
pub struct PluginsDir(pub tempfile::TempDir);

impl Default for PluginsDir {
    fn default() -> Self {
        Self::new()
    }
}

impl PluginsDir {
    /// An empty plugins directory.
    pub fn new() -> PluginsDir {
        PluginsDir(tempfile::tempdir().expect("creating a plugins directory"))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Installs plugin crate `krate`'s library as module `module`, the way an
    /// operator would: `cp` over whatever file is there.
    pub fn install(&self, krate: &str, module: &str) {
        std::fs::copy(built_plugin(krate), self.module_path(module)).expect("installing a plugin");
    }

    /// Where module `module`'s library goes.
    pub fn module_path(&self, module: &str) -> PathBuf {
        self.path().join(library_file_name(module))
    }
}

/// The RabbitMQ tests use (`DAISY_TEST_AMQP_URL`, default the local broker).
pub fn amqp_url() -> String {
    std::env::var("DAISY_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The broker's address, from [`amqp_url`].
pub fn amqp_addr() -> SocketAddr {
    let url = amqp_url();
    let rest = url.split_once("://").expect("scheme").1;
    let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    hostport
        .replace("localhost", "127.0.0.1")
        .parse()
        .expect("AMQP address is host:port")
}

/// An exchange and queues of this test's own, deleted when dropped.
pub struct TestQueue {
    /// The broker's URL.
    pub url: String,
    /// The exchange.
    pub exchange: String,
    /// The runs queue; `<queue>.dead` is its dead-letter queue.
    pub queue: String,
    /// The quorum queue's delivery limit.
    pub delivery_limit: u32,
}

impl TestQueue {
    /// Fresh names on the local broker.
    pub fn new() -> TestQueue {
        let id = Uuid::new_v4().simple().to_string();
        TestQueue {
            url: amqp_url(),
            exchange: format!("daisy.test.{id}"),
            queue: format!("daisy.test.{id}.runs"),
            delivery_limit: 3,
        }
    }

    /// The URL reaching the broker through a relay at `relay`.
    pub fn url_via(&self, relay: SocketAddr) -> String {
        self.url
            .replace(&amqp_addr().to_string(), &relay.to_string())
    }
}

impl Default for TestQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        let (exchange, queue) = (self.exchange.clone(), self.queue.clone());
        // Drop may run inside a runtime: delete from a thread of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                use amqprs::{
                    channel::{ExchangeDeleteArguments, QueueDeleteArguments},
                    connection::{Connection, OpenConnectionArguments},
                };
                let mut args = OpenConnectionArguments::try_from(amqp_url().as_str()).ok()?;
                args.virtual_host("/");
                let connection = Connection::open(&args).await.ok()?;
                let channel = connection.open_channel(None).await.ok()?;
                for queue in [queue.clone(), format!("{queue}.dead")] {
                    let _ = channel
                        .queue_delete(QueueDeleteArguments::new(&queue))
                        .await;
                }
                let _ = channel
                    .exchange_delete(ExchangeDeleteArguments::new(&exchange))
                    .await;
                let _ = channel.close().await;
                let _ = connection.close().await;
                Some(())
            })
        })
        .join();
    }
}

/// A TCP relay between a client and a server that the test can cut and
/// restore, to fake a network or server outage without touching the server.
pub struct Relay {
    /// Where clients connect.
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Starts relaying to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the relay");
        let addr = listener.local_addr().expect("relay address");
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let accept = tokio::spawn({
            let (cut, connections) = (cut.clone(), connections.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees the connection closed
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections
                        .lock()
                        .expect("relay lock")
                        .push(task.abort_handle());
                }
            }
        });
        Relay {
            addr,
            cut,
            connections,
            accept,
        }
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for connection in self.connections.lock().expect("relay lock").drain(..) {
            connection.abort();
        }
    }

    /// Relays again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// The PostgreSQL server's address, from the admin URL.
pub fn postgres_addr() -> SocketAddr {
    let url = admin_url();
    let rest = url.split_once("://").expect("scheme").1;
    let authority = rest.split_once('/').expect("path").0;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5432")
    };
    let hostport = hostport.replace("localhost", "127.0.0.1");
    hostport.parse().expect("PostgreSQL address is host:port")
}

/// A loopback address with a port nobody listens on (free when asked).
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// A `daisy` process (serve or worker), killed with SIGKILL when dropped.
pub struct Daisy {
    child: std::process::Child,
    /// For `serve`: where it listens.
    pub addr: Option<SocketAddr>,
}

impl Daisy {
    fn command(
        db_url: &str,
        plugins: &Path,
        queue: &TestQueue,
        amqp_url: &str,
    ) -> std::process::Command {
        Self::command_with(db_url, plugins, queue, amqp_url, &[])
    }

    fn command_with(
        db_url: &str,
        plugins: &Path,
        queue: &TestQueue,
        amqp_url: &str,
        env: &[(&str, &str)],
    ) -> std::process::Command {
        let mut command = std::process::Command::new(daisy_bin());
        command
            .env("DATABASE_URL", db_url)
            .env("DAISY_PLUGINS_DIR", plugins)
            .env("AMQP_URL", amqp_url)
            .env("DAISY_EXCHANGE", &queue.exchange)
            .env("DAISY_QUEUE", &queue.queue)
            .env("DAISY_DELIVERY_LIMIT", queue.delivery_limit.to_string())
            .env("DAISY_DB_TIMEOUT_MS", "500")
            // A killed worker's runs are taken over once their lease expires.
            .env("DAISY_LEASE_SECS", "3")
            .env(
                "RUST_LOG",
                std::env::var("DAISY_TEST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null());
        command
    }

    /// Starts `daisy serve` on a free port; `amqp_url` may go through a relay.
    pub fn serve(db_url: &str, plugins: &Path, queue: &TestQueue, amqp_url: &str) -> Daisy {
        Self::serve_at(free_port(), db_url, plugins, queue, amqp_url)
    }

    /// Starts `daisy serve` on `addr`.
    pub fn serve_at(
        addr: SocketAddr,
        db_url: &str,
        plugins: &Path,
        queue: &TestQueue,
        amqp_url: &str,
    ) -> Daisy {
        Self::serve_with(addr, db_url, plugins, queue, amqp_url, &[])
    }

    /// Starts `daisy serve` on `addr` with `extra` flags (TLS, keys).
    pub fn serve_with(
        addr: SocketAddr,
        db_url: &str,
        plugins: &Path,
        queue: &TestQueue,
        amqp_url: &str,
        extra: &[&str],
    ) -> Daisy {
        let port = addr;
        let child = Self::command(db_url, plugins, queue, amqp_url)
            .args([
                "serve",
                "--addr",
                &port.to_string(),
                "--outbox-grace-ms",
                "1000",
                "--relay-interval-ms",
                "200",
            ])
            .args(extra)
            .spawn()
            .expect("starting daisy serve");
        Daisy {
            child,
            addr: Some(port),
        }
    }

    /// Starts `daisy worker` with fast retries ([`WORKER_ARGS`]).
    pub fn worker(
        db_url: &str,
        plugins: &Path,
        queue: &TestQueue,
        amqp_url: &str,
        extra: &[&str],
    ) -> Daisy {
        let child = Self::command(db_url, plugins, queue, amqp_url)
            .args(WORKER_ARGS)
            .args(extra)
            .spawn()
            .expect("starting daisy worker");
        Daisy { child, addr: None }
    }

    /// A client of `serve`, once it accepts connections.
    pub async fn client(&self) -> PostSubProxyClient<Channel> {
        let addr = self.addr.expect("a serve process");
        let started = std::time::Instant::now();
        loop {
            if let Ok(channel) = Channel::from_shared(format!("http://{addr}"))
                .expect("URI")
                .connect()
                .await
            {
                return PostSubProxyClient::new(channel);
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "daisy serve did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, and wait for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (a graceful stop), then waits up to `limit` for it to exit;
    /// its exit status, or `None` if it is still running.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Whether it has exited (and so can be restarted).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Daisy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `GetRuns` until `done` holds for the runs, or panics after `limit`.
pub async fn wait_for_runs(
    client: &mut PostSubProxyClient<Channel>,
    submission_id: &str,
    limit: Duration,
    done: impl Fn(&[proto::v1::Run]) -> bool,
) -> Vec<proto::v1::Run> {
    let started = std::time::Instant::now();
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

/// A new log file for a process of `kind` (serve, worker) in `dir`.
fn log_file(dir: &Path, kind: &str) -> std::fs::File {
    let n = std::fs::read_dir(dir).map_or(0, |d| d.count());
    std::fs::File::create(dir.join(format!("{n:02}-{kind}.log"))).expect("creating a log file")
}

impl Drop for Stack {
    fn drop(&mut self) {
        // A failing test shows what the processes logged.
        if std::thread::panicking() {
            eprintln!(
                "--- daisy logs ---\n{}--- end of daisy logs ---",
                self.logs()
            );
        }
    }
}

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

/// A whole Daisy for plugin tests: a migrated database, a plugins directory,
/// queues of its own, `daisy serve` and `daisy worker` processes (with extra
/// environment for the plugins), and a client.
pub struct Stack {
    // The processes go first: fields drop in order, and a live worker would
    // declare the queues again after `queue` deleted them.
    _serve: Daisy,
    _worker: Daisy,
    more_workers: Vec<Daisy>,
    env: Vec<(String, String)>,
    /// The processes' stderr, one file each; shown if the test fails.
    logs: tempfile::TempDir,
    /// Daisy's database.
    pub db: TestDb,
    /// The plugins directory.
    pub plugins: PluginsDir,
    /// The queues.
    pub queue: TestQueue,
    /// A client of `daisy serve`.
    pub client: PostSubProxyClient<Channel>,
}

impl Stack {
    /// Installs `plugins` (crate lib name, module) and starts Daisy with `env`.
    pub async fn start(plugins: &[(&str, &str)], env: &[(&str, &str)]) -> Stack {
        Self::start_with(plugins, env, &[], &[]).await
    }

    /// [`Stack::start`], with extra arguments for `serve` and for `worker`.
    pub async fn start_with(
        plugins: &[(&str, &str)],
        env: &[(&str, &str)],
        serve_args: &[&str],
        worker_args: &[&str],
    ) -> Stack {
        let (db, dir, queue) = (TestDb::daisy(), PluginsDir::new(), TestQueue::new());
        for (krate, module) in plugins {
            dir.install(krate, module);
        }
        let addr = free_port();
        let logs = tempfile::tempdir().expect("a logs directory");
        let spawn = |args: &[&str]| {
            let log = log_file(logs.path(), args[0]);
            Daisy::command_with(&db.url, dir.path(), &queue, &queue.url, env)
                .args(args)
                .stderr(log)
                .spawn()
                .expect("starting daisy")
        };
        let serve = Daisy {
            child: spawn(
                &[
                    "serve",
                    "--addr",
                    &addr.to_string(),
                    "--outbox-grace-ms",
                    "1000",
                    "--relay-interval-ms",
                    "200",
                ]
                .into_iter()
                .chain(serve_args.iter().copied())
                .collect::<Vec<_>>(),
            ),
            addr: Some(addr),
        };
        let worker = Daisy {
            child: spawn(
                &WORKER_ARGS
                    .iter()
                    .chain(worker_args)
                    .copied()
                    .collect::<Vec<_>>(),
            ),
            addr: None,
        };
        let client = serve.client().await;
        Stack {
            db,
            plugins: dir,
            queue,
            client,
            _serve: serve,
            _worker: worker,
            more_workers: Vec::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            logs,
        }
    }

    /// Everything `serve` and the workers wrote to stderr so far (their
    /// logs, at `RUST_LOG`'s level: `error` unless `env` says otherwise).
    pub fn logs(&self) -> String {
        let mut all = String::new();
        if let Ok(dir) = std::fs::read_dir(self.logs.path()) {
            let mut files: Vec<_> = dir.flatten().map(|e| e.path()).collect();
            files.sort();
            for file in files {
                all.push_str(&std::fs::read_to_string(&file).unwrap_or_default());
            }
        }
        all
    }

    /// Starts one more `daisy worker` on the same database and queues.
    pub fn add_worker(&mut self) {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let child = Daisy::command_with(
            &self.db.url,
            self.plugins.path(),
            &self.queue,
            &self.queue.url,
            &env,
        )
        .args(WORKER_ARGS)
        .stderr(log_file(self.logs.path(), "worker"))
        .spawn()
        .expect("starting daisy worker");
        self.more_workers.push(Daisy { child, addr: None });
    }

    /// Attaches a task with plain SQL; returns its id.
    pub fn attach(
        &self,
        form: Uuid,
        name: &str,
        module: &str,
        func: &str,
        is_async: bool,
        config: &serde_json::Value,
    ) -> Uuid {
        let id = Uuid::new_v4();
        let config = config.to_string().replace('\'', "''");
        self.db.execute(&format!(
            "INSERT INTO tasks (id, form_id, name, module, func, async_status, config, max_attempts) \
             VALUES ('{id}', '{form}', '{name}', '{module}', '{func}', {is_async}, '{config}', 5)"
        ));
        id
    }

    /// Calls Process with a new submission id; returns it and the response.
    pub async fn process(
        &mut self,
        form: Uuid,
        submission: serde_json::Value,
    ) -> (String, proto::v1::ProcessResponse) {
        self.process_with(form, submission, None).await
    }

    /// Calls Process with a new submission id and `context`; returns the
    /// submission id and the response.
    pub async fn process_with(
        &mut self,
        form: Uuid,
        submission: serde_json::Value,
        context: Option<proto::v1::SubmissionContext>,
    ) -> (String, proto::v1::ProcessResponse) {
        let submission_id = Uuid::new_v4().to_string();
        let request = proto::v1::ProcessRequest {
            form_id: form.to_string(),
            submission_id: submission_id.clone(),
            submission: Some(proto::json::json_to_struct(submission).expect("a JSON object")),
            context,
        };
        let response = self
            .client
            .process(request)
            .await
            .expect("Process answers OK")
            .into_inner();
        (submission_id, response)
    }

    /// Waits until the submission's asynchronous runs are settled
    /// (succeeded or dead) and returns all its runs.
    pub async fn settled(&mut self, submission_id: &str, limit: Duration) -> Vec<proto::v1::Run> {
        use proto::v1::RunState;
        wait_for_runs(&mut self.client, submission_id, limit, |runs| {
            runs.iter().any(|r| r.is_async)
                && runs
                    .iter()
                    .all(|r| matches!(r.state(), RunState::Succeeded | RunState::Dead))
        })
        .await
    }
}
