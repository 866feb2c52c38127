//! Structured logs with `tracing` always (`RUST_LOG` filters, default
//! `info`; `STAMPEDE_LOG_FORMAT=json` for one JSON object per line), and
//! OpenTelemetry traces exported over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! Trace context travels as W3C `traceparent`: in gRPC metadata and HTTP
//! headers coming in, and in every queue message (an AMQP header, a column
//! of the embedded queue), so one trace runs from `Publish` through fanout
//! to every delivery attempt, retries included (each retry is published
//! inside the attempt before it, so it is that attempt's child).
use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber once; later calls do nothing. Call it
/// inside the Tokio runtime: the trace exporter runs on it.
pub fn init() {
    init_for("stampede", "info,tokio_postgres=warn");
}

/// [`init`] with another filter when `RUST_LOG` is unset.
pub fn init_with_default(default: &str) {
    init_for("stampede", default);
}

/// [`init`] naming the service traces come from (`OTEL_SERVICE_NAME` wins).
pub fn init_for(service: &str, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("STAMPEDE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.compact().boxed()
    };
    let otel = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .and_then(|endpoint| match otlp_provider(&endpoint, service) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("warning: OTEL_EXPORTER_OTLP_ENDPOINT: traces not exported: {e}");
                None
            }
        });
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
    match otel {
        Some(provider) => {
            let tracer = provider.tracer("stampede");
            let _ = PROVIDER.set(provider);
            let _ = registry
                .with(tracing_opentelemetry::layer().with_tracer(tracer))
                .try_init();
        }
        None => {
            let _ = registry.try_init();
        }
    }
}

/// A tracer provider exporting to `endpoint` in batches on the runtime.
fn otlp_provider(endpoint: &str, service: &str) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig;
    // The batch processor runs on the Tokio runtime: it needs one.
    if tokio::runtime::Handle::try_current().is_err() {
        return Err("no Tokio runtime to export from".into());
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| e.to_string())?;
    let batch =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batch)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(
                    std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_string()),
                )
                .build(),
        )
        .build())
}

/// Flushes and stops the exporter (at shutdown).
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.force_flush();
        let _ = p.shutdown();
    }
}

pub use stampede_backends::trace::current_traceparent;

/// The current trace context as the queue messages' `TraceContext`.
pub fn current_trace_context() -> Option<stampede_proto::queue::TraceContext> {
    current_traceparent().map(|traceparent| stampede_proto::queue::TraceContext {
        traceparent,
        tracestate: String::new(),
    })
}

/// Makes `span` a child of the remote context in `traceparent` (a queue
/// message's, a request's). Nothing happens when it is absent or invalid.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent else { return };
    let carrier = HashMap::from([("traceparent".to_string(), tp.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}
