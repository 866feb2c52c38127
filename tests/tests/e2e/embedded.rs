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

/// Runs `stampede demo` with `args`; its output and how long it took.
async fn demo(args: &[&str]) -> (String, Duration) {
    let started = std::time::Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(150),
        Command::new(BIN)
            .arg("demo")
            .args(args)
            .env("RUST_LOG", "error")
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let took = started.elapsed();
    (succeeded(&out), took)
}

/// The rows of the demo's table by their first column (the numbers after
/// the label: count, followers, deliveries, received, dead-lettered,
/// refused tries).
fn demo_rows(text: &str) -> std::collections::HashMap<String, Vec<u64>> {
    text.lines()
        .filter_map(|l| {
            let label = ["healthy", "slow", "failing, then back", "dead", "total"]
                .into_iter()
                .find(|p| l.starts_with(p))?;
            let cols: Vec<u64> = l[label.len()..]
                .split_whitespace()
                .map(|c| c.parse().ok())
                .collect::<Option<_>>()?;
            Some((label.to_string(), cols))
        })
        .collect()
}

/// What every demo run must show: every delivery either received by its
/// server or dead-lettered, dead letters only for the dead servers, whose
/// circuits all opened, and a passing check.
fn check_demo(text: &str, servers: u64, followers: u64, dead_servers: u64) {
    let number_after = |prefix: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(prefix)).unwrap();
        line[prefix.len()..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let delivered = number_after("stampede: delivered ");
    let received = number_after("servers:  received ");
    assert_eq!(delivered, received, "{text}");
    assert!(delivered > 0);
    assert!(
        text.contains("check:    delivered == received, delivered + dead-lettered == "),
        "{text}"
    );
    assert!(text
        .lines()
        .any(|l| l.starts_with("check:") && l.ends_with(": ok")));
    assert!(
        text.contains(", 0 failed verification, 0 duplicates"),
        "{text}"
    );
    let rows = demo_rows(text);
    assert_eq!(rows.len(), 5, "{text}");
    assert_eq!(rows["total"][..2], [servers, followers], "{text}");
    assert_eq!(rows["total"][3], received, "{text}");
    for (label, r) in &rows {
        // deliveries == received + dead-lettered
        assert_eq!(r[2], r[3] + r[4], "{label}: {text}");
        if label != "dead" && label != "total" {
            assert_eq!(r[4], 0, "{label} has dead letters: {text}");
        }
    }
    assert_eq!(rows["dead"][3], 0, "{text}");
    assert!(
        text.contains(&format!(
            "dead:     circuit opened after 5 failures in a row at {dead_servers} of {dead_servers} servers; {} dead letters: ",
            rows["dead"][2]
        )),
        "{text}"
    );
    // Not a terminal: plain lines, no carriage returns.
    assert!(!text.contains('\r'));
}

/// How long the README says the demo takes: "(about N seconds".
fn readme_demo_secs() -> u64 {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let at = readme
        .find("(about ")
        .expect("the README states the demo's time")
        + "(about ".len();
    let rest = &readme[at..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    assert!(rest[digits.len()..].starts_with(" seconds"), "{rest:.40}");
    digits.parse().unwrap()
}

/// `stampede demo` as the README's quick start runs it: its defaults open
/// the dead servers' circuits, and it still ends, all settled, within
/// twice the time the README states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_with_its_defaults_settles_every_delivery_in_the_time_the_readme_says() {
    let (text, took) = demo(&[]).await;
    check_demo(&text, 50, 500, 5);
    let promised = Duration::from_secs(readme_demo_secs());
    assert!(
        took <= promised * 2,
        "the demo took {took:?}; the README says about {promised:?}\n{text}"
    );
}

/// Another configuration in which circuits open (more dead and failing
/// servers, two posts, quicker slow servers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_with_circuits_opening_matches_what_the_servers_received() {
    let (text, _) = demo(&[
        "--servers",
        "24",
        "--followers",
        "240",
        "--posts",
        "2",
        "--dead",
        "0.25",
        "--slow",
        "0.125",
        "--failing",
        "0.25",
        "--slow-secs",
        "0.5",
    ])
    .await;
    check_demo(&text, 24, 240, 6);
}
