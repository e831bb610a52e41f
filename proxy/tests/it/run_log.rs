//! The synchronous run log, `sync_runs`: where records go (not the outbox),
//! how every reader shows them (a replay once), the day partitions (a day
//! without one still takes rows; retention drops old days whole), and the
//! migration that moved the history out of `task_runs`.

use std::time::{Duration, Instant};

use chrono::{Days, Utc};
use diesel::{Connection, PgConnection, connection::SimpleConnection};
use proto::v1::{GetRunsRequest, RunState as PbRunState};
use proxy::registry::{RunState, SyncRun};
use serde_json::json;
use test_support::free_port;
use uuid::Uuid;

use crate::util::*;

/// `SELECT count(*)` of `sql`'s rows.
fn count(db: &TestDb, sql: &str) -> i64 {
    db.query_one(&format!("SELECT count(*)::text FROM ({sql}) q"))
        .parse()
        .expect("a count")
}

/// An HTTP GET on the console: (status, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let url = format!("http://{addr}{path}");
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut response = agent.get(&url).call().expect("the console answers");
        (
            response.status().as_u16(),
            response.body_mut().read_to_string().unwrap_or_default(),
        )
    })
    .await
    .expect("HTTP")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_runs_go_to_the_run_log_and_every_reader_shows_a_replay_once() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("echo", "echo");
    let form = Uuid::new_v4();
    db.attach(form, "echo", "echo", "echo", json!({}));
    let ops = free_port();
    let queue = TestQueue::new();
    let config = proxy::Config {
        http_addr: Some(ops),
        ..server_config(&db.url, plugins.path(), queue.config.clone())
    };
    let server = TestServer::start_with(config).await;
    let mut client = server.client().await;

    // The same submission twice: its synchronous task runs twice.
    let request = request(form, sample());
    for _ in 0..2 {
        client.process(request.clone()).await.expect("processed");
    }
    let submission = &request.submission_id;
    let logged = format!("SELECT 1 FROM sync_runs WHERE submission_id = '{submission}'");
    let started = Instant::now();
    while count(&db, &logged) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the run log never wrote both records"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        count(
            &db,
            &format!("SELECT 1 FROM task_runs WHERE submission_id = '{submission}'")
        ),
        0,
        "the outbox holds no synchronous run"
    );
    let first = db.query_one(&format!(
        "SELECT id::text FROM sync_runs WHERE submission_id = '{submission}' \
         ORDER BY started_at, id LIMIT 1"
    ));

    // GetRuns: one run, the first record.
    let runs = client
        .get_runs(GetRunsRequest {
            submission_id: submission.clone(),
        })
        .await
        .expect("GetRuns")
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = &runs[0];
    assert_eq!(run.run_id, first);
    assert!(!run.is_async);
    assert_eq!(run.state(), PbRunState::Succeeded);
    assert_eq!(run.attempts, 1);
    assert_eq!(to_json(run.output.as_ref().expect("output")), sample());

    // `daisy runs list`'s query and the console's pages.
    let listed = db
        .registry()
        .list_runs(Some(RunState::Succeeded), Some(form), 10)
        .expect("listing");
    let listed: Vec<String> = listed.iter().map(|r| r.id.to_string()).collect();
    assert_eq!(listed, std::slice::from_ref(&first));
    let (status, page) = get(ops, &format!("/runs?form={form}&state=succeeded&minutes=5")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page.matches("href=\"/runs/").count(), 1, "{page}");
    assert!(page.contains(&format!("href=\"/runs/{first}\"")), "{page}");
    assert!(page.contains("(sync)"), "{page}");
    let (status, page) = get(ops, &format!("/runs/{first}")).await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("echo") && page.contains("succeeded"),
        "{page}"
    );
    let (status, page) = get(ops, "/").await;
    assert_eq!(status, 200, "{page}");
    // The chart counts executions: both records.
    let minutes = db.registry().runs_per_minute(5).expect("runs per minute");
    assert_eq!(
        minutes
            .iter()
            .filter(|m| m.standing == "succeeded")
            .map(|m| m.runs)
            .sum::<i64>(),
        2,
        "{minutes:?}"
    );
}

/// A logged run of `submission` that started at `started`.
fn record(submission: Uuid, started: chrono::DateTime<Utc>) -> SyncRun {
    SyncRun {
        id: Uuid::new_v4(),
        submission_id: submission,
        form_id: Uuid::new_v4(),
        task_id: Uuid::new_v4(),
        task_name: "echo".into(),
        state: RunState::Dead,
        last_error: Some("broken".into()),
        output: None,
        started_at: started,
        finished_at: started + chrono::Duration::milliseconds(3),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_without_a_partition_still_logs_and_retention_drops_old_days() {
    let db = TestDb::new();
    let registry = db.registry();
    let now = Utc::now();
    let today = now.date_naive();
    let old_day = today - Days::new(40);
    assert_eq!(registry.prepare_sync_run_days(today, 2).expect("today"), 3);
    assert_eq!(registry.prepare_sync_run_days(old_day, 0).expect("old"), 1);
    assert_eq!(
        registry.prepare_sync_run_days(today, 2).expect("again"),
        0,
        "days that have a partition are left alone"
    );

    let (current, old, ancient, later) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let in_five_days = now + chrono::Duration::days(5);
    registry
        .record_sync_runs(&[
            record(current, now),
            record(old, now - chrono::Duration::days(40)),
            record(ancient, now - chrono::Duration::days(400)),
            record(later, in_five_days),
        ])
        .expect("every record is written, with or without its day's partition");
    let table = |submission: Uuid| {
        db.query_one(&format!(
            "SELECT tableoid::regclass::text FROM sync_runs WHERE submission_id = '{submission}'"
        ))
    };
    let partition = |day: chrono::NaiveDate| format!("sync_runs_{}", day.format("%Y%m%d"));
    assert_eq!(table(current), partition(today));
    assert_eq!(table(old), partition(old_day));
    assert_eq!(table(ancient), "sync_runs_default");
    assert_eq!(table(later), "sync_runs_default");
    for submission in [current, old, ancient, later] {
        let runs = registry.runs_for_submission(submission).expect("runs");
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].state, RunState::Dead);
        assert_eq!(runs[0].last_error.as_deref(), Some("broken"));
    }

    // Preparing a day moves its rows out of the default partition.
    let later_day = in_five_days.date_naive();
    assert_eq!(
        registry.prepare_sync_run_days(later_day, 0).expect("later"),
        1
    );
    assert_eq!(table(later), partition(later_day));

    // Retention at 30 days: the 40-day-old day goes whole, the default
    // partition's old row by row; nothing newer.
    let pruned = registry
        .prune_all(now - chrono::Duration::days(30), 1000)
        .expect("pruned");
    assert_eq!((pruned.days, pruned.runs), (1, 1), "{pruned:?}");
    let days = registry.sync_run_days().expect("days");
    assert!(!days.contains(&old_day), "{days:?}");
    assert!(
        days.contains(&today) && days.contains(&later_day),
        "{days:?}"
    );
    for (submission, left) in [(current, 1), (old, 0), (ancient, 0), (later, 1)] {
        assert_eq!(
            registry
                .runs_for_submission(submission)
                .expect("runs")
                .len(),
            left
        );
    }
    assert!(
        registry
            .prune_all(now - chrono::Duration::days(30), 1000)
            .expect("pruned")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_moves_synchronous_history_out_of_the_outbox_and_back() {
    let up = include_str!("../../../migrations/2026-12-04-000001_sync_run_log/up.sql");
    let down = include_str!("../../../migrations/2026-12-04-000001_sync_run_log/down.sql");
    let db = TestDb::new();
    let mut conn = PgConnection::establish(&db.url).expect("connect");
    conn.batch_execute(down).expect("down");
    // Before: synchronous runs of two days in the outbox, and one async run.
    let (sub, form, task) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    conn.batch_execute(&format!(
        "INSERT INTO task_runs (id, submission_id, form_id, task_id, task_name, is_async, state, \
             attempts, max_attempts, output, started_at, finished_at, created_at) VALUES \
         (gen_random_uuid(), '{sub}', '{form}', '{task}', 'echo', false, 'succeeded', 1, 1, \
          '{{\"a\": 1}}', now() - interval '3 days', now() - interval '3 days', now() - interval '3 days'), \
         (gen_random_uuid(), gen_random_uuid(), '{form}', '{task}', 'echo', false, 'dead', 1, 1, \
          NULL, now(), now(), now()), \
         (gen_random_uuid(), '{sub}', '{form}', gen_random_uuid(), 'later', true, 'queued', 0, 5, \
          NULL, NULL, NULL, now())"
    ))
    .expect("history");
    conn.batch_execute(up).expect("up");
    assert_eq!(count(&db, "SELECT 1 FROM sync_runs"), 2);
    assert_eq!(count(&db, "SELECT 1 FROM task_runs"), 1);
    assert_eq!(count(&db, "SELECT 1 FROM task_runs WHERE NOT is_async"), 0);
    assert_eq!(
        count(&db, "SELECT 1 FROM sync_runs_default"),
        0,
        "history goes to partitions of its own days"
    );
    let runs = db.registry().runs_for_submission(sub).expect("runs");
    let mut shown: Vec<_> = runs
        .iter()
        .map(|r| (r.task_name.as_str(), r.is_async))
        .collect();
    shown.sort_unstable();
    assert_eq!(shown, [("echo", false), ("later", true)]);
    // And back, for a downgrade.
    conn.batch_execute(down).expect("down again");
    assert_eq!(count(&db, "SELECT 1 FROM task_runs WHERE NOT is_async"), 2);
    conn.batch_execute(up).expect("up again");
}
