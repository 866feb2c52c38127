//! Domain policies changed at runtime (README, "Domain policies"): each
//! sink server has a loopback address of its own, so each is a domain of
//! its own.
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use stampede_proto::api::{
    inbound_service_client::InboundServiceClient, HostRequest, InboundActivity,
    ListDomainPoliciesRequest, RemoveDomainPolicyRequest, SetDomainPolicyRequest, SubscribeRequest,
};
use stampede_runtime::policy::Decision;
use stampede_sink::{SendOptions, Sink, SinkOptions};

use crate::both_backends;
use crate::helpers::{spawn_app, wait_for, AppOptions, Backend, TestApp};

both_backends!(
    a_domain_suspended_at_runtime_gets_nothing_either_way,
    a_silenced_domain_is_marked_on_the_stream_and_still_delivered_to,
    allowlist_mode_federates_only_with_allowed_domains,
);

const SERVICES: [&str; 4] = ["ingest", "inbox", "fanout", "delivery"];

/// Sink servers on 127.0.0.{first}, {first + 1}, …
async fn sink_at(servers: usize, first: u8) -> Sink {
    Sink::start(SinkOptions {
        servers,
        bind: Arc::new(move |i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, first + i as u8))),
        ..SinkOptions::default()
    })
    .await
    .unwrap()
}

async fn set_policy(
    app: &TestApp,
    domain: &str,
    policy: &str,
) -> stampede_proto::api::DomainPolicy {
    app.admin()
        .set_domain_policy(SetDomainPolicyRequest {
            domain: domain.into(),
            policy: policy.into(),
            reason: "test".into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Waits until every service holds `rules` rules; returns how long that took.
async fn every_service_holds(app: &TestApp, rules: u64) -> Duration {
    let since = Instant::now();
    wait_for(
        "every service holding the new rules",
        Duration::from_secs(20),
        || async {
            for s in SERVICES {
                if app.metric(s, "stampede_domain_policies", "").await != rules {
                    return false;
                }
            }
            true
        },
    )
    .await;
    since.elapsed()
}

fn like(actor: &str, object: &str, n: u32) -> Value {
    json!({
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": format!("{actor}/likes/{n}"),
        "type": "Like",
        "actor": actor,
        "object": object,
    })
}

/// Waits until fanout has skipped a target on a blocked domain.
async fn fanout_skipped_a_blocked_target(app: &TestApp) {
    wait_for(
        "a target skipped by fanout",
        Duration::from_secs(10),
        || async {
            app.metric(
                "fanout",
                "stampede_fanout_skipped_targets_total",
                "reason=\"blocked\"",
            )
            .await
                >= 1
        },
    )
    .await;
}

fn received_activity(sink: &Sink, i: usize, id: &str) -> bool {
    sink.received(i)
        .iter()
        .any(|r| r.activity_id.as_deref() == Some(id))
}

async fn a_domain_suspended_at_runtime_gets_nothing_either_way(backend: Backend) {
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = sink_at(3, 61).await;
    let alice = app.create_actor("alice").await;
    let alice_id = format!("{}/users/alice", app.http_base);
    let (bob, carol, dave) = (
        sink.actor(0, "bob").unwrap(),
        sink.actor(1, "carol").unwrap(),
        sink.actor(2, "dave").unwrap(),
    );
    app.seed_followers(alice, &[bob.clone(), carol.clone(), dave.clone()])
        .await;
    // Carol's copy waits in the broker: her host is paused.
    app.admin()
        .pause_host(HostRequest {
            host: carol.host.clone(),
        })
        .await
        .unwrap();
    let note1 = app
        .publish(
            "alice",
            &stampede_core::activity::public_note(&alice_id, "one"),
            "",
        )
        .await
        .unwrap();
    wait_for(
        "bob's and dave's copies",
        Duration::from_secs(30),
        || async {
            received_activity(&sink, 0, &note1.activity_id)
                && received_activity(&sink, 2, &note1.activity_id)
        },
    )
    .await;
    wait_for("carol's copy parked", Duration::from_secs(30), || async {
        app.metric(
            "delivery",
            "stampede_deliveries_total",
            "outcome=\"parked\"",
        )
        .await
            >= 1
    })
    .await;

    // Suspended at runtime: in force in every service within 5 s.
    let set = set_policy(&app, "127.0.0.62", "suspend").await;
    assert_eq!(
        (set.domain.as_str(), set.policy.as_str()),
        ("127.0.0.62", "suspend")
    );
    assert_eq!(set.follows_removed, 1, "carol's follow of alice");
    let took = every_service_holds(&app, 1).await;
    println!("[{backend:?}] the suspension reached every service in {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "the suspension took {took:?} to reach every service"
    );
    assert_eq!(app.store.follower_count(alice).await.unwrap(), 2);

    // Its inbound POSTs are refused at the edge.
    let inbox = format!("{}/users/alice/inbox", app.http_base);
    let refused = sink
        .send(
            1,
            "carol",
            &inbox,
            &like(&carol.id, &note1.activity_id, 1),
            SendOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(refused.status, 403);
    assert_eq!(
        sink.follow(1, "carol", &alice_id).await.unwrap().status,
        403
    );

    // The job queued before the suspension is dropped at send time.
    app.admin()
        .resume_host(HostRequest {
            host: carol.host.clone(),
        })
        .await
        .unwrap();
    wait_for(
        "carol's queued copy dropped",
        Duration::from_secs(60),
        || async {
            app.metric(
                "delivery",
                "stampede_deliveries_total",
                "outcome=\"suspended\"",
            )
            .await
                == 1
        },
    )
    .await;

    // The next publish makes no job for it, even naming carol directly.
    let mut note2 = stampede_core::activity::public_note(&alice_id, "two");
    let cc = json!([format!("{alice_id}/followers"), carol.id]);
    note2["cc"] = cc.clone();
    note2["object"]["cc"] = cc;
    let note2 = app.publish("alice", &note2, "").await.unwrap();
    wait_for(
        "bob's and dave's second copies",
        Duration::from_secs(30),
        || async {
            received_activity(&sink, 0, &note2.activity_id)
                && received_activity(&sink, 2, &note2.activity_id)
        },
    )
    .await;
    fanout_skipped_a_blocked_target(&app).await;
    assert!(
        sink.received(1).is_empty(),
        "the suspended server got {:?}",
        sink.received(1)
    );
    assert!(
        app.store.dead_letters(10, None).await.unwrap().is_empty(),
        "dropped, not dead-lettered"
    );

    // The rule is in the store: a process started now (a restart) has it.
    if backend == Backend::External {
        let cfg = stampede_runtime::Config::from_lookup(|k| app.env.get(k).cloned()).unwrap();
        let p = stampede_runtime::process::Process::connect(
            cfg,
            stampede_runtime::Role::Service(stampede_runtime::ServiceKind::Delivery),
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(p.policy.decide(&carol.host), Decision::Blocked);
        assert_eq!(p.policy.decide(&bob.host), Decision::Federate);
        p.shutdown.cancel();
    }
    let listed = app
        .admin()
        .list_domain_policies(ListDomainPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.mode, "blocklist");
    assert_eq!(listed.policies.len(), 1);
    assert_eq!(listed.policies[0].reason, "test");

    // Removed: carol's server may follow again.
    assert!(
        app.admin()
            .remove_domain_policy(RemoveDomainPolicyRequest {
                domain: "127.0.0.62".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .removed
    );
    let took = every_service_holds(&app, 0).await;
    assert!(took < Duration::from_secs(5), "the removal took {took:?}");
    assert_eq!(
        sink.follow(1, "carol", &alice_id).await.unwrap().status,
        202
    );
    app.stop().await;
}

/// Reads `n` activities from the application stream, acknowledging them.
async fn read_stream(app: &TestApp, n: usize) -> Vec<InboundActivity> {
    let (tx, rx) = tokio::sync::mpsc::channel::<SubscribeRequest>(8);
    tx.send(SubscribeRequest::default()).await.unwrap();
    let mut stream = InboundServiceClient::new(app.grpc.clone())
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while got.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("the stream's next activity")
            .unwrap()
            .unwrap();
        tx.send(SubscribeRequest {
            ack: vec![m.delivery_id],
            ..Default::default()
        })
        .await
        .unwrap();
        got.push(m);
    }
    got
}

async fn a_silenced_domain_is_marked_on_the_stream_and_still_delivered_to(backend: Backend) {
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = sink_at(2, 64).await;
    let alice = app.create_actor("alice").await;
    let alice_id = format!("{}/users/alice", app.http_base);
    let (bob, eve) = (sink.actor(0, "bob").unwrap(), sink.actor(1, "eve").unwrap());
    app.seed_followers(alice, std::slice::from_ref(&bob)).await;
    let set = set_policy(&app, "127.0.0.64", "silence").await;
    assert_eq!(set.follows_removed, 0);
    every_service_holds(&app, 1).await;

    let inbox = format!("{}/users/alice/inbox", app.http_base);
    for (i, who) in [(0, &bob), (1, &eve)] {
        let name = if i == 0 { "bob" } else { "eve" };
        let r = sink
            .send(
                i,
                name,
                &inbox,
                &like(&who.id, &alice_id, 1),
                SendOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 202);
    }
    let got = read_stream(&app, 2).await;
    let policy_of = |actor: &str| {
        got.iter()
            .find(|m| m.actor == actor)
            .map(|m| m.policy.clone())
            .unwrap_or_else(|| panic!("no activity of {actor} on the stream"))
    };
    assert_eq!(policy_of(&bob.id), "silenced");
    assert_eq!(policy_of(&eve.id), "");

    // Outbound as usual.
    let note = app
        .publish(
            "alice",
            &stampede_core::activity::public_note(&alice_id, "hi"),
            "",
        )
        .await
        .unwrap();
    wait_for("bob's copy", Duration::from_secs(30), || async {
        received_activity(&sink, 0, &note.activity_id)
    })
    .await;
    app.stop().await;
}

async fn allowlist_mode_federates_only_with_allowed_domains(backend: Backend) {
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![("STAMPEDE_FEDERATION_MODE", "allowlist".into())],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = sink_at(2, 66).await;
    let alice = app.create_actor("alice").await;
    let alice_id = format!("{}/users/alice", app.http_base);
    let (bob, carol) = (
        sink.actor(0, "bob").unwrap(),
        sink.actor(1, "carol").unwrap(),
    );
    app.seed_followers(alice, &[bob.clone(), carol.clone()])
        .await;
    set_policy(&app, "127.0.0.66", "allow").await;
    every_service_holds(&app, 1).await;

    assert_eq!(
        sink.follow(1, "carol", &alice_id).await.unwrap().status,
        403
    );
    assert_eq!(sink.follow(0, "bob", &alice_id).await.unwrap().status, 202);
    let note = app
        .publish(
            "alice",
            &stampede_core::activity::public_note(&alice_id, "hi"),
            "",
        )
        .await
        .unwrap();
    wait_for("bob's copy", Duration::from_secs(30), || async {
        received_activity(&sink, 0, &note.activity_id)
    })
    .await;
    fanout_skipped_a_blocked_target(&app).await;
    assert!(
        sink.received(1).is_empty(),
        "a server not allowed got {:?}",
        sink.received(1)
    );
    app.stop().await;
}
