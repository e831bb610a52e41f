//! Plugin hosts: plugin code runs in supervised child processes, so no
//! plugin can take Daisy down, wedge it, or read its secrets.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use proto::v1::{Outcome, RunState};
use proxy::{plugins::Isolation, registry::NewTask};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::util::*;

fn task(
    form: Uuid,
    name: &str,
    module: &str,
    func: &str,
    config: Value,
    timeout_ms: i32,
) -> NewTask {
    NewTask {
        form_id: form,
        name: name.into(),
        module: module.into(),
        func: func.into(),
        is_async: false,
        config,
        enabled: true,
        timeout_ms,
        max_attempts: 1,
        isolation: None,
    }
}

/// A server with `hosts` tuned by `tune`, and the queue it needs.
async fn start_server(
    db: &TestDb,
    plugins: &PluginsDir,
    tune: impl FnOnce(&mut proxy::Config),
) -> (TestServer, TestQueue) {
    let queue = TestQueue::new();
    let mut config = server_config(&db.url, plugins.path(), queue.config.clone());
    tune(&mut config);
    (TestServer::start_with(config).await, queue)
}

/// What a load of `clients` concurrent callers of `form` saw.
#[derive(Debug, Default)]
struct Load {
    calls: AtomicU64,
    errors: AtomicU64,
    failed_results: AtomicU64,
    first_problem: std::sync::Mutex<Option<String>>,
}

impl Load {
    fn problem(&self, what: String) {
        self.first_problem.lock().expect("lock").get_or_insert(what);
    }
}

fn assert_clean(stats: &Load) {
    let (calls, errors, failed) = (
        stats.calls.load(Ordering::Relaxed),
        stats.errors.load(Ordering::Relaxed),
        stats.failed_results.load(Ordering::Relaxed),
    );
    assert!(calls > 100, "only {calls} calls made");
    assert_eq!(
        (errors, failed),
        (0, 0),
        "{calls} calls: {errors} errors, {failed} failed results; first: {:?}",
        stats.first_problem.lock().expect("lock")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashing_hanging_and_leaking_tasks_fail_alone_while_another_form_is_served() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("echo", "echo");
    plugins.install("testkit", "testkit");
    std::fs::copy(
        fixture("testkit_panic_abort"),
        plugins.module_path("panic_abort"),
    )
    .expect("installing the panic=abort fixture");
    let good = Uuid::new_v4();
    db.attach(good, "echo", "echo", "echo", json!({}));
    // (task, module, func, config, timeout, outcome, what its error names)
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        Value,
        i32,
        Outcome,
        &'static [&'static str],
    );
    let cases: [Case; 8] = [
        (
            "segfault",
            "testkit",
            "segfault",
            json!({}),
            5000,
            Outcome::Failed,
            &["plugin host for 'testkit' died", "SIGSEGV"],
        ),
        (
            "abort",
            "testkit",
            "abort",
            json!({}),
            5000,
            Outcome::Failed,
            &["plugin host for 'testkit' died", "SIGABRT"],
        ),
        (
            "exit_0",
            "testkit",
            "exit",
            json!({"code": 0}),
            5000,
            Outcome::Failed,
            &["plugin host for 'testkit' died", "exit code 0"],
        ),
        (
            "exit_3",
            "testkit",
            "exit",
            json!({"code": 3}),
            5000,
            Outcome::Failed,
            &["plugin host for 'testkit' died", "exit code 3"],
        ),
        (
            "stack_overflow",
            "testkit",
            "stack_overflow",
            json!({}),
            5000,
            Outcome::Failed,
            &["plugin host for 'testkit' died", "SIG"],
        ),
        (
            "hang",
            "testkit",
            "hang",
            json!({}),
            500,
            Outcome::TimedOut,
            &["'hang'", "500 ms"],
        ),
        (
            "slow_new",
            "testkit",
            "slow_new",
            json!({"ms": 20_000}),
            1000,
            Outcome::TimedOut,
            &["'slow_new'", "1000 ms"],
        ),
        (
            "panic_abort",
            "panic_abort",
            "panic",
            json!({}),
            5000,
            Outcome::Failed,
            &["plugin host for 'panic_abort' died", "SIGABRT"],
        ),
    ];
    let mut forms = Vec::new();
    for (name, module, func, config, timeout, ..) in &cases {
        let form = Uuid::new_v4();
        db.attach_with(task(form, name, module, func, config.clone(), *timeout));
        forms.push(form);
    }
    let leaky = Uuid::new_v4();
    db.attach_with(task(
        leaky,
        "leak",
        "testkit",
        "leak",
        json!({"mib": 64}),
        5000,
    ));
    let (server, _queue) = start_server(&db, &plugins, |c| {
        c.hosts.memory_limit_mib = 200;
        // Not what this test is about: see the quarantine test.
        c.hosts.quarantine_after = 100;
        c.hosts.recycle_grace = Duration::from_secs(1);
    })
    .await;
    let mut client = server.client().await;
    // The echo host is warm before the load starts.
    process(&mut client, good, sample()).await;

    let channel = server.channel().await;
    let loading = tokio::spawn(load_on(channel, good, 32, Duration::from_secs(10)));
    // Each bad task twice: its host is replaced after the first.
    for round in 0..2 {
        for ((name, _, _, _, _, outcome, needles), form) in cases.iter().zip(&forms) {
            let started = Instant::now();
            let response = process(&mut client, *form, sample()).await;
            let r = result(&response, name);
            assert_eq!(r.outcome(), *outcome, "round {round}: {r:?}");
            for needle in *needles {
                assert!(
                    r.error.contains(needle),
                    "round {round}: error of '{name}' should name {needle:?}: {}",
                    r.error
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(6),
                "'{name}' took {:?}",
                started.elapsed()
            );
        }
    }
    // 64 MiB a run against a 200 MiB limit: a few runs pass, then one fails
    // naming the limit, and the next runs on a fresh host.
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        let response = process(&mut client, leaky, sample()).await;
        outcomes.push((
            response.results[0].outcome(),
            response.results[0].error.clone(),
        ));
    }
    let over = outcomes
        .iter()
        .position(|(o, _)| *o == Outcome::Failed)
        .unwrap_or_else(|| panic!("the leak never hit the limit: {outcomes:?}"));
    assert!(over >= 1, "{outcomes:?}");
    assert!(outcomes[over].1.contains("memory limit"), "{outcomes:?}");
    assert_eq!(outcomes[over + 1].0, Outcome::Succeeded, "{outcomes:?}");

    let stats = loading.await.expect("load");
    assert_clean(&stats);
    // Serve is still up and serving.
    let after = process(&mut client, good, sample()).await;
    assert_eq!(after.results[0].outcome(), Outcome::Succeeded);
}

/// Calls `form` from `clients` callers for `length`; every result must
/// succeed.
async fn load_on(
    channel: tonic::transport::Channel,
    form: Uuid,
    clients: usize,
    length: Duration,
) -> Arc<Load> {
    let stats = Arc::new(Load::default());
    let until = Instant::now() + length;
    let callers: Vec<_> = (0..clients)
        .map(|_| {
            let (stats, mut client) = (
                stats.clone(),
                proto::v1::post_sub_proxy_client::PostSubProxyClient::new(channel.clone()),
            );
            tokio::spawn(async move {
                while Instant::now() < until {
                    stats.calls.fetch_add(1, Ordering::Relaxed);
                    match client.process(request(form, json!({"n": 1}))).await {
                        Ok(response) => {
                            let response = response.into_inner();
                            if response.results.is_empty()
                                || response
                                    .results
                                    .iter()
                                    .any(|r| r.outcome() != Outcome::Succeeded)
                            {
                                stats.failed_results.fetch_add(1, Ordering::Relaxed);
                                stats.problem(format!("{response:?}"));
                            }
                        }
                        Err(status) => {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                            stats.problem(format!("{status:?}"));
                        }
                    }
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("caller");
    }
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_constructor_does_not_delay_another_librarys_first_run() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    plugins.install("echo", "echo_a");
    plugins.install("echo", "echo_b");
    let (slow, a, b) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    db.attach_with(task(
        slow,
        "slow_new",
        "testkit",
        "slow_new",
        json!({"ms": 20_000}),
        30_000,
    ));
    db.attach(a, "echo", "echo_a", "echo", json!({}));
    db.attach(b, "echo", "echo_b", "echo", json!({}));
    let (server, _queue) = start_server(&db, &plugins, |_| {}).await;
    let mut client = server.client().await;

    // A library's first run, with nothing else going on.
    let started = Instant::now();
    assert_eq!(
        process(&mut client, a, sample()).await.results[0].outcome(),
        Outcome::Succeeded
    );
    let alone = started.elapsed();

    let mut slow_client = server.client().await;
    let constructing = tokio::spawn(async move { process(&mut slow_client, slow, sample()).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    assert_eq!(
        process(&mut client, b, sample()).await.results[0].outcome(),
        Outcome::Succeeded
    );
    let beside = started.elapsed();
    assert!(
        beside < alone + Duration::from_millis(100),
        "a first run took {beside:?} beside a 20 s constructor, {alone:?} alone"
    );
    assert!(
        !constructing.is_finished(),
        "the constructor should still be running"
    );
    constructing.abort();
}

/// Swaps `module`'s library between two builds `times` times, by `cp` or
/// by `mv`, while 32 clients call `form` for 12 s.
async fn drop_in_under_load(atomic: bool) {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("echo", "swap");
    let form = Uuid::new_v4();
    db.attach(form, "swap", "swap", "echo", json!({}));
    let (server, _queue) = start_server(&db, &plugins, |_| {}).await;
    let mut client = server.client().await;
    process(&mut client, form, sample()).await;

    let channel = server.channel().await;
    let loading = tokio::spawn(load_on(channel, form, 32, Duration::from_secs(12)));
    let target = plugins.module_path("swap");
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        // Alternate two builds that both export `echo`.
        let build = test_support::built_plugin(if i % 2 == 0 { "testkit" } else { "echo" });
        let status = if atomic {
            let staged = plugins.path().join(format!(".swap-{i}.tmp"));
            std::process::Command::new("cp")
                .arg(&build)
                .arg(&staged)
                .status()
                .expect("cp");
            std::process::Command::new("mv")
                .arg(&staged)
                .arg(&target)
                .status()
                .expect("mv")
        } else {
            std::process::Command::new("cp")
                .arg(&build)
                .arg(&target)
                .status()
                .expect("cp")
        };
        assert!(status.success());
    }
    let stats = loading.await.expect("load");
    assert_clean(&stats);
    // The last build (echo) answers now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let response = process(&mut client, form, sample()).await;
    assert_eq!(
        to_json(response.results[0].output.as_ref().expect("output")),
        sample()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwriting_a_library_with_cp_under_load_loses_no_call() {
    drop_in_under_load(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renaming_a_library_into_place_under_load_loses_no_call() {
    drop_in_under_load(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_keeps_crashing_is_quarantined_until_a_new_build() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let (crashy, neighbour) = (Uuid::new_v4(), Uuid::new_v4());
    db.attach_with(task(
        crashy,
        "segfault",
        "testkit",
        "segfault",
        json!({}),
        5000,
    ));
    db.attach(
        neighbour,
        "config",
        "testkit",
        "config",
        json!({"ok": true}),
    );
    let (server, _queue) = start_server(&db, &plugins, |c| c.hosts.quarantine_after = 3).await;
    let mut client = server.client().await;

    for _ in 0..3 {
        let r = process(&mut client, crashy, sample()).await;
        assert!(r.results[0].error.contains("SIGSEGV"), "{:?}", r.results[0]);
    }
    let started = Instant::now();
    let r = process(&mut client, crashy, sample()).await;
    assert_eq!(r.results[0].outcome(), Outcome::Failed);
    assert!(
        r.results[0].error.contains("quarantined after 3 crashes"),
        "{:?}",
        r.results[0]
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    // `daisy plugin list` shows it (from the database serve recorded it in).
    let plugin_list = || {
        let out = std::process::Command::new(test_support::daisy_bin())
            .args(["plugin", "list", "--plugins-dir"])
            .arg(plugins.path())
            .env("DATABASE_URL", &db.url)
            .output()
            .expect("running daisy plugin list");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).expect("UTF-8")
    };
    let shown = Instant::now();
    loop {
        let listed = plugin_list();
        if listed.contains("testkit\tquarantined\tsegfault: after 3 crashes") {
            break;
        }
        assert!(
            shown.elapsed() < Duration::from_secs(5),
            "not listed: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its library's other tasks still run.
    let ok = process(&mut client, neighbour, sample()).await;
    assert_eq!(
        ok.results[0].outcome(),
        Outcome::Succeeded,
        "{:?}",
        ok.results[0]
    );

    // A new build (here: the same code with bytes appended) lifts it.
    let mut bytes = std::fs::read(test_support::built_plugin("testkit")).expect("reading");
    bytes.extend_from_slice(b"a new build");
    let staged = plugins.path().join("staged.tmp");
    std::fs::write(&staged, bytes).expect("writing");
    std::fs::rename(&staged, plugins.module_path("testkit")).expect("renaming");
    let r = process(&mut client, crashy, sample()).await;
    assert!(
        r.results[0].error.contains("SIGSEGV"),
        "not lifted: {:?}",
        r.results[0]
    );
    let listed = plugin_list();
    assert!(!listed.contains("quarantined"), "{listed}");
    assert!(listed.contains("testkit\tok"), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_see_only_the_environment_they_are_allowed() {
    let mut stack = test_support::Stack::start(
        &[("testkit", "testkit")],
        &[
            ("DAISY_PLUGIN_ENV", "DAISY_TEST_VISIBLE"),
            ("DAISY_TEST_VISIBLE", "shown"),
            ("DAISY_TEST_HIDDEN", "secret"),
        ],
    )
    .await;
    let form = Uuid::new_v4();
    stack.attach(form, "env", "testkit", "env", false, &json!({}));
    stack.attach(form, "env_async", "testkit", "env", true, &json!({}));
    let (submission, response) = stack.process(form, sample()).await;
    let sync_env = to_json(response.results[0].output.as_ref().expect("output"))["env"].clone();
    let runs = stack.settled(&submission, Duration::from_secs(20)).await;
    let run = runs.iter().find(|r| r.is_async).expect("the async run");
    assert_eq!(run.state(), RunState::Succeeded, "{run:?}");
    let async_env = to_json(run.output.as_ref().expect("output"))["env"].clone();
    for env in [sync_env, async_env] {
        let env = env.as_object().expect("an object").clone();
        assert_eq!(
            env.get("DAISY_TEST_VISIBLE"),
            Some(&json!("shown")),
            "{env:?}"
        );
        for name in env.keys() {
            assert!(
                ["PATH", "HOME", "LANG", "TZ", "DAISY_TEST_VISIBLE"].contains(&name.as_str()),
                "a plugin saw {name}: {env:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_async_task_ends_dead_and_its_neighbours_succeed() {
    let mut stack =
        test_support::Stack::start(&[("testkit", "testkit")], &[("DAISY_MAX_CRASHES", "3")]).await;
    let (crashy, fine) = (Uuid::new_v4(), Uuid::new_v4());
    stack.attach(crashy, "segfault", "testkit", "segfault", true, &json!({}));
    stack.attach(
        fine,
        "config",
        "testkit",
        "config",
        true,
        &json!({"ok": true}),
    );
    let (poison, _) = stack.process(crashy, sample()).await;
    let mut goods = Vec::new();
    for i in 0..20 {
        goods.push(stack.process(fine, json!({"i": i})).await.0);
    }
    let runs = stack.settled(&poison, Duration::from_secs(60)).await;
    assert_eq!(runs[0].state(), RunState::Dead, "{:?}", runs[0]);
    assert!(
        runs[0].last_error.contains("crashed 3 times"),
        "{:?}",
        runs[0]
    );
    assert!(runs[0].last_error.contains("SIGSEGV"), "{:?}", runs[0]);
    for good in goods {
        let runs = stack.settled(&good, Duration::from_secs(60)).await;
        assert_eq!(runs[0].state(), RunState::Succeeded, "{:?}", runs[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_isolation_runs_in_the_serving_process() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let form = Uuid::new_v4();
    db.attach_with(NewTask {
        isolation: Some(Isolation::InProcess.as_str().into()),
        ..task(form, "inproc", "testkit", "env", json!({}), 5000)
    });
    db.attach(form, "hosted", "testkit", "env", json!({}));
    let (server, _queue) = start_server(&db, &plugins, |_| {}).await;
    let mut client = server.client().await;
    let response = process(&mut client, form, sample()).await;
    let pid = |name: &str| {
        to_json(result(&response, name).output.as_ref().expect("output"))["pid"].clone()
    };
    assert_eq!(pid("inproc"), json!(std::process::id()));
    assert_ne!(pid("hosted"), json!(std::process::id()));

    // The global default applies to tasks that do not say.
    let (server, _queue) =
        start_server(&db, &plugins, |c| c.isolation = Isolation::InProcess).await;
    let mut client = server.client().await;
    let response = process(&mut client, form, sample()).await;
    let pid = |name: &str| {
        to_json(result(&response, name).output.as_ref().expect("output"))["pid"].clone()
    };
    assert_eq!(pid("hosted"), json!(std::process::id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_are_spread_per_module_recycled_after_their_budget_and_reaped_when_idle() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    plugins.install("testkit", "budget");
    let (spread, budget) = (Uuid::new_v4(), Uuid::new_v4());
    db.attach(spread, "env", "testkit", "env", json!({}));
    db.attach(budget, "env", "budget", "env", json!({}));
    let pid_of = |response: &proto::v1::ProcessResponse| {
        to_json(response.results[0].output.as_ref().expect("output"))["pid"]
            .as_u64()
            .expect("a pid")
    };

    // Two hosts per module, taken in turn.
    let (server, _queue) = start_server(&db, &plugins, |c| c.hosts.hosts_per_module = 2).await;
    let mut client = server.client().await;
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..4 {
        pids.insert(pid_of(&process(&mut client, spread, sample()).await));
    }
    assert_eq!(pids.len(), 2, "{pids:?}");
    drop(client);
    drop(server);

    // A run budget of 3: the fourth run is on a new host.
    let (server, _queue) = start_server(&db, &plugins, |c| {
        c.hosts.max_runs = 3;
        c.hosts.idle_timeout = Duration::from_millis(400);
    })
    .await;
    let mut client = server.client().await;
    let mut pids = Vec::new();
    for _ in 0..4 {
        pids.push(pid_of(&process(&mut client, budget, sample()).await));
    }
    assert!(pids[..3].iter().all(|&p| p == pids[0]), "{pids:?}");
    assert_ne!(pids[3], pids[0], "{pids:?}");
    let gone = |pid: u64| !std::path::Path::new(&format!("/proc/{pid}")).exists();
    let started = Instant::now();
    while !gone(pids[0]) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the spent host lives on"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Idle for longer than 400 ms: the host exits, and the next call starts another.
    let started = Instant::now();
    while !gone(pids[3]) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the idle host was not reaped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let next = pid_of(&process(&mut client, budget, sample()).await);
    assert!(!pids.contains(&next), "{pids:?} then {next}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_completes_while_a_plugin_hangs_and_leaves_no_host_behind() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("testkit", "testkit");
    let form = Uuid::new_v4();
    db.attach_with(task(form, "hang", "testkit", "hang", json!({}), 3000));
    db.attach(form, "env", "testkit", "env", json!({}));
    let queue = TestQueue::new();
    let mut serve = queue.serve(&db.url, plugins.path(), None);
    let mut client = serve.client().await;
    let hung = tokio::spawn(async move { client.process(request(form, sample())).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = serve.terminate(Duration::from_secs(10));
        (serve, status)
    })
    .await
    .expect("terminating");
    assert!(
        status.1.is_some(),
        "serve did not stop within 10 s of SIGTERM"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The call in flight was answered (its task timed out) before serve left.
    let answered = hung
        .await
        .expect("caller")
        .expect("answered before shutdown");
    let hang = result(answered.get_ref(), "hang");
    assert_eq!(hang.outcome(), Outcome::TimedOut, "{hang:?}");
    let env = result(answered.get_ref(), "env");
    let host = to_json(env.output.as_ref().expect("output"))["pid"]
        .as_u64()
        .expect("pid");
    let gone = Instant::now();
    while std::path::Path::new(&format!("/proc/{host}")).exists() {
        let state = std::fs::read_to_string(format!("/proc/{host}/stat")).unwrap_or_default();
        if state.contains(") Z ") {
            break; // a zombie: dead, waiting for its reaper (serve is gone)
        }
        assert!(
            gone.elapsed() < Duration::from_secs(5),
            "plugin host {host} outlived serve"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
