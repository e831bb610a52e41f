//! The operations listener: Prometheus metrics, health and readiness of
//! `daisy serve` and `daisy worker` processes, after real traffic.

use std::{collections::BTreeSet, time::Duration};

use proto::v1::{ProcessRequest, RunState};
use serde_json::json;
use test_support::{Stack, free_port};
use uuid::Uuid;

use crate::util::sample;

/// GETs `http://addr{path}`: (status, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let url = format!("http://{addr}{path}");
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let mut response = agent.get(&url).call().expect("the listener answers");
        let status = response.status().as_u16();
        (
            status,
            response.body_mut().read_to_string().unwrap_or_default(),
        )
    })
    .await
    .expect("GET")
}

/// The value of the sample `name{labels}` (labels as rendered, in order;
/// empty for none), if present.
fn sample_value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        if metric != name {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        all.then(|| value.parse().ok()).flatten()
    })
}

/// Waits until `path` on `addr` answers 200 (the listener is up).
async fn wait_up(addr: std::net::SocketAddr, path: &str) -> String {
    let started = std::time::Instant::now();
    loop {
        let url = format!("http://{addr}{path}");
        let answer = tokio::task::spawn_blocking(move || {
            ureq::get(&url)
                .call()
                .ok()
                .map(|mut r| r.body_mut().read_to_string().unwrap_or_default())
        })
        .await
        .expect("GET");
        if let Some(body) = answer {
            return body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{addr}{path} never answered 200"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `promtool check metrics` on an exposition: its problems, if any.
fn promtool_check(exposition: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; .ci/run installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("writing to promtool");
    let out = child.wait_with_output().expect("promtool");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_after_real_traffic() {
    let (serve_http, worker_http) = (free_port(), free_port());
    let (serve_arg, worker_arg) = (serve_http.to_string(), worker_http.to_string());
    let mut stack = Stack::start_with(
        &[("echo", "echo"), ("testkit", "testkit")],
        &[],
        &["--http-addr", &serve_arg],
        &["--http-addr", &worker_arg],
    )
    .await;
    let (sync_form, flaky_form, failing_form) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    stack.attach(sync_form, "echo", "echo", "echo", false, &json!({}));
    stack.attach(
        flaky_form,
        "flaky",
        "testkit",
        "flaky",
        true,
        &json!({"succeed_on": 2}),
    );
    stack.attach(
        failing_form,
        "failing",
        "testkit",
        "fail",
        true,
        &json!({"message": "no"}),
    );

    for _ in 0..5 {
        stack.process(sync_form, sample()).await;
    }
    let (flaky, _) = stack.process(flaky_form, sample()).await;
    let (failing, _) = stack.process(failing_form, sample()).await;
    let invalid = stack
        .client
        .process(ProcessRequest {
            form_id: "not-a-uuid".into(),
            submission_id: Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await;
    assert!(invalid.is_err());
    assert_eq!(
        stack.settled(&flaky, Duration::from_secs(60)).await[0].state(),
        RunState::Succeeded
    );
    assert_eq!(
        stack.settled(&failing, Duration::from_secs(60)).await[0].state(),
        RunState::Dead
    );

    for addr in [serve_http, worker_http] {
        assert_eq!(wait_up(addr, "/healthz").await, "ok\n");
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".into()));
    }

    let serve = get(serve_http, "/metrics").await.1;
    let at_least = |metrics: &str, name: &str, labels: &[(&str, &str)], min: f64| {
        let value = sample_value(metrics, name, labels);
        assert!(
            value.is_some_and(|v| v >= min),
            "{name}{labels:?} is {value:?}, expected at least {min}:\n{metrics}"
        );
    };
    at_least(&serve, "daisy_process_calls_total", &[("code", "OK")], 7.0);
    at_least(
        &serve,
        "daisy_process_calls_total",
        &[("code", "INVALID_ARGUMENT")],
        1.0,
    );
    at_least(
        &serve,
        "daisy_process_duration_seconds_count",
        &[("code", "OK")],
        7.0,
    );
    at_least(
        &serve,
        "daisy_task_runs_total",
        &[("task", "echo"), ("mode", "sync"), ("outcome", "succeeded")],
        5.0,
    );
    at_least(
        &serve,
        "daisy_task_run_duration_seconds_count",
        &[("task", "echo")],
        5.0,
    );
    at_least(
        &serve,
        "daisy_runs_published_total",
        &[("path", "accept")],
        2.0,
    );
    at_least(&serve, "daisy_db_pool_wait_seconds_count", &[], 1.0);
    at_least(
        &serve,
        "daisy_broker_connected",
        &[("role", "publisher")],
        1.0,
    );
    for gauge in [
        "daisy_outbox_unpublished_runs",
        "daisy_outbox_oldest_unpublished_age_seconds",
    ] {
        at_least(&serve, gauge, &[], 0.0);
    }
    at_least(&serve, "daisy_runs", &[("state", "dead")], 0.0);
    // echo runs in a plugin host (process isolation, the default).
    at_least(&serve, "daisy_plugin_hosts", &[], 1.0);

    let worker = get(worker_http, "/metrics").await.1;
    at_least(&worker, "daisy_worker_claims_total", &[], 3.0);
    at_least(&worker, "daisy_worker_acks_total", &[], 3.0);
    for result in ["succeeded", "retry", "dead"] {
        at_least(
            &worker,
            "daisy_worker_finishes_total",
            &[("result", result)],
            1.0,
        );
    }
    at_least(
        &worker,
        "daisy_task_runs_total",
        &[("task", "flaky"), ("mode", "async"), ("outcome", "failed")],
        1.0,
    );
    at_least(
        &worker,
        "daisy_broker_connected",
        &[("role", "consumer")],
        1.0,
    );
    at_least(&worker, "daisy_worker_deliveries_in_flight", &[], 0.0);

    for exposition in [&serve, &worker] {
        if let Err(problems) = promtool_check(exposition) {
            panic!("promtool check metrics: {problems}\n{exposition}");
        }
        // Bounded labels: no submission or run id ever becomes one.
        for id in [&flaky, &failing] {
            assert!(!exposition.contains(id.as_str()), "{id} in the metrics");
        }
    }
}

#[test]
fn the_operations_listener_refuses_addresses_beyond_loopback() {
    let db = test_support::TestDb::daisy();
    let out = std::process::Command::new(test_support::daisy_bin())
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--http-addr",
            "0.0.0.0:9464",
        ])
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("daisy serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("beyond loopback"), "{stderr}");
}

/// Every metric the shipped alerts and dashboard use is one Daisy exports.
#[test]
fn the_alerts_and_the_dashboard_name_only_metrics_daisy_exports() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let exported: BTreeSet<String> = std::fs::read_to_string(root.join("proxy/src/metrics.rs"))
        .expect("metrics.rs")
        .split('"')
        .filter(|s| s.starts_with("daisy_") && !s.contains(' '))
        .map(str::to_owned)
        .collect();
    assert!(exported.len() >= 15, "{exported:?}");
    let names = regex::Regex::new(r"daisy_[a-z_]+").expect("regex");
    for file in ["ops/prometheus/alerts.yml", "ops/grafana/daisy.json"] {
        let text = std::fs::read_to_string(root.join(file)).expect(file);
        for name in names.find_iter(&text).map(|m| m.as_str()) {
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(
                exported.contains(family),
                "{file} uses {name}, which Daisy does not export"
            );
        }
    }
}

#[test]
fn logs_to_a_file_have_no_colour_codes_and_json_logs_are_one_object_per_line() {
    let db = test_support::TestDb::daisy();
    let plugins = test_support::PluginsDir::new();
    let logs = tempfile::tempdir().expect("tempdir");
    for format in ["text", "json"] {
        let path = logs.path().join(format);
        let mut serve = std::process::Command::new(test_support::daisy_bin())
            .args([
                "serve",
                "--addr",
                &free_port().to_string(),
                "--log-format",
                format,
            ])
            .env("DATABASE_URL", &db.url)
            .env("DAISY_PLUGINS_DIR", plugins.path())
            .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1")
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&path).expect("log file"))
            .spawn()
            .expect("daisy serve");
        let started = std::time::Instant::now();
        while !std::fs::read_to_string(&path)
            .unwrap_or_default()
            .contains("daisy serving")
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "serve never logged"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = serve.kill();
        let _ = serve.wait();
        let text = std::fs::read_to_string(&path).expect("log");
        assert!(
            !text.contains('\u{1b}'),
            "colour codes in a log file:\n{text}"
        );
        if format == "json" {
            for line in text.lines().filter(|l| !l.is_empty()) {
                let object: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(
                    object["level"].is_string() && object["fields"].is_object(),
                    "{line}"
                );
            }
        }
    }
}
