//! The gRPC port's protection: TLS, mutual TLS, API keys scoped to forms,
//! and the secure defaults of `daisy serve`. Certificates are made by
//! openssl in each test (`test_support::Pki`).

use std::{
    process::Command,
    time::{Duration, Instant},
};

use proto::v1::{GetRunsRequest, post_sub_proxy_client::PostSubProxyClient};
use proxy::{
    auth::{AuthMode, new_token, token_hash},
    registry::NewKey,
    security::{Security, TlsFiles},
};
use serde_json::json;
use test_support::Pki;
use tonic::{Code, Request, transport::Channel};
use uuid::Uuid;

use crate::util::*;

fn tls_files(pki: &Pki, mutual: bool) -> TlsFiles {
    TlsFiles {
        cert: pki.path("server.pem"),
        key: pki.path("server.key"),
        client_ca: mutual.then(|| pki.path("ca.pem")),
    }
}

/// A TLS client of `addr` trusting the test CA, with its client certificate
/// if `identity`.
async fn tls_client(
    pki: &Pki,
    addr: std::net::SocketAddr,
    identity: bool,
) -> Result<PostSubProxyClient<Channel>, tonic::transport::Error> {
    Ok(PostSubProxyClient::new(
        pki.channel(addr.port(), identity).await?,
    ))
}

async fn server(db: &TestDb, plugins: &PluginsDir, security: Security) -> TestServer {
    let queue = TestQueue::new();
    TestServer::start_with(proxy::Config {
        security,
        ..server_config(&db.url, plugins.path(), queue.config.clone())
    })
    .await
}

/// Waits until the server accepts TCP connections.
async fn listening(addr: std::net::SocketAddr) {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An echo form served over TLS (mutual if `mutual`), listening: (what
/// must outlive the server, its form, the PKI, the server). Bindings drop
/// in reverse order, so the server stops before its database goes.
async fn echo_over_tls(mutual: bool) -> ((TestDb, PluginsDir), Uuid, Pki, TestServer) {
    let (db, plugins, pki) = (TestDb::new(), PluginsDir::new(), Pki::new());
    plugins.install("echo", "echo");
    let form = Uuid::new_v4();
    db.attach(form, "echo", "echo", "echo", json!({}));
    let server = server(
        &db,
        &plugins,
        Security {
            tls: Some(tls_files(&pki, mutual)),
            ..Security::default()
        },
    )
    .await;
    listening(server.addr).await;
    ((db, plugins), form, pki, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_served_and_a_plaintext_client_is_refused() {
    let (_keep, form, pki, server) = echo_over_tls(false).await;

    let mut client = tls_client(&pki, server.addr, false)
        .await
        .expect("TLS connects");
    let response = process(&mut client, form, sample()).await;
    assert_eq!(response.results.len(), 1);

    let plaintext = match PostSubProxyClient::connect(format!("http://{}", server.addr)).await {
        Err(_) => None,
        Ok(mut client) => Some(client.process(request(form, sample())).await),
    };
    assert!(
        !matches!(plaintext, Some(Ok(_))),
        "a plaintext call was answered: {plaintext:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_reloaded_when_its_files_change() {
    let (db, plugins) = (TestDb::new(), PluginsDir::new());
    plugins.install("echo", "echo");
    let form = Uuid::new_v4();
    db.attach(form, "echo", "echo", "echo", json!({}));
    let (old, new) = (Pki::new(), Pki::new());
    // The served files: a copy of the old PKI's, replaced in place later.
    let served = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (
        served.path().join("cert.pem"),
        served.path().join("key.pem"),
    );
    std::fs::copy(old.path("server.pem"), &cert).expect("cert");
    std::fs::copy(old.path("server.key"), &key).expect("key");
    let server = server(
        &db,
        &plugins,
        Security {
            tls: Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: None,
            }),
            ..Security::default()
        },
    )
    .await;
    listening(server.addr).await;
    let mut client = tls_client(&old, server.addr, false).await.expect("old CA");
    process(&mut client, form, sample()).await;

    // A renewed certificate (another CA here, so that the switch shows):
    // key first, then certificate, as a renewal script writes them.
    std::fs::copy(new.path("server.key"), &key).expect("key");
    std::fs::copy(new.path("server.pem"), &cert).expect("cert");
    let renewed = Instant::now();
    loop {
        if let Ok(mut client) = tls_client(&new, server.addr, false).await {
            if client.process(request(form, sample())).await.is_ok() {
                break;
            }
        }
        assert!(
            renewed.elapsed() < Duration::from_secs(5),
            "the new certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // New connections no longer get the old certificate.
    assert!(tls_client(&old, server.addr, false).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_a_client_without_a_certificate() {
    let (_keep, form, pki, server) = echo_over_tls(true).await;

    let mut with_cert = tls_client(&pki, server.addr, true).await.expect("connects");
    process(&mut with_cert, form, sample()).await;
    let without = match tls_client(&pki, server.addr, false).await {
        Err(_) => None,
        Ok(mut client) => Some(client.process(request(form, sample())).await),
    };
    assert!(
        !matches!(without, Some(Ok(_))),
        "a client without a certificate was answered: {without:?}"
    );
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_required_scoped_to_forms_and_revoked_within_a_second() {
    let (db, plugins) = (TestDb::new(), PluginsDir::new());
    plugins.install("echo", "echo");
    let (mine, theirs) = (Uuid::new_v4(), Uuid::new_v4());
    db.attach(mine, "echo", "echo", "echo", json!({}));
    db.attach(theirs, "echo", "echo", "echo", json!({}));
    let registry = db.registry();
    let create = |name: &str, forms: Option<&[Uuid]>| {
        let token = new_token().expect("token");
        registry
            .create_key(&NewKey {
                name,
                token_sha256: &token_hash(&token),
                forms,
                admin: false,
            })
            .expect("key");
        token
    };
    let backend = create("backend", Some(&[mine]));
    let other = create("other", Some(&[theirs]));
    let server = server(
        &db,
        &plugins,
        Security {
            auth: AuthMode::Token,
            ..Security::default()
        },
    )
    .await;
    let mut client = server.client().await;

    // Missing, malformed and unknown keys: UNAUTHENTICATED (16).
    let status = client
        .process(request(mine, sample()))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("authorization"), "{status:?}");
    for token in ["", "dsy_not-a-key", &backend.to_uppercase()] {
        let status = client
            .process(with_token(request(mine, sample()), token))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }

    // The right key for the right form: served.
    let sent = request(mine, sample());
    client
        .process(with_token(sent.clone(), &backend))
        .await
        .expect("served");
    // Another form's key: PERMISSION_DENIED (7), on Process and on GetRuns.
    let status = client
        .process(with_token(request(mine, sample()), &other))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("'other'"), "{status:?}");
    assert!(
        !status.message().contains(&other),
        "the token leaked: {status:?}"
    );
    let runs = GetRunsRequest {
        submission_id: sent.submission_id.clone(),
    };
    // The run log is written behind the response: once the run is there,
    // another form's key may not see it.
    let started = std::time::Instant::now();
    loop {
        let shown = client
            .get_runs(with_token(runs.clone(), &backend))
            .await
            .expect("shown");
        let shown = shown.into_inner().runs.len();
        assert!(shown <= 1);
        if shown == 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the run was never logged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = client
        .get_runs(with_token(runs.clone(), &other))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // Revoked: refused within a second, on this running serve.
    assert!(registry.revoke_key("backend").expect("revoke"));
    let revoked = Instant::now();
    loop {
        match client
            .process(with_token(request(mine, sample()), &backend))
            .await
        {
            Err(status) if status.code() == Code::Unauthenticated => break,
            other => assert!(
                revoked.elapsed() < Duration::from_secs(1),
                "still served {:?} after revocation: {other:?}",
                revoked.elapsed()
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(revoked.elapsed() < Duration::from_secs(1));
    let last_used = registry.keys().expect("keys");
    let backend_key = last_used.iter().find(|k| k.name == "backend").expect("key");
    assert!(backend_key.revoked_at.is_some());
}

#[test]
fn serve_refuses_an_open_address_without_tls_and_keys_and_starts_with_insecure() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    let port = test_support::free_port().port();
    let serve = |extra: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_daisy"));
        command
            .args(["serve", "--addr", &format!("0.0.0.0:{port}")])
            .args(extra)
            .env("DATABASE_URL", &db.url)
            .env("DAISY_PLUGINS_DIR", plugins.path())
            .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
            .env("RUST_LOG", "warn");
        command
    };
    let refused = serve(&[]).output().expect("daisy serve");
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("--tls-cert") && err.contains("--insecure"),
        "{err}"
    );
    let refused = serve(&["--auth", "none", "--insecure"]).spawn();
    // --insecure with --auth none is the operator's explicit choice: it starts.
    let mut started = refused.expect("spawned");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let begun = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            started.try_wait().expect("status").is_none(),
            "daisy serve --insecure exited"
        );
        assert!(begun.elapsed() < Duration::from_secs(30), "never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    started.kill().expect("kill");
    let _ = started.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_library_files_are_refused_with_a_clear_reason() {
    use std::os::unix::fs::PermissionsExt;
    let (db, plugins) = (TestDb::new(), PluginsDir::new());
    plugins.install("echo", "echo");
    for module in ["group_writable", "foreign", "truncated", "good"] {
        plugins.install("echo", module);
    }
    let set_mode = |module: &str, mode: u32| {
        std::fs::set_permissions(
            plugins.module_path(module),
            std::fs::Permissions::from_mode(mode),
        )
        .expect("chmod");
    };
    set_mode("group_writable", 0o664);
    // Owned by nobody: refused unless Daisy runs as that user (it runs as us).
    let foreign_owner = std::os::unix::fs::chown(plugins.module_path("foreign"), Some(65534), None);
    let outside = tempfile::tempdir().expect("tempdir");
    let elsewhere = outside.path().join("libecho.so");
    std::fs::copy(plugins.module_path("echo"), &elsewhere).expect("copy");
    std::os::unix::fs::symlink(&elsewhere, plugins.module_path("escaping")).expect("symlink");
    std::os::unix::fs::symlink(plugins.module_path("echo"), plugins.module_path("inside"))
        .expect("symlink");
    let whole = std::fs::read(plugins.module_path("truncated")).expect("read");
    std::fs::write(plugins.module_path("truncated"), &whole[..whole.len() / 2]).expect("truncate");

    let form = Uuid::new_v4();
    for module in [
        "group_writable",
        "foreign",
        "escaping",
        "inside",
        "truncated",
        "good",
    ] {
        db.attach(form, module, module, "echo", json!({}));
    }
    let server = TestServer::start(&db.url, plugins.path()).await;
    let mut client = server.client().await;
    let response = process(&mut client, form, sample()).await;
    let failed = |name: &str, needles: &[&str]| {
        let r = result(&response, name);
        assert_eq!(r.outcome(), proto::v1::Outcome::Failed, "{name}: {r:?}");
        for needle in needles {
            assert!(r.error.contains(needle), "{name}: {}", r.error);
        }
    };
    failed(
        "group_writable",
        &["writable by its group", "mode 664", "chmod go-w"],
    );
    if foreign_owner.is_ok() && runs_as_other_than(65534) {
        failed("foreign", &["belongs to uid 65534"]);
    }
    failed("escaping", &["symlink", "outside the plugins directory"]);
    failed("truncated", &["incomplete", "still being written"]);
    for served in ["inside", "good"] {
        let r = result(&response, served);
        assert_eq!(
            r.outcome(),
            proto::v1::Outcome::Succeeded,
            "{served}: {r:?}"
        );
    }

    // `daisy plugin list` says the same.
    let listed = Command::new(env!("CARGO_BIN_EXE_daisy"))
        .args(["plugin", "list"])
        .env("DATABASE_URL", &db.url)
        .env("DAISY_PLUGINS_DIR", plugins.path())
        .output()
        .expect("daisy plugin list");
    let listed = String::from_utf8_lossy(&listed.stdout);
    let line = listed
        .lines()
        .find(|l| l.starts_with("group_writable"))
        .expect("listed");
    assert!(
        line.contains("error") && line.contains("writable by its group"),
        "{line}"
    );
    set_mode("group_writable", 0o644);

    // Only allow-listed builds load when an allow-list is given.
    let allowed = tempfile::NamedTempFile::new().expect("list");
    std::fs::write(allowed.path(), "# nothing but this\n").expect("list");
    let queue = TestQueue::new();
    let mut hosts = proxy::plugins::HostConfig::new(test_support::daisy_bin());
    hosts.allowed = proxy::plugins::AllowList::from_file(allowed.path()).expect("list");
    let strict = TestServer::start_with(proxy::Config {
        hosts,
        ..server_config(&db.url, plugins.path(), queue.config.clone())
    })
    .await;
    let mut client = strict.client().await;
    let response = process(&mut client, form, sample()).await;
    let r = result(&response, "good");
    assert_eq!(r.outcome(), proto::v1::Outcome::Failed, "{r:?}");
    assert!(
        r.error.contains("--plugin-sha256 allow-list"),
        "{}",
        r.error
    );
}

/// Whether this process runs as some other user than `uid`.
fn runs_as_other_than(uid: u32) -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) != uid)
        .unwrap_or(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_resolved_by_name_and_configs_may_not_name_files() {
    let (db, plugins) = (TestDb::new(), PluginsDir::new());
    plugins.install("testkit", "testkit");
    let secrets = test_support::SecretsDir::new(&[("api_token", "s3cr3t-value\n")]);
    let form = Uuid::new_v4();
    // testkit's `config` task returns the config it was built with.
    db.attach(
        form,
        "named",
        "testkit",
        "config",
        json!({"token": {"secret": "api_token"}, "plain": 1}),
    );
    db.attach(
        form,
        "missing",
        "testkit",
        "config",
        json!({"token": {"secret": "nope"}}),
    );
    let queue = TestQueue::new();
    let mut hosts = proxy::plugins::HostConfig::new(test_support::daisy_bin());
    hosts.secrets_dir = Some(secrets.path().to_owned());
    let server = TestServer::start_with(proxy::Config {
        hosts,
        ..server_config(&db.url, plugins.path(), queue.config.clone())
    })
    .await;
    let mut client = server.client().await;
    let response = process(&mut client, form, sample()).await;
    let named = result(&response, "named");
    assert_eq!(named.outcome(), proto::v1::Outcome::Succeeded, "{named:?}");
    assert_eq!(
        to_json(named.output.as_ref().expect("output")),
        json!({"token": "s3cr3t-value", "plain": 1})
    );
    let missing = result(&response, "missing");
    assert_eq!(missing.outcome(), proto::v1::Outcome::Failed);
    assert!(missing.error.contains("secret 'nope'"), "{}", missing.error);
    // The stored config still holds only the name.
    let stored = db.registry().list(Some(form)).expect("tasks");
    assert!(
        stored
            .iter()
            .all(|t| !t.config.to_string().contains("s3cr3t"))
    );

    // A config naming a file is refused at attach, naming where.
    let attach = Command::new(env!("CARGO_BIN_EXE_daisy"))
        .args([
            "task",
            "attach",
            "--form",
            &form.to_string(),
            "--name",
            "leak",
            "--module",
            "testkit",
            "--func",
            "config",
            "--config",
            r#"{"auth": {"token_file": "/etc/daisy/token"}}"#,
        ])
        .env("DATABASE_URL", &db.url)
        .env("DAISY_PLUGINS_DIR", plugins.path())
        .output()
        .expect("daisy task attach");
    assert!(!attach.status.success(), "a file path was attached");
    let err = String::from_utf8_lossy(&attach.stderr);
    assert!(
        err.contains("`/auth/token_file`") && err.contains("secrets-dir"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_travel_to_the_worker_over_amqps() {
    let (db, plugins, pki) = (TestDb::new(), PluginsDir::new(), Pki::new());
    plugins.install("testkit", "testkit");
    let queue = TestQueue::new();
    // The test broker speaks plain AMQP: a TLS terminator stands in front.
    let relay = test_support::TlsRelay::start(test_support::amqp_addr(), &pki).await;
    let amqps = queue
        .names
        .url_via(relay.addr)
        .replacen("amqp://", "amqps://", 1)
        .replace("127.0.0.1", "localhost");
    let form = Uuid::new_v4();
    db.attach_with(crate::asynchronous::async_task(
        form,
        "later",
        "config",
        json!({"over": "tls"}),
        3,
    ));
    let ca = pki.path("ca.pem");
    let server = TestServer::start_with(proxy::Config {
        queue: proxy::queue::QueueConfig {
            url: amqps.clone(),
            ca_file: Some(ca.clone()),
            ..queue.config.clone()
        },
        ..server_config(&db.url, plugins.path(), queue.config.clone())
    })
    .await;
    let _worker = Daisy::worker(
        &db.url,
        plugins.path(),
        &queue.names,
        &amqps,
        &["--amqp-ca", ca.to_str().expect("utf-8")],
    );
    let mut client = server.client().await;
    let sent = request(form, sample());
    client.process(sent.clone()).await.expect("accepted");
    let runs = wait_for_runs(
        &mut client,
        &sent.submission_id,
        Duration::from_secs(60),
        |runs| {
            runs.first()
                .is_some_and(|r| r.state() == proto::v1::RunState::Succeeded)
        },
    )
    .await;
    assert_eq!(
        to_json(runs[0].output.as_ref().expect("output")),
        json!({"over": "tls"})
    );
}
