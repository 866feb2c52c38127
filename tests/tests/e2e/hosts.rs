//! Per-host lanes and circuit breakers: one bad host does not slow the
//! others; a failing host's circuit opens, is probed, closes, and its
//! concurrency ramps up again.
use std::time::{Duration, Instant};

use stampede_core::activity::public_note;
use stampede_proto::api::StatusRequest;
use stampede_sink::{Behavior, Sink, SinkOptions};

use crate::helpers::{spawn_app, wait_for, AppOptions, Backend, TestApp};

fn posts_received(sink: &Sink, i: usize) -> usize {
    sink.received(i)
        .iter()
        .filter(|r| r.body["type"] == "Create")
        .count()
}

fn posts_delivered(sink: &Sink, i: usize) -> usize {
    sink.received(i)
        .iter()
        .filter(|r| r.body["type"] == "Create" && (200..300).contains(&r.status))
        .count()
}

async fn publish_posts(app: &TestApp, n: usize) {
    let alice = format!("{}/users/alice", app.http_base);
    for k in 0..n {
        app.publish("alice", &public_note(&alice, &format!("post {k}")), "")
            .await
            .unwrap();
    }
}

async fn circuit_opens_is_probed_closes_and_ramps_up(backend: Backend) {
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![
                ("STAMPEDE_CIRCUIT_FAILURES", "3".into()),
                ("STAMPEDE_CIRCUIT_OPEN_SECS", "12".into()),
                ("STAMPEDE_HOST_RAMP_SECS", "120".into()),
                ("STAMPEDE_HOST_CONCURRENCY", "4".into()),
                ("STAMPEDE_RETRY_SCHEDULE_SECS", "1,1,1,1,1,1,1,1,1,1".into()),
            ],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    let alice = app.create_actor("alice").await;
    app.seed_followers(alice, &[sink.actor(0, "bob").unwrap()])
        .await;
    sink.set_behavior(0, Behavior::Status(503)).unwrap();
    publish_posts(&app, 1).await;

    // Three failures open the circuit: no fourth attempt while it is open.
    wait_for("three failed attempts", Duration::from_secs(20), || async {
        posts_received(&sink, 0) == 3
    })
    .await;
    let status = app
        .admin()
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let host = sink.actor(0, "bob").unwrap().host;
    let failing = status
        .failing_hosts
        .iter()
        .find(|h| h.host == host)
        .expect("the failing host in status");
    assert_eq!(failing.failures, 3);
    assert!(failing.circuit_open_until_unix_ms > 0 && !failing.unavailable);
    // The retry comes while the circuit is open: parked, not tried.
    wait_for(
        "a delivery parked by the open circuit",
        Duration::from_secs(15),
        || async {
            app.metric(
                "delivery",
                "stampede_deliveries_total",
                "outcome=\"circuit_open\"",
            )
            .await
                >= 1
        },
    )
    .await;
    assert_eq!(
        posts_received(&sink, 0),
        3,
        "tried while the circuit was open"
    );
    // The failing host sends us a signed request: its outbound health is not
    // revived by that, the circuit stays open.
    let alice_id = format!("{}/users/alice", app.http_base);
    assert_eq!(
        sink.follow(0, "carol", &alice_id).await.unwrap().status,
        202
    );
    wait_for("the Follow verified", Duration::from_secs(15), || async {
        app.metric(
            "inbox",
            "stampede_inbound_activities_total",
            "stage=\"verify\",result=\"accepted\"",
        )
        .await
            == 1
    })
    .await;
    let status = app
        .admin()
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let still = status
        .failing_hosts
        .iter()
        .find(|h| h.host == host)
        .expect("still failing after it sent us a request");
    assert!(still.circuit_open_until_unix_ms > 0);
    assert_eq!(posts_received(&sink, 0), 3);

    // The host recovers: the half-open probe finds it, the circuit closes,
    // and the parked delivery goes through.
    sink.set_behavior(0, Behavior::Slow(Duration::from_millis(1500)))
        .unwrap();
    wait_for(
        "the post after recovery",
        Duration::from_secs(60),
        || async { posts_delivered(&sink, 0) == 1 },
    )
    .await;
    assert_eq!(
        app.metric(
            "delivery",
            "stampede_deliveries_total",
            "outcome=\"probe_ok\""
        )
        .await,
        1
    );
    let status = app
        .admin()
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.failing_hosts.is_empty(), "{status:?}");

    // Ramping up: 4 posts at once reach the recovered host one at a time
    // (its limit grows from 1 to 4 over 120 s), the rest waiting for the
    // slot in the worker, not parked for seconds in the broker.
    sink.reset_max_in_flight(0);
    publish_posts(&app, 4).await;
    wait_for("the four posts", Duration::from_secs(60), || async {
        posts_delivered(&sink, 0) == 5
    })
    .await;
    assert_eq!(sink.max_in_flight(0), 1, "not ramping");
    assert_eq!(
        app.metric(
            "delivery",
            "stampede_deliveries_total",
            "outcome=\"deferred\""
        )
        .await,
        0,
        "parked for a slot that frees in 1.5 s"
    );
    app.stop().await;
}

/// Time until every healthy server got `posts` posts.
async fn healthy_run(with_bad_hosts: bool) -> Duration {
    const HEALTHY: usize = 50;
    const POSTS: usize = 8;
    let app = spawn_app(
        Backend::External,
        AppOptions {
            extra: vec![
                ("STAMPEDE_PREFETCH", "16".into()),
                ("STAMPEDE_HOST_CONCURRENCY", "2".into()),
                ("STAMPEDE_DELIVERY_TIMEOUT_SECS", "30".into()),
            ],
            ..AppOptions::default()
        },
    )
    .await;
    let servers = if with_bad_hosts { HEALTHY + 2 } else { HEALTHY };
    let sink = Sink::start(SinkOptions {
        servers,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let alice = app.create_actor("alice").await;
    let followers: Vec<_> = (0..servers).map(|i| sink.actor(i, "f").unwrap()).collect();
    app.seed_followers(alice, &followers).await;
    if with_bad_hosts {
        // The last two: one down, one answering after 20 s.
        sink.set_down(HEALTHY).unwrap();
        sink.set_behavior(HEALTHY + 1, Behavior::Slow(Duration::from_secs(20)))
            .unwrap();
    }
    // Let the slow host's deliveries be first in the queue.
    let started = Instant::now();
    publish_posts(&app, POSTS).await;
    wait_for(
        "every healthy server's posts",
        Duration::from_secs(120),
        || async { (0..HEALTHY).all(|i| posts_delivered(&sink, i) == POSTS) },
    )
    .await;
    let took = started.elapsed();
    if with_bad_hosts {
        // The slow host never had more than its lane's two in flight.
        assert!(sink.max_in_flight(HEALTHY + 1) <= 2);
    }
    app.stop().await;
    took
}

/// One dead host and one that takes 20 s among 50 healthy ones, with a
/// worker that holds only 16 messages at once: without per-host lanes the
/// slow host's jobs would fill the worker for 20 s at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_and_a_slow_host_do_not_slow_the_healthy_ones() {
    let baseline = healthy_run(false).await;
    let with_bad = healthy_run(true).await;
    assert!(
        with_bad <= baseline * 3 + Duration::from_secs(5),
        "healthy hosts took {with_bad:?} with bad hosts around, {baseline:?} without"
    );
    assert!(
        with_bad < Duration::from_secs(20),
        "healthy hosts waited for the slow one: {with_bad:?}"
    );
}

/// Parked deliveries per reason, as `stampede status` shows them.
async fn parked_counts(app: &TestApp) -> Vec<(String, u64)> {
    app.admin()
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .parked
        .into_iter()
        .map(|p| (p.reason, p.deliveries))
        .collect()
}

/// Status says what parked deliveries wait for, whichever worker parked
/// them: a paused host's deliveries, an open circuit's, and retries.
async fn status_counts_parked_deliveries_per_reason(backend: Backend) {
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![
                ("STAMPEDE_CIRCUIT_FAILURES", "2".into()),
                ("STAMPEDE_CIRCUIT_OPEN_SECS", "300".into()),
                ("STAMPEDE_RETRY_SCHEDULE_SECS", "1,1,1".into()),
            ],
            ..AppOptions::default()
        },
    )
    .await;
    // Personal inboxes only: one delivery per follower.
    let sink = Sink::start(SinkOptions {
        servers: 2,
        shared_inbox: std::sync::Arc::new(|_| false),
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let alice = app.create_actor("alice").await;
    let followers: Vec<_> = (0..3)
        .map(|n| sink.actor(0, &format!("p{n}")).unwrap())
        .chain((0..4).map(|n| sink.actor(1, &format!("f{n}")).unwrap()))
        .collect();
    app.seed_followers(alice, &followers).await;
    let paused = sink.actor(0, "p0").unwrap().host;
    app.admin()
        .pause_host(stampede_proto::api::HostRequest {
            host: paused.clone(),
        })
        .await
        .unwrap();
    sink.set_behavior(1, Behavior::Status(503)).unwrap();
    assert!(parked_counts(&app).await.is_empty());
    publish_posts(&app, 1).await;

    // Server 1 fails its attempts and its circuit opens: the retries come
    // back to an open circuit and wait behind it; server 0's wait for the
    // operator. Nothing else waits.
    let want = [("circuit_open".to_string(), 4), ("paused".to_string(), 3)];
    wait_for(
        "3 paused and 4 circuit_open deliveries in status",
        Duration::from_secs(30),
        || async { parked_counts(&app).await == want },
    )
    .await;
    assert_eq!(posts_received(&sink, 0), 0);
    let status = app
        .admin()
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let open = status.parked.iter().find(|p| p.reason == "circuit_open");
    let failing = status.failing_hosts.iter().find(|h| h.host != paused);
    // They are due back when the circuit closes (counted to a step of at
    // most 1/32 of their wait before; a broker's delay tier may add a little).
    let (open, failing) = (open.unwrap(), failing.unwrap());
    let closes = failing.circuit_open_until_unix_ms;
    assert!(open.next_due_unix_ms >= closes - 300_000 / 32, "{status:?}");
    assert!(open.next_due_unix_ms <= closes + 5_000, "{status:?}");

    // Resumed, the paused host's deliveries go out and no longer wait.
    app.admin()
        .resume_host(stampede_proto::api::HostRequest { host: paused })
        .await
        .unwrap();
    wait_for(
        "the paused host's posts",
        Duration::from_secs(30),
        || async { posts_delivered(&sink, 0) == 3 },
    )
    .await;
    wait_for(
        "only the circuit's deliveries parked",
        Duration::from_secs(30),
        || async { parked_counts(&app).await == [("circuit_open".to_string(), 4)] },
    )
    .await;
    app.stop().await;
}

/// A host failing longer than `STAMPEDE_HOST_UNAVAILABLE_SECS` is
/// unavailable: a delivery parked behind its circuit is dead-lettered
/// without another try, and its dead letter counts the POSTs made.
async fn an_unavailable_hosts_dead_letter_counts_the_attempts_made(backend: Backend) {
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![
                ("STAMPEDE_CIRCUIT_FAILURES", "1".into()),
                ("STAMPEDE_CIRCUIT_OPEN_SECS", "10".into()),
                ("STAMPEDE_RETRY_SCHEDULE_SECS", "1,1,1,1,1".into()),
            ],
            // Kept (twice this) longer than RabbitMQ's shortest delay tier,
            // 5 s, that holds the retry.
            tune: Some(|c| c.host_unavailable_after = Duration::from_secs(3)),
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    let alice = app.create_actor("alice").await;
    app.seed_followers(alice, &[sink.actor(0, "bob").unwrap()])
        .await;
    sink.set_behavior(0, Behavior::Status(503)).unwrap();
    publish_posts(&app, 1).await;
    wait_for("the dead letter", Duration::from_secs(30), || async {
        !app.store.dead_letters(10, None).await.unwrap().is_empty()
    })
    .await;
    let dead = app.store.dead_letters(10, None).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.starts_with("host unavailable"), "{dead:?}");
    assert_eq!(dead[0].attempts as usize, posts_received(&sink, 0));
    assert_eq!(
        app.metric(
            "delivery",
            "stampede_deliveries_total",
            "outcome=\"unavailable\""
        )
        .await,
        1
    );
    app.stop().await;
}

/// Hosts marked unavailable, as `stampede host list --unavailable` shows them.
async fn unavailable_hosts(app: &TestApp) -> Vec<String> {
    app.admin()
        .list_failing_hosts(stampede_proto::api::ListFailingHostsRequest {
            unavailable_only: true,
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .hosts
        .into_iter()
        .map(|h| h.host)
        .collect()
}

fn got_activity(sink: &Sink, i: usize, id: &str) -> bool {
    sink.received(i)
        .iter()
        .any(|r| r.activity_id.as_deref() == Some(id) && (200..300).contains(&r.status))
}

/// A host failing for STAMPEDE_HOST_UNAVAILABLE_SECS gets no job from
/// fanout (counted), until the periodic probe finds it back; one that sends
/// a verified request is back for fanout at once.
async fn an_unavailable_host_is_not_fanned_out_to_until_it_is_back(backend: Backend) {
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![
                ("STAMPEDE_CIRCUIT_FAILURES", "1".into()),
                ("STAMPEDE_CIRCUIT_OPEN_SECS", "1".into()),
                ("STAMPEDE_RETRY_SCHEDULE_SECS", "1,1,1,1,1,1,1,1".into()),
            ],
            // Kept (twice this) longer than RabbitMQ's shortest delay tier,
            // 5 s, that holds the retry.
            tune: Some(|c| {
                c.host_unavailable_after = Duration::from_secs(3);
                c.unavailable_probe_every = Duration::from_secs(1);
            }),
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions {
        servers: 3,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let alice = app.create_actor("alice").await;
    let alice_id = format!("{}/users/alice", app.http_base);
    let (bob, carol, dave) = (
        sink.actor(0, "bob").unwrap(),
        sink.actor(1, "carol").unwrap(),
        sink.actor(2, "dave").unwrap(),
    );
    app.seed_followers(alice, &[bob.clone(), carol.clone(), dave.clone()])
        .await;
    sink.set_behavior(1, Behavior::Status(503)).unwrap();
    sink.set_behavior(2, Behavior::Status(503)).unwrap();
    publish_posts(&app, 1).await;
    wait_for(
        "carol's and dave's hosts unavailable",
        Duration::from_secs(60),
        || async {
            let u = unavailable_hosts(&app).await;
            u.contains(&carol.host) && u.contains(&dave.host)
        },
    )
    .await;
    // Fanout rereads the unavailable hosts every 5 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let posts_to_carol = sink.received(1).len();
    let note = app
        .publish("alice", &public_note(&alice_id, "while away"), "")
        .await
        .unwrap();
    wait_for("bob's copy", Duration::from_secs(30), || async {
        got_activity(&sink, 0, &note.activity_id)
    })
    .await;
    wait_for(
        "two inboxes skipped by fanout",
        Duration::from_secs(10),
        || async {
            app.metric(
                "fanout",
                "stampede_fanout_skipped_targets_total",
                "reason=\"unavailable\"",
            )
            .await
                == 2
        },
    )
    .await;

    // Dave's server sends a verified request: up for fanout again at once.
    let inbox = format!("{}/users/alice/inbox", app.http_base);
    let like = serde_json::json!({
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": format!("{}/likes/1", dave.id),
        "type": "Like",
        "actor": dave.id,
        "object": note.activity_id,
    });
    let sent = sink
        .send(
            2,
            "dave",
            &inbox,
            &like,
            stampede_sink::SendOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(sent.status, 202);
    wait_for("dave's host available", Duration::from_secs(20), || async {
        !unavailable_hosts(&app).await.contains(&dave.host)
    })
    .await;
    assert!(unavailable_hosts(&app).await.contains(&carol.host));

    // Carol's server comes back: the periodic probe finds it.
    sink.set_behavior(1, Behavior::Ok).unwrap();
    sink.set_behavior(2, Behavior::Ok).unwrap();
    wait_for(
        "carol's host probed back",
        Duration::from_secs(30),
        || async { unavailable_hosts(&app).await.is_empty() },
    )
    .await;
    assert_eq!(
        posts_received(&sink, 1),
        posts_to_carol,
        "carol's server got a post while unavailable"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let back = app
        .publish("alice", &public_note(&alice_id, "back"), "")
        .await
        .unwrap();
    wait_for(
        "every copy after the return",
        Duration::from_secs(60),
        || async { (0..3).all(|i| got_activity(&sink, i, &back.activity_id)) },
    )
    .await;
    app.stop().await;
}

/// The hosts view (`stampede hosts`): which servers we are behind on.
async fn the_hosts_view_shows_backlogs_failures_and_last_answers(backend: Backend) {
    use stampede_proto::api::{HostRequest, ListHostsRequest};
    const PER_SERVER: usize = 5;
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions {
        servers: 3,
        shared_inbox: std::sync::Arc::new(|_| false),
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let alice = app.create_actor("alice").await;
    let followers: Vec<_> = (0..3)
        .flat_map(|i| (0..PER_SERVER).map(move |n| (i, n)))
        .map(|(i, n)| sink.actor(i, &format!("f{n}")).unwrap())
        .collect();
    app.seed_followers(alice, &followers).await;
    let host = |i: usize| sink.actor(i, "f0").unwrap().host;
    // Server 0 paused (its backlog waits), server 1 failing, server 2 fine.
    app.admin()
        .pause_host(HostRequest { host: host(0) })
        .await
        .unwrap();
    sink.set_behavior(1, Behavior::Status(503)).unwrap();
    publish_posts(&app, 2).await;
    let view = |sort: &'static str| {
        let app = &app;
        async move {
            app.admin()
                .list_hosts(ListHostsRequest {
                    sort: sort.into(),
                    limit: 10,
                })
                .await
                .unwrap()
                .into_inner()
                .hosts
        }
    };
    let backlog = (2 * PER_SERVER) as u64;
    wait_for("the view to settle", Duration::from_secs(60), || async {
        let v = view("pending").await;
        let of = |i: usize| v.iter().find(|h| h.host == host(i)).cloned();
        of(0).is_some_and(|h| h.pending == backlog)
            && of(1).is_some_and(|h| h.pending == backlog && h.last_status == 503)
            && of(2).is_some_and(|h| h.pending == 0 && h.last_status == 202)
    })
    .await;
    let v = view("pending").await;
    assert_eq!(v.len(), 3, "{v:?}");
    assert_eq!(v[2].host, host(2), "the host with no backlog last: {v:?}");
    let of = |i: usize| v.iter().find(|h| h.host == host(i)).unwrap().clone();
    assert_eq!(of(0).circuit, "paused");
    assert_eq!(of(0).last_answer_unix_ms, 0, "never asked");
    assert!(
        of(1).failures >= 1 && of(1).last_success_unix_ms == 0,
        "{:?}",
        of(1)
    );
    assert!(of(2).last_success_unix_ms > 0 && of(2).circuit == "closed");
    assert!(of(2).limit >= 1);
    assert_eq!(view("failures").await[0].host, host(1));
    // Resumed: its backlog drains.
    app.admin()
        .resume_host(HostRequest { host: host(0) })
        .await
        .unwrap();
    wait_for(
        "server 0's backlog drained",
        Duration::from_secs(60),
        || async {
            view("pending")
                .await
                .iter()
                .find(|h| h.host == host(0))
                .is_some_and(|h| h.pending == 0 && h.last_status == 202)
        },
    )
    .await;
    assert_eq!(posts_delivered(&sink, 0), 2 * PER_SERVER);
    app.stop().await;
}

crate::both_backends!(
    the_hosts_view_shows_backlogs_failures_and_last_answers,
    circuit_opens_is_probed_closes_and_ramps_up,
    status_counts_parked_deliveries_per_reason,
    an_unavailable_hosts_dead_letter_counts_the_attempts_made,
    an_unavailable_host_is_not_fanned_out_to_until_it_is_back
);
