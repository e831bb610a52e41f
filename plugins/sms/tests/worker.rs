//! `sms` through the real loader and a worker, against a fake gateway on
//! loopback that checks requests the way Twilio's Messages API does.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::{
    Form, Json, Router,
    extract::{Path, State},
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
    /// How many requests to answer 429 before accepting.
    throttle: Arc<Mutex<u32>>,
}

async fn messages(
    State(gateway): State<Gateway>,
    Path(account): Path<String>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    use base64::Engine;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT}:{TOKEN}"))
    );
    if account != ACCOUNT
        || headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&expected)
    {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"code": 20003, "message": "Authenticate", "status": 401})),
        )
            .into_response();
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
    let mut sent = gateway.sent.lock().expect("lock");
    sent.push(form);
    (
        StatusCode::CREATED,
        Json(json!({"sid": format!("SM{}", sent.len()), "status": "queued"})),
    )
        .into_response()
}

async fn fake_gateway(gateway: Gateway) -> String {
    let app = Router::new()
        .route(
            "/2010-04-01/Accounts/{account}/Messages.json",
            post(messages),
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

#[tokio::test]
async fn a_receipt_is_sent_and_throttling_is_ridden_out() {
    let gateway = Gateway::default();
    *gateway.throttle.lock().expect("lock") = 2;
    let base = fake_gateway(gateway.clone()).await;
    let secrets = SecretsDir::new(&[("twilio_token", TOKEN)]);
    let mut stack = Stack::start(
        &[("sms", "sms")],
        &[("DAISY_SECRETS_DIR", secrets.env_value())],
    )
    .await;
    let form = Uuid::new_v4();
    stack.attach(form, "receipt", "sms", "sms", true, &config(&base));

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
    assert_eq!(runs[0].attempts, 3, "two 429s, then accepted");
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
    let secrets = SecretsDir::new(&[("twilio_token", TOKEN)]);
    let mut stack = Stack::start(
        &[("sms", "sms")],
        &[("DAISY_SECRETS_DIR", secrets.env_value())],
    )
    .await;
    let form = Uuid::new_v4();
    stack.attach(form, "receipt", "sms", "sms", true, &config(&base));

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
}

#[tokio::test]
async fn wrong_credentials_are_a_permanent_error_with_the_gateways_message() {
    let base = fake_gateway(Gateway::default()).await;
    let secrets = SecretsDir::new(&[("twilio_token", "wrong")]);
    let mut stack = Stack::start(
        &[("sms", "sms")],
        &[("DAISY_SECRETS_DIR", secrets.env_value())],
    )
    .await;
    let form = Uuid::new_v4();
    stack.attach(form, "receipt", "sms", "sms", true, &config(&base));

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
