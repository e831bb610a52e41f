//! Bad requests get the contract's status codes, and the service keeps serving.

use proto::v1::ProcessRequest;
use serde_json::json;
use tonic::Code;
use uuid::Uuid;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_statuses_and_the_service_keeps_serving() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    plugins.install("echo", "echo");
    let form = Uuid::new_v4();
    db.attach(form, "echo", "echo", "echo", json!({}));
    let server = TestServer::start(&db.url, plugins.path()).await;
    let mut client = server.client().await;
    let good = request(form, sample());

    let cases = [
        (
            ProcessRequest {
                form_id: "not-a-uuid".into(),
                ..good.clone()
            },
            Code::InvalidArgument,
            "form_id",
        ),
        (
            ProcessRequest {
                form_id: String::new(),
                ..good.clone()
            },
            Code::InvalidArgument,
            "form_id",
        ),
        (
            ProcessRequest {
                submission_id: "42".into(),
                ..good.clone()
            },
            Code::InvalidArgument,
            "submission_id",
        ),
        (
            ProcessRequest {
                submission: None,
                ..good.clone()
            },
            Code::InvalidArgument,
            "submission",
        ),
    ];
    for (bad, code, field) in cases {
        let status = client.process(bad).await.expect_err("refused");
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(field),
            "{status:?} should name {field}"
        );
    }

    // The test server's limit is 64 KiB.
    let huge = request(form, json!({ "blob": "x".repeat(100 * 1024) }));
    let status = client.process(huge).await.expect_err("refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    let response = client
        .process(good)
        .await
        .expect("still serving")
        .into_inner();
    assert_eq!(response.results.len(), 1);
}
