//! The synchronous Process path.

use std::time::{Duration, Instant};

use proto::v1::Outcome;
use proxy::registry::NewTask;
use serde_json::json;
use uuid::Uuid;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_returns_the_submission_as_output() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("echo", "echo");
    let form = Uuid::new_v4();
    let task = db.attach(form, "echo", "echo", "echo", json!({}));
    let server = TestServer::start(&db.url, plugins.path()).await;

    let response = process(&mut server.client().await, form, sample()).await;

    assert_eq!(response.results.len(), 1);
    let echo = &response.results[0];
    assert_eq!(echo.task_id, task.id.to_string());
    assert_eq!(echo.name, "echo");
    assert_eq!(echo.outcome(), Outcome::Succeeded, "{echo:?}");
    assert_eq!(to_json(echo.output.as_ref().expect("output")), sample());
    assert!(echo.error.is_empty());
    assert!(response.enqueued.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn form_without_tasks_answers_ok_with_empty_lists() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    let server = TestServer::start(&db.url, plugins.path()).await;

    let response = process(&mut server.client().await, Uuid::new_v4(), sample()).await;

    assert!(response.results.is_empty());
    assert!(response.enqueued.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_follow_attach_order_and_skip_disabled_and_async_tasks() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let form = Uuid::new_v4();
    for name in ["zulu", "alpha", "mike"] {
        db.attach(form, name, "testkit", "config", json!({ "me": name }));
    }
    let base = NewTask {
        form_id: form,
        name: String::new(),
        module: "testkit".into(),
        func: "config".into(),
        is_async: false,
        config: json!({}),
        enabled: true,
        timeout_ms: 1000,
        max_attempts: 1,
        isolation: None,
    };
    db.attach_with(NewTask {
        name: "off".into(),
        enabled: false,
        ..base.clone()
    });
    db.attach_with(NewTask {
        name: "later".into(),
        is_async: true,
        ..base
    });
    let server = TestServer::start(&db.url, plugins.path()).await;

    let response = process(&mut server.client().await, form, sample()).await;

    let names: Vec<_> = response.results.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["zulu", "alpha", "mike"]);
    for r in &response.results {
        assert_eq!(
            to_json(r.output.as_ref().expect("output")),
            json!({ "me": r.name })
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_tasks_run_concurrently() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let form = Uuid::new_v4();
    for i in 0..4 {
        db.attach(
            form,
            &format!("sleep{i}"),
            "testkit",
            "sleep",
            json!({"ms": 400}),
        );
    }
    let server = TestServer::start(&db.url, plugins.path()).await;
    let mut client = server.client().await;
    process(&mut client, form, sample()).await; // loads the library

    let started = Instant::now();
    let response = process(&mut client, form, sample()).await;

    assert!(
        response
            .results
            .iter()
            .all(|r| r.outcome() == Outcome::Succeeded)
    );
    // One after another they would take 1.6 s.
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_calls_finish_on_shutdown() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let form = Uuid::new_v4();
    db.attach(form, "slow", "testkit", "sleep", json!({"ms": 500}));
    let server = TestServer::start(&db.url, plugins.path()).await;
    let mut client = server.client().await;

    let call = tokio::spawn(async move { client.process(request(form, sample())).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.stop().await.expect("server stops cleanly");

    let response = call
        .await
        .expect("call task")
        .expect("in-flight call answered")
        .into_inner();
    assert_eq!(response.results[0].outcome(), Outcome::Succeeded);
}
