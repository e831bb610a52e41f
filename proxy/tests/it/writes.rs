//! What the hot paths cost PostgreSQL, read from its own statistics: the row
//! writes of an accepted and drained run.

use std::time::{Duration, Instant};

use proxy::registry::{Acceptance, TaskDef};
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

/// One accept batch mixing every case: new submissions (one with a twin
/// that is identical, one with a twin that differs), replays that match,
/// replays with another form or payload, and a replay of a form that has a
/// task attached since. Each request gets its own verdict, and only the new
/// submissions and the newly attached task's run are written.
#[test]
fn one_accept_batch_stores_the_new_and_checks_the_replayed() {
    let db = TestDb::new();
    let registry = db.registry();
    let (form, other_form) = (Uuid::new_v4(), Uuid::new_v4());
    let first = db.attach_with(async_task(form, "first", "config", json!({}), 3));
    let request =
        |form: Uuid, submission: Uuid, payload: serde_json::Value, tasks: &[&TaskDef]| Acceptance {
            form,
            submission,
            payload,
            context: None,
            tasks: tasks.iter().map(|t| (*t).clone()).collect(),
            trace: None,
        };
    let payload = |n: u32| json!({ "answers": { "n": n } });
    let stored: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let before = registry
        .accept(
            &stored
                .iter()
                .map(|s| request(form, *s, payload(1), &[&first]))
                .collect::<Vec<_>>(),
            Duration::ZERO,
        )
        .expect("stored");
    let first_runs: Vec<Uuid> = before
        .iter()
        .map(|r| r.as_ref().expect("new")[0].run_id)
        .collect();
    let second = db.attach_with(async_task(form, "second", "config", json!({}), 3));
    let (new, twin) = (Uuid::new_v4(), Uuid::new_v4());
    let both = [&first, &second];
    let batch = [
        request(form, new, payload(2), &both),
        request(form, twin, payload(3), &both),
        request(form, twin, payload(3), &both),
        request(form, twin, payload(4), &both),
        request(form, stored[0], payload(1), &both),
        request(other_form, stored[1], payload(1), &both),
        request(form, stored[2], payload(5), &both),
    ];
    let results = registry.accept(&batch, Duration::ZERO).expect("accepted");
    let runs = |i: usize| -> Vec<(Uuid, Uuid)> {
        let mut runs: Vec<_> = results[i]
            .as_ref()
            .unwrap_or_else(|conflict| panic!("request {i}: {conflict:?}"))
            .iter()
            .map(|a| (a.task_id, a.run_id))
            .collect();
        runs.sort();
        runs
    };
    let conflict = |i: usize| match &results[i] {
        Err(proxy::registry::Replay::Conflict(why)) => why.clone(),
        Ok(runs) => panic!("request {i} was accepted: {runs:?}"),
    };
    assert_eq!(runs(0).len(), 2, "a new submission gets a run per task");
    assert_eq!(runs(1).len(), 2);
    assert_eq!(runs(1), runs(2), "identical twins share their runs");
    assert!(
        conflict(3).contains("twice at once"),
        "a twin that differs: {}",
        conflict(3)
    );
    let replayed = runs(4);
    assert_eq!(
        replayed.len(),
        2,
        "the replay finds its run and gets the new task's"
    );
    assert!(
        replayed.contains(&(first.id, first_runs[0])),
        "{replayed:?}"
    );
    assert!(
        conflict(5).contains(&format!("already submitted for form {form}")),
        "another form: {}",
        conflict(5)
    );
    assert!(
        conflict(6).contains("different submission"),
        "another payload: {}",
        conflict(6)
    );
    let stored_now: i64 = db
        .query_one("SELECT count(*)::text FROM submissions")
        .parse()
        .expect("a count");
    assert_eq!(stored_now, 5, "three stored before, two new");
    let runs_now: i64 = db
        .query_one("SELECT count(*)::text FROM task_runs")
        .parse()
        .expect("a count");
    assert_eq!(
        runs_now,
        3 + 2 + 2 + 1,
        "old runs, two new submissions', the attached task's"
    );
    let twin_payload = db.query_one(&format!(
        "SELECT payload::text FROM submissions WHERE id = '{twin}'"
    ));
    assert!(
        twin_payload.contains("3"),
        "the first twin is stored: {twin_payload}"
    );
}
