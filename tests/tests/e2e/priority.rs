//! Priority classes: an Accept and a DM overtake a large fanout to slow
//! hosts; retries drop to the bulk class; a bulk fanout over the bulk
//! queue's bound is put back and resumes where it stopped, nothing lost and
//! nothing sent twice.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use stampede_backends::queue::{ready_messages, QueueName};
use stampede_backends::store::Follower;
use stampede_core::activity::public_note;
use stampede_sink::{Behavior, Sink, SinkOptions};

use crate::helpers::{spawn_app, wait_for, AppOptions, Backend, TestApp};

/// `n` followers of `actor` spread over the sink's servers, each with an
/// inbox of its own (no shared inbox: one delivery each).
async fn seed_spread(app: &TestApp, actor: i64, sink: &Sink, n: usize) {
    let followers: Vec<Follower> = (0..n)
        .map(|k| {
            let a = sink.actor(k % sink.len(), &format!("f{k}")).unwrap();
            Follower {
                actor: a.id,
                inbox: a.inbox,
                shared_inbox: None,
                host: a.host,
                follow_id: None,
            }
        })
        .collect();
    for chunk in followers.chunks(2000) {
        app.store.add_followers(actor, chunk).await.unwrap();
    }
}

/// When the first POST of `kind` reached server `i`.
fn arrived(sink: &Sink, i: usize, kind: &str) -> Option<Instant> {
    sink.received(i)
        .iter()
        .find(|r| r.body["type"] == kind && (200..300).contains(&r.status))
        .map(|r| r.at)
}

async fn an_accept_and_a_dm_overtake_a_20000_follower_fanout_to_slow_hosts(backend: Backend) {
    let app = spawn_app(backend, AppOptions::default()).await;
    // 20 servers answering in 2 s, 1,000 followers each: at the default
    // prefetch of 128 that is more than two minutes of bulk work.
    let slow = Sink::start(SinkOptions {
        servers: 20,
        shared_inbox: Arc::new(|_| false),
        count_only: true,
        verify_every: 0,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    for i in 0..slow.len() {
        slow.set_behavior(i, Behavior::Slow(Duration::from_secs(2)))
            .unwrap();
    }
    let fast = Sink::start(SinkOptions::default()).await.unwrap();
    let alice = app.create_actor("alice").await;
    seed_spread(&app, alice, &slow, 20_000).await;
    let alice_id = format!("{}/users/alice", app.http_base);
    app.publish("alice", &public_note(&alice_id, "to everyone"), "")
        .await
        .unwrap();
    // The fanout queued and the slow hosts hold the worker's slots.
    wait_for(
        "the bulk queue filled and slow deliveries under way",
        Duration::from_secs(60),
        || async {
            ready_messages(&*app.queue, QueueName::DeliveryBulk)
                .await
                .unwrap()
                > 10_000
                && app
                    .metric(
                        "delivery",
                        "stampede_queue_consumed_messages_total",
                        "queue=\"delivery.bulk\"",
                    )
                    .await
                    >= 128
        },
    )
    .await;
    // Remember the fast server's actor (a DM resolves its recipient).
    let dana = fast.actor(0, "dana").unwrap();
    let started = Instant::now();
    let dm = json!({
        "type": "Create",
        "to": [dana.id],
        "object": {"type": "Note", "content": "psst", "to": [dana.id]}
    });
    let (published, followed) = tokio::join!(
        app.publish("alice", &dm, ""),
        fast.follow(0, "finn", &alice_id)
    );
    published.unwrap();
    assert_eq!(followed.unwrap().status, 202);
    wait_for("the DM and the Accept", Duration::from_secs(30), || async {
        arrived(&fast, 0, "Create").is_some() && arrived(&fast, 0, "Accept").is_some()
    })
    .await;
    let dm_after = arrived(&fast, 0, "Create").unwrap() - started;
    let accept_after = arrived(&fast, 0, "Accept").unwrap() - started;
    let bulk_left = ready_messages(&*app.queue, QueueName::DeliveryBulk)
        .await
        .unwrap();
    eprintln!("dm after {dm_after:?}, accept after {accept_after:?}, {bulk_left} bulk jobs ready");
    assert!(
        bulk_left > 5_000,
        "the fanout drained ({bulk_left} left): the test proves nothing"
    );
    assert!(
        dm_after <= Duration::from_secs(2),
        "the DM took {dm_after:?} behind {bulk_left} bulk jobs"
    );
    assert!(
        accept_after <= Duration::from_secs(2),
        "the Accept took {accept_after:?} behind {bulk_left} bulk jobs"
    );
    // Status shows the classes: a deep bulk queue, an old head.
    let status = app
        .admin()
        .status(stampede_proto::api::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let bulk = status
        .queues
        .iter()
        .find(|q| q.class == "bulk")
        .expect("the bulk queue in status");
    assert!(bulk.queue.ends_with(".delivery.bulk") && bulk.messages > 0);
    for class in ["interactive", "normal"] {
        assert!(status.queues.iter().any(|q| q.class == class), "{class}");
    }
    wait_for(
        "the bulk head's age reported",
        Duration::from_secs(10),
        || {
            let admin = app.admin();
            async move {
                let s = admin
                    .clone()
                    .status(stampede_proto::api::StatusRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                s.queues
                    .iter()
                    .any(|q| q.class == "bulk" && q.head_age_ms > 0)
            }
        },
    )
    .await;
    slow.shutdown();
    fast.shutdown();
    app.stop().await;
}

async fn a_retry_drops_to_the_bulk_class(backend: Backend) {
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![("STAMPEDE_RETRY_SCHEDULE_SECS", "1,1,1".into())],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    app.create_actor("alice").await;
    let bob = sink.actor(0, "bob").unwrap();
    sink.set_behavior(0, Behavior::Status(503)).unwrap();
    let dm = json!({
        "type": "Create",
        "to": [bob.id],
        "object": {"type": "Note", "content": "hello", "to": [bob.id]}
    });
    app.publish("alice", &dm, "").await.unwrap();
    wait_for("the first attempt", Duration::from_secs(20), || async {
        sink.received(0).iter().any(|r| r.body["type"] == "Create")
    })
    .await;
    sink.set_behavior(0, Behavior::Ok).unwrap();
    wait_for("the retry delivered", Duration::from_secs(30), || async {
        arrived(&sink, 0, "Create").is_some()
    })
    .await;
    let consumed = |queue: &'static str| {
        let app = &app;
        async move {
            app.metric(
                "delivery",
                "stampede_queue_consumed_messages_total",
                &format!("queue=\"{queue}\""),
            )
            .await
        }
    };
    // The DM's first try was interactive; its retry came from bulk.
    assert_eq!(consumed("delivery.interactive").await, 1);
    assert!(consumed("delivery.bulk").await >= 1);
    assert_eq!(consumed("delivery").await, 0);
    assert_eq!(
        app.metric(
            "fanout",
            "stampede_fanout_activities_total",
            "class=\"interactive\""
        )
        .await,
        1
    );
    sink.shutdown();
    app.stop().await;
}

async fn a_fanout_over_the_bulk_bound_pauses_and_resumes_losing_and_repeating_nothing(
    backend: Backend,
) {
    let bound = 300u64;
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![
                ("STAMPEDE_BULK_AUDIENCE", "100".into()),
                ("STAMPEDE_BULK_QUEUE_BOUND", bound.to_string()),
                ("STAMPEDE_PREFETCH", "16".into()),
            ],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions {
        servers: 10,
        shared_inbox: Arc::new(|_| false),
        count_only: true,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let followers = 1500;
    let alice = app.create_actor("alice").await;
    seed_spread(&app, alice, &sink, followers).await;
    // Watch the bulk queue's depth the whole time.
    let deepest = Arc::new(AtomicU64::new(0));
    let watching = tokio_util::sync::CancellationToken::new();
    let watcher = {
        let (q, deepest, watching) = (app.queue.clone(), deepest.clone(), watching.clone());
        tokio::spawn(async move {
            while !watching.is_cancelled() {
                if let Ok(n) = ready_messages(&*q, QueueName::DeliveryBulk).await {
                    deepest.fetch_max(n, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let alice_id = format!("{}/users/alice", app.http_base);
    let r = app
        .publish("alice", &public_note(&alice_id, "to many"), "")
        .await
        .unwrap();
    let copies = || {
        (0..sink.len())
            .flat_map(|i| sink.accepted_copies(i).into_iter())
            .collect::<Vec<_>>()
    };
    wait_for(
        "every follower's copy",
        Duration::from_secs(120),
        || async { copies().len() == followers },
    )
    .await;
    // Late duplicates would show now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    watching.cancel();
    watcher.await.unwrap();
    let all = copies();
    assert_eq!(all.len(), followers, "one inbox each");
    for ((path, id), n) in &all {
        assert_eq!(*n, 1, "{path} got {id} {n} times");
        assert_eq!(id, &r.activity_id);
    }
    let paused = app
        .metric("fanout", "stampede_fanout_paused_total", "")
        .await;
    assert!(paused >= 1, "the fanout never paused");
    let deepest = deepest.load(Ordering::SeqCst);
    assert!(
        deepest <= 2 * bound,
        "the bulk queue reached {deepest} ready jobs, bound {bound}"
    );
    // The activity's recorded target count covers every run of its fanout.
    let stored = app.store.totals().await.unwrap();
    assert_eq!(stored.delivered, followers as u64);
    sink.shutdown();
    app.stop().await;
}

crate::both_backends!(
    an_accept_and_a_dm_overtake_a_20000_follower_fanout_to_slow_hosts,
    a_retry_drops_to_the_bulk_class,
    a_fanout_over_the_bulk_bound_pauses_and_resumes_losing_and_repeating_nothing,
);
