//! Crash safety on the real backends: the broker connection cut under load,
//! a delivery worker killed with -9 mid-batch, and one out of file
//! descriptors.
use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use stampede_core::activity::public_note;
use stampede_sink::{Behavior, Sink, SinkOptions};
use tokio::process::Command;

use crate::helpers::{
    amqp_url, free_port, redis_url, spawn_app, wait_for, AppOptions, Backend, Proxy,
};

/// Copies of each activity a server accepted.
pub(crate) fn accepted(sink: &Sink, i: usize) -> HashMap<String, usize> {
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

/// `stampede serve delivery` as a child process of this deployment, its
/// `/metrics` on `metrics_port`.
pub(crate) fn delivery_worker(
    env: &HashMap<&'static str, String>,
    metrics_port: u16,
) -> tokio::process::Child {
    Command::new(BIN)
        .args(["serve", "delivery"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("STAMPEDE_GRPC_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("STAMPEDE_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
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
    let mut worker = delivery_worker(&app.env, free_port());
    wait_for("the first wave", Duration::from_secs(60), || async {
        total(&sink) >= SERVERS
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = total(&sink);
    assert!(first < SERVERS * POSTS, "all delivered before the kill");
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();

    let mut worker = delivery_worker(&app.env, free_port());
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

/// Sets a process's open-file limits (soft, hard) when `new` is given;
/// returns the ones it had.
fn set_nofile(pid: u32, new: Option<(u64, u64)>) -> (u64, u64) {
    let (mut soft, mut hard) = (0, 0);
    rlimit::prlimit(
        pid as i32,
        rlimit::Resource::NOFILE,
        new,
        Some((&mut soft, &mut hard)),
    )
    .unwrap();
    (soft, hard)
}

/// Descriptors a process has open.
fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64
}

/// A delivery worker out of file descriptors cannot open connections: those
/// jobs are parked (not an attempt) and no host is held responsible, so
/// running out does not open the circuits of healthy hosts. Once
/// descriptors are back, every follower gets the post.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_out_of_descriptors_blames_no_host_and_loses_nothing() {
    const SERVERS: usize = 24;
    let app = spawn_app(
        Backend::External,
        AppOptions {
            skip: vec!["delivery"],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions {
        servers: 2 * SERVERS,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    // "warm" is followed on the first half of the servers, "alice" on the rest.
    let warm = app.create_actor("warm").await;
    let alice = app.create_actor("alice").await;
    let first: Vec<_> = (0..SERVERS).map(|i| sink.actor(i, "f").unwrap()).collect();
    let second: Vec<_> = (SERVERS..2 * SERVERS)
        .map(|i| sink.actor(i, "f").unwrap())
        .collect();
    app.seed_followers(warm, &first).await;
    app.seed_followers(alice, &second).await;
    let metrics_port = free_port();
    let mut worker = delivery_worker(&app.env, metrics_port);
    let pid = worker.id().unwrap();
    let delivered = |range: std::ops::Range<usize>| -> usize {
        range
            .map(|i| accepted(&sink, i).values().sum::<usize>())
            .sum()
    };
    // A first post opens the worker's database, broker and cache connections.
    let warm_id = format!("{}/users/warm", app.http_base);
    app.publish("warm", &public_note(&warm_id, "warm-up"), "")
        .await
        .unwrap();
    wait_for("the warm-up post", Duration::from_secs(60), || async {
        delivered(0..SERVERS) == SERVERS
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Room for four more descriptors, then a post to 24 new hosts.
    let (soft, hard) = set_nofile(pid, None);
    let tight = open_fds(pid) + 4;
    set_nofile(pid, Some((tight, hard)));
    let alice_id = format!("{}/users/alice", app.http_base);
    app.publish("alice", &public_note(&alice_id, "hello"), "")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let while_short = delivered(SERVERS..2 * SERVERS);
    assert!(
        while_short < SERVERS,
        "every host was reached with {tight} descriptors"
    );
    set_nofile(pid, Some((soft, hard)));
    wait_for(
        "every follower to get the post",
        Duration::from_secs(60),
        || async { delivered(SERVERS..2 * SERVERS) >= SERVERS },
    )
    .await;
    for i in SERVERS..2 * SERVERS {
        assert_eq!(accepted(&sink, i).len(), 1, "server {i}");
    }
    let text = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |outcome: &str| -> f64 {
        let want = format!("stampede_deliveries_total{{outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&want))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    };
    assert!(count("local_exhausted") >= 1.0, "{text}");
    assert_eq!(count("retry"), 0.0, "{text}");
    assert_eq!(count("failed"), 0.0, "{text}");
    let cache = stampede_backends::cache::redis::RedisCache::connect(&redis_url(), &app.namespace)
        .await
        .unwrap();
    for i in SERVERS..2 * SERVERS {
        let host = sink.addr(i).unwrap().to_string();
        let fails = stampede_backends::cache::Cache::get(&cache, &format!("health:fails:{host}"))
            .await
            .unwrap();
        assert!(fails.is_none(), "{host} was counted as failing");
    }
    worker.kill().await.unwrap();
    app.stop().await;
}

/// A consumer started again after its broker connection went, while its
/// caller keeps giving up on `next()` for other work (as a worker's
/// `select!` does whenever a handler finishes): no start dropped midway is
/// left behind as a second consumer nobody reads (it would hold its
/// prefetch of messages until the connection closes; seen after a broker
/// node's death: a whole prefetch of Follows never processed). Every
/// message comes through the one consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_started_again_while_its_caller_gives_up_leaves_no_orphan() {
    use stampede_backends::queue::amqp::AmqpQueue;
    use stampede_backends::queue::{OutMessage, Queue, QueueName};
    const MESSAGES: usize = 40;
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
    let ns = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let q = AmqpQueue::connect(&via_proxy, &ns, "orphan-test")
        .await
        .unwrap();
    let mut consumer = q.consume(QueueName::Fanout, 4).await.unwrap();
    proxy.cut_and_block();
    wait_for("the connection lost", Duration::from_secs(10), || async {
        !q.is_connected()
    })
    .await;
    proxy.unblock();
    // Gives up on `next()` after 0.1 to 2 ms, a thousand times, through
    // the reconnection and the consumer's new start (nothing is published
    // yet: each call ends by its timeout).
    for i in 0..1000u64 {
        let wait = Duration::from_micros(100 + (i * 97) % 1900);
        let got = tokio::time::timeout(wait, consumer.next()).await;
        assert!(got.is_err(), "a message before any was published");
    }
    wait_for("connected again", Duration::from_secs(20), || async {
        q.is_connected()
    })
    .await;
    for k in 0..MESSAGES {
        q.publish(
            QueueName::Fanout,
            OutMessage {
                kind: stampede_proto::kinds::DELIVERY_JOB,
                payload: format!("m{k}").into_bytes(),
                route: None,
            },
        )
        .await
        .unwrap();
    }
    let mut got = 0;
    while got < MESSAGES {
        let msg = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .unwrap_or_else(|_| {
                panic!("{got} of {MESSAGES} came through the consumer; the rest are held elsewhere")
            })
            .expect("the consumer ended")
            .unwrap();
        msg.acker.ack().await.unwrap();
        got += 1;
    }
    let consumers = q
        .depths()
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.name == QueueName::Fanout)
        .unwrap()
        .consumers;
    assert_eq!(consumers, 1, "consumers of the queue, orphans included");
    drop(consumer);
    q.delete_all().await.unwrap();
}
