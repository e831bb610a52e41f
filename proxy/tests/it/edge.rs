//! No request and no failure wedges Daisy: the edge refuses what the
//! database would, replays must match, and one bad item never sinks a batch.

use std::time::{Duration, Instant};

use proto::v1::{GetRunsRequest, Outcome, RunState};
use proxy::{
    lifecycle::Lifecycle,
    outbox::Acceptor,
    registry::{Acceptance, NewTask, SyncRun},
    run_log::RunLog,
};
use serde_json::{Value, json};
use tonic::Code;
use uuid::Uuid;

use crate::{asynchronous::async_task, util::*};

/// A submission nested `levels` deep.
fn nested(levels: usize) -> Value {
    (1..levels).fold(json!({"leaf": 1}), |inner, _| json!({ "n": inner }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_is_refused_naming_the_field_and_the_run_log_keeps_going() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("echo", "echo");
    plugins.install("testkit", "testkit");
    let (sync_form, async_form) = (Uuid::new_v4(), Uuid::new_v4());
    db.attach(sync_form, "echo", "echo", "echo", json!({}));
    db.attach_with(async_task(async_form, "later", "config", json!({}), 5));
    let server = TestServer::start(&db.url, plugins.path()).await;
    let mut client = server.client().await;

    for form in [sync_form, async_form] {
        let status = client
            .process(request(form, json!({"answers": {"name": "x\u{0}y"}})))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("submission.answers.name")
                && status.message().contains("NUL"),
            "{status:?}"
        );
    }
    // A clean call right after is served and recorded within 2 s.
    let clean = request(sync_form, sample());
    let response = client
        .process(clean.clone())
        .await
        .expect("served")
        .into_inner();
    assert_eq!(response.results[0].outcome(), Outcome::Succeeded);
    let recorded = wait_for_runs(
        &mut client,
        &clean.submission_id,
        Duration::from_secs(2),
        |runs| !runs.is_empty(),
    )
    .await;
    assert_eq!(recorded.len(), 1);
    let response = client
        .process(request(async_form, sample()))
        .await
        .expect("served");
    assert_eq!(response.into_inner().enqueued.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_nesting_is_invalid_argument_saying_what_to_fix() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("echo", "echo");
    let form = Uuid::new_v4();
    db.attach(form, "echo", "echo", "echo", json!({}));
    let server = TestServer::start(&db.url, plugins.path()).await;
    let mut client = server.client().await;
    for levels in [33, 60] {
        let status = client
            .process(request(form, nested(levels)))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{levels}: {status:?}");
        assert!(
            status.message().contains("32 levels"),
            "{levels}: {status:?}"
        );
        assert!(
            !status.message().contains("Protobuf"),
            "{levels}: {status:?}"
        );
    }
    let ok = process(&mut client, form, nested(32)).await;
    assert_eq!(ok.results[0].outcome(), Outcome::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_with_another_form_or_payload_is_already_exists_and_runs_nothing() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let (first, other) = (Uuid::new_v4(), Uuid::new_v4());
    db.attach_with(async_task(first, "first", "config", json!({}), 5));
    db.attach_with(async_task(other, "other", "config", json!({}), 5));
    let server = TestServer::start(&db.url, plugins.path()).await;
    let mut client = server.client().await;

    let original = request(first, sample());
    let accepted = client
        .process(original.clone())
        .await
        .expect("accepted")
        .into_inner();
    // Another form, same submission id.
    let status = client
        .process(proto::v1::ProcessRequest {
            form_id: other.to_string(),
            ..original.clone()
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(status.message().contains(&first.to_string()), "{status:?}");
    // The same form, another payload.
    let status = client
        .process(proto::v1::ProcessRequest {
            submission: Some(to_struct(json!({"something": "else"}))),
            ..original.clone()
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(
        status.message().contains("different submission"),
        "{status:?}"
    );
    // An exact replay keeps its idempotent answer.
    let replayed = client
        .process(original.clone())
        .await
        .expect("replayed")
        .into_inner();
    assert_eq!(replayed.enqueued, accepted.enqueued);
    let runs = client
        .get_runs(GetRunsRequest {
            submission_id: original.submission_id.clone(),
        })
        .await
        .expect("runs")
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].name, "first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_submission_the_database_refuses_fails_alone_in_its_batch() {
    let db = TestDb::new();
    let form = Uuid::new_v4();
    let task = db.attach_with(async_task(form, "later", "config", json!({}), 5));
    // One writer, so concurrent submissions share batches.
    let acceptor = Acceptor::start(db.registry(), Duration::from_secs(60), 1, &Lifecycle::new());
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let (acceptor, task) = (acceptor.clone(), task.clone());
            // Bypasses the edge: PostgreSQL's jsonb refuses NUL.
            let payload = if i == 20 {
                json!({"bad": "x\u{0}y"})
            } else {
                json!({"i": i})
            };
            tokio::spawn(async move {
                acceptor
                    .accept(Acceptance {
                        form,
                        submission: Uuid::new_v4(),
                        payload,
                        context: None,
                        tasks: vec![task],
                        trace: None,
                    })
                    .await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(call.await.expect("call"));
    }
    for (i, outcome) in outcomes.iter().enumerate() {
        match (i, outcome) {
            (20, Err(_)) => {}
            (20, Ok(_)) => panic!("the refused submission was accepted"),
            (_, Ok(Ok(runs))) => assert_eq!(runs.len(), 1),
            (_, other) => panic!("submission {i} failed with the bad one: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_log_record_the_database_refuses_is_dropped_and_the_log_moves_on() {
    let db = TestDb::new();
    let registry = db.registry();
    let (run_log, _writer) = RunLog::start(registry.clone(), 1 << 20, &Lifecycle::new());
    let record = |submission: Uuid, output: Value| SyncRun {
        id: Uuid::new_v4(),
        submission_id: submission,
        form_id: Uuid::new_v4(),
        task_id: Uuid::new_v4(),
        task_name: "echo".into(),
        state: proxy::registry::RunState::Succeeded,
        last_error: None,
        output: Some(output.to_string()),
        started_at: chrono::Utc::now(),
        finished_at: chrono::Utc::now(),
    };
    let (good, bad, later) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    run_log.record(vec![
        record(good, json!({"ok": 1})),
        record(bad, json!({"plugin said": "x\u{0}y"})),
        record(good, json!({"ok": 2})),
    ]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    run_log.record(vec![record(later, json!({"ok": 3}))]);
    let started = Instant::now();
    loop {
        let (g, l) = (
            registry.runs_for_submission(good).expect("runs"),
            registry.runs_for_submission(later).expect("runs"),
        );
        if g.len() == 2 && l.len() == 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the run log is stuck: {} and {} rows",
            g.len(),
            l.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(registry.runs_for_submission(bad).expect("runs").is_empty());
    assert_eq!(run_log.dropped(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_ends_in_a_normal_retry() {
    let mut stack = test_support::Stack::start(&[("testkit", "testkit")], &[]).await;
    let form = Uuid::new_v4();
    let task = stack.attach(
        form,
        "throttled",
        "testkit",
        "fail",
        true,
        &json!({"retryable": true, "retry_after_secs": 1_000_000_000_000u64, "message": "slow down"}),
    );
    stack.db.execute(&format!(
        "UPDATE tasks SET max_attempts = 2 WHERE id = '{task}'"
    ));
    let (submission, _) = stack.process(form, sample()).await;
    // The worker's --retry-max-ms is 2000: the second attempt comes within it.
    let runs = stack.settled(&submission, Duration::from_secs(30)).await;
    assert_eq!(runs[0].state(), RunState::Dead, "{:?}", runs[0]);
    assert_eq!(runs[0].attempts, 2, "{:?}", runs[0]);
    assert!(
        runs[0].last_error.contains("gave up after 2 attempts"),
        "{:?}",
        runs[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_message_respects_backoff_and_a_late_publish_mark_hides_no_retry() {
    use proxy::registry::{ClaimRequest, Finish};
    let db = TestDb::new();
    let form = Uuid::new_v4();
    let task = db.attach_with(async_task(form, "later", "config", json!({}), 5));
    let registry = db.registry();
    let submission = Uuid::new_v4();
    let accepted = registry
        .accept(
            &[Acceptance {
                form,
                submission,
                payload: json!({}),
                context: None,
                tasks: vec![task],
                trace: None,
            }],
            Duration::ZERO,
        )
        .expect("accepted");
    let run = accepted[0].as_ref().expect("no conflict")[0].run_id;
    let claim = |token: Uuid| {
        registry
            .claim(
                &[ClaimRequest {
                    run,
                    redelivered: false,
                    token,
                }],
                Duration::from_secs(60),
            )
            .expect("claim")
            .pop()
            .expect("one answer")
    };
    let claimed = claim(Uuid::new_v4()).expect("claimed");
    // A fast worker fails it and stores the retry...
    registry
        .finish(
            "worker",
            &[(
                claimed,
                Finish::Retry {
                    error: "busy".into(),
                    after: Duration::from_secs(60),
                },
            )],
        )
        .expect("finished");
    // ...before the proxy records that the first publish was confirmed.
    registry.mark_published(&[run]).expect("marked");
    let stored = &registry.runs_for_submission(submission).expect("runs")[0];
    assert_eq!(stored.state, "retrying");
    assert!(
        stored.published_at.is_none(),
        "the retry is hidden from the relay: {stored:?}"
    );
    // A duplicate of the first message, inside the backoff: nothing to claim.
    assert!(
        claim(Uuid::new_v4()).is_none(),
        "the duplicate skipped the backoff"
    );
    db.execute(&format!(
        "UPDATE task_runs SET next_attempt_at = now() - interval '1 second' WHERE id = '{run}'"
    ));
    let again = claim(Uuid::new_v4()).expect("claimed once due");
    assert_eq!(again.attempt, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_form_cache_stays_bounded_under_100_000_random_form_ids() {
    use proxy::catalog::{Catalog, MAX_UNKNOWN};
    let db = TestDb::new();
    let real = Uuid::new_v4();
    db.attach(real, "echo", "echo", "echo", json!({}));
    let catalog = std::sync::Arc::new(Catalog::start(db.registry(), &Lifecycle::new(), |_| {}));
    // Cached only once the listener is connected.
    let started = Instant::now();
    while catalog.cached(real).is_none() {
        catalog.tasks(real).await.expect("tasks");
        assert!(started.elapsed() < Duration::from_secs(5), "never cached");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let catalog = catalog.clone();
            tokio::spawn(async move {
                for _ in 0..12_500 {
                    let tasks = catalog.tasks(Uuid::new_v4()).await.expect("tasks");
                    assert!(tasks.is_empty());
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("caller");
    }
    let (known, unknown) = catalog.sizes();
    assert_eq!(known, 1);
    assert!(unknown <= MAX_UNKNOWN, "{unknown} unknown forms cached");
    assert!(
        catalog.cached(real).is_some(),
        "the flood pushed a real form out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_deletes_old_finished_runs_and_never_pending_ones() {
    let db = TestDb::new();
    let form = Uuid::new_v4();
    let task = db.attach_with(async_task(form, "later", "config", json!({}), 5));
    let registry = db.registry();
    let subs: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let requests: Vec<Acceptance> = subs
        .iter()
        .map(|&submission| Acceptance {
            form,
            submission,
            payload: json!({}),
            context: None,
            tasks: vec![task.clone()],
            trace: None,
        })
        .collect();
    registry
        .accept(&requests, Duration::ZERO)
        .expect("accepted");
    // 0: succeeded, 1: dead, 2: retrying, all 40 days old; 3: succeeded today.
    for (i, state) in ["succeeded", "dead", "retrying", "succeeded"]
        .iter()
        .enumerate()
    {
        let age = if i == 3 { "0 days" } else { "40 days" };
        let sub = subs[i];
        db.execute(&format!(
            "UPDATE task_runs SET state = '{state}', created_at = now() - interval '{age}' WHERE submission_id = '{sub}'"
        ));
        db.execute(&format!(
            "UPDATE submissions SET created_at = now() - interval '{age}' WHERE id = '{sub}'"
        ));
        db.execute(&format!(
            "INSERT INTO task_run_attempts (run_id, attempt, worker, started_at, finished_at, outcome) \
             SELECT id, 1, 'w', now(), now(), '{state}' FROM task_runs WHERE submission_id = '{sub}'"
        ));
    }
    let out = std::process::Command::new(test_support::daisy_bin())
        .args(["runs", "prune", "--older-than", "30d"])
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("daisy runs prune");
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("deleted 2 run(s) and 2 submission(s)"),
        "{said}"
    );
    let left: Vec<usize> = subs
        .iter()
        .map(|&s| registry.runs_for_submission(s).expect("runs").len())
        .collect();
    assert_eq!(left, vec![0, 0, 1, 1]);
    let count = |sql: &str| {
        use diesel::{Connection, RunQueryDsl};
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = diesel::PgConnection::establish(&db.url).expect("connect");
        diesel::sql_query(sql)
            .get_result::<N>(&mut conn)
            .expect("count")
            .n
    };
    assert_eq!(count("SELECT count(*) AS n FROM task_run_attempts"), 2);
    assert_eq!(count("SELECT count(*) AS n FROM submissions"), 2);
    // Nothing more to do the second time.
    let again = std::process::Command::new(test_support::daisy_bin())
        .args(["runs", "prune", "--older-than", "30d"])
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("daisy runs prune");
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("deleted 0 run(s) and 0 submission(s)")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_log_backlog_is_bounded_in_bytes_while_the_database_is_away() {
    // Nothing listens on port 1: every write fails, transiently.
    let away = proxy::registry::Registry::new(&db_config("postgres://postgres@127.0.0.1:1/none"));
    let (run_log, _writer) = RunLog::start(away, 64 * 1024, &Lifecycle::new());
    let big = json!({"essay": "x".repeat(4000)});
    for _ in 0..100 {
        run_log.record(vec![SyncRun {
            id: Uuid::new_v4(),
            submission_id: Uuid::new_v4(),
            form_id: Uuid::new_v4(),
            task_id: Uuid::new_v4(),
            task_name: "echo".into(),
            state: proxy::registry::RunState::Succeeded,
            last_error: None,
            output: Some(big.to_string()),
            started_at: chrono::Utc::now(),
            finished_at: chrono::Utc::now(),
        }]);
    }
    assert!(
        run_log.backlog_bytes() <= 64 * 1024,
        "{} bytes held",
        run_log.backlog_bytes()
    );
    // About 15 records of 4 KiB fit; the rest were dropped and counted.
    assert!(run_log.dropped() >= 80, "{} dropped", run_log.dropped());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_the_database_refuses_ends_dead_alone_and_its_batch_is_stored() {
    let mut stack = test_support::Stack::start(&[("testkit", "testkit")], &[]).await;
    let (bad, good) = (Uuid::new_v4(), Uuid::new_v4());
    stack.attach(bad, "nul", "testkit", "nul", true, &json!({}));
    stack.attach(
        good,
        "config",
        "testkit",
        "config",
        true,
        &json!({"ok": true}),
    );
    let (poison, _) = stack.process(bad, sample()).await;
    let mut goods = Vec::new();
    for i in 0..20 {
        goods.push(stack.process(good, json!({"i": i})).await.0);
    }
    let runs = stack.settled(&poison, Duration::from_secs(30)).await;
    assert_eq!(runs[0].state(), RunState::Dead, "{:?}", runs[0]);
    assert!(
        runs[0].last_error.contains("could not be stored"),
        "{:?}",
        runs[0]
    );
    for good in goods {
        let runs = stack.settled(&good, Duration::from_secs(30)).await;
        assert_eq!(runs[0].state(), RunState::Succeeded, "{:?}", runs[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_run_is_not_taken_for_published() {
    let queue = TestQueue::new();
    let publisher = proxy::queue::Publisher::new(queue.config.clone());
    let (routed, unroutable) = (Uuid::new_v4(), Uuid::new_v4());
    assert_eq!(publisher.publish(&[routed.into()]).await, vec![routed]);
    // Take the queue away: the exchange has nowhere to route runs to.
    {
        use amqprs::{
            channel::QueueDeleteArguments,
            connection::{Connection, OpenConnectionArguments},
        };
        let mut args = OpenConnectionArguments::try_from(queue.names.url.as_str()).expect("URL");
        args.virtual_host("/");
        let connection = Connection::open(&args).await.expect("connect");
        let channel = connection.open_channel(None).await.expect("channel");
        channel
            .queue_delete(QueueDeleteArguments::new(&queue.names.queue))
            .await
            .expect("delete");
        let _ = channel.close().await;
        let _ = connection.close().await;
    }
    assert!(
        publisher.publish(&[unroutable.into()]).await.is_empty(),
        "an unroutable run was confirmed as published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_longer_than_the_stale_time_is_not_requeued_while_it_executes() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let counter = std::env::temp_dir().join(format!("daisy-lease-{}", Uuid::new_v4().simple()));
    let form = Uuid::new_v4();
    db.attach_with(NewTask {
        timeout_ms: 30_000,
        ..async_task(
            form,
            "long",
            "count",
            json!({"path": counter.display().to_string(), "sleep_ms": 7000}),
            5,
        )
    });
    let queue = TestQueue::new();
    // The sweep treats anything quiet for 2 s as stale; the worker's lease
    // is 2 s too, extended while the 7 s run executes.
    let server = TestServer::start_with(proxy::Config {
        stale_after: Duration::from_secs(2),
        ..server_config(&db.url, plugins.path(), queue.config.clone())
    })
    .await;
    let _worker = queue.worker(&db.url, plugins.path(), None, &["--lease-secs", "2"]);
    let mut client = server.client().await;
    let request = request(form, sample());
    client.process(request.clone()).await.expect("accepted");
    let runs = wait_for_runs(
        &mut client,
        &request.submission_id,
        Duration::from_secs(40),
        |runs| {
            runs.first()
                .is_some_and(|r| r.state() == RunState::Succeeded)
        },
    )
    .await;
    assert_eq!(runs[0].attempts, 1, "{:?}", runs[0]);
    let executions = std::fs::read_to_string(&counter).expect("counter");
    let _ = std::fs::remove_file(&counter);
    assert_eq!(
        executions.lines().count(),
        1,
        "the run executed more than once"
    );
}

#[test]
fn a_run_state_this_build_does_not_know_is_an_error_naming_it() {
    let db = TestDb::new();
    let form = Uuid::new_v4();
    let task = db.attach_with(async_task(form, "later", "config", json!({}), 5));
    let registry = db.registry();
    let submission = Uuid::new_v4();
    registry
        .accept(
            &[Acceptance {
                form,
                submission,
                payload: json!({}),
                context: None,
                tasks: vec![task],
                trace: None,
            }],
            Duration::ZERO,
        )
        .expect("accepted");
    // As a newer build's migration would allow it.
    db.execute("ALTER TABLE task_runs DROP CONSTRAINT task_runs_state_check");
    db.execute("UPDATE task_runs SET state = 'paused'");
    let err = registry
        .runs_for_submission(submission)
        .expect_err("an unknown state is not read as another");
    assert!(
        matches!(&err, proxy::error::RegistryError::UnknownRunState(state) if state == "paused"),
        "{err:?}"
    );
    assert!(err.to_string().contains("'paused'"), "{err}");
}
