//! The four services behind PgBouncer in transaction mode: every
//! connection of theirs (and the test's own store, and the scratch
//! database's creation) goes through a private `pgbouncer` with 5 server
//! connections, in front of a private PostgreSQL. Migrations, actors,
//! publishing to followers, inbound activities and Status must all work
//! as they do on a direct connection: a server connection is a client's
//! for one transaction only, so what a client keeps on one across
//! transactions (session advisory locks, prepared statements on
//! PgBouncer before 1.21) is found here. The services send unnamed
//! statements (`STAMPEDE_DATABASE_STATEMENTS=unnamed`), as they must on a
//! PgBouncer without prepared-statement support.
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use stampede_backends::store::postgres::PgStore;
use stampede_backends::store::{Follower, Store};
use stampede_core::activity::public_note;
use stampede_proto::api::{CreateActorRequest, StatusRequest};
use stampede_sink::{SendOptions, Sink, SinkOptions};
use stampede_tests::private_backends::{
    PgBouncerOptions, PgOptions, PrivatePgBouncer, PrivatePostgres,
};

use crate::faults::{delivered, log_summary, read_stream, SERVICES};
use crate::helpers::{spawn_app, AppOptions, Backend};

/// Fake servers alice's followers are on; server `SERVERS` hosts bob, who
/// sends to our inboxes.
const SERVERS: usize = 3;
const PER_SERVER: usize = 10;
const POSTS: usize = 5;
const LIKES: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_services_work_behind_pgbouncer_in_transaction_mode() {
    let pg = PrivatePostgres::start(PgOptions::default());
    let opts = PgBouncerOptions::default();
    let pool_size = opts.default_pool_size as i64;
    let bouncer = PrivatePgBouncer::start(pg.port(), opts);
    println!(
        "{} on port {}, pool_mode=transaction, default_pool_size={pool_size}",
        PrivatePgBouncer::version(),
        bouncer.port()
    );
    let mut problems: Vec<String> = Vec::new();
    let mut app = spawn_app(
        Backend::External,
        AppOptions {
            processes: SERVICES.to_vec(),
            admin_database_url: Some(bouncer.url("postgres")),
            extra: vec![
                ("STAMPEDE_RETRY_SCHEDULE_SECS", "1,1,2,2,2".to_string()),
                // PgBouncer before 1.21 carries no prepared statement from
                // one server connection to another: every statement is
                // the unnamed one, parsed, bound and run in one go.
                ("STAMPEDE_DATABASE_STATEMENTS", "unnamed".to_string()),
            ],
            ..AppOptions::default()
        },
    )
    .await;
    let db_url = app.env["STAMPEDE_DATABASE_URL"].clone();
    assert!(
        db_url.starts_with(&format!(
            "postgres://postgres@127.0.0.1:{}/",
            bouncer.port()
        )),
        "the services are not on PgBouncer: {db_url}"
    );
    let database = db_url.rsplit('/').next().unwrap().to_string();

    // Migrations: all applied, read on a direct connection (named, so
    // that the server connections counted below are PgBouncer's only).
    let direct_url = format!("{}?application_name=direct", pg.url(&database));
    let (direct, conn) = tokio_postgres::connect(&direct_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let versions: Vec<i32> = direct
        .query("SELECT version FROM stampede_migrations ORDER BY 1", &[])
        .await
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default();
    println!("migrations applied through PgBouncer: {versions:?}");
    if versions.is_empty() || versions != (1..=versions.len() as i32).collect::<Vec<_>>() {
        problems.push(format!("migrations applied: {versions:?}"));
    }

    let sink = Arc::new(
        Sink::start(SinkOptions {
            servers: SERVERS + 1,
            shared_inbox: Arc::new(|_| false),
            ..SinkOptions::default()
        })
        .await
        .unwrap(),
    );
    // Actors through ingest's gRPC; followers seeded on a direct
    // connection (the test's `app.store` is on PgBouncer too): what fails
    // here is the services'.
    for name in ["alice", "carol"] {
        if let Err(e) = app
            .actors()
            .create_actor(CreateActorRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
        {
            problems.push(format!("CreateActor {name} failed: {e}"));
        }
    }
    let store = PgStore::connect(&direct_url, 4).unwrap();
    let alice = store
        .actor_by_name("alice")
        .await
        .unwrap()
        .expect("alice was not created")
        .id;
    for (i, n) in (0..SERVERS).flat_map(|i| (0..PER_SERVER).map(move |n| (i, n))) {
        let f = sink.actor(i, &format!("f{n}")).unwrap();
        store
            .add_follower(
                alice,
                &Follower {
                    actor: f.id.clone(),
                    inbox: f.inbox.clone(),
                    shared_inbox: f.shared_inbox.clone(),
                    host: f.host.clone(),
                    follow_id: None,
                },
            )
            .await
            .unwrap();
    }
    let alice_id = format!("{}/users/alice", app.http_base);

    // Posts, one after another, each to the 30 followers.
    let mut posts = Vec::new();
    for k in 0..POSTS {
        match app
            .publish("alice", &public_note(&alice_id, &format!("post {k}")), "")
            .await
        {
            Ok(r) => posts.push(r.activity_id),
            Err(e) => problems.push(format!("Publish {k} failed: {e}")),
        }
    }
    // Likes by bob to our inboxes, shared and personal in turn.
    let bob = sink.actor(SERVERS, "bob").unwrap();
    let mut accepted = Vec::new();
    for k in 0..LIKES {
        let inbox = if k % 2 == 0 {
            format!("{}/inbox", app.http_base)
        } else {
            format!("{alice_id}/inbox")
        };
        let like = json!({
            "@context": "https://www.w3.org/ns/activitystreams",
            "id": format!("{}/likes/bouncer-{k}", bob.id),
            "type": "Like",
            "actor": bob.id,
            "object": "https://elsewhere.example/notes/1",
        });
        match sink
            .send(SERVERS, "bob", &inbox, &like, SendOptions::default())
            .await
        {
            Ok(r) if r.status == 202 => accepted.push(like["id"].as_str().unwrap().to_string()),
            Ok(r) => problems.push(format!("Like {k} to {inbox} answered {}", r.status)),
            Err(e) => problems.push(format!("Like {k} to {inbox}: {e}")),
        }
    }

    // Every post at every follower's inbox, exactly once.
    let all = SERVERS * PER_SERVER;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && !posts
            .iter()
            .all(|p| delivered(&sink, 0..SERVERS, p).0 == all)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for p in &posts {
        let (got, extra) = delivered(&sink, 0..SERVERS, p);
        println!("{p}: {got} of {all} inboxes, {extra} extra copies");
        if got != all || extra > 0 {
            problems.push(format!(
                "{p} reached {got} of {all} inboxes with {extra} extra copies"
            ));
        }
    }
    // Every Like answered 202 on the application's stream, exactly once.
    let stream = read_stream(
        &app.grpc,
        &accepted,
        Instant::now() + Duration::from_secs(30),
        Duration::from_secs(2),
    )
    .await;
    let missing: Vec<_> = accepted
        .iter()
        .filter(|id| !stream.contains_key(*id))
        .collect();
    let twice: Vec<_> = stream.iter().filter(|(_, (n, _))| *n > 1).collect();
    println!(
        "inbound: {} of {LIKES} answered 202, {} of them on the stream, {} more than once",
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

    // Status, readiness.
    match app.admin().status(StatusRequest {}).await {
        Ok(s) => {
            let s = s.into_inner();
            println!(
                "Status: activities {}, delivered {}, failed {}, dead letters {}",
                s.activities, s.delivered, s.failed, s.dead_letters
            );
            let want = (posts.len() * all) as u64;
            if s.delivered < want {
                problems.push(format!(
                    "Status says {} delivered, want {want}",
                    s.delivered
                ));
            }
        }
        Err(e) => problems.push(format!("Status failed: {e}")),
    }
    for s in SERVICES {
        let (status, body) = app.readyz_text(s).await;
        if status != 200 {
            problems.push(format!("{s} /readyz: {status} {}", body.trim()));
        }
    }

    // PgBouncer carried it, on at most its pool's server connections.
    let servers: i64 = direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND application_name <> 'direct'",
            &[&database],
        )
        .await
        .unwrap()
        .get(0);
    println!("PgBouncer's server connections to {database}: {servers}");
    if servers > pool_size {
        problems.push(format!(
            "{servers} server connections to {database}, PgBouncer's pool is {pool_size}"
        ));
    }
    println!("SHOW POOLS:\n{}", bouncer.admin("SHOW POOLS"));
    println!("SHOW STATS:\n{}", bouncer.admin("SHOW STATS"));

    // No service logged an error; the warnings are printed.
    for s in SERVICES {
        let summary = log_summary(&app.logs(s));
        println!("{s} logged {} kinds of WARN/ERROR lines", summary.len());
        for (count, _, example) in summary.iter().take(8) {
            let mut example = example.clone();
            example.truncate(400);
            println!("    {count} x {example}");
            if example.starts_with("ERROR") {
                problems.push(format!("{s} logged {count} x {example}"));
            }
        }
    }
    let exited = app.exited();
    if !exited.is_empty() {
        problems.push(format!("services exited: {exited:?}"));
    }
    if !problems.is_empty() {
        app.keep_logs();
        println!("pgbouncer's log:\n{}", bouncer.log());
    }
    drop(direct);
    drop(store);
    app.stop().await;
    drop(bouncer);
    drop(pg);
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
