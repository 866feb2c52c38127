//! The CLI as a program: every verb run as the real `stampede` binary
//! against a running stampede, as an operator types it: exit status, the
//! shape of what it prints (and `--json` where scripts read it), and one
//! clear line on standard error with a non-zero exit for a bad argument, an
//! unreachable server, a wrong token, or a server that goes away during
//! `tail`.
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use stampede_sink::{Behavior, Sink, SinkOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::helpers::{free_port, spawn_app, succeeded, wait_for, AppOptions, Backend};

const BIN: &str = env!("CARGO_BIN_EXE_stampede-e2e");

/// `stampede --server SERVER ARGS…` with nothing else in its environment
/// (but `vars`), standard input from `stdin`.
async fn stampede(server: &str, args: &[&str], vars: &[(&str, &str)], stdin: &str) -> Output {
    let mut c = Command::new(BIN);
    c.arg("--server")
        .arg(server)
        .args(args)
        .env_clear()
        .envs(vars.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut input, stdin.as_bytes())
        .await
        .unwrap();
    drop(input);
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("stampede {args:?} did not finish in 30 s"))
        .unwrap()
}

/// Runs a verb that must succeed; its standard output.
async fn ok(server: &str, args: &[&str]) -> String {
    succeeded(&stampede(server, args, &[], "").await)
}

/// Runs a verb that must fail with `code`; its one line of standard error.
fn one_line_error(out: &Output, code: i32) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A `stampede tail` child, its standard output and error collected line
/// by line.
struct Tail {
    child: Child,
    out: Arc<Mutex<Vec<String>>>,
    err: Arc<Mutex<Vec<String>>>,
}

impl Tail {
    fn start(server: &str, args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .arg("--server")
            .arg(server)
            .arg("tail")
            .args(args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let collect = |r: Box<dyn tokio::io::AsyncRead + Unpin + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let into = lines.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(r).lines();
                while let Ok(Some(l)) = r.next_line().await {
                    into.lock().unwrap().push(l);
                }
            });
            lines
        };
        let out = collect(Box::new(child.stdout.take().unwrap()));
        let err = collect(Box::new(child.stderr.take().unwrap()));
        Self { child, out, err }
    }

    fn out(&self) -> Vec<String> {
        self.out.lock().unwrap().clone()
    }

    fn err(&self) -> Vec<String> {
        self.err.lock().unwrap().clone()
    }

    /// Whether it printed an activity of `kind` by `actor`.
    fn printed(&self, kind: &str, actor: &str) -> bool {
        self.out().iter().any(|l| {
            let v = json(l);
            v["verdict"] == "accepted" && v["activity"]["type"] == kind && v["actor"] == actor
        })
    }
}

/// A running stampede (all in one, embedded backends) and two fake servers;
/// the local actor alice, made with `stampede actor create`, followed by
/// carol and dave on server 0 and erin on server 1, which refuses every
/// delivery (403) from then on: each post is delivered to one shared inbox
/// and dead-lettered at the other.
struct World {
    app: crate::helpers::TestApp,
    sink: Sink,
    server: String,
    alice: String,
    /// Server 1's host.
    gone: String,
}

async fn world() -> World {
    let app = spawn_app(Backend::Embedded, AppOptions::default()).await;
    let server = app.grpc_addr.to_string();
    let sink = Sink::start(SinkOptions {
        servers: 2,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let gone = sink.actor(1, "x").unwrap().host;
    let out = ok(
        &server,
        &["actor", "create", "alice", "--display-name", "Alice"],
    )
    .await;
    let alice = format!("{}/users/alice", app.http_base);
    assert_eq!(
        out.lines().next(),
        Some(format!("created {alice}").as_str())
    );
    for who in ["carol", "dave"] {
        sink.follow(0, who, &alice).await.unwrap();
    }
    sink.follow(1, "erin", &alice).await.unwrap();
    wait_for("three followers", Duration::from_secs(30), || async {
        let v = json(&ok(&server, &["actor", "get", "alice", "--json"]).await);
        v["followers_count"] == 3
    })
    .await;
    wait_for("erin's Accept", Duration::from_secs(30), || async {
        sink.received(1).iter().any(|r| r.body["type"] == "Accept")
    })
    .await;
    sink.set_behavior(1, Behavior::Status(403)).unwrap();
    World {
        app,
        sink,
        server,
        alice,
        gone,
    }
}

/// Publishes `text` as alice; the activity's id.
async fn post(w: &World, text: &str) -> String {
    let out = ok(&w.server, &["publish", "--actor", "alice", "--text", text]).await;
    out.strip_prefix("published ").unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actor_create_and_get() {
    let w = world().await;
    let (s, alice) = (w.server.as_str(), w.alice.as_str());
    let out = ok(
        s,
        &["actor", "create", "bob", "--manually-approves-followers"],
    )
    .await;
    let bob = format!("{}/users/bob", w.app.http_base);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            format!("created {bob}").as_str(),
            &format!("  inbox        {bob}/inbox"),
            &format!("  shared inbox {}/inbox", w.app.http_base),
            &format!("  key          {bob}#main-key"),
        ]
    );
    let v = json(&ok(s, &["actor", "get", "bob", "--json"]).await);
    assert_eq!(v["manually_approves_followers"], true);
    let again = stampede(s, &["actor", "create", "alice"], &[], "").await;
    assert!(one_line_error(&again, 1).contains("exists"));
    let bad = stampede(s, &["actor", "create", "Not A Name"], &[], "").await;
    assert!(one_line_error(&bad, 1).starts_with("error: invalid: "));
    let v = json(&ok(s, &["actor", "get", "alice", "--json"]).await);
    assert_eq!(v["id"], alice);
    assert_eq!(v["key_id"], format!("{alice}#main-key"));
    assert!(v["public_key_pem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PUBLIC KEY-----"));
    assert_eq!(v["manually_approves_followers"], false);
    let text = ok(s, &["actor", "get", "alice"]).await;
    assert!(
        text.starts_with(&format!("{alice}\n  followers    3\n")),
        "{text}"
    );
    let missing = stampede(s, &["actor", "get", "nobody"], &[], "").await;
    assert!(one_line_error(&missing, 1).starts_with("error: not found: "));

    // actor delete: without --yes it says what it would take and deletes nothing.
    let unsure = stampede(s, &["actor", "delete", "bob"], &[], "").await;
    let said = one_line_error(&unsure, 1);
    assert!(
        said.contains(&bob) && said.ends_with("run again with --yes"),
        "{said}"
    );
    ok(s, &["actor", "get", "bob"]).await;
    let out = ok(s, &["actor", "delete", "bob", "--yes"]).await;
    assert_eq!(out, format!("deleted {bob}\n"));
    let gone = stampede(s, &["actor", "get", "bob"], &[], "").await;
    assert!(one_line_error(&gone, 1).starts_with("error: not found: "));
    let doc = reqwest::Client::new()
        .get(&bob)
        .header("accept", "application/activity+json")
        .send()
        .await
        .unwrap();
    assert_eq!(doc.status(), 404);
    let again = stampede(s, &["actor", "delete", "bob", "--yes"], &[], "").await;
    assert!(one_line_error(&again, 1).starts_with("error: not found: "));

    w.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_text_file_stdin_and_idempotency_key() {
    let w = world().await;
    let (s, alice, app) = (w.server.as_str(), w.alice.as_str(), &w.app);
    // publish: --text, --file, --file - (standard input), idempotency
    let out = ok(s, &["publish", "--actor", "alice", "--text", "hello"]).await;
    let first = out.strip_prefix("published ").unwrap().trim().to_string();
    assert!(first.starts_with(&app.http_base), "{out}");
    let note = stampede_core::activity::public_note(alice, "from a file").to_string();
    let file: PathBuf =
        std::env::temp_dir().join(format!("stampede-cli-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&file, &note).unwrap();
    let out = ok(
        s,
        &[
            "publish",
            "--actor",
            "alice",
            "--file",
            file.to_str().unwrap(),
            "--idempotency-key",
            "k1",
        ],
    )
    .await;
    assert!(out.starts_with("published "), "{out}");
    let out = ok(
        s,
        &[
            "publish",
            "--actor",
            "alice",
            "--file",
            file.to_str().unwrap(),
            "--idempotency-key",
            "k1",
        ],
    )
    .await;
    assert!(out.starts_with("already published "), "{out}");
    std::fs::remove_file(&file).unwrap();
    let piped = stampede(
        s,
        &["publish", "--actor", "alice", "--file", "-"],
        &[],
        &note.replace("from a file", "from a pipe"),
    )
    .await;
    assert!(succeeded(&piped).starts_with("published "));
    let bad = stampede(
        s,
        &["publish", "--actor", "alice", "--file", "-"],
        &[],
        "{not json",
    )
    .await;
    assert!(one_line_error(&bad, 1).starts_with("error: invalid: "));
    let both = stampede(
        s,
        &["publish", "--actor", "alice", "--text", "a", "--file", "f"],
        &[],
        "",
    )
    .await;
    one_line_error(&both, 2);

    w.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_table_and_json() {
    let w = world().await;
    let s = w.server.as_str();
    post(&w, "hello").await;
    // status (and --json) once the posts are delivered and dead-lettered.
    wait_for(
        "the post delivered and dead-lettered",
        Duration::from_secs(60),
        || async {
            let v = json(&ok(s, &["status", "--json"]).await);
            v["delivered"].as_u64() >= Some(3) && v["dead_letters"].as_u64() == Some(1)
        },
    )
    .await;
    let v = json(&ok(s, &["status", "--json"]).await);
    // The three Accepts and the post.
    assert_eq!(v["activities"], 4, "{v}");
    let queues = v["queues"].as_array().unwrap();
    assert!(queues.iter().any(|q| q["class"] == "interactive"), "{v}");
    for q in queues {
        assert!(
            q["queue"].is_string() && q["messages"].is_u64() && q["consumers"].is_u64(),
            "{q}"
        );
    }
    let text = ok(s, &["status"]).await;
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["QUEUE", "MESSAGES", "CONSUMERS", "CLASS", "HEAD", "AGE"]
    );
    assert!(text.contains("\ndelivered    "), "{text}");

    w.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_replay_and_purge() {
    let w = world().await;
    let (s, gone, sink) = (w.server.as_str(), w.gone.clone(), &w.sink);
    for text in ["one", "two", "three"] {
        post(&w, text).await;
    }
    wait_for("three dead letters", Duration::from_secs(60), || async {
        json(&ok(s, &["status", "--json"]).await)["dead_letters"] == 3
    })
    .await;
    // dlq list (and --json) | replay | purge
    let dead = json(&ok(s, &["dlq", "list", "--json"]).await);
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    for d in dead {
        assert_eq!(d["host"], gone.as_str());
        assert_eq!(d["last_status"], 403);
        assert!(d["id"].is_string() && d["activity_id"].is_string() && d["reason"].is_string());
    }
    let text = ok(s, &["dlq", "list", "--host", &gone, "--limit", "2"]).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two dead letters: {text}");
    assert!(
        lines[0].starts_with("ID ") && lines[0].ends_with("REASON"),
        "{text}"
    );
    assert!(
        lines[1].contains(&gone) && lines[1].contains(" 403 "),
        "{text}"
    );
    assert_eq!(
        json(&ok(s, &["dlq", "list", "--host", "elsewhere.example", "--json"]).await),
        serde_json::json!([])
    );
    // Server 1 is back: a replayed dead letter arrives.
    sink.set_behavior(1, Behavior::Ok).unwrap();
    let id = dead[0]["id"].as_str().unwrap();
    let replayed = dead[0]["activity_id"].as_str().unwrap().to_string();
    assert_eq!(
        ok(s, &["dlq", "replay", "--id", id]).await,
        "replayed 1 dead letters\n"
    );
    wait_for(
        "the replayed dead letter to arrive",
        Duration::from_secs(30),
        || async {
            sink.received(1)
                .iter()
                .any(|r| r.activity_id.as_deref() == Some(replayed.as_str()) && r.status == 202)
        },
    )
    .await;
    assert_eq!(
        json(&ok(s, &["dlq", "list", "--json"]).await)
            .as_array()
            .unwrap()
            .len(),
        2
    );
    one_line_error(&stampede(s, &["dlq", "replay"], &[], "").await, 2);
    one_line_error(&stampede(s, &["dlq", "purge"], &[], "").await, 1);
    let out = ok(s, &["dlq", "purge", "--host", &gone]).await;
    assert!(
        out.starts_with("purged ") && out.ends_with(" dead letters\n"),
        "{out}"
    );
    assert_eq!(
        json(&ok(s, &["dlq", "list", "--json"]).await),
        serde_json::json!([])
    );

    w.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_pause_resume_list_and_hosts() {
    let w = world().await;
    let s = w.server.as_str();
    // host pause | resume | list, hosts
    assert_eq!(
        ok(s, &["host", "pause", "slow.example"]).await,
        "slow.example paused\n"
    );
    let v = json(&ok(s, &["status", "--json"]).await);
    assert_eq!(v["paused_hosts"], serde_json::json!(["slow.example"]));
    assert_eq!(
        ok(s, &["host", "resume", "slow.example"]).await,
        "slow.example resumed\n"
    );
    let v = json(&ok(s, &["status", "--json"]).await);
    assert_eq!(v["paused_hosts"], serde_json::json!([]));
    let text = ok(s, &["host", "list"]).await;
    assert!(text.starts_with("FAILING HOST"), "{text}");
    let text = ok(s, &["host", "list", "--unavailable", "--limit", "5"]).await;
    assert!(text.starts_with("FAILING HOST"), "{text}");
    let text = ok(s, &["hosts", "--top", "5", "--sort", "failures"]).await;
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header[..3], ["HOST", "PENDING", "AGE"]);
    one_line_error(
        &stampede(s, &["hosts", "--sort", "nonsense"], &[], "").await,
        2,
    );

    w.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_status_per_host() {
    let w = world().await;
    let s = w.server.as_str();
    let first = post(&w, "hello").await;
    wait_for(
        "the post delivered and dead-lettered",
        Duration::from_secs(60),
        || async {
            let v = json(&ok(s, &["status", "--json"]).await);
            v["dead_letters"] == 1 && v["delivered"].as_u64() >= Some(4)
        },
    )
    .await;
    // activity status
    let text = ok(s, &["activity", "status", &first, "--hosts"]).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], format!("{first} (fanned out)"));
    assert!(lines[1].starts_with("HOST "), "{text}");
    let all: Vec<&str> = lines.last().unwrap().split_whitespace().collect();
    assert_eq!(
        (all[0], all[1], all[3]),
        ("(all)", "2", "1"),
        "two targets, one delivered: {text}"
    );
    let missing = stampede(
        s,
        &["activity", "status", "https://nowhere.example/a/1"],
        &[],
        "",
    )
    .await;
    one_line_error(&missing, 1);

    w.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_policies() {
    let w = world().await;
    let s = w.server.as_str();
    // domain suspend | silence | allow | remove | list
    let out = ok(
        s,
        &["domain", "suspend", "spam.example", "--reason", "spam"],
    )
    .await;
    assert_eq!(
        out,
        "spam.example suspended: 0 follows removed, 0 keys forgotten\n"
    );
    assert_eq!(
        ok(s, &["domain", "silence", "loud.example"]).await,
        "loud.example: silence\n"
    );
    assert_eq!(
        ok(s, &["domain", "allow", "friend.example"]).await,
        "friend.example: allow\n"
    );
    let text = ok(s, &["domain", "list"]).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "federation mode: blocklist");
    assert!(lines[1].starts_with("DOMAIN "), "{text}");
    assert_eq!(lines.len(), 5, "{text}");
    assert!(
        text.contains("spam.example") && text.contains(" spam\n"),
        "{text}"
    );
    assert_eq!(
        ok(s, &["domain", "remove", "loud.example"]).await,
        "loud.example: rule removed\n"
    );
    assert_eq!(
        ok(s, &["domain", "remove", "loud.example"]).await,
        "loud.example: had no rule\n"
    );
    one_line_error(
        &stampede(s, &["domain", "ban", "x.example"], &[], "").await,
        2,
    );

    w.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_verified_activities() {
    let w = world().await;
    let (s, alice, sink) = (w.server.as_str(), w.alice.as_str(), &w.sink);
    // tail: a Follow arrives as one JSON line.
    let tail = Tail::start(s, &[]);
    sink.follow(0, "frank", alice).await.unwrap();
    let frank = sink.actor(0, "frank").unwrap().id;
    wait_for(
        "tail to print frank's Follow",
        Duration::from_secs(30),
        || async { tail.printed("Follow", &frank) },
    )
    .await;
    drop(tail);
    w.app.stop().await;
}

#[tokio::test]
async fn bad_arguments_and_an_unreachable_server_are_one_line_and_a_non_zero_exit() {
    let nowhere = format!("127.0.0.1:{}", free_port());
    for (args, code, want) in [
        (
            vec!["status", "--bogus"],
            2,
            "unexpected argument '--bogus'",
        ),
        (vec!["publish", "--text", "hi"], 2, "--actor"),
        (
            vec!["frobnicate"],
            2,
            "unrecognized subcommand 'frobnicate'",
        ),
        (vec!["hosts", "--top", "many"], 2, "invalid value 'many'"),
        (vec!["status"], 1, "cannot reach stampede at http://"),
        (
            vec!["actor", "get", "alice"],
            1,
            "cannot reach stampede at http://",
        ),
        (vec!["tail"], 1, "cannot reach stampede at http://"),
        (vec!["migrate"], 1, "STAMPEDE_DATABASE_URL: not set"),
    ] {
        let out = stampede(&nowhere, &args, &[], "").await;
        let line = one_line_error(&out, code);
        assert!(line.contains(want), "{args:?}: {line}");
        if code == 1 && want.starts_with("cannot reach") {
            assert!(
                line.contains(&nowhere) && line.contains("Connection refused"),
                "{line}"
            );
        }
    }
    let out = stampede("http://[not an address", &["status"], &[], "").await;
    assert!(one_line_error(&out, 1).contains("not an address"));
    // Help is not an error.
    let help = stampede(&nowhere, &["dlq", "list", "--help"], &[], "").await;
    assert!(succeeded(&help).contains("--json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_refused_in_one_line() {
    let token = "0123456789abcdef-right";
    let app = spawn_app(
        Backend::Embedded,
        AppOptions {
            extra: vec![("STAMPEDE_API_TOKEN", token.to_string())],
            ..AppOptions::default()
        },
    )
    .await;
    let s = app.grpc_addr.to_string();
    for vars in [&[("STAMPEDE_API_TOKEN", "0123456789abcdef-wrong")][..], &[]] {
        for args in [&["status"][..], &["actor", "get", "alice"], &["tail"]] {
            let out = stampede(&s, args, vars, "").await;
            let line = one_line_error(&out, 1);
            assert!(
                line.contains(&format!("stampede at http://{s} refused the API token"))
                    && line.contains("STAMPEDE_API_TOKEN"),
                "{args:?}: {line}"
            );
        }
    }
    let out = stampede(
        &s,
        &["status", "--json"],
        &[("STAMPEDE_API_TOKEN", token)],
        "",
    )
    .await;
    json(&succeeded(&out));
    app.stop().await;
}

/// `stampede up` as a process of its own, to be killed and started again
/// on the same ports and data directory.
struct Up {
    dir: PathBuf,
    http: u16,
    grpc: u16,
    metrics: u16,
}

impl Up {
    async fn start(&self) -> Child {
        let child = Command::new(BIN)
            .arg("up")
            .env_clear()
            .env("STAMPEDE_DATA_DIR", &self.dir)
            .env(
                "STAMPEDE_PUBLIC_URL",
                format!("http://127.0.0.1:{}", self.http),
            )
            .env("STAMPEDE_HTTP_ADDR", format!("127.0.0.1:{}", self.http))
            .env("STAMPEDE_GRPC_ADDR", format!("127.0.0.1:{}", self.grpc))
            .env(
                "STAMPEDE_METRICS_ADDR",
                format!("127.0.0.1:{}", self.metrics),
            )
            .env("STAMPEDE_ALLOW_PRIVATE_NETWORKS", "true")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let ready = format!("http://127.0.0.1:{}/readyz", self.metrics);
        wait_for(
            "stampede up to be ready",
            Duration::from_secs(30),
            || async { matches!(reqwest::get(&ready).await, Ok(r) if r.status() == 200) },
        )
        .await;
        child
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_reconnects_when_the_server_restarts_and_names_it_when_it_is_gone() {
    let started = Instant::now();
    let up = Up {
        dir: std::env::temp_dir().join(format!("stampede-cli-{}", uuid::Uuid::new_v4().simple())),
        http: free_port(),
        grpc: free_port(),
        metrics: free_port(),
    };
    let server = format!("127.0.0.1:{}", up.grpc);
    let mut first = up.start().await;
    ok(&server, &["actor", "create", "alice"]).await;
    let alice = format!("http://127.0.0.1:{}/users/alice", up.http);
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    let tail = Tail::start(&server, &["--reconnect-for", "10"]);
    sink.follow(0, "bob", &alice).await.unwrap();
    let bob = sink.actor(0, "bob").unwrap().id;
    wait_for("bob's Follow", Duration::from_secs(30), || async {
        tail.printed("Follow", &bob)
    })
    .await;

    // The server dies: tail says so and reconnects once it is back.
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let lost = format!("tail: lost stampede at http://{server}: ");
    wait_for(
        "tail to say the server is lost",
        Duration::from_secs(10),
        || async { tail.err().iter().any(|l| l.starts_with(&lost)) },
    )
    .await;
    let mut second = up.start().await;
    wait_for("tail to reconnect", Duration::from_secs(20), || async {
        tail.err()
            .contains(&format!("tail: reconnected to http://{server}"))
    })
    .await;
    sink.follow(0, "carol", &alice).await.unwrap();
    let carol = sink.actor(0, "carol").unwrap().id;
    wait_for(
        "carol's Follow after the restart",
        Duration::from_secs(30),
        || async { tail.printed("Follow", &carol) },
    )
    .await;

    // Gone for good: after 10 s of trying, one line naming the address.
    second.start_kill().unwrap();
    second.wait().await.unwrap();
    let Tail { mut child, err, .. } = tail;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("tail gives up within its --reconnect-for")
        .unwrap();
    assert_eq!(status.code(), Some(1));
    // Let the reader take the last lines.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = err.lock().unwrap().clone();
    let last = err.last().unwrap();
    assert!(
        last.starts_with(&format!("error: lost stampede at http://{server} ("))
            && last.ends_with("and could not reconnect within 10 s"),
        "{err:#?}"
    );
    assert!(
        err.iter().all(|l| !l.contains("h2 protocol error")),
        "{err:#?}"
    );
    println!("tail's standard error:\n{}", err.join("\n"));
    println!("tail across a restart: {:?}", started.elapsed());
    std::fs::remove_dir_all(&up.dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_the_schema_and_again_changes_nothing() {
    let scratch = crate::helpers::scratch(Backend::External, &AppOptions::default()).await;
    let url = scratch.database_url().unwrap().to_string();
    let vars = [("STAMPEDE_DATABASE_URL", url.as_str())];
    let versions = || async {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.query("SELECT version FROM stampede_migrations ORDER BY 1", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i32>(0))
            .collect::<Vec<_>>()
    };
    for _ in 0..2 {
        let out = stampede("127.0.0.1:1", &["migrate"], &vars, "").await;
        assert_eq!(succeeded(&out), "migrations applied\n");
        assert_eq!(
            versions().await,
            (1..=crate::upgrade::PG_LATEST).collect::<Vec<_>>()
        );
    }
    let bad = [(
        "STAMPEDE_DATABASE_URL",
        "postgres://nobody@127.0.0.1:1/none",
    )];
    let out = stampede("127.0.0.1:1", &["migrate"], &bad, "").await;
    assert!(one_line_error(&out, 1).starts_with("error: failed to apply migrations: "));
    scratch.remove().await.unwrap();
}
