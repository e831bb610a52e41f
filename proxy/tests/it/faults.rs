//! Broken plugins fail only their own tasks.

use proto::v1::Outcome;
use proxy::registry::NewTask;
use serde_json::json;
use uuid::Uuid;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_broken_task_fails_alone_and_the_next_call_is_served() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("echo", "echo");
    plugins.install("testkit", "testkit");
    plugins.install("testkit_foreign_abi", "foreign");
    std::fs::write(
        plugins.module_path("corrupt"),
        b"\x7fELF but not really a library",
    )
    .expect("writing a corrupt library");
    let form = Uuid::new_v4();
    db.attach(form, "first_echo", "echo", "echo", json!({}));
    db.attach(form, "corrupt", "corrupt", "echo", json!({}));
    db.attach(form, "unknown_module", "nowhere", "echo", json!({}));
    db.attach(form, "foreign_abi", "foreign", "echo", json!({}));
    db.attach(form, "unknown_func", "echo", "reverb", json!({}));
    db.attach(
        form,
        "panics",
        "testkit",
        "panic",
        json!({"message": "kaboom"}),
    );
    db.attach(
        form,
        "panics_on_create",
        "testkit",
        "panic_on_create",
        json!({}),
    );
    db.attach(
        form,
        "fails",
        "testkit",
        "fail",
        json!({"message": "rule 7 broken"}),
    );
    db.attach(
        form,
        "bad_config",
        "testkit",
        "sleep",
        json!({"ms": "soon"}),
    );
    db.attach_with(NewTask {
        form_id: form,
        name: "sleeps_too_long".into(),
        module: "testkit".into(),
        func: "sleep".into(),
        is_async: false,
        config: json!({"ms": 3000}),
        enabled: true,
        timeout_ms: 200,
        max_attempts: 1,
        isolation: None,
    });
    db.attach(form, "last_echo", "echo", "echo", json!({}));
    let server = TestServer::start(&db.url, plugins.path()).await;
    let mut client = server.client().await;

    let response = process(&mut client, form, sample()).await;

    for name in ["first_echo", "last_echo"] {
        let ok = result(&response, name);
        assert_eq!(ok.outcome(), Outcome::Succeeded, "{ok:?}");
        assert_eq!(to_json(ok.output.as_ref().expect("output")), sample());
    }
    let expect_failed = |name: &str, needles: &[&str]| {
        let r = result(&response, name);
        assert_eq!(r.outcome(), Outcome::Failed, "{r:?}");
        assert!(r.output.is_none());
        for needle in needles {
            assert!(
                r.error.contains(needle),
                "error of '{name}' should mention {needle:?}: {}",
                r.error
            );
        }
    };
    expect_failed("corrupt", &["'corrupt'", "libcorrupt.so"]);
    expect_failed(
        "unknown_module",
        &["'nowhere'", "not found", "libnowhere.so"],
    );
    expect_failed(
        "foreign_abi",
        &["libforeign.so", "plugin-api 9.0.0", "plugin-api 1.1.0"],
    );
    expect_failed("unknown_func", &["'reverb'", "libecho.so", "echo"]);
    expect_failed("panics", &["panicked at", "lib.rs", "kaboom"]);
    expect_failed("panics_on_create", &["panic_on_create", "panicked"]);
    expect_failed("fails", &["rule 7 broken"]);
    expect_failed("bad_config", &["'ms'"]);
    let slow = result(&response, "sleeps_too_long");
    assert_eq!(slow.outcome(), Outcome::TimedOut, "{slow:?}");
    assert!(slow.error.contains("200 ms"), "{}", slow.error);

    // The same broken form again, and an ordinary call: both served.
    let again = process(&mut client, form, sample()).await;
    assert_eq!(again.results.len(), response.results.len());
    assert_eq!(result(&again, "last_echo").outcome(), Outcome::Succeeded);
    let other = Uuid::new_v4();
    db.attach(other, "echo", "echo", "echo", json!({}));
    let response = process(&mut client, other, json!({"x": 1})).await;
    assert_eq!(response.results[0].outcome(), Outcome::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_naming_a_path_is_refused_by_the_database() {
    let db = TestDb::new();
    let form = Uuid::new_v4();
    let mut conn =
        <diesel::PgConnection as diesel::Connection>::establish(&db.url).expect("connect");
    for (module, func) in [("../../tmp/evil", "echo"), ("echo", "a/b"), ("", "echo")] {
        let insert = format!(
            "INSERT INTO tasks (id, form_id, name, module, func, async_status) \
             VALUES (gen_random_uuid(), '{form}', 'x', '{module}', '{func}', false)"
        );
        let refused = diesel::RunQueryDsl::execute(diesel::sql_query(insert), &mut conn);
        assert!(refused.is_err(), "module {module:?} func {func:?} accepted");
    }
}
