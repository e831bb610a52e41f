//! What plugin authors are promised: the run id and submission context in
//! every input, and a plugin built against an older minor of plugin-api that
//! still loads.

use std::{path::PathBuf, time::Duration};

use proto::v1::{Outcome, RunState, SubmissionContext};
use proxy::{plugins::Isolation, registry::NewTask};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{asynchronous::async_task, util::*};

fn seen(form: Uuid, name: &str, is_async: bool) -> NewTask {
    NewTask {
        is_async,
        ..async_task(form, name, "seen", json!({}), 3)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_see_the_run_id_and_the_submission_context_sync_and_async() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let queue = TestQueue::new();
    let form = Uuid::new_v4();
    db.attach_with(seen(form, "now", false));
    db.attach_with(seen(form, "later", true));
    let server =
        TestServer::start_with(server_config(&db.url, plugins.path(), queue.config.clone())).await;
    let _worker = queue.worker(&db.url, plugins.path(), None, &[]);
    let mut client = server.client().await;

    let context = SubmissionContext {
        organisation_id: "org-7".into(),
        owner_emails: vec!["owner@example.com".into(), "second@example.com".into()],
        submitter: "ada@example.com".into(),
        locale: "en-GB".into(),
    };
    let expected = json!({
        "organisation_id": "org-7",
        "owner_emails": ["owner@example.com", "second@example.com"],
        "submitter": "ada@example.com",
        "locale": "en-GB",
    });
    let with_context = proto::v1::ProcessRequest {
        context: Some(context),
        ..request(form, sample())
    };
    let response = client
        .process(with_context.clone())
        .await
        .expect("processed")
        .into_inner();
    let now = result(&response, "now");
    assert_eq!(now.outcome(), Outcome::Succeeded, "{now:?}");
    let output = to_json(now.output.as_ref().expect("output"));
    assert_eq!(output["context"], expected);
    assert_eq!(output["attempt"], 1);
    let runs = wait_for_runs(
        &mut client,
        &with_context.submission_id,
        Duration::from_secs(30),
        |runs| runs.len() == 2 && runs.iter().all(|r| r.state() == RunState::Succeeded),
    )
    .await;
    // The synchronous run's id is the one its log row carries.
    let logged = runs.iter().find(|r| r.name == "now").expect("logged");
    assert_eq!(output["run_id"], logged.run_id.as_str());
    // The asynchronous run sees the context stored with the submission, and
    // its own run id.
    let later = runs.iter().find(|r| r.name == "later").expect("later");
    let output = to_json(later.output.as_ref().expect("output"));
    assert_eq!(output["context"], expected);
    assert_eq!(output["run_id"], later.run_id.as_str());
    assert_eq!(response.enqueued[0].run_id, later.run_id);

    // A client that sends no context (an older backend) still works: tasks
    // see an empty context.
    let plain = request(form, sample());
    let response = client
        .process(plain.clone())
        .await
        .expect("processed")
        .into_inner();
    let output = to_json(result(&response, "now").output.as_ref().expect("output"));
    assert_eq!(
        output["context"],
        json!({"organisation_id": "", "owner_emails": [], "submitter": "", "locale": ""})
    );
    let runs = wait_for_runs(
        &mut client,
        &plain.submission_id,
        Duration::from_secs(30),
        |runs| runs.len() == 2 && runs.iter().all(|r| r.state() == RunState::Succeeded),
    )
    .await;
    let later = runs.iter().find(|r| r.name == "later").expect("later");
    assert_eq!(
        to_json(later.output.as_ref().expect("output"))["context"]["owner_emails"],
        json!([])
    );

    // A context that breaks a limit is refused at the edge, naming the field.
    let status = client
        .process(proto::v1::ProcessRequest {
            context: Some(SubmissionContext {
                locale: "en\0GB".into(),
                ..SubmissionContext::default()
            }),
            ..request(form, sample())
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("context.locale"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_id_is_the_same_on_a_redelivery_after_a_worker_kill() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let queue = TestQueue::new();
    let counter = tempfile::NamedTempFile::new().expect("counter file");
    let effects = tempfile::tempdir().expect("effects dir");
    let form = Uuid::new_v4();
    db.attach_with(async_task(
        form,
        "receipt",
        "count",
        json!({"path": counter.path(), "sleep_ms": 2000, "effects_dir": effects.path()}),
        5,
    ));
    let server =
        TestServer::start_with(server_config(&db.url, plugins.path(), queue.config.clone())).await;
    let mut victim = queue.worker(&db.url, plugins.path(), None, &[]);
    let mut client = server.client().await;
    let sent = request(form, sample());
    let response = client
        .process(sent.clone())
        .await
        .expect("accepted")
        .into_inner();
    let run_id = response.enqueued[0].run_id.clone();

    // The first execution has begun (its line is written, its effect not yet).
    wait_for_executions(counter.path(), 1).await;
    victim.kill();
    let _next = queue.worker(&db.url, plugins.path(), None, &[]);
    let runs = wait_for_runs(
        &mut client,
        &sent.submission_id,
        Duration::from_secs(60),
        |runs| {
            runs.first()
                .is_some_and(|r| r.state() == RunState::Succeeded)
        },
    )
    .await;
    assert_eq!(runs[0].run_id, run_id);
    // Executed twice (at least once, inherently), under one run id both times.
    let lines: Vec<String> = std::fs::read_to_string(counter.path())
        .expect("counter")
        .lines()
        .map(str::to_owned)
        .collect();
    let expected = format!("{} {run_id}", sent.submission_id);
    assert_eq!(lines, [expected.clone(), expected], "executions");
    // The effect, keyed by the run id, happened once.
    let applied: Vec<PathBuf> = std::fs::read_dir(effects.path())
        .expect("effects")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(applied, [effects.path().join(&run_id)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_against_the_previous_minor_still_loads_and_runs() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    std::fs::copy(fixture("testkit_old_minor"), plugins.module_path("old"))
        .expect("installing the plugin-api 1.0 fixture");
    let form = Uuid::new_v4();
    for isolation in [Isolation::Process, Isolation::InProcess] {
        db.attach_with(NewTask {
            form_id: form,
            name: format!("old_{}", isolation.as_str()),
            module: "old".into(),
            func: "old_echo".into(),
            is_async: false,
            config: json!({}),
            enabled: true,
            timeout_ms: 5000,
            max_attempts: 1,
            isolation: Some(isolation.as_str().into()),
        });
    }
    let server = TestServer::start(&db.url, plugins.path()).await;
    let mut client = server.client().await;
    let response = process(&mut client, form, sample()).await;
    for isolation in [Isolation::Process, Isolation::InProcess] {
        let result = result(&response, &format!("old_{}", isolation.as_str()));
        assert_eq!(result.outcome(), Outcome::Succeeded, "{result:?}");
        let output: Value = to_json(result.output.as_ref().expect("output"));
        assert_eq!(output["built_against"], "1.0.0");
        assert_eq!(output["attempt"], 1);
        assert_eq!(output["answers"], sample()["answers"]);
    }
    assert_eq!(plugin_api::INTERFACE_VERSION, "1.1.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scaffolded_plugin_builds_outside_the_workspace_drops_in_and_runs() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let crate_dir = dir.path().join("greeter");
    let daisy = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_daisy"))
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env("DAISY_PLUGINS_DIR", plugins.path())
            .env("RUST_LOG", "warn")
            .output()
            .expect("running daisy");
        assert!(
            output.status.success(),
            "daisy {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let created = daisy(&[
        "plugin",
        "new",
        "greeter",
        "--dir",
        crate_dir.to_str().expect("utf-8"),
    ]);
    assert!(created.contains("libgreeter.so"), "{created}");

    // Built as its author would, outside the workspace (the target directory
    // is shared between runs only to save compile time).
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/scaffold");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = std::process::Command::new(cargo)
        .args(["build", "--release"])
        .current_dir(&crate_dir)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .output()
        .expect("running cargo");
    assert!(
        built.status.success(),
        "cargo build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let library = target
        .join("release")
        .join(test_support::library_file_name("greeter"));
    let staged = plugins.path().join(".libgreeter.so.tmp");
    std::fs::copy(&library, &staged).expect("copying the library");
    std::fs::rename(&staged, plugins.module_path("greeter")).expect("dropping it in");

    daisy(&["migrate"]);
    let form = Uuid::new_v4();
    let form_arg = form.to_string();
    let attach = |config: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_daisy"))
            .args([
                "task", "attach", "--form", &form_arg, "--name", "greet", "--module", "greeter",
                "--func", "greet", "--config", config,
            ])
            .env("DATABASE_URL", &db.url)
            .env("DAISY_PLUGINS_DIR", plugins.path())
            .output()
            .expect("running daisy")
    };
    // Its declared config is enforced at attach time.
    let refused = attach(r#"{"field": 5}"#);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("`/field`"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let attached = attach(r#"{"field": "name", "greeting": "Hi"}"#);
    assert!(
        attached.status.success(),
        "{}",
        String::from_utf8_lossy(&attached.stderr)
    );

    let server = TestServer::start(&db.url, plugins.path()).await;
    let mut client = server.client().await;
    let response = process(&mut client, form, json!({"answers": {"name": "Ada"}})).await;
    let greet = result(&response, "greet");
    assert_eq!(greet.outcome(), Outcome::Succeeded, "{greet:?}");
    assert_eq!(
        to_json(greet.output.as_ref().expect("output"))["greeting"],
        "Hi, Ada!"
    );
}
