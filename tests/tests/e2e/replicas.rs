//! Many delivery replicas, one fediverse: a host's limit holds for all of
//! them together (slots leased in the cache), a killed replica's slots come
//! back within the lease, and the limit adapts to what the host answers.
use std::time::{Duration, Instant};

use stampede_core::activity::public_note;
use stampede_proto::api::StatusRequest;
use stampede_sink::{Behavior, Sink, SinkOptions};

use crate::crash::{accepted, delivery_worker};
use crate::helpers::{free_port, spawn_app, wait_for, AppOptions, Backend, TestApp};

async fn publish_posts(app: &TestApp, n: usize) {
    let alice = format!("{}/users/alice", app.http_base);
    for k in 0..n {
        app.publish("alice", &public_note(&alice, &format!("post {k}")), "")
            .await
            .unwrap();
    }
}

/// `followers` followers of alice, each with an inbox of its own, on fake
/// server 0.
async fn one_host(app: &TestApp, followers: usize) -> Sink {
    let sink = Sink::start(SinkOptions {
        servers: 1,
        shared_inbox: std::sync::Arc::new(|_| false),
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let alice = app.create_actor("alice").await;
    let f: Vec<_> = (0..followers)
        .map(|i| sink.actor(0, &format!("f{i}")).unwrap())
        .collect();
    app.seed_followers(alice, &f).await;
    sink
}

/// `replicas` delivery processes, a host limit of 4, a host answering in
/// 250 ms: the host never sees more than 4 requests at once. One process
/// is killed with -9 mid-run: the others take its slots once its leases
/// expire, every post reaches every inbox, and none twice.
async fn replicas_share_a_hosts_limit(replicas: usize) {
    const FOLLOWERS: usize = 60;
    const POSTS: usize = 3;
    let app = spawn_app(
        Backend::External,
        AppOptions {
            extra: vec![
                ("STAMPEDE_HOST_CONCURRENCY", "4".into()),
                ("STAMPEDE_PREFETCH", "32".into()),
            ],
            skip: vec!["delivery"],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = one_host(&app, FOLLOWERS).await;
    sink.set_behavior(0, Behavior::Slow(Duration::from_millis(250)))
        .unwrap();
    publish_posts(&app, POSTS).await;
    let total = FOLLOWERS * POSTS;
    let delivered = |sink: &Sink| accepted(sink, 0).values().sum::<usize>();
    let mut workers: Vec<_> = (0..replicas)
        .map(|_| delivery_worker(&app.env, free_port()))
        .collect();
    wait_for("a third delivered", Duration::from_secs(60), || async {
        delivered(&sink) >= total / 3
    })
    .await;
    assert!(
        sink.max_in_flight(0) <= 4,
        "{} at once",
        sink.max_in_flight(0)
    );
    // Killed holding slots (4 in flight among the replicas, each answered in
    // 250 ms: the victim likely holds one or more).
    workers[0].start_kill().unwrap();
    workers[0].wait().await.unwrap();
    let killed = Instant::now();
    wait_for(
        "every post at every inbox",
        Duration::from_secs(90),
        || async { delivered(&sink) >= total },
    )
    .await;
    let after = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let copies = accepted(&sink, 0);
    assert_eq!(copies.len(), POSTS);
    for (id, n) in &copies {
        assert_eq!(*n, FOLLOWERS, "{id} reached {n} of {FOLLOWERS} inboxes");
    }
    // Per inbox: exactly once.
    let mut per_inbox = std::collections::HashMap::new();
    for r in sink.received(0) {
        if r.body["type"] == "Create" && (200..300).contains(&r.status) {
            *per_inbox
                .entry((r.path.clone(), r.activity_id.clone()))
                .or_insert(0) += 1;
        }
    }
    assert!(
        per_inbox.values().all(|n| *n == 1),
        "an inbox got a post twice"
    );
    assert!(
        sink.max_in_flight(0) <= 4,
        "{} requests at once for a limit of 4",
        sink.max_in_flight(0)
    );
    // One of the 4 is kept for interactive deliveries (none here).
    assert_eq!(sink.max_in_flight(0), 3, "the limit was used");
    // What was left at 4 at a time, 250 ms each, plus the killed worker's
    // leases expiring (8 s) and its jobs coming back from the broker.
    let left = (total - total / 3) as f64 / 4.0 * 0.25;
    assert!(
        after < Duration::from_secs_f64(left + 20.0),
        "{after:?} after the kill for {left:.0} s of work"
    );
    for mut w in workers.into_iter().skip(1) {
        w.start_kill().unwrap();
        w.wait().await.unwrap();
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_delivery_processes_share_a_hosts_limit_and_a_killed_ones_slots_return() {
    replicas_share_a_hosts_limit(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_delivery_processes_share_a_hosts_limit_and_a_killed_ones_slots_return() {
    replicas_share_a_hosts_limit(3).await;
}

fn statuses(sink: &Sink) -> (usize, usize) {
    let r = sink.received(0);
    let ok = r.iter().filter(|r| (200..300).contains(&r.status)).count();
    let refused = r.iter().filter(|r| r.status == 429).count();
    (ok, refused)
}

/// A host that serves 3 requests at once and answers 429 to more: the
/// shared limit comes down to 3 and stays there, with few 429s.
async fn the_limit_settles_under_what_the_host_serves(backend: Backend) {
    const FOLLOWERS: usize = 100;
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![
                ("STAMPEDE_HOST_CONCURRENCY", "8".into()),
                ("STAMPEDE_RETRY_SCHEDULE_SECS", "5,5,5,5,5,5".into()),
            ],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = one_host(&app, FOLLOWERS).await;
    sink.set_behavior(
        0,
        Behavior::Limited {
            concurrent: 3,
            delay: Duration::from_millis(100),
        },
    )
    .unwrap();
    publish_posts(&app, 1).await;
    wait_for("half delivered", Duration::from_secs(60), || async {
        statuses(&sink).0 >= FOLLOWERS / 2
    })
    .await;
    let (_, refused_early) = statuses(&sink);
    sink.reset_max_in_flight(0);
    publish_posts(&app, 1).await;
    wait_for("both posts delivered", Duration::from_secs(90), || async {
        statuses(&sink).0 >= 2 * FOLLOWERS
    })
    .await;
    let (ok, refused) = statuses(&sink);
    assert!(
        sink.max_in_flight(0) <= 3,
        "settled at {} in flight",
        sink.max_in_flight(0)
    );
    assert!(
        refused * 10 <= ok,
        "{refused} 429s for {ok} deliveries ({refused_early} before it settled)"
    );
    assert_eq!(refused, refused_early, "429s after the limit settled");
    // Status shows the host's shared limit and its latency.
    let host = sink.actor(0, "f0").unwrap().host;
    let mut shown = None;
    for _ in 0..50 {
        let s = app
            .admin()
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        shown = s.busy_hosts.into_iter().find(|h| h.host == host);
        if shown.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let shown = shown.expect("the host in status");
    // The shared limit, one of it kept for interactive deliveries.
    assert!(shown.limit <= 4 && shown.limit >= 1, "{shown:?}");
    assert!(
        shown.deliveries >= 100 && shown.latency_ms >= 90,
        "{shown:?}"
    );
    app.stop().await;
}

/// A host that failed (503s cut its limit to 1) and then answers fast:
/// its limit grows back to the maximum.
async fn the_limit_grows_back_when_the_host_is_fast(backend: Backend) {
    const FOLLOWERS: usize = 100;
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![
                ("STAMPEDE_HOST_CONCURRENCY", "6".into()),
                ("STAMPEDE_CIRCUIT_FAILURES", "1000".into()),
                ("STAMPEDE_RETRY_SCHEDULE_SECS", "5,5,5,5,5,5".into()),
            ],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = one_host(&app, FOLLOWERS).await;
    sink.set_behavior(0, Behavior::Status(503)).unwrap();
    publish_posts(&app, 1).await;
    wait_for("503s", Duration::from_secs(30), || async {
        sink.received(0).len() >= 10
    })
    .await;
    sink.set_behavior(0, Behavior::Slow(Duration::from_millis(100)))
        .unwrap();
    sink.reset_max_in_flight(0);
    publish_posts(&app, 3).await;
    wait_for("every post delivered", Duration::from_secs(90), || async {
        statuses(&sink).0 >= 4 * FOLLOWERS
    })
    .await;
    // The maximum but the one slot kept for interactive deliveries.
    assert_eq!(sink.max_in_flight(0), 5, "grew back to the maximum");
    app.stop().await;
}

crate::both_backends!(
    the_limit_settles_under_what_the_host_serves,
    the_limit_grows_back_when_the_host_is_fast
);

/// Healthy hosts' arrival times, sorted, with `slow` of `hosts` servers
/// (the last ones) answering in 2–5 s.
async fn healthy_arrivals(hosts: usize, slow: usize) -> (Duration, Duration) {
    const PER_HOST: usize = 8;
    const POSTS: usize = 3;
    let app = spawn_app(Backend::External, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions {
        servers: hosts,
        shared_inbox: std::sync::Arc::new(|_| false),
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let alice = app.create_actor("alice").await;
    // Followers interleaved by host, so the slow hosts' jobs are spread
    // through the queue.
    let f: Vec<_> = (0..PER_HOST)
        .flat_map(|n| (0..hosts).map(move |i| (i, n)))
        .map(|(i, n)| sink.actor(i, &format!("f{n}")).unwrap())
        .collect();
    app.seed_followers(alice, &f).await;
    for i in hosts - slow..hosts {
        let ms = 2000 + 3000 * (i - (hosts - slow)) as u64 / slow.max(1) as u64;
        sink.set_behavior(i, Behavior::Slow(Duration::from_millis(ms)))
            .unwrap();
    }
    let healthy = hosts - slow;
    let started = Instant::now();
    publish_posts(&app, POSTS).await;
    wait_for(
        "every healthy inbox's posts",
        Duration::from_secs(120),
        || async {
            (0..healthy).all(|i| accepted(&sink, i).values().sum::<usize>() == PER_HOST * POSTS)
        },
    )
    .await;
    let took = started.elapsed();
    let mut at: Vec<Instant> = (0..healthy)
        .flat_map(|i| sink.received(i).into_iter().map(|r| r.at))
        .collect();
    at.sort();
    let gap = at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    app.stop().await;
    (took, gap)
}

/// 20 % of the hosts answer in 2–5 s: the healthy ones get their posts as
/// fast as in a clean run, in a steady stream (the slow hosts' jobs hold at
/// most half of the worker's prefetch, so they cannot fill it and make
/// every host wait for them in waves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_hosts_do_not_hold_up_the_healthy_ones() {
    let (clean, clean_gap) = healthy_arrivals(50, 0).await;
    let (with_slow, gap) = healthy_arrivals(50, 10).await;
    eprintln!("healthy hosts: {clean:?} clean (gap {clean_gap:?}), {with_slow:?} with 10 slow (gap {gap:?})");
    assert!(
        with_slow <= clean.mul_f64(1.2) + Duration::from_millis(500),
        "healthy hosts took {with_slow:?} with slow hosts around, {clean:?} without"
    );
    assert!(
        gap < Duration::from_millis(1000),
        "healthy deliveries came in waves: a {gap:?} pause"
    );
}
