//! What the hot paths cost PostgreSQL, read from its own statistics: the row
//! writes of an accepted and drained run.

use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::{asynchronous::async_task, util::*};

/// Rows inserted and updated in `table`, as PostgreSQL's statistics count
/// them (other sessions report theirs within seconds of going idle).
fn tuples(db: &TestDb, table: &str) -> (i64, i64) {
    let row = db.query_one(&format!(
        "SELECT n_tup_ins || ' ' || n_tup_upd FROM pg_stat_user_tables WHERE relname = '{table}'"
    ));
    let mut figures = row.split(' ').map(|n| n.parse::<i64>().expect("a count"));
    (
        figures.next().expect("inserts"),
        figures.next().expect("updates"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_run_costs_one_insert_a_claim_and_a_finish() {
    const RUNS: i64 = 40;
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let queue = TestQueue::new();
    let form = Uuid::new_v4();
    db.attach_with(async_task(form, "row", "config", json!({}), 3));
    let mut config = server_config(&db.url, plugins.path(), queue.config.clone());
    // The publish marks come half-way through the grace: long after the
    // worker claimed the runs.
    config.outbox_grace = Duration::from_secs(5);
    let server = TestServer::start_with(config).await;
    let _worker = queue.worker(&db.url, plugins.path(), None, &[]);
    let mut client = server.client().await;
    for _ in 0..RUNS {
        client
            .process(request(form, sample()))
            .await
            .expect("accepted");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while db.query_one("SELECT count(*)::text FROM task_runs WHERE state = 'succeeded'")
        != RUNS.to_string()
    {
        assert!(Instant::now() < deadline, "the runs did not all succeed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past the marks, then until the statistics stop moving.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut seen = tuples(&db, "task_runs");
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = tuples(&db, "task_runs");
        if now == seen && now.1 >= 2 * RUNS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "statistics still moving: {now:?}"
        );
        seen = now;
    }
    let (inserted, updated) = seen;
    let marked: i64 = db
        .query_one("SELECT count(*)::text FROM task_runs WHERE published_at IS NOT NULL")
        .parse()
        .expect("a count");
    assert_eq!(inserted, RUNS, "one row per run");
    assert_eq!(
        updated,
        2 * RUNS + marked,
        "a claim and a finish per run, and a publish mark only for a run still queued ({marked})"
    );
    assert!(
        marked <= 2,
        "{marked} runs were still queued 2.5 s after their publish"
    );
    assert_eq!(
        tuples(&db, "task_run_attempts").0,
        0,
        "an execution that ends its run is recorded on the run"
    );
    let run: Uuid = db
        .query_one("SELECT id::text FROM task_runs LIMIT 1")
        .parse()
        .expect("a run id");
    let history = db.registry().attempts(run).expect("attempts");
    assert_eq!(
        history
            .iter()
            .map(|a| (a.0, a.3.as_str()))
            .collect::<Vec<_>>(),
        [(1, "succeeded")],
        "the run's history still shows its execution"
    );
}
