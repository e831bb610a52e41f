//! The load scenarios against release `daisy` processes: the synchronous
//! path (1, 2, 3, 6, and 2 and 6 with other settings), draining accepted
//! runs (5), the accept rate (4), a plugin host's memory and its recovery
//! after a crash; each set against the yardsticks.

use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use proto::v1::ProcessRequest;
use serde_json::json;
use test_support::{Daisy, TestDb, free_port};
use uuid::Uuid;

use crate::{
    Cli, Env, Group,
    load::{Load, line, load, median_load},
    report::Report,
    yardsticks::{self, Yardsticks},
};

/// The forms the scenarios load, each with echo tasks.
struct Forms {
    /// No tasks.
    none: Uuid,
    /// One synchronous task.
    one: Uuid,
    /// Five synchronous tasks.
    five: Uuid,
    /// One synchronous task and one asynchronous.
    mixed: Uuid,
}

/// Runs the yardsticks and the scenarios `cli` wants, and writes the report.
pub async fn run(env: &Env, cli: &Cli) -> anyhow::Result<()> {
    let seconds = if cli.quick { 2 } else { 10 };
    let duration = Duration::from_secs(seconds);
    let drain_runs: i64 = cli
        .drain_runs
        .unwrap_or(if cli.quick { 2_000 } else { 50_000 });
    let mut report = Report::default();
    let yard = yardsticks::measure(&env.db, duration, &mut report).await?;

    // Daisy.
    let addr = free_port();
    let serve = env.daisy.serve(addr, &[]);
    let forms = Forms {
        none: Uuid::new_v4(),
        one: Uuid::new_v4(),
        five: Uuid::new_v4(),
        mixed: Uuid::new_v4(),
    };
    attach_echo(&env.db, forms.one, &[("echo", false)]);
    attach_echo(&env.db, forms.five, &[("echo", false); 5]);
    attach_echo(&env.db, forms.mixed, &[("echo", false), ("archive", true)]);
    if cli.wants(Group::Sync) {
        sync(env, cli, duration, &serve, &forms, &yard, &mut report).await?;
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
        let (rate, rss) = drain(env, cli, workers, drain_runs).await?;
        workers_rss = rss.max(workers_rss);
        report.rows.push((
            format!("5: drain {drain_runs} runs, {workers} worker(s)"),
            format!("{rate:>9.0}/s"),
        ));
        report
            .json
            .insert(format!("s5_drain_{workers}_workers_per_s"), json!(rate));
    }
    // Scenario 4: the accept rate (outbox commit and publish); nobody consumes.
    let mut serve_rss = None;
    if cli.wants(Group::Accept) {
        env.db.settle().await;
        let s4 = load(addr, 32, duration, forms.mixed).await;
        serve_rss = serve.peak_rss_kib();
        report
            .rows
            .push(("4: sync + async, c=32".into(), line(&s4)));
        report.json.insert("s4_sync_async_c32".into(), s4.json());
        let accept_vs_pg = s4.throughput() / yard.pg;
        report
            .ratios
            .insert("s4_accept_vs_pg_inserts".into(), json!(accept_vs_pg));
        report.targets.push((
            "4 accept rate vs PG inserts (target >= 50%)".into(),
            format!("{:>9.0}%", 100.0 * accept_vs_pg),
        ));
    }
    drop(serve);
    report.json.insert(
        "rss_kib".into(),
        json!({"serve": serve_rss, "worker": workers_rss}),
    );
    let rss = vec![
        (
            "peak RSS daisy serve (after 4)".into(),
            format!("{:>9} KiB", serve_rss.unwrap_or(0)),
        ),
        (
            "peak RSS daisy worker (after 5)".into(),
            format!("{:>9} KiB", workers_rss.unwrap_or(0)),
        ),
    ];
    report.write(rss, cli.quick, &cli.out)
}

/// Attaches `tasks` (name, whether asynchronous) of plugin echo to `form`,
/// numbered in order.
fn attach_echo(db: &TestDb, form: Uuid, tasks: &[(&str, bool)]) {
    for (i, (name, is_async)) in tasks.iter().enumerate() {
        let name = format!("{name}{i}");
        db.attach(form, &name, "echo", "echo", *is_async, &json!({}));
    }
}

/// Scenarios 1, 2, 3 and 6 on `serve`, 2 and 6 again with other settings,
/// an idle plugin host's memory and the recovery after a host crash; the
/// targets against the bare server from paired rounds.
async fn sync(
    env: &Env,
    cli: &Cli,
    duration: Duration,
    serve: &Daisy,
    forms: &Forms,
    yard: &Yardsticks,
    out: &mut Report,
) -> anyhow::Result<()> {
    let addr = serve.addr.expect("a serve process");
    let Forms {
        none, one, five, ..
    } = *forms;
    let Yardsticks { bare32, .. } = yard;
    let Report {
        json: report,
        rows,
        ratios,
        targets,
    } = out;
    env.db.settle().await;
    let s1 = load(addr, 32, duration, none).await;
    let s2 = load(addr, 32, duration, one).await;
    env.db.settle().await;
    let s3 = load(addr, 32, duration, five).await;
    env.db.settle().await;
    let s6 = load(addr, 1, duration, one).await;
    env.db.settle().await;
    // Scenario 2 again without a run-log row per successful run.
    let lean_addr = free_port();
    let lean = env.daisy.serve(lean_addr, &["--sync-run-log", "failed"]);
    let s2_lean = load(lean_addr, 32, duration, one).await;
    drop(lean);
    env.db.settle().await;
    // Scenarios 2 and 6 with the plugin in-process instead of in a host.
    let inproc_addr = free_port();
    let inproc = env.daisy.serve(inproc_addr, &["--isolation", "in-process"]);
    let s2_inproc = load(inproc_addr, 32, duration, one).await;
    env.db.settle().await;
    let s6_inproc = load(inproc_addr, 1, duration, one).await;
    drop(inproc);
    env.db.settle().await;
    // Scenario 2 with metrics off and on (the operations listener installs
    // the recorder): two serves started side by side, loaded in turn for
    // several rounds, so the machine's drift hits both alike; the medians
    // are compared.
    let (off_addr, on_addr, ops_addr) = (free_port(), free_port(), free_port());
    let off = env.daisy.serve(off_addr, &[]);
    let on = env
        .daisy
        .serve(on_addr, &["--http-addr", &ops_addr.to_string()]);
    let rounds = if cli.quick { 2 } else { 5 };
    let (mut s2_off, mut s2_metrics) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        s2_off.push(load(off_addr, 32, duration, one).await);
        env.db.settle().await;
        s2_metrics.push(load(on_addr, 32, duration, one).await);
        env.db.settle().await;
    }
    drop((off, on));
    let per_round = |loads: &[Load]| loads.iter().map(Load::throughput).collect::<Vec<_>>();
    report.insert(
        "s2_metrics_rounds_per_s".into(),
        json!({"off": per_round(&s2_off), "on": per_round(&s2_metrics)}),
    );
    // Each round pairs an off load with the on load right after it: the
    // median of the rounds' ratios is the cost, robust to a round the
    // machine disturbed.
    let mut paired: Vec<f64> = s2_off
        .iter()
        .zip(&s2_metrics)
        .map(|(off, on)| 1.0 - on.throughput() / off.throughput())
        .collect();
    paired.sort_by(f64::total_cmp);
    let metrics_cost = paired[paired.len() / 2];
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
    // The targets against the bare server: medians of paired rounds. The
    // single loads above set the bare server's figures from the start of
    // the run against Daisy's from minutes later, and this machine's bare
    // server alone has moved by half between two runs; here each round
    // loads the bare server, then Daisy with each isolation, in the same
    // seconds, and the median round is the figure.
    let paired = paired_with_bare(env, cli, addr, forms).await?;
    report.insert("paired_rounds".into(), paired.json());
    let lean_vs_bare = s2_lean.throughput() / bare32.throughput();
    ratios.insert("s2_throughput_vs_bare".into(), json!(paired.s2_process));
    ratios.insert("s2_p99_us".into(), json!(s2.us(0.99)));
    ratios.insert("s6_p50_overhead_us".into(), json!(paired.s6_process));
    ratios.insert(
        "s2_log_failed_throughput_vs_bare".into(),
        json!(lean_vs_bare),
    );
    ratios.insert(
        "s2_in_process_throughput_vs_bare".into(),
        json!(paired.s2_in_process),
    );
    ratios.insert(
        "s6_in_process_p50_overhead_us".into(),
        json!(paired.s6_in_process),
    );
    targets.push((
        "2 vs bare throughput, process isolation, paired rounds (target >= 50%; 60% in #13)".into(),
        format!("{:>9.0}%", 100.0 * paired.s2_process),
    ));
    ratios.insert("s2_metrics_cost".into(), json!(metrics_cost));
    targets.push((
        "2, metrics on vs off, median of paired rounds (target within 3%)".into(),
        format!("{:>9.1}%", -100.0 * metrics_cost),
    ));
    targets.push((
        "2 vs bare throughput, in-process, paired rounds".into(),
        format!("{:>9.0}%", 100.0 * paired.s2_in_process),
    ));
    targets.push((
        "6 p50 overhead, in-process, paired rounds (target < 100 µs)".into(),
        format!("{:>9} µs", paired.s6_in_process),
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
        "6 p50 overhead, process isolation, paired rounds (target < 150 µs)".into(),
        format!("{:>9} µs", paired.s6_process),
    ));
    Ok(())
}

/// The targets set against the bare server, each the median of its
/// rounds' figures.
struct Paired {
    /// Scenario 2's throughput over the bare server's, process isolation.
    s2_process: f64,
    /// The same, in-process.
    s2_in_process: f64,
    /// Scenario 6's p50 minus the bare server's, process isolation (µs).
    s6_process: i64,
    /// The same, in-process.
    s6_in_process: i64,
    /// Each round's figures, in that order.
    rounds: Vec<[f64; 4]>,
}

impl Paired {
    fn json(&self) -> serde_json::Value {
        json!({
            "s2_process": self.s2_process,
            "s2_in_process": self.s2_in_process,
            "s6_process_us": self.s6_process,
            "s6_in_process_us": self.s6_in_process,
            "rounds": self.rounds,
        })
    }
}

/// Rounds of: the bare server, Daisy with process isolation (the serve at
/// `process_addr`, already warm), Daisy in-process, at c=32 and then at
/// c=1 (scenarios 2 and 6), each load followed by the settling the other
/// scenarios get; the median of the rounds' ratios and overheads.
async fn paired_with_bare(
    env: &Env,
    cli: &Cli,
    process_addr: std::net::SocketAddr,
    forms: &Forms,
) -> anyhow::Result<Paired> {
    let (rounds, seconds) = if cli.quick { (2, 1) } else { (5, 5) };
    let duration = Duration::from_secs(seconds);
    let (bare_addr, inproc_addr) = (free_port(), free_port());
    let _bare = yardsticks::spawn_bare(bare_addr)?;
    let _inproc = env.daisy.serve(inproc_addr, &["--isolation", "in-process"]);
    // Warm the in-process serve (its library loaded, its connections
    // pooled) before the first round.
    load(inproc_addr, 32, Duration::from_secs(1), forms.one).await;
    env.db.settle().await;
    let mut figures = Vec::new();
    for _ in 0..rounds {
        let mut round = [0.0; 4];
        let bare = load(bare_addr, 32, duration, forms.none).await;
        for (i, addr) in [process_addr, inproc_addr].into_iter().enumerate() {
            round[i] = load(addr, 32, duration, forms.one).await.throughput() / bare.throughput();
            env.db.settle().await;
        }
        let bare = load(bare_addr, 1, duration, forms.none).await;
        for (i, addr) in [process_addr, inproc_addr].into_iter().enumerate() {
            let daisy = load(addr, 1, duration, forms.one).await;
            round[2 + i] = daisy.us(0.5) as f64 - bare.us(0.5) as f64;
            env.db.settle().await;
        }
        figures.push(round);
    }
    let median = |i: usize| {
        let mut column: Vec<f64> = figures.iter().map(|r| r[i]).collect();
        column.sort_by(f64::total_cmp);
        column[column.len() / 2]
    };
    Ok(Paired {
        s2_process: median(0),
        s2_in_process: median(1),
        s6_process: median(2) as i64,
        s6_in_process: median(3) as i64,
        rounds: figures,
    })
}

/// Scenario 5 with `workers` workers: `runs` runs accepted beforehand (rows
/// written straight to the database), drained; the rate and the workers'
/// peak memory.
async fn drain(
    env: &Env,
    cli: &Cli,
    workers: usize,
    runs: i64,
) -> anyhow::Result<(f64, Option<u64>)> {
    env.db.settle().await;
    let form = Uuid::new_v4();
    attach_echo(&env.db, form, &[("drain", true)]);
    env.db.execute(&format!(
        "INSERT INTO submissions (id, form_id, payload) SELECT id, '{form}', '{{\"answers\": {{\"n\": 1}}}}' \
         FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, {runs})) s; \
         INSERT INTO task_runs (id, submission_id, form_id, task_id, task_name, is_async, state, max_attempts, next_attempt_at) \
         SELECT gen_random_uuid(), s.id, s.form_id, t.id, t.name, true, 'queued', 5, now() \
         FROM submissions s JOIN tasks t ON t.form_id = s.form_id WHERE s.form_id = '{form}'"
    ));
    let started = Instant::now();
    let procs: Vec<Daisy> = (0..workers).map(|_| env.daisy.worker(&[])).collect();
    let limit = Duration::from_secs(if cli.quick { 120 } else { 900 });
    loop {
        let done: i64 = env.db.query_one(&format!(
            "SELECT count(*)::text FROM task_runs WHERE form_id = '{form}' AND state = 'succeeded'"
        )).parse()?;
        if done >= runs {
            break;
        }
        if started.elapsed() > limit {
            bail!(
                "scenario 5 with {workers} worker(s): only {done} of {runs} runs done after {limit:?}"
            );
        }
        // Counting is not free on a big table: often enough for a 1% figure
        // at 50,000 runs, rarely enough not to slow the drain it measures.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rate = runs as f64 / started.elapsed().as_secs_f64();
    Ok((rate, procs.iter().filter_map(|w| w.peak_rss_kib()).max()))
}

/// Crashes testkit's host `times` times (a serve of its own, so that the
/// crashing task is never quarantined) and times the next call to the same
/// library after each crash.
async fn crash_recovery(env: &Env, times: usize) -> anyhow::Result<Histogram<u64>> {
    let serve = env
        .daisy
        .serve(free_port(), &["--quarantine-after", "1000000"]);
    let (crash, after) = (Uuid::new_v4(), Uuid::new_v4());
    env.db
        .attach(crash, "segfault", "testkit", "segfault", false, &json!({}));
    env.db
        .attach(after, "echo", "testkit", "echo", false, &json!({}));
    let mut client = serve.client().await;
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
