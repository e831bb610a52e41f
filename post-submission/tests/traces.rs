//! One trace from the backend's submit through `daisy serve` to the worker
//! that runs the asynchronous task, received by an OTLP collector running
//! inside the test (a tonic server implementing the collector's
//! TraceService).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value,
};
use post_submission::{DaisyClient, Stored};
use serde_json::json;
use test_support::{Daisy, PluginsDir, TestDb, TestQueue, free_port};
use tracing_subscriber::{Layer, layer::SubscriberExt, util::SubscriberInitExt};
use uuid::Uuid;

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Collected {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    span_id: Vec<u8>,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Collected>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().expect("lock");
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Collected {
                        service: service.clone(),
                        name: span.name,
                        trace_id: span.trace_id,
                        parent_span_id: span.parent_span_id,
                        span_id: span.span_id,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves the collector on a free loopback port; returns its endpoint.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<Collected> {
        self.0.lock().expect("lock").clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_backend_through_serve_to_the_worker() {
    let collector = Collector::default();
    let endpoint = collector.start().await;

    // The backend exports its own spans, as a traced backend does.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&endpoint)
        .build()
        .expect("an OTLP exporter");
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("collect")
                .build(),
        )
        .build();
    // Only the backend's own spans (not h2's, nor the exporter's).
    let backend_only = tracing_subscriber::filter::Targets::new()
        .with_target("post_submission", tracing::Level::INFO);
    tracing_subscriber::registry()
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("collect"))
                .with_filter(backend_only),
        )
        .init();

    // Daisy: serve and a worker, both exporting to the collector, quickly.
    let (db, plugins, queue) = (TestDb::daisy(), PluginsDir::new(), TestQueue::new());
    plugins.install("testkit", "testkit");
    let form = Uuid::new_v4();
    db.execute(&format!(
        "INSERT INTO tasks (id, form_id, name, module, func, async_status, config) VALUES \
         (gen_random_uuid(), '{form}', 'check', 'testkit', 'echo', false, '{{}}'), \
         (gen_random_uuid(), '{form}', 'archive', 'testkit', 'config', true, '{{}}')"
    ));
    let otlp = ["--otlp-endpoint", endpoint.as_str()];
    let addr = free_port();
    let _serve = Daisy::serve_with(addr, &db.url, plugins.path(), &queue, &queue.url, &otlp);
    let _worker = Daisy::worker(&db.url, plugins.path(), &queue, &queue.url, &otlp);

    let client = DaisyClient::connect_lazy(&format!("http://{addr}"), Duration::from_secs(5))
        .expect("client");
    let submission = Uuid::new_v4();
    let stored = Stored {
        form_id: form,
        submission_id: submission,
        submission: json!({"name": "Ada"}),
        context: None,
    };
    let started = Instant::now();
    let done = loop {
        match client.process(&stored, Duration::from_secs(5)).await {
            Ok(done) => break done,
            Err(err) => {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "serve never answered: {err}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(done["status"], "done", "{done}");
    let _ = provider.force_flush();

    // The backend's call, serve's Process and the worker's run: one trace.
    let started = Instant::now();
    loop {
        let spans = collector.spans();
        let call = spans
            .iter()
            .rev()
            .find(|s| s.service == "collect" && s.name == "daisy.process");
        if let Some(call) = call {
            let same_trace = |service: &str, name: &str| {
                spans
                    .iter()
                    .find(|s| s.service == service && s.name == name && s.trace_id == call.trace_id)
            };
            if let (Some(process), Some(delivery)) = (
                same_trace("daisy-serve", "process"),
                same_trace("daisy-worker", "delivery"),
            ) {
                assert_eq!(
                    process.parent_span_id, call.span_id,
                    "Process continues the call"
                );
                assert!(!delivery.parent_span_id.is_empty(), "{delivery:?}");
                assert!(
                    spans
                        .iter()
                        .any(|s| s.span_id == delivery.parent_span_id && s.service == "daisy-serve"),
                    "the worker's run is a child of a span of the Process that accepted it: {spans:#?}"
                );
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no single trace across collect, daisy-serve and daisy-worker: {spans:#?}"
        );
        let _ = provider.force_flush();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
