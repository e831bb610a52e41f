//! The `daisy` binary's administrative commands.

use std::process::{Command, Output};

use uuid::Uuid;

use crate::util::*;

fn daisy(db: &TestDb, plugins: &PluginsDir, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_daisy"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("DAISY_PLUGINS_DIR", plugins.path())
        .env("RUST_LOG", "warn")
        .output()
        .expect("running daisy")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "daisy failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn tasks_are_attached_listed_and_detached() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("echo", "echo");
    let form = Uuid::new_v4().to_string();

    let up_to_date = stdout(&daisy(&db, &plugins, &["migrate"]));
    assert!(up_to_date.contains("up to date"), "{up_to_date}");

    let id = stdout(&daisy(
        &db,
        &plugins,
        &[
            "task",
            "attach",
            "--form",
            &form,
            "--name",
            "greet",
            "--module",
            "echo",
            "--func",
            "echo",
            "--config",
            r#"{"lang":"fr"}"#,
        ],
    ));
    let id: Uuid = id.trim().parse().expect("attach prints the new task's id");

    let listed = stdout(&daisy(&db, &plugins, &["task", "list", "--form", &form]));
    assert!(
        listed.contains(&id.to_string()) && listed.contains("echo::echo"),
        "{listed}"
    );
    assert!(listed.contains(r#"{"lang":"fr"}"#), "{listed}");

    stdout(&daisy(&db, &plugins, &["task", "detach", &id.to_string()]));
    let listed = stdout(&daisy(&db, &plugins, &["task", "list", "--form", &form]));
    assert!(!listed.contains(&id.to_string()), "{listed}");

    let again = daisy(&db, &plugins, &["task", "detach", &id.to_string()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no task with id"));
}

#[test]
fn rate_limits_are_set_listed_changed_and_removed() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("echo", "echo");
    let form = Uuid::new_v4().to_string();
    let attach = |extra: &[&str]| {
        let mut args = vec![
            "task", "attach", "--form", &form, "--name", "n", "--module", "echo", "--func", "echo",
            "--async",
        ];
        args.extend_from_slice(extra);
        daisy(&db, &plugins, &args)
    };
    let id = stdout(&attach(&[
        "--rate-limit",
        "50",
        "--rate-group",
        "google-sa-1",
    ]));
    let id = id.trim().to_owned();
    let listed = stdout(&daisy(&db, &plugins, &["task", "list", "--form", &form]));
    assert!(listed.contains("50/min:google-sa-1"), "{listed}");

    let changed = stdout(&daisy(
        &db,
        &plugins,
        &["task", "limit", &id, "--rate-limit", "8"],
    ));
    assert!(changed.contains("at most 8 runs a minute"), "{changed}");
    let listed = stdout(&daisy(&db, &plugins, &["task", "list", "--form", &form]));
    assert!(
        listed.contains("8/min ") && !listed.contains("google-sa-1"),
        "{listed}"
    );

    stdout(&daisy(&db, &plugins, &["task", "limit", &id]));
    let listed = stdout(&daisy(&db, &plugins, &["task", "list", "--form", &form]));
    assert!(!listed.contains("/min"), "{listed}");

    // A group needs a limit, and a limit must be positive.
    for bad in [
        &["--rate-group", "g"][..],
        &["--rate-limit", "0"][..],
        &["--rate-limit", "5", "--rate-group", ""][..],
    ] {
        let refused = attach(bad);
        assert!(!refused.status.success(), "{bad:?}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains("rate"), "{bad:?}: {stderr}");
    }
    let missing = daisy(
        &db,
        &plugins,
        &[
            "task",
            "limit",
            &Uuid::new_v4().to_string(),
            "--rate-limit",
            "1",
        ],
    );
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no task with id"));
}

#[test]
fn attach_refuses_bad_names_and_config_and_warns_about_missing_plugins() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    let form = Uuid::new_v4().to_string();
    let attach = |module: &str, config: &str| {
        daisy(
            &db,
            &plugins,
            &[
                "task", "attach", "--form", &form, "--name", "n", "--module", module, "--func",
                "echo", "--config", config,
            ],
        )
    };

    let escape = attach("../evil", "{}");
    assert!(!escape.status.success());
    assert!(String::from_utf8_lossy(&escape.stderr).contains("invalid module name '../evil'"));

    let bad_json = attach("echo", "{not json");
    assert!(!bad_json.status.success());
    assert!(String::from_utf8_lossy(&bad_json.stderr).contains("--config is not valid JSON"));

    let missing = attach("echo", "{}");
    assert!(
        missing.status.success(),
        "attaching before installing the plugin works"
    );
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("warning: plugin module 'echo' not found")
    );
}

#[test]
fn plugin_list_shows_tasks_and_load_errors() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    plugins.install("testkit_foreign_abi", "future");
    std::fs::write(plugins.module_path("broken"), b"not a library").expect("writing");

    let listed = stdout(&daisy(&db, &plugins, &["plugin", "list"]));
    let line = |module: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(&format!("{module}\t")))
            .unwrap_or_else(|| panic!("no line for {module}: {listed}"))
            .to_owned()
    };
    assert!(
        line("testkit").contains("ok") && line("testkit").contains("sleep"),
        "{listed}"
    );
    assert!(
        line("future").contains("error") && line("future").contains("plugin-api 9.0.0"),
        "{listed}"
    );
    assert!(
        line("broken").contains("error") && line("broken").contains("libbroken.so"),
        "{listed}"
    );
}

#[test]
fn attach_checks_the_config_against_the_schema_the_plugin_declares() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("validate", "validate");
    plugins.install("echo", "echo");
    stdout(&daisy(&db, &plugins, &["migrate"]));
    let form = Uuid::new_v4().to_string();
    let attach = |module: &str, config: &str, extra: &[&str]| {
        let mut args = vec![
            "task", "attach", "--form", &form, "--name", module, "--module", module, "--func",
            module, "--config", config,
        ];
        args.extend_from_slice(extra);
        daisy(&db, &plugins, &args)
    };

    let refused = attach("validate", r#"{"rules": 5}"#, &[]);
    assert!(
        !refused.status.success(),
        "a config of the wrong shape attached"
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("`/rules`"), "{err}");
    assert!(err.contains("\"array\""), "{err}");
    assert!(err.contains("--force"), "{err}");
    let listed = stdout(&daisy(&db, &plugins, &["task", "list", "--form", &form]));
    assert!(!listed.contains("validate::validate"), "{listed}");

    // --force attaches anyway, with a warning.
    let forced = attach("validate", r#"{"rules": 5}"#, &["--force"]);
    stdout(&forced);
    assert!(String::from_utf8_lossy(&forced.stderr).contains("attached anyway"));
    // A config that fits is attached; a plugin that declares no schema
    // (echo) accepts any config.
    stdout(&attach(
        "validate",
        r#"{"rules": [{"name": "adult", "expr": "age >= 18"}]}"#,
        &[],
    ));
    stdout(&attach("echo", r#"{"anything": [1, 2]}"#, &[]));

    let shown = stdout(&daisy(&db, &plugins, &["plugin", "show", "validate"]));
    assert!(shown.contains("task validate: config schema"), "{shown}");
    assert!(shown.contains("\"rules\""), "{shown}");
    assert!(
        shown.contains("An expression over the answers that must be true"),
        "{shown}"
    );
    let shown = stdout(&daisy(&db, &plugins, &["plugin", "show", "echo"]));
    assert!(shown.contains("no config schema declared"), "{shown}");
}

#[test]
fn keys_are_created_listed_without_tokens_and_revoked() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    stdout(&daisy(&db, &plugins, &["migrate"]));
    let form = Uuid::new_v4().to_string();
    let created = stdout(&daisy(
        &db,
        &plugins,
        &["key", "create", "--name", "collect-prod", "--form", &form],
    ));
    let token = created.lines().last().expect("the token, on the last line");
    assert!(token.starts_with("dsy_") && token.len() > 40, "{created}");
    let admin = stdout(&daisy(
        &db,
        &plugins,
        &["key", "create", "--name", "ops", "--admin"],
    ));
    let admin_token = admin.lines().last().expect("token").to_owned();
    // A name is unique.
    let again = daisy(
        &db,
        &plugins,
        &["key", "create", "--name", "ops", "--all-forms"],
    );
    assert!(!again.status.success());
    // Neither a form nor --all-forms: refused by the parser.
    assert!(
        !daisy(&db, &plugins, &["key", "create", "--name", "x"])
            .status
            .success()
    );

    let listed = stdout(&daisy(&db, &plugins, &["key", "list"]));
    assert!(
        listed.contains("collect-prod") && listed.contains(&form),
        "{listed}"
    );
    assert!(listed.contains("ops"), "{listed}");
    assert!(
        !listed.contains(token) && !listed.contains(&admin_token),
        "{listed}"
    );
    let stored = db.registry().keys().expect("keys");
    assert!(stored.iter().all(|k| k.token_sha256.len() == 32));

    stdout(&daisy(&db, &plugins, &["key", "revoke", "collect-prod"]));
    let listed = stdout(&daisy(&db, &plugins, &["key", "list"]));
    let row = listed
        .lines()
        .find(|l| l.starts_with("collect-prod"))
        .expect("still listed");
    assert!(
        row.contains(&chrono::Utc::now().format("%Y-%m-%d").to_string()),
        "{row}"
    );
    let unknown = daisy(&db, &plugins, &["key", "revoke", "collect-prod"]);
    assert!(!unknown.status.success(), "revoked twice");
}
