//! Distributed traces: W3C trace context in and out, and the optional OTLP
//! export (`--otlp-endpoint`).
//!
//! A `Process` call continues the trace of the backend's `traceparent`
//! (gRPC metadata); an asynchronous run stores its `Process` span's context
//! with the run and carries it in its AMQP message's headers, and the
//! worker's run span is that span's child. Without `--otlp-endpoint` no
//! span is exported, and a run stores the caller's `traceparent` as it came.

use std::{collections::HashMap, sync::OnceLock};

use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The metadata key and AMQP header of the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The exporting provider and the runtime its gRPC client lives on.
static EXPORT: OnceLock<(SdkTracerProvider, tokio::runtime::Runtime)> = OnceLock::new();

/// A tracing layer exporting spans to the OTLP/gRPC collector at
/// `endpoint`, as service `service` (`daisy-serve`, `daisy-worker`).
pub fn otlp_layer<S>(
    endpoint: &str,
    service: &str,
) -> anyhow::Result<impl tracing_subscriber::Layer<S> + use<S>>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use opentelemetry_otlp::WithExportConfig;
    // The exporter's client needs a Tokio runtime of its own: the
    // commands build theirs after logging is set up, and it must outlive
    // them to flush at exit.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp")
        .enable_all()
        .build()?;
    let exporter = {
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build();
    let tracer = provider.tracer("daisy");
    let _ = EXPORT.set((provider, runtime));
    Ok(tracing_opentelemetry::layer().with_tracer(tracer))
}

/// Exports what is left; call once, before the process exits.
pub fn shutdown() {
    if let Some((provider, _)) = EXPORT.get() {
        if let Err(err) = provider.shutdown() {
            eprintln!("exporting the last spans failed: {err}");
        }
    }
}

/// `span`'s trace context as a `traceparent` value, if it has one.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut fields = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut fields);
    fields.remove(TRACEPARENT)
}

/// Makes `span` a child of the span `traceparent` names; an invalid value
/// is ignored (the span starts a trace of its own).
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    let fields = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&fields);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// Whether `value` is a well-formed `traceparent` (stored and forwarded
/// only then).
pub fn is_traceparent(value: &str) -> bool {
    let fields = HashMap::from([(TRACEPARENT.to_owned(), value.to_owned())]);
    TraceContextPropagator::new()
        .extract(&fields)
        .span()
        .span_context()
        .is_valid()
}
