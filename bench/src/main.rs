//! `daisy-bench`: runs Daisy's load scenarios with yardsticks measured in the
//! same run; `make bench` (or `make bench-quick`) is how to run it.
//!
//! Every figure is set against a yardstick from the same run, because on a
//! shared machine absolute numbers drift: a bare tonic server answering
//! `Process` with an empty response (the gRPC limit), and PostgreSQL's rate
//! of one-row insert transactions at the same concurrency (the outbox limit).
//! It starts what it needs (its own database, queues, release `daisy`
//! processes), prints a table, and writes `target/bench/report.json` and
//! `target/bench/report.md`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use diesel::{Connection, PgConnection, RunQueryDsl};
use hdrhistogram::Histogram;
use proto::v1::{
    GetRunsRequest, GetRunsResponse, ProcessRequest, ProcessResponse,
    post_sub_proxy_client::PostSubProxyClient,
    post_sub_proxy_server::{PostSubProxy, PostSubProxyServer},
};
use serde_json::{Value, json};
use tonic::transport::Channel;
use uuid::Uuid;

#[derive(Parser)]
#[command(name = "daisy-bench")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// A few seconds per scenario, to check the harness works.
    #[arg(long)]
    quick: bool,
    /// Run only these scenario groups (repeatable): `sync` (1, 2, 3, 6),
    /// `drain` (5), `accept` (4). The yardsticks always run.
    #[arg(long, value_enum)]
    only: Vec<Group>,
    /// Runs drained in scenario 5 (default 50,000; 2,000 with --quick).
    #[arg(long)]
    drain_runs: Option<i64>,
    /// Where the report goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// The server databases are created on.
    #[arg(
        long,
        env = "DAISY_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    admin_url: String,
    /// The broker.
    #[arg(
        long,
        env = "DAISY_BENCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
}

/// Scenario groups `--only` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Group {
    /// Scenarios 1, 2, 3 and 6: the synchronous path.
    Sync,
    /// Scenario 5: workers draining accepted runs.
    Drain,
    /// Scenario 4: the accept rate.
    Accept,
}

impl Cli {
    fn wants(&self, group: Group) -> bool {
        self.only.is_empty() || self.only.contains(&group)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Internal: the bare yardstick server.
    BareServer {
        /// Where to listen.
        #[arg(long)]
        addr: SocketAddr,
    },
}

/// Answers Process with an empty response: the gRPC limit on this machine.
struct Bare;

#[tonic::async_trait]
impl PostSubProxy for Bare {
    async fn process(
        &self,
        _: tonic::Request<ProcessRequest>,
    ) -> Result<tonic::Response<ProcessResponse>, tonic::Status> {
        Ok(tonic::Response::new(ProcessResponse::default()))
    }
    async fn get_runs(
        &self,
        _: tonic::Request<GetRunsRequest>,
    ) -> Result<tonic::Response<GetRunsResponse>, tonic::Status> {
        Ok(tonic::Response::new(GetRunsResponse::default()))
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Some(Cmd::BareServer { addr }) => runtime.block_on(async {
            tonic::transport::Server::builder()
                .add_service(PostSubProxyServer::new(Bare))
                .serve(addr)
                .await
                .context("bare server")
        }),
        None => runtime.block_on(run(&cli)),
    }
}

/// One load run's results.
#[derive(Debug, Clone)]
struct Load {
    ok: u64,
    errors: BTreeMap<String, u64>,
    elapsed: Duration,
    hist: Histogram<u64>,
}

impl Load {
    fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    fn us(&self, q: f64) -> u64 {
        self.hist.value_at_quantile(q)
    }
    fn json(&self) -> Value {
        json!({
            "ok": self.ok, "errors": self.errors, "seconds": self.elapsed.as_secs_f64(),
            "throughput_per_s": self.throughput(),
            "latency_us": {"p50": self.us(0.5), "p90": self.us(0.9), "p99": self.us(0.99), "p999": self.us(0.999), "max": self.hist.max()},
        })
    }
}

/// The run of median throughput among `loads` (the upper one of an even
/// count's middle two).
fn median_load(mut loads: Vec<Load>) -> Load {
    loads.sort_by(|a, b| a.throughput().total_cmp(&b.throughput()));
    loads.swap_remove(loads.len() / 2)
}

async fn connect(addr: SocketAddr) -> anyhow::Result<Channel> {
    let started = Instant::now();
    loop {
        match Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await
        {
            Ok(channel) => return Ok(channel),
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(err) => return Err(err).context(format!("connecting to {addr}")),
        }
    }
}

/// Drives Process at `concurrency` for `duration` (after a warm-up).
async fn load(
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
    form: Uuid,
) -> anyhow::Result<Load> {
    let channels = {
        let mut channels = Vec::new();
        for _ in 0..concurrency.div_ceil(8) {
            channels.push(connect(addr).await?);
        }
        channels
    };
    let submission = proto::json::json_to_struct(json!({
        "answers": {"name": "Ada Lovelace", "phone": "+44 20 7946 0000", "rating": 5, "comment": "quick and painless"},
        "metadata": {"device": "tablet-7", "locale": "en-GB"},
    }))
    .expect("an object");
    let run = |measure: Duration| {
        let channels = channels.clone();
        let submission = submission.clone();
        async move {
            let deadline = Instant::now() + measure;
            let workers = (0..concurrency).map(|i| {
                let mut client = PostSubProxyClient::new(channels[i % channels.len()].clone());
                let submission = submission.clone();
                tokio::spawn(async move {
                    let mut hist = Histogram::<u64>::new(3).expect("histogram");
                    let (mut ok, mut errors) = (0u64, BTreeMap::<String, u64>::new());
                    while Instant::now() < deadline {
                        let request = ProcessRequest {
                            form_id: form.to_string(),
                            submission_id: Uuid::new_v4().to_string(),
                            submission: Some(submission.clone()),
                            context: None,
                        };
                        let sent = Instant::now();
                        match client.process(request).await {
                            Ok(_) => {
                                ok += 1;
                                let _ = hist.record(sent.elapsed().as_micros() as u64);
                            }
                            Err(status) => {
                                *errors.entry(format!("{:?}", status.code())).or_default() += 1
                            }
                        }
                    }
                    (ok, errors, hist)
                })
            });
            let started = Instant::now();
            let results = futures_join(workers).await;
            let elapsed = started.elapsed();
            let mut total = Load {
                ok: 0,
                errors: BTreeMap::new(),
                elapsed,
                hist: Histogram::new(3).expect("histogram"),
            };
            for (ok, errors, hist) in results {
                total.ok += ok;
                for (code, n) in errors {
                    *total.errors.entry(code).or_default() += n;
                }
                total.hist.add(hist).expect("same histogram bounds");
            }
            total
        }
    };
    run(Duration::from_secs(1)).await; // warm-up: connections, plugin loads, caches
    Ok(run(duration).await)
}

async fn futures_join<T: Send + 'static>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        out.push(handle.await.expect("load task"));
    }
    out
}

/// PostgreSQL's one-row insert transactions per second at `concurrency`.
fn pg_inserts(url: &str, concurrency: usize, duration: Duration) -> anyhow::Result<f64> {
    let mut conn = PgConnection::establish(url)?;
    diesel::sql_query("CREATE TABLE IF NOT EXISTS bench_yardstick (id uuid PRIMARY KEY, payload jsonb NOT NULL, at timestamptz NOT NULL DEFAULT now())")
        .execute(&mut conn)?;
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let url = url.to_owned();
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut conn = PgConnection::establish(&url)?;
                let mut n = 0;
                while Instant::now() < deadline {
                    diesel::sql_query(format!(
                        "INSERT INTO bench_yardstick (id, payload) VALUES ('{}', '{{\"answers\": {{\"name\": \"Ada\", \"rating\": 5}}}}')",
                        Uuid::new_v4()
                    ))
                    .execute(&mut conn)?;
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for thread in threads {
        total += thread.join().expect("insert thread")?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

fn exe(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the release workspace first (make bench does)",
            path.display()
        );
    }
    Ok(path)
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A child process killed on drop.
struct Proc(Child);

impl Proc {
    fn peak_rss_kib(&self) -> Option<u64> {
        status_kib(self.0.id(), "VmHWM:")
    }

    /// The current resident memory of each of its child processes (plugin hosts).
    fn children_rss_kib(&self) -> Vec<u64> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.0.id()));
        tasks
            .into_iter()
            .flatten()
            .filter_map(|t| t.ok())
            .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|c| {
                c.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok())
                    .collect::<Vec<_>>()
            })
            .filter_map(|pid| status_kib(pid, "VmRSS:"))
            .collect()
    }
}

/// A `kB` field of `/proc/<pid>/status`.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Env {
    db_url: String,
    plugins: PathBuf,
    amqp_url: String,
    exchange: String,
    queue: String,
}

impl Env {
    fn daisy(&self, args: &[&str]) -> anyhow::Result<Proc> {
        let child = Command::new(exe("daisy")?)
            .args(args)
            .env("DATABASE_URL", &self.db_url)
            .env("DAISY_PLUGINS_DIR", &self.plugins)
            .env("AMQP_URL", &self.amqp_url)
            .env("DAISY_EXCHANGE", &self.exchange)
            .env("DAISY_QUEUE", &self.queue)
            .env("RUST_LOG", "error")
            .spawn()
            .context("starting daisy")?;
        Ok(Proc(child))
    }

    fn sql(&self, sql: &str) -> anyhow::Result<()> {
        use diesel::connection::SimpleConnection;
        let mut conn = PgConnection::establish(&self.db_url)?;
        conn.batch_execute(sql)?;
        Ok(())
    }

    fn count(&self, sql: &str) -> anyhow::Result<i64> {
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = PgConnection::establish(&self.db_url)?;
        Ok(diesel::sql_query(sql).get_result::<N>(&mut conn)?.n)
    }

    /// Lets the database settle before the next scenario: waits until the
    /// run log has written its backlog (the row count holds still), then
    /// vacuums and analyzes, so no scenario pays for the previous one's
    /// background writes or an autovacuum that its rows triggered.
    async fn settle(&self) -> anyhow::Result<()> {
        let mut last = -1;
        loop {
            let rows = self.count(
                "SELECT (SELECT count(*) FROM task_runs) + (SELECT count(*) FROM sync_runs) AS n",
            )?;
            if rows == last {
                break;
            }
            last = rows;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.sql("VACUUM ANALYZE")
    }

    fn attach_one(&self, form: Uuid, module: &str, func: &str) -> anyhow::Result<()> {
        self.sql(&format!(
            "INSERT INTO tasks (id, form_id, name, module, func, async_status) \
             VALUES (gen_random_uuid(), '{form}', '{func}', '{module}', '{func}', false)"
        ))
    }

    fn attach(&self, form: Uuid, tasks: &[(&str, bool)]) -> anyhow::Result<()> {
        for (i, (name, is_async)) in tasks.iter().enumerate() {
            self.sql(&format!(
                "INSERT INTO tasks (id, form_id, name, module, func, async_status, created_at) \
                 VALUES (gen_random_uuid(), '{form}', '{name}{i}', 'echo', 'echo', {is_async}, now() + interval '{i} milliseconds')"
            ))?;
        }
        Ok(())
    }
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    let seconds = if cli.quick { 2 } else { 10 };
    let duration = Duration::from_secs(seconds);
    let drain_runs: i64 = cli
        .drain_runs
        .unwrap_or(if cli.quick { 2_000 } else { 50_000 });
    let id = Uuid::new_v4().simple().to_string();
    let db_name = format!("daisy_bench_{}", &id[..12]);
    let mut admin = PgConnection::establish(&cli.admin_url).context("connecting to PostgreSQL")?;
    diesel::sql_query(format!("CREATE DATABASE {db_name}")).execute(&mut admin)?;
    let db_url = format!(
        "{}/{db_name}",
        cli.admin_url
            .rsplit_once('/')
            .map_or(cli.admin_url.as_str(), |(b, _)| b)
    );
    let plugins = std::env::temp_dir().join(format!("daisy-bench-plugins-{id}"));
    std::fs::create_dir_all(&plugins)?;
    std::fs::copy(exe("libecho.so")?, plugins.join("libecho.so"))?;
    std::fs::copy(exe("libtestkit.so")?, plugins.join("libtestkit.so"))?;
    let env = Env {
        db_url,
        plugins,
        amqp_url: cli.amqp_url.clone(),
        exchange: format!("daisy.bench.{id}"),
        queue: format!("daisy.bench.{id}.runs"),
    };
    let result = scenarios(&env, cli, duration, drain_runs).await;
    // Leave nothing behind, whatever happened.
    let _ = delete_queues(&env).await;
    let _ = std::fs::remove_dir_all(&env.plugins);
    let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
        .execute(&mut admin);
    result
}

async fn delete_queues(env: &Env) -> anyhow::Result<()> {
    use amqprs::{
        channel::{ExchangeDeleteArguments, QueueDeleteArguments},
        connection::{Connection as Amqp, OpenConnectionArguments},
    };
    let mut args = OpenConnectionArguments::try_from(env.amqp_url.as_str())?;
    args.virtual_host("/");
    let connection = Amqp::open(&args).await?;
    let channel = connection.open_channel(None).await?;
    for queue in [env.queue.clone(), format!("{}.dead", env.queue)] {
        let _ = channel
            .queue_delete(QueueDeleteArguments::new(&queue))
            .await;
    }
    let _ = channel
        .exchange_delete(ExchangeDeleteArguments::new(&env.exchange))
        .await;
    let _ = connection.close().await;
    Ok(())
}

async fn scenarios(
    env: &Env,
    cli: &Cli,
    duration: Duration,
    drain_runs: i64,
) -> anyhow::Result<()> {
    let status = Command::new(exe("daisy")?)
        .arg("migrate")
        .env("DATABASE_URL", &env.db_url)
        .output()?;
    if !status.status.success() {
        bail!("daisy migrate: {}", String::from_utf8_lossy(&status.stderr));
    }
    let mut report = serde_json::Map::new();
    let mut rows: Vec<(String, String)> = Vec::new();

    // Yardstick: the bare server.
    let bare_addr = free_port()?;
    let _bare = Proc(
        Command::new(std::env::current_exe()?)
            .args(["bare-server", "--addr", &bare_addr.to_string()])
            .spawn()?,
    );
    let bare32 = load(bare_addr, 32, duration, Uuid::new_v4()).await?;
    let bare1 = load(bare_addr, 1, duration, Uuid::new_v4()).await?;
    rows.push(("bare server, c=32".into(), line(&bare32)));
    rows.push(("bare server, c=1".into(), line(&bare1)));
    report.insert("bare_c32".into(), bare32.json());
    report.insert("bare_c1".into(), bare1.json());
    drop(_bare);

    // Yardstick: PostgreSQL one-row insert transactions.
    let db_url = env.db_url.clone();
    let pg = tokio::task::spawn_blocking(move || pg_inserts(&db_url, 32, duration)).await??;
    rows.push((
        "PostgreSQL 1-row insert txns, c=32".into(),
        format!("{pg:>9.0}/s"),
    ));
    report.insert("pg_insert_c32_per_s".into(), json!(pg));

    // Daisy.
    let addr = free_port()?;
    let serve = env.daisy(&["serve", "--addr", &addr.to_string()])?;
    let (none, one, five, mixed) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    env.attach(one, &[("echo", false)])?;
    env.attach(five, &[("echo", false); 5])?;
    env.attach(mixed, &[("echo", false), ("archive", true)])?;
    let mut ratios = serde_json::Map::new();
    let mut targets: Vec<(String, String)> = Vec::new();
    if cli.wants(Group::Sync) {
        env.settle().await?;
        let s1 = load(addr, 32, duration, none).await?;
        let s2 = load(addr, 32, duration, one).await?;
        env.settle().await?;
        let s3 = load(addr, 32, duration, five).await?;
        env.settle().await?;
        let s6 = load(addr, 1, duration, one).await?;
        env.settle().await?;
        // Scenario 2 again without a run-log row per successful run.
        let lean_addr = free_port()?;
        let lean = env.daisy(&[
            "serve",
            "--addr",
            &lean_addr.to_string(),
            "--sync-run-log",
            "failed",
        ])?;
        let s2_lean = load(lean_addr, 32, duration, one).await?;
        drop(lean);
        env.settle().await?;
        // Scenarios 2 and 6 with the plugin in-process instead of in a host.
        let inproc_addr = free_port()?;
        let inproc = env.daisy(&[
            "serve",
            "--addr",
            &inproc_addr.to_string(),
            "--isolation",
            "in-process",
        ])?;
        let s2_inproc = load(inproc_addr, 32, duration, one).await?;
        env.settle().await?;
        let s6_inproc = load(inproc_addr, 1, duration, one).await?;
        drop(inproc);
        env.settle().await?;
        // Scenario 2 with metrics off and on (the operations listener
        // installs the recorder): two serves started side by side, loaded in
        // turn for several rounds, so the machine's drift hits both alike;
        // the medians are compared.
        let (off_addr, on_addr, ops_addr) = (free_port()?, free_port()?, free_port()?);
        let off = env.daisy(&["serve", "--addr", &off_addr.to_string()])?;
        let on = env.daisy(&[
            "serve",
            "--addr",
            &on_addr.to_string(),
            "--http-addr",
            &ops_addr.to_string(),
        ])?;
        let rounds = if cli.quick { 2 } else { 5 };
        let (mut s2_off, mut s2_metrics) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            s2_off.push(load(off_addr, 32, duration, one).await?);
            env.settle().await?;
            s2_metrics.push(load(on_addr, 32, duration, one).await?);
            env.settle().await?;
        }
        drop((off, on));
        let per_round = |loads: &[Load]| loads.iter().map(Load::throughput).collect::<Vec<_>>();
        report.insert(
            "s2_metrics_rounds_per_s".into(),
            json!({"off": per_round(&s2_off), "on": per_round(&s2_metrics)}),
        );
        let (s2_off, s2_metrics) = (median_load(s2_off), median_load(s2_metrics));
        // An idle plugin host: serve's echo host, a second after its last call.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let host_rss = serve.children_rss_kib().into_iter().max();
        rows.push((
            "RSS of an idle plugin host (echo)".into(),
            format!("{:>9} KiB", host_rss.unwrap_or(0)),
        ));
        report.insert("idle_host_rss_kib".into(), json!(host_rss));
        // After a host crash: how soon the library's next call is answered.
        let crash = crash_recovery(env, if cli.quick { 5 } else { 20 }).await?;
        rows.push((
            "after a host crash, next call to the library".into(),
            format!(
                "p50 {:>6} µs  max {:>7} µs  ({} crashes)",
                crash.value_at_quantile(0.5),
                crash.max(),
                crash.len()
            ),
        ));
        report.insert(
            "after_crash_next_call_us".into(),
            json!({"p50": crash.value_at_quantile(0.5), "max": crash.max()}),
        );
        targets.push((
            "next call after a host crash (target < 50,000 µs)".into(),
            format!("{:>9} µs", crash.max()),
        ));
        for (name, key, l) in [
            ("1: no tasks, c=32", "s1_no_tasks_c32", &s1),
            ("2: one sync echo, c=32", "s2_one_sync_c32", &s2),
            (
                "2, --sync-run-log failed",
                "s2_one_sync_c32_log_failed",
                &s2_lean,
            ),
            ("3: five sync echo, c=32", "s3_five_sync_c32", &s3),
            ("6: one sync echo, c=1", "s6_one_sync_c1", &s6),
            ("2, in-process", "s2_one_sync_c32_in_process", &s2_inproc),
            ("6, in-process", "s6_one_sync_c1_in_process", &s6_inproc),
            (
                "2, metrics off (median of rounds)",
                "s2_metrics_off",
                &s2_off,
            ),
            (
                "2, metrics on (median of rounds)",
                "s2_metrics_on",
                &s2_metrics,
            ),
        ] {
            rows.push((name.into(), line(l)));
            report.insert(key.into(), l.json());
        }
        let s2_vs_bare = s2.throughput() / bare32.throughput();
        let s6_overhead = s6.us(0.5) as i64 - bare1.us(0.5) as i64;
        ratios.insert("s2_throughput_vs_bare".into(), json!(s2_vs_bare));
        ratios.insert("s2_p99_us".into(), json!(s2.us(0.99)));
        ratios.insert("s6_p50_overhead_us".into(), json!(s6_overhead));
        let lean_vs_bare = s2_lean.throughput() / bare32.throughput();
        ratios.insert(
            "s2_log_failed_throughput_vs_bare".into(),
            json!(lean_vs_bare),
        );
        let inproc_vs_bare = s2_inproc.throughput() / bare32.throughput();
        let s6_inproc_overhead = s6_inproc.us(0.5) as i64 - bare1.us(0.5) as i64;
        ratios.insert(
            "s2_in_process_throughput_vs_bare".into(),
            json!(inproc_vs_bare),
        );
        ratios.insert(
            "s6_in_process_p50_overhead_us".into(),
            json!(s6_inproc_overhead),
        );
        targets.push((
            "2 vs bare throughput, process isolation (target >= 50%; 60% in #13)".into(),
            format!("{:>9.0}%", 100.0 * s2_vs_bare),
        ));
        let metrics_cost = 1.0 - s2_metrics.throughput() / s2_off.throughput();
        ratios.insert("s2_metrics_cost".into(), json!(metrics_cost));
        targets.push((
            "2, metrics on vs off (target within 3%)".into(),
            format!("{:>9.1}%", -100.0 * metrics_cost),
        ));
        targets.push((
            "2 vs bare throughput, in-process".into(),
            format!("{:>9.0}%", 100.0 * inproc_vs_bare),
        ));
        targets.push((
            "6 p50 overhead, in-process (target < 100 µs)".into(),
            format!("{s6_inproc_overhead:>9} µs"),
        ));
        targets.push((
            "2 vs bare, --sync-run-log failed".into(),
            format!("{:>9.0}%", 100.0 * lean_vs_bare),
        ));
        targets.push((
            "2 p99 (target < 3000 µs)".into(),
            format!("{:>9} µs", s2.us(0.99)),
        ));
        targets.push((
            "6 p50 overhead, process isolation (target < 150 µs)".into(),
            format!("{s6_overhead:>9} µs"),
        ));
    }

    // Scenario 5 (before 4, so the queue holds only its own runs): drain runs
    // already accepted, with 1 and with 2 workers.
    let mut workers_rss = None;
    let drains: &[usize] = if cli.wants(Group::Drain) {
        &[1, 2]
    } else {
        &[]
    };
    for &workers in drains {
        env.settle().await?;
        let form = Uuid::new_v4();
        env.attach(form, &[("drain", true)])?;
        env.sql(&format!(
            "INSERT INTO submissions (id, form_id, payload) SELECT id, '{form}', '{{\"answers\": {{\"n\": 1}}}}' \
             FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, {drain_runs})) s; \
             INSERT INTO task_runs (id, submission_id, form_id, task_id, task_name, is_async, state, max_attempts, next_attempt_at) \
             SELECT gen_random_uuid(), s.id, s.form_id, t.id, t.name, true, 'queued', 5, now() \
             FROM submissions s JOIN tasks t ON t.form_id = s.form_id WHERE s.form_id = '{form}'"
        ))?;
        let started = Instant::now();
        let procs: Vec<Proc> = (0..workers)
            .map(|_| env.daisy(&["worker"]))
            .collect::<Result<_, _>>()?;
        let limit = Duration::from_secs(if cli.quick { 120 } else { 900 });
        loop {
            let done = env.count(&format!("SELECT count(*) AS n FROM task_runs WHERE form_id = '{form}' AND state = 'succeeded'"))?;
            if done >= drain_runs {
                break;
            }
            if started.elapsed() > limit {
                bail!(
                    "scenario 5 with {workers} worker(s): only {done} of {drain_runs} runs done after {limit:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rate = drain_runs as f64 / started.elapsed().as_secs_f64();
        workers_rss = procs
            .iter()
            .filter_map(Proc::peak_rss_kib)
            .max()
            .max(workers_rss);
        rows.push((
            format!("5: drain {drain_runs} runs, {workers} worker(s)"),
            format!("{rate:>9.0}/s"),
        ));
        report.insert(format!("s5_drain_{workers}_workers_per_s"), json!(rate));
    }
    // Scenario 4: the accept rate (outbox commit and publish); nobody consumes.
    let mut serve_rss = None;
    if cli.wants(Group::Accept) {
        env.settle().await?;
        let s4 = load(addr, 32, duration, mixed).await?;
        serve_rss = serve.peak_rss_kib();
        rows.push(("4: sync + async, c=32".into(), line(&s4)));
        report.insert("s4_sync_async_c32".into(), s4.json());
        ratios.insert(
            "s4_accept_vs_pg_inserts".into(),
            json!(s4.throughput() / pg),
        );
        targets.push((
            "4 accept rate vs PG inserts (target >= 50%)".into(),
            format!("{:>9.0}%", 100.0 * s4.throughput() / pg),
        ));
    }
    report.insert("ratios".into(), Value::Object(ratios));
    rows.extend(targets);
    drop(serve);
    rows.push((
        "peak RSS daisy serve (after 4)".into(),
        format!("{:>9} KiB", serve_rss.unwrap_or(0)),
    ));
    rows.push((
        "peak RSS daisy worker (after 5)".into(),
        format!("{:>9} KiB", workers_rss.unwrap_or(0)),
    ));
    report.insert(
        "rss_kib".into(),
        json!({"serve": serve_rss, "worker": workers_rss}),
    );

    let machine = format!(
        "{} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if cli.quick { "quick run" } else { "full run" }
    );
    report.insert("machine".into(), json!(machine));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut md = format!("| scenario ({machine}) | result |\n|---|---|\n");
    println!();
    for (k, v) in &rows {
        println!("{k:<width$}  {v}");
        md.push_str(&format!("| {k} | {} |\n", v.trim()));
    }
    std::fs::create_dir_all(&cli.out)?;
    std::fs::write(
        cli.out.join("report.json"),
        serde_json::to_string_pretty(&Value::Object(report))?,
    )?;
    std::fs::write(cli.out.join("report.md"), md)?;
    println!(
        "\nwrote {} and report.md",
        cli.out.join("report.json").display()
    );
    Ok(())
}

/// Crashes testkit's host `times` times (a serve of its own, so that the
/// crashing task is never quarantined) and times the next call to the same
/// library after each crash.
async fn crash_recovery(env: &Env, times: usize) -> anyhow::Result<Histogram<u64>> {
    let addr = free_port()?;
    let _serve = env.daisy(&[
        "serve",
        "--addr",
        &addr.to_string(),
        "--quarantine-after",
        "1000000",
    ])?;
    let (crash, after) = (Uuid::new_v4(), Uuid::new_v4());
    env.attach_one(crash, "testkit", "segfault")?;
    env.attach_one(after, "testkit", "echo")?;
    let mut client = PostSubProxyClient::new(connect(addr).await?);
    let call = |form: Uuid| ProcessRequest {
        form_id: form.to_string(),
        submission_id: Uuid::new_v4().to_string(),
        submission: Some(proto::json::json_to_struct(json!({"n": 1})).expect("an object")),
        context: None,
    };
    client.process(call(after)).await?; // the host is up
    let mut hist = Histogram::<u64>::new(3)?;
    for _ in 0..times {
        client.process(call(crash)).await?;
        let sent = Instant::now();
        let response = client.process(call(after)).await?.into_inner();
        if response.results.iter().any(|r| !r.error.is_empty()) {
            bail!("the call after a crash failed: {response:?}");
        }
        hist.record(sent.elapsed().as_micros() as u64)?;
        // Let the backoff for crashes in a row reset, as between real crashes.
        tokio::time::sleep(Duration::from_millis(if times > 5 { 1600 } else { 200 })).await;
    }
    Ok(hist)
}

fn line(l: &Load) -> String {
    let errors = if l.errors.is_empty() {
        String::new()
    } else {
        format!("  errors {:?}", l.errors)
    };
    format!(
        "{:>9.0}/s  p50 {:>6} µs  p90 {:>6}  p99 {:>6}  p99.9 {:>6}  max {:>7}{errors}",
        l.throughput(),
        l.us(0.5),
        l.us(0.9),
        l.us(0.99),
        l.us(0.999),
        l.hist.max()
    )
}
