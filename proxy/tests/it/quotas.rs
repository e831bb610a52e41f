//! Quotas by design: runs throttled by an API's Retry-After wait without
//! using attempts, and a task's rate limit paces its runs across workers.

use std::time::Duration;

use proto::v1::RunState;
use serde_json::json;
use uuid::Uuid;

use crate::util::sample;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_run_waits_without_using_its_attempts() {
    let mut stack = test_support::Stack::start(&[("testkit", "testkit")], &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let form = Uuid::new_v4();
    // Throttled 3 times with Retry-After 1 s, though it has 2 attempts.
    let task = stack.attach(
        form,
        "throttled",
        "testkit",
        "throttle",
        true,
        &json!({"times": 3, "retry_after_secs": 1, "dir": dir.path()}),
    );
    stack.db.execute(&format!(
        "UPDATE tasks SET max_attempts = 2 WHERE id = '{task}'"
    ));
    let (submission, _) = stack.process(form, sample()).await;
    let runs = stack.settled(&submission, Duration::from_secs(60)).await;
    let run = &runs[0];
    assert_eq!(run.state(), RunState::Succeeded, "{run:?}");
    assert_eq!(run.attempts, 1, "the 429s used no attempt: {run:?}");
    let output = proto::json::value_to_json(run.output.as_ref().expect("an output"));
    assert_eq!(
        output["executions"], 4,
        "three throttled, then done: {output}"
    );
    assert_eq!(output["attempt"], 1, "{output}");
    let log = stack.db.query_one(&format!(
        "SELECT count(*)::text FROM run_attempts WHERE run_id = '{}'",
        run.run_id
    ));
    assert_eq!(log, "1", "only the real attempt is logged");
    let waited = stack.db.query_one(&format!(
        "SELECT throttled_ms::text FROM task_runs WHERE id = '{}'",
        run.run_id
    ));
    let waited: u64 = waited.parse().expect("a number");
    assert!(
        (3_000..=7_000).contains(&waited),
        "three Retry-After waits of 1 s plus jitter: {waited} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_past_the_bound_uses_attempts_again() {
    let mut stack = test_support::Stack::start(&[("testkit", "testkit")], &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let form = Uuid::new_v4();
    // Always throttled: spared for 10 s (the tests' --max-throttled-ms),
    // then each throttle is an attempt, and the run ends dead saying why.
    let task = stack.attach(
        form,
        "throttled",
        "testkit",
        "throttle",
        true,
        &json!({"times": 1000, "retry_after_secs": 2, "dir": dir.path()}),
    );
    stack.db.execute(&format!(
        "UPDATE tasks SET max_attempts = 2 WHERE id = '{task}'"
    ));
    let (submission, _) = stack.process(form, sample()).await;
    let runs = stack.settled(&submission, Duration::from_secs(60)).await;
    let run = &runs[0];
    assert_eq!(run.state(), RunState::Dead, "{run:?}");
    assert_eq!(run.attempts, 2, "{run:?}");
    assert!(
        run.last_error.contains("gave up after 2 attempts")
            && run.last_error.contains("429 Too Many Requests"),
        "{run:?}"
    );
}

/// How late a paced run may start after its slot, at most, in these tests.
const LATE_MS: u64 = 800;

/// Start times (ms) in a stamp file, sorted.
fn stamps(path: &std::path::Path) -> Vec<u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut stamps: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    stamps.sort_unstable();
    stamps
}

/// The most stamps within any `window` (a sliding window).
fn most_in_window(stamps: &[u64], window: Duration) -> usize {
    let window = window.as_millis() as u64;
    (0..stamps.len())
        .map(|i| {
            stamps[i..]
                .iter()
                .take_while(|&&t| t < stamps[i] + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_paces_a_tasks_runs_across_workers() {
    let mut stack = test_support::Stack::start(&[("testkit", "testkit")], &[]).await;
    stack.add_worker();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stamps");
    let form = Uuid::new_v4();
    let task = stack.attach(
        form,
        "paced",
        "testkit",
        "stamp",
        true,
        &json!({"path": path}),
    );
    // 60 a minute: one start a second, whichever worker starts it.
    stack.db.execute(&format!(
        "UPDATE tasks SET rate_per_minute = 60, max_attempts = 1 WHERE id = '{task}'"
    ));
    let mut submissions = Vec::new();
    for _ in 0..12 {
        submissions.push(stack.process(form, sample()).await.0);
    }
    for submission in &submissions {
        let runs = stack.settled(submission, Duration::from_secs(60)).await;
        assert_eq!(runs[0].state(), RunState::Succeeded, "{:?}", runs[0]);
        assert_eq!(runs[0].attempts, 1, "pacing used no attempt: {:?}", runs[0]);
    }
    let stamps = stamps(&path);
    assert_eq!(stamps.len(), 12, "each run once: {stamps:?}");
    // A run starts at its slot or a little after (the first waits for its
    // plugin host, the others for the relay's poll), never before it.
    let span = stamps[11] - stamps[0];
    assert!(
        span >= 11 * 1000 - LATE_MS,
        "12 starts a second apart take 11 s, not {span} ms: {stamps:?}"
    );
    let most = most_in_window(&stamps, Duration::from_secs(3));
    assert!(most <= 4, "{most} starts within 3 s: {stamps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_of_one_rate_group_share_its_pace() {
    let mut stack = test_support::Stack::start(&[("testkit", "testkit")], &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stamps");
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for form in [a, b] {
        let task = stack.attach(
            form,
            "paced",
            "testkit",
            "stamp",
            true,
            &json!({"path": path}),
        );
        stack.db.execute(&format!(
            "UPDATE tasks SET rate_per_minute = 60, rate_group = 'one-account' WHERE id = '{task}'"
        ));
    }
    let mut submissions = Vec::new();
    for i in 0..10 {
        let form = if i % 2 == 0 { a } else { b };
        submissions.push(stack.process(form, sample()).await.0);
    }
    for submission in &submissions {
        let runs = stack.settled(submission, Duration::from_secs(60)).await;
        assert_eq!(runs[0].state(), RunState::Succeeded, "{:?}", runs[0]);
    }
    let stamps = stamps(&path);
    assert_eq!(stamps.len(), 10, "{stamps:?}");
    assert!(
        stamps[9] - stamps[0] >= 9 * 1000 - LATE_MS,
        "both forms' runs drew from one pace: {stamps:?}"
    );
}
