//! The three-node RabbitMQ cluster of `scripts/cluster`, through
//! `stampede_tests::cluster`: stampede's quorum queues on it keep taking and
//! giving messages with one node killed, and the node comes back into the
//! cluster when started again.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use stampede_backends::queue::amqp::AmqpQueue;
use stampede_backends::queue::{OutMessage, Queue, QueueName};
use stampede_core::activity::public_note;
use stampede_proto::api::{PublishRequest, StatusRequest};
use stampede_sink::{Behavior, SendOptions, Sink, SinkOptions};
use stampede_tests::cluster;

use crate::faults::{copies, delivered, read_stream, services_report, timed_send, SERVICES};
use crate::helpers::{spawn_app, wait_for, AppOptions, Backend};

fn message(i: u8) -> OutMessage {
    OutMessage {
        kind: "stampede.test.v1.Probe",
        payload: vec![i],
        route: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_on_the_cluster_work_with_a_node_killed() {
    let _exclusive = cluster::exclusive().await;
    let _restore = cluster::Restore;
    let urls = tokio::task::spawn_blocking(cluster::ensure_up)
        .await
        .unwrap();
    assert_eq!(urls[0], cluster::url("rc1"));
    assert_eq!(urls.len(), 3);
    let ns = format!(
        "stampede_cl{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    // Through rc1: its queues' leaders are there (client-local), rc2 and
    // rc3 hold the other replicas.
    let q = AmqpQueue::connect(&urls[0], &ns, "stampede-test")
        .await
        .unwrap();
    q.publish(QueueName::Fanout, message(1)).await.unwrap();
    tokio::task::spawn_blocking(|| cluster::kill("rc2"))
        .await
        .unwrap();
    let status = tokio::task::spawn_blocking(cluster::status).await.unwrap();
    assert!(status.contains("rc2@localhost down"), "{status}");
    // Two of three: still a majority, publishes are confirmed.
    q.publish(QueueName::Fanout, message(2)).await.unwrap();
    let mut c = q.consume(QueueName::Fanout, 10).await.unwrap();
    for want in [1, 2] {
        let m = tokio::time::timeout(Duration::from_secs(30), c.next())
            .await
            .expect("a message within 30 s")
            .unwrap()
            .unwrap();
        assert_eq!(m.payload[..], [want]);
        m.acker.ack().await.unwrap();
    }
    drop(c);
    tokio::task::spawn_blocking(|| cluster::start("2"))
        .await
        .unwrap();
    let status = tokio::task::spawn_blocking(cluster::status).await.unwrap();
    assert!(
        status.contains("running: rc1@localhost rc2@localhost rc3@localhost"),
        "{status}"
    );
    // ensure_up after a kill asks the script again, which finds all up.
    let again = tokio::task::spawn_blocking(cluster::ensure_up)
        .await
        .unwrap();
    assert_eq!(again, urls);
    q.delete_all().await.unwrap();
}

/// What a broker test does to the cluster while deliveries are in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BrokerFault {
    /// rc1, the first of every process's list (all are connected to it),
    /// killed with -9 and started again at the end.
    FirstNodeKilled,
    /// All three killed with -9, for `OUTAGE`, and started again.
    AllKilled,
}

impl BrokerFault {
    fn name(self) -> &'static str {
        match self {
            BrokerFault::FirstNodeKilled => "broker node rc1 killed",
            BrokerFault::AllKilled => "whole broker killed and restarted",
        }
    }
}

const SERVERS: usize = 10;
const PER_SERVER: usize = 20;
/// Server `EXTRA` holds bob, who sends to our inboxes.
const EXTRA: usize = SERVERS;
const SHARDS: &str = "3";
/// How long the whole broker stays down.
const OUTAGE: Duration = Duration::from_secs(40);
/// When (seconds into the outage) a Publish and a signed inbound POST are
/// sent and waited for: the first is answered before the broker's return,
/// the second after it.
const PROBES: [u64; 2] = [5, 30];
/// Every inbox has the post within this of the failover or the return.
const RECOVERY: Duration = Duration::from_secs(60);

fn like(sink: &Sink, n: usize) -> serde_json::Value {
    let bob = sink.actor(EXTRA, "bob").unwrap();
    json!({
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": format!("{}/likes/broker-{n}", bob.id),
        "type": "Like",
        "actor": bob.id,
        "object": "https://elsewhere.example/notes/1",
    })
}

/// Lines of `log` that contain `needle`, their timestamps kept.
fn lines_with(log: &str, needle: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// All four services as processes on the cluster (the three URLs, K=3
/// delivery shards); 200 inboxes on 10 fake servers answering in 300 ms;
/// the fault while their post is being delivered. See the tests.
async fn broker_fault_under_load(fault: BrokerFault) {
    let test_started = Instant::now();
    let _exclusive = cluster::exclusive().await;
    let urls = tokio::task::spawn_blocking(cluster::url_list)
        .await
        .unwrap();
    let restore = cluster::Restore;
    let mut app = spawn_app(
        Backend::External,
        AppOptions {
            processes: SERVICES.to_vec(),
            amqp_url: Some(urls),
            extra: vec![
                ("STAMPEDE_DELIVERY_SHARDS", SHARDS.into()),
                ("STAMPEDE_HOST_CONCURRENCY", "4".into()),
                // Few jobs held per consumer (3 classes x 3 shards x 8):
                // most of the post waits in the broker when it fails.
                ("STAMPEDE_PREFETCH", "8".into()),
                ("STAMPEDE_RETRY_SCHEDULE_SECS", "1,2,2,4,4,4,4,4,4,4".into()),
                ("RUST_LOG", "info,stampede_delivery=debug".into()),
            ],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Arc::new(
        Sink::start(SinkOptions {
            servers: SERVERS + 1,
            shared_inbox: Arc::new(|_| false),
            ..SinkOptions::default()
        })
        .await
        .unwrap(),
    );
    let alice = app.create_actor("alice").await;
    let followers: Vec<_> = (0..SERVERS)
        .flat_map(|i| (0..PER_SERVER).map(move |n| (i, n)))
        .map(|(i, n)| sink.actor(i, &format!("f{n}")).unwrap())
        .collect();
    app.seed_followers(alice, &followers).await;
    for i in 0..SERVERS {
        sink.set_behavior(i, Behavior::Slow(Duration::from_millis(300)))
            .unwrap();
    }
    let alice_id = format!("{}/users/alice", app.http_base);
    let shared = format!("{}/inbox", app.http_base);
    // bob's key fetched and cached before the fault.
    let mut statuses: Vec<(String, u16)> = Vec::new();
    let first = like(&sink, 0);
    let r = sink
        .send(EXTRA, "bob", &shared, &first, SendOptions::default())
        .await
        .unwrap();
    statuses.push((first["id"].as_str().unwrap().to_string(), r.status));
    let post = app
        .publish("alice", &public_note(&alice_id, "failover"), "")
        .await
        .unwrap()
        .activity_id;
    let all = SERVERS * PER_SERVER;
    wait_for("the first deliveries", Duration::from_secs(30), || async {
        delivered(&sink, 0..SERVERS, &post).0 >= 30
    })
    .await;
    let before = delivered(&sink, 0..SERVERS, &post).0;
    let fault_at = Instant::now();
    let mut problems: Vec<String> = Vec::new();
    let mut n = 1;
    let mut during_posts: Vec<String> = Vec::new();
    // The texts of the posts whose Publish failed.
    let mut refused_posts: Vec<String> = Vec::new();
    let back = match fault {
        BrokerFault::FirstNodeKilled => {
            tokio::task::spawn_blocking(|| cluster::kill("rc1"))
                .await
                .unwrap();
            println!(
                "[{}] rc1 killed after {before} of {all} inboxes had the post ({:?} to kill)",
                fault.name(),
                fault_at.elapsed()
            );
            // Readiness right after, and until every service is back.
            let mut seen: HashMap<&str, Vec<(Duration, u16)>> = HashMap::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let mut all_ready = true;
                for s in SERVICES {
                    let r = app.readyz(s).await;
                    let v = seen.entry(s).or_default();
                    if v.last().map(|l| l.1) != Some(r) {
                        v.push((fault_at.elapsed(), r));
                    }
                    all_ready &= r == 200;
                }
                if all_ready || Instant::now() > deadline {
                    if !all_ready {
                        problems.push(format!(
                            "not every service ready 30 s after rc1 went: {seen:?}"
                        ));
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            println!(
                "[{}] readiness (time after the kill, status) changes: {seen:?}",
                fault.name()
            );
            fault_at
        }
        BrokerFault::AllKilled => {
            tokio::task::spawn_blocking(cluster::kill_all)
                .await
                .unwrap();
            println!(
                "[{}] all three nodes killed after {before} of {all} inboxes had the post ({:?} to kill)",
                fault.name(),
                fault_at.elapsed()
            );
            let personal = format!("{alice_id}/inbox");
            let mut sends = Vec::new();
            let mut readiness: Vec<(&str, (u16, String))> = Vec::new();
            let mut probes = Vec::new();
            while fault_at.elapsed() < OUTAGE {
                let inbox = if n % 2 == 0 { &shared } else { &personal }.clone();
                let a = like(&sink, n);
                n += 1;
                let sink2 = sink.clone();
                sends.push(tokio::spawn(async move {
                    timed_send(&sink2, EXTRA, &inbox, &a).await
                }));
                if probes.len() < PROBES.len()
                    && fault_at.elapsed() > Duration::from_secs(PROBES[probes.len()])
                {
                    if readiness.is_empty() {
                        for s in SERVICES {
                            readiness.push((s, app.readyz_text(s).await));
                        }
                    }
                    let probe = 10_000 + probes.len();
                    // A Publish, and a signed POST to the edge (the sink's
                    // own client gives up after 10 s), each waited for up
                    // to 60 s: how long they are held, and what they
                    // answer.
                    let mut publisher = app.publisher();
                    let note = public_note(&alice_id, &format!("during {probe}"));
                    let publish_task = tokio::spawn(async move {
                        let started = Instant::now();
                        let r = tokio::time::timeout(
                            Duration::from_secs(60),
                            publisher.publish(PublishRequest {
                                actor: "alice".into(),
                                activity_json: note.to_string(),
                                idempotency_key: String::new(),
                            }),
                        )
                        .await;
                        let r = match r {
                            Ok(r) => r
                                .map(|r| r.into_inner().activity_id)
                                .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
                            Err(_) => Err("no answer in 60 s".to_string()),
                        };
                        (started.elapsed(), r)
                    });
                    let (url, body) = (shared.clone(), like(&sink, probe).to_string());
                    let headers = sink
                        .signed_headers(EXTRA, "bob", &url, body.as_bytes())
                        .await
                        .unwrap();
                    let raw_task = tokio::spawn(async move {
                        let started = Instant::now();
                        let mut req = reqwest::Client::new().post(url);
                        for (k, v) in headers {
                            if k != "host" {
                                req = req.header(k, v);
                            }
                        }
                        let r = req.body(body).timeout(Duration::from_secs(60)).send().await;
                        let r = match r {
                            Ok(r) => Ok((
                                r.status().as_u16(),
                                r.headers()
                                    .get("retry-after")
                                    .map(|v| v.to_str().unwrap_or_default().to_string()),
                                r.text().await.unwrap_or_default(),
                            )),
                            Err(e) => Err(e.to_string()),
                        };
                        (started.elapsed(), r)
                    });
                    probes.push((PROBES[probes.len()], probe, publish_task, raw_task));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            for (s, (status, body)) in &readiness {
                println!(
                    "[{}] {s} /readyz while down: {status} {}",
                    fault.name(),
                    body.trim()
                );
                if *status == 200 {
                    problems.push(format!("{s} said ready with the whole broker down"));
                }
            }
            let during = delivered(&sink, 0..SERVERS, &post).0;
            let restart_at = Instant::now();
            tokio::task::spawn_blocking(cluster::ensure_up)
                .await
                .unwrap();
            let back = Instant::now();
            let healed = cluster::take_healed();
            if !healed.is_empty() {
                println!(
                    "[{}] RabbitMQ lost rabbit_fifo_dlx_sup on a restarted node (restarted by the test): {healed:?}",
                    fault.name()
                );
            }
            println!(
                "[{}] {during} of {all} inboxes had the post when the nodes were started again, {:?} after the kill; the three were up {:?} later",
                fault.name(),
                restart_at - fault_at,
                back - restart_at
            );
            let mut by_status: HashMap<u16, (usize, Option<String>, Duration)> = HashMap::new();
            for h in sends {
                let (id, status, ra, took) = h.await.unwrap();
                let e = by_status.entry(status).or_insert((0, ra, took));
                e.0 += 1;
                e.2 = e.2.max(took);
                statuses.push((id, status));
            }
            println!(
                "[{}] inbound POSTs while down (status: count, Retry-After, slowest answer; 0 = no answer, 1 = none in 15 s): {by_status:?}",
                fault.name()
            );
            let mut ready_at: HashMap<&str, Duration> = HashMap::new();
            let deadline = back + RECOVERY;
            while ready_at.len() < SERVICES.len() && Instant::now() < deadline {
                for s in SERVICES {
                    if !ready_at.contains_key(s) && app.readyz(s).await == 200 {
                        ready_at.insert(s, back.elapsed());
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            println!(
                "[{}] ready again after the nodes were up: {ready_at:?}",
                fault.name()
            );
            for (at, probe, publish_task, raw_task) in probes {
                let (took, r) = raw_task.await.unwrap();
                println!(
                    "[{}] a signed POST to the shared inbox sent {at} s into the outage answered after {took:?} (status, Retry-After, body): {r:?}",
                    fault.name()
                );
                if let Ok((status, _, _)) = &r {
                    let id = like(&sink, probe)["id"].as_str().unwrap().to_string();
                    statuses.push((id, *status));
                }
                let (took, r) = publish_task.await.unwrap();
                println!(
                    "[{}] a Publish sent {at} s into the outage answered after {took:?}: {r:?}",
                    fault.name()
                );
                match r {
                    Ok(id) => during_posts.push(id),
                    Err(_) => refused_posts.push(format!("during {probe}")),
                }
            }
            if ready_at.len() < SERVICES.len() {
                problems.push(format!(
                    "only {ready_at:?} ready again {RECOVERY:?} after the broker's return"
                ));
            }
            back
        }
    };
    // An inbound activity after the fault, through the node(s) left.
    let after = like(&sink, n);
    let sent_at = Instant::now();
    let status = match sink
        .send(EXTRA, "bob", &shared, &after, SendOptions::default())
        .await
    {
        Ok(r) => r.status,
        Err(e) => {
            problems.push(format!(
                "an inbound POST after the fault had no answer in {:?}: {e}",
                sent_at.elapsed()
            ));
            0
        }
    };
    println!(
        "[{}] an inbound POST after recovery answered {status} in {:?}",
        fault.name(),
        sent_at.elapsed()
    );
    statuses.push((after["id"].as_str().unwrap().to_string(), status));
    let mut all_at = None;
    while back.elapsed() < RECOVERY {
        if delivered(&sink, 0..SERVERS, &post).0 == all {
            all_at = Some(back.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "[{}] every inbox had the post {all_at:?} after the {}",
        fault.name(),
        if fault == BrokerFault::AllKilled {
            "return"
        } else {
            "kill"
        }
    );
    if all_at.is_none() {
        problems.push(format!(
            "{} of {all} inboxes had the post {RECOVERY:?} after the fault",
            delivered(&sink, 0..SERVERS, &post).0
        ));
    }
    // Every process says it reconnected.
    let mut restored: Vec<String> = Vec::new();
    wait_for_quietly(Duration::from_secs(30), || {
        restored = SERVICES
            .iter()
            .filter(|s| lines_with(&app.logs(s), "broker connection restored").is_empty())
            .map(|s| s.to_string())
            .collect();
        restored.is_empty()
    })
    .await;
    if !restored.is_empty() {
        problems.push(format!(
            "never logged \"broker connection restored\": {restored:?}"
        ));
    }
    for s in SERVICES {
        let log = app.logs(s);
        for needle in [
            "broker connection lost",
            "broker connection restored",
            "consumer lost",
            "not confirmed",
        ] {
            let l = lines_with(&log, needle);
            if let Some(first) = l.first() {
                println!("[{}] {s}: {} x {first}", fault.name(), l.len());
            }
        }
    }
    // Status answers.
    match tokio::time::timeout(
        Duration::from_secs(10),
        app.admin().status(StatusRequest {}),
    )
    .await
    {
        Ok(Ok(_)) => {}
        other => problems.push(format!("Status after the fault: {other:?}")),
    }
    // Every activity answered 202 on the stream once.
    let accepted: Vec<String> = statuses
        .iter()
        .filter(|(_, s)| *s == 202)
        .map(|(id, _)| id.clone())
        .collect();
    let stream = read_stream(
        &app.grpc,
        &accepted,
        Instant::now() + RECOVERY,
        Duration::from_secs(3),
    )
    .await;
    let missing: Vec<_> = accepted
        .iter()
        .filter(|id| !stream.contains_key(*id))
        .collect();
    let twice: Vec<_> = stream.iter().filter(|(_, (k, _))| *k > 1).collect();
    println!(
        "[{}] inbound: {} answered 202, {} of them on the stream, {} on it more than once",
        fault.name(),
        accepted.len(),
        accepted.len() - missing.len(),
        twice.len()
    );
    if !missing.is_empty() {
        problems.push(format!("answered 202, never on the stream: {missing:?}"));
    }
    if !twice.is_empty() {
        problems.push(format!("on the stream more than once: {twice:?}"));
    }
    // Past the delivery's in-flight parking (5 s): no copy twice.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (_, extra) = delivered(&sink, 0..SERVERS, &post);
    let twice_inboxes: Vec<_> = (0..SERVERS)
        .flat_map(|i| copies(&sink, i).into_iter().map(move |(k, c)| (i, k, c)))
        .filter(|(_, _, c)| *c > 1)
        .map(|(i, (path, _), c)| format!("server {i} {path} x{c}"))
        .collect();
    println!(
        "[{}] {extra} extra copies of the post at {} inboxes: {:?}",
        fault.name(),
        twice_inboxes.len(),
        twice_inboxes
    );
    if extra > 0 {
        problems.push(format!(
            "{extra} duplicate POSTs of the post: {twice_inboxes:?}"
        ));
    }
    // A Publish answered OK during the outage is delivered, once.
    for text in &refused_posts {
        let got = (0..SERVERS)
            .flat_map(|i| sink.received(i))
            .filter(|r| {
                r.body["type"] == "Create"
                    && r.body["object"]["content"]
                        .to_string()
                        .contains(text.as_str())
            })
            .count();
        println!(
            "[{}] the post \"{text}\", whose Publish failed, reached {got} inboxes",
            fault.name()
        );
    }
    for id in &during_posts {
        let deadline = Instant::now() + RECOVERY;
        while Instant::now() < deadline && delivered(&sink, 0..SERVERS, id).0 < all {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        let (got, extra) = delivered(&sink, 0..SERVERS, id);
        println!(
            "[{}] the post published during the outage: {got} of {all} inboxes, {extra} extra copies",
            fault.name()
        );
        if got < all || extra > 0 {
            problems.push(format!(
                "the post published (OK) during the outage reached {got} of {all} inboxes with {extra} extra copies"
            ));
        }
    }
    services_report(&mut app, fault.name(), &SERVICES, &mut problems);
    if !problems.is_empty() {
        app.keep_logs();
    }
    // The three nodes up before the queues are deleted.
    drop(restore);
    let status = tokio::task::spawn_blocking(cluster::status).await.unwrap();
    assert!(
        status.contains("running: rc1@localhost rc2@localhost rc3@localhost"),
        "{status}"
    );
    app.stop().await;
    println!(
        "[{}] the test took {:?}",
        fault.name(),
        test_started.elapsed()
    );
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Polls `cond` until it holds or `limit` passes (no panic: the caller
/// reports).
async fn wait_for_quietly(limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() && start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// rc1, every process's broker, killed with -9 while 200 deliveries are in
/// flight: every process moves to the next node, every inbox gets the post
/// exactly once, readiness and Status recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_broker_node_killed_under_load_loses_and_repeats_nothing() {
    broker_fault_under_load(BrokerFault::FirstNodeKilled).await;
}

/// All three nodes killed with -9 for 20 s while deliveries are in flight,
/// then started again: nothing accepted is lost, nothing sent twice, the
/// processes recover by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_broker_killed_and_restarted_under_load_loses_and_repeats_nothing() {
    broker_fault_under_load(BrokerFault::AllKilled).await;
}
