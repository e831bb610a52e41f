//! The web console on serve's operations listener, over HTTP against real
//! processes: every page, keyset pagination, retrying a dead run, disabling
//! a task, and writes refused without the CSRF token or from elsewhere.

use std::time::Duration;

use proto::v1::RunState;
use serde_json::json;
use test_support::{Stack, free_port};
use uuid::Uuid;

use crate::util::sample;

/// An HTTP answer: status and body.
type Answer = (u16, String);

async fn http(
    addr: std::net::SocketAddr,
    method: &'static str,
    path: &str,
    form: &[(&str, &str)],
    origin: Option<&str>,
) -> Answer {
    let url = format!("http://{addr}{path}");
    let form: Vec<(String, String)> = form
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let origin = origin.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut response = if method == "GET" {
            agent.get(&url).call()
        } else {
            let mut request = agent.post(&url);
            if let Some(origin) = &origin {
                request = request.header("Origin", origin);
            }
            request.send_form(form.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        }
        .expect("the console answers");
        (
            response.status().as_u16(),
            response.body_mut().read_to_string().unwrap_or_default(),
        )
    })
    .await
    .expect("HTTP")
}

/// The CSRF token in a page's forms.
fn csrf(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a write form") + 19;
    page[at..].split('"').next().expect("a token").to_owned()
}

async fn console_stack() -> (Stack, std::net::SocketAddr) {
    let ops = free_port();
    let stack = Stack::start_with(
        &[("echo", "echo"), ("testkit", "testkit")],
        &[],
        &["--http-addr", &ops.to_string()],
        &[],
    )
    .await;
    let started = std::time::Instant::now();
    while tokio::net::TcpStream::connect(ops).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the console never listened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (stack, ops)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_loads_and_runs_are_paged_by_key() {
    let (mut stack, ops) = console_stack().await;
    let form = Uuid::new_v4();
    stack.attach(form, "echo", "echo", "echo", false, &json!({}));
    let mut submissions = Vec::new();
    for _ in 0..60 {
        submissions.push(stack.process(form, sample()).await.0);
    }
    // The run log is written behind the responses: all 60 first, or the
    // second page would be read before its last runs are there.
    let started = std::time::Instant::now();
    let logged = format!("SELECT count(*)::text FROM sync_runs WHERE form_id = '{form}'");
    while stack.db.query_one(&logged) != "60" {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the run log did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let first = http(ops, "GET", &format!("/runs?form={form}"), &[], None).await;
    assert_eq!(first.0, 200, "{}", first.1);
    let first = first.1;
    let next = first
        .split("href=\"")
        .find(|s| {
            s.starts_with("/runs?form=")
                && s.split('"').next().is_some_and(|h| h.contains("after="))
        })
        .and_then(|s| s.split('"').next())
        .expect("a link to the next page")
        .replace("&amp;", "&");
    let second = http(ops, "GET", &next, &[], None).await;
    assert_eq!(second.0, 200);
    let ids = |page: &str| -> Vec<String> {
        page.split("href=\"/runs/")
            .skip(1)
            .filter_map(|s| s.split('"').next().map(str::to_owned))
            .collect()
    };
    let (a, b) = (ids(&first), ids(&second.1));
    assert_eq!((a.len(), b.len()), (50, 10), "60 runs on two pages");
    assert!(a.iter().all(|id| !b.contains(id)), "no run on both pages");
    assert!(!second.1.contains("after="), "no page after the last");

    let run = &a[0];
    for (path, expect) in [
        ("/", "Runs per minute"),
        ("/runs", "Runs"),
        (&format!("/runs/{run}")[..], "Attempts"),
        ("/dead", "Dead runs"),
        ("/forms", &form.to_string()[..]),
        ("/plugins", "testkit"),
    ] {
        let (status, body) = http(ops, "GET", path, &[], None).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.contains(expect), "{path} lacks {expect:?}: {body}");
        assert!(body.starts_with("<!DOCTYPE html>"), "{path}");
    }
    let (status, _) = http(ops, "GET", "/runs?state=bogus", &[], None).await;
    assert_eq!(status, 400);
    let (status, _) = http(ops, "GET", &format!("/runs/{}", Uuid::new_v4()), &[], None).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_run_retried_from_the_console_succeeds_and_a_disabled_task_stops() {
    let (mut stack, ops) = console_stack().await;
    let form = Uuid::new_v4();
    let task = stack.attach(
        form,
        "export",
        "testkit",
        "fail",
        true,
        &json!({"message": "broken"}),
    );
    let (submission, _) = stack.process(form, sample()).await;
    let runs = stack.settled(&submission, Duration::from_secs(60)).await;
    assert_eq!(runs[0].state(), RunState::Dead, "{runs:?}");
    let run = runs[0].run_id.clone();

    let page = http(ops, "GET", &format!("/runs/{run}"), &[], None).await.1;
    assert!(
        page.contains("broken") && page.contains("Retry this run"),
        "{page}"
    );
    let token = csrf(&page);
    // Refused: no token, a forged token, another site's page.
    let retry = format!("/runs/{run}/retry");
    assert_eq!(http(ops, "POST", &retry, &[], None).await.0, 403);
    assert_eq!(
        http(ops, "POST", &retry, &[("csrf", "forged")], None)
            .await
            .0,
        403
    );
    let evil = Some("http://evil.example");
    assert_eq!(
        http(ops, "POST", &retry, &[("csrf", &token)], evil).await.0,
        403
    );

    // The cause fixed (the task now succeeds), then retried from the page.
    stack.db.execute(&format!(
        "UPDATE tasks SET func = 'config' WHERE id = '{task}'"
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let own = Some(format!("http://{ops}"));
    let (status, _) = http(ops, "POST", &retry, &[("csrf", &token)], own.as_deref()).await;
    assert_eq!(status, 303, "redirected to the run");
    let started = std::time::Instant::now();
    loop {
        let runs = stack.settled(&submission, Duration::from_secs(60)).await;
        if runs[0].state() == RunState::Succeeded {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{runs:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Disabled from the forms page: the next submission enqueues nothing.
    let forms = http(ops, "GET", "/forms", &[], None).await.1;
    assert!(forms.contains("Disable"), "{forms}");
    let (status, _) = http(
        ops,
        "POST",
        &format!("/tasks/{task}/enabled"),
        &[("csrf", &csrf(&forms)), ("enabled", "false")],
        None,
    )
    .await;
    assert_eq!(status, 303);
    assert!(
        http(ops, "GET", "/forms", &[], None)
            .await
            .1
            .contains("disabled")
    );
    tokio::time::sleep(Duration::from_millis(1500)).await; // the form cache hears of it
    let (_, response) = stack.process(form, sample()).await;
    assert!(
        response.enqueued.is_empty(),
        "a disabled task runs no more: {response:?}"
    );
}

/// A key made with the CLI on the stack's database: its token.
fn key(stack: &Stack, args: &[&str]) -> String {
    let out = std::process::Command::new(test_support::daisy_bin())
        .args(["key", "create"])
        .args(args)
        .env("DATABASE_URL", &stack.db.url)
        .output()
        .expect("daisy key create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("the token")
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_api_keys_on_console_writes_need_an_admin_key() {
    let ops = free_port();
    let stack = Stack::start_with(
        &[("echo", "echo")],
        &[],
        &["--http-addr", &ops.to_string(), "--auth", "token"],
        &[],
    )
    .await;
    let form = Uuid::new_v4();
    let task = stack.attach(form, "greet", "echo", "echo", false, &json!({}));
    let (admin, backend) = (
        key(&stack, &["--name", "ops", "--admin"]),
        key(&stack, &["--name", "collect", "--form", &form.to_string()]),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await; // serve hears of the new keys
    let page = http(ops, "GET", "/forms", &[], None).await.1;
    assert!(
        page.contains("name=\"admin_key\""),
        "the form asks for the key: {page}"
    );
    let token = csrf(&page);
    let disable = format!("/tasks/{task}/enabled");
    for (given, status) in [
        (None, 403),
        (Some(backend.as_str()), 403),
        (Some("dsy_wrong"), 403),
        (Some(admin.as_str()), 303),
    ] {
        let mut form = vec![("csrf", token.as_str()), ("enabled", "false")];
        form.extend(given.map(|k| ("admin_key", k)));
        let (got, body) = http(ops, "POST", &disable, &form, None).await;
        assert_eq!(got, status, "{given:?}: {body}");
        if status == 403 {
            assert!(body.contains("admin API key"), "{body}");
        }
    }
    assert!(
        http(ops, "GET", "/forms", &[], None)
            .await
            .1
            .contains("disabled")
    );
}
