//! Micro-benchmarks of the synchronous hot path: a plugin call through the
//! stable ABI against the same task called directly, one run through the
//! plugin-host layer in each isolation mode (in-process: a stat of the
//! library file, a map lookup and the blocking pool; process: the same
//! stat plus a round trip to a plugin host), and the submission's
//! Struct → JSON conversion. `make bench` runs them (criterion);
//! the libraries come from `target/release` (`cargo build --release --workspace`).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use plugin_api::{Input, Task, host::RunInput, json};
use proxy::{
    executor::{RunRef, Submission},
    plugins::{HostConfig, Isolation, Plugins},
    registry::TaskDef,
};
use test_support::{PluginsDir, Profile};

fn plugin_call(c: &mut Criterion) {
    let dir = PluginsDir::new();
    dir.install_built(Profile::Release, "testkit", "testkit");
    let library = plugin_api::host::Library::load(&dir.module_path("testkit")).expect("loads");
    let handle = library.instantiate("config", "null").expect("creates");
    let direct = testkit::Config::new(json!(null)).expect("creates");
    let input = Input::new("f", "s", json!({}), 1);
    let mut group = c.benchmark_group("no-op task call");
    group.bench_function("direct Rust call", |b| {
        b.iter(|| black_box(direct.run(black_box(&input))))
    });
    group.bench_function("through the stable ABI", |b| {
        b.iter(|| {
            black_box(handle.run(RunInput {
                form_id: "f",
                submission_id: "s",
                submission_json: black_box("{}"),
                attempt: 1,
                run_id: "r",
                context_json: "",
            }))
        })
    });
    group.finish();
}

fn instance_lookup(c: &mut Criterion) {
    let dir = PluginsDir::new();
    dir.install_built(Profile::Release, "echo", "echo");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let daisy = Profile::Release.daisy_bin();
    let plugins = runtime
        .block_on(async { Plugins::new(dir.path(), HostConfig::new(daisy), Isolation::Process) })
        .expect("loader");
    let submission = Submission {
        form_id: "f".into(),
        submission_id: "s".into(),
        json: "{}".into(),
        context_json: "".into(),
    };
    let first = RunRef {
        id: uuid::Uuid::new_v4(),
        attempt: 1,
    };
    let mut group = c.benchmark_group("one echo run through the plugin layer");
    for isolation in [Isolation::InProcess, Isolation::Process] {
        let task = TaskDef {
            id: uuid::Uuid::new_v4(),
            form_id: uuid::Uuid::new_v4(),
            name: "echo".into(),
            module: "echo".into(),
            func: "echo".into(),
            is_async: false,
            config: json!({}),
            enabled: true,
            timeout_ms: 1000,
            max_attempts: 1,
            created_at: chrono::Utc::now(),
            isolation: Some(isolation.as_str().into()),
            rate_per_minute: None,
            rate_group: None,
        };
        let run = || {
            runtime.block_on(plugins.run(
                &task,
                &submission,
                first,
                std::time::Duration::from_secs(1),
            ))
        };
        run();
        group.bench_function(isolation.as_str(), |b| b.iter(|| black_box(run())));
    }
    group.finish();
    plugins.shutdown();
}

fn struct_to_json(c: &mut Criterion) {
    let submission = proto::json::json_to_struct(json!({
        "answers": {"name": "Ada Lovelace", "phone": "+44 20 7946 0000", "rating": 5, "comment": "quick and painless", "tags": ["a", "b"]},
        "metadata": {"device": "tablet-7", "locale": "en-GB"},
    }))
    .expect("an object");
    c.bench_function("submission Struct -> JSON value -> JSON text", |b| {
        b.iter(|| black_box(proto::json::struct_to_json(black_box(&submission)).to_string()))
    });
    c.bench_function("submission Struct -> JSON text", |b| {
        b.iter(|| black_box(proto::json::struct_to_json_text(black_box(&submission))))
    });
}

criterion_group!(benches, plugin_call, instance_lookup, struct_to_json);
criterion_main!(benches);
