//! `/metrics` after a known run shows exactly its counts.
use std::time::Duration;

use stampede_core::activity::public_note;
use stampede_sink::{Behavior, Sink, SinkOptions};

use crate::helpers::{spawn_app, wait_for, AppOptions, Backend};

async fn a_known_run_shows_exactly_its_counts(backend: Backend) {
    let app = spawn_app(backend, AppOptions::default()).await;
    // Five servers that accept, two that answer 404 (a permanent failure).
    let sink = Sink::start(SinkOptions {
        servers: 7,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    sink.set_behavior(5, Behavior::Status(404)).unwrap();
    sink.set_behavior(6, Behavior::Status(404)).unwrap();
    let alice = app.create_actor("alice").await;
    let followers: Vec<_> = (0..7).map(|i| sink.actor(i, "f").unwrap()).collect();
    app.seed_followers(alice, &followers).await;
    let actor_id = format!("{}/users/alice", app.http_base);
    app.publish("alice", &public_note(&actor_id, "counted"), "")
        .await
        .unwrap();
    let count = |outcome: &'static str| {
        let app = &app;
        async move {
            app.metric(
                "delivery",
                "stampede_deliveries_total",
                &format!("outcome=\"{outcome}\""),
            )
            .await
        }
    };
    wait_for("seven outcomes", Duration::from_secs(30), || async {
        count("delivered").await + count("failed").await == 7
    })
    .await;
    assert_eq!(count("delivered").await, 5);
    assert_eq!(count("failed").await, 2);
    assert_eq!(count("retry").await, 0);
    assert_eq!(
        app.metric("delivery", "stampede_delivery_duration_seconds_count", "")
            .await,
        7
    );
    assert_eq!(
        app.metric("fanout", "stampede_fanout_targets_count", "")
            .await,
        1
    );
    assert_eq!(
        app.metric("fanout", "stampede_fanout_targets_sum", "")
            .await,
        7
    );
    assert_eq!(
        app.metric("ingest", "stampede_published_activities_total", "")
            .await,
        1
    );
    assert_eq!(
        app.store.dead_letters(10, None).await.unwrap().len(),
        2,
        "the failures are dead letters"
    );
    let text = app.metrics_text("delivery").await;
    for name in [
        "stampede_queue_oldest_message_age_seconds{queue=\"delivery\"}",
        "stampede_delivery_in_flight{host_class=\"normal\"} 0",
        "# TYPE stampede_queue_messages gauge",
        "# TYPE stampede_hosts_failing gauge",
        "# TYPE stampede_delivery_parked gauge",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    app.stop().await;
}

crate::both_backends!(a_known_run_shows_exactly_its_counts);
