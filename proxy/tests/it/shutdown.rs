//! SIGTERM: `daisy worker` finishes the runs it executes, and both commands
//! exit within their shutdown grace whatever hangs (a plugin, the broker).

use std::time::{Duration, Instant};

use proto::v1::RunState;
use proxy::registry::NewTask;
use serde_json::json;
use uuid::Uuid;

use crate::{asynchronous::async_task, util::*};

/// SIGTERMs `daisy` and waits up to `limit`; how long it took, or a panic
/// if it is still running or failed.
async fn terminate(mut daisy: Daisy, limit: Duration, what: &str) -> Duration {
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || daisy.terminate(limit))
        .await
        .expect("terminating");
    let status =
        status.unwrap_or_else(|| panic!("{what} did not exit within {limit:?} of SIGTERM"));
    assert!(status.success(), "{what} exited with {status}");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_worker_finish_the_run_it_executes() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let queue = TestQueue::new();
    let counter = tempfile::NamedTempFile::new().expect("counter file");
    let form = Uuid::new_v4();
    db.attach_with(async_task(
        form,
        "slow",
        "count",
        json!({"path": counter.path(), "sleep_ms": 2000}),
        3,
    ));
    let server =
        TestServer::start_with(server_config(&db.url, plugins.path(), queue.config.clone())).await;
    let mut client = server.client().await;
    let worker = queue.worker(&db.url, plugins.path(), None, &[]);

    let request = request(form, sample());
    client.process(request.clone()).await.expect("accepted");
    wait_for_runs(
        &mut client,
        &request.submission_id,
        Duration::from_secs(30),
        |runs| runs.first().is_some_and(|r| r.state() == RunState::Running),
    )
    .await;
    terminate(worker, Duration::from_secs(15), "the worker").await;

    // Finished and recorded by the worker that stopped, not another one.
    let runs = wait_for_runs(
        &mut client,
        &request.submission_id,
        Duration::from_secs(1),
        |runs| {
            runs.first()
                .is_some_and(|r| r.state() == RunState::Succeeded)
        },
    )
    .await;
    assert_eq!(runs[0].attempts, 1, "{runs:?}");
    let lines = std::fs::read_to_string(counter.path()).expect("counter");
    assert_eq!(lines.lines().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_worker_within_its_grace_while_an_in_process_plugin_hangs() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let queue = TestQueue::new();
    let form = Uuid::new_v4();
    // In-process: the hang holds a thread of the worker's own runtime.
    db.attach_with(NewTask {
        isolation: Some("in_process".into()),
        timeout_ms: 60_000,
        ..async_task(form, "hang", "hang", json!({}), 3)
    });
    let server =
        TestServer::start_with(server_config(&db.url, plugins.path(), queue.config.clone())).await;
    let mut client = server.client().await;
    let worker = queue.worker(
        &db.url,
        plugins.path(),
        None,
        &["--shutdown-grace-secs", "1"],
    );

    let request = request(form, sample());
    client.process(request.clone()).await.expect("accepted");
    wait_for_runs(
        &mut client,
        &request.submission_id,
        Duration::from_secs(30),
        |runs| runs.first().is_some_and(|r| r.state() == RunState::Running),
    )
    .await;
    let took = terminate(worker, Duration::from_secs(10), "the worker").await;
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // Left running, for its lease to expire and another worker to take it.
    let runs = wait_for_runs(
        &mut client,
        &request.submission_id,
        Duration::from_secs(1),
        |runs| !runs.is_empty(),
    )
    .await;
    assert_eq!(runs[0].state(), RunState::Running, "{runs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_serve_and_worker_promptly_while_the_broker_is_away() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let queue = TestQueue::new();
    let form = Uuid::new_v4();
    db.attach_with(async_task(form, "later", "config", json!({"ok": true}), 3));
    // Nothing listens there: every connect to the broker fails.
    let nowhere = Some(test_support::free_port());
    let serve = queue.serve(&db.url, plugins.path(), nowhere);
    let worker = queue.worker(&db.url, plugins.path(), nowhere, &[]);
    let mut client = serve.client().await;
    // Accepted into the outbox; the publisher and the relay keep failing.
    client
        .process(request(form, sample()))
        .await
        .expect("accepted without the broker");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let took = terminate(serve, Duration::from_secs(10), "serve").await;
    assert!(took < Duration::from_secs(3), "serve took {took:?}");
    let took = terminate(worker, Duration::from_secs(10), "the worker").await;
    assert!(took < Duration::from_secs(3), "the worker took {took:?}");
}
