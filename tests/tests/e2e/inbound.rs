//! The inbound path: remote servers POST signed activities to our inboxes;
//! the edge checks cheaply and queues, inbox verifies, dedups, applies
//! follows and hands the rest to the application's stream.
//!
//! Long on purpose: one test per row of README "Inbound contract" (each
//! status of the edge, each verification rule, each side effect), each
//! standing alone, in the README's order.
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use serde_json::{json, Value};
use stampede_core::activity::public_note;
use stampede_proto::api::inbound_service_client::InboundServiceClient;
use stampede_proto::api::SubscribeRequest;
use stampede_sink::{SendOptions, Sink, SinkOptions};

use crate::helpers::{spawn_app, wait_for, AppOptions, Backend, TestApp};

pub(crate) fn like(actor: &str, n: usize) -> Value {
    json!({
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": format!("{actor}/likes/{n}"),
        "type": "Like",
        "actor": actor,
        "object": "https://elsewhere.example/notes/1",
    })
}

pub(crate) async fn inbox_count(app: &TestApp, result: &str) -> u64 {
    app.metric(
        "inbox",
        "stampede_inbound_activities_total",
        &format!("stage=\"verify\",result=\"{result}\""),
    )
    .await
}

pub(crate) async fn edge_count(app: &TestApp, result: &str) -> u64 {
    app.metric(
        "ingest",
        "stampede_inbound_activities_total",
        &format!("stage=\"edge\",result=\"{result}\""),
    )
    .await
}

async fn a_remote_follows_gets_an_accept_then_the_next_post(backend: Backend) {
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    let alice = app.create_actor("alice").await;
    let alice_id = format!("{}/users/alice", app.http_base);
    let bob = sink.actor(0, "bob").unwrap();
    let follow = json!({
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": format!("{}/follows/1", bob.id),
        "type": "Follow",
        "actor": bob.id,
        "object": alice_id,
    });
    let r = sink
        .send(
            0,
            "bob",
            &format!("{alice_id}/inbox"),
            &follow,
            SendOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    wait_for(
        "the follower to be stored",
        Duration::from_secs(30),
        || async { app.store.follower_count(alice).await.unwrap() == 1 },
    )
    .await;
    wait_for("the signed Accept", Duration::from_secs(30), || async {
        sink.received(0).iter().any(|x| x.body["type"] == "Accept")
    })
    .await;
    let accept = sink
        .received(0)
        .into_iter()
        .find(|x| x.body["type"] == "Accept")
        .unwrap();
    assert_eq!(accept.verified, Ok(()));
    assert_eq!(accept.body["actor"], alice_id);
    assert_eq!(accept.body["object"]["id"], follow["id"]);
    assert_eq!(
        accept.key_id.as_deref(),
        Some(format!("{alice_id}#main-key").as_str())
    );

    let note = app
        .publish("alice", &public_note(&alice_id, "for my new follower"), "")
        .await
        .unwrap();
    wait_for(
        "the post to reach the follower",
        Duration::from_secs(30),
        || async {
            sink.received(0)
                .iter()
                .any(|x| x.activity_id.as_deref() == Some(note.activity_id.as_str()))
        },
    )
    .await;
    // The Follow itself reached the application's stream too.
    wait_for(
        "the Follow on the stream",
        Duration::from_secs(10),
        || async { app.app_queue_depth().await == 1 },
    )
    .await;
    app.stop().await;
}

async fn every_rejection_has_its_status_or_verdict_and_nothing_is_forwarded(backend: Backend) {
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![("STAMPEDE_BLOCKED_DOMAINS", "blocked.example".into())],
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
    app.create_actor("alice").await;
    let inbox = format!("{}/users/alice/inbox", app.http_base);
    let bob = sink.actor(0, "bob").unwrap();
    let eve = sink.actor(1, "eve").unwrap();
    let send = |a: Value, o: SendOptions| {
        let (sink, inbox) = (&sink, inbox.clone());
        async move { sink.send(0, "bob", &inbox, &a, o).await.unwrap() }
    };
    let now = SystemTime::now();
    // Refused at the edge.
    assert_eq!(
        send(
            like(&bob.id, 1),
            SendOptions {
                unsigned: true,
                ..Default::default()
            }
        )
        .await
        .status,
        401
    );
    assert_eq!(
        send(
            like(&bob.id, 2),
            SendOptions {
                date: Some(now - Duration::from_secs(7200)),
                ..Default::default()
            }
        )
        .await
        .status,
        401
    );
    assert_eq!(
        send(
            like(&bob.id, 3),
            SendOptions {
                date: Some(now + Duration::from_secs(3600)),
                ..Default::default()
            }
        )
        .await
        .status,
        401
    );
    let huge = json!({"type": "Like", "actor": bob.id, "object": "x".repeat(2 << 20)});
    assert_eq!(send(huge, SendOptions::default()).await.status, 413);
    assert_eq!(
        send(
            like(&bob.id, 4),
            SendOptions {
                raw_body: Some(b"not json".to_vec()),
                ..Default::default()
            }
        )
        .await
        .status,
        400
    );
    assert_eq!(
        send(
            like("https://blocked.example/users/x", 5),
            SendOptions::default()
        )
        .await
        .status,
        403
    );
    // Queued, then refused by the inbox service.
    assert_eq!(
        send(
            like(&bob.id, 6),
            SendOptions {
                wrong_key: true,
                ..Default::default()
            }
        )
        .await
        .status,
        202
    );
    assert_eq!(
        send(
            like(&bob.id, 7),
            SendOptions {
                tamper_body: true,
                ..Default::default()
            }
        )
        .await
        .status,
        202
    );
    assert_eq!(
        send(
            like(&bob.id, 8),
            SendOptions {
                tamper_date: true,
                ..Default::default()
            }
        )
        .await
        .status,
        202
    );
    // A key of server 0 vouching for an actor of server 1.
    assert_eq!(
        send(like(&eve.id, 9), SendOptions::default()).await.status,
        202
    );
    let ghost = format!("http://{}/missing/ghost", bob.host);
    assert_eq!(
        send(
            like(&ghost, 10),
            SendOptions {
                key_id: Some(format!("{ghost}#main-key")),
                ..Default::default()
            }
        )
        .await
        .status,
        202
    );
    // The one good activity.
    assert_eq!(
        send(like(&bob.id, 11), SendOptions::default()).await.status,
        202
    );
    wait_for("six inbox verdicts", Duration::from_secs(30), || async {
        let mut n = 0;
        for r in [
            "accepted",
            "bad_signature",
            "digest_mismatch",
            "key_unavailable",
        ] {
            n += inbox_count(&app, r).await;
        }
        n == 6
    })
    .await;
    assert_eq!(edge_count(&app, "bad_signature").await, 1, "unsigned");
    assert_eq!(
        edge_count(&app, "stale_date").await,
        2,
        "stale and future dates"
    );
    assert_eq!(edge_count(&app, "too_large").await, 1);
    assert_eq!(edge_count(&app, "malformed").await, 1);
    assert_eq!(edge_count(&app, "blocked").await, 1);
    assert_eq!(
        inbox_count(&app, "bad_signature").await,
        3,
        "wrong key, tampered date, another origin's key"
    );
    assert_eq!(inbox_count(&app, "digest_mismatch").await, 1);
    assert_eq!(inbox_count(&app, "key_unavailable").await, 1);
    assert_eq!(inbox_count(&app, "accepted").await, 1);
    wait_for(
        "the good one on the stream",
        Duration::from_secs(10),
        || async { app.app_queue_depth().await == 1 },
    )
    .await;
    app.stop().await;
}

async fn a_busy_client_is_rate_limited_with_retry_after(backend: Backend) {
    // The window is a minute: start well inside one.
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if 60 - now % 60 < 15 {
        tokio::time::sleep(Duration::from_secs(60 - now % 60 + 1)).await;
    }
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![("STAMPEDE_INBOUND_RATE_LIMIT", "3".into())],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    app.create_actor("alice").await;
    let inbox = format!("{}/users/alice/inbox", app.http_base);
    let bob = sink.actor(0, "bob").unwrap();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for n in 0..4 {
        let r = sink
            .send(0, "bob", &inbox, &like(&bob.id, n), SendOptions::default())
            .await
            .unwrap();
        statuses.push(r.status);
        retry_after = r.retry_after.or(retry_after);
    }
    assert_eq!(statuses, [202, 202, 202, 429]);
    let secs: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&secs));
    assert_eq!(edge_count(&app, "rate_limited").await, 1);
    app.stop().await;
}

async fn a_rotated_key_verifies_after_exactly_one_refetch(backend: Backend) {
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    app.create_actor("alice").await;
    let inbox = format!("{}/users/alice/inbox", app.http_base);
    let bob = sink.actor(0, "bob").unwrap();
    sink.send(0, "bob", &inbox, &like(&bob.id, 1), SendOptions::default())
        .await
        .unwrap();
    wait_for("the first activity", Duration::from_secs(30), || async {
        inbox_count(&app, "accepted").await == 1
    })
    .await;
    assert_eq!(sink.fetches(0), 1);
    sink.rotate_key(0).await.unwrap();
    sink.send(0, "bob", &inbox, &like(&bob.id, 2), SendOptions::default())
        .await
        .unwrap();
    wait_for("the second activity", Duration::from_secs(30), || async {
        inbox_count(&app, "accepted").await == 2
    })
    .await;
    assert_eq!(sink.fetches(0), 2, "exactly one refetch");
    assert_eq!(inbox_count(&app, "bad_signature").await, 0);
    app.stop().await;
}

async fn a_replay_to_the_same_inbox_is_forwarded_once(backend: Backend) {
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    app.create_actor("alice").await;
    app.create_actor("carol").await;
    let bob = sink.actor(0, "bob").unwrap();
    let a = like(&bob.id, 1);
    for inbox in ["alice", "alice", "carol"] {
        let url = format!("{}/users/{inbox}/inbox", app.http_base);
        assert_eq!(
            sink.send(0, "bob", &url, &a, SendOptions::default())
                .await
                .unwrap()
                .status,
            202
        );
    }
    wait_for("three verdicts", Duration::from_secs(30), || async {
        inbox_count(&app, "accepted").await + inbox_count(&app, "duplicate").await == 3
    })
    .await;
    assert_eq!(
        inbox_count(&app, "accepted").await,
        2,
        "alice once, carol once"
    );
    assert_eq!(inbox_count(&app, "duplicate").await, 1);
    wait_for("two on the stream", Duration::from_secs(10), || async {
        app.app_queue_depth().await == 2
    })
    .await;
    app.stop().await;
}

async fn a_thousand_deletes_of_unknown_actors_fetch_nothing(backend: Backend) {
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = Arc::new(Sink::start(SinkOptions::default()).await.unwrap());
    let inbox = format!("{}/inbox", app.http_base);
    futures::stream::iter(0..1000)
        .for_each_concurrent(16, |i| {
            let (sink, inbox) = (sink.clone(), inbox.clone());
            async move {
                let who = sink.actor(0, &format!("gone{i}")).unwrap();
                let delete = json!({"id": format!("{}#delete", who.id), "type": "Delete", "actor": who.id, "object": who.id});
                let r = sink.send(0, &format!("gone{i}"), &inbox, &delete, SendOptions::default()).await.unwrap();
                assert_eq!(r.status, 202);
            }
        })
        .await;
    wait_for("1000 dropped deletes", Duration::from_secs(60), || async {
        inbox_count(&app, "dropped_delete").await == 1000
    })
    .await;
    assert_eq!(sink.fetches(0), 0, "no key was fetched");
    assert_eq!(app.app_queue_depth().await, 0);
    app.stop().await;
}

async fn the_stream_loses_nothing_across_a_disconnect(backend: Backend) {
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    app.create_actor("alice").await;
    let inbox = format!("{}/users/alice/inbox", app.http_base);
    let bob = sink.actor(0, "bob").unwrap();
    for n in 0..3 {
        sink.send(0, "bob", &inbox, &like(&bob.id, n), SendOptions::default())
            .await
            .unwrap();
    }
    wait_for("three on the stream", Duration::from_secs(30), || async {
        app.app_queue_depth().await == 3
    })
    .await;

    let subscribe = || async {
        let (tx, rx) = tokio::sync::mpsc::channel::<SubscribeRequest>(8);
        tx.send(SubscribeRequest::default()).await.unwrap();
        let stream = InboundServiceClient::new(app.grpc.clone())
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        (tx, stream)
    };
    let (tx, mut stream) = subscribe().await;
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(stream.message().await.unwrap().unwrap());
    }
    tx.send(SubscribeRequest {
        ack: vec![first[0].delivery_id],
        ..Default::default()
    })
    .await
    .unwrap();
    // Half-close: the server reads the ack, sees the end, and closes its side.
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
    drop(stream);

    let (tx, mut stream) = subscribe().await;
    let mut again = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        again.push(m.activity_id.clone());
        tx.send(SubscribeRequest {
            ack: vec![m.delivery_id],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mut want: Vec<String> = first[1..].iter().map(|m| m.activity_id.clone()).collect();
    want.sort();
    again.sort();
    assert_eq!(again, want, "the unacknowledged ones came back");
    assert_eq!(first[0].verdict, "accepted");
    let activity: Value = serde_json::from_str(&first[0].activity_json).unwrap();
    assert_eq!(activity["type"], "Like");
    drop(tx);
    drop(stream);
    app.stop().await;
}

/// Acknowledgements in batches: `ack_through` and runs of listed ids are
/// one broker acknowledgement each (`multiple`), ids out of order one by
/// one; what no batch covered (a gap, and the batch's unacknowledged tail)
/// comes back to the next subscriber, and nothing else does.
async fn batched_acks_settle_what_they_cover_and_the_rest_comes_back(backend: Backend) {
    const N: usize = 10;
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    app.create_actor("alice").await;
    let inbox = format!("{}/users/alice/inbox", app.http_base);
    let bob = sink.actor(0, "bob").unwrap();
    for n in 0..N {
        sink.send(0, "bob", &inbox, &like(&bob.id, n), SendOptions::default())
            .await
            .unwrap();
    }
    wait_for("ten on the stream", Duration::from_secs(30), || async {
        app.app_queue_depth().await == N as u64
    })
    .await;
    let subscribe = || async {
        let (tx, rx) = tokio::sync::mpsc::channel::<SubscribeRequest>(8);
        tx.send(SubscribeRequest::default()).await.unwrap();
        let stream = InboundServiceClient::new(app.grpc.clone())
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        (tx, stream)
    };
    let (tx, mut stream) = subscribe().await;
    let mut first = Vec::new();
    for _ in 0..N {
        first.push(stream.message().await.unwrap().unwrap());
    }
    let id = |i: usize| first[i].delivery_id;
    // 1-4 through one cumulative ack; 5-6 a run of the list, 8 alone;
    // 7, 9 and 10 not acknowledged.
    tx.send(SubscribeRequest {
        ack_through: id(3),
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(SubscribeRequest {
        ack: vec![id(7), id(4), id(5)],
        ..Default::default()
    })
    .await
    .unwrap();
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
    drop(stream);

    let (tx, mut stream) = subscribe().await;
    let mut again = Vec::new();
    for _ in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        again.push(m);
    }
    let mut got: Vec<&str> = again.iter().map(|m| m.activity_id.as_str()).collect();
    let mut want: Vec<&str> = [6, 8, 9]
        .iter()
        .map(|&i| first[i].activity_id.as_str())
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "what no batch covered came back, and only that");
    let through = again.iter().map(|m| m.delivery_id).max().unwrap();
    tx.send(SubscribeRequest {
        ack_through: through,
        ..Default::default()
    })
    .await
    .unwrap();
    let more = tokio::time::timeout(Duration::from_secs(1), stream.message()).await;
    assert!(more.is_err(), "nothing else comes: {more:?}");
    drop(tx);
    drop(stream);
    // Nothing is left for a third subscriber.
    let (tx, mut stream) = subscribe().await;
    let more = tokio::time::timeout(Duration::from_secs(1), stream.message()).await;
    assert!(more.is_err(), "all acknowledged: {more:?}");
    drop(tx);
    drop(stream);
    app.stop().await;
}

fn follow_of(follower: &str, target: &str, n: usize) -> Value {
    json!({
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": format!("{follower}/follows/{n}"),
        "type": "Follow",
        "actor": follower,
        "object": target,
    })
}

async fn undo_delete_and_update_change_the_followers(backend: Backend) {
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions {
        servers: 2,
        shared_inbox: Arc::new(|i| i == 0),
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let alice = app.create_actor("alice").await;
    let alice_id = format!("{}/users/alice", app.http_base);
    let inbox = format!("{alice_id}/inbox");
    let bob = sink.actor(0, "bob").unwrap();
    let send = |from: usize, who: &str, a: Value| {
        let (sink, inbox, who) = (&sink, inbox.clone(), who.to_string());
        async move {
            assert_eq!(
                sink.send(from, &who, &inbox, &a, SendOptions::default())
                    .await
                    .unwrap()
                    .status,
                202
            )
        }
    };
    let followers = || async { app.store.follower_count(alice).await.unwrap() };

    // Follow, then Undo{Follow}.
    let f1 = follow_of(&bob.id, &alice_id, 1);
    send(0, "bob", f1.clone()).await;
    wait_for("the follow", Duration::from_secs(30), || async {
        followers().await == 1
    })
    .await;
    send(
        0,
        "bob",
        json!({"id": format!("{}/undo/1", bob.id), "type": "Undo", "actor": bob.id, "object": f1}),
    )
    .await;
    wait_for("the undo", Duration::from_secs(30), || async {
        followers().await == 0
    })
    .await;

    // Follow again, then an Update moving bob's inbox, then Delete{bob}.
    send(0, "bob", follow_of(&bob.id, &alice_id, 2)).await;
    wait_for("the second follow", Duration::from_secs(30), || async {
        followers().await == 1
    })
    .await;
    let moved = sink.actor(1, "bob").unwrap().inbox;
    let update = json!({
        "id": format!("{}#update-1", bob.id), "type": "Update", "actor": bob.id,
        "object": {"id": bob.id, "type": "Person", "inbox": moved},
    });
    send(0, "bob", update).await;
    wait_for("the update", Duration::from_secs(30), || async {
        app.store.follower_targets(alice, None, 10).await.unwrap() == [moved.clone()]
    })
    .await;
    send(0, "bob", json!({"id": format!("{}#delete", bob.id), "type": "Delete", "actor": bob.id, "object": bob.id})).await;
    wait_for("the delete", Duration::from_secs(30), || async {
        followers().await == 0
    })
    .await;
    wait_for("five accepted", Duration::from_secs(10), || async {
        inbox_count(&app, "accepted").await == 5
    })
    .await;
    assert!(
        app.store.remote_actor(&bob.id).await.unwrap().is_none(),
        "the deleted actor is forgotten"
    );
    app.stop().await;
}

async fn a_manually_approving_actor_decides_through_grpc(backend: Backend) {
    use stampede_proto::api::{
        follow_service_client::FollowServiceClient, CreateActorRequest, FollowDecision,
    };
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    app.actors()
        .create_actor(CreateActorRequest {
            name: "dora".into(),
            manually_approves_followers: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let dora = app.store.actor_by_name("dora").await.unwrap().unwrap().id;
    let dora_id = format!("{}/users/dora", app.http_base);
    let (bob, eve) = (sink.actor(0, "bob").unwrap(), sink.actor(0, "eve").unwrap());
    for (who, actor) in [("bob", &bob), ("eve", &eve)] {
        let r = sink
            .send(
                0,
                who,
                &format!("{dora_id}/inbox"),
                &follow_of(&actor.id, &dora_id, 1),
                SendOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 202);
    }
    wait_for(
        "both follows on the stream",
        Duration::from_secs(30),
        || async { app.app_queue_depth().await == 2 },
    )
    .await;
    assert_eq!(
        app.store.follower_count(dora).await.unwrap(),
        0,
        "nothing accepted yet"
    );
    let mut follows = FollowServiceClient::new(app.grpc.clone());
    let decide = |follower: &str| FollowDecision {
        actor: "dora".into(),
        follower: follower.into(),
    };
    follows.accept_follow(decide(&bob.id)).await.unwrap();
    follows.reject_follow(decide(&eve.id)).await.unwrap();
    let again = follows.accept_follow(decide(&eve.id)).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound);
    assert_eq!(app.store.follower_count(dora).await.unwrap(), 1);
    wait_for(
        "the Accept and the Reject",
        Duration::from_secs(30),
        || async {
            let kinds: Vec<Value> = sink
                .received(0)
                .iter()
                .map(|r| r.body["type"].clone())
                .collect();
            kinds.contains(&json!("Accept")) && kinds.contains(&json!("Reject"))
        },
    )
    .await;
    for r in sink.received(0) {
        assert_eq!(r.verified, Ok(()));
    }
    app.stop().await;
}

async fn verify_answers_for_any_signed_request_and_nodeinfo_describes_us(backend: Backend) {
    use stampede_proto::api::{VerifyHeader, VerifyRequest};
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    app.create_actor("alice").await;
    let bob = sink.actor(0, "bob").unwrap();
    let url = format!("{}/users/alice/inbox", app.http_base);
    let body = like(&bob.id, 1).to_string().into_bytes();
    let headers = sink.signed_headers(0, "bob", &url, &body).await.unwrap();
    let request = |headers: &[(String, String)], body: &[u8]| VerifyRequest {
        method: "POST".into(),
        path: "/users/alice/inbox".into(),
        headers: headers
            .iter()
            .map(|(n, v)| VerifyHeader {
                name: n.clone(),
                value: v.clone(),
            })
            .collect(),
        body: body.to_vec(),
    };
    let mut client = InboundServiceClient::new(app.grpc.clone());
    let ok = client
        .verify(request(&headers, &body))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.verdict, "accepted", "{}", ok.reason);
    assert_eq!(ok.actor, bob.id);
    assert_eq!(ok.key_id, format!("{}#main-key", bob.id));
    let tampered = client
        .verify(request(&headers, b"{\"type\":\"Like\"}"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tampered.verdict, "digest_mismatch");
    let unsigned = client
        .verify(request(&headers[..4], &body))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unsigned.verdict, "bad_signature");
    assert!(unsigned.reason.contains("signature"), "{}", unsigned.reason);

    let get = |url: String| async move {
        serde_json::from_slice::<Value>(&reqwest::get(url).await.unwrap().bytes().await.unwrap())
            .unwrap()
    };
    let links = get(format!("{}/.well-known/nodeinfo", app.http_base)).await;
    let info = get(links["links"][0]["href"].as_str().unwrap().to_string()).await;
    assert_eq!(info["software"]["name"], "stampede");
    assert_eq!(info["protocols"], json!(["activitypub"]));
    assert_eq!(
        info["usage"]["users"]["total"], 1,
        "the instance actor is not a user"
    );
    app.stop().await;
}

/// A remote server still sending a body the edge refused at its headers
/// (too large, no signature) reads the answer, not a reset: the edge reads
/// the rest of the body before it closes.
async fn a_refused_body_still_being_sent_gets_its_answer(backend: Backend) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app(backend, AppOptions::default()).await;
    app.create_actor("alice").await;
    let addr = app.http_base.trim_start_matches("http://").to_string();
    // Larger than both ends' socket buffers hold: without the edge reading
    // it, the write or the read after it meets the reset.
    let body = vec![b'x'; 6 << 20];
    for (signature, status) in [("signature: keyId=\"x\"\r\n", "413"), ("", "401")] {
        let len = if status == "413" { body.len() } else { 1000 };
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /users/alice/inbox HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/activity+json\r\n{signature}content-length: {len}\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&body[..len]).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await.unwrap() {
                0 => break,
                n => answer.extend_from_slice(&buf[..n]),
            }
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
    }
    app.stop().await;
}

crate::both_backends!(
    a_refused_body_still_being_sent_gets_its_answer,
    a_remote_follows_gets_an_accept_then_the_next_post,
    every_rejection_has_its_status_or_verdict_and_nothing_is_forwarded,
    a_busy_client_is_rate_limited_with_retry_after,
    a_rotated_key_verifies_after_exactly_one_refetch,
    a_replay_to_the_same_inbox_is_forwarded_once,
    a_thousand_deletes_of_unknown_actors_fetch_nothing,
    the_stream_loses_nothing_across_a_disconnect,
    batched_acks_settle_what_they_cover_and_the_rest_comes_back,
    undo_delete_and_update_change_the_followers,
    a_manually_approving_actor_decides_through_grpc,
    verify_answers_for_any_signed_request_and_nodeinfo_describes_us,
);
