//! `google_sheets` through the real loader and a worker, against fake Google
//! endpoints on loopback: the token endpoint verifies the JWT's signature
//! with the test key and its claims; the Sheets API records the header and
//! the appended rows and can answer 429 with Retry-After.

use std::time::Duration;

use example_fake_google::Google;
use proto::v1::RunState;
use serde_json::{Value, json};
use test_support::{SecretsDir, Stack};
use uuid::Uuid;

const EMAIL: &str = "daisy-export@test-project.iam.gserviceaccount.com";

async fn fake_google(throttle: u32) -> (Google, String) {
    let google = Google::new(include_bytes!("fixtures/test-key.pub.pem"), EMAIL);
    *google.throttle.lock().expect("lock") = throttle;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = google.clone().serve(listener).await;
    (google, base)
}

/// A secrets directory holding the service account key as `google_sa`.
fn credentials(email: &str, token_uri: &str) -> SecretsDir {
    let key = include_str!("fixtures/test-key.pem");
    SecretsDir::new(&[("google_sa", &json!({
        "type": "service_account", "client_email": email, "private_key": key, "token_uri": token_uri,
    }).to_string())])
}

/// The task on a new form of a new Daisy stack, with `config` and the key
/// of service account `email` (secret `google_sa`, token endpoint at
/// `base`): (stack, form, task id, the secrets directory to keep alive).
async fn sheets_task(email: &str, base: &str, config: Value) -> (Stack, Uuid, Uuid, SecretsDir) {
    let creds = credentials(email, &format!("{base}/token"));
    let stack = Stack::start(
        &[("google_sheets", "google_sheets")],
        &[("DAISY_SECRETS_DIR", creds.env_value())],
    )
    .await;
    let mut config = config;
    config["credentials"] = json!({"secret": "google_sa"});
    let form = Uuid::new_v4();
    let task = stack.attach(form, "sheet", "google_sheets", "append_row", true, &config);
    (stack, form, task, creds)
}

#[tokio::test]
async fn rows_and_header_are_written_with_one_token_and_a_429_burst_loses_nothing() {
    let (google, base) = fake_google(3).await;
    let (mut stack, form, _, _creds) = sheets_task(
        EMAIL,
        &base,
        json!({"spreadsheet_id": "sheet-1", "sheet": "Responses", "sheets_base_url": base}),
    )
    .await;

    let mut submissions = Vec::new();
    for i in 0..5 {
        let answers = json!({"name": format!("person {i}"), "rating": i, "happy": i % 2 == 0});
        submissions.push(stack.process(form, json!({"answers": answers})).await.0);
    }
    for submission in &submissions {
        let runs = stack.settled(submission, Duration::from_secs(90)).await;
        assert_eq!(runs[0].state(), RunState::Succeeded, "{runs:?}");
    }

    assert_eq!(
        *google.exchanges.lock().expect("lock"),
        1,
        "one token exchange for every run"
    );
    assert_eq!(
        *google.throttled.lock().expect("lock"),
        3,
        "the burst was hit"
    );
    let header = google.header_of("sheet-1");
    assert_eq!(
        header,
        [
            json!("submission_id"),
            json!("form_id"),
            json!("happy"),
            json!("name"),
            json!("rating")
        ]
    );
    assert_eq!(
        *google.header_writes.lock().expect("lock"),
        1,
        "the header is written once"
    );
    let rows = google.rows_of("sheet-1");
    assert_eq!(rows.len(), 5, "every row exactly once: {rows:?}");
    for (i, submission) in submissions.iter().enumerate() {
        let row = rows
            .iter()
            .find(|r| r[0] == json!(submission))
            .expect("the submission's row");
        assert_eq!(
            row[1..],
            [
                json!(form.to_string()),
                json!(i % 2 == 0),
                json!(format!("person {i}")),
                json!(i)
            ]
        );
    }
}

#[tokio::test]
async fn a_key_the_token_endpoint_rejects_is_a_permanent_error() {
    let (google, base) = fake_google(0).await;
    // A service account the token endpoint does not know: it refuses the JWT.
    let (mut stack, form, _, _creds) = sheets_task(
        "stranger@elsewhere.iam.gserviceaccount.com",
        &base,
        json!({"spreadsheet_id": "sheet-1", "sheets_base_url": base}),
    )
    .await;

    let (submission, _) = stack.process(form, json!({"answers": {"name": "x"}})).await;
    let runs = stack.settled(&submission, Duration::from_secs(60)).await;

    assert_eq!(runs[0].state(), RunState::Dead, "{runs:?}");
    assert!(
        runs[0].last_error.contains("token exchange") && runs[0].last_error.contains("400"),
        "{}",
        runs[0].last_error
    );
    assert!(google.rows_of("sheet-1").is_empty());
}

#[tokio::test]
async fn without_a_spreadsheet_id_one_is_created_per_form_and_shared() {
    let (google, base) = fake_google(0).await;
    let (mut stack, form, _, _creds) = sheets_task(
        EMAIL,
        &base,
        json!({
            "sheet": "Responses", "share_with": ["ops@example.org", "lead@example.org"],
            "sheets_base_url": base, "drive_base_url": base,
        }),
    )
    .await;

    let mut submissions = Vec::new();
    for i in 0..3 {
        submissions.push(stack.process(form, json!({"answers": {"n": i}})).await.0);
    }
    for submission in &submissions {
        let runs = stack.settled(submission, Duration::from_secs(60)).await;
        assert_eq!(runs[0].state(), RunState::Succeeded, "{runs:?}");
    }

    let created = google.created.lock().expect("lock").clone();
    assert_eq!(
        created.len(),
        1,
        "one spreadsheet for the form: {created:?}"
    );
    let (id, (props, shared)) = created.into_iter().next().expect("created");
    assert_eq!(props, json!({"daisy_form": form.to_string()}));
    assert_eq!(shared, ["ops@example.org", "lead@example.org"]);
    assert_eq!(google.rows_of(&id).len(), 3);
    assert_eq!(
        google.header_of(&id),
        [json!("submission_id"), json!("form_id"), json!("n")]
    );
}

#[tokio::test]
async fn a_new_spreadsheet_is_shared_with_the_form_owners_from_the_submission_context() {
    let (google, base) = fake_google(0).await;
    let (mut stack, form, _, _creds) = sheets_task(
        EMAIL,
        &base,
        json!({
            "share_with": ["ops@example.org", "owner@example.org"],
            "sheets_base_url": base, "drive_base_url": base,
        }),
    )
    .await;
    let context = proto::v1::SubmissionContext {
        organisation_id: "org-1".into(),
        owner_emails: vec!["owner@example.org".into(), "second@example.org".into()],
        ..Default::default()
    };
    let (submission, _) = stack
        .process_with(form, json!({"answers": {"n": 1}}), Some(context))
        .await;
    let runs = stack.settled(&submission, Duration::from_secs(60)).await;
    assert_eq!(runs[0].state(), RunState::Succeeded, "{runs:?}");
    // An old client's submission (no context) to the same form later: the
    // spreadsheet exists, nothing more is shared.
    let (old_client, _) = stack.process(form, json!({"answers": {"n": 2}})).await;
    let runs = stack.settled(&old_client, Duration::from_secs(60)).await;
    assert_eq!(runs[0].state(), RunState::Succeeded, "{runs:?}");

    let created = google.created.lock().expect("lock").clone();
    assert_eq!(created.len(), 1, "{created:?}");
    let (id, (_, shared)) = created.into_iter().next().expect("created");
    // The owners first, then share_with; each address once.
    assert_eq!(
        shared,
        ["owner@example.org", "second@example.org", "ops@example.org"]
    );
    assert_eq!(google.rows_of(&id).len(), 2);
}

#[tokio::test]
async fn a_token_revoked_before_its_expiry_is_replaced_once_and_every_run_succeeds() {
    let (google, base) = fake_google(0).await;
    let (mut stack, form, _, _creds) = sheets_task(
        EMAIL,
        &base,
        json!({"spreadsheet_id": "sheet-1", "sheets_base_url": base}),
    )
    .await;
    let mut submit = async |n: usize| {
        let (id, _) = stack.process(form, json!({"answers": {"n": n}})).await;
        let runs = stack.settled(&id, Duration::from_secs(60)).await;
        assert_eq!(runs[0].state(), RunState::Succeeded, "{runs:?}");
        assert_eq!(runs[0].attempts, 1, "{runs:?}");
    };
    for n in 0..3 {
        submit(n).await;
    }
    assert_eq!(*google.exchanges.lock().expect("lock"), 1);
    // Revoked with most of its hour left: the next call gets 401.
    google.revoke_tokens();
    for n in 3..6 {
        submit(n).await;
    }
    assert_eq!(
        *google.exchanges.lock().expect("lock"),
        2,
        "one new token exchange after the revocation"
    );
    assert_eq!(google.rows_of("sheet-1").len(), 6);
}

#[tokio::test]
async fn a_reply_slower_than_the_timeout_makes_no_second_row() {
    let (google, base) = fake_google(0).await;
    *google.slow_appends.lock().expect("lock") = 2;
    *google.slow_for.lock().expect("lock") = Duration::from_millis(2500);
    let (mut stack, form, task, _creds) = sheets_task(
        EMAIL,
        &base,
        json!({"spreadsheet_id": "sheet-1", "sheets_base_url": base}),
    )
    .await;
    // The append's reply comes 2.5 s late; the run gives up after 1 s.
    stack.db.execute(&format!(
        "UPDATE tasks SET timeout_ms = 1000 WHERE id = '{task}'"
    ));
    // One at a time: a run past its timeout recycles its plugin host, and
    // a neighbour in flight there would be retried too (correctly, but
    // then more than the two slow ones are retried).
    let mut retried = 0;
    for n in 0..4 {
        let (submission, _) = stack.process(form, json!({"answers": {"n": n}})).await;
        let runs = stack.settled(&submission, Duration::from_secs(60)).await;
        assert_eq!(runs[0].state(), RunState::Succeeded, "{runs:?}");
        if runs[0].attempts > 1 {
            retried += 1;
            let output = proto::json::value_to_json(runs[0].output.as_ref().expect("output"));
            assert_eq!(output["already_appended"], true, "{output}");
        }
    }
    assert_eq!(
        retried, 2,
        "the two slow appends timed out and were retried"
    );
    let rows = google.rows_of("sheet-1");
    let mut ids: Vec<&str> = rows.iter().filter_map(|r| r[0].as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(rows.len(), 4, "one row per submission: {rows:?}");
    assert_eq!(ids.len(), 4);
}

#[tokio::test]
async fn a_429_at_any_step_of_creating_a_spreadsheet_leaves_one_finished_spreadsheet() {
    let (google, base) = fake_google(0).await;
    let share_with = ["ops@example.org", "lead@example.org"];
    let config = json!({
        "sheet": "Responses", "share_with": share_with,
        "sheets_base_url": base, "drive_base_url": base,
    });
    let (mut stack, _, _, _creds) = sheets_task(EMAIL, &base, config.clone()).await;
    let mut config = config;
    config["credentials"] = json!({"secret": "google_sa"});

    for step in [
        "files.create",
        "spreadsheets.get",
        "batchUpdate",
        "values.update",
        "permissions.create",
        "files.update",
    ] {
        // A form of its own, whose spreadsheet does not exist yet.
        let form = Uuid::new_v4();
        stack.attach(form, "sheet", "google_sheets", "append_row", true, &config);
        let throttled = *google.throttled.lock().expect("lock");
        google.fail_next(step, 1);

        let mut submissions = Vec::new();
        for n in 0..3 {
            submissions.push(stack.process(form, json!({"answers": {"n": n}})).await.0);
        }
        for submission in &submissions {
            let runs = stack.settled(submission, Duration::from_secs(60)).await;
            assert_eq!(runs[0].state(), RunState::Succeeded, "{step}: {runs:?}");
            assert!(runs[0].attempts <= 2, "{step}: {runs:?}");
        }
        assert_eq!(
            *google.throttled.lock().expect("lock"),
            throttled + 1,
            "{step}: the 429 was answered"
        );

        let form = form.to_string();
        let created = google.created.lock().expect("lock").clone();
        let mine: Vec<_> = created
            .iter()
            .filter(|(_, (props, _))| {
                props
                    .as_object()
                    .into_iter()
                    .flatten()
                    .any(|(_, v)| v == &json!(form))
            })
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "{step}: one spreadsheet for the form: {mine:?}"
        );
        let (id, (props, shared)) = mine[0];
        assert_eq!(
            props,
            &json!({"daisy_form": form}),
            "{step}: tagged, no longer pending"
        );
        assert_eq!(shared, &share_with, "{step}");
        assert!(
            google.sheets_of(id).iter().any(|s| s == "Responses"),
            "{step}: {:?}",
            google.sheets_of(id)
        );
        assert_eq!(google.rows_of(id).len(), 3, "{step}");
        assert_eq!(
            google.header_of(id),
            [json!("submission_id"), json!("form_id"), json!("n")],
            "{step}"
        );
    }
}

#[tokio::test]
async fn a_spreadsheet_left_pending_is_finished_by_the_next_run_and_never_used_unfinished() {
    let (google, base) = fake_google(0).await;
    let (mut stack, form, task, _creds) = sheets_task(
        EMAIL,
        &base,
        json!({
            "sheet": "Responses", "share_with": ["ops@example.org"],
            "sheets_base_url": base, "drive_base_url": base,
        }),
    )
    .await;
    // The tagging fails (a 503, not a throttle) on the first run, which has
    // one attempt: it is dead, its spreadsheet left pending, without rows.
    stack.db.execute(&format!(
        "UPDATE tasks SET max_attempts = 1 WHERE id = '{task}'"
    ));
    google.break_next("files.update", 1);
    let (first, _) = stack.process(form, json!({"answers": {"n": 1}})).await;
    let runs = stack.settled(&first, Duration::from_secs(60)).await;
    assert_eq!(runs[0].state(), RunState::Dead, "{runs:?}");
    assert!(
        runs[0].last_error.contains("tagging"),
        "{}",
        runs[0].last_error
    );
    let created = google.created.lock().expect("lock").clone();
    let (id, (props, _)) = created.iter().next().expect("created");
    assert_eq!(props, &json!({"daisy_form_pending": form.to_string()}));
    assert!(google.rows_of(id).is_empty());

    let (second, _) = stack.process(form, json!({"answers": {"n": 2}})).await;
    let runs = stack.settled(&second, Duration::from_secs(60)).await;
    assert_eq!(runs[0].state(), RunState::Succeeded, "{runs:?}");
    let created = google.created.lock().expect("lock").clone();
    assert_eq!(
        created.len(),
        1,
        "the pending one was finished: {created:?}"
    );
    assert_eq!(created[id].0, json!({"daisy_form": form.to_string()}));
    assert_eq!(created[id].1, ["ops@example.org"]);
    assert_eq!(google.rows_of(id).len(), 1);
}

#[tokio::test]
async fn an_append_whose_reply_never_comes_says_the_row_may_have_been_written() {
    let (google, base) = fake_google(0).await;
    *google.slow_appends.lock().expect("lock") = 1;
    *google.slow_for.lock().expect("lock") = Duration::from_millis(2500);
    // The plugin gives up after 1 s, with one attempt allowed.
    let (mut stack, form, task, _creds) = sheets_task(
        EMAIL,
        &base,
        json!({"spreadsheet_id": "sheet-1", "sheets_base_url": base, "timeout_ms": 1000}),
    )
    .await;
    stack.db.execute(&format!(
        "UPDATE tasks SET max_attempts = 1 WHERE id = '{task}'"
    ));

    let (submission, _) = stack.process(form, json!({"answers": {"n": 1}})).await;
    let runs = stack.settled(&submission, Duration::from_secs(60)).await;

    assert_eq!(runs[0].state(), RunState::Dead, "{runs:?}");
    let error = &runs[0].last_error;
    assert!(
        error.contains("appending the row: Google did not answer in time")
            && error.contains("the row may have been written (a later attempt looks for it before appending again)"),
        "{error}"
    );
    assert_eq!(google.rows_of("sheet-1").len(), 1, "it was written");
}

/// Google's per-minute write quota, met by design: the task's rate limit
/// paces its runs across two workers, so the quota is never hit, no attempt
/// is used up by a 429, and every response is one row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_under_the_write_quota_drains_a_burst_with_no_429() {
    const QUOTA: usize = 10;
    // Twice the quota: unpaced, the burst would meet 429s within seconds;
    // paced at 8 a minute it takes three minutes (each spanning the quota's
    // window), which is as much of CI's time as the point needs.
    const SUBMISSIONS: usize = 2 * QUOTA;
    let (google, base) = fake_google(0).await;
    google.set_write_quota(QUOTA);
    let (mut stack, form, task, _creds) = sheets_task(
        EMAIL,
        &base,
        json!({"spreadsheet_id": "sheet-1", "sheets_base_url": base}),
    )
    .await;
    stack.add_worker();
    // Under the quota, as the README says: a run sometimes writes twice
    // (the header on the first), and a paced run may start a little late.
    stack.db.execute(&format!(
        "UPDATE tasks SET rate_per_minute = 8 WHERE id = '{task}'"
    ));
    let started = std::time::Instant::now();
    let mut submissions = Vec::new();
    for n in 0..SUBMISSIONS {
        submissions.push(stack.process(form, json!({"answers": {"n": n}})).await.0);
    }
    for submission in &submissions {
        let runs = stack.settled(submission, Duration::from_secs(900)).await;
        assert_eq!(runs[0].state(), RunState::Succeeded, "{runs:?}");
        assert_eq!(runs[0].attempts, 1, "no attempt used up: {runs:?}");
    }
    let drained = started.elapsed();
    let rows = google.rows_of("sheet-1");
    let mut ids: Vec<&Value> = rows.iter().map(|row| &row[0]).collect();
    ids.sort_by_key(|v| v.to_string());
    ids.dedup();
    assert_eq!(rows.len(), SUBMISSIONS, "one row per submission");
    assert_eq!(ids.len(), SUBMISSIONS, "no duplicate row");
    assert_eq!(
        *google.over_quota.lock().expect("lock"),
        0,
        "no 429 from the quota"
    );
    let most = google.most_writes_in_a_minute();
    assert!(most <= QUOTA, "{most} writes within one minute");
    eprintln!(
        "quota {QUOTA}/min, rate limit 8/min, 2 workers: {SUBMISSIONS} rows in {:.0} s, at most {most} writes in a minute, {} token exchanges",
        drained.as_secs_f64(),
        *google.exchanges.lock().expect("lock")
    );
}
