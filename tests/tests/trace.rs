//! One trace from `Publish` to every delivery, across the real RabbitMQ:
//! spans are collected by an in-process exporter (its own test binary, so
//! its global subscriber sees only this test's services).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "e2e/helpers.rs"]
#[allow(dead_code)]
mod helpers;

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use stampede_core::activity::public_note;
use stampede_sink::{Sink, SinkOptions};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use helpers::{spawn_app, wait_for, AppOptions, Backend};

fn attr(s: &SpanData, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publish_to_three_servers_is_one_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .init();

    let app = spawn_app(Backend::External, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions {
        servers: 3,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let alice = app.create_actor("alice").await;
    let followers: Vec<_> = (0..3).map(|i| sink.actor(i, "f").unwrap()).collect();
    app.seed_followers(alice, &followers).await;
    let actor_id = format!("{}/users/alice", app.http_base);
    let published = app
        .publish("alice", &public_note(&actor_id, "traced"), "")
        .await
        .unwrap();
    wait_for("three deliveries", Duration::from_secs(30), || async {
        sink.total_received() == 3
    })
    .await;
    // The deliver spans close after the delivery is recorded.
    tokio::time::sleep(Duration::from_millis(500)).await;
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();

    let publish = spans
        .iter()
        .find(|s| {
            s.name == "publish"
                && attr(s, "activity_id").as_deref() == Some(published.activity_id.as_str())
        })
        .expect("the publish span");
    let trace = publish.span_context.trace_id();
    let in_trace: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect();
    let by_id: HashMap<SpanId, &SpanData> = in_trace
        .iter()
        .map(|s| (s.span_context.span_id(), *s))
        .collect();
    let fanout = in_trace
        .iter()
        .find(|s| s.name == "consume" && attr(s, "queue").as_deref() == Some("fanout"))
        .expect("the fanout span in the publish's trace");
    assert_eq!(fanout.parent_span_id, publish.span_context.span_id());
    let delivers: Vec<&&SpanData> = in_trace
        .iter()
        .filter(|s| s.name == "deliver" && attr(s, "outcome").as_deref() == Some("delivered"))
        .collect();
    assert_eq!(delivers.len(), 3, "{in_trace:#?}");
    let mut hosts: Vec<String> = delivers
        .iter()
        .map(|d| attr(d, "inbox_host").unwrap())
        .collect();
    hosts.sort();
    hosts.dedup();
    assert_eq!(hosts.len(), 3);
    for d in delivers {
        assert_eq!(
            attr(d, "activity_id").as_deref(),
            Some(published.activity_id.as_str())
        );
        assert_eq!(attr(d, "attempt").as_deref(), Some("0"));
        // deliver → consume(delivery) → … → consume(fanout) → publish.
        let consume = by_id[&d.parent_span_id];
        assert_eq!(consume.name, "consume");
        assert_eq!(attr(consume, "queue").as_deref(), Some("delivery"));
        let mut up = consume.parent_span_id;
        let mut via_fanout = false;
        while let Some(s) = by_id.get(&up) {
            via_fanout |= s.span_context.span_id() == fanout.span_context.span_id();
            up = s.parent_span_id;
        }
        assert!(via_fanout, "a delivery span not under the fanout span");
    }

    // Inbound: the POST, its verification and the Accept it causes are one trace.
    assert_eq!(sink.follow(0, "bob", &actor_id).await.unwrap().status, 202);
    wait_for("the Accept", Duration::from_secs(30), || async {
        sink.received(0).iter().any(|r| r.body["type"] == "Accept")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let receive = spans
        .iter()
        .find(|s| s.name == "inbox.receive")
        .expect("the inbound POST's span");
    let trace = receive.span_context.trace_id();
    let verify = spans
        .iter()
        .find(|s| {
            s.span_context.trace_id() == trace
                && s.name == "consume"
                && attr(s, "queue").as_deref() == Some("inbound")
        })
        .expect("verification in the POST's trace");
    assert_eq!(verify.parent_span_id, receive.span_context.span_id());
    assert!(
        spans.iter().any(|s| s.span_context.trace_id() == trace
            && s.name == "deliver"
            && attr(s, "activity_type").as_deref() == Some("Accept")),
        "the Accept's delivery in the same trace"
    );
    app.stop().await;
}
