//! The demo Collect backend through `app()`, on its own real PostgreSQL.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode},
};
use example_collect::{DbPool, PgStore, app, connect_and_migrate, post_processing_counts};
use http_body_util::BodyExt;
use post_submission::{Credentials, DaisyClient, PostSubmission, Resend};
use serde_json::{Value, json};
use sha2::Digest;
use test_support::{Daisy, PluginsDir, TestDb, TestQueue, free_port};
use tower::ServiceExt;
use uuid::Uuid;

struct Collect {
    _db: TestDb,
    pool: DbPool,
    daisy: PostSubmission,
    app: Router,
}

impl Collect {
    fn new(daisy_addr: SocketAddr, deadline: Duration) -> Collect {
        let db = TestDb::empty();
        let pool = connect_and_migrate(&db.url).expect("migrating the Collect database");
        let client =
            DaisyClient::connect_lazy(&format!("http://{daisy_addr}"), deadline).expect("client");
        let daisy = PostSubmission::new(client, PgStore(pool.clone()));
        let app = app(pool.clone(), daisy.clone());
        Collect {
            _db: db,
            pool,
            daisy,
            app,
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .expect("request");
        let response = self.app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn create_form(&self) -> Uuid {
        let form = json!({
            "title": "Customer feedback",
            "metadata": {"team": "support"},
            "questions": [
                {"key": "name", "label": "Your name", "kind": "text", "required": true},
                {"key": "phone", "label": "Phone", "kind": "text"},
                {"key": "rating", "label": "Rating", "kind": "number", "required": true},
                {"key": "again", "label": "Would you come back?", "kind": "boolean"},
                {"key": "channel", "label": "Channel", "kind": "choice", "options": ["web", "field"]},
            ],
        });
        let (status, body) = self.call("POST", "/forms", Some(&form.to_string())).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().expect("form id").parse().expect("uuid")
    }
}

/// A TCP listener standing in for Daisy that counts connection attempts.
async fn counting_listener() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (addr, count)
}

#[tokio::test]
async fn bad_requests_get_4xx_naming_the_problem_and_nothing_reaches_daisy() {
    let (daisy, connections) = counting_listener().await;
    let collect = Collect::new(daisy, Duration::from_millis(500));
    let form = collect.create_form().await;
    let submit = format!("/forms/{form}/submit");
    let cases: Vec<(String, String, StatusCode, &str)> = vec![
        (submit.clone(), "{not json".into(), StatusCode::BAD_REQUEST, "JSON"),
        (format!("/forms/{}/submit", Uuid::new_v4()), json!({"answers": {"name": "A", "rating": 1}}).to_string(), StatusCode::NOT_FOUND, "no form"),
        (submit.clone(), json!({"answers": {"name": "A", "rating": 1, "shoe_size": 43}}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "unknown question 'shoe_size'"),
        (submit.clone(), json!({"answers": {"name": "A", "rating": "five"}}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "'rating' must be a number"),
        (submit.clone(), json!({"answers": {"name": "A", "rating": 1, "channel": "fax"}}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "'channel' must be one of"),
        (submit.clone(), json!({"answers": {"rating": 1}}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "'name' is required"),
        (submit.clone(), json!({"answers": {"name": "x".repeat(100 * 1024), "rating": 1}}).to_string(), StatusCode::PAYLOAD_TOO_LARGE, "length limit"),
        ("/forms".into(), json!({"title": "", "questions": []}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "title"),
        ("/forms".into(), json!({"title": "T", "questions": [{"key": "a", "label": "A", "kind": "text"}, {"key": "a", "label": "B", "kind": "text"}]}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, "'a' is used twice"),
    ];
    for (path, body, status, needle) in cases {
        let (got, answer) = collect.call("POST", &path, Some(&body)).await;
        assert_eq!(got, status, "{path}: {answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{path}: error {message:?} should mention {needle:?}"
        );
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "nothing was sent to Daisy"
    );
    assert!(
        post_processing_counts(&collect.pool)
            .expect("counts")
            .is_empty(),
        "nothing was stored"
    );
}

#[tokio::test]
async fn forms_and_responses_round_trip_and_a_response_is_born_pending() {
    let collect = Collect::new(free_port(), Duration::from_millis(300));
    let form = collect.create_form().await;

    let (status, body) = collect.call("GET", &format!("/forms/{form}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["title"], "Customer feedback");
    assert_eq!(body["questions"].as_array().map(Vec::len), Some(5));
    let (status, _) = collect
        .call("GET", &format!("/forms/{}", Uuid::new_v4()), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let answers = json!({"name": "Ada", "rating": 5, "again": true, "channel": "web"});
    let submission = json!({"answers": answers, "metadata": {"device": "tablet-7"}});
    let (status, body) = collect
        .call(
            "POST",
            &format!("/forms/{form}/submit"),
            Some(&submission.to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        body["post_submission"]["status"], "pending",
        "Daisy is not running: {body}"
    );
    let id = body["id"].as_str().expect("id");

    let (status, stored) = collect
        .call("GET", &format!("/forms/{form}/responses/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored["answers"], answers);
    assert_eq!(stored["metadata"], json!({"device": "tablet-7"}));
    assert_eq!(stored["post_processing"], "pending");
}

#[tokio::test]
async fn submissions_made_while_daisy_is_down_are_all_processed_exactly_once() {
    // Daisy's side, not started yet.
    let (daisy_db, plugins, queue) = (TestDb::daisy(), PluginsDir::new(), TestQueue::new());
    plugins.install("testkit", "testkit");
    let counter = tempfile_path();
    let daisy_addr = free_port();
    let collect = Collect::new(daisy_addr, Duration::from_millis(500));
    let form = collect.create_form().await;
    daisy_db.execute(&format!(
        "INSERT INTO tasks (id, form_id, name, module, func, async_status, config) VALUES \
         (gen_random_uuid(), '{form}', 'receipt', 'testkit', 'count', true, '{{\"path\": \"{}\"}}')",
        counter.display()
    ));

    let mut ids = Vec::new();
    for i in 0..100 {
        let submission = json!({"answers": {"name": format!("n{i}"), "rating": i}});
        let (status, body) = collect
            .call(
                "POST",
                &format!("/forms/{form}/submit"),
                Some(&submission.to_string()),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["post_submission"]["status"], "pending");
        ids.push(body["id"].as_str().expect("id").to_owned());
    }
    assert_eq!(
        post_processing_counts(&collect.pool).expect("counts"),
        HashMap::from([("pending".to_owned(), 100)])
    );

    let _serve = Daisy::serve_at(
        daisy_addr,
        &daisy_db.url,
        plugins.path(),
        &queue,
        &queue.url,
    );
    let _worker = Daisy::worker(&daisy_db.url, plugins.path(), &queue, &queue.url, &[]);
    let resend = Resend {
        grace: Duration::ZERO,
        interval: Duration::from_millis(200),
        ..Resend::default()
    };
    let resender = collect.daisy.spawn_resender(resend);
    let started = Instant::now();
    while post_processing_counts(&collect.pool)
        .expect("counts")
        .get("done")
        != Some(&100)
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not all processed: {:?}",
            post_processing_counts(&collect.pool)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    resender.abort();

    let mut client = proto::v1::post_sub_proxy_client::PostSubProxyClient::connect(format!(
        "http://{daisy_addr}"
    ))
    .await
    .expect("connect");
    for id in &ids {
        let runs = test_support::wait_for_runs(&mut client, id, Duration::from_secs(60), |runs| {
            runs.iter()
                .all(|r| r.state() == proto::v1::RunState::Succeeded)
                && !runs.is_empty()
        })
        .await;
        assert_eq!(runs.len(), 1, "one async run for {id}: {runs:?}");
        assert_eq!(runs[0].attempts, 1);
    }
    let executions = std::fs::read_to_string(&counter).expect("counter");
    assert_eq!(
        executions.lines().count(),
        100,
        "each receipt ran exactly once"
    );
    let _ = std::fs::remove_file(&counter);
}

fn tempfile_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("daisy-collect-{}", Uuid::new_v4().simple()))
}

#[tokio::test]
async fn a_submission_whose_task_crashes_its_plugin_host_blocks_no_other() {
    let (daisy_db, plugins, queue) = (TestDb::daisy(), PluginsDir::new(), TestQueue::new());
    plugins.install("testkit", "testkit");
    let daisy_addr = free_port();
    let collect = Collect::new(daisy_addr, Duration::from_millis(500));
    let (poisoned, healthy) = (collect.create_form().await, collect.create_form().await);
    daisy_db.execute(&format!(
        "INSERT INTO tasks (id, form_id, name, module, func, async_status) VALUES \
         (gen_random_uuid(), '{poisoned}', 'crash', 'testkit', 'segfault', false), \
         (gen_random_uuid(), '{healthy}', 'check', 'testkit', 'config', false)"
    ));
    // Daisy is down: every response is stored pending, the poison first.
    let submit = |form: Uuid, i: usize| {
        let submission = json!({"answers": {"name": format!("n{i}"), "rating": i}});
        let collect = &collect;
        async move {
            let (status, body) = collect
                .call(
                    "POST",
                    &format!("/forms/{form}/submit"),
                    Some(&submission.to_string()),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
    };
    submit(poisoned, 0).await;
    for i in 1..=20 {
        submit(healthy, i).await;
    }

    let serve = Daisy::serve_at(
        daisy_addr,
        &daisy_db.url,
        plugins.path(),
        &queue,
        &queue.url,
    );
    let resender = collect.daisy.spawn_resender(Resend {
        grace: Duration::ZERO,
        interval: Duration::from_millis(200),
        ..Resend::default()
    });
    let started = Instant::now();
    while post_processing_counts(&collect.pool)
        .expect("counts")
        .get("done")
        != Some(&21)
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not all processed: {:?}",
            post_processing_counts(&collect.pool)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    resender.abort();
    // The crash cost one plugin host, never serve.
    let mut serve = serve;
    assert!(!serve.exited(), "daisy serve died");
}

#[tokio::test]
async fn the_forms_owner_and_the_submitters_locale_reach_daisys_tasks() {
    let (daisy_db, plugins, queue) = (TestDb::daisy(), PluginsDir::new(), TestQueue::new());
    plugins.install("testkit", "testkit");
    let daisy_addr = free_port();
    let _serve = Daisy::serve_at(
        daisy_addr,
        &daisy_db.url,
        plugins.path(),
        &queue,
        &queue.url,
    );
    let collect = Collect::new(daisy_addr, Duration::from_secs(5));
    let form = json!({
        "title": "Owned", "owner_email": "owner@example.org",
        "questions": [{"key": "name", "label": "Name", "kind": "text", "required": true}],
    });
    let (status, body) = collect
        .call("POST", "/forms", Some(&form.to_string()))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["owner_email"], "owner@example.org");
    let form: Uuid = body["id"].as_str().expect("id").parse().expect("uuid");
    daisy_db.execute(&format!(
        "INSERT INTO tasks (id, form_id, name, module, func, async_status) VALUES \
         (gen_random_uuid(), '{form}', 'seen', 'testkit', 'seen', false)"
    ));
    let bad = json!({"title": "x", "owner_email": "not an address", "questions": []});
    let (status, body) = collect.call("POST", "/forms", Some(&bad.to_string())).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body.to_string().contains("owner_email"), "{body}");

    let started = Instant::now();
    while tokio::net::TcpStream::connect(daisy_addr).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "daisy did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let request = Request::post(format!("/forms/{form}/submit"))
        .header("content-type", "application/json")
        .header("accept-language", "fr-FR,fr;q=0.9,en;q=0.5")
        .body(Body::from(json!({"answers": {"name": "Ada"}}).to_string()))
        .expect("request");
    let response = collect
        .app
        .clone()
        .oneshot(request)
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::CREATED);
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let body: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(body["post_submission"]["status"], "done", "{body}");
    assert_eq!(
        body["post_submission"]["results"][0]["output"]["context"],
        json!({
            "organisation_id": "",
            "owner_emails": ["owner@example.org"],
            "submitter": "",
            "locale": "fr-FR",
        }),
        "{body}"
    );
}

#[tokio::test]
async fn collect_calls_daisy_over_mutual_tls_with_an_api_key() {
    let (daisy_db, plugins, queue) = (TestDb::daisy(), PluginsDir::new(), TestQueue::new());
    plugins.install("testkit", "testkit");
    let pki = test_support::Pki::new();
    // A key for every form, stored as `daisy key create` stores it.
    let token = "dsy_collect-test-key-0123456789abcdefghijklmnopqrstu";
    let hash: String = sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    daisy_db.execute(&format!(
        "INSERT INTO api_keys (id, name, token_sha256) VALUES (gen_random_uuid(), 'collect', '\\x{hash}')"
    ));
    let daisy_addr = free_port();
    let path = |file: &str| pki.path(file).to_str().expect("utf-8").to_owned();
    let (cert, key, ca) = (path("server.pem"), path("server.key"), path("ca.pem"));
    let _serve = Daisy::serve_with(
        daisy_addr,
        &daisy_db.url,
        plugins.path(),
        &queue,
        &queue.url,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--client-ca",
            &ca,
            "--auth",
            "token",
        ],
    );
    let started = Instant::now();
    while tokio::net::TcpStream::connect(daisy_addr).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "daisy did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let full = Credentials {
        ca_pem: Some(pki.read("ca.pem")),
        identity_pem: Some((pki.read("client.pem"), pki.read("client.key"))),
        api_key: Some(token.into()),
    };
    assert!(!format!("{full:?}").contains(token), "Debug shows the key");
    let collect = |credentials: &Credentials| {
        let mut collect = Collect::new(daisy_addr, Duration::from_secs(5));
        let client = DaisyClient::connect_lazy_with(
            &format!("https://localhost:{}", daisy_addr.port()),
            Duration::from_secs(5),
            credentials,
        )
        .expect("client");
        collect.daisy = PostSubmission::new(client, PgStore(collect.pool.clone()));
        collect.app = app(collect.pool.clone(), collect.daisy.clone());
        collect
    };
    let daisy_db = &daisy_db;
    let submit = |collect: Collect| async move {
        let form = collect.create_form().await;
        daisy_db.execute(&format!(
            "INSERT INTO tasks (id, form_id, name, module, func, async_status) VALUES \
             (gen_random_uuid(), '{form}', 'seen', 'testkit', 'seen', false)"
        ));
        let submission = json!({"answers": {"name": "Ada", "rating": 5}});
        let (status, body) = collect
            .call(
                "POST",
                &format!("/forms/{form}/submit"),
                Some(&submission.to_string()),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    };

    let body = submit(collect(&full)).await;
    assert_eq!(body["post_submission"]["status"], "done", "{body}");
    assert_eq!(
        body["post_submission"]["results"][0]["outcome"], "succeeded",
        "{body}"
    );

    // Without the API key, Daisy answers UNAUTHENTICATED: the response stays
    // pending (for the resender, once the key is fixed).
    let no_key = Credentials {
        api_key: None,
        ..full.clone()
    };
    let body = submit(collect(&no_key)).await;
    assert_eq!(body["post_submission"]["status"], "pending", "{body}");
    assert!(
        body["post_submission"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("Unauthenticated")),
        "{body}"
    );
    // Without a client certificate, the TLS handshake itself fails.
    let no_cert = Credentials {
        identity_pem: None,
        ..full
    };
    let body = submit(collect(&no_cert)).await;
    assert_eq!(body["post_submission"]["status"], "pending", "{body}");
}
