//! Tasks and plugins change while the server runs, without a restart.

use std::time::{Duration, Instant};

use proto::v1::Outcome;
use serde_json::json;
use uuid::Uuid;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_inserted_with_plain_sql_is_used_within_a_second() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("echo", "echo");
    let form = Uuid::new_v4();
    let server = TestServer::start(&db.url, plugins.path()).await;
    let mut client = server.client().await;
    // Let the listener connect, then cache the form's empty task list.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        process(&mut client, form, sample())
            .await
            .results
            .is_empty()
    );

    // Only the seed's columns, as the original schema had them.
    db.execute(&format!(
        "INSERT INTO tasks (id, form_id, name, module, func, async_status) \
         VALUES ('{}', '{form}', 'sql_echo', 'echo', 'echo', false)",
        Uuid::new_v4()
    ));
    let inserted = Instant::now();
    loop {
        let response = process(&mut client, form, sample()).await;
        if let Some(r) = response.results.first() {
            assert_eq!(r.name, "sql_echo");
            assert_eq!(r.outcome(), Outcome::Succeeded, "{r:?}");
            break;
        }
        assert!(
            inserted.elapsed() < Duration::from_secs(1),
            "the new task was not used within a second"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Detaching is seen as quickly.
    db.execute(&format!("DELETE FROM tasks WHERE form_id = '{form}'"));
    let deleted = Instant::now();
    while !process(&mut client, form, sample())
        .await
        .results
        .is_empty()
    {
        assert!(
            deleted.elapsed() < Duration::from_secs(1),
            "the detached task still ran after a second"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_dropped_in_while_running_is_used_at_the_next_call() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    let form = Uuid::new_v4();
    db.attach(form, "late", "late", "echo", json!({}));
    let server = TestServer::start(&db.url, plugins.path()).await;
    let mut client = server.client().await;

    let before = process(&mut client, form, sample()).await;
    assert_eq!(before.results[0].outcome(), Outcome::Failed);
    assert!(
        before.results[0].error.contains("not found"),
        "{:?}",
        before.results[0]
    );

    plugins.install("echo", "late");

    let after = process(&mut client, form, sample()).await;
    assert_eq!(
        after.results[0].outcome(),
        Outcome::Succeeded,
        "{:?}",
        after.results[0]
    );
    assert_eq!(
        to_json(after.results[0].output.as_ref().expect("output")),
        sample()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_library_changes_behaviour_at_the_next_call() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("echo", "swap");
    let form = Uuid::new_v4();
    db.attach(form, "swap", "swap", "echo", json!({}));
    let server = TestServer::start(&db.url, plugins.path()).await;
    let mut client = server.client().await;

    let first = process(&mut client, form, sample()).await;
    assert_eq!(
        to_json(first.results[0].output.as_ref().expect("output")),
        sample()
    );

    // `cp` over the loaded file: same inode, new contents.
    plugins.install("testkit", "swap");
    let second = process(&mut client, form, sample()).await;
    assert_eq!(
        to_json(second.results[0].output.as_ref().expect("output")),
        json!({"plugin": "testkit", "submission": sample()})
    );

    // And back, by rename as a package manager would.
    let staged = plugins.path().join("staged.tmp");
    std::fs::copy(built_plugin("echo"), &staged).expect("staging");
    std::fs::rename(&staged, plugins.module_path("swap")).expect("renaming into place");
    let third = process(&mut client, form, sample()).await;
    assert_eq!(
        to_json(third.results[0].output.as_ref().expect("output")),
        sample()
    );
}
