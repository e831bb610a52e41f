//! The layer around a plain axum handler, against a real `daisy serve`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Extension, Json, Router,
    body::Body,
    extract::Path,
    http::{Request, StatusCode},
    routing::post,
};
use http_body_util::BodyExt;
use post_submission::{
    DaisyClient, PendingStore, PostSubmission, PostSubmissionLayer, Resend, StoreFuture, Stored,
    SubmissionContext,
};
use serde_json::{Value, json};
use test_support::{Daisy, PluginsDir, TestDb, TestQueue, free_port};
use tower::ServiceExt;
use uuid::Uuid;

/// The backend's store, in memory: submission id → (stored at, submission),
/// and the rejected ones with their reasons.
#[derive(Clone, Default)]
struct MemStore(
    Arc<Mutex<HashMap<Uuid, (Instant, Stored)>>>,
    Arc<Mutex<Vec<(Uuid, String)>>>,
);

impl MemStore {
    fn add(&self, stored: Stored) {
        self.0
            .lock()
            .expect("store lock")
            .insert(stored.submission_id, (Instant::now(), stored));
    }
    fn pending_ids(&self) -> Vec<Uuid> {
        self.0.lock().expect("store lock").keys().copied().collect()
    }
}

impl PendingStore for MemStore {
    fn mark_done(&self, submission_id: Uuid) -> StoreFuture<'_, ()> {
        self.0.lock().expect("store lock").remove(&submission_id);
        Box::pin(async { Ok(()) })
    }
    fn mark_rejected(&self, submission_id: Uuid, reason: String) -> StoreFuture<'_, ()> {
        self.0.lock().expect("store lock").remove(&submission_id);
        self.1
            .lock()
            .expect("store lock")
            .push((submission_id, reason));
        Box::pin(async { Ok(()) })
    }
    fn pending(&self, older_than: Duration, limit: usize) -> StoreFuture<'_, Vec<Stored>> {
        // Oldest first, as a real store lists them.
        let mut due: Vec<(Instant, Stored)> = self
            .0
            .lock()
            .expect("store lock")
            .values()
            .filter(|(at, _)| at.elapsed() >= older_than)
            .cloned()
            .collect();
        due.sort_by_key(|(at, _)| *at);
        let due: Vec<Stored> = due.into_iter().take(limit).map(|(_, s)| s).collect();
        Box::pin(async move { Ok(due) })
    }
}

/// A plain submit handler: stores the submission (born pending) and answers 201.
async fn submit(
    Extension(store): Extension<MemStore>,
    Path(form_id): Path<Uuid>,
    Json(body): Json<Value>,
) -> Result<(StatusCode, Extension<Stored>, Json<Value>), (StatusCode, Json<Value>)> {
    if body.get("name").is_none() {
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error": "name is required"})),
        ));
    }
    let stored = Stored {
        form_id,
        submission_id: Uuid::new_v4(),
        submission: body,
        context: None,
    };
    store.add(stored.clone());
    Ok((
        StatusCode::CREATED,
        Extension(stored.clone()),
        Json(json!({"id": stored.submission_id})),
    ))
}

fn app(daisy: PostSubmission, store: MemStore) -> Router {
    Router::new()
        .route(
            "/forms/{form_id}/submit",
            post(submit).layer(PostSubmissionLayer::new(daisy)),
        )
        .layer(Extension(store))
}

async fn call(app: &Router, form: Uuid, body: Value) -> (StatusCode, Value) {
    let request = Request::post(format!("/forms/{form}/submit"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, serde_json::from_slice(&bytes).expect("JSON body"))
}

/// Daisy's side: a migrated database, plugins, queues, a form with a
/// synchronous echo and an asynchronous task.
struct Backend {
    db: TestDb,
    plugins: PluginsDir,
    queue: TestQueue,
    form: Uuid,
}

impl Backend {
    fn new(sync_func: &str, sync_config: Value) -> Backend {
        let (db, plugins, queue) = (TestDb::daisy(), PluginsDir::new(), TestQueue::new());
        plugins.install("testkit", "testkit");
        let form = Uuid::new_v4();
        db.execute(&format!(
            "INSERT INTO tasks (id, form_id, name, module, func, async_status, config) VALUES \
             (gen_random_uuid(), '{form}', 'check', 'testkit', '{sync_func}', false, '{sync_config}'), \
             (gen_random_uuid(), '{form}', 'archive', 'testkit', 'config', true, '{{\"archived\": true}}')"
        ));
        Backend {
            db,
            plugins,
            queue,
            form,
        }
    }

    fn serve_at(&self, addr: std::net::SocketAddr) -> Daisy {
        Daisy::serve_at(
            addr,
            &self.db.url,
            self.plugins.path(),
            &self.queue,
            &self.queue.url,
        )
    }

    fn worker(&self) -> Daisy {
        Daisy::worker(
            &self.db.url,
            self.plugins.path(),
            &self.queue,
            &self.queue.url,
            &[],
        )
    }
}

async fn wait_until_served(addr: std::net::SocketAddr) {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "daisy serve did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn results_are_merged_into_the_handlers_json_response() {
    let backend = Backend::new("echo", json!({}));
    let addr = free_port();
    let _daisy = backend.serve_at(addr);
    let _worker = backend.worker();
    wait_until_served(addr).await;
    let store = MemStore::default();
    let client = DaisyClient::connect_lazy(&format!("http://{addr}"), Duration::from_secs(5))
        .expect("client");
    let app = app(PostSubmission::new(client, store.clone()), store.clone());

    let (status, body) = call(&app, backend.form, json!({"name": "Ada"})).await;

    assert_eq!(status, StatusCode::CREATED);
    assert!(
        body["id"].is_string(),
        "the handler's own fields stay: {body}"
    );
    let post = &body["post_submission"];
    assert_eq!(post["status"], "done", "{body}");
    assert_eq!(post["results"][0]["name"], "check");
    assert_eq!(post["results"][0]["outcome"], "succeeded");
    assert_eq!(
        post["results"][0]["output"],
        json!({"plugin": "testkit", "submission": {"name": "Ada"}})
    );
    assert_eq!(post["enqueued"][0]["name"], "archive");
    assert!(post["enqueued"][0]["run_id"].is_string());
    assert!(
        store.pending_ids().is_empty(),
        "marked done once Daisy accepted it"
    );
}

#[tokio::test]
async fn the_submission_context_from_a_request_extension_reaches_the_tasks() {
    let backend = Backend::new("seen", json!({}));
    let addr = free_port();
    let _daisy = backend.serve_at(addr);
    wait_until_served(addr).await;
    let store = MemStore::default();
    let client = DaisyClient::connect_lazy(&format!("http://{addr}"), Duration::from_secs(5))
        .expect("client");
    // What a backend's authentication middleware knows about the submitter.
    let app = app(PostSubmission::new(client, store.clone()), store.clone()).layer(
        axum::middleware::from_fn(
            |mut request: axum::extract::Request, next: axum::middleware::Next| async move {
                request.extensions_mut().insert(SubmissionContext {
                    organisation_id: "org-9".into(),
                    owner_emails: vec!["owner@example.org".into()],
                    submitter: "ada@example.org".into(),
                    locale: "fr-FR".into(),
                });
                next.run(request).await
            },
        ),
    );

    let (status, body) = call(&app, backend.form, json!({"name": "Ada"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let seen = &body["post_submission"]["results"][0]["output"];
    assert_eq!(
        seen["context"],
        json!({
            "organisation_id": "org-9",
            "owner_emails": ["owner@example.org"],
            "submitter": "ada@example.org",
            "locale": "fr-FR",
        }),
        "{body}"
    );
    assert_eq!(seen["submission_id"], body["id"]);
}

#[tokio::test]
async fn error_responses_pass_through_untouched_and_nothing_is_sent() {
    let store = MemStore::default();
    // Nothing listens there: a call would come back pending.
    let client =
        DaisyClient::connect_lazy(&format!("http://{}", free_port()), Duration::from_secs(1))
            .expect("client");
    let app = app(PostSubmission::new(client, store.clone()), store.clone());

    let (status, body) = call(&app, Uuid::new_v4(), json!({"no_name": true})).await;

    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body, json!({"error": "name is required"}));
}

#[tokio::test]
async fn daisy_down_answers_pending_and_the_resender_completes_it_later() {
    let backend = Backend::new("echo", json!({}));
    let addr = free_port();
    let store = MemStore::default();
    let client = DaisyClient::connect_lazy(&format!("http://{addr}"), Duration::from_millis(500))
        .expect("client");
    let daisy = PostSubmission::new(client, store.clone());
    let app = app(daisy.clone(), store.clone());

    let mut submitted = Vec::new();
    for i in 0..5 {
        let (status, body) = call(&app, backend.form, json!({"name": format!("n{i}")})).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(body["post_submission"]["status"], "pending", "{body}");
        assert!(
            body["post_submission"]["reason"]
                .as_str()
                .is_some_and(|r| !r.is_empty())
        );
        submitted.push(body["id"].as_str().expect("id").to_owned());
    }
    assert_eq!(store.pending_ids().len(), 5);

    let _daisy = backend.serve_at(addr);
    let _worker = backend.worker();
    wait_until_served(addr).await;
    let resend = Resend {
        grace: Duration::ZERO,
        ..Resend::default()
    };
    let started = Instant::now();
    while !store.pending_ids().is_empty() {
        let _ = daisy.resend_pass(&resend).await;
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still pending: {:?}",
            store.pending_ids()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client =
        proto::v1::post_sub_proxy_client::PostSubProxyClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
    for submission in &submitted {
        test_support::wait_for_runs(&mut client, submission, Duration::from_secs(30), |runs| {
            runs.iter().filter(|r| r.is_async).count() == 1
                && runs
                    .iter()
                    .all(|r| r.state() == proto::v1::RunState::Succeeded)
        })
        .await;
    }
}

#[tokio::test]
async fn slow_daisy_is_cut_off_at_the_deadline_and_completed_later() {
    // The synchronous task takes 2 s; the layer waits 300 ms.
    let backend = Backend::new("sleep", json!({"ms": 2000}));
    let addr = free_port();
    let _daisy = backend.serve_at(addr);
    let _worker = backend.worker();
    wait_until_served(addr).await;
    let store = MemStore::default();
    let deadline = Duration::from_millis(300);
    let client = DaisyClient::connect_lazy(&format!("http://{addr}"), deadline).expect("client");
    let daisy = PostSubmission::new(client, store.clone());
    let app = app(daisy.clone(), store.clone());

    let started = Instant::now();
    let (status, body) = call(&app, backend.form, json!({"name": "Ada"})).await;
    let took = started.elapsed();

    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["post_submission"]["status"], "pending", "{body}");
    assert!(
        took < deadline + Duration::from_millis(500),
        "answered after {took:?}"
    );
    assert_eq!(store.pending_ids().len(), 1);

    let resend = Resend {
        grace: Duration::ZERO,
        deadline: Duration::from_secs(10),
        ..Resend::default()
    };
    assert_eq!(daisy.resend_pass(&resend).await, Ok(1));
    assert!(store.pending_ids().is_empty());
}

#[tokio::test]
async fn a_submission_daisy_refuses_is_rejected_and_blocks_none_behind_it() {
    let backend = Backend::new("echo", json!({}));
    let addr = free_port();
    let _daisy = backend.serve_at(addr);
    wait_until_served(addr).await;
    let store = MemStore::default();
    let client = DaisyClient::connect_lazy(&format!("http://{addr}"), Duration::from_secs(5))
        .expect("client");
    let daisy = PostSubmission::new(client, store.clone());
    // The oldest pending submission is one Daisy refuses (nested 60 deep);
    // five good ones wait behind it.
    let poison = (1..60).fold(json!({"leaf": 1}), |inner, _| json!({ "n": inner }));
    let poison_id = Uuid::new_v4();
    store.add(Stored {
        form_id: backend.form,
        submission_id: poison_id,
        submission: poison,
        context: None,
    });
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(2));
        store.add(Stored {
            form_id: backend.form,
            submission_id: Uuid::new_v4(),
            submission: json!({"name": format!("n{i}")}),
            context: None,
        });
    }
    let resend = Resend {
        grace: Duration::ZERO,
        ..Resend::default()
    };
    assert_eq!(daisy.resend_pass(&resend).await, Ok(5));
    assert!(store.pending_ids().is_empty(), "{:?}", store.pending_ids());
    let rejected = store.1.lock().expect("store lock").clone();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].0, poison_id);
    assert!(rejected[0].1.contains("InvalidArgument"), "{rejected:?}");

    // Through the layer, a refused submission answers `rejected` at once.
    let app = app(daisy.clone(), store.clone());
    let deep = (1..60).fold(json!({"leaf": 1}), |inner, _| json!({ "n": inner }));
    let (status, body) = call(&app, backend.form, json!({"name": "Ada", "deep": deep})).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["post_submission"]["status"], "rejected", "{body}");
    assert!(store.pending_ids().is_empty());
}

/// Two `daisy serve` processes and two workers on one database and broker;
/// the client balances across both serves; one serve is SIGKILLed under load
/// and restarted. Every accepted submission ends with its asynchronous run
/// SUCCEEDED, executed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serve_killed_under_load_beside_another_loses_and_repeats_nothing() {
    const SUBMISSIONS: usize = 800;
    let (db, plugins, queue) = (TestDb::daisy(), PluginsDir::new(), TestQueue::new());
    plugins.install("testkit", "testkit");
    let counter =
        std::env::temp_dir().join(format!("daisy-two-serves-{}", Uuid::new_v4().simple()));
    let form = Uuid::new_v4();
    db.execute(&format!(
        "INSERT INTO tasks (id, form_id, name, module, func, async_status, config) VALUES \
         (gen_random_uuid(), '{form}', 'check', 'testkit', 'echo', false, '{{}}'), \
         (gen_random_uuid(), '{form}', 'receipt', 'testkit', 'count', true, '{{\"path\": \"{}\"}}')",
        counter.display()
    ));
    let (addr_a, addr_b) = (free_port(), free_port());
    let serve = |addr| Daisy::serve_at(addr, &db.url, plugins.path(), &queue, &queue.url);
    let mut serve_a = serve(addr_a);
    let _serve_b = serve(addr_b);
    let _workers = [
        Daisy::worker(&db.url, plugins.path(), &queue, &queue.url, &[]),
        Daisy::worker(&db.url, plugins.path(), &queue, &queue.url, &[]),
    ];
    wait_until_served(addr_a).await;
    wait_until_served(addr_b).await;
    let client = DaisyClient::connect_balanced(
        &[&format!("http://{addr_a}"), &format!("http://{addr_b}")],
        Duration::from_secs(2),
    )
    .expect("client");
    let store = MemStore::default();
    let daisy = PostSubmission::new(client, store.clone());
    let resender = daisy.spawn_resender(Resend {
        grace: Duration::from_millis(500),
        interval: Duration::from_millis(200),
        max_backoff: Duration::from_secs(2),
        ..Resend::default()
    });
    let app = app(daisy.clone(), store.clone());

    let started = Instant::now();
    let submitters: Vec<_> = (0..8)
        .map(|k| {
            let app = app.clone();
            tokio::spawn(async move {
                let (mut ids, mut pending) = (Vec::new(), 0);
                for i in 0..SUBMISSIONS / 8 {
                    let (status, body) =
                        call(&app, form, json!({"name": format!("n{k}-{i}")})).await;
                    assert_eq!(status, StatusCode::CREATED, "{body}");
                    ids.push(body["id"].as_str().expect("id").to_owned());
                    if body["post_submission"]["status"] == "pending" {
                        pending += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (ids, pending)
            })
        })
        .collect();
    // Under load: serve A dies, and comes back two seconds later.
    tokio::time::sleep(Duration::from_millis(700)).await;
    serve_a.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _serve_a = serve(addr_a);
    let (mut ids, mut answered_pending) = (Vec::new(), 0);
    for submitter in submitters {
        let (some, pending) = submitter.await.expect("submitter");
        ids.extend(some);
        answered_pending += pending;
    }
    // Whatever was pending is re-sent until Daisy has it all.
    while !store.pending_ids().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{} still pending",
            store.pending_ids().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    resender.abort();
    let mut client =
        proto::v1::post_sub_proxy_client::PostSubProxyClient::connect(format!("http://{addr_b}"))
            .await
            .expect("connect");
    for id in &ids {
        test_support::wait_for_runs(&mut client, id, Duration::from_secs(60), |runs| {
            runs.iter().any(|r| r.is_async)
                && runs
                    .iter()
                    .all(|r| r.state() == proto::v1::RunState::Succeeded)
        })
        .await;
    }
    let drained = started.elapsed();
    let executions = std::fs::read_to_string(&counter).expect("counter");
    let _ = std::fs::remove_file(&counter);
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    for line in executions.lines() {
        *seen.entry(line).or_default() += 1;
    }
    let twice = seen.values().filter(|&&n| n > 1).count();
    eprintln!(
        "two serves, one killed: {} submissions accepted ({answered_pending} answered pending, completed by the resender), {} runs executed, {twice} more than once, all succeeded after {drained:?}",
        ids.len(),
        seen.len()
    );
    assert_eq!(ids.len(), SUBMISSIONS);
    assert_eq!(seen.len(), SUBMISSIONS, "a run never executed");
    assert_eq!(twice, 0, "runs executed more than once");
}

/// `make soak` (not in CI): `DAISY_SOAK_SECS` (600) seconds of submissions
/// through the layer to two serves and two workers, while faults strike at
/// random every few seconds: the broker cut off, the database cut off, a
/// worker SIGKILLed, a serve SIGKILLed (each restored or restarted after a
/// few seconds); a form whose asynchronous task crashes its plugin host is
/// part of the load. The asynchronous task applies its side effect once per
/// run id (`Input::run_id`, the idempotency key a real plugin sends to an
/// outside API). Then a report: submissions accepted, runs succeeded, dead
/// (with reasons), runs executed again after a kill (at-least-once: a worker
/// SIGKILLed between a run's effect and its recorded outcome), effects
/// applied more than once (must be 0), succeeded runs whose effect is
/// missing (must be 0), stuck (must be 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: make soak"]
async fn soak() {
    use test_support::Relay;
    let length = Duration::from_secs(
        std::env::var("DAISY_SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(600),
    );
    let (db, plugins, queue) = (TestDb::daisy(), PluginsDir::new(), TestQueue::new());
    plugins.install("testkit", "testkit");
    let counter = std::env::temp_dir().join(format!("daisy-soak-{}", Uuid::new_v4().simple()));
    let effects = tempfile::tempdir().expect("effects dir");
    let (form, crashy) = (Uuid::new_v4(), Uuid::new_v4());
    db.execute(&format!(
        "INSERT INTO tasks (id, form_id, name, module, func, async_status, config, max_attempts) VALUES \
         (gen_random_uuid(), '{form}', 'check', 'testkit', 'echo', false, '{{}}', 5), \
         (gen_random_uuid(), '{form}', 'receipt', 'testkit', 'count', true, '{{\"path\": \"{}\", \"effects_dir\": \"{}\"}}', 10), \
         (gen_random_uuid(), '{crashy}', 'crash', 'testkit', 'segfault', true, '{{}}', 5)",
        counter.display(),
        effects.path().display()
    ));
    let db_relay = Relay::start(test_support::postgres_addr()).await;
    let amqp_relay = Relay::start(test_support::amqp_addr()).await;
    let db_url = test_support::with_port(&db.url, db_relay.addr);
    let amqp_url = queue.url_via(amqp_relay.addr);
    let (addr_a, addr_b) = (free_port(), free_port());
    let serve = |addr| Daisy::serve_at(addr, &db_url, plugins.path(), &queue, &amqp_url);
    let worker = || Daisy::worker(&db_url, plugins.path(), &queue, &amqp_url, &[]);
    let mut serves = [serve(addr_a), serve(addr_b)];
    let mut workers = [worker(), worker()];
    wait_until_served(addr_a).await;
    wait_until_served(addr_b).await;
    let client = DaisyClient::connect_balanced(
        &[&format!("http://{addr_a}"), &format!("http://{addr_b}")],
        Duration::from_secs(2),
    )
    .expect("client");
    let store = MemStore::default();
    let daisy = PostSubmission::new(client, store.clone());
    let resender = daisy.spawn_resender(Resend {
        grace: Duration::from_secs(1),
        interval: Duration::from_millis(500),
        max_backoff: Duration::from_secs(5),
        ..Resend::default()
    });
    let app = app(daisy.clone(), store.clone());
    let started = Instant::now();
    let submitters: Vec<_> = (0..4)
        .map(|k| {
            let app = app.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                let mut i = 0;
                while started.elapsed() < length {
                    let target = if i % 50 == 49 { crashy } else { form };
                    let (status, body) =
                        call(&app, target, json!({"name": format!("n{k}-{i}")})).await;
                    assert_eq!(status, StatusCode::CREATED, "{body}");
                    ids.push((target, body["id"].as_str().expect("id").to_owned()));
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                ids
            })
        })
        .collect();
    let mut faults = std::collections::BTreeMap::<&str, usize>::new();
    while started.elapsed() < length {
        tokio::time::sleep(Duration::from_millis(3000 + fastrand::u64(..4000))).await;
        let fault = [
            "broker cut",
            "database cut",
            "worker killed",
            "serve killed",
        ][fastrand::usize(..4)];
        *faults.entry(fault).or_default() += 1;
        match fault {
            "broker cut" => {
                amqp_relay.cut();
                tokio::time::sleep(Duration::from_secs(3)).await;
                amqp_relay.restore();
            }
            "database cut" => {
                db_relay.cut();
                tokio::time::sleep(Duration::from_secs(3)).await;
                db_relay.restore();
            }
            "worker killed" => {
                let n = fastrand::usize(..2);
                workers[n].kill();
                tokio::time::sleep(Duration::from_secs(1)).await;
                workers[n] = worker();
            }
            _ => {
                let n = fastrand::usize(..2);
                serves[n].kill();
                tokio::time::sleep(Duration::from_secs(2)).await;
                serves[n] = serve([addr_a, addr_b][n]);
            }
        }
    }
    let mut ids = Vec::new();
    for submitter in submitters {
        ids.extend(submitter.await.expect("submitter"));
    }
    let settle = Instant::now();
    while !store.pending_ids().is_empty() && settle.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    resender.abort();
    let pending_left = store.pending_ids().len();
    // Every run settles (succeeded or dead) within two minutes.
    let mut client =
        proto::v1::post_sub_proxy_client::PostSubProxyClient::connect(format!("http://{addr_b}"))
            .await
            .expect("connect");
    let (mut succeeded, mut stuck) = (0, 0);
    let mut succeeded_runs = Vec::new();
    let mut dead = std::collections::BTreeMap::<String, usize>::new();
    for (_, id) in &ids {
        let deadline = Instant::now() + Duration::from_secs(120);
        let runs = loop {
            let runs = client
                .get_runs(proto::v1::GetRunsRequest {
                    submission_id: id.clone(),
                })
                .await
                .map(|r| r.into_inner().runs)
                .unwrap_or_default();
            let settled = runs.iter().any(|r| r.is_async)
                && runs.iter().filter(|r| r.is_async).all(|r| {
                    matches!(
                        r.state(),
                        proto::v1::RunState::Succeeded | proto::v1::RunState::Dead
                    )
                });
            if settled || Instant::now() > deadline {
                break (settled, runs);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        match runs {
            (false, _) => stuck += 1,
            (true, runs) => {
                for run in runs.iter().filter(|r| r.is_async) {
                    if run.state() == proto::v1::RunState::Succeeded {
                        succeeded += 1;
                        succeeded_runs.push(run.run_id.clone());
                    } else {
                        let reason: String = run.last_error.chars().take(60).collect();
                        *dead.entry(reason).or_default() += 1;
                    }
                }
            }
        }
    }
    let executions = std::fs::read_to_string(&counter).unwrap_or_default();
    let _ = std::fs::remove_file(&counter);
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    for line in executions.lines() {
        *seen.entry(line).or_default() += 1;
    }
    let again = seen.values().filter(|&&n| n > 1).count();
    // One effect file per run id, holding its submission id: a submission
    // with two effects would mean one task's effect under two run ids.
    let mut effects_per_submission = std::collections::HashMap::<String, usize>::new();
    for entry in std::fs::read_dir(effects.path()).expect("effects") {
        let submission = std::fs::read_to_string(entry.expect("entry").path()).expect("effect");
        *effects_per_submission.entry(submission).or_default() += 1;
    }
    let twice = effects_per_submission.values().filter(|&&n| n > 1).count();
    let missing = succeeded_runs
        .iter()
        .filter(|run| !effects.path().join(run).exists())
        .count();
    eprintln!("\nsoak report ({:?} of load, faults {faults:?})", length);
    eprintln!("  submissions accepted:        {}", ids.len());
    eprintln!("  left pending in the backend: {pending_left}");
    eprintln!("  async runs succeeded:        {succeeded}");
    eprintln!(
        "  async runs dead:             {}",
        dead.values().sum::<usize>()
    );
    for (reason, n) in &dead {
        eprintln!("    {n:>6}  {reason}");
    }
    eprintln!(
        "  executed again after a kill: {again} (at least once; the effect is keyed by run id)"
    );
    eprintln!("  effects more than once:      {twice}");
    eprintln!("  succeeded, effect missing:   {missing}");
    eprintln!("  stuck:                       {stuck}");
    assert_eq!(pending_left, 0);
    assert_eq!(twice, 0, "effects applied more than once");
    assert_eq!(missing, 0, "succeeded runs whose effect never happened");
    assert_eq!(stuck, 0, "runs never settled");
}
