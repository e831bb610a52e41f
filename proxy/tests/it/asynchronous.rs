//! Asynchronous tasks: the outbox, RabbitMQ, workers, retries and the run log.
//! Faults are injected for real: TCP relays cut connections, SIGKILL kills
//! processes; the machine's shared servers are never touched.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use proto::v1::{GetRunsRequest, Outcome, RunState};
use proxy::registry::{ClaimRequest, Finish, NewTask};
use serde_json::json;
use uuid::Uuid;

use crate::util::*;

/// An asynchronous testkit task with defaults for everything but what matters.
pub(crate) fn async_task(
    form: Uuid,
    name: &str,
    func: &str,
    config: serde_json::Value,
    max_attempts: i32,
) -> NewTask {
    NewTask {
        form_id: form,
        name: name.into(),
        module: "testkit".into(),
        func: func.into(),
        is_async: true,
        config,
        enabled: true,
        timeout_ms: 10_000,
        max_attempts,
        isolation: None,
    }
}

fn state_of(runs: &[proto::v1::Run], name: &str) -> RunState {
    runs.iter()
        .find(|r| r.name == name)
        .map_or(RunState::Unspecified, |r| r.state())
}

fn all_succeeded(runs: &[proto::v1::Run]) -> bool {
    !runs.is_empty() && runs.iter().all(|r| r.state() == RunState::Succeeded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_task_runs_on_a_worker_and_get_runs_shows_every_run() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    plugins.install("echo", "echo");
    let queue = TestQueue::new();
    let form = Uuid::new_v4();
    db.attach(form, "validate", "echo", "echo", json!({}));
    let task = db.attach_with(async_task(
        form,
        "sheet_row",
        "config",
        json!({"sheet": "A"}),
        3,
    ));
    let server =
        TestServer::start_with(server_config(&db.url, plugins.path(), queue.config.clone())).await;
    let _worker = queue.worker(&db.url, plugins.path(), None, &[]);
    let mut client = server.client().await;

    let request = request(form, sample());
    let response = client
        .process(request.clone())
        .await
        .expect("accepted")
        .into_inner();

    assert_eq!(
        response.results.len(),
        1,
        "the synchronous task answers inline"
    );
    assert_eq!(response.results[0].outcome(), Outcome::Succeeded);
    assert_eq!(response.enqueued.len(), 1);
    let enqueued = &response.enqueued[0];
    assert_eq!(
        (enqueued.task_id.as_str(), enqueued.name.as_str()),
        (task.id.to_string().as_str(), "sheet_row")
    );
    let runs = wait_for_runs(
        &mut client,
        &request.submission_id,
        Duration::from_secs(30),
        |runs| runs.len() == 2 && all_succeeded(runs),
    )
    .await;
    let run = runs.iter().find(|r| r.is_async).expect("the async run");
    assert_eq!(run.run_id, enqueued.run_id);
    assert_eq!(run.attempts, 1);
    assert_eq!(
        to_json(run.output.as_ref().expect("output")),
        json!({"sheet": "A"})
    );
    let sync = runs
        .iter()
        .find(|r| !r.is_async)
        .expect("the sync run is logged too");
    assert_eq!(sync.name, "validate");
    assert_eq!(to_json(sync.output.as_ref().expect("output")), sample());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_run_log_failed_records_only_the_failures_and_every_async_run() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    plugins.install("echo", "echo");
    let queue = TestQueue::new();
    let form = Uuid::new_v4();
    db.attach(form, "validate", "echo", "echo", json!({}));
    db.attach(form, "broken", "testkit", "fail", json!({}));
    db.attach_with(async_task(form, "row", "config", json!({}), 3));
    let config = proxy::Config {
        sync_run_log: proxy::SyncRunLog::Failed,
        ..server_config(&db.url, plugins.path(), queue.config.clone())
    };
    let server = TestServer::start_with(config).await;
    let _worker = queue.worker(&db.url, plugins.path(), None, &[]);
    let mut client = server.client().await;

    let request = request(form, sample());
    let response = client
        .process(request.clone())
        .await
        .expect("accepted")
        .into_inner();
    let outcomes: Vec<_> = response.results.iter().map(|r| r.outcome()).collect();
    assert_eq!(
        outcomes,
        [Outcome::Succeeded, Outcome::Failed],
        "the caller still gets every result"
    );
    wait_for_runs(
        &mut client,
        &request.submission_id,
        Duration::from_secs(30),
        |runs| {
            runs.len() == 2
                && runs
                    .iter()
                    .any(|r| r.is_async && r.state() == RunState::Succeeded)
        },
    )
    .await;
    // Give the run log writer time to write anything it would.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = wait_for_runs(&mut client, &request.submission_id, Duration::ZERO, |_| {
        true
    })
    .await;
    let mut names: Vec<_> = runs.iter().map(|r| r.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["broken", "row"],
        "the successful synchronous run is not recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_submission_creates_no_new_runs() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let queue = TestQueue::new();
    let form = Uuid::new_v4();
    db.attach_with(async_task(form, "a", "config", json!({}), 3));
    db.attach_with(async_task(form, "b", "config", json!({}), 3));
    let server =
        TestServer::start_with(server_config(&db.url, plugins.path(), queue.config.clone())).await;
    let client = server.client().await;

    let request = request(form, sample());
    // Twice in a row, then eight at once.
    let mut answers = Vec::new();
    for _ in 0..2 {
        answers.push(
            client
                .clone()
                .process(request.clone())
                .await
                .expect("ok")
                .into_inner(),
        );
    }
    let concurrent = (0..8).map(|_| {
        let (mut client, request) = (client.clone(), request.clone());
        tokio::spawn(async move { client.process(request).await.map(|r| r.into_inner()) })
    });
    for call in futures::future::join_all(concurrent).await {
        answers.push(call.expect("task").expect("ok"));
    }

    let ids = |r: &proto::v1::ProcessResponse| {
        let mut ids: Vec<_> = r
            .enqueued
            .iter()
            .map(|e| (e.name.clone(), e.run_id.clone()))
            .collect();
        ids.sort();
        ids
    };
    let first = ids(&answers[0]);
    assert_eq!(first.len(), 2);
    for answer in &answers {
        assert_eq!(
            ids(answer),
            first,
            "every replay answers with the same run ids"
        );
    }
    let runs = client
        .clone()
        .get_runs(GetRunsRequest {
            submission_id: request.submission_id.clone(),
        })
        .await
        .expect("ok")
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 2, "one run per async task: {runs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_are_retried_with_backoff_and_dead_runs_can_be_retried() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let queue = TestQueue::new();
    let form = Uuid::new_v4();
    db.attach_with(async_task(
        form,
        "flaky",
        "flaky",
        json!({"succeed_on": 3}),
        5,
    ));
    let always = db.attach_with(async_task(
        form,
        "always",
        "flaky",
        json!({"succeed_on": 99}),
        3,
    ));
    let server =
        TestServer::start_with(server_config(&db.url, plugins.path(), queue.config.clone())).await;
    let _worker = queue.worker(&db.url, plugins.path(), None, &[]);
    let mut client = server.client().await;

    let request = request(form, sample());
    let response = client
        .process(request.clone())
        .await
        .expect("ok")
        .into_inner();
    let runs = wait_for_runs(
        &mut client,
        &request.submission_id,
        Duration::from_secs(60),
        |runs| {
            state_of(runs, "flaky") == RunState::Succeeded
                && state_of(runs, "always") == RunState::Dead
        },
    )
    .await;

    let flaky = runs.iter().find(|r| r.name == "flaky").expect("flaky");
    assert_eq!(flaky.attempts, 3);
    // The third attempt saw the run's own id, as every attempt does.
    assert_eq!(
        to_json(flaky.output.as_ref().expect("output")),
        json!({"attempt": 3, "run_id": flaky.run_id})
    );
    let dead = runs.iter().find(|r| r.name == "always").expect("always");
    assert!(
        dead.last_error
            .ends_with(&format!("attempt 3 of 99 fails (run {})", dead.run_id)),
        "{}",
        dead.last_error
    );
    let flaky_id: Uuid = flaky.run_id.parse().expect("uuid");
    let attempts = db.registry().attempts(flaky_id).expect("attempts");
    assert_eq!(
        attempts.iter().map(|a| a.3.as_str()).collect::<Vec<_>>(),
        ["retrying", "retrying", "succeeded"]
    );
    // Worker flags: 200 ms base, doubling, ±25% jitter, plus relay polling.
    let gap = |i: usize| {
        (attempts[i + 1].1 - attempts[i].2)
            .to_std()
            .expect("ordered")
    };
    assert!(
        gap(0) >= Duration::from_millis(150),
        "first backoff {:?}",
        gap(0)
    );
    assert!(
        gap(1) >= Duration::from_millis(300),
        "second backoff {:?}",
        gap(1)
    );

    let always_run = runs.iter().find(|r| r.name == "always").expect("always");
    assert_eq!(always_run.attempts, 3);
    assert!(
        always_run.last_error.contains("gave up after 3 attempts"),
        "{}",
        always_run.last_error
    );

    let daisy = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_daisy"))
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env("RUST_LOG", "warn")
            .output()
            .expect("running daisy");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let dead = daisy(&[
        "runs",
        "list",
        "--state",
        "dead",
        "--form",
        &form.to_string(),
    ]);
    assert!(
        dead.contains(&always_run.run_id) && dead.contains("always"),
        "{dead}"
    );
    assert!(!dead.contains(&flaky.run_id), "{dead}");

    // Fix the cause, then retry every dead run.
    db.execute(&format!(
        "UPDATE tasks SET config = '{{\"succeed_on\": 1}}' WHERE id = '{}'",
        always.id
    ));
    let retried = daisy(&["runs", "retry", "--dead"]);
    assert!(retried.contains(&always_run.run_id), "{retried}");
    let runs = wait_for_runs(
        &mut client,
        &request.submission_id,
        Duration::from_secs(30),
        |runs| state_of(runs, "always") == RunState::Succeeded,
    )
    .await;
    assert_eq!(
        runs.iter()
            .find(|r| r.name == "always")
            .expect("always")
            .attempts,
        1
    );
    assert_eq!(response.enqueued.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_cut_off_during_process_loses_nothing() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let queue = TestQueue::new();
    let relay = Relay::start(amqp_addr()).await;
    let via_relay = queue.through(relay.addr);
    let form = Uuid::new_v4();
    db.attach_with(async_task(form, "row", "config", json!({"n": 1}), 3));
    let server = TestServer::start_with(server_config(&db.url, plugins.path(), via_relay)).await;
    let mut client = server.client().await;
    // A first call connects the publisher through the relay.
    process(&mut client, form, sample()).await;

    relay.cut();
    let mut submissions = Vec::new();
    for i in 0..20 {
        let request = request(form, json!({"i": i}));
        let response = client
            .process(request.clone())
            .await
            .expect("Process answers OK while the broker is away")
            .into_inner();
        assert_eq!(response.enqueued.len(), 1);
        assert!(!response.enqueued[0].run_id.is_empty());
        submissions.push(request.submission_id);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.restore();

    let _worker = queue.worker(&db.url, plugins.path(), None, &[]);
    for submission in &submissions {
        wait_for_runs(
            &mut client,
            submission,
            Duration::from_secs(60),
            all_succeeded,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_killed_between_commit_and_publish_is_covered_by_the_relay() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let queue = TestQueue::new();
    let relay = Relay::start(amqp_addr()).await;
    let form = Uuid::new_v4();
    db.attach_with(async_task(form, "row", "config", json!({}), 3));
    // The broker is unreachable, so the proxy commits but cannot publish.
    relay.cut();
    let mut proxy = queue.serve(&db.url, plugins.path(), Some(relay.addr));
    let request = request(form, sample());
    let response = proxy
        .client()
        .await
        .process(request.clone())
        .await
        .expect("accepted")
        .into_inner();
    let run_id = response.enqueued[0].run_id.clone();
    proxy.kill();

    relay.restore();
    let proxy = queue.serve(&db.url, plugins.path(), Some(relay.addr));
    let _worker = queue.worker(&db.url, plugins.path(), None, &[]);
    let runs = wait_for_runs(
        &mut proxy.client().await,
        &request.submission_id,
        Duration::from_secs(60),
        all_succeeded,
    )
    .await;
    assert_eq!(runs[0].run_id, run_id);
    assert_eq!(runs[0].attempts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_task_hands_the_run_to_another_worker() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let queue = TestQueue::new();
    let counter = tempfile::NamedTempFile::new().expect("counter file");
    let effects = tempfile::tempdir().expect("effects dir");
    let form = Uuid::new_v4();
    db.attach_with(async_task(
        form,
        "slow",
        "count",
        json!({"path": counter.path(), "sleep_ms": 3000, "effects_dir": effects.path()}),
        3,
    ));
    let server =
        TestServer::start_with(server_config(&db.url, plugins.path(), queue.config.clone())).await;
    let mut client = server.client().await;
    let mut first = queue.worker(&db.url, plugins.path(), None, &[]);

    let request = request(form, sample());
    client.process(request.clone()).await.expect("accepted");
    // Killed only once the task is really executing (its line is written at
    // the start of its run, its effect 3 s later), not merely claimed.
    wait_for_executions(counter.path(), 1).await;
    first.kill();

    let _second = queue.worker(&db.url, plugins.path(), None, &[]);
    let runs = wait_for_runs(
        &mut client,
        &request.submission_id,
        Duration::from_secs(60),
        all_succeeded,
    )
    .await;
    assert_eq!(
        runs[0].attempts, 2,
        "the second worker ran it again: {runs:?}"
    );
    let lines = std::fs::read_to_string(counter.path()).expect("counter");
    assert_eq!(lines.lines().count(), 2, "one execution per worker");
    // Had the killed worker's execution gone on (its plugin host outliving
    // it), it would have applied the effect before the second one, whose
    // output would then say "already applied".
    assert_eq!(
        to_json(runs[0].output.as_ref().expect("output"))["effect"],
        "applied",
        "the killed worker's execution never finished: {runs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_kills_every_worker_ends_dead_and_others_are_unaffected() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let queue = TestQueue::new();
    let (poison_form, good_form) = (Uuid::new_v4(), Uuid::new_v4());
    // In-process, so that it kills the worker itself (in a plugin host it
    // would kill only the host: see the plugin-host tests).
    db.attach_with(NewTask {
        isolation: Some("in_process".into()),
        ..async_task(poison_form, "abort", "abort", json!({}), 5)
    });
    db.attach_with(async_task(
        good_form,
        "fine",
        "config",
        json!({"ok": true}),
        5,
    ));
    let server =
        TestServer::start_with(server_config(&db.url, plugins.path(), queue.config.clone())).await;
    let mut client = server.client().await;

    let poison = request(poison_form, sample());
    client.process(poison.clone()).await.expect("accepted");
    let goods: Vec<_> = (0..5)
        .map(|i| request(good_form, json!({"i": i})))
        .collect();
    for good in &goods {
        client.process(good.clone()).await.expect("accepted");
    }

    // A supervisor: restart the worker whenever the poison run kills it.
    let started = Instant::now();
    let mut worker = queue.worker(&db.url, plugins.path(), None, &["--prefetch", "1"]);
    let mut restarts = 0;
    loop {
        let runs = client
            .get_runs(GetRunsRequest {
                submission_id: poison.submission_id.clone(),
            })
            .await
            .expect("ok")
            .into_inner()
            .runs;
        if runs.first().is_some_and(|r| r.state() == RunState::Dead) {
            assert!(
                runs[0].last_error.contains("delivery limit"),
                "{:?}",
                runs[0]
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "poison run never died: {runs:?}"
        );
        if worker.exited() {
            restarts += 1;
            worker = queue.worker(&db.url, plugins.path(), None, &["--prefetch", "1"]);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        restarts >= 2,
        "the plugin aborted the worker each time ({restarts} restarts)"
    );
    for good in &goods {
        wait_for_runs(
            &mut client,
            &good.submission_id,
            Duration::from_secs(60),
            all_succeeded,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_submissions_with_a_worker_killed_once() {
    const SUBMISSIONS: usize = 10_000;
    const CLIENTS: usize = 32;
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let queue = TestQueue::new();
    let counter = tempfile::NamedTempFile::new().expect("counter file");
    let form = Uuid::new_v4();
    db.attach_with(async_task(
        form,
        "count",
        "count",
        json!({"path": counter.path()}),
        5,
    ));
    let server =
        TestServer::start_with(server_config(&db.url, plugins.path(), queue.config.clone())).await;
    let client = server.client().await;
    let mut victim = queue.worker(&db.url, plugins.path(), None, &[]);
    let _steady = queue.worker(&db.url, plugins.path(), None, &[]);

    let started = Instant::now();
    let load = (0..CLIENTS).map(|c| {
        let mut client = client.clone();
        tokio::spawn(async move {
            for i in (c..SUBMISSIONS).step_by(CLIENTS) {
                client
                    .process(request(form, json!({"i": i})))
                    .await
                    .expect("accepted");
            }
        })
    });
    let load = futures::future::join_all(load);
    let killer = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        victim.kill();
        tokio::time::sleep(Duration::from_secs(1)).await;
        queue.worker(&db.url, plugins.path(), None, &[])
    };
    let (calls, _restarted) = tokio::join!(load, killer);
    for call in calls {
        call.expect("client task");
    }
    let accepted_in = started.elapsed();

    let registry = db.registry();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let done = registry
            .list_runs(
                Some(proxy::registry::RunState::Succeeded),
                Some(form),
                SUBMISSIONS as i64 + 1,
            )
            .expect("listing")
            .len();
        if done == SUBMISSIONS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {SUBMISSIONS} runs succeeded"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let all = registry
        .list_runs(None, Some(form), SUBMISSIONS as i64 * 2)
        .expect("listing");
    assert_eq!(all.len(), SUBMISSIONS, "exactly one run per submission");

    let lines = std::fs::read_to_string(counter.path()).expect("counter");
    let mut executions: HashMap<&str, usize> = HashMap::new();
    for line in lines.lines() {
        *executions.entry(line).or_default() += 1;
    }
    let repeated = executions.values().filter(|&&n| n > 1).count();
    eprintln!(
        "load: {SUBMISSIONS} submissions from {CLIENTS} clients accepted in {accepted_in:?}; all succeeded after {:?}; {} executions for {} runs; {repeated} run(s) executed more than once (one worker SIGKILLed mid-load)",
        started.elapsed(),
        lines.lines().count(),
        executions.len(),
    );
    assert_eq!(executions.len(), SUBMISSIONS, "every run executed");
    // Only the runs in flight on the killed worker may have run twice.
    assert!(repeated <= 64, "{repeated} runs executed more than once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_and_worker_ride_out_broker_and_database_outages() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let queue = TestQueue::new();
    let (pg, mq) = (
        Relay::start(postgres_addr()).await,
        Relay::start(amqp_addr()).await,
    );
    let db_url = with_port(&db.url, pg.addr);
    let counter = tempfile::NamedTempFile::new().expect("counter file");
    let form = Uuid::new_v4();
    // Slow enough that the database outage hits runs in the middle.
    db.attach_with(async_task(
        form,
        "row",
        "count",
        json!({"path": counter.path(), "sleep_ms": 1500}),
        5,
    ));
    let proxy = queue.serve(&db_url, plugins.path(), Some(mq.addr));
    let _worker = queue.worker(&db_url, plugins.path(), Some(mq.addr), &[]);
    let mut client = proxy.client().await;
    let first = request(form, json!({"n": 0}));
    client.process(first.clone()).await.expect("accepted");
    wait_for_runs(
        &mut client,
        &first.submission_id,
        Duration::from_secs(30),
        all_succeeded,
    )
    .await;

    // The broker goes away: Process still accepts.
    mq.cut();
    let mut accepted = Vec::new();
    for n in 1..=5 {
        let request = request(form, json!({"n": n}));
        client
            .process(request.clone())
            .await
            .expect("accepted without the broker");
        accepted.push(request.submission_id);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    mq.restore();

    // Then the database goes away while those runs are being executed.
    wait_for_runs(&mut client, &accepted[0], Duration::from_secs(30), |runs| {
        runs.first().is_some_and(|r| r.state() == RunState::Running)
    })
    .await;
    pg.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.restore();

    for submission in &accepted {
        wait_for_runs(
            &mut client,
            submission,
            Duration::from_secs(60),
            all_succeeded,
        )
        .await;
    }
    let after = request(form, json!({"n": 6}));
    client
        .process(after.clone())
        .await
        .expect("accepted after both outages");
    wait_for_runs(
        &mut client,
        &after.submission_id,
        Duration::from_secs(30),
        all_succeeded,
    )
    .await;
    let lines = std::fs::read_to_string(counter.path()).expect("counter");
    assert_eq!(
        lines.lines().count(),
        7,
        "each of the 7 runs executed exactly once:\n{lines}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_whose_messages_were_lost_are_requeued_after_the_stale_period() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let queue = TestQueue::new();
    let form = Uuid::new_v4();
    db.attach_with(async_task(form, "row", "config", json!({}), 3));
    let config = proxy::Config {
        stale_after: Duration::from_secs(2),
        sync_run_log: proxy::SyncRunLog::All,
        ..server_config(&db.url, plugins.path(), queue.config.clone())
    };
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;
    let request = request(form, sample());
    client.process(request.clone()).await.expect("accepted");
    // Published and confirmed, then lost: an operator purges the queue.
    let run: Uuid = wait_for_runs(
        &mut client,
        &request.submission_id,
        Duration::from_secs(10),
        |runs| runs.len() == 1,
    )
    .await[0]
        .run_id
        .parse()
        .expect("uuid");
    let registry = db.registry();
    let started = Instant::now();
    while registry
        .runs_for_submission(request.submission_id.parse().expect("uuid"))
        .expect("runs")[0]
        .published_at
        .is_none()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never published"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    purge(&queue.config.queue).await;

    let _worker = queue.worker(&db.url, plugins.path(), None, &[]);
    let runs = wait_for_runs(
        &mut client,
        &request.submission_id,
        Duration::from_secs(30),
        all_succeeded,
    )
    .await;
    assert_eq!(runs[0].run_id, run.to_string());
}

async fn purge(queue: &str) {
    use amqprs::{
        channel::QueuePurgeArguments,
        connection::{Connection, OpenConnectionArguments},
    };
    let mut args = OpenConnectionArguments::try_from(amqp_url().as_str()).expect("AMQP URL");
    args.virtual_host("/");
    let connection = Connection::open(&args).await.expect("connecting");
    let channel = connection.open_channel(None).await.expect("channel");
    let purged = channel
        .queue_purge(QueuePurgeArguments::new(queue))
        .await
        .expect("purging");
    assert_eq!(purged, Some(1), "the run's message was in the queue");
    let _ = channel.close().await;
    let _ = connection.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_retried_after_a_lost_answer_is_still_ours() {
    let db = TestDb::new();
    let form = Uuid::new_v4();
    let task = db.attach_with(async_task(form, "row", "config", json!({}), 3));
    let registry = db.registry();
    let accepted = registry
        .accept(
            &[proxy::registry::Acceptance {
                form,
                submission: Uuid::new_v4(),
                payload: json!({}),
                context: None,
                tasks: vec![task],
                trace: None,
            }],
            Duration::ZERO,
        )
        .expect("accepted");
    let run = accepted[0].as_ref().expect("no conflict")[0].run_id;

    let token = Uuid::new_v4();
    let first = claim_one(&registry, run, false, token).expect("claimed");
    // The commit went through but the answer was lost: the same delivery retries.
    let again = claim_one(&registry, run, false, token).expect("still ours");
    assert_eq!(
        (first.attempt, again.attempt),
        (1, 1),
        "a retried claim does not count twice"
    );
    assert!(
        claim_one(&registry, run, false, Uuid::new_v4()).is_none(),
        "a duplicate message finds nothing"
    );
    // A redelivery (the broker requeued the message) waits while the
    // holder's lease is alive, and takes over once it expired.
    assert!(
        claim_one(&registry, run, true, Uuid::new_v4()).is_none(),
        "a redelivery took over a run its worker still holds"
    );
    assert!(registry.held_by_live_lease(run).expect("lease"));
    db.execute(&format!(
        "UPDATE task_runs SET lease_until = now() - interval '1 second' WHERE id = '{run}'"
    ));
    let taken = claim_one(&registry, run, true, Uuid::new_v4()).expect("a redelivery takes over");
    assert_eq!(taken.attempt, 2);
}

fn claim_one(
    registry: &proxy::registry::Registry,
    run: Uuid,
    redelivered: bool,
    token: Uuid,
) -> Option<proxy::registry::Claimed> {
    let mut claimed = registry
        .claim(
            &[ClaimRequest {
                run,
                redelivered,
                token,
            }],
            Duration::from_secs(60),
        )
        .expect("claim");
    assert_eq!(claimed.len(), 1, "one answer per request");
    claimed.pop().expect("one answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_and_outcomes_are_stored_in_batches_with_one_answer_per_delivery() {
    let db = TestDb::new();
    let form = Uuid::new_v4();
    let task = db.attach_with(async_task(form, "row", "config", json!({}), 3));
    let registry = db.registry();
    let requests: Vec<_> = (0..4)
        .map(|n| proxy::registry::Acceptance {
            form,
            submission: Uuid::new_v4(),
            payload: json!({ "answers": { "n": n } }),
            context: None,
            tasks: vec![task.clone()],
            trace: None,
        })
        .collect();
    let runs: Vec<Uuid> = registry
        .accept(&requests, Duration::ZERO)
        .expect("accepted")
        .iter()
        .map(|r| r.as_ref().expect("no conflict")[0].run_id)
        .collect();
    // runs[3] already finished: its duplicate message must find nothing.
    let done = claim_one(&registry, runs[3], false, Uuid::new_v4()).expect("claimed");
    registry
        .finish("w", &[(done, Finish::Succeeded(json!("earlier")))])
        .expect("finished");

    // One batch: three fresh runs, the same run delivered twice, the finished one.
    let request = |run, token| ClaimRequest {
        run,
        redelivered: false,
        token,
    };
    let tokens: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let batch = [
        request(runs[0], tokens[0]),
        request(runs[1], tokens[1]),
        request(runs[1], tokens[2]),
        request(runs[2], tokens[3]),
        request(runs[3], tokens[4]),
    ];
    let claimed = registry
        .claim(&batch, Duration::from_secs(60))
        .expect("claim");
    assert_eq!(claimed.len(), 5, "one answer per request, in order");
    let first = claimed[0].clone().expect("runs[0] claimed");
    assert_eq!((first.run_id, first.attempt), (runs[0], 1));
    assert_eq!(first.payload, json!({ "answers": { "n": 0 } }));
    assert_eq!(
        usize::from(claimed[1].is_some()) + usize::from(claimed[2].is_some()),
        1,
        "exactly one of two deliveries of the same run claims it"
    );
    assert!(claimed[4].is_none(), "a finished run is not claimed again");

    // One batch of outcomes, plus a stale one (an execution a redelivery took over).
    let second = claimed[1].clone().or(claimed[2].clone()).expect("runs[1]");
    let third = claimed[3].clone().expect("runs[2] claimed");
    let mut stale = third.clone();
    stale.attempt = 7;
    registry
        .finish(
            "w",
            &[
                (first, Finish::Succeeded(json!({ "row": 1 }))),
                (
                    second,
                    Finish::Retry {
                        error: "throttled".into(),
                        after: Duration::from_secs(60),
                    },
                ),
                (
                    third,
                    Finish::Dead {
                        error: "bad config".into(),
                    },
                ),
                (stale, Finish::Succeeded(json!("late"))),
            ],
        )
        .expect("finished");
    let state = |i: usize| {
        let mut found = registry
            .runs_for_submission(requests[i].submission)
            .expect("read");
        assert_eq!(found.len(), 1);
        let run = found.pop().expect("one run");
        assert_eq!(run.id, runs[i]);
        (run.state.to_string(), run.output, run.last_error)
    };
    assert_eq!(
        state(0),
        ("succeeded".into(), Some(json!({ "row": 1 })), None)
    );
    assert_eq!(
        state(1),
        ("retrying".into(), None, Some("throttled".into()))
    );
    assert_eq!(state(2), ("dead".into(), None, Some("bad config".into())));
    assert_eq!(state(3), ("succeeded".into(), Some(json!("earlier")), None));
    let outcomes = |run: Uuid| -> Vec<String> {
        registry
            .attempts(run)
            .expect("attempts")
            .into_iter()
            .map(|a| a.3)
            .collect()
    };
    assert_eq!(outcomes(runs[0]), ["succeeded"]);
    assert_eq!(outcomes(runs[1]), ["retrying"]);
    assert_eq!(
        outcomes(runs[2]),
        ["dead", "succeeded"],
        "the stale execution is logged, not stored"
    );
}
