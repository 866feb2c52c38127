//! `stampede up` with its data directory on a small filesystem that fills
//! up (a tmpfs of its own, `stampede_tests::private_backends::SmallFs`)
//! while deliveries, inbound activities and publishes are going on; then
//! the space comes back. What it answers meanwhile (statuses of inbox
//! POSTs and of Publish, readiness, what it logs) is printed for the
//! README's "When a backend fails"; asserted: it keeps running, nothing it
//! accepted (a 202, a Publish answered OK) is lost or repeated, and it
//! recovers by itself within seconds of the space's return.
use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use stampede_core::activity::public_note;
use stampede_proto::api::actor_service_client::ActorServiceClient;
use stampede_proto::api::publish_service_client::PublishServiceClient;
use stampede_proto::api::{CreateActorRequest, PublishRequest};
use stampede_sink::{Behavior, SendOptions, Sink, SinkOptions};
use stampede_tests::private_backends::SmallFs;
use tonic::transport::Channel;

use crate::faults::{delivered, log_summary, read_stream, timed_send};
use crate::helpers::{free_port, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_stampede-e2e");
/// Servers alice's followers are on (1 s answers); server `SERVERS`
/// hosts bob, who sends to our inboxes.
const SERVERS: usize = 3;
const PER_SERVER: usize = 10;
/// The filesystem's size.
const MEGABYTES: u32 = 16;
/// How long it stays full.
const FULL: Duration = Duration::from_secs(20);
/// Everything accepted delivered within this of the space's return.
const RECOVERY: Duration = Duration::from_secs(30);

/// A Like of `k` by bob.
fn like(sink: &Sink, k: usize) -> serde_json::Value {
    let bob = sink.actor(SERVERS, "bob").unwrap();
    json!({
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": format!("{}/likes/full-{k}", bob.id),
        "type": "Like",
        "actor": bob.id,
        "object": "https://elsewhere.example/notes/1",
    })
}

async fn publish(
    grpc: &Channel,
    base: &str,
    text: &str,
    key: &str,
) -> Result<String, tonic::Status> {
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        PublishServiceClient::new(grpc.clone()).publish(PublishRequest {
            actor: "alice".into(),
            activity_json: public_note(&format!("{base}/users/alice"), text).to_string(),
            idempotency_key: key.into(),
        }),
    )
    .await;
    match r {
        Ok(r) => r.map(|r| r.into_inner().activity_id),
        Err(_) => Err(tonic::Status::deadline_exceeded("no answer in 15 s")),
    }
}

/// Bob's Like `k` to the shared (even) or alice's inbox (odd), sent on a
/// task of its own: its id, status (0 = no answer, 1 = none in 15 s),
/// Retry-After and how long the answer took.
fn send_like(
    sink: &Arc<Sink>,
    base: &str,
    k: usize,
) -> tokio::task::JoinHandle<(String, u16, Option<String>, Duration)> {
    let inbox = if k.is_multiple_of(2) {
        format!("{base}/inbox")
    } else {
        format!("{base}/users/alice/inbox")
    };
    let a = like(sink, k);
    let s = sink.clone();
    tokio::spawn(async move { timed_send(&s, SERVERS, &inbox, &a).await })
}

async fn readyz(http: &reqwest::Client, metrics: u16) -> (u16, String) {
    match http
        .get(format!("http://127.0.0.1:{metrics}/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
    {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_its_disk_full_loses_nothing_and_recovers_by_itself() {
    let fs = SmallFs::mount(MEGABYTES);
    let dir = fs.path().join("data");
    let log = std::env::temp_dir().join(format!(
        "stampede-disk-full-{}.log",
        uuid::Uuid::new_v4().simple()
    ));
    let (http_port, grpc_port, metrics) = (free_port(), free_port(), free_port());
    let base = format!("http://127.0.0.1:{http_port}");
    let child = tokio::process::Command::new(BIN)
        .arg("up")
        .env_clear()
        .env("STAMPEDE_DATA_DIR", &dir)
        .env("STAMPEDE_PUBLIC_URL", &base)
        .env("STAMPEDE_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
        .env("STAMPEDE_GRPC_ADDR", format!("127.0.0.1:{grpc_port}"))
        .env("STAMPEDE_METRICS_ADDR", format!("127.0.0.1:{metrics}"))
        .env("STAMPEDE_ALLOW_PRIVATE_NETWORKS", "true")
        .env("STAMPEDE_RETRY_SCHEDULE_SECS", "1,2,2,4,4,4,4,4,4,4")
        // Two at a time per server, 1 s each: alice's post is still being
        // delivered when the disk fills.
        .env("STAMPEDE_HOST_CONCURRENCY", "2")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    wait_for(
        "stampede up to be ready",
        Duration::from_secs(30),
        || async { readyz(&http, metrics).await.0 == 200 },
    )
    .await;
    let grpc = Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    ActorServiceClient::new(grpc.clone())
        .create_actor(CreateActorRequest {
            name: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let alice = format!("{base}/users/alice");
    let sink = Arc::new(
        Sink::start(SinkOptions {
            servers: SERVERS + 1,
            shared_inbox: Arc::new(|_| false),
            ..SinkOptions::default()
        })
        .await
        .unwrap(),
    );
    for i in 0..SERVERS {
        for n in 0..PER_SERVER {
            let r = sink.follow(i, &format!("f{n}"), &alice).await.unwrap();
            assert_eq!(r.status, 202);
        }
    }
    let all = SERVERS * PER_SERVER;
    wait_for("every Accept", Duration::from_secs(60), || async {
        (0..SERVERS)
            .flat_map(|i| sink.received(i))
            .filter(|r| r.body["type"] == "Accept")
            .count()
            == all
    })
    .await;
    for i in 0..SERVERS {
        sink.set_behavior(i, Behavior::Slow(Duration::from_millis(1000)))
            .unwrap();
    }
    let before = publish(&grpc, &base, "before the disk filled", "")
        .await
        .unwrap();
    wait_for("the first deliveries", Duration::from_secs(30), || async {
        delivered(&sink, 0..SERVERS, &before).0 >= 3
    })
    .await;
    // Inbound POSTs on their way as the disk fills.
    let mut sends = Vec::new();
    let mut k = 0;
    for _ in 0..6 {
        sends.push(send_like(&sink, &base, k));
        k += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let used = fs.available();
    let full_at = Instant::now();
    let filled = fs.fill();
    println!(
        "[disk full] {MEGABYTES} MiB filesystem, {} bytes free before, filled with {filled} bytes; {} of {all} inboxes had the post",
        used,
        delivered(&sink, 0..SERVERS, &before).0
    );

    let mut problems: Vec<String> = Vec::new();
    let mut published: Vec<(&str, Result<String, tonic::Status>, Duration)> = Vec::new();
    let mut readiness: Vec<(Duration, u16, String)> = Vec::new();
    let mut last_fill = Instant::now();
    let mut topped_up = 0u64;
    while full_at.elapsed() < FULL {
        // One inbound POST every 250 ms, each on a task of its own.
        sends.push(send_like(&sink, &base, k));
        k += 1;
        // Whatever stampede freed (a checkpointed WAL) is taken again.
        if last_fill.elapsed() > Duration::from_millis(500) {
            topped_up += fs.fill();
            last_fill = Instant::now();
        }
        let t = full_at.elapsed();
        let at = |s: u64| t >= Duration::from_secs(s) && t < Duration::from_millis(s * 1000 + 250);
        if at(3) || at(12) {
            let which = if at(3) {
                "during (3 s)"
            } else {
                "during (12 s)"
            };
            let started = Instant::now();
            let r = publish(&grpc, &base, which, "").await;
            println!(
                "[disk full] Publish {which} answered in {:?}: {r:?}",
                started.elapsed()
            );
            published.push((which, r, started.elapsed()));
        }
        if at(5) || at(15) {
            let (s, body) = readyz(&http, metrics).await;
            readiness.push((t, s, body));
        }
        if at(8) {
            // What a remote server fetching alice's key gets.
            let r = http
                .get(&alice)
                .header("accept", "application/activity+json")
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .map(|r| r.status().as_u16());
            println!("[disk full] GET alice's actor document while full: {r:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let during = delivered(&sink, 0..SERVERS, &before).0;
    fs.free();
    let back = Instant::now();
    println!(
        "[disk full] space back after {:?} ({topped_up} more bytes taken meanwhile); {during} of {all} inboxes had the post",
        full_at.elapsed()
    );
    for (t, s, body) in &readiness {
        println!("[disk full] /readyz {t:?} into it: {s} {}", body.trim());
    }
    // Writes failing: not ready (a failed commit within the last 10 s).
    let ready_while_full: Vec<_> = readiness.iter().filter(|(_, s, _)| *s == 200).collect();
    let mut statuses = Vec::new();
    let mut by_status: HashMap<u16, (usize, Option<String>, Duration)> = HashMap::new();
    for h in sends {
        let (id, status, ra, took) = h.await.unwrap();
        let e = by_status.entry(status).or_insert((0, ra, Duration::ZERO));
        e.0 += 1;
        e.2 = e.2.max(took);
        statuses.push((id, status));
    }
    println!(
        "[disk full] inbound POSTs sent from just before the disk filled to its end (status: count, Retry-After, slowest; 0 = no answer, 1 = none in 15 s): {by_status:?}"
    );

    // Recovery: ready, a publish and an inbound POST accepted, by itself.
    let mut ready_at = None;
    let mut after = None;
    while back.elapsed() < RECOVERY && (ready_at.is_none() || after.is_none()) {
        if ready_at.is_none() && readyz(&http, metrics).await.0 == 200 {
            ready_at = Some(back.elapsed());
        }
        if after.is_none() {
            if let Ok(id) = publish(&grpc, &base, "after", "after").await {
                after = Some((id, back.elapsed()));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let a = like(&sink, k);
    let r = sink
        .send(
            SERVERS,
            "bob",
            &format!("{base}/inbox"),
            &a,
            SendOptions::default(),
        )
        .await
        .map(|r| r.status);
    println!(
        "[disk full] after the space came back: ready {ready_at:?}, a Publish OK {:?}, an inbound POST {r:?}",
        after.as_ref().map(|(_, t)| t)
    );
    statuses.push((a["id"].as_str().unwrap().to_string(), r.unwrap_or(0)));
    if !ready_while_full.is_empty() {
        problems.push(format!(
            "ready while the disk was full: {ready_while_full:?}"
        ));
    }
    if ready_at.is_none() {
        problems.push(format!("not ready {RECOVERY:?} after the space came back"));
    }
    let Some((after_id, _)) = after else {
        problems.push(format!(
            "no Publish OK {RECOVERY:?} after the space came back"
        ));
        return finish(child, fs, &log, problems).await;
    };

    // Every post answered OK at every inbox, exactly once.
    let mut posts = vec![("before".to_string(), before)];
    for (which, r, _) in &published {
        if let Ok(id) = r {
            posts.push((which.to_string(), id.clone()));
        }
    }
    posts.push(("after".into(), after_id));
    let deadline = back + RECOVERY;
    while Instant::now() < deadline
        && !posts
            .iter()
            .all(|(_, p)| delivered(&sink, 0..SERVERS, p).0 == all)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let complete = back.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (which, p) in &posts {
        let (got, extra) = delivered(&sink, 0..SERVERS, p);
        println!("[disk full] the post {which}: {got} of {all} inboxes, {extra} extra copies ({complete:?} after the space came back)");
        if got != all || extra > 0 {
            problems.push(format!(
                "the post {which} (Publish answered OK) reached {got} of {all} inboxes with {extra} extra copies {RECOVERY:?} after the space came back"
            ));
        }
    }
    // Every inbound activity answered 202 on the stream, exactly once.
    let accepted: Vec<String> = statuses
        .iter()
        .filter(|(_, s)| *s == 202)
        .map(|(id, _)| id.clone())
        .collect();
    let stream = read_stream(&grpc, &accepted, back + RECOVERY, Duration::from_secs(3)).await;
    let missing: Vec<_> = accepted
        .iter()
        .filter(|id| !stream.contains_key(*id))
        .collect();
    let twice: Vec<_> = stream.iter().filter(|(_, (n, _))| *n > 1).collect();
    let refused_but_there = statuses
        .iter()
        .filter(|(id, s)| *s != 202 && stream.contains_key(id))
        .count();
    println!(
        "[disk full] inbound: {} answered 202, {} of them on the stream, {} more than once; {refused_but_there} not answered 202 on the stream anyway",
        accepted.len(),
        accepted.len() - missing.len(),
        twice.len()
    );
    if !missing.is_empty() {
        problems.push(format!(
            "{} inbound activities answered 202 never reached the stream: {missing:?}",
            missing.len()
        ));
    }
    if !twice.is_empty() {
        problems.push(format!("on the stream more than once: {twice:?}"));
    }
    finish(child, fs, &log, problems).await;
}

/// Prints what `stampede up` logged, stops it (SIGTERM), checks its
/// databases' integrity, cleans up and reports `problems`.
async fn finish(
    mut child: tokio::process::Child,
    fs: SmallFs,
    log: &std::path::Path,
    mut problems: Vec<String>,
) {
    if let Ok(Some(status)) = child.try_wait() {
        problems.push(format!("stampede up exited: {status}"));
    } else {
        let pid = child.id().unwrap().to_string();
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await;
        match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(Ok(s)) if s.success() => {}
            other => problems.push(format!("stop after SIGTERM: {other:?}")),
        }
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let summary = log_summary(&text);
    println!(
        "[disk full] stampede up logged {} kinds of WARN/ERROR lines",
        summary.len()
    );
    for (count, _, example) in summary.iter().take(12) {
        let mut example = example.clone();
        example.truncate(400);
        println!("    {count} x {example}");
    }
    // Its databases, checked once it stopped.
    let dir = fs.path().join("data");
    let mut dbs: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    dbs.retain(|p| p.extension().is_some_and(|e| e == "db" || e == "sqlite"));
    dbs.sort();
    for db in &dbs {
        let out = std::process::Command::new("sqlite3")
            .arg(db)
            .arg("PRAGMA integrity_check")
            .output();
        let says = match out {
            Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_string(),
            Err(e) => format!("sqlite3: {e}"),
        };
        println!("[disk full] integrity_check {}: {says}", db.display());
        if says != "ok" {
            problems.push(format!("{}: integrity_check says {says}", db.display()));
        }
    }
    if dbs.is_empty() {
        println!(
            "[disk full] no database files found in {}: {:?}",
            dir.display(),
            std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        );
    }
    if problems.is_empty() {
        let _ = std::fs::remove_file(log);
    } else {
        println!("[disk full] stampede up's log kept: {}", log.display());
    }
    drop(fs);
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
