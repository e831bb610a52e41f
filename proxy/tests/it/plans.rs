//! The hot statements find their rows through indexes on their own: no
//! planner setting forces it. Checked on a database that looks like a busy
//! one (tens of thousands of runs, statistics that lag behind the table's
//! growth), by PostgreSQL's own count of sequential and index scans per
//! table while each statement runs, as the proxy and the worker run it
//! (the same binds, prepared and planned the same way).

use std::time::{Duration, Instant};

use proxy::registry::{Acceptance, ClaimRequest, Claimed, Finish, Registry, TaskDef};
use serde_json::json;
use uuid::Uuid;

use crate::{asynchronous::async_task, util::*};

/// The tables the hot statements touch.
const TABLES: [&str; 3] = ["task_runs", "submissions", "task_run_attempts"];

/// Sequential and index scans of each of [`TABLES`], as the statistics
/// count them.
fn scans(db: &TestDb) -> Vec<(i64, i64)> {
    TABLES
        .iter()
        .map(|table| {
            let row = db.query_one(&format!(
                "SELECT coalesce(seq_scan, 0) || ' ' || coalesce(idx_scan, 0) \
                 FROM pg_stat_user_tables WHERE relname = '{table}'"
            ));
            let (seq, idx) = row.split_once(' ').expect("two counts");
            (seq.parse().expect("a count"), idx.parse().expect("a count"))
        })
        .collect()
}

/// Runs `statement` on a registry of its own, closes its connections (a
/// backend reports its statistics as it exits) and returns the sequential
/// scans it made of each table, once its index scans have been counted.
fn scans_during(db: &TestDb, statement: impl FnOnce(&Registry)) -> Vec<i64> {
    let before = scans(db);
    let registry = db.registry();
    statement(&registry);
    drop(registry);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = before.clone();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = scans(db);
        if now != before && now == last {
            return now
                .iter()
                .zip(&before)
                .map(|(now, before)| now.0 - before.0)
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "the statement's scans were never counted"
        );
        last = now;
    }
}

fn acceptances(form: Uuid, task: &TaskDef, n: usize) -> Vec<Acceptance> {
    (0..n)
        .map(|n| Acceptance {
            form,
            submission: Uuid::new_v4(),
            payload: json!({ "answers": { "n": n } }),
            context: None,
            tasks: vec![task.clone()],
            trace: None,
        })
        .collect()
}

fn accept(registry: &Registry, requests: &[Acceptance], grace: Duration) -> Vec<Uuid> {
    registry
        .accept(requests, grace)
        .expect("accepted")
        .iter()
        .map(|r| r.as_ref().expect("no conflict")[0].run_id)
        .collect()
}

fn claim(registry: &Registry, runs: &[Uuid]) -> Vec<Claimed> {
    let requests: Vec<ClaimRequest> = runs
        .iter()
        .map(|&run| ClaimRequest {
            run,
            redelivered: false,
            token: Uuid::new_v4(),
        })
        .collect();
    registry
        .claim(&requests, Duration::from_secs(60))
        .expect("claim")
        .into_iter()
        .map(|c| c.expect("claimed"))
        .collect()
}

fn succeed(registry: &Registry, claimed: Vec<Claimed>) {
    let outcomes: Vec<_> = claimed
        .into_iter()
        .map(|c| (c, Finish::Succeeded(json!({ "row": 1 }))))
        .collect();
    registry.finish("w", &outcomes).expect("finished");
}

/// One hot statement, as the proxy or the worker runs it.
type Statement<'a> = Box<dyn FnOnce(&Registry) + 'a>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_statements_use_indexes_on_a_busy_database() {
    const BATCH: usize = 250;
    let db = TestDb::new();
    let form = Uuid::new_v4();
    let task = db.attach_with(async_task(form, "row", "config", json!({}), 3));
    let registry = db.registry();
    // A history: 20,000 drained runs, one in five retried once, analyzed
    // half-way, so the statistics know half of the rows (autovacuum keeps
    // them far closer).
    let mut retried = Vec::new();
    for round in 0..80 {
        let runs = accept(&registry, &acceptances(form, &task, BATCH), Duration::ZERO);
        let mut claimed = claim(&registry, &runs);
        let failed: Vec<_> = claimed
            .drain(..BATCH / 5)
            .map(|c| {
                let retry = Finish::Retry {
                    error: "throttled".into(),
                    after: Duration::ZERO,
                };
                (c, retry)
            })
            .collect();
        registry.finish("w", &failed).expect("finished");
        claimed.extend(claim(&registry, &runs[..BATCH / 5]));
        succeed(&registry, claimed);
        retried.push(runs[0]);
        if round == 39 {
            db.execute("ANALYZE");
        }
    }
    // Work in flight: runs still queued and due, some published, some running.
    let due = accept(&registry, &acceptances(form, &task, BATCH), Duration::ZERO);
    let queued = accept(
        &registry,
        &acceptances(form, &task, BATCH),
        Duration::from_secs(60),
    );
    registry.mark_published(&queued[..100]).expect("marked");
    let running = claim(&registry, &queued[100..200]);
    drop(registry);

    let fresh = acceptances(form, &task, BATCH);
    let replays = fresh[..10].to_vec();
    let statements: Vec<(&str, Statement)> = vec![
        (
            "accept",
            Box::new(|r: &Registry| drop(accept(r, &fresh, Duration::from_secs(60)))),
        ),
        (
            "accept of replays",
            Box::new(|r: &Registry| drop(accept(r, &replays, Duration::from_secs(60)))),
        ),
        (
            "mark_published",
            Box::new(|r: &Registry| r.mark_published(&queued[200..]).expect("marked")),
        ),
        (
            "relay_batch",
            Box::new(|r: &Registry| {
                let relayed = r
                    .relay_batch(1000, |due| due.iter().map(|(id, _)| *id).collect())
                    .expect("relayed");
                assert_eq!(relayed, BATCH, "the relay finds the due runs");
            }),
        ),
        (
            "claim",
            Box::new(|r: &Registry| drop(claim(r, &due[..200]))),
        ),
        ("finish", Box::new(move |r: &Registry| succeed(r, running))),
        (
            "runs_for_submission",
            Box::new(|r: &Registry| {
                for request in &replays {
                    assert_eq!(
                        r.runs_for_submission(request.submission)
                            .expect("runs")
                            .len(),
                        1
                    );
                }
            }),
        ),
        (
            "attempts",
            Box::new(|r: &Registry| {
                for run in &due[..10] {
                    r.attempts(*run).expect("attempts");
                }
                for run in &retried[..10] {
                    assert_eq!(r.attempts(*run).expect("attempts").len(), 2);
                }
            }),
        ),
        (
            "requeue_stale",
            Box::new(|r: &Registry| {
                let requeued = r.requeue_stale(Duration::from_secs(600)).expect("swept");
                assert_eq!(requeued, 0, "nothing is stale yet");
            }),
        ),
    ];
    let mut scanned = Vec::new();
    for (name, statement) in statements {
        let seq = scans_during(&db, statement);
        for (table, n) in TABLES.iter().zip(seq) {
            if n > 0 {
                scanned.push(format!("{name} scanned {table} {n} time(s)"));
            }
        }
    }
    assert!(
        scanned.is_empty(),
        "hot statements read whole tables: {scanned:?}"
    );
}

/// Index entries read from `task_runs`'s indexes so far.
fn index_entries_read(db: &TestDb) -> i64 {
    db.query_one(
        "SELECT coalesce(sum(idx_tup_read), 0)::text FROM pg_stat_user_indexes \
         WHERE relname = 'task_runs'",
    )
    .parse()
    .expect("a count")
}

/// [`index_entries_read`] once every backend that used the database has
/// reported its counts (a backend reports them as it exits).
fn settled_index_entries_read(db: &TestDb) -> i64 {
    let mut last = index_entries_read(db);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = index_entries_read(db);
        if now == last {
            return now;
        }
        last = now;
    }
}

/// A burst of new runs after a quiet spell (statistics that say nothing is
/// queued) must not turn a claim or a publish mark of a few runs into a
/// read of every queued run: the drain would slow down as its backlog grows
/// (it once took 70-120 ms a claim of 60 runs, the planner reading all
/// 20,000 queued runs through the state index into a hash join), and so
/// would the accepting proxy's marks (each one read the relay's whole
/// partial index of unpublished runs, which its statistics called empty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_and_a_publish_mark_read_only_their_runs_after_a_burst() {
    const BURST: usize = 20_000;
    const CLAIMED: usize = 60;
    let db = TestDb::new();
    // Statistics stay as they are now, whatever autovacuum would do.
    db.execute("ALTER TABLE task_runs SET (autovacuum_enabled = false)");
    let form = Uuid::new_v4();
    let task = db.attach_with(async_task(form, "row", "config", json!({}), 3));
    let registry = db.registry();
    for _ in 0..4 {
        let runs = accept(&registry, &acceptances(form, &task, 250), Duration::ZERO);
        succeed(&registry, claim(&registry, &runs));
    }
    drop(registry);
    db.execute("ANALYZE");
    db.execute(&format!(
        "INSERT INTO submissions (id, form_id, payload) SELECT gen_random_uuid(), '{form}', '{{}}' \
         FROM generate_series(1, {BURST}); \
         INSERT INTO task_runs (id, submission_id, form_id, task_id, task_name, is_async, state, \
                                max_attempts, next_attempt_at) \
         SELECT gen_random_uuid(), s.id, s.form_id, '{task}', 'row', true, 'queued', 3, now() \
         FROM submissions s WHERE NOT EXISTS (SELECT 1 FROM task_runs r WHERE r.submission_id = s.id)",
        task = task.id
    ));
    let burst: Vec<Uuid> = db
        .query_one(&format!(
            "SELECT string_agg(id::text, ',') FROM \
             (SELECT id FROM task_runs WHERE state = 'queued' LIMIT {}) r",
            2 * CLAIMED
        ))
        .split(',')
        .map(|id| id.parse().expect("a uuid"))
        .collect();
    let (burst, marked) = burst.split_at(CLAIMED);
    let before = settled_index_entries_read(&db);
    let registry = db.registry();
    let claimed = claim(&registry, burst);
    assert_eq!(claimed.len(), CLAIMED);
    drop(registry);
    let read = settled_index_entries_read(&db) - before;
    assert!(
        read > 0 && read <= 10 * CLAIMED as i64,
        "claiming {CLAIMED} runs read {read} index entries of task_runs"
    );
    let before = settled_index_entries_read(&db);
    let registry = db.registry();
    // Twice: the second time from the connection's prepared statement.
    registry
        .mark_published(&marked[..CLAIMED / 2])
        .expect("marked");
    registry
        .mark_published(&marked[CLAIMED / 2..])
        .expect("marked");
    drop(registry);
    let read = settled_index_entries_read(&db) - before;
    assert!(
        read > 0 && read <= 10 * CLAIMED as i64,
        "marking {CLAIMED} runs published read {read} index entries of task_runs"
    );
    assert_eq!(
        db.query_one("SELECT count(*)::text FROM task_runs WHERE published_at IS NOT NULL"),
        CLAIMED.to_string(),
        "the marks recorded every run"
    );
}

/// The worker's hot statements are raw SQL; written with `cached_sql`,
/// PostgreSQL prepares each once per connection instead of parsing and
/// planning it on every call. A placeholder used twice binds its value
/// twice, and one without a value is an error that names it.
#[test]
fn cached_sql_is_prepared_once_per_connection() {
    use diesel::{
        prelude::*,
        sql_types::{Integer, Text},
    };
    use proxy::registry::cached::cached_sql;

    #[derive(QueryableByName, Debug, PartialEq)]
    struct Row {
        #[diesel(sql_type = Integer)]
        n: i32,
        #[diesel(sql_type = Text)]
        s: String,
    }
    let db = TestDb::new();
    let mut conn = PgConnection::establish(&db.url).expect("connecting");
    let sql = "SELECT $1::int4 + $1::int4 AS n, $2::text || '/cached' AS s";
    for n in 1..=3 {
        let row: Row = cached_sql(sql)
            .bind::<Integer, _>(n)
            .bind::<Text, _>(format!("call {n}"))
            .get_result(&mut conn)
            .expect("the statement runs");
        assert_eq!(
            row,
            Row {
                n: 2 * n,
                s: format!("call {n}/cached")
            }
        );
    }
    let prepared: i64 = diesel::dsl::sql::<diesel::sql_types::BigInt>(
        "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%/cached%'",
    )
    .get_result(&mut conn)
    .expect("counted");
    assert_eq!(prepared, 1, "three calls, one prepared statement");

    let missing = cached_sql("SELECT $2::int4 AS n")
        .bind::<Integer, _>(1)
        .execute(&mut conn)
        .expect_err("$2 has no value");
    assert!(
        missing.to_string().contains("$2 has no bind"),
        "the error names the placeholder: {missing}"
    );
}
