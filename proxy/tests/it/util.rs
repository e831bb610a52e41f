//! Test support: a fresh database per test, the real server on a free port,
//! built plugin libraries, and a TCP relay that cuts connections on demand.
//!
//! Every test owns what it creates (database, plugins directory, server,
//! relay) and drops it afterwards, so tests run in parallel.
//!
//! Needs the real PostgreSQL (`DAISY_TEST_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`, a user that may create
//! databases) and the workspace's plugin libraries built (`make test` builds
//! them; by hand: `cargo build --workspace`).

#![allow(dead_code)] // each test module uses its own part

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
use proto::v1::{
    ProcessRequest, ProcessResponse, TaskResult, post_sub_proxy_client::PostSubProxyClient,
};
use proxy::{
    Config, DbConfig,
    queue::{QueueConfig, QueueType},
    registry::{NewTask, Registry, TaskDef},
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
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

/// A database of its own, migrated, dropped when the value is.
pub struct TestDb {
    name: String,
    /// Its URL.
    pub url: String,
}

impl TestDb {
    /// Creates and migrates a fresh database.
    pub fn new() -> TestDb {
        let name = format!("daisy_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::establish(&admin_url()).expect("connecting to PostgreSQL");
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .expect("creating the test database");
        let db = TestDb {
            url: with_database(&admin_url(), &name),
            name,
        };
        db.registry()
            .migrate()
            .expect("migrating the test database");
        db
    }

    /// A registry on this database.
    pub fn registry(&self) -> Registry {
        Registry::new(&db_config(&self.url))
    }

    /// Runs plain SQL, as an operator would with psql.
    pub fn execute(&self, sql: &str) {
        let mut conn = PgConnection::establish(&self.url).expect("connecting to the test database");
        diesel::sql_query(sql)
            .execute(&mut conn)
            .expect("running SQL");
    }

    /// Attaches a task with defaults for everything but what matters.
    pub fn attach(
        &self,
        form: Uuid,
        name: &str,
        module: &str,
        func: &str,
        config: Value,
    ) -> TaskDef {
        self.attach_with(NewTask {
            form_id: form,
            name: name.to_owned(),
            module: module.to_owned(),
            func: func.to_owned(),
            is_async: false,
            config,
            enabled: true,
            timeout_ms: 5_000,
            max_attempts: 5,
        })
    }

    /// Attaches a task as given.
    pub fn attach_with(&self, task: NewTask) -> TaskDef {
        self.registry().attach(&task).expect("attaching a task")
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

/// Registry settings for tests: short timeouts so outages show quickly.
pub fn db_config(url: &str) -> DbConfig {
    DbConfig {
        url: url.to_owned(),
        pool_size: 4,
        timeout: Duration::from_millis(500),
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
    let path = target_dir().join(proxy::plugins::library_file_name(krate));
    assert!(
        path.exists(),
        "{} is missing: build the plugins first (`make test` does, or `cargo build --workspace`)",
        path.display()
    );
    path
}

/// A plugins directory of its own.
pub struct PluginsDir(pub tempfile::TempDir);

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
        self.path().join(proxy::plugins::library_file_name(module))
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
    /// The settings pointing at them (through `url`).
    pub config: QueueConfig,
}

impl TestQueue {
    /// Fresh names on the local broker.
    pub fn new() -> TestQueue {
        Self::via(&amqp_url())
    }

    /// Fresh names, reached through `url` (e.g. a relay).
    pub fn via(url: &str) -> TestQueue {
        let id = Uuid::new_v4().simple().to_string();
        TestQueue {
            config: QueueConfig {
                url: url.to_owned(),
                exchange: format!("daisy.test.{id}"),
                queue: format!("daisy.test.{id}.runs"),
                queue_type: QueueType::Quorum,
                delivery_limit: 3,
                confirm_timeout: Duration::from_secs(5),
            },
        }
    }

    /// The same names through another URL.
    pub fn through(&self, url: &str) -> QueueConfig {
        QueueConfig {
            url: url.to_owned(),
            ..self.config.clone()
        }
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        let config = self.config.clone();
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
                let args = OpenConnectionArguments::try_from(amqp_url().as_str()).ok()?;
                let connection = Connection::open(&args).await.ok()?;
                let channel = connection.open_channel(None).await.ok()?;
                for queue in [config.queue.clone(), config.dead_letter_queue()] {
                    let _ = channel
                        .queue_delete(QueueDeleteArguments::new(&queue))
                        .await;
                }
                let _ = channel
                    .exchange_delete(ExchangeDeleteArguments::new(&config.exchange))
                    .await;
                let _ = channel.close().await;
                let _ = connection.close().await;
                Some(())
            })
        })
        .join();
    }
}

/// Server settings for tests: small limits, a short outbox grace.
pub fn server_config(db_url: &str, plugins: &Path, queue: QueueConfig) -> Config {
    Config {
        db: db_config(db_url),
        plugins_dir: plugins.to_owned(),
        max_request_bytes: 64 * 1024,
        max_concurrent_tasks: 16,
        queue,
        outbox_grace: Duration::from_millis(1500),
        relay_interval: Duration::from_millis(200),
        stale_after: Duration::from_secs(900),
    }
}

/// The real server, on a free loopback port, stopped when dropped.
pub struct TestServer {
    /// Its address.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    queue: Option<TestQueue>,
}

impl TestServer {
    /// Starts `daisy serve` in-process against `db_url` and `plugins`, with
    /// a queue of its own that nobody consumes.
    pub async fn start(db_url: &str, plugins: &Path) -> TestServer {
        let queue = TestQueue::new();
        let mut server =
            Self::start_with(server_config(db_url, plugins, queue.config.clone())).await;
        server.queue = Some(queue);
        server
    }

    /// Starts the server with `config`.
    pub async fn start_with(config: Config) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("local address");
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(proxy::run(listener, config, async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            shutdown: Some(tx),
            handle: Some(handle),
            queue: None,
        }
    }

    /// A connected client.
    pub async fn client(&self) -> PostSubProxyClient<Channel> {
        PostSubProxyClient::new(self.channel().await)
    }

    /// A connected channel, for the other services.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("a valid URI")
            .connect()
            .await
            .expect("connecting to the test server")
    }

    /// Asks the server to stop and waits until it has.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.handle
            .take()
            .expect("not stopped yet")
            .await
            .expect("server task")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A protobuf `Struct` from a JSON object.
pub fn to_struct(value: Value) -> prost_types::Struct {
    match proxy::grpc::json_to_value(value).kind {
        Some(prost_types::value::Kind::StructValue(s)) => s,
        other => panic!("not an object: {other:?}"),
    }
}

/// JSON from a protobuf `Value`.
pub fn to_json(value: &prost_types::Value) -> Value {
    let wrapper = prost_types::Struct {
        fields: [("v".to_owned(), value.clone())].into(),
    };
    proxy::grpc::struct_to_json(&wrapper)["v"].take()
}

/// A request for `form` with a fresh submission id.
pub fn request(form: Uuid, submission: Value) -> ProcessRequest {
    ProcessRequest {
        form_id: form.to_string(),
        submission_id: Uuid::new_v4().to_string(),
        submission: Some(to_struct(submission)),
    }
}

/// A sample submission.
pub fn sample() -> Value {
    json!({"name": "Ada Lovelace", "phone": "+44 20 7946 0000", "answers": {"q1": 42, "q2": ["a", "b"]}})
}

/// Calls Process and expects OK.
pub async fn process(
    client: &mut PostSubProxyClient<Channel>,
    form: Uuid,
    submission: Value,
) -> ProcessResponse {
    client
        .process(request(form, submission))
        .await
        .expect("Process answers OK")
        .into_inner()
}

/// The result of the task called `name`.
pub fn result<'a>(response: &'a ProcessResponse, name: &str) -> &'a TaskResult {
    response
        .results
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no result for task '{name}' in {response:?}"))
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

/// A `daisy` process (serve or worker), killed with SIGKILL when dropped.
pub struct Daisy {
    child: std::process::Child,
    /// For `serve`: where it listens.
    pub addr: Option<SocketAddr>,
}

impl Daisy {
    fn command(db_url: &str, plugins: &Path, queue: &QueueConfig) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_daisy"));
        command
            .env("DATABASE_URL", db_url)
            .env("DAISY_PLUGINS_DIR", plugins)
            .env("AMQP_URL", &queue.url)
            .env("DAISY_EXCHANGE", &queue.exchange)
            .env("DAISY_QUEUE", &queue.queue)
            .env("DAISY_DELIVERY_LIMIT", queue.delivery_limit.to_string())
            .env("DAISY_DB_TIMEOUT_MS", "500")
            .env(
                "RUST_LOG",
                std::env::var("DAISY_TEST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdin(std::process::Stdio::null());
        command
    }

    /// Starts `daisy serve` on a free port.
    pub fn serve(db_url: &str, plugins: &Path, queue: &QueueConfig) -> Daisy {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let child = Self::command(db_url, plugins, queue)
            .args([
                "serve",
                "--addr",
                &port.to_string(),
                "--outbox-grace-ms",
                "1000",
                "--relay-interval-ms",
                "200",
            ])
            .spawn()
            .expect("starting daisy serve");
        Daisy {
            child,
            addr: Some(port),
        }
    }

    /// Starts `daisy worker` with fast retries.
    pub fn worker(db_url: &str, plugins: &Path, queue: &QueueConfig, extra: &[&str]) -> Daisy {
        let child = Self::command(db_url, plugins, queue)
            .args(["worker", "--retry-base-ms", "200", "--retry-max-ms", "2000"])
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

    /// Whether it has exited (and so can be restarted).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
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
