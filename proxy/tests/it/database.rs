//! PostgreSQL outages: cached forms keep being served, the rest get
//! UNAVAILABLE, and everything works again once the database is back.

use std::time::{Duration, Instant};

use proto::v1::Outcome;
use serde_json::json;
use tonic::Code;
use uuid::Uuid;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_forms_are_served_while_the_database_is_cut_off() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("echo", "echo");
    let (cached, uncached) = (Uuid::new_v4(), Uuid::new_v4());
    db.attach(cached, "echo", "echo", "echo", json!({}));
    db.attach(uncached, "echo", "echo", "echo", json!({}));
    let relay = Relay::start(postgres_addr()).await;
    let server = TestServer::start(&with_port(&db.url, relay.addr), plugins.path()).await;
    let mut client = server.client().await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the listener connects
    process(&mut client, cached, sample()).await;

    relay.cut();

    for _ in 0..3 {
        let response = process(&mut client, cached, sample()).await;
        assert_eq!(response.results[0].outcome(), Outcome::Succeeded);
    }
    let status = client
        .process(request(uncached, sample()))
        .await
        .expect_err("needs the database");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("PostgreSQL"), "{status:?}");
    assert!(
        !status.message().contains("127.0.0.1"),
        "no connection details leak: {status:?}"
    );

    relay.restore();

    let back = Instant::now();
    loop {
        match client.process(request(uncached, sample())).await {
            Ok(response) => {
                assert_eq!(
                    response.into_inner().results[0].outcome(),
                    Outcome::Succeeded
                );
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable);
                assert!(
                    back.elapsed() < Duration::from_secs(10),
                    "no recovery: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let response = process(&mut client, cached, sample()).await;
    assert_eq!(response.results[0].outcome(), Outcome::Succeeded);

    // Changes are seen again once the listener is back.
    let added = db.attach(cached, "second", "echo", "echo", json!({}));
    let since = Instant::now();
    while process(&mut client, cached, sample()).await.results.len() < 2 {
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "task {} not seen after recovery",
            added.id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_started_while_the_database_is_down_serves_once_it_is_up() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("echo", "echo");
    let form = Uuid::new_v4();
    db.attach(form, "echo", "echo", "echo", json!({}));
    let relay = Relay::start(postgres_addr()).await;
    relay.cut();
    let server = TestServer::start(&with_port(&db.url, relay.addr), plugins.path()).await;
    let mut client = server.client().await;

    let status = client
        .process(request(form, sample()))
        .await
        .expect_err("database down");
    assert_eq!(status.code(), Code::Unavailable);

    relay.restore();
    let since = Instant::now();
    loop {
        match client.process(request(form, sample())).await {
            Ok(response) => {
                assert_eq!(response.into_inner().results.len(), 1);
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable);
                assert!(
                    since.elapsed() < Duration::from_secs(10),
                    "no recovery: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[test]
fn a_deadlock_is_a_transient_error_to_retry() {
    use diesel::{Connection, PgConnection, RunQueryDsl};
    let db = TestDb::new();
    db.execute("CREATE TABLE pair (id int PRIMARY KEY, v int)");
    db.execute("INSERT INTO pair VALUES (1, 0), (2, 0)");
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    // Two transactions take the same two rows in opposite orders.
    let lock = |first: i32, second: i32| {
        let (url, barrier) = (db.url.clone(), barrier.clone());
        std::thread::spawn(move || {
            let mut conn = PgConnection::establish(&url).expect("connecting");
            conn.transaction::<_, diesel::result::Error, _>(|conn| {
                diesel::sql_query(format!("UPDATE pair SET v = 1 WHERE id = {first}"))
                    .execute(conn)?;
                barrier.wait();
                diesel::sql_query(format!("UPDATE pair SET v = 1 WHERE id = {second}"))
                    .execute(conn)?;
                Ok(())
            })
        })
    };
    let (a, b) = (lock(1, 2), lock(2, 1));
    let results = [a.join().expect("thread"), b.join().expect("thread")];
    let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    assert_eq!(
        failed.len(),
        1,
        "PostgreSQL aborts one of the two: {failed:?}"
    );
    let err = proxy::error::RegistryError::from(failed.into_iter().next().expect("the deadlock"));
    assert!(
        err.is_transient(),
        "a deadlock is retried, not refused: {err:?}"
    );
}

/// The pool hands out a connection that just worked without checking it
/// (`registry::pool`); one whose server went away is still replaced: at
/// once after a pause, and after one failed statement when it was in use a
/// moment before.
#[test]
fn a_pooled_connection_whose_backend_was_terminated_is_replaced() {
    let db = TestDb::new();
    let config = proxy::DbConfig {
        pool_size: 1,
        ..db_config(&db.url)
    };
    let registry = proxy::registry::Registry::new(&config);
    let kill = || {
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
    };
    registry.list(None).expect("listed");
    kill();
    std::thread::sleep(Duration::from_millis(300));
    registry
        .list(None)
        .expect("after a pause the dead connection is checked and replaced");
    kill();
    let first = registry.list(None);
    registry.list(None).unwrap_or_else(|err| {
        panic!("a failed statement ({first:?}) sends the connection to be checked: {err}")
    });
}
