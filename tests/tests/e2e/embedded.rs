//! `stampede up` as a real process on the embedded backends: nothing
//! installed, kill -9 with deliveries pending, a second process on the same
//! data directory.
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use stampede_core::activity::public_note;
use stampede_proto::api::actor_service_client::ActorServiceClient;
use stampede_proto::api::publish_service_client::PublishServiceClient;
use stampede_proto::api::{CreateActorRequest, PublishRequest};
use stampede_sink::{Sink, SinkOptions};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::helpers::{free_port, succeeded, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_stampede-e2e");

fn data_dir() -> PathBuf {
    std::env::temp_dir().join(format!("stampede-up-{}", uuid::Uuid::new_v4().simple()))
}

/// Ports and data directory of one `stampede up` deployment, kept across
/// restarts.
struct Up {
    dir: PathBuf,
    http: u16,
    grpc: u16,
    metrics: u16,
}

impl Up {
    fn new() -> Self {
        Self {
            dir: data_dir(),
            http: free_port(),
            grpc: free_port(),
            metrics: free_port(),
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    /// `stampede up` with no backend variables at all.
    fn command(&self) -> Command {
        let mut c = Command::new(BIN);
        c.arg("up")
            .env_clear()
            .env("STAMPEDE_DATA_DIR", &self.dir)
            .env("STAMPEDE_PUBLIC_URL", self.base())
            .env("STAMPEDE_HTTP_ADDR", format!("127.0.0.1:{}", self.http))
            .env("STAMPEDE_GRPC_ADDR", format!("127.0.0.1:{}", self.grpc))
            .env(
                "STAMPEDE_METRICS_ADDR",
                format!("127.0.0.1:{}", self.metrics),
            )
            .env("STAMPEDE_ALLOW_PRIVATE_NETWORKS", "true")
            .env("STAMPEDE_RETRY_SCHEDULE_SECS", "2,2,2,2,2,2,2,2,2,2")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        c
    }

    async fn start(&self) -> Child {
        let child = self.command().spawn().unwrap();
        let http = reqwest::Client::new();
        let ready = format!("http://127.0.0.1:{}/readyz", self.metrics);
        wait_for(
            "stampede up to be ready",
            Duration::from_secs(30),
            || async { matches!(http.get(&ready).send().await, Ok(r) if r.status() == 200) },
        )
        .await;
        child
    }

    async fn grpc(&self) -> Channel {
        Channel::from_shared(format!("http://127.0.0.1:{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn publish(&self, actor: &str, text: &str) -> String {
        let actor_id = format!("{}/users/{actor}", self.base());
        PublishServiceClient::new(self.grpc().await)
            .publish(PublishRequest {
                actor: actor.into(),
                activity_json: public_note(&actor_id, text).to_string(),
                idempotency_key: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .activity_id
    }
}

async fn stop(mut child: Child) {
    let pid = child.id().unwrap().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
}

/// How many times each server received the activity `id`, per inbox path.
fn copies(sink: &Sink, i: usize, id: &str) -> usize {
    sink.received(i)
        .iter()
        .filter(|r| r.activity_id.as_deref() == Some(id))
        .count()
}

fn remove(dir: &Path) {
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_nothing_installed_follows_publishes_and_locks_its_data_dir() {
    let up = Up::new();
    let child = up.start().await;
    ActorServiceClient::new(up.grpc().await)
        .create_actor(CreateActorRequest {
            name: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let alice = format!("{}/users/alice", up.base());
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    assert_eq!(sink.follow(0, "bob", &alice).await.unwrap().status, 202);
    wait_for("the signed Accept", Duration::from_secs(30), || async {
        sink.received(0)
            .iter()
            .any(|r| r.body["type"] == "Accept" && r.verified.is_ok())
    })
    .await;
    let id = up.publish("alice", "hello from an empty machine").await;
    wait_for(
        "the post, signed and verified",
        Duration::from_secs(30),
        || async {
            sink.received(0)
                .iter()
                .any(|r| r.activity_id.as_deref() == Some(id.as_str()) && r.verified.is_ok())
        },
    )
    .await;

    // A second process on the same data directory stops with a clear error.
    let mut second = up.command();
    second
        .env("STAMPEDE_HTTP_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("STAMPEDE_GRPC_ADDR", format!("127.0.0.1:{}", free_port()))
        .env(
            "STAMPEDE_METRICS_ADDR",
            format!("127.0.0.1:{}", free_port()),
        )
        .stderr(Stdio::piped());
    let out = tokio::time::timeout(Duration::from_secs(30), second.output())
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("STAMPEDE_DATA_DIR") && err.contains("in use by another stampede process"),
        "{err}"
    );
    // The first one is unharmed.
    let again = up.publish("alice", "still here").await;
    wait_for("the next post", Duration::from_secs(30), || async {
        copies(&sink, 0, &again) == 1
    })
    .await;
    stop(child).await;
    remove(&up.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_deliveries_pending_loses_none_and_sends_none_twice() {
    let up = Up::new();
    let child = up.start().await;
    ActorServiceClient::new(up.grpc().await)
        .create_actor(CreateActorRequest {
            name: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let alice = format!("{}/users/alice", up.base());
    // Ten servers, two followers each; even ones have a shared inbox (one
    // delivery), odd ones only personal inboxes (two).
    let sink = Sink::start(SinkOptions {
        servers: 10,
        shared_inbox: std::sync::Arc::new(|i| i % 2 == 0),
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let expected = |i: usize| if i.is_multiple_of(2) { 1 } else { 2 };
    for i in 0..10 {
        for name in ["ann", "ben"] {
            assert_eq!(sink.follow(i, name, &alice).await.unwrap().status, 202);
        }
    }
    wait_for("twenty Accepts", Duration::from_secs(60), || async {
        (0..10)
            .map(|i| {
                sink.received(i)
                    .iter()
                    .filter(|r| r.body["type"] == "Accept")
                    .count()
            })
            .sum::<usize>()
            == 20
    })
    .await;

    // Half the servers go down: their deliveries wait in retry.
    for i in 0..5 {
        sink.set_down(i).unwrap();
    }
    let id = up.publish("alice", "survive this").await;
    wait_for(
        "the live servers' copies",
        Duration::from_secs(30),
        || async { (5..10).all(|i| copies(&sink, i, &id) == expected(i)) },
    )
    .await;
    // Let the successes be recorded (they are, before the acknowledgement),
    // and at least one retry of the dead servers be scheduled.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut child = child;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    for i in 0..5 {
        sink.set_up(i).await.unwrap();
    }
    let child = up.start().await;
    wait_for(
        "every target after the restart",
        Duration::from_secs(60),
        || async { (0..10).all(|i| copies(&sink, i, &id) >= expected(i)) },
    )
    .await;
    // Nothing more comes later: each target got exactly one copy.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for i in 0..10 {
        assert_eq!(copies(&sink, i, &id), expected(i), "server {i}");
        assert!(sink.received(i).iter().all(|r| r.verified.is_ok()));
    }
    stop(child).await;
    remove(&up.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_small_and_its_summary_matches_what_the_servers_received() {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(BIN)
            .args([
                "demo",
                "--servers",
                "8",
                "--followers",
                "20",
                "--posts",
                "2",
                "--dead",
                "0.125",
                "--slow",
                "0.125",
                "--failing",
                "0.125",
                "--slow-secs",
                "0.5",
            ])
            .env("RUST_LOG", "error")
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let text = succeeded(&out);
    let number_after = |prefix: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(prefix)).unwrap();
        line[prefix.len()..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // 8 servers (every fourth without a shared inbox: 2 servers x 2-3
    // followers), 2 posts; the dead server's deliveries are dead letters.
    let delivered = number_after("stampede: delivered ");
    let received = number_after("servers:  received ");
    assert_eq!(delivered, received, "{text}");
    assert!(delivered > 0);
    assert!(
        text.contains("check:    delivered == received: ok"),
        "{text}"
    );
    assert!(
        text.contains(", 0 failed verification, 0 duplicates"),
        "{text}"
    );
    let total = text.lines().find(|l| l.starts_with("total")).unwrap();
    let cols: Vec<u64> = total
        .split_whitespace()
        .skip(1)
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(cols[..2], [8, 20], "{total}");
    assert_eq!(cols[3], received, "{total}");
    // Not a terminal: plain lines, no carriage returns.
    assert!(!text.contains('\r'));
}
