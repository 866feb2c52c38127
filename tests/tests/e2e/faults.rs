//! Backends failing under load, on private Redis and PostgreSQL servers the
//! tests stop and restart (`stampede_tests::private_backends`; the shared
//! ones serve the rest of the suite meanwhile). The four services run as
//! child processes of the stampede binary, so what each logs is kept.
//!
//! Each test publishes to 200 inboxes on 10 fake servers (3 of them slow),
//! takes a backend away while that is being delivered, sends signed
//! activities to the inboxes and a post to publish meanwhile, brings it
//! back and asserts: every inbox has the post exactly once, all of it
//! within 30 s of the return, readiness said "not ready" while it was away,
//! and every inbound activity answered 202 reached the application's
//! stream exactly once. What was seen (statuses, readiness, the log lines
//! of each service, timings) is printed for the README's "When a backend
//! fails"; the failures are gathered and reported together at the end.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use stampede_core::activity::public_note;
use stampede_proto::api::inbound_service_client::InboundServiceClient;
use stampede_proto::api::SubscribeRequest;
use stampede_sink::{Behavior, SendOptions, Sink, SinkOptions};
use stampede_tests::private_backends::{PgOptions, PgStop, PrivatePostgres, PrivateRedis};

use crate::helpers::{spawn_app, wait_for, AppOptions, Backend};

pub(crate) const SERVICES: [&str; 4] = ["ingest", "inbox", "fanout", "delivery"];
/// Fake servers alice's followers are on; the last `SLOW` answer in 2 s,
/// the others in 300 ms.
const SERVERS: usize = 10;
const SLOW: usize = 3;
const PER_SERVER: usize = 20;
/// Server `SERVERS` hosts carol's followers and the remote actor that
/// sends to our inboxes.
const EXTRA: usize = SERVERS;
const CAROL_FOLLOWERS: usize = 10;
/// How long the backend is away.
const OUTAGE: Duration = Duration::from_secs(30);
/// Everything delivered within this of the backend's return.
const RECOVERY: Duration = Duration::from_secs(30);
/// How long after the return the application's stream is read for the
/// activities answered 202: past `RECOVERY`, so that an activity late is
/// told from one lost (the inbox defers one whose verification failed on a
/// backend by 30 s, then 60 s).
const STREAM_WAIT: Duration = Duration::from_secs(75);

/// Which backend a test takes away, and how.
enum Fault {
    /// The private PostgreSQL, stopped as a crash for the outage.
    PostgresDown(PrivatePostgres),
    /// The private Redis, killed for the outage (it comes back empty).
    RedisDown(PrivateRedis),
    /// The private PostgreSQL up, but full: every connection slot is
    /// held by the test and stampede's connections are terminated.
    PostgresRefusing(PrivatePostgres, Option<Filler>),
}

/// Connections that hold every slot of a PostgreSQL server, and a task
/// that keeps it so: every 200 ms it terminates whatever connection to
/// stampede's database got a slot (one freed by a terminated backend
/// before the test's took it) and takes the free slots again. Dropped, the
/// task ends and the connections close.
struct Filler {
    task: tokio::task::JoinHandle<()>,
    held: usize,
}

impl Drop for Filler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Opens connections to `pg` until it refuses one; each is driven on a task.
async fn fill(pg: &PrivatePostgres, into: &mut Vec<tokio_postgres::Client>) -> String {
    let url = pg.url("postgres");
    for _ in 0..1000 {
        match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                into.push(c);
            }
            Err(e) => {
                return match e.as_db_error() {
                    Some(db) => format!("{}: {}", db.severity(), db.message()),
                    None => e.to_string(),
                }
            }
        }
    }
    panic!("1000 connections and none refused");
}

impl Filler {
    /// Takes every slot of `pg`, terminating the connections to `database`
    /// (stampede's) until none is left, and keeps it so: the services get
    /// "too many clients" on every attempt to connect.
    async fn take_all(pg: &PrivatePostgres, database: &str) -> (Self, String) {
        let mut clients = Vec::new();
        let started = Instant::now();
        let refused = loop {
            let refused = fill(pg, &mut clients).await;
            let left = terminate(&clients, database).await;
            if left == 0 {
                break refused;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "stampede still holds {left} connections after 20 s of terminating them"
            );
        };
        let held = clients.len();
        let url = pg.url("postgres");
        let database = database.to_string();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                terminate(&clients, &database).await;
                for _ in 0..100 {
                    match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                        Ok((c, conn)) => {
                            tokio::spawn(conn);
                            clients.push(c);
                        }
                        Err(_) => break,
                    }
                }
            }
        });
        (Self { task, held }, refused)
    }
}

/// Terminates the connections to `database` through the first of
/// `clients`; how many there were.
async fn terminate(clients: &[tokio_postgres::Client], database: &str) -> i64 {
    let ours = clients.first().expect("no connection at all");
    let left: i64 = ours
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
            &[&database],
        )
        .await
        .unwrap()
        .get(0);
    if left > 0 {
        ours.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            &[&database],
        )
        .await
        .unwrap();
    }
    left
}

impl Fault {
    fn name(&self) -> &'static str {
        match self {
            Fault::PostgresDown(_) => "PostgreSQL stopped",
            Fault::RedisDown(_) => "Redis stopped",
            Fault::PostgresRefusing(..) => "PostgreSQL refusing connections",
        }
    }

    async fn begin(&mut self, database: &str) -> String {
        match self {
            Fault::PostgresDown(pg) => {
                pg.stop(PgStop::Immediate);
                "stopped (immediate)".into()
            }
            Fault::RedisDown(r) => {
                r.stop();
                "killed".into()
            }
            Fault::PostgresRefusing(pg, filler) => {
                let (f, refused) = Filler::take_all(pg, database).await;
                let n = f.held;
                *filler = Some(f);
                format!("{n} connections held by the test; the next one: {refused}")
            }
        }
    }

    fn end(&mut self) {
        match self {
            Fault::PostgresDown(pg) => pg.restart(),
            Fault::RedisDown(r) => r.restart(),
            Fault::PostgresRefusing(_, filler) => *filler = None,
        }
    }
}

/// Accepted copies of a `Create` per (inbox path, activity id) at server `i`.
pub(crate) fn copies(sink: &Sink, i: usize) -> HashMap<(String, String), usize> {
    let mut m = HashMap::new();
    for r in sink.received(i) {
        if r.body["type"] == "Create" && (200..300).contains(&r.status) {
            *m.entry((r.path.clone(), r.activity_id.unwrap_or_default()))
                .or_insert(0) += 1;
        }
    }
    m
}

/// Inboxes among `servers` that have `id` at least once, and the copies
/// beyond the first of it.
pub(crate) fn delivered(sink: &Sink, servers: std::ops::Range<usize>, id: &str) -> (usize, usize) {
    let (mut inboxes, mut extra) = (0, 0);
    for i in servers {
        for ((_, a), n) in copies(sink, i) {
            if a == id {
                inboxes += 1;
                extra += n - 1;
            }
        }
    }
    (inboxes, extra)
}

/// POSTs answered other than 2xx for `id` (what the sink refused: a
/// failed signature check shows here).
fn refused_by_sink(sink: &Sink, servers: std::ops::Range<usize>, id: &str) -> Vec<(u16, String)> {
    servers
        .flat_map(|i| sink.received(i))
        .filter(|r| r.activity_id.as_deref() == Some(id) && !(200..300).contains(&r.status))
        .map(|r| (r.status, format!("{:?}", r.verified)))
        .collect()
}

/// A signed POST of `a` by bob of fake server `from` to `inbox`: the
/// activity's id, the status (0: no answer, 1: none within 15 s), its
/// Retry-After, and how long it took.
pub(crate) async fn timed_send(
    sink: &Sink,
    from: usize,
    inbox: &str,
    a: &serde_json::Value,
) -> (String, u16, Option<String>, Duration) {
    let started = Instant::now();
    let sent = tokio::time::timeout(
        Duration::from_secs(15),
        sink.send(from, "bob", inbox, a, SendOptions::default()),
    )
    .await;
    let (status, retry_after) = match sent {
        Ok(Ok(r)) => (r.status, r.retry_after),
        Ok(Err(_)) => (0, None),
        Err(_) => (1, None),
    };
    let id = a["id"].as_str().unwrap_or_default().to_string();
    (id, status, retry_after, started.elapsed())
}

/// A problem for every service process that exited by itself, and the
/// most frequent WARN/ERROR lines each logged.
pub(crate) fn services_report(
    app: &mut crate::helpers::TestApp,
    name: &str,
    services: &[&str],
    problems: &mut Vec<String>,
) {
    let exited = app.exited();
    if !exited.is_empty() {
        problems.push(format!("services exited: {exited:?}"));
    }
    for s in services {
        let summary = log_summary(&app.logs(s));
        println!(
            "[{name}] {s} logged {} kinds of WARN/ERROR lines",
            summary.len()
        );
        for (count, _, example) in summary.iter().take(8) {
            let mut example = example.clone();
            example.truncate(400);
            println!("    {count} x {example}");
        }
    }
}

/// The WARN and ERROR lines of a log grouped by their shape (timestamp
/// dropped, digits as `#`), most frequent first: (count, shape, an example).
pub(crate) fn log_summary(log: &str) -> Vec<(usize, String, String)> {
    let mut groups: HashMap<String, (usize, String)> = HashMap::new();
    for line in log.lines() {
        let line = strip_ansi(line);
        let line = line.as_str();
        let Some(at) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
            continue;
        };
        let rest = &line[at + 1..];
        let mut shape: String = rest
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .collect();
        shape.truncate(220);
        let e = groups.entry(shape).or_insert((0, rest.to_string()));
        e.0 += 1;
    }
    let mut v: Vec<_> = groups.into_iter().map(|(s, (n, ex))| (n, s, ex)).collect();
    v.sort_by_key(|g| std::cmp::Reverse(g.0));
    v
}

/// `line` without terminal colour sequences (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A Like of `n` by bob (server `EXTRA`), with an id of its own.
fn like(sink: &Sink, n: usize) -> serde_json::Value {
    let bob = sink.actor(EXTRA, "bob").unwrap();
    json!({
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": format!("{}/likes/fault-{n}", bob.id),
        "type": "Like",
        "actor": bob.id,
        "object": "https://elsewhere.example/notes/1",
    })
}

/// Reads the application's stream until `want` activities are all there
/// (each acknowledged as it comes) and `settle` passed after that with
/// nothing new, or until `deadline`. Copies of each activity id, and when
/// the first came.
pub(crate) async fn read_stream(
    grpc: &tonic::transport::Channel,
    want: &[String],
    deadline: Instant,
    settle: Duration,
) -> HashMap<String, (usize, Instant)> {
    let (tx, rx) = tokio::sync::mpsc::channel::<SubscribeRequest>(64);
    tx.send(SubscribeRequest::default()).await.unwrap();
    let mut stream = InboundServiceClient::new(grpc.clone())
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut seen: HashMap<String, (usize, Instant)> = HashMap::new();
    let mut complete_at: Option<Instant> = None;
    loop {
        if complete_at.is_none() && want.iter().all(|w| seen.contains_key(w)) {
            complete_at = Some(Instant::now());
        }
        let until = match complete_at {
            Some(t) => (t + settle).min(deadline),
            None => deadline,
        };
        let Some(left) = until.checked_duration_since(Instant::now()) else {
            break;
        };
        match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(m))) => {
                seen.entry(m.activity_id.clone())
                    .or_insert((0, Instant::now()))
                    .0 += 1;
                tx.send(SubscribeRequest {
                    ack: vec![m.delivery_id],
                    ..Default::default()
                })
                .await
                .unwrap();
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => panic!("the stream failed: {e}"),
            Err(_) => break,
        }
    }
    seen
}

/// Publishes to 200 inboxes, takes the backend away as `fault` says once
/// the first deliveries arrived, sends to our inboxes and publishes during
/// the outage, brings it back and checks; see the module's documentation.
async fn a_backend_away_under_load(mut fault: Fault) {
    let test_started = Instant::now();
    let mut opts = AppOptions {
        processes: SERVICES.to_vec(),
        // The edge's and the inbox's rate limits as configured by default
        // (one sender, far below them): their counts are in Redis, so an
        // outage of it shows what they do without.
        extra: vec![
            ("STAMPEDE_HOST_CONCURRENCY", "4".to_string()),
            ("STAMPEDE_RETRY_SCHEDULE_SECS", "1,2,2,4,4,4,4,4,4,4".into()),
        ],
        ..AppOptions::default()
    };
    match &fault {
        Fault::PostgresDown(pg) | Fault::PostgresRefusing(pg, _) => {
            opts.admin_database_url = Some(pg.url("postgres"));
        }
        Fault::RedisDown(r) => opts.redis_url = Some(r.url()),
    }
    let mut app = spawn_app(Backend::External, opts).await;
    let database = app.env["STAMPEDE_DATABASE_URL"]
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
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
    let carol = app.create_actor("carol").await;
    let followers: Vec<_> = (0..SERVERS)
        .flat_map(|i| (0..PER_SERVER).map(move |n| (i, n)))
        .map(|(i, n)| sink.actor(i, &format!("f{n}")).unwrap())
        .collect();
    app.seed_followers(alice, &followers).await;
    let carols: Vec<_> = (0..CAROL_FOLLOWERS)
        .map(|n| sink.actor(EXTRA, &format!("c{n}")).unwrap())
        .collect();
    app.seed_followers(carol, &carols).await;
    for i in 0..SERVERS {
        let ms = if i >= SERVERS - SLOW { 2000 } else { 300 };
        sink.set_behavior(i, Behavior::Slow(Duration::from_millis(ms)))
            .unwrap();
    }
    let alice_id = format!("{}/users/alice", app.http_base);
    let carol_id = format!("{}/users/carol", app.http_base);
    // Carol's first post gets her key into the fake servers' cache, as
    // alice's first deliveries get hers: a server that cannot fetch the
    // signer's key answers 401, which is no retry.
    let warm = app
        .publish("carol", &public_note(&carol_id, "warm-up"), "")
        .await
        .unwrap()
        .activity_id;
    let post = app
        .publish("alice", &public_note(&alice_id, "under load"), "")
        .await
        .unwrap()
        .activity_id;
    let all = SERVERS * PER_SERVER;
    wait_for("the first deliveries", Duration::from_secs(30), || async {
        delivered(&sink, 0..SERVERS, &post).0 >= 30
            && delivered(&sink, EXTRA..EXTRA + 1, &warm).0 == CAROL_FOLLOWERS
    })
    .await;
    // One inbound activity through each inbox before the outage: bob's key
    // is fetched and cached.
    let mut statuses: Vec<(String, &'static str, u16)> = Vec::new();
    let shared = format!("{}/inbox", app.http_base);
    let personal = format!("{alice_id}/inbox");
    let mut n = 0;
    for inbox in [&shared, &personal] {
        let a = like(&sink, n);
        let r = sink
            .send(EXTRA, "bob", inbox, &a, SendOptions::default())
            .await
            .unwrap();
        statuses.push((a["id"].as_str().unwrap().to_string(), "before", r.status));
        n += 1;
    }

    let before_fault = delivered(&sink, 0..SERVERS, &post).0;
    let fault_at = Instant::now();
    let how = fault.begin(&database).await;
    println!(
        "[{}] {how}, {before_fault} of {all} inboxes had the post",
        fault.name()
    );
    let mut problems: Vec<String> = Vec::new();
    // Readiness while it is away: every service, after 10 s.
    let mut readiness: HashMap<&str, (u16, String)> = HashMap::new();
    let mut publish_during: Option<Result<String, tonic::Status>> = None;
    let mut inbound_during: Vec<(String, &str, u16)> = Vec::new();
    let mut retry_after: HashMap<u16, Option<String>> = HashMap::new();
    // One inbound POST every 500 ms, each on a task of its own so that a
    // slow answer holds up neither the others nor the outage's end.
    let mut sends = Vec::new();
    while fault_at.elapsed() < OUTAGE {
        let k = n;
        n += 1;
        let inbox = if k % 2 == 0 { &shared } else { &personal };
        let which = if k % 2 == 0 { "shared" } else { "personal" };
        let a = like(&sink, k);
        let (sink, inbox) = (sink.clone(), inbox.clone());
        sends.push(tokio::spawn(async move {
            let (id, status, retry_after, took) = timed_send(&sink, EXTRA, &inbox, &a).await;
            (id, which, status, retry_after, took)
        }));
        if readiness.is_empty() && fault_at.elapsed() > Duration::from_secs(10) {
            for s in SERVICES {
                readiness.insert(s, app.readyz_text(s).await);
            }
            let started = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(15),
                app.publish("carol", &public_note(&carol_id, "during"), ""),
            )
            .await;
            publish_during = Some(match r {
                Ok(r) => r.map(|r| r.activity_id),
                Err(_) => Err(tonic::Status::deadline_exceeded("no answer in 15 s")),
            });
            println!(
                "[{}] Publish during the outage answered in {:?}: {:?}",
                fault.name(),
                started.elapsed(),
                publish_during
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let during = delivered(&sink, 0..SERVERS, &post).0;
    fault.end();
    let mut slowest: HashMap<u16, Duration> = HashMap::new();
    for h in sends {
        let (id, which, status, ra, took) = h.await.unwrap();
        retry_after.entry(status).or_insert(ra);
        let e = slowest.entry(status).or_default();
        *e = (*e).max(took);
        inbound_during.push((id, which, status));
    }
    let back = Instant::now();
    println!(
        "[{}] back after {:?}; {during} of {all} inboxes had the post",
        fault.name(),
        fault_at.elapsed()
    );
    for s in SERVICES {
        let (status, body) = &readiness[s];
        println!(
            "[{}] {s} /readyz while away: {status} {}",
            fault.name(),
            body.trim()
        );
        if *status == 200 {
            problems.push(format!("{s} said ready while {} was away", fault.name()));
        }
    }
    let mut by_status: HashMap<(&str, u16), usize> = HashMap::new();
    for (_, which, status) in &inbound_during {
        *by_status.entry((which, *status)).or_insert(0) += 1;
    }
    println!(
        "[{}] inbound POSTs during the outage (inbox, status: count; 0 = no answer, 1 = none in 15 s): {by_status:?}; Retry-After by status: {retry_after:?}; slowest answer by status: {slowest:?}",
        fault.name()
    );
    statuses.extend(inbound_during);

    // Back: every inbox gets the post, within RECOVERY.
    let mut ready_again = None;
    let mut all_at = None;
    while back.elapsed() < RECOVERY {
        if ready_again.is_none() {
            let mut all_ready = true;
            for s in SERVICES {
                all_ready &= app.readyz(s).await == 200;
            }
            if all_ready {
                ready_again = Some(back.elapsed());
            }
        }
        if delivered(&sink, 0..SERVERS, &post).0 == all {
            all_at = Some(back.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "[{}] all ready again {:?} after the return; every inbox had the post {:?} after it",
        fault.name(),
        ready_again,
        all_at
    );
    if all_at.is_none() {
        problems.push(format!(
            "{} of {all} inboxes had the post {RECOVERY:?} after the return",
            delivered(&sink, 0..SERVERS, &post).0
        ));
    }
    // A publish the outage answered OK must reach carol's followers.
    let during_id = match &publish_during {
        Some(Ok(id)) => Some(id.clone()),
        _ => None,
    };
    if let Some(id) = &during_id {
        let deadline = Instant::now() + RECOVERY;
        while Instant::now() < deadline
            && delivered(&sink, EXTRA..EXTRA + 1, id).0 < CAROL_FOLLOWERS
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Every activity answered 202 reaches the stream exactly once.
    let accepted: Vec<String> = statuses
        .iter()
        .filter(|(_, _, s)| *s == 202)
        .map(|(id, _, _)| id.clone())
        .collect();
    // Waited for beyond RECOVERY, so that one late is told from one lost.
    let stream = read_stream(
        &app.grpc,
        &accepted,
        back + STREAM_WAIT,
        Duration::from_secs(3),
    )
    .await;
    let missing: Vec<_> = accepted
        .iter()
        .filter(|id| !stream.contains_key(*id))
        .collect();
    let twice: Vec<_> = stream.iter().filter(|(_, (n, _))| *n > 1).collect();
    let mut late: Vec<(String, Duration)> = accepted
        .iter()
        .filter_map(|id| {
            stream
                .get(id)
                .map(|(_, at)| (id.clone(), at.saturating_duration_since(back)))
        })
        .filter(|(_, after)| *after > RECOVERY)
        .collect();
    late.sort_by_key(|(_, after)| *after);
    let refused_but_there = statuses
        .iter()
        .filter(|(id, _, s)| *s != 202 && stream.contains_key(id))
        .count();
    println!(
        "[{}] inbound: {} answered 202, {} of them on the stream, {} more than once; {} not answered 202 on the stream anyway",
        fault.name(),
        accepted.len(),
        accepted.len() - missing.len(),
        twice.len(),
        refused_but_there
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
    if !late.is_empty() {
        problems.push(format!(
            "{} inbound activities answered 202 reached the stream more than {RECOVERY:?} after the return: {late:?}",
            late.len()
        ));
    }
    // No inbox got a post twice (after a moment for stray copies).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, extra) = delivered(&sink, 0..SERVERS, &post);
    let twice_inboxes: Vec<_> = (0..SERVERS)
        .flat_map(|i| copies(&sink, i).into_iter().map(move |(k, c)| (i, k, c)))
        .filter(|(_, _, c)| *c > 1)
        .map(|(i, (path, _), c)| format!("server {i} {path} x{c}"))
        .collect();
    println!(
        "[{}] duplicates: {extra} extra copies of alice's post at {} inboxes: {:?}",
        fault.name(),
        twice_inboxes.len(),
        twice_inboxes.iter().take(10).collect::<Vec<_>>()
    );
    if extra > 0 {
        problems.push(format!(
            "{extra} duplicate POSTs of alice's post ({} inboxes got it more than once)",
            twice_inboxes.len()
        ));
    }
    let sink_refused = refused_by_sink(&sink, 0..SERVERS, &post);
    if !sink_refused.is_empty() {
        problems.push(format!(
            "the fake servers refused {} POSTs of alice's post: {:?}",
            sink_refused.len(),
            sink_refused.iter().take(3).collect::<Vec<_>>()
        ));
    }
    if let Some(id) = &during_id {
        let (got, extra) = delivered(&sink, EXTRA..EXTRA + 1, id);
        println!(
            "[{}] the post published during the outage: {got} of {CAROL_FOLLOWERS} inboxes, {extra} extra copies",
            fault.name()
        );
        if got < CAROL_FOLLOWERS || extra > 0 {
            problems.push(format!(
                "the post published (OK) during the outage reached {got} of {CAROL_FOLLOWERS} inboxes with {extra} extra copies"
            ));
        }
    }
    services_report(&mut app, fault.name(), &SERVICES, &mut problems);
    println!(
        "[{}] the test took {:?}",
        fault.name(),
        test_started.elapsed()
    );
    if !problems.is_empty() {
        app.keep_logs();
    }
    app.stop().await;
    drop(fault);
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_30_s_under_load_loses_and_repeats_nothing() {
    let pg = PrivatePostgres::start(PgOptions::default());
    println!("template initdb: {:?}", PrivatePostgres::initdb_time());
    a_backend_away_under_load(Fault::PostgresDown(pg)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_for_30_s_under_load_loses_and_repeats_nothing() {
    let redis = PrivateRedis::start();
    a_backend_away_under_load(Fault::RedisDown(redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refusing_connections_under_load_loses_and_repeats_nothing() {
    let pg = PrivatePostgres::start(PgOptions {
        max_connections: 60,
        superuser_reserved_connections: 0,
    });
    a_backend_away_under_load(Fault::PostgresRefusing(pg, None)).await;
}

/// The harness itself: a private Redis and PostgreSQL stop and come back
/// on the same port, and are gone once dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_backends_stop_and_restart_on_their_port() {
    let mut r = PrivateRedis::start();
    let port = r.port();
    r.stop();
    assert!(!r.answers());
    r.restart();
    assert!(r.answers() && r.port() == port);
    let mut pg = PrivatePostgres::start(PgOptions {
        max_connections: 7,
        superuser_reserved_connections: 0,
    });
    assert_eq!(pg.psql("SHOW max_connections").trim(), "7");
    pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (1)");
    pg.stop(PgStop::Immediate);
    assert!(!pg.answers());
    pg.restart();
    assert_eq!(pg.psql("SELECT x FROM t").trim(), "1");
    let mut held = Vec::new();
    let refused = fill(&pg, &mut held).await;
    assert_eq!(held.len(), 7);
    assert!(refused.contains("too many clients"), "{refused}");
    drop(held);
    let dir = pg.dir().to_path_buf();
    drop(pg);
    drop(r);
    assert!(!dir.exists());
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "redis still listening after drop"
    );
}

/// A store whose server refuses connections says why: the readiness reason
/// and the logs show PostgreSQL's own message ("sorry, too many clients
/// already"), not only "db error".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_refused_a_connection_says_why() {
    use stampede_backends::store::{postgres::PgStore, Store};
    let pg = PrivatePostgres::start(PgOptions {
        max_connections: 3,
        superuser_reserved_connections: 0,
    });
    let mut held = Vec::new();
    let refused = fill(&pg, &mut held).await;
    assert!(refused.contains("too many clients"), "{refused}");
    let store = PgStore::connect(&pg.url("postgres"), 1).unwrap();
    let err = store.ping().await.unwrap_err().to_string();
    println!("PgStore::ping while every slot is taken: {err}");
    assert!(
        err.contains("too many clients"),
        "the store's error hides PostgreSQL's reason ({refused}): {err}"
    );
}
