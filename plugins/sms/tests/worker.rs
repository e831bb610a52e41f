//! `sms` through the real loader and a worker, against a fake gateway on
//! loopback that checks requests the way Twilio's Messages API does.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::{
    Form, Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use proto::v1::RunState;
use serde_json::json;
use test_support::{SecretsDir, Stack};
use uuid::Uuid;

const ACCOUNT: &str = "AC0123456789abcdef";
const TOKEN: &str = "s3cret-token";

#[derive(Clone, Default)]
struct Gateway {
    sent: Arc<Mutex<Vec<HashMap<String, String>>>>,
    /// The day (UTC, `YYYY-MM-DD`) each message of `sent` was sent.
    sent_on: Arc<Mutex<Vec<String>>>,
    /// How many requests to answer 429 before accepting.
    throttle: Arc<Mutex<u32>>,
    /// How many sends to answer only after [`SLOW_REPLY`]: the message is
    /// recorded at once, so a client that gives up first lost the reply
    /// of a message that went out.
    slow_replies: Arc<Mutex<u32>>,
    /// The query of each message list request so far.
    lookups: Arc<Mutex<Vec<HashMap<String, String>>>>,
}

/// How late a slow reply comes: longer than the tests' `timeout_ms`.
const SLOW_REPLY: std::time::Duration = std::time::Duration::from_millis(2500);

/// Today in UTC as `YYYY-MM-DD` (days since the epoch to a civil date).
fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs()
        / 86_400;
    let z = days + 719_468;
    let (era, doe) = (z / 146_097, z % 146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Twilio's answer to a request without the account's credentials.
fn unauthenticated(account: &str, headers: &HeaderMap) -> Option<Response> {
    use base64::Engine;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT}:{TOKEN}"))
    );
    (account != ACCOUNT
        || headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&expected))
    .then(|| {
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({"code": 20003, "message": "Authenticate", "status": 401})),
        )
            .into_response()
    })
}

async fn messages(
    State(gateway): State<Gateway>,
    Path(account): Path<String>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Some(denied) = unauthenticated(&account, &headers) {
        return denied;
    }
    for field in ["To", "From", "Body"] {
        if form.get(field).is_none_or(|v| v.is_empty()) {
            return (StatusCode::BAD_REQUEST, Json(json!({"code": 21604, "message": format!("A '{field}' is required"), "status": 400}))).into_response();
        }
    }
    // Twilio quotes the number it refuses (555 numbers are fictional).
    let to = &form["To"];
    if to.starts_with("+1555") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": 21211, "message": format!("The 'To' number {to} is not a valid phone number."), "status": 400})),
        )
            .into_response();
    }
    {
        let mut throttle = gateway.throttle.lock().expect("lock");
        if *throttle > 0 {
            *throttle -= 1;
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "1")],
                Json(json!({"code": 20429, "message": "Too Many Requests", "status": 429})),
            )
                .into_response();
        }
    }
    let sid = {
        let mut sent = gateway.sent.lock().expect("lock");
        sent.push(form);
        gateway.sent_on.lock().expect("lock").push(today());
        format!("SM{}", sent.len())
    };
    let slow = {
        let mut slow = gateway.slow_replies.lock().expect("lock");
        let due = *slow > 0;
        *slow = slow.saturating_sub(1);
        due
    };
    if slow {
        tokio::time::sleep(SLOW_REPLY).await;
    }
    (
        StatusCode::CREATED,
        Json(json!({"sid": sid, "status": "queued"})),
    )
        .into_response()
}

/// `GET Messages.json`: the account's messages, newest first, filtered by
/// `To`, `From` and `DateSent>` (sent on or after that day) as Twilio does.
async fn list(
    State(gateway): State<Gateway>,
    Path(account): Path<String>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(denied) = unauthenticated(&account, &headers) {
        return denied;
    }
    gateway.lookups.lock().expect("lock").push(query.clone());
    let page_size = query
        .get("PageSize")
        .and_then(|n| n.parse().ok())
        .unwrap_or(50);
    let sent = gateway.sent.lock().expect("lock").clone();
    let sent_on = gateway.sent_on.lock().expect("lock").clone();
    let wanted = |key: &str, value: &str| query.get(key).is_none_or(|w| w == value);
    let messages: Vec<_> = sent
        .iter()
        .zip(&sent_on)
        .enumerate()
        .rev()
        .filter(|(_, (m, day))| {
            wanted("To", &m["To"])
                && wanted("From", &m["From"])
                && query
                    .get("DateSent>")
                    .is_none_or(|after| day.as_str() >= after.as_str())
        })
        .take(page_size)
        .map(|(i, (m, day))| {
            json!({
                "sid": format!("SM{}", i + 1), "to": m["To"], "from": m["From"], "body": m["Body"],
                "status": "delivered", "date_sent": day,
            })
        })
        .collect();
    Json(json!({"messages": messages, "page": 0, "page_size": page_size})).into_response()
}

async fn fake_gateway(gateway: Gateway) -> String {
    let app = Router::new()
        .route(
            "/2010-04-01/Accounts/{account}/Messages.json",
            post(messages).get(list),
        )
        .with_state(gateway);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn config(base_url: &str) -> serde_json::Value {
    json!({
        "base_url": base_url, "account_sid": ACCOUNT, "auth_token": {"secret": "twilio_token"},
        "from": "+15005550006", "phone_field": "phone",
        "template": "Thanks {name}! We received your rating of {rating}.",
    })
}

/// The sms task on a new form of a new Daisy stack against the gateway at
/// `base`: its config is [`config`] with `changes` over it, the gateway
/// token secret is `token`, and the processes log at `log` (`RUST_LOG`;
/// the test suite's level if `None`).
/// Returns (stack, form, task id, the secrets directory to keep alive).
async fn receipt_task(
    base: &str,
    token: &str,
    changes: serde_json::Value,
    log: Option<&str>,
) -> (Stack, Uuid, Uuid, SecretsDir) {
    let secrets = SecretsDir::new(&[("twilio_token", token)]);
    let mut env = vec![("DAISY_SECRETS_DIR", secrets.env_value())];
    env.extend(log.map(|level| ("RUST_LOG", level)));
    let stack = Stack::start(&[("sms", "sms")], &env).await;
    let mut config = config(base);
    for (key, value) in changes.as_object().into_iter().flatten() {
        config[key] = value.clone();
    }
    let form = Uuid::new_v4();
    let task = stack.attach(form, "receipt", "sms", "sms", true, &config);
    (stack, form, task, secrets)
}

#[tokio::test]
async fn a_receipt_is_sent_and_throttling_is_ridden_out() {
    let gateway = Gateway::default();
    *gateway.throttle.lock().expect("lock") = 2;
    let base = fake_gateway(gateway.clone()).await;
    let (mut stack, form, _, _secrets) = receipt_task(&base, TOKEN, json!({}), None).await;

    let (submission, _) = stack
        .process(
            form,
            json!({"answers": {"name": "Ada", "phone": "+44 7700 900123", "rating": 5}}),
        )
        .await;
    let runs = stack
        .settled(&submission, std::time::Duration::from_secs(60))
        .await;

    assert_eq!(runs[0].state(), RunState::Succeeded, "{runs:?}");
    // Two 429s with Retry-After, then accepted: throttles use no attempt.
    assert_eq!(
        *gateway.throttle.lock().expect("lock"),
        0,
        "both 429s were answered"
    );
    assert_eq!(runs[0].attempts, 1, "the 429s used no attempt: {runs:?}");
    // The output keeps the number masked too: it is stored with the run.
    let output = proto::json::value_to_json(runs[0].output.as_ref().expect("output"));
    assert_eq!(output["to"], "+44*******123");
    let sent = gateway.sent.lock().expect("lock").clone();
    assert_eq!(sent.len(), 1, "sent exactly once");
    assert_eq!(sent[0]["To"], "+447700900123");
    assert_eq!(sent[0]["From"], "+15005550006");
    assert_eq!(sent[0]["Body"], "Thanks Ada! We received your rating of 5.");
}

#[tokio::test]
async fn an_invalid_phone_number_is_dead_at_once_and_nothing_is_sent() {
    let gateway = Gateway::default();
    let base = fake_gateway(gateway.clone()).await;
    // Everything logged, to look for phone numbers in it.
    let (mut stack, form, _, _secrets) = receipt_task(&base, TOKEN, json!({}), Some("debug")).await;

    let (submission, _) = stack
        .process(
            form,
            json!({"answers": {"name": "Bob", "phone": "0770 0900", "rating": 2}}),
        )
        .await;
    let runs = stack
        .settled(&submission, std::time::Duration::from_secs(60))
        .await;

    assert_eq!(runs[0].state(), RunState::Dead);
    assert_eq!(runs[0].attempts, 1, "a permanent error is not retried");
    assert!(
        runs[0]
            .last_error
            .contains("invalid phone number '**** *900' in answer 'phone'"),
        "{}",
        runs[0].last_error
    );
    assert!(gateway.sent.lock().expect("lock").is_empty());

    // A number the gateway refuses, quoting it: the run's error masks it.
    let (submission, _) = stack
        .process(
            form,
            json!({"answers": {"name": "Di", "phone": "+1 555 555 0100", "rating": 3}}),
        )
        .await;
    let runs = stack
        .settled(&submission, std::time::Duration::from_secs(60))
        .await;
    assert_eq!(runs[0].state(), RunState::Dead);
    let error = &runs[0].last_error;
    assert!(
        error.contains("21211") && error.contains("+15******100"),
        "{error}"
    );
    assert!(
        !error.contains("5550100"),
        "a full number in last_error: {error}"
    );
    let logs = stack.logs();
    assert!(logs.contains("run is dead"), "the worker's log: {logs}");
    for full in ["0770 0900", "07700900", "555 555 0100", "5555550100"] {
        assert!(!logs.contains(full), "{full} in the logs:\n{logs}");
    }
}

#[tokio::test]
async fn wrong_credentials_are_a_permanent_error_with_the_gateways_message() {
    let base = fake_gateway(Gateway::default()).await;
    let (mut stack, form, _, _secrets) = receipt_task(&base, "wrong", json!({}), None).await;

    let (submission, _) = stack
        .process(
            form,
            json!({"answers": {"name": "Cy", "phone": "+14155550100", "rating": 4}}),
        )
        .await;
    let runs = stack
        .settled(&submission, std::time::Duration::from_secs(60))
        .await;

    assert_eq!(runs[0].state(), RunState::Dead);
    assert!(
        runs[0].last_error.contains("401") && runs[0].last_error.contains("Authenticate"),
        "{}",
        runs[0].last_error
    );
    assert!(
        !runs[0].last_error.contains("wrong"),
        "the token never shows in errors"
    );
}

#[tokio::test]
async fn replies_slower_than_the_timeout_are_looked_up_and_no_text_is_sent_twice() {
    let gateway = Gateway::default();
    *gateway.slow_replies.lock().expect("lock") = 3;
    let base = fake_gateway(gateway.clone()).await;
    // The gateway's reply comes 2.5 s late; the task gives up after 1 s.
    let (mut stack, form, _, _secrets) =
        receipt_task(&base, TOKEN, json!({"timeout_ms": 1000}), None).await;

    let people = [
        ("Ada", "+447700900121"),
        ("Bo", "+447700900122"),
        ("Cy", "+447700900123"),
        ("Di", "+447700900124"),
    ];
    let mut submissions = Vec::new();
    for (name, phone) in people {
        let answers = json!({"answers": {"name": name, "phone": phone, "rating": 4}});
        submissions.push(stack.process(form, answers).await.0);
    }
    let mut looked_up = 0;
    for submission in &submissions {
        let runs = stack
            .settled(submission, std::time::Duration::from_secs(60))
            .await;
        assert_eq!(runs[0].state(), RunState::Succeeded, "{runs:?}");
        for (_, phone) in people {
            assert!(
                !runs[0].last_error.contains(&phone[1..]),
                "a full number in last_error: {}",
                runs[0].last_error
            );
        }
        let output = proto::json::value_to_json(runs[0].output.as_ref().expect("output"));
        assert!(
            output["to"].as_str().is_some_and(|to| to.contains('*')),
            "{output}"
        );
        if runs[0].attempts > 1 {
            looked_up += 1;
            assert_eq!(output["already_sent"], true, "{output}");
            assert!(
                output["sid"]
                    .as_str()
                    .is_some_and(|sid| sid.starts_with("SM")),
                "{output}"
            );
        }
    }
    assert_eq!(
        looked_up, 3,
        "the three slow sends timed out and were looked up"
    );
    let lookups = gateway.lookups.lock().expect("lock").clone();
    assert_eq!(lookups.len(), 3, "only later attempts look: {lookups:?}");
    for lookup in &lookups {
        assert!(
            people.iter().any(|(_, phone)| lookup["To"] == *phone),
            "{lookup:?}"
        );
        assert_eq!(lookup["From"], "+15005550006");
        assert_eq!(lookup["DateSent>"], today());
        assert_eq!(lookup["PageSize"], "50");
    }
    let sent = gateway.sent.lock().expect("lock").clone();
    let mut to: Vec<&str> = sent.iter().map(|m| m["To"].as_str()).collect();
    to.sort_unstable();
    assert_eq!(
        to,
        people.map(|(_, phone)| phone),
        "one text per submission, none twice"
    );
}

#[tokio::test]
async fn a_run_dead_after_a_lost_reply_says_the_text_may_have_been_delivered() {
    let gateway = Gateway::default();
    *gateway.slow_replies.lock().expect("lock") = 1;
    let base = fake_gateway(gateway.clone()).await;
    let (mut stack, form, task, _secrets) =
        receipt_task(&base, TOKEN, json!({"timeout_ms": 1000}), Some("debug")).await;
    // One attempt only: the lost reply is the run's last word.
    stack.db.execute(&format!(
        "UPDATE tasks SET max_attempts = 1 WHERE id = '{task}'"
    ));

    let (submission, _) = stack
        .process(
            form,
            json!({"answers": {"name": "Ed", "phone": "+447700900125", "rating": 1}}),
        )
        .await;
    let runs = stack
        .settled(&submission, std::time::Duration::from_secs(60))
        .await;

    assert_eq!(runs[0].state(), RunState::Dead, "{runs:?}");
    let error = &runs[0].last_error;
    assert!(
        error.contains("did not answer in time")
            && error.contains("the message may have been delivered"),
        "{error}"
    );
    assert!(
        !error.contains("7700900125"),
        "a full number in last_error: {error}"
    );
    let logs = stack.logs();
    assert!(
        logs.contains("may have been delivered"),
        "the worker's log: {logs}"
    );
    assert!(
        !logs.contains("7700900125"),
        "a full number in the logs:\n{logs}"
    );
    assert_eq!(
        gateway.sent.lock().expect("lock").len(),
        1,
        "the gateway did take it"
    );
}
