//! Trust boundaries (README "Security"), each tried as a hostile server on
//! this machine would: no remote server speaks for another origin, a
//! request signed for another server is refused, forged requests cannot
//! make us hammer their victim or rate-limit it off our inbox, blocked
//! domains get nothing, and slow clients cannot hold the edge.
//!
//! Long on purpose: one test per boundary of README "Security", each
//! standing alone with its own hostile server, in the order the README
//! lists them, so a reader checks the list against the tests in one file.
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use stampede_proto::api::inbound_service_client::InboundServiceClient;
use stampede_proto::api::{SubscribeRequest, VerifyHeader, VerifyRequest};
use stampede_sink::{SendOptions, Sink, SinkOptions};

use crate::helpers::{spawn_app, wait_for, AppOptions, Backend, TestApp};
use crate::inbound::{edge_count, inbox_count, like};

/// The flood and the slow-client tests load the machine: one at a time,
/// so the slow-client test's latency is the edge's, not the flood's.
static FLOODS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn verify_request(
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> VerifyRequest {
    VerifyRequest {
        method: method.into(),
        path: path.into(),
        headers: headers
            .iter()
            .map(|(n, v)| VerifyHeader {
                name: n.clone(),
                value: v.clone(),
            })
            .collect(),
        body: body.to_vec(),
    }
}

/// Verdicts of the inbox service so far, all results together.
async fn verdicts(app: &TestApp) -> u64 {
    let mut n = 0;
    for r in [
        "accepted",
        "bad_signature",
        "key_unavailable",
        "foreign_id",
        "wrong_host",
        "duplicate",
        "dropped_delete",
    ] {
        n += inbox_count(app, r).await;
    }
    n
}

/// Waits, when the current minute is about to end, for the next one: the
/// rate-limit windows are minutes, and a test must not straddle two.
async fn a_fresh_minute_if_needed(margin_secs: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if 60 - now % 60 < margin_secs {
        tokio::time::sleep(Duration::from_secs(60 - now % 60 + 1)).await;
    }
}

/// A deployment and two remote servers with keys of their own: server 0
/// the victim's, server 1 the attacker's.
async fn victim_and_evil(backend: Backend) -> (TestApp, Sink) {
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = Sink::start(SinkOptions {
        servers: 2,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    sink.rotate_key(1).await.unwrap();
    (app, sink)
}

/// Finding 1: evil.example, asked for its own key, answers with a document
/// claiming to be victim.example's actor with evil's inbox. Nothing of it
/// may be believed: a DM to the victim goes to the victim.
async fn a_key_document_cannot_redirect_another_servers_actor(backend: Backend) {
    let (app, sink) = victim_and_evil(backend).await;
    app.create_actor("alice").await;
    let alice_id = format!("{}/users/alice", app.http_base);
    let victim = sink.actor(0, "bob").unwrap();
    let mallory = sink.actor(1, "mallory").unwrap();
    let evil = format!("http://{}", sink.addr(1).unwrap());
    let evil_key = format!("{evil}/k");
    sink.serve_document(
        1,
        "/k",
        json!({
            "id": victim.id, "type": "Person",
            "inbox": format!("{evil}/users/steal/inbox"),
            "publicKey": {"id": evil_key, "owner": victim.id, "publicKeyPem": sink.public_pem(1).unwrap()},
        }),
    )
    .unwrap();
    // The bait: anything signed with the key, so that we fetch it.
    let opts = || SendOptions {
        key_id: Some(evil_key.clone()),
        ..SendOptions::default()
    };
    let inbox = format!("{alice_id}/inbox");
    let r = sink
        .send(1, "mallory", &inbox, &like(&mallory.id, 1), opts())
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    wait_for("the bait's verdict", Duration::from_secs(30), || async {
        verdicts(&app).await == 1
    })
    .await;
    assert_eq!(sink.gets(1, "/k"), 1, "the key document was fetched");
    assert_eq!(inbox_count(&app, "accepted").await, 0);
    // The same through Verify (a signed GET: no activity to compare with).
    let url = format!("{}/users/alice", app.http_base);
    let headers = sink
        .signed_request_headers(1, "mallory", "GET", &url, b"", &opts())
        .await
        .unwrap();
    let v = InboundServiceClient::new(app.grpc.clone())
        .verify(verify_request("GET", "/users/alice", &headers, b""))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(v.verdict, "accepted", "{v:?}");
    assert_ne!(v.actor, victim.id);

    // A direct message to the victim goes to the victim.
    let dm = json!({
        "@context": "https://www.w3.org/ns/activitystreams",
        "type": "Create", "actor": alice_id, "to": [victim.id],
        "object": {"type": "Note", "attributedTo": alice_id, "to": [victim.id], "content": "for bob only"},
    });
    let published = app.publish("alice", &dm, "").await.unwrap();
    wait_for("the DM at the victim", Duration::from_secs(30), || async {
        sink.received(0)
            .iter()
            .any(|r| r.activity_id.as_deref() == Some(published.activity_id.as_str()))
    })
    .await;
    assert!(
        sink.received(1).is_empty(),
        "evil received {:?}",
        sink.received(1)
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>()
    );
    let stored = app.store.remote_actor(&victim.id).await.unwrap().unwrap();
    assert_eq!(stored.inbox, victim.inbox);
    assert!(app.store.remote_key(&evil_key).await.unwrap().is_none());

    // Inside the victim's own origin: a file a user uploaded there claims to
    // be bob's actor document, with the attacker's key. It is not at bob's
    // URL, and bob's own document does not list the key: not bob's.
    let upload = format!("http://{}/media/x.json", victim.host);
    sink.serve_document(
        0,
        "/media/x.json",
        json!({
            "id": victim.id, "type": "Person", "inbox": format!("{evil}/users/steal/inbox"),
            "publicKey": {"id": format!("{upload}#k"), "owner": victim.id, "publicKeyPem": sink.public_pem(1).unwrap()},
        }),
    )
    .unwrap();
    let forged = SendOptions {
        key_id: Some(format!("{upload}#k")),
        ..SendOptions::default()
    };
    // Signed with the attacker's key (server 1's), as bob.
    let headers = sink
        .signed_request_headers(1, "bob", "GET", &url, b"", &forged)
        .await
        .unwrap();
    let v = InboundServiceClient::new(app.grpc.clone())
        .verify(verify_request("GET", "/users/alice", &headers, b""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.verdict, "key_unavailable", "{v:?}");
    assert_eq!(sink.gets(0, "/media/x.json"), 1);
    let stored = app.store.remote_actor(&victim.id).await.unwrap().unwrap();
    assert_eq!(stored.inbox, victim.inbox);
    app.stop().await;
}

/// Finding 2: `Verify` answers for an owner only when the owner is of the
/// key's origin and, for a key document that is not the owner's actor
/// document, the owner's actor document lists the key.
async fn verify_speaks_only_for_owners_that_list_the_key(backend: Backend) {
    let (app, sink) = victim_and_evil(backend).await;
    let victim = sink.actor(0, "bob").unwrap();
    let mallory = sink.actor(1, "mallory").unwrap();
    let carol = sink.actor(1, "carol").unwrap();
    let evil = format!("http://{}", sink.addr(1).unwrap());
    let pem = sink.public_pem(1).unwrap();
    let key_doc = |id: &str, owner: &str| json!({"id": id, "owner": owner, "publicKeyPem": pem});
    // A key of mallory's that mallory's actor document does not list.
    sink.serve_document(1, "/k2", key_doc(&format!("{evil}/k2"), &mallory.id))
        .unwrap();
    // A key claiming an owner on another server.
    sink.serve_document(1, "/k3", key_doc(&format!("{evil}/k3"), &victim.id))
        .unwrap();
    // A key document whose owner does list it: believed.
    sink.serve_document(1, "/k4", key_doc(&format!("{evil}/k4"), &carol.id))
        .unwrap();
    sink.serve_document(
        1,
        "/users/carol",
        json!({
            "id": carol.id, "type": "Person", "inbox": carol.inbox,
            "publicKey": [
                {"id": format!("{}#main-key", carol.id), "owner": carol.id, "publicKeyPem": pem},
                {"id": format!("{evil}/k4"), "owner": carol.id, "publicKeyPem": pem},
            ],
        }),
    )
    .unwrap();
    app.create_actor("alice").await;
    let url = format!("{}/users/alice", app.http_base);
    let verify = |key: String| {
        let (sink, url, grpc) = (&sink, url.clone(), app.grpc.clone());
        async move {
            let opts = SendOptions {
                key_id: Some(key),
                ..SendOptions::default()
            };
            let headers = sink
                .signed_request_headers(1, "mallory", "GET", &url, b"", &opts)
                .await
                .unwrap();
            InboundServiceClient::new(grpc)
                .verify(verify_request("GET", "/users/alice", &headers, b""))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let own = verify(format!("{}#main-key", mallory.id)).await;
    assert_eq!(
        (own.verdict.as_str(), own.actor.as_str()),
        ("accepted", mallory.id.as_str()),
        "{}",
        own.reason
    );
    let unlisted = verify(format!("{evil}/k2")).await;
    assert_eq!(unlisted.verdict, "key_unavailable", "{unlisted:?}");
    assert!(unlisted.actor.is_empty());
    let foreign = verify(format!("{evil}/k3")).await;
    assert_eq!(foreign.verdict, "key_unavailable", "{foreign:?}");
    assert!(foreign.actor.is_empty(), "{foreign:?}");
    let listed = verify(format!("{evil}/k4")).await;
    assert_eq!(
        (listed.verdict.as_str(), listed.actor.as_str()),
        ("accepted", carol.id.as_str()),
        "{}",
        listed.reason
    );
    // A refused key document is remembered: asking again fetches nothing.
    let before = sink.gets(1, "/k3");
    let again = verify(format!("{evil}/k3")).await;
    assert_eq!(again.verdict, "key_unavailable");
    assert_eq!(sink.gets(1, "/k3"), before);
    // A body that is an activity must be a readable one: no key check alone.
    let unreadable = json!({"type": "Like", "actor": [mallory.id], "object": url})
        .to_string()
        .into_bytes();
    let post = format!("{}/users/alice/inbox", app.http_base);
    let headers = sink
        .signed_request_headers(
            1,
            "mallory",
            "POST",
            &post,
            &unreadable,
            &SendOptions::default(),
        )
        .await
        .unwrap();
    let v = InboundServiceClient::new(app.grpc.clone())
        .verify(verify_request(
            "POST",
            "/users/alice/inbox",
            &headers,
            &unreadable,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (v.verdict.as_str(), v.actor.as_str()),
        ("malformed", ""),
        "{v:?}"
    );
    app.stop().await;
}

/// Finding 3: an `Update` of an actor cannot register a key id of another
/// origin (here, another server's actor's key) as its own.
async fn an_update_cannot_adopt_another_origins_key(backend: Backend) {
    let (app, sink) = victim_and_evil(backend).await;
    app.create_actor("alice").await;
    let inbox = format!("{}/users/alice/inbox", app.http_base);
    let bob = sink.actor(0, "bob").unwrap();
    let mallory_key = format!("{}#main-key", sink.actor(1, "mallory").unwrap().id);
    let update = json!({
        "id": format!("{}#update-1", bob.id), "type": "Update", "actor": bob.id,
        "object": {
            "id": bob.id, "type": "Person", "inbox": bob.inbox,
            "publicKey": {"id": mallory_key, "owner": bob.id, "publicKeyPem": sink.public_pem(0).unwrap()},
        },
    });
    let r = sink
        .send(0, "bob", &inbox, &update, SendOptions::default())
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    wait_for("the update", Duration::from_secs(30), || async {
        inbox_count(&app, "accepted").await == 1
    })
    .await;
    let adopted = app.store.remote_key(&mallory_key).await.unwrap();
    assert!(
        adopted.is_none_or(|k| k.owner != bob.id),
        "bob's update registered mallory's key"
    );
    // Bob's key under mallory's key id does not verify as anyone.
    let url = format!("{}/users/alice", app.http_base);
    let headers = sink
        .signed_request_headers(
            0,
            "bob",
            "GET",
            &url,
            b"",
            &SendOptions {
                key_id: Some(mallory_key.clone()),
                ..SendOptions::default()
            },
        )
        .await
        .unwrap();
    let v = InboundServiceClient::new(app.grpc.clone())
        .verify(verify_request("GET", "/users/alice", &headers, b""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.verdict, "bad_signature", "{v:?}");
    app.stop().await;
}

/// Finding 4: an activity id (and a created, updated or deleted object's
/// id) must be of its actor's origin; one of another origin is refused with
/// a verdict of its own and does not mark the real one as seen.
async fn ids_of_another_origin_are_refused_and_shadow_nothing(backend: Backend) {
    let (app, sink) = victim_and_evil(backend).await;
    let alice = app.create_actor("alice").await;
    let alice_id = format!("{}/users/alice", app.http_base);
    let inbox = format!("{alice_id}/inbox");
    let bob = sink.actor(0, "bob").unwrap();
    let mallory = sink.actor(1, "mallory").unwrap();
    assert_eq!(sink.follow(0, "bob", &alice_id).await.unwrap().status, 202);
    wait_for("bob's follow", Duration::from_secs(30), || async {
        app.store.follower_count(alice).await.unwrap() == 1
    })
    .await;
    let delete_id = format!("{}#delete", bob.id);
    // Mallory sends first, under bob's Delete's id and with bob's object.
    let shadow = json!({"id": delete_id, "type": "Like", "actor": mallory.id, "object": alice_id});
    let forged_create = json!({
        "id": format!("{}/creates/1", mallory.id), "type": "Create", "actor": mallory.id,
        "object": {"id": format!("{}/notes/1", bob.id), "type": "Note", "content": "not bob's"},
    });
    // The same hidden behind a second type, and in an array of objects.
    let typed_twice = json!({
        "id": format!("{}/creates/2", mallory.id), "type": ["Note", "Create"], "actor": mallory.id,
        "object": {"id": format!("{}/notes/2", bob.id), "type": "Note"},
    });
    let in_an_array = json!({
        "id": format!("{}/updates/1", mallory.id), "type": "Update", "actor": mallory.id,
        "object": [{"id": format!("{}/notes/3", mallory.id)}, {"id": format!("{}/notes/4", bob.id)}],
    });
    for a in [&shadow, &forged_create, &typed_twice, &in_an_array] {
        let r = sink
            .send(1, "mallory", &inbox, a, SendOptions::default())
            .await
            .unwrap();
        assert_eq!(r.status, 202);
    }
    wait_for("four foreign ids", Duration::from_secs(30), || async {
        inbox_count(&app, "foreign_id").await == 4
    })
    .await;
    // Bob's real Delete of himself.
    let delete = json!({"id": delete_id, "type": "Delete", "actor": bob.id, "object": bob.id});
    let r = sink
        .send(0, "bob", &inbox, &delete, SendOptions::default())
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    wait_for(
        "bob's delete to take effect",
        Duration::from_secs(30),
        || async { app.store.follower_count(alice).await.unwrap() == 0 },
    )
    .await;
    assert_eq!(inbox_count(&app, "duplicate").await, 0);
    // The side effect comes before the count: wait for it.
    wait_for(
        "the follow and the delete accepted",
        Duration::from_secs(10),
        || async { inbox_count(&app, "accepted").await == 2 },
    )
    .await;
    // An id over 2 KiB is refused at the edge.
    let long = json!({"id": format!("{}/{}", bob.id, "x".repeat(3000)), "type": "Like", "actor": bob.id, "object": alice_id});
    let r = sink
        .send(0, "bob", &inbox, &long, SendOptions::default())
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    app.stop().await;
}

/// Finding 5: forged requests naming a victim's actor cost the victim a
/// handful of GETs: a key that stops verifying is refetched at most once
/// per window, and fetches per remote host per minute are capped.
async fn spoofed_posts_cost_their_victim_a_handful_of_fetches(backend: Backend) {
    let _one_at_a_time = FLOODS.lock().await;
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![
                ("STAMPEDE_INBOUND_RATE_LIMIT", "0".into()),
                ("STAMPEDE_KEY_FETCH_RATE_LIMIT", "20".into()),
            ],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    app.create_actor("alice").await;
    let inbox = format!("{}/users/alice/inbox", app.http_base);
    let bob = sink.actor(0, "bob").unwrap();
    let bob_doc = "/users/bob";
    // Bob's genuine activity: his key is fetched once and cached.
    sink.send(0, "bob", &inbox, &like(&bob.id, 0), SendOptions::default())
        .await
        .unwrap();
    wait_for(
        "bob's genuine activity",
        Duration::from_secs(30),
        || async { inbox_count(&app, "accepted").await == 1 },
    )
    .await;
    assert_eq!(sink.gets(0, bob_doc), 1);
    let throttled = || {
        app.metric(
            "inbox",
            "stampede_key_fetches_total",
            "result=\"throttled\"",
        )
    };

    // 10,000 forged POSTs naming bob, signed with a key bob never had: one
    // request, replayed (the forger needs only one signature).
    let body = like(&bob.id, 1).to_string().into_bytes();
    let forged = SendOptions {
        wrong_key: true,
        ..SendOptions::default()
    };
    let headers = sink
        .signed_request_headers(0, "bob", "POST", &inbox, &body, &forged)
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let statuses = futures::stream::iter(0..10_000)
        .map(|_| {
            let mut req = client.post(&inbox).body(body.clone());
            for (k, v) in &headers {
                if k != "host" {
                    req = req.header(k.as_str(), v.as_str());
                }
            }
            async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
        })
        .buffer_unordered(32)
        .filter(|s| futures::future::ready(*s != 202))
        .collect::<Vec<u16>>()
        .await;
    assert!(statuses.is_empty(), "refused at the edge: {statuses:?}");
    // Each is refused (bad_signature) or, within the refetch window, put
    // off until after it in case bob really rotated his key (deferred).
    let decided =
        || async { inbox_count(&app, "bad_signature").await + inbox_count(&app, "deferred").await };
    wait_for(
        "10,000 forged POSTs decided",
        Duration::from_secs(180),
        || async { decided().await >= 10_000 },
    )
    .await;
    let fetched = sink.gets(0, bob_doc);
    eprintln!("10,000 forged POSTs naming bob: {fetched} GETs of his document in all");
    assert!(fetched <= 2, "bob's document fetched {fetched} times");
    assert!(
        throttled().await >= 9_999,
        "the refetches after the first were refused"
    );
    let before = decided().await;

    // 300 forged POSTs naming 300 different actors of bob's server: each is
    // a new key, and the host's fetches are capped at 20 a minute.
    let mut sent = 0;
    for n in 0..300 {
        let who = format!("ghost{n}");
        let actor = sink.actor(0, &who).unwrap();
        let r = sink
            .send(
                0,
                &who,
                &inbox,
                &like(&actor.id, n),
                SendOptions {
                    wrong_key: true,
                    ..SendOptions::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(r.status, 202);
        sent += 1;
    }
    assert_eq!(sent, 300);
    wait_for(
        "the ghosts' verdicts or deferrals",
        Duration::from_secs(120),
        || async { decided().await - before >= 300 },
    )
    .await;
    let total = sink.total_gets(0);
    eprintln!(
        "300 forged POSTs naming 300 actors of bob's server: {} GETs",
        total - fetched
    );
    // One for bob, at most one refetch, 20 per minute (two minutes at most
    // if the run straddles a boundary).
    assert!(total <= 1 + 1 + 40, "{total} GETs reached the victim");
    assert!(inbox_count(&app, "accepted").await == 1);
    app.stop().await;
}

/// Finding 6: the edge's rate limit is keyed on the client address (behind
/// a trusted proxy, the address it forwarded for), so junk claiming a
/// victim's actors does not get the victim's genuine traffic refused; the
/// inbox service limits per verified key host.
async fn the_edge_limits_clients_not_the_actors_they_name(backend: Backend) {
    a_fresh_minute_if_needed(25).await;
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![
                ("STAMPEDE_INBOUND_RATE_LIMIT", "3".into()),
                ("STAMPEDE_TRUSTED_PROXIES", "127.0.0.4/32".into()),
            ],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    app.create_actor("alice").await;
    let inbox = format!("{}/users/alice/inbox", app.http_base);
    let bob = sink.actor(0, "bob").unwrap();
    // Junk names bob but a key bob's server does not have: it fails
    // verification without touching bob's real key.
    let junk_key = format!("http://{}/nokey#k", bob.host);
    let from = |last: u8, junk: bool, xff: Option<&str>| SendOptions {
        key_id: junk.then(|| junk_key.clone()),
        source: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))),
        headers: xff
            .map(|x| vec![("x-forwarded-for".to_string(), x.to_string())])
            .unwrap_or_default(),
        ..SendOptions::default()
    };
    let mut n = 0;
    let mut send = |o: SendOptions| {
        n += 1;
        let (sink, inbox, bob) = (&sink, inbox.clone(), bob.clone());
        async move {
            sink.send(0, "bob", &inbox, &like(&bob.id, n), o)
                .await
                .unwrap()
        }
    };
    // Junk in bob's name from one address: limited.
    let mut junk = Vec::new();
    for _ in 0..4 {
        junk.push(send(from(2, true, None)).await);
    }
    let statuses: Vec<u16> = junk.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [202, 202, 202, 429]);
    let secs: u64 = junk[3].retry_after.as_deref().unwrap().parse().unwrap();
    assert!((1..=61).contains(&secs), "{secs}");
    // Bob's genuine activity from his own address: accepted.
    assert_eq!(send(from(3, false, None)).await.status, 202);
    wait_for("bob's activity", Duration::from_secs(30), || async {
        inbox_count(&app, "accepted").await == 1
    })
    .await;
    // Behind the trusted proxy: each forwarded-for client has its own window.
    let proxied: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(send(from(4, true, Some("198.51.100.1"))).await.status);
        }
        v.push(send(from(4, true, Some("198.51.100.2"))).await.status);
        v
    };
    assert_eq!(proxied, [202, 202, 202, 429, 202]);
    // An untrusted peer's X-Forwarded-For is its own claim: ignored.
    let mut spoofed = Vec::new();
    for i in 0..4 {
        let xff = format!("198.51.100.{}", 10 + i);
        spoofed.push(send(from(5, true, Some(&xff))).await.status);
    }
    assert_eq!(spoofed, [202, 202, 202, 429]);
    assert_eq!(edge_count(&app, "rate_limited").await, 3);
    // In the inbox service, bob's verified host has 3 a minute: his one
    // above and two more pass, the fourth waits for the next minute (not
    // an attempt: it is not lost).
    for last in 6..9 {
        assert_eq!(send(from(last, false, None)).await.status, 202);
    }
    wait_for(
        "three accepted, one waiting",
        Duration::from_secs(30),
        || async {
            inbox_count(&app, "accepted").await == 3 && inbox_count(&app, "rate_limited").await == 1
        },
    )
    .await;
    app.stop().await;
}

/// Finding 7: a request signed for another server (its signed `host`) is
/// refused, in both signature schemes; an alias of ours is accepted.
async fn a_request_signed_for_another_server_is_refused(backend: Backend) {
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![("STAMPEDE_PUBLIC_HOST_ALIASES", "alias.example:8443".into())],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    app.create_actor("alice").await;
    let inbox = format!("{}/users/alice/inbox", app.http_base);
    let bob = sink.actor(0, "bob").unwrap();
    let to = |host: &str| SendOptions {
        host: Some(host.to_string()),
        ..SendOptions::default()
    };
    // Signed for evil.example, replayed to us.
    let r = sink
        .send(0, "bob", &inbox, &like(&bob.id, 1), to("evil.example"))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "the edge does not verify");
    wait_for("the replay's verdict", Duration::from_secs(30), || async {
        inbox_count(&app, "wrong_host").await == 1
    })
    .await;
    // Signed for our alias: ours.
    let r = sink
        .send(
            0,
            "bob",
            &inbox,
            &like(&bob.id, 2),
            to("alias.example:8443"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    wait_for("the alias's verdict", Duration::from_secs(30), || async {
        inbox_count(&app, "accepted").await == 1
    })
    .await;
    // RFC 9421, signed for another authority.
    let body = like(&bob.id, 3).to_string().into_bytes();
    let headers = sink
        .signed_headers_rfc9421(0, "bob", "http://evil.example/users/alice/inbox", &body)
        .unwrap();
    let v = InboundServiceClient::new(app.grpc.clone())
        .verify(verify_request(
            "POST",
            "/users/alice/inbox",
            &headers,
            &body,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.verdict, "wrong_host", "{v:?}");
    let ours = sink
        .signed_headers_rfc9421(0, "bob", &inbox, &body)
        .unwrap();
    let v = InboundServiceClient::new(app.grpc.clone())
        .verify(verify_request("POST", "/users/alice/inbox", &ours, &body))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.verdict, "accepted", "{v:?}");
    app.stop().await;
}

/// Finding 9: a blocked domain gets nothing: fanout skips its followers
/// (counted), delivery skips its queued jobs at send time (not a dead
/// letter), and an actor document naming an inbox on it is not believed.
/// Never a delivery to ourselves either. Each sink server has its own
/// loopback address, so each is a host of its own.
async fn blocked_domains_get_nothing_anywhere(backend: Backend) {
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![("STAMPEDE_BLOCKED_DOMAINS", "127.0.0.32".into())],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = Sink::start(SinkOptions {
        servers: 3,
        bind: Arc::new(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 31 + i as u8))),
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let alice = app.create_actor("alice").await;
    let alice_id = format!("{}/users/alice", app.http_base);
    let bob = sink.actor(0, "bob").unwrap();
    let carol = sink.actor(1, "carol").unwrap();
    let dave = sink.actor(2, "dave").unwrap();
    // Carol followed before her domain was blocked.
    app.seed_followers(alice, &[bob.clone(), carol.clone()])
        .await;
    // Dave's server is allowed, but his document names an inbox on the blocked one.
    sink.serve_document(
        2,
        "/users/dave",
        json!({
            "id": dave.id, "type": "Person", "inbox": carol.inbox,
            "publicKey": {"id": format!("{}#main-key", dave.id), "owner": dave.id, "publicKeyPem": sink.public_pem(2).unwrap()},
        }),
    )
    .unwrap();
    assert_eq!(sink.follow(2, "dave", &alice_id).await.unwrap().status, 202);
    wait_for("dave's follow", Duration::from_secs(30), || async {
        inbox_count(&app, "accepted").await == 1
    })
    .await;
    assert_eq!(
        app.store.follower_count(alice).await.unwrap(),
        2,
        "dave's follow with a blocked inbox was ignored"
    );

    let note = app
        .publish(
            "alice",
            &stampede_core::activity::public_note(&alice_id, "hello"),
            "",
        )
        .await
        .unwrap();
    wait_for("bob's copy", Duration::from_secs(30), || async {
        sink.received(0)
            .iter()
            .any(|r| r.activity_id.as_deref() == Some(note.activity_id.as_str()))
    })
    .await;
    wait_for(
        "the blocked follower counted",
        Duration::from_secs(10),
        || async {
            app.metric(
                "fanout",
                "stampede_fanout_skipped_targets_total",
                "reason=\"blocked\"",
            )
            .await
                == 1
        },
    )
    .await;

    // Jobs already queued for the blocked domain, and one for ourselves.
    use prost::Message;
    let key = "trust-test-activity".to_string();
    let body =
        json!({"id": format!("{alice_id}/activities/x"), "type": "Announce", "actor": alice_id});
    app.store
        .insert_activity(stampede_backends::store::NewActivity {
            key: key.clone(),
            ap_id: format!("{alice_id}/activities/x"),
            actor_id: alice,
            kind: "Announce".into(),
            object_id: None,
            idempotency_key: None,
            delivered_body: body.to_string().into_bytes(),
            body,
        })
        .await
        .unwrap();
    let job = |inbox: &str| stampede_backends::queue::OutMessage {
        kind: stampede_proto::kinds::DELIVERY_JOB,
        payload: stampede_proto::queue::DeliveryJob {
            activity_key: key.clone(),
            inbox: inbox.to_string(),
            ..Default::default()
        }
        .encode_to_vec(),
        route: None,
    };
    for inbox in [carol.inbox.clone(), format!("{}/inbox", app.http_base)] {
        app.queue
            .publish(stampede_backends::queue::QueueName::Delivery, job(&inbox))
            .await
            .unwrap();
    }
    wait_for(
        "one delivery dropped as suspended, one skipped as ours",
        Duration::from_secs(30),
        || async {
            app.metric(
                "delivery",
                "stampede_deliveries_total",
                "outcome=\"suspended\"",
            )
            .await
                == 1
                && app
                    .metric(
                        "delivery",
                        "stampede_deliveries_total",
                        "outcome=\"skipped\"",
                    )
                    .await
                    == 1
        },
    )
    .await;
    assert!(
        sink.received(1).is_empty(),
        "the blocked server got {:?}",
        sink.received(1)
    );
    assert!(app.store.dead_letters(10, None).await.unwrap().is_empty());
    assert_eq!(
        inbox_count(&app, "accepted").await,
        1,
        "nothing posted to ourselves"
    );
    app.stop().await;
}

/// Issue 26 part 5: an activity forwarded by a third server (its request
/// signed by the forwarder's key) stands only on its author's Object
/// Integrity Proof (FEP-8b32, `eddsa-jcs-2022`): verified with the
/// author's `assertionMethod` Multikey, of the author's origin and
/// controlled by the author. Tampered, signed by another key, by a key of
/// another origin, of another cryptosuite or dated ahead of the clock:
/// refused (`bad_proof`), nothing on the stream. A bad proof refuses even
/// an activity its author signed the request for.
async fn a_forwarded_activity_stands_only_on_its_authors_proof(backend: Backend) {
    use stampede_core::integrity::sign;
    use stampede_core::keys::generate_ed25519;
    use stampede_core::multibase::ed25519_multikey_encode;
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![("STAMPEDE_KEY_REFETCH_SECS", "1".into())],
            ..AppOptions::default()
        },
    )
    .await;
    // 0: the author's server; 1: the forwarder's; 2: evil's.
    let sink = Sink::start(SinkOptions {
        servers: 3,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    app.create_actor("alice").await;
    let inbox = format!("{}/users/alice/inbox", app.http_base);
    let carol = sink.actor(0, "carol").unwrap().id;
    let carol_key = format!("{carol}#ed25519-key");
    let (pkcs8, public) = generate_ed25519().unwrap();
    let (evil_pkcs8, evil_public) = generate_ed25519().unwrap();
    let multikey = |id: &str, controller: &str, public: &[u8; 32]| {
        json!({"id": id, "type": "Multikey", "controller": controller,
               "publicKeyMultibase": ed25519_multikey_encode(public)})
    };
    // Carol's actor document: her key for requests and her Multikey.
    sink.serve_document(
        0,
        "/users/carol",
        json!({
            "@context": ["https://www.w3.org/ns/activitystreams", "https://w3id.org/security/v1",
                         "https://w3id.org/security/multikey/v1"],
            "id": carol, "type": "Person", "inbox": format!("{carol}/inbox"),
            "publicKey": {"id": format!("{carol}#main-key"), "owner": carol,
                          "publicKeyPem": sink.public_pem(0).unwrap()},
            "assertionMethod": [multikey(&carol_key, &carol, &public)],
        }),
    )
    .unwrap();
    // Erin, of carol's server, has a Multikey of her own.
    let erin = sink.actor(0, "erin").unwrap().id;
    let erin_key = format!("{erin}#ed25519-key");
    let (erin_pkcs8, erin_public) = generate_ed25519().unwrap();
    sink.serve_document(
        0,
        "/users/erin",
        json!({"id": erin, "type": "Person", "inbox": format!("{erin}/inbox"),
               "assertionMethod": [multikey(&erin_key, &erin, &erin_public)]}),
    )
    .unwrap();
    // Evil publishes a Multikey of its own origin that claims carol.
    let evil_base = format!("http://{}", sink.addr(2).unwrap());
    let evil_key = format!("{evil_base}/keys/carol");
    sink.serve_document(2, "/keys/carol", multikey(&evil_key, &carol, &evil_public))
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let create = |n: usize, content: &str| {
        json!({
            "@context": ["https://www.w3.org/ns/activitystreams", "https://w3id.org/security/data-integrity/v1"],
            "id": format!("{carol}/creates/{n}"), "type": "Create", "actor": carol,
            "to": ["https://www.w3.org/ns/activitystreams#Public"],
            "object": {"id": format!("{carol}/notes/{n}"), "type": "Note",
                       "attributedTo": carol, "content": content},
        })
    };
    let signed = |n: usize| sign(&create(n, "hello"), &carol_key, now, &pkcs8).unwrap();
    let forward = |a: serde_json::Value| {
        let sink = &sink;
        let inbox = inbox.clone();
        async move {
            let r = sink
                .send(1, "dave", &inbox, &a, SendOptions::default())
                .await
                .unwrap();
            assert_eq!(r.status, 202, "the edge queues it");
        }
    };
    // The attacks first, one at a time: a proof that fails with the
    // cached key has the key fetched again (rotation) at most once per
    // STAMPEDE_KEY_REFETCH_SECS (1 s here), else it is tried again later.
    let refused = |what: &'static str, n: u64| {
        let app = &app;
        async move {
            wait_for(what, Duration::from_secs(30), || async {
                inbox_count(app, "bad_proof").await == n
            })
            .await;
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
    };
    // No proof at all: as before, the forwarder cannot speak for carol.
    forward(create(1, "no proof")).await;
    wait_for("no proof refused", Duration::from_secs(30), || async {
        inbox_count(&app, "bad_signature").await == 1
    })
    .await;
    // Tampered after signing.
    let mut tampered = signed(2);
    tampered["object"]["content"] = json!("tampered");
    forward(tampered).await;
    refused("the tampered object", 1).await;
    // Signed by another key under carol's key id.
    forward(sign(&create(3, "hello"), &carol_key, now, &evil_pkcs8).unwrap()).await;
    refused("another key under carol's key id", 2).await;
    // Signed by evil's key, of evil's origin, that claims carol.
    forward(sign(&create(4, "hello"), &evil_key, now, &evil_pkcs8).unwrap()).await;
    refused("a key of another origin", 3).await;
    // Another cryptosuite.
    let mut suite = signed(5);
    suite["proof"]["cryptosuite"] = json!("eddsa-rdfc-2022");
    forward(suite).await;
    refused("another cryptosuite", 4).await;
    // Dated an hour ahead of our clock (the skew allowed is 5 minutes).
    forward(sign(&create(6, "hello"), &carol_key, now + 3600, &pkcs8).unwrap()).await;
    refused("a proof from the future", 5).await;
    // Created longer ago than the inboxes remember activity ids: a captured
    // forward is not replayed once its id is forgotten.
    forward(
        sign(
            &create(11, "hello"),
            &carol_key,
            now - 8 * 24 * 3600,
            &pkcs8,
        )
        .unwrap(),
    )
    .await;
    refused("a forward older than the replay window", 6).await;
    // Carol signs the request herself, but the proof is bad: refused too.
    let mut own = signed(7);
    own["object"]["content"] = json!("tampered under her own signature");
    let r = sink
        .send(0, "carol", &inbox, &own, SendOptions::default())
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    refused("a bad proof under the author's own signature", 7).await;
    assert_eq!(inbox_count(&app, "accepted").await, 0);
    assert_eq!(inbox_count(&app, "bad_signature").await, 1);
    assert_eq!(app.app_queue_depth().await, 0, "nothing on the stream");
    assert_eq!(
        sink.gets(2, "/keys/carol"),
        0,
        "a key of another origin than the actor's is not even fetched"
    );

    // The genuine forward: accepted, on the stream as carol's.
    let genuine = signed(8);
    forward(genuine.clone()).await;
    // And carol's own request with a good proof.
    let r = sink
        .send(0, "carol", &inbox, &signed(9), SendOptions::default())
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    // Carol's own request with a proof of a cryptosuite we do not read: her
    // signature stands, the proof adds nothing and takes nothing away.
    let mut unread = signed(12);
    unread["proof"]["cryptosuite"] = json!("eddsa-rdfc-2022");
    let r = sink
        .send(0, "carol", &inbox, &unread, SendOptions::default())
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    wait_for(
        "the genuine ones accepted",
        Duration::from_secs(30),
        || async { inbox_count(&app, "accepted").await == 3 },
    )
    .await;
    let (tx, rx) = tokio::sync::mpsc::channel::<SubscribeRequest>(8);
    tx.send(SubscribeRequest::default()).await.unwrap();
    let mut stream = InboundServiceClient::new(app.grpc.clone())
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let m = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.actor, carol);
        assert_eq!(m.verdict, "accepted");
        seen.push(m.activity_id.clone());
        tx.send(SubscribeRequest {
            ack: vec![m.delivery_id],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            format!("{carol}/creates/12"),
            format!("{carol}/creates/8"),
            format!("{carol}/creates/9")
        ],
        "the forward (signed by dave) and carol's own two"
    );
    // Verify says the same: the forward is carol's, the tampered one not.
    let verify = |doc: serde_json::Value| {
        let (sink, inbox, grpc) = (&sink, inbox.clone(), app.grpc.clone());
        async move {
            let body = doc.to_string().into_bytes();
            let headers = sink
                .signed_request_headers(1, "dave", "POST", &inbox, &body, &SendOptions::default())
                .await
                .unwrap();
            InboundServiceClient::new(grpc)
                .verify(verify_request(
                    "POST",
                    "/users/alice/inbox",
                    &headers,
                    &body,
                ))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let v = verify(signed(10)).await;
    assert_eq!(
        (v.verdict.as_str(), v.actor.as_str()),
        ("accepted", carol.as_str()),
        "{v:?}"
    );
    // Each attack refused for its own reason.
    let mut tampered = signed(11);
    tampered["to"] = json!([]);
    let mut suite = signed(12);
    suite["proof"]["cryptosuite"] = json!("eddsa-rdfc-2022");
    for (doc, verdict, reason) in [
        (
            create(13, "no proof"),
            "bad_signature",
            "no proof by the actor",
        ),
        (tampered, "bad_proof", "signature does not verify"),
        (
            sign(&create(14, "hello"), &carol_key, now, &evil_pkcs8).unwrap(),
            "bad_proof",
            "signature does not verify",
        ),
        (
            sign(&create(15, "hello"), &evil_key, now, &evil_pkcs8).unwrap(),
            "bad_proof",
            "another origin",
        ),
        (
            sign(&create(17, "hello"), &erin_key, now, &erin_pkcs8).unwrap(),
            "bad_proof",
            "not the actor",
        ),
        (suite, "bad_proof", "cryptosuite"),
        (
            sign(&create(16, "hello"), &carol_key, now + 3600, &pkcs8).unwrap(),
            "bad_proof",
            "ahead of our clock",
        ),
    ] {
        // Past the refetch window, so a failing proof is decided now.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let v = verify(doc).await;
        assert_eq!(v.verdict, verdict, "{v:?}");
        assert!(v.reason.contains(reason), "{v:?}");
        assert!(v.actor.is_empty(), "{v:?}");
    }
    drop(tx);
    drop(stream);
    app.stop().await;
}

crate::both_backends!(
    a_key_document_cannot_redirect_another_servers_actor,
    verify_speaks_only_for_owners_that_list_the_key,
    an_update_cannot_adopt_another_origins_key,
    ids_of_another_origin_are_refused_and_shadow_nothing,
    spoofed_posts_cost_their_victim_a_handful_of_fetches,
    the_edge_limits_clients_not_the_actors_they_name,
    a_request_signed_for_another_server_is_refused,
    blocked_domains_get_nothing_anywhere,
    a_forwarded_activity_stands_only_on_its_authors_proof,
);

/// Finding 8: 300 connections trickling a byte every 5 s (200 in their
/// request head, 100 in their body) are all closed within 30 s, while a
/// normal request keeps being answered in well under a second; an idle
/// keep-alive connection is closed after the idle timeout, a busy one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_closed_and_the_edge_keeps_answering() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _one_at_a_time = FLOODS.lock().await;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let app = spawn_app(
        Backend::Embedded,
        AppOptions {
            extra: vec![("STAMPEDE_HTTP_IDLE_TIMEOUT_SECS", "4".into())],
            ..AppOptions::default()
        },
    )
    .await;
    app.create_actor("alice").await;
    let addr = app.http_base.trim_start_matches("http://").to_string();
    let started = Instant::now();
    let mut slow = Vec::new();
    for i in 0..300 {
        let addr = addr.clone();
        slow.push(tokio::spawn(async move {
            let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let head = if i < 200 {
                format!("POST /inbox HTTP/1.1\r\nhost: {addr}\r\n")
            } else {
                format!("POST /inbox HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/activity+json\r\nsignature: keyId=\"x\"\r\ncontent-length: 1000\r\n\r\n{{")
            };
            conn.write_all(head.as_bytes()).await.unwrap();
            let (mut rd, mut wr) = conn.into_split();
            let closed = tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => return Instant::now(),
                        Ok(_) => {}
                    }
                }
            });
            let trickle = async {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    if wr.write_all(b"x").await.is_err() {
                        break;
                    }
                }
            };
            tokio::select! {
                at = closed => at.unwrap(),
                _ = trickle => Instant::now(),
                _ = tokio::time::sleep(Duration::from_secs(45)) => Instant::now() + Duration::from_secs(3600),
            }
        }));
    }
    // Meanwhile, a normal client keeps asking: from an address of its own
    // (the slow ones hold all the connections one client may have), on a
    // new connection each time (a kept-alive one the edge closes as idle
    // while a loaded machine holds the client back would fail the next
    // request on the client's side, whatever the edge does).
    let client = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut took = Vec::new();
    while started.elapsed() < Duration::from_secs(32) {
        let t = Instant::now();
        let r = client
            .get(format!("{}/.well-known/nodeinfo", app.http_base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        took.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    took.sort();
    let (p90, worst) = (took[took.len() * 9 / 10], took[took.len() - 1]);
    eprintln!("normal requests among the slow ones: p90 {p90:?}, worst {worst:?}");
    // The machine runs other tests meanwhile: a scheduling hiccup is not
    // the edge holding requests up, a slow tenth would be.
    assert!(p90 < Duration::from_millis(500), "p90 {p90:?}");
    assert!(worst < Duration::from_secs(3), "worst {worst:?}");
    let mut last = Duration::ZERO;
    for h in slow {
        let closed_at = h.await.unwrap();
        last = last.max(closed_at.saturating_duration_since(started));
    }
    assert!(
        last <= Duration::from_secs(30),
        "the last slow connection closed after {last:?}"
    );

    // Keep-alive: an idle connection goes after the idle timeout (4 s)...
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let get = format!("GET /.well-known/nodeinfo HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    idle.write_all(get.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(idle.read(&mut buf).await.unwrap() > 0);
    let t = Instant::now();
    let eof = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(eof.is_ok(), "the idle connection stayed open");
    assert!(
        t.elapsed() >= Duration::from_secs(3),
        "closed too soon: {:?}",
        t.elapsed()
    );
    // ...a connection that keeps asking stays.
    let mut busy = tokio::net::TcpStream::connect(&addr).await.unwrap();
    for _ in 0..4 {
        busy.write_all(get.as_bytes()).await.unwrap();
        let n = busy.read(&mut buf).await.unwrap();
        assert!(
            n > 0 && buf.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    app.stop().await;
}

/// Finding 10: a proxy in the environment (`HTTPS_PROXY`, `ALL_PROXY`, …)
/// is not used: it would resolve names past the SSRF guard. The real
/// binary, with every proxy variable pointing at a listener here, fetches
/// keys and delivers directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_in_the_environment_are_not_used() {
    use crate::helpers::free_port;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let through_proxy = Arc::new(AtomicUsize::new(0));
    let counted = through_proxy.clone();
    tokio::spawn(async move {
        while let Ok((_conn, _)) = proxy.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    let dir =
        std::env::temp_dir().join(format!("stampede-proxy-{}", uuid::Uuid::new_v4().simple()));
    let (http, grpc, metrics) = (free_port(), free_port(), free_port());
    let base = format!("http://127.0.0.1:{http}");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_stampede-e2e"));
    cmd.arg("up")
        .env_clear()
        .env("STAMPEDE_DATA_DIR", &dir)
        .env("STAMPEDE_PUBLIC_URL", &base)
        .env("STAMPEDE_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("STAMPEDE_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("STAMPEDE_METRICS_ADDR", format!("127.0.0.1:{metrics}"))
        .env("STAMPEDE_ALLOW_PRIVATE_NETWORKS", "true")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env(var, &proxy_url);
    }
    let mut child = cmd.spawn().unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let ready = format!("http://127.0.0.1:{metrics}/readyz");
    wait_for("stampede up", Duration::from_secs(30), || async {
        matches!(client.get(&ready).send().await, Ok(r) if r.status() == 200)
    })
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    stampede_proto::api::actor_service_client::ActorServiceClient::new(channel)
        .create_actor(stampede_proto::api::CreateActorRequest {
            name: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let sink = Sink::start(SinkOptions::default()).await.unwrap();
    let alice_id = format!("{base}/users/alice");
    assert_eq!(sink.follow(0, "bob", &alice_id).await.unwrap().status, 202);
    wait_for("the Accept, directly", Duration::from_secs(30), || async {
        sink.received_of_type("Accept") == 1
    })
    .await;
    assert_eq!(
        sink.gets(0, "/users/bob"),
        1,
        "bob's key was fetched directly"
    );
    assert_eq!(
        through_proxy.load(Ordering::SeqCst),
        0,
        "a request went to the proxy"
    );
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
}
