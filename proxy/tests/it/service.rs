//! The standard services beside PostSubProxy: health and reflection.

use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_serving() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    let server = TestServer::start(&db.url, plugins.path()).await;
    let mut health = HealthClient::new(server.channel().await);

    for service in ["", "daisy.v1.PostSubProxy"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health answers")
            .into_inner();
        assert_eq!(
            response.status(),
            ServingStatus::Serving,
            "service {service:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_describes_the_service_without_the_proto_file() {
    let db = TestDb::new();
    let plugins = PluginsDir::new();
    let server = TestServer::start(&db.url, plugins.path()).await;
    let mut reflection = ServerReflectionClient::new(server.channel().await);

    let requests = tokio_stream::iter([
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("daisy.v1.PostSubProxy".into()),
    ])
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut responses = reflection
        .server_reflection_info(requests)
        .await
        .expect("reflection answers")
        .into_inner();

    let Some(MessageResponse::ListServicesResponse(list)) = responses
        .next()
        .await
        .expect("a response")
        .expect("ok")
        .message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"daisy.v1.PostSubProxy"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    let Some(MessageResponse::FileDescriptorResponse(files)) = responses
        .next()
        .await
        .expect("a response")
        .expect("ok")
        .message_response
    else {
        panic!("expected a file descriptor");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}
