//! The console in a real browser: headless Chromium driven over WebDriver
//! (chromedriver, fantoccini). Every page loads without console errors and
//! is saved as a screenshot under `target/console-screenshots/`; a dead run
//! retried from its page ends SUCCEEDED; a task disabled from the forms
//! page stops running.

use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use proto::v1::RunState;
use serde_json::json;
use test_support::{Process, Stack, free_port};
use uuid::Uuid;

use crate::util::sample;

/// Starts chromedriver (killed when the process is dropped) and a headless
/// Chromium session logging the browser console.
async fn browser() -> (Process, Client, String) {
    let port = free_port().port();
    let driver = Process::new(
        std::process::Command::new(
            std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into()),
        )
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromedriver (Debian's chromium-driver; .ci/run installs it)"),
    );
    let webdriver = format!("http://127.0.0.1:{port}");
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,800"]}),
    );
    capabilities.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
    let started = std::time::Instant::now();
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(capabilities.clone())
            .connect(&webdriver)
            .await
        {
            Ok(client) => return (driver, client, webdriver),
            Err(err) => {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "no WebDriver session: {err}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The browser console's errors since the last call (chromedriver's log).
async fn console_errors(client: &Client, webdriver: &str) -> Vec<String> {
    let session = client
        .session_id()
        .await
        .expect("session")
        .expect("a session id");
    let url = format!("{webdriver}/session/{session}/se/log");
    let log: serde_json::Value = tokio::task::spawn_blocking(move || {
        ureq::post(&url)
            .send_json(json!({"type": "browser"}))
            .expect("the browser log")
            .body_mut()
            .read_json()
            .expect("JSON")
    })
    .await
    .expect("log");
    log["value"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|entry| entry["level"] == "SEVERE")
        .map(|entry| entry["message"].to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_browser() {
    let ops = free_port();
    let mut stack = Stack::start_with(
        &[("echo", "echo"), ("testkit", "testkit")],
        &[],
        &["--http-addr", &ops.to_string()],
        &[],
    )
    .await;
    let form = Uuid::new_v4();
    stack.attach(form, "greet", "echo", "echo", false, &json!({}));
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
    let dead = runs.iter().find(|r| r.is_async).expect("the async run");
    assert_eq!(dead.state(), RunState::Dead, "{runs:?}");
    let run = dead.run_id.clone();

    let (_driver, client, webdriver) = browser().await;
    let base = format!("http://{ops}");
    let shots =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshots directory");
    for (name, path) in [
        ("overview", "/".to_owned()),
        ("runs", "/runs".to_owned()),
        ("run", format!("/runs/{run}")),
        ("dead", "/dead".to_owned()),
        ("forms", "/forms".to_owned()),
        ("plugins", "/plugins".to_owned()),
    ] {
        client
            .goto(&format!("{base}{path}"))
            .await
            .expect("the page loads");
        let title = client
            .find(Locator::Css("h1"))
            .await
            .expect("a heading")
            .text()
            .await
            .expect("text");
        assert!(!title.is_empty(), "{path}");
        let png = client.screenshot().await.expect("a screenshot");
        std::fs::write(shots.join(format!("{name}.png")), png).expect("saving the screenshot");
        let errors = console_errors(&client, &webdriver).await;
        assert!(errors.is_empty(), "{path}: console errors {errors:?}");
    }

    // The cause fixed, the dead run retried by clicking its button.
    stack.db.execute(&format!(
        "UPDATE tasks SET func = 'config' WHERE id = '{task}'"
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    client
        .goto(&format!("{base}/runs/{run}"))
        .await
        .expect("the run page");
    client
        .find(Locator::XPath("//button[text()='Retry this run']"))
        .await
        .expect("the retry button")
        .click()
        .await
        .expect("clicked");
    let started = std::time::Instant::now();
    loop {
        let runs = stack.settled(&submission, Duration::from_secs(60)).await;
        if runs
            .iter()
            .any(|r| r.is_async && r.state() == RunState::Succeeded)
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{runs:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Disabled from the forms page: the next submission does not run it.
    client
        .goto(&format!("{base}/forms"))
        .await
        .expect("the forms page");
    let buttons = client
        .find_all(Locator::XPath("//button[text()='Disable']"))
        .await
        .expect("buttons");
    assert_eq!(buttons.len(), 2, "one per task");
    let export = client
        .find(Locator::XPath(&format!(
            "//form[@action='/tasks/{task}/enabled']//button"
        )))
        .await
        .expect("the export task's button");
    export.click().await.expect("clicked");
    // The click posts a form; the page that answers comes when it comes.
    client
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::XPath(&format!(
            "//form[@action='/tasks/{task}/enabled']//button[text()='Enable']"
        )))
        .await
        .expect("the forms page after disabling the export task");
    let page = client.source().await.expect("the page");
    assert!(page.contains("disabled"), "{page}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, response) = stack.process(form, sample()).await;
    assert!(
        response.enqueued.is_empty(),
        "a disabled task runs no more: {response:?}"
    );
    assert!(console_errors(&client, &webdriver).await.is_empty());
    client.close().await.expect("closing the session");
}
