//! Local actors at the inbox edge (README, "Local actors at the edge"):
//! a POST to a personal inbox learns whether its actor exists from memory,
//! not from the store each time; a deletion or creation through the API is
//! seen by every ingest process within 2 s.
use std::time::{Duration, Instant};

use stampede_proto::api::{CreateActorRequest, DeleteActorRequest};
use stampede_sink::{SendOptions, Sink, SinkOptions};

use crate::helpers::{spawn_app, AppOptions, Backend, TestApp};
use crate::inbound::like;

/// How soon every ingest process answers for a created or deleted actor
/// (README, "Local actors at the edge").
const SEEN_WITHIN: Duration = Duration::from_secs(2);

async fn lookups(app: &TestApp, source: &str) -> u64 {
    app.metric(
        "ingest",
        "stampede_local_actor_lookups_total",
        &format!("source=\"{source}\""),
    )
    .await
}

async fn create(app: &TestApp, name: &str) {
    app.actors()
        .create_actor(CreateActorRequest {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn delete(app: &TestApp, name: &str) -> Result<(), tonic::Status> {
    app.actors()
        .delete_actor(DeleteActorRequest { name: name.into() })
        .await
        .map(|_| ())
}

/// A signed Like from the sink's bob to `name`'s inbox at `base`: the
/// edge's status.
async fn post(sink: &Sink, base: &str, name: &str, n: usize) -> u16 {
    let bob = sink.actor(0, "bob").unwrap();
    let inbox = format!("{base}/users/{name}/inbox");
    sink.send(0, "bob", &inbox, &like(&bob.id, n), SendOptions::default())
        .await
        .unwrap()
        .status
}

/// Polls `base` until `name`'s inbox answers `want`: how long after
/// `since` it did.
async fn until_status(sink: &Sink, base: &str, name: &str, want: u16, since: Instant) -> Duration {
    let started = Instant::now();
    let mut n = 100_000;
    loop {
        n += 1;
        let got = post(sink, base, name, n).await;
        if got == want {
            return since.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{base}: {name}'s inbox still answers {got}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_personal_inbox_is_found_in_memory(backend: Backend) {
    const POSTS: usize = 50;
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    create(&app, "alice").await;
    let store_before = lookups(&app, "store").await;
    for n in 0..POSTS {
        assert_eq!(post(&sink, &app.http_base, "alice", n).await, 202);
    }
    let store_reads = lookups(&app, "store").await - store_before;
    // The first POST reads the store; the version the creation moved may
    // be seen after it, which forgets alice once more.
    assert!(
        (1..=2).contains(&store_reads),
        "{store_reads} store reads for {POSTS} POSTs"
    );
    assert!(lookups(&app, "memory").await >= (POSTS as u64) - 2);

    // A name that is not an actor: 404, remembered too.
    for n in 0..10 {
        assert_eq!(post(&sink, &app.http_base, "carol", n).await, 404);
    }
    assert!(lookups(&app, "store").await - store_before <= 3);
    // Names no actor can have never reach the store.
    assert_eq!(post(&sink, &app.http_base, "Not.An.Actor", 0).await, 404);

    // Its document, read without its private key, shows its public one.
    let doc_url = format!("{}/users/alice", app.http_base);
    let doc = reqwest::get(&doc_url).await.unwrap().text().await.unwrap();
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let pem = doc["publicKey"]["publicKeyPem"].as_str().unwrap();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");

    // Deleted through the API: 404 at once from the process that deleted
    // it, and so is a second deletion; its document and GetActor are gone.
    delete(&app, "alice").await.unwrap();
    assert_eq!(post(&sink, &app.http_base, "alice", 1000).await, 404);
    assert_eq!(reqwest::get(&doc_url).await.unwrap().status(), 404);
    let gone = app
        .actors()
        .get_actor(stampede_proto::api::GetActorRequest {
            name: "alice".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    let again = delete(&app, "alice").await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound);
    assert!(app.store.actor_by_name("alice").await.unwrap().is_none());
    // Created: found at once, though "carol" was remembered absent.
    create(&app, "carol").await;
    assert_eq!(post(&sink, &app.http_base, "carol", 1000).await, 202);
    app.stop().await;
}

/// Two ingest processes: what one's API creates or deletes, the other's
/// edge sees within [`SEEN_WITHIN`], though it held the opposite answer in
/// memory.
async fn every_ingest_sees_a_deletion_and_a_creation() {
    let app = spawn_app(
        Backend::External,
        AppOptions {
            processes: vec!["ingest"],
            copies: vec![("ingest", 2)],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    let bases = app.ingest_bases();
    assert_eq!(bases.len(), 2);
    create(&app, "alice").await;
    // Each process holds alice as present and carol as absent.
    for base in &bases {
        until_status(&sink, base, "alice", 202, Instant::now()).await;
        for n in 0..3 {
            assert_eq!(post(&sink, base, "alice", n).await, 202);
            assert_eq!(post(&sink, base, "carol", n).await, 404);
        }
    }

    delete(&app, "alice").await.unwrap();
    let deleted = Instant::now();
    for base in &bases {
        let took = until_status(&sink, base, "alice", 404, deleted).await;
        println!("{base}: alice's inbox answers 404 after {took:?}");
        assert!(took <= SEEN_WITHIN, "{base}: deletion seen after {took:?}");
    }
    // Each holds carol as absent again (the deletion's version made them
    // forget her), for longer than SEEN_WITHIN unless told.
    for base in &bases {
        assert_eq!(post(&sink, base, "carol", 10).await, 404);
    }
    create(&app, "carol").await;
    let created = Instant::now();
    for base in &bases {
        let took = until_status(&sink, base, "carol", 202, created).await;
        println!("{base}: carol's inbox answers 202 after {took:?}");
        assert!(took <= SEEN_WITHIN, "{base}: creation seen after {took:?}");
    }
    app.stop().await;
}

/// Deliveries still queued when their author is deleted are dropped, not
/// retried for ever: their activity and its records went with the actor.
async fn a_deleted_actors_queued_deliveries_are_dropped(backend: Backend) {
    use stampede_proto::api::HostRequest;
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    let alice = app.create_actor("alice").await;
    // Three followers on one server: one delivery, to its shared inbox.
    let followers: Vec<_> = (0..3)
        .map(|i| sink.actor(0, &format!("f{i}")).unwrap())
        .collect();
    app.seed_followers(alice, &followers).await;
    let host = followers[0].host.clone();
    let mut admin = app.admin();
    admin
        .pause_host(HostRequest { host: host.clone() })
        .await
        .unwrap();
    let alice_id = format!("{}/users/alice", app.http_base);
    app.publish(
        "alice",
        &stampede_core::activity::public_note(&alice_id, "before the end"),
        "",
    )
    .await
    .unwrap();
    crate::helpers::wait_for("the deliveries parked", Duration::from_secs(30), || async {
        app.metric(
            "delivery",
            "stampede_deliveries_total",
            "outcome=\"parked\"",
        )
        .await
            >= 1
    })
    .await;
    delete(&app, "alice").await.unwrap();
    admin.resume_host(HostRequest { host }).await.unwrap();
    // Back from the park (5 s), it is dropped (sent or not: its body may
    // be in the worker's memory; the server cannot verify it any more) and
    // nothing keeps retrying to record it.
    crate::helpers::wait_for(
        "the deliveries dropped",
        Duration::from_secs(60),
        || async {
            let settled = app
                .metric(
                    "delivery",
                    "stampede_deliveries_total",
                    "outcome=\"skipped\"",
                )
                .await;
            let retries = app
                .metric("delivery", "stampede_delivery_settle_retries_total", "")
                .await;
            assert!(
                retries < 3,
                "{retries} tries to record a deleted activity's delivery"
            );
            settled >= 1
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let retries = app
        .metric("delivery", "stampede_delivery_settle_retries_total", "")
        .await;
    assert!(
        retries < 3,
        "{retries} tries to record a deleted activity's delivery"
    );
    app.stop().await;
}

crate::both_backends!(
    a_personal_inbox_is_found_in_memory,
    a_deleted_actors_queued_deliveries_are_dropped
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ingest_sees_a_deletion_and_a_creation_external() {
    every_ingest_sees_a_deletion_and_a_creation().await;
}
