//! The proxy's test support: the workspace's `test-support` crate, plus what
//! needs the proxy library (a migrated database with registry helpers, queue
//! settings, the server started in-process on a free port).

#![allow(dead_code)] // each test module uses its own part

use std::{net::SocketAddr, path::Path, time::Duration};

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

pub use test_support::{
    Daisy, PluginsDir, Relay, amqp_addr, amqp_url, built_plugin, postgres_addr, wait_for_runs,
    with_port,
};

/// A database of its own, migrated, dropped when the value is.
pub struct TestDb {
    db: test_support::TestDb,
    /// Its URL.
    pub url: String,
}

impl TestDb {
    /// Creates a fresh database and migrates it through the library.
    pub fn new() -> TestDb {
        let db = test_support::TestDb::empty();
        let db = TestDb {
            url: db.url.clone(),
            db,
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
        self.db.execute(sql);
    }

    /// A query of one text column, as with `psql -tAc`: its first row.
    pub fn query_one(&self, sql: &str) -> String {
        self.db.query_one(sql)
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
            isolation: None,
        })
    }

    /// Attaches a task as given.
    pub fn attach_with(&self, task: NewTask) -> TaskDef {
        self.registry().attach(&task).expect("attaching a task")
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

/// A test's own exchange and queues, and the settings that name them.
pub struct TestQueue {
    /// The names (deleted when dropped).
    pub names: test_support::TestQueue,
    /// Settings pointing at them on the local broker.
    pub config: QueueConfig,
}

impl TestQueue {
    /// Fresh names.
    pub fn new() -> TestQueue {
        let names = test_support::TestQueue::new();
        let config = QueueConfig {
            url: names.url.clone(),
            exchange: names.exchange.clone(),
            queue: names.queue.clone(),
            queue_type: QueueType::Quorum,
            delivery_limit: names.delivery_limit,
            confirm_timeout: Duration::from_secs(5),
            ca_file: None,
        };
        TestQueue { names, config }
    }

    /// The same names, reached through a relay at `relay`.
    pub fn through(&self, relay: SocketAddr) -> QueueConfig {
        QueueConfig {
            url: self.names.url_via(relay),
            ..self.config.clone()
        }
    }

    fn url(&self, via: Option<SocketAddr>) -> String {
        via.map_or_else(|| self.names.url.clone(), |relay| self.names.url_via(relay))
    }

    /// A `daisy serve` process on these queues, through `via` if given.
    pub fn serve(&self, db_url: &str, plugins: &Path, via: Option<SocketAddr>) -> Daisy {
        Daisy::serve(db_url, plugins, &self.names, &self.url(via))
    }

    /// A `daisy worker` process on these queues, through `via` if given.
    pub fn worker(
        &self,
        db_url: &str,
        plugins: &Path,
        via: Option<SocketAddr>,
        extra: &[&str],
    ) -> Daisy {
        Daisy::worker(db_url, plugins, &self.names, &self.url(via), extra)
    }
}

/// Server settings for tests: small limits, a short outbox grace.
pub fn server_config(db_url: &str, plugins: &Path, queue: QueueConfig) -> Config {
    Config {
        db: db_config(db_url),
        plugins_dir: plugins.to_owned(),
        hosts: proxy::plugins::HostConfig::new(test_support::daisy_bin()),
        isolation: proxy::plugins::Isolation::Process,
        max_request_bytes: 64 * 1024,
        limits: proxy::grpc::Limits::default(),
        max_concurrent_tasks: 16,
        queue,
        outbox_grace: Duration::from_millis(1500),
        relay_interval: Duration::from_millis(200),
        stale_after: Duration::from_secs(900),
        sync_run_log: proxy::SyncRunLog::All,
        retain: None,
        http_addr: None,
        security: proxy::security::Security::default(),
        shutdown_grace: Duration::from_secs(10),
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
    /// Stops the server and waits for it, so nothing it runs (the relay, a
    /// publisher reconnecting) outlives the test's queues. Needs the
    /// multi-threaded test runtime.
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            tokio::task::block_in_place(|| {
                let _ = tokio::runtime::Handle::current().block_on(handle);
            });
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
        context: None,
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

/// A fixture library built outside the workspace (`make fixtures`).
pub fn fixture(lib: &str) -> std::path::PathBuf {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/fixtures/debug")
        .join(test_support::library_file_name(lib));
    assert!(
        path.exists(),
        "{} is missing: `make fixtures` builds it (`make test` does)",
        path.display()
    );
    path
}

/// Waits until the file a `count` task appends to (a line per execution
/// begun) has at least `n` lines; panics after 30 s.
pub async fn wait_for_executions(counter: &Path, n: usize) {
    let started = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(counter).expect("counter");
        if text.lines().count() >= n {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "fewer than {n} executions began: {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
