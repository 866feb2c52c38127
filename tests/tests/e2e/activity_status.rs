//! `AdminService.GetActivityDelivery` (`stampede activity status`): an
//! activity's targets by state, derived from the durable records, match
//! what the fake servers received, also after a delivery process is killed
//! with -9 mid-run.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use stampede_core::activity::public_note;
use stampede_proto::api::{DeliveryCounts, GetActivityDeliveryRequest};
use stampede_sink::{Behavior, Sink, SinkOptions};

use crate::both_backends;
use crate::helpers::{spawn_app, wait_for, AppOptions, Backend, TestApp};

both_backends!(activity_status_converges_to_what_the_servers_received);

const SERVERS: usize = 12;
const PER_SERVER: usize = 4;
const POSTS: usize = 3;
/// Answers 503: its deliveries wait for a retry 10 minutes away.
const FAILING: usize = 0;
/// Answers 410: its deliveries are dead letters.
const GONE: usize = 1;

async fn status(app: &TestApp, id: &str) -> stampede_proto::api::ActivityDelivery {
    app.admin()
        .get_activity_delivery(GetActivityDeliveryRequest {
            activity_id: id.into(),
            per_host: true,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Inboxes of server `i` that answered `id` with a 2xx, and those that got
/// it at all.
fn seen(sink: &Sink, i: usize, id: &str) -> (usize, usize) {
    let copies: Vec<_> = sink
        .received(i)
        .into_iter()
        .filter(|r| r.activity_id.as_deref() == Some(id))
        .collect();
    let ok: HashSet<_> = copies
        .iter()
        .filter(|r| (200..300).contains(&r.status))
        .map(|r| r.path.clone())
        .collect();
    let any: HashSet<_> = copies.iter().map(|r| r.path.clone()).collect();
    (ok.len(), any.len())
}

async fn activity_status_converges_to_what_the_servers_received(backend: Backend) {
    let external = backend == Backend::External;
    let mut app = spawn_app(
        backend,
        AppOptions {
            // Two delivery processes, one of them killed mid-run.
            processes: if external { vec!["delivery"] } else { vec![] },
            copies: vec![("delivery", 2)],
            extra: vec![
                ("STAMPEDE_RETRY_SCHEDULE_SECS", "600".into()),
                // The failing server's circuit stays closed: its deliveries
                // are tried once each, then wait for their retry.
                ("STAMPEDE_CIRCUIT_FAILURES", "1000".into()),
                ("STAMPEDE_PREFETCH", "8".into()),
            ],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Arc::new(
        Sink::start(SinkOptions {
            servers: SERVERS,
            shared_inbox: Arc::new(|_| false),
            ..SinkOptions::default()
        })
        .await
        .unwrap(),
    );
    let alice = app.create_actor("alice").await;
    let alice_id = format!("{}/users/alice", app.http_base);
    let followers: Vec<_> = (0..SERVERS)
        .flat_map(|i| (0..PER_SERVER).map(move |n| (i, n)))
        .map(|(i, n)| sink.actor(i, &format!("f{n}")).unwrap())
        .collect();
    app.seed_followers(alice, &followers).await;
    sink.set_behavior(FAILING, Behavior::Status(503)).unwrap();
    sink.set_behavior(GONE, Behavior::Status(410)).unwrap();
    for i in 2..SERVERS {
        sink.set_behavior(i, Behavior::Slow(Duration::from_millis(150)))
            .unwrap();
    }
    let mut ids = Vec::new();
    for k in 0..POSTS {
        ids.push(
            app.publish("alice", &public_note(&alice_id, &format!("post {k}")), "")
                .await
                .unwrap()
                .activity_id,
        );
    }
    if external {
        let all = SERVERS * PER_SERVER * POSTS;
        wait_for("a third of the copies", Duration::from_secs(60), || async {
            sink.total_received() >= all / 3
        })
        .await;
        app.kill_child("delivery", 0).await;
        let at_kill = sink.total_received();
        assert!(at_kill < all, "all {all} sent before the kill");
        println!("delivery 0 killed with -9 after {at_kill} of {all} copies");
    }

    // Every post settles: the healthy servers' inboxes delivered, the
    // failing server's waiting for their retry, the gone one's dead.
    for id in &ids {
        wait_for("the post settled", Duration::from_secs(120), || async {
            let s = status(&app, id).await;
            s.fanned_out && s.counts.unwrap_or_default().pending == 0
        })
        .await;
        let s = status(&app, id).await;
        let total = s.counts.unwrap_or_default();
        let mut want = DeliveryCounts::default();
        for h in &s.hosts {
            let i = (0..SERVERS)
                .find(|i| sink.actor(*i, "f0").unwrap().host == h.host)
                .unwrap_or_else(|| panic!("a host not of the sink: {}", h.host));
            let (ok, any) = seen(&sink, i, id);
            let c = h.counts.unwrap_or_default();
            match i {
                FAILING => {
                    assert_eq!((c.retrying, c.delivered), (any as u64, 0), "{h:?}");
                    want.retrying += c.retrying;
                }
                GONE => {
                    assert_eq!((c.dead_lettered, c.delivered), (any as u64, 0), "{h:?}");
                    want.dead_lettered += c.dead_lettered;
                }
                _ => {
                    assert_eq!(
                        c.delivered, ok as u64,
                        "{} delivered, by the server",
                        h.host
                    );
                    assert_eq!(c.total, PER_SERVER as u64, "{h:?}");
                    want.delivered += c.delivered;
                }
            }
            want.total += c.total;
        }
        assert_eq!(want.delivered, ((SERVERS - 2) * PER_SERVER) as u64);
        assert_eq!(total.delivered, want.delivered);
        assert_eq!(total.retrying, want.retrying);
        assert_eq!(total.dead_lettered, want.dead_lettered);
        assert_eq!(total.total, want.total);
        assert_eq!(
            total.total,
            total.delivered + total.retrying + total.dead_lettered,
            "{total:?}"
        );
    }
    // The first post reached every follower then: the gone server's were
    // removed by its 410s only after.
    let first = status(&app, &ids[0]).await.counts.unwrap_or_default();
    assert_eq!(first.total, (SERVERS * PER_SERVER) as u64);
    assert_eq!(first.retrying, PER_SERVER as u64);
    app.stop().await;
}
