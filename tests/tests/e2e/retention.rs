//! Bounded retention: success records and dead letters are pruned once past
//! their retention, but never a record a queued job still needs, and an
//! operator purges a host's dead letters.
use std::time::Duration;

use prost::Message;
use stampede_backends::clock::now_ms;
use stampede_backends::queue::{OutMessage, QueueName};
use stampede_core::activity::public_note;
use stampede_proto::api::PurgeDeadLettersRequest;
use stampede_proto::queue::DeliveryJob;
use stampede_sink::{Behavior, Sink, SinkOptions};

use crate::helpers::{spawn_app, wait_for, AppOptions, Backend, TestApp};

/// Success records kept 16 s (jobs expire at 12 s), dead letters 24 s;
/// one retry 1 s after a failure (it waits at most 5 s in its tier).
const RECORDS_KEPT: Duration = Duration::from_secs(16);

fn options() -> AppOptions {
    AppOptions {
        extra: vec![
            ("STAMPEDE_RETRY_SCHEDULE_SECS", "1".into()),
            (
                "STAMPEDE_DELIVERY_RECORD_RETENTION",
                format!("{}s", RECORDS_KEPT.as_secs()),
            ),
            ("STAMPEDE_DEAD_LETTER_RETENTION", "24s".into()),
        ],
        ..AppOptions::default()
    }
}

/// The store key of the activity `ap_id`, from its dead letter.
async fn key_of(app: &TestApp, ap_id: &str) -> String {
    app.store
        .dead_letters(100, None)
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.activity_id == ap_id)
        .expect("a dead letter of the activity")
        .activity_key
}

/// Queues a copy of a delivery job, as a fanout that ran again would,
/// `delay` from now.
async fn queue_copy(app: &TestApp, key: &str, inbox: &str, first_ms: i64, delay: Duration) {
    let job = DeliveryJob {
        activity_key: key.to_string(),
        inbox: inbox.to_string(),
        first_attempt_unix_ms: first_ms,
        may_be_delivered: true,
        ..Default::default()
    };
    let msg = OutMessage {
        kind: stampede_proto::kinds::DELIVERY_JOB,
        payload: job.encode_to_vec(),
        route: None,
    };
    if delay.is_zero() {
        app.queue.publish(QueueName::Delivery, msg).await.unwrap();
    } else {
        app.queue
            .publish_delayed(QueueName::Delivery, msg, delay)
            .await
            .unwrap();
    }
}

/// Copies of `activity_id` server `i` accepted.
fn copies(sink: &Sink, i: usize, activity_id: &str) -> usize {
    sink.received(i)
        .iter()
        .filter(|r| r.activity_id.as_deref() == Some(activity_id) && r.status < 300)
        .count()
}

/// Publishes a post and waits for its two deliveries and two dead
/// letters; returns its id and store key.
async fn publish(app: &TestApp, sink: &Sink, author: &str, text: &str) -> (String, String) {
    let id = app
        .publish("alice", &public_note(author, text), "")
        .await
        .unwrap()
        .activity_id;
    let done = || async {
        let dead = app.store.dead_letters(100, None).await.unwrap();
        copies(sink, 0, &id) == 1
            && copies(sink, 1, &id) == 1
            && dead.iter().filter(|d| d.activity_id == id).count() == 2
    };
    wait_for(
        "two deliveries and two dead letters",
        Duration::from_secs(20),
        done,
    )
    .await;
    let key = key_of(app, &id).await;
    (id, key)
}

async fn pruned(app: &TestApp, table: &str) -> u64 {
    app.metric(
        "delivery",
        "stampede_retention_pruned_total",
        &format!("table=\"{table}\""),
    )
    .await
}

async fn records_and_dead_letters_are_pruned_but_never_a_pending_jobs_guard(backend: Backend) {
    let app = spawn_app(backend, options()).await;
    // Servers 0 and 1 accept; 2 and 3 answer 404 (dead letters at once).
    let sink = Sink::start(SinkOptions {
        servers: 4,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    sink.set_behavior(2, Behavior::Status(404)).unwrap();
    sink.set_behavior(3, Behavior::Status(404)).unwrap();
    let alice = app.create_actor("alice").await;
    let followers: Vec<_> = (0..4).map(|i| sink.actor(i, "f").unwrap()).collect();
    app.seed_followers(alice, &followers).await;
    let target = |i: usize| followers[i].shared_inbox.clone().unwrap();
    let author = format!("{}/users/alice", app.http_base);
    let first_at = now_ms();
    let (first, first_key) = publish(&app, &sink, &author, "first").await;
    // An operator purges one host's dead letters, over gRPC.
    let purged = app
        .admin()
        .purge_dead_letters(PurgeDeadLettersRequest {
            host: followers[2].host.clone(),
            all: false,
        })
        .await
        .unwrap()
        .into_inner()
        .purged;
    assert_eq!(purged, 1);
    // Neither a host nor `all`: refused, nothing deleted.
    let refused = app
        .admin()
        .purge_dead_letters(PurgeDeadLettersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let left = app.store.dead_letters(100, None).await.unwrap();
    assert!(left.iter().all(|d| d.host == followers[3].host), "{left:?}");

    // A second post, 6 s younger, and a copy of its job to server 0 that
    // comes back 10 s later (a fanout that ran again; held in a delay
    // queue): it returns after the first post's records are pruned and
    // must still find its own.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (second, second_key) = publish(&app, &sink, &author, "second").await;
    queue_copy(
        &app,
        &second_key,
        &target(0),
        now_ms(),
        Duration::from_secs(10),
    )
    .await;

    wait_for(
        "the first post's success records pruned",
        Duration::from_secs(30),
        || async {
            !app.store.delivered(&first_key, &target(0)).await.unwrap()
                && !app.store.delivered(&first_key, &target(1)).await.unwrap()
        },
    )
    .await;
    assert!(pruned(&app, "deliveries").await >= 2);
    assert!(
        (now_ms() - first_at) as u128 >= RECORDS_KEPT.as_millis(),
        "pruned before its retention"
    );
    wait_for("the copy skipped", Duration::from_secs(20), || async {
        app.metric(
            "delivery",
            "stampede_deliveries_total",
            "outcome=\"skipped\"",
        )
        .await
            == 1
    })
    .await;
    assert!(
        app.store.delivered(&second_key, &target(0)).await.unwrap(),
        "the record that guarded the copy"
    );
    assert_eq!(copies(&sink, 0, &second), 1, "the second post sent twice");

    // A copy of the first post's job, as old as the post: its record is
    // gone, so it is dead-lettered as expired, not sent again.
    queue_copy(
        &app,
        &first_key,
        &target(0),
        first_at - 1000,
        Duration::ZERO,
    )
    .await;
    wait_for("the old copy expired", Duration::from_secs(15), || async {
        app.store
            .dead_letters(100, Some(&followers[0].host))
            .await
            .unwrap()
            .iter()
            .any(|d| d.activity_id == first && d.reason.starts_with("expired"))
    })
    .await;
    assert_eq!(copies(&sink, 0, &first), 1, "the first post sent twice");

    // Dead letters go after theirs: the first post's, then the second's.
    wait_for(
        "old dead letters pruned",
        Duration::from_secs(30),
        || async {
            !app.store
                .dead_letters(100, Some(&followers[3].host))
                .await
                .unwrap()
                .iter()
                .any(|d| d.activity_id == first)
        },
    )
    .await;
    assert!(pruned(&app, "dead_letters").await >= 1);
    for i in 0..2 {
        assert_eq!(copies(&sink, i, &first), 1);
        assert_eq!(copies(&sink, i, &second), 1);
    }
    assert_eq!(sink.total_unverified(), 0);
    app.stop().await;
}

crate::both_backends!(records_and_dead_letters_are_pruned_but_never_a_pending_jobs_guard);
