//! Delivery outcomes by status: retried, dead-lettered, gone, Retry-After.
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use stampede_core::activity::public_note;
use stampede_sink::{Behavior, Sink, SinkOptions};

use crate::helpers::{spawn_app, wait_for, AppOptions, Backend};

async fn each_status_class_has_its_outcome(backend: Backend) {
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![("STAMPEDE_RETRY_SCHEDULE_SECS", "1,1,1".into())],
            ..AppOptions::default()
        },
    )
    .await;
    // 0: 503 then fine; 1: 404; 2: 410; 3: 429 with Retry-After then fine; 4: always 500.
    let sink = Sink::start(SinkOptions {
        servers: 5,
        shared_inbox: Arc::new(|_| false),
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let alice = app.create_actor("alice").await;
    let followers: Vec<_> = (0..5).map(|i| sink.actor(i, "f").unwrap()).collect();
    app.seed_followers(alice, &followers).await;
    sink.set_behavior(0, Behavior::Status(503)).unwrap();
    sink.set_behavior(1, Behavior::Status(404)).unwrap();
    sink.set_behavior(2, Behavior::Status(410)).unwrap();
    sink.set_behavior(3, Behavior::RetryAfter(7)).unwrap();
    sink.set_behavior(4, Behavior::Status(500)).unwrap();
    let alice_id = format!("{}/users/alice", app.http_base);
    app.publish("alice", &public_note(&alice_id, "outcomes"), "")
        .await
        .unwrap();
    wait_for(
        "first attempts everywhere",
        Duration::from_secs(30),
        || async { (0..5).all(|i| !sink.received(i).is_empty()) },
    )
    .await;
    sink.set_behavior(0, Behavior::Ok).unwrap();
    sink.set_behavior(3, Behavior::Ok).unwrap();
    wait_for(
        "the retried ones to land",
        Duration::from_secs(40),
        || async { sink.received(0).len() >= 2 && sink.received(3).len() >= 2 },
    )
    .await;
    // Server 3 asked for 7 seconds: the retry waited at least that.
    let r3 = sink.received(3);
    assert!(
        r3[1].at - r3[0].at >= Duration::from_secs(7),
        "retry came after {:?}",
        r3[1].at - r3[0].at
    );
    // Server 4 fails on every attempt: 1 + 3 retries, then a dead letter.
    wait_for(
        "the 500s to be given up",
        Duration::from_secs(40),
        || async {
            app.store
                .dead_letters(10, None)
                .await
                .unwrap()
                .iter()
                .any(|d| d.last_status == Some(500))
        },
    )
    .await;
    assert_eq!(sink.received(4).len(), 4);
    assert_eq!(sink.received(0).len(), 2, "503 once, then delivered");
    assert_eq!(sink.received(1).len(), 1, "404 is not retried");
    assert_eq!(sink.received(2).len(), 1, "410 is not retried");
    let dl = app.store.dead_letters(10, None).await.unwrap();
    let by_status = |s: u16| dl.iter().find(|d| d.last_status == Some(s)).cloned();
    assert_eq!(by_status(404).unwrap().attempts, 1);
    assert!(by_status(410).unwrap().reason.starts_with("gone"));
    assert_eq!(by_status(500).unwrap().attempts, 4);
    assert!(by_status(503).is_none() && by_status(429).is_none());
    assert_eq!(app.store.totals().await.unwrap().delivered, 2);
    // The gone follower is no longer a follower.
    assert_eq!(app.store.follower_count(alice).await.unwrap(), 4);
    app.stop().await;
}

async fn a_delete_of_our_own_actor_gets_one_attempt(backend: Backend) {
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![("STAMPEDE_RETRY_SCHEDULE_SECS", "1,1,1".into())],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    let alice = app.create_actor("alice").await;
    app.seed_followers(alice, &[sink.actor(0, "f").unwrap()])
        .await;
    sink.set_behavior(0, Behavior::Status(503)).unwrap();
    let alice_id = format!("{}/users/alice", app.http_base);
    let delete = json!({
        "type": "Delete",
        "actor": alice_id,
        "object": alice_id,
        "to": ["https://www.w3.org/ns/activitystreams#Public"],
        "cc": [format!("{alice_id}/followers")],
    });
    app.publish("alice", &delete, "").await.unwrap();
    wait_for(
        "the one attempt to be recorded",
        Duration::from_secs(30),
        || async { !app.store.dead_letters(10, None).await.unwrap().is_empty() },
    )
    .await;
    assert_eq!(sink.received(0).len(), 1);
    assert_eq!(
        app.store.dead_letters(10, None).await.unwrap()[0].attempts,
        1
    );
    app.stop().await;
}

async fn dead_letters_list_and_replay_deliver_once(backend: Backend) {
    use stampede_proto::api::{ListDeadLettersRequest, ReplayDeadLettersRequest};
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    let alice = app.create_actor("alice").await;
    app.seed_followers(alice, &[sink.actor(0, "f").unwrap()])
        .await;
    sink.set_behavior(0, Behavior::Status(404)).unwrap();
    let alice_id = format!("{}/users/alice", app.http_base);
    let note = app
        .publish("alice", &public_note(&alice_id, "again"), "")
        .await
        .unwrap();
    let mut admin = app.admin();
    wait_for("the dead letter", Duration::from_secs(30), || {
        let mut admin = admin.clone();
        async move {
            !admin
                .list_dead_letters(ListDeadLettersRequest::default())
                .await
                .unwrap()
                .into_inner()
                .dead_letters
                .is_empty()
        }
    })
    .await;
    let dl = admin
        .list_dead_letters(ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].last_status, 404);
    assert_eq!(dl[0].activity_id, note.activity_id);
    sink.set_behavior(0, Behavior::Ok).unwrap();
    let replay = |id: &str, all: bool| ReplayDeadLettersRequest {
        id: id.into(),
        host: String::new(),
        all,
    };
    let n = admin
        .replay_dead_letters(replay(&dl[0].id, false))
        .await
        .unwrap()
        .into_inner()
        .replayed;
    assert_eq!(n, 1);
    wait_for("the replayed delivery", Duration::from_secs(30), || async {
        app.store.totals().await.unwrap().delivered == 1
    })
    .await;
    // Replaying again finds nothing: delivered once.
    assert_eq!(
        admin
            .replay_dead_letters(replay(&dl[0].id, false))
            .await
            .unwrap()
            .into_inner()
            .replayed,
        0
    );
    assert_eq!(
        admin
            .replay_dead_letters(replay("", true))
            .await
            .unwrap()
            .into_inner()
            .replayed,
        0
    );
    let bad = admin
        .replay_dead_letters(replay("", false))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let got: Vec<_> = sink.received(0).into_iter().map(|r| r.status).collect();
    assert_eq!(got, [404, 202]);
    app.stop().await;
}

async fn a_delete_supersedes_a_create_still_parked_for_a_paused_host(backend: Backend) {
    use stampede_proto::api::{HostRequest, StatusRequest};
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    let alice = app.create_actor("alice").await;
    let follower = sink.actor(0, "f").unwrap();
    app.seed_followers(alice, std::slice::from_ref(&follower))
        .await;
    let mut admin = app.admin();
    admin
        .pause_host(HostRequest {
            host: follower.host.clone(),
        })
        .await
        .unwrap();
    let status = admin.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.paused_hosts.len(), 1);
    assert_eq!(status.paused_hosts[0], follower.host);

    let alice_id = format!("{}/users/alice", app.http_base);
    let note_id = format!("{alice_id}/notes/1");
    let create = json!({
        "type": "Create",
        "to": ["https://www.w3.org/ns/activitystreams#Public"],
        "cc": [format!("{alice_id}/followers")],
        "object": {"id": note_id, "type": "Note", "content": "oops"},
    });
    app.publish("alice", &create, "").await.unwrap();
    wait_for(
        "the create to be parked",
        Duration::from_secs(30),
        || async {
            app.metric(
                "delivery",
                "stampede_deliveries_total",
                "outcome=\"parked\"",
            )
            .await
                >= 1
        },
    )
    .await;
    let delete = json!({
        "type": "Delete",
        "to": ["https://www.w3.org/ns/activitystreams#Public"],
        "cc": [format!("{alice_id}/followers")],
        "object": {"id": note_id, "type": "Tombstone"},
    });
    let deleted = app.publish("alice", &delete, "").await.unwrap();
    admin
        .resume_host(HostRequest {
            host: follower.host.clone(),
        })
        .await
        .unwrap();
    wait_for("the delete to arrive", Duration::from_secs(30), || async {
        sink.received(0)
            .iter()
            .any(|r| r.activity_id.as_deref() == Some(deleted.activity_id.as_str()))
    })
    .await;
    wait_for(
        "the create to be superseded",
        Duration::from_secs(30),
        || async {
            app.metric(
                "delivery",
                "stampede_deliveries_total",
                "outcome=\"superseded\"",
            )
            .await
                == 1
        },
    )
    .await;
    let kinds: Vec<_> = sink
        .received(0)
        .iter()
        .map(|r| r.body["type"].clone())
        .collect();
    assert_eq!(kinds, [json!("Delete")], "only the Delete was sent");
    assert!(admin
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .paused_hosts
        .is_empty());
    app.stop().await;
}

async fn a_slow_inbox_times_out_and_a_dead_one_is_retried(backend: Backend) {
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![
                ("STAMPEDE_RETRY_SCHEDULE_SECS", "1".into()),
                ("STAMPEDE_DELIVERY_TIMEOUT_SECS", "1".into()),
            ],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions {
        servers: 2,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let alice = app.create_actor("alice").await;
    let followers: Vec<_> = (0..2).map(|i| sink.actor(i, "f").unwrap()).collect();
    app.seed_followers(alice, &followers).await;
    sink.set_behavior(0, Behavior::Slow(Duration::from_secs(3)))
        .unwrap();
    sink.set_down(1).unwrap();
    let alice_id = format!("{}/users/alice", app.http_base);
    app.publish("alice", &public_note(&alice_id, "slow"), "")
        .await
        .unwrap();
    wait_for("both given up", Duration::from_secs(40), || async {
        app.store.dead_letters(10, None).await.unwrap().len() == 2
    })
    .await;
    for d in app.store.dead_letters(10, None).await.unwrap() {
        assert_eq!(d.attempts, 2, "{d:?}");
        assert_eq!(d.last_status, None);
        if d.host == followers[0].host {
            assert!(d.reason.contains("timed out"), "{}", d.reason);
        } else {
            assert!(d.reason.contains("connection failed"), "{}", d.reason);
        }
    }
    assert_eq!(app.store.totals().await.unwrap().delivered, 0);
    app.stop().await;
}

crate::both_backends!(
    each_status_class_has_its_outcome,
    a_delete_of_our_own_actor_gets_one_attempt,
    dead_letters_list_and_replay_deliver_once,
    a_delete_supersedes_a_create_still_parked_for_a_paused_host,
    a_slow_inbox_times_out_and_a_dead_one_is_retried,
);

/// A job from a fanout that ran twice carries `may_be_delivered`: delivery
/// checks its success record first and does not send it again.
async fn a_job_that_may_be_delivered_is_checked_and_not_resent(backend: Backend) {
    use prost::Message;
    use stampede_backends::queue::{OutMessage, QueueName};
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions {
        servers: 2,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    // Server 1 answers 404: its dead letter names the activity's store key.
    sink.set_behavior(1, Behavior::Status(404)).unwrap();
    let alice = app.create_actor("alice").await;
    let followers: Vec<_> = (0..2).map(|i| sink.actor(i, "f").unwrap()).collect();
    app.seed_followers(alice, &followers).await;
    let actor_id = format!("{}/users/alice", app.http_base);
    app.publish("alice", &public_note(&actor_id, "once"), "")
        .await
        .unwrap();
    wait_for(
        "a delivery and a dead letter",
        Duration::from_secs(30),
        || async {
            sink.received(0).len() == 1
                && !app.store.dead_letters(1, None).await.unwrap().is_empty()
        },
    )
    .await;
    let key = app.store.dead_letters(1, None).await.unwrap()[0]
        .activity_key
        .clone();
    let target = followers[0].shared_inbox.clone().unwrap();
    let job = stampede_proto::queue::DeliveryJob {
        activity_key: key,
        inbox: target,
        may_be_delivered: true,
        ..Default::default()
    };
    app.queue
        .publish(
            QueueName::Delivery,
            OutMessage {
                kind: stampede_proto::kinds::DELIVERY_JOB,
                payload: job.encode_to_vec(),
                route: None,
            },
        )
        .await
        .unwrap();
    wait_for("the duplicate skipped", Duration::from_secs(15), || async {
        app.metric(
            "delivery",
            "stampede_deliveries_total",
            "outcome=\"skipped\"",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(sink.received(0).len(), 1, "sent again");
    app.stop().await;
}

crate::both_backends!(a_job_that_may_be_delivered_is_checked_and_not_resent);

/// Copies of one job (a fanout that ran again, a broker node's death)
/// waiting for the slot of a busy host while one of them is sent: the
/// others find its success record once they hold the job's lease, and are
/// not sent again. Checked only before the wait, they were (one post twice
/// to one inbox under a node kill).
async fn copies_of_a_job_waiting_for_a_slot_are_sent_once(backend: Backend) {
    use prost::Message;
    use stampede_backends::queue::{OutMessage, QueueName};
    const COPIES: usize = 8;
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![("STAMPEDE_HOST_CONCURRENCY", "1".into())],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions {
        servers: 1,
        shared_inbox: Arc::new(|_| false),
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    // alice's post holds the host's one slot for 800 ms while bob's job and
    // its copies queue behind it.
    sink.set_behavior(0, Behavior::Slow(Duration::from_millis(800)))
        .unwrap();
    let (alice, bob) = (
        app.create_actor("alice").await,
        app.create_actor("bob").await,
    );
    let (g, f) = (sink.actor(0, "g").unwrap(), sink.actor(0, "f").unwrap());
    app.seed_followers(alice, std::slice::from_ref(&g)).await;
    app.seed_followers(bob, std::slice::from_ref(&f)).await;
    let base = &app.http_base;
    app.publish(
        "alice",
        &public_note(&format!("{base}/users/alice"), "first"),
        "",
    )
    .await
    .unwrap();
    wait_for(
        "alice's post in flight",
        Duration::from_secs(15),
        || async { sink.max_in_flight(0) >= 1 },
    )
    .await;
    let id = app
        .publish(
            "bob",
            &public_note(&format!("{base}/users/bob"), "once"),
            "",
        )
        .await
        .unwrap()
        .activity_id;
    let key = app
        .store
        .activity_delivery(&id)
        .await
        .unwrap()
        .expect("bob's post stored")
        .key;
    let job = stampede_proto::queue::DeliveryJob {
        activity_key: key,
        inbox: f.inbox.clone(),
        ..Default::default()
    };
    for _ in 0..COPIES {
        app.queue
            .publish(
                QueueName::Delivery,
                OutMessage {
                    kind: stampede_proto::kinds::DELIVERY_JOB,
                    payload: job.encode_to_vec(),
                    route: None,
                },
            )
            .await
            .unwrap();
    }
    // Quick answers from here on: each copy holds the slot for moments,
    // between the looks of the others waiting for it.
    sink.set_behavior(0, Behavior::Slow(Duration::from_millis(20)))
        .unwrap();
    let copies_of = || {
        sink.received(0)
            .iter()
            .filter(|r| r.activity_id.as_deref() == Some(id.as_str()))
            .count()
    };
    wait_for("every copy settled", Duration::from_secs(60), || async {
        let skipped = app
            .metric(
                "delivery",
                "stampede_deliveries_total",
                "outcome=\"skipped\"",
            )
            .await as usize;
        copies_of() >= 1 && copies_of() - 1 + skipped >= COPIES
    })
    .await;
    assert_eq!(copies_of(), 1, "bob's post sent more than once");
    app.stop().await;
}

crate::both_backends!(copies_of_a_job_waiting_for_a_slot_are_sent_once);
