//! Crash safety on the real backends: the broker connection cut under load,
//! and a delivery worker killed with -9 mid-batch.
use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use stampede_core::activity::public_note;
use stampede_sink::{Behavior, Sink, SinkOptions};
use tokio::process::Command;

use crate::helpers::{amqp_url, free_port, spawn_app, wait_for, AppOptions, Backend, Proxy};

/// Copies of each activity a server accepted.
fn accepted(sink: &Sink, i: usize) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in sink.received(i) {
        if r.body["type"] == "Create" && (200..300).contains(&r.status) {
            *m.entry(r.activity_id.unwrap_or_default()).or_insert(0) += 1;
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_connection_cut_under_load_loses_nothing() {
    let upstream = {
        let u = url::Url::parse(&amqp_url()).unwrap();
        let addr = format!("{}:{}", u.host_str().unwrap(), u.port().unwrap_or(5672));
        tokio::net::lookup_host(addr).await.unwrap().next().unwrap()
    };
    let proxy = Proxy::start(upstream).await;
    let via_proxy = {
        let mut u = url::Url::parse(&amqp_url()).unwrap();
        u.set_host(Some("127.0.0.1")).unwrap();
        u.set_port(Some(proxy.port)).unwrap();
        u.to_string()
    };
    let app = spawn_app(
        Backend::External,
        AppOptions {
            extra: vec![
                ("STAMPEDE_AMQP_URL", via_proxy),
                ("STAMPEDE_RETRY_SCHEDULE_SECS", "1,1,1,1,1,1,1,1,1,1".into()),
            ],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions {
        servers: 20,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let alice = app.create_actor("alice").await;
    let followers: Vec<_> = (0..20).map(|i| sink.actor(i, "f").unwrap()).collect();
    app.seed_followers(alice, &followers).await;
    // Slow answers keep deliveries in flight when the cut comes.
    for i in 0..20 {
        sink.set_behavior(i, Behavior::Slow(Duration::from_millis(300)))
            .unwrap();
    }
    let actor_id = format!("{}/users/alice", app.http_base);
    let mut confirmed = Vec::new();
    let mut refused = 0;
    for k in 0..30 {
        if k == 10 {
            proxy.cut_and_block();
            wait_for("delivery not ready", Duration::from_secs(10), || async {
                app.readyz("delivery").await == 503
            })
            .await;
        }
        if k == 15 {
            proxy.unblock();
        }
        // A Publish that fails (the broker is away) is retried by the
        // application; one that succeeded must be delivered.
        loop {
            match app
                .publish("alice", &public_note(&actor_id, &format!("post {k}")), "")
                .await
            {
                Ok(r) => {
                    confirmed.push(r.activity_id);
                    break;
                }
                Err(_) => {
                    refused += 1;
                    proxy.unblock();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for("ready again", Duration::from_secs(30), || async {
        app.readyz("delivery").await == 200 && app.readyz("ingest").await == 200
    })
    .await;
    wait_for(
        "every confirmed post at every server",
        Duration::from_secs(90),
        || async {
            (0..20).all(|i| {
                let got = accepted(&sink, i);
                confirmed.iter().all(|id| got.contains_key(id))
            })
        },
    )
    .await;
    let duplicates: usize = (0..20)
        .flat_map(|i| accepted(&sink, i).into_values())
        .map(|n| n - 1)
        .sum();
    println!(
        "confirmed {} posts ({refused} publishes refused while the broker was away), {duplicates} duplicate deliveries",
        confirmed.len()
    );
    app.stop().await;
}

const BIN: &str = env!("CARGO_BIN_EXE_stampede-e2e");

/// `stampede serve delivery` as a child process of this deployment.
fn delivery_worker(env: &HashMap<&'static str, String>) -> tokio::process::Child {
    Command::new(BIN)
        .args(["serve", "delivery"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("STAMPEDE_GRPC_ADDR", format!("127.0.0.1:{}", free_port()))
        .env(
            "STAMPEDE_METRICS_ADDR",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// 64 servers, 4 posts: 256 deliveries. Each server answers after 2 s, so
/// a worker holding 64 messages delivers in waves; it is killed in the
/// middle of the second wave (the first recorded and acknowledged, the
/// second in flight). A new worker must deliver the second wave and the
/// rest, and re-send nothing of the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_delivery_worker_mid_batch_loses_nothing_and_resends_nothing() {
    const SERVERS: usize = 64;
    const POSTS: usize = 4;
    let app = spawn_app(
        Backend::External,
        AppOptions {
            extra: vec![("STAMPEDE_PREFETCH", "64".into())],
            skip: vec!["delivery"],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions {
        servers: SERVERS,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let alice = app.create_actor("alice").await;
    let followers: Vec<_> = (0..SERVERS).map(|i| sink.actor(i, "f").unwrap()).collect();
    app.seed_followers(alice, &followers).await;
    for i in 0..SERVERS {
        sink.set_behavior(i, Behavior::Slow(Duration::from_secs(2)))
            .unwrap();
    }
    let actor_id = format!("{}/users/alice", app.http_base);
    for k in 0..POSTS {
        app.publish("alice", &public_note(&actor_id, &format!("post {k}")), "")
            .await
            .unwrap();
    }
    let total = |sink: &Sink| -> usize {
        (0..SERVERS)
            .map(|i| accepted(sink, i).values().sum::<usize>())
            .sum()
    };
    wait_for(
        "all delivery jobs queued",
        Duration::from_secs(30),
        || async { app.store.totals().await.unwrap().activities == POSTS as u64 },
    )
    .await;
    let mut worker = delivery_worker(&app.env);
    wait_for("the first wave", Duration::from_secs(60), || async {
        total(&sink) >= SERVERS
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = total(&sink);
    assert!(first < SERVERS * POSTS, "all delivered before the kill");
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();

    let mut worker = delivery_worker(&app.env);
    wait_for(
        "every post at every server",
        Duration::from_secs(90),
        || async { (0..SERVERS).all(|i| accepted(&sink, i).len() == POSTS) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..SERVERS {
        for (id, n) in accepted(&sink, i) {
            assert_eq!(n, 1, "server {i} got {id} {n} times");
        }
    }
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();
    app.stop().await;
}
