//! What remote servers fetch from us: authorized fetch
//! (`STAMPEDE_AUTHORIZED_FETCH`), caching headers, paged collections, and
//! FEP-8fcf followers synchronization (the `Collection-Synchronization`
//! header on followers-only deliveries and the partial collections behind
//! it).
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use stampede_core::followers_sync::Digest;
use stampede_proto::api::SetDomainPolicyRequest;
use stampede_sink::{SendOptions, Sink, SinkActor, SinkOptions};

use crate::helpers::{spawn_app, wait_for, AppOptions, Backend, TestApp};

crate::both_backends!(
    authorized_fetch_wants_a_signature_and_refuses_suspended_domains,
    documents_are_public_cached_and_paged_without_authorized_fetch,
    followers_synchronization_lists_only_the_signers_authority,
    followers_only_posts_carry_a_signed_collection_synchronization,
);

/// Sink servers on 127.0.0.{first}, {first + 1}, … (a host each).
async fn sink_at(servers: usize, first: u8) -> Sink {
    Sink::start(SinkOptions {
        servers,
        bind: Arc::new(move |i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, first + i as u8))),
        ..SinkOptions::default()
    })
    .await
    .unwrap()
}

struct Got {
    status: u16,
    cache_control: String,
    vary: String,
    body: Value,
    text: String,
}

/// GETs `url`, signed by actor `actor` of sink server `from` when given.
async fn get(url: &str, signer: Option<(&Sink, usize, &str)>) -> Got {
    get_with(url, signer, SendOptions::default()).await
}

async fn get_with(url: &str, signer: Option<(&Sink, usize, &str)>, opts: SendOptions) -> Got {
    let mut req = reqwest::Client::new()
        .get(url)
        .header("accept", "application/activity+json");
    if let Some((sink, from, actor)) = signer {
        for (k, v) in sink
            .signed_request_headers(from, actor, "GET", url, b"", &opts)
            .await
            .unwrap()
        {
            req = req.header(k, v);
        }
    }
    let r = req.send().await.unwrap();
    let h = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (status, cache_control, vary) = (r.status().as_u16(), h("cache-control"), h("vary"));
    let text = r.text().await.unwrap();
    Got {
        status,
        cache_control,
        vary,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

fn with_authorized_fetch() -> AppOptions {
    AppOptions {
        extra: vec![("STAMPEDE_AUTHORIZED_FETCH", "true".into())],
        ..AppOptions::default()
    }
}

async fn suspend(app: &TestApp, domain: &str) {
    app.admin()
        .set_domain_policy(SetDomainPolicyRequest {
            domain: domain.into(),
            policy: "suspend".into(),
            reason: "test".into(),
        })
        .await
        .unwrap();
}

async fn authorized_fetch_wants_a_signature_and_refuses_suspended_domains(backend: Backend) {
    let app = spawn_app(backend, with_authorized_fetch()).await;
    let sink = sink_at(2, 170).await;
    app.create_actor("alice").await;
    let base = app.http_base.clone();
    let alice = format!("{base}/users/alice");
    let documents = [
        alice.clone(),
        format!("{alice}/followers"),
        format!("{alice}/followers?page=true"),
        format!("{alice}/following"),
        format!("{alice}/outbox"),
        format!("{alice}/outbox?page=true"),
        format!("{alice}/followers_synchronization"),
    ];
    for url in &documents {
        let g = get(url, None).await;
        assert_eq!(g.status, 401, "{url}: {}", g.text);
        assert!(
            g.text.contains("signed request is required"),
            "{url}: {}",
            g.text
        );
    }
    let host = base.trim_start_matches("http://");
    for url in [
        format!("{base}/.well-known/webfinger?resource=acct:alice@{host}"),
        format!("{base}/.well-known/nodeinfo"),
        format!("{base}/nodeinfo/2.1"),
    ] {
        assert_eq!(get(&url, None).await.status, 200, "{url}");
    }
    // Signed by a key we can fetch and verify: served, for the signer alone.
    let bob = (&sink, 0, "bob");
    for url in &documents {
        let g = get(url, Some(bob)).await;
        assert_eq!(g.status, 200, "{url}: {}", g.text);
        assert!(
            g.cache_control.starts_with("private"),
            "{url}: {}",
            g.cache_control
        );
        assert!(g.vary.contains("Signature"), "{url}: {}", g.vary);
    }
    assert_eq!(get(&alice, Some(bob)).await.body["id"], alice.as_str());
    // The instance actor (made when it first signed a GET: the key fetches
    // above) stays public: servers in authorized-fetch mode verify our
    // signed GETs with its key.
    let instance = get(&format!("{base}/users/_instance"), None).await;
    assert_eq!(instance.status, 200, "{}", instance.text);
    assert_eq!(instance.cache_control, "public, max-age=180");
    assert!(instance.body["publicKey"]["publicKeyPem"].is_string());
    // Signed with a key no document publishes, or for another server: 401.
    let forged = SendOptions {
        wrong_key: true,
        ..SendOptions::default()
    };
    let g = get_with(&alice, Some(bob), forged).await;
    assert_eq!(g.status, 401, "{}", g.text);
    let elsewhere = SendOptions {
        host: Some("other.example".into()),
        ..SendOptions::default()
    };
    let g = get_with(&alice, Some(bob), elsewhere).await;
    assert_eq!(g.status, 401, "{}", g.text);
    // A suspended domain: 403, signed or not verified.
    suspend(&app, "127.0.0.171").await;
    let mallory = (&sink, 1, "mallory");
    wait_for(
        "the suspension at the edge",
        Duration::from_secs(10),
        || async { get(&alice, Some(mallory)).await.status == 403 },
    )
    .await;
    for url in &documents {
        assert_eq!(get(url, Some(mallory)).await.status, 403, "{url}");
    }
    assert_eq!(get(&alice, Some(bob)).await.status, 200);
    app.stop().await;
}

/// A follower of the actor at `i` on server `base` (`http://host:port`).
fn remote(base: &str, name: &str) -> SinkActor {
    SinkActor {
        id: format!("{base}/users/{name}"),
        inbox: format!("{base}/users/{name}/inbox"),
        shared_inbox: Some(format!("{base}/inbox")),
        host: base.trim_start_matches("http://").to_string(),
    }
}

async fn documents_are_public_cached_and_paged_without_authorized_fetch(backend: Backend) {
    let app = spawn_app(backend, AppOptions::default()).await;
    let alice_id = app.create_actor("alice").await;
    let base = app.http_base.clone();
    let alice = format!("{base}/users/alice");
    let g = get(&alice, None).await;
    assert_eq!(g.status, 200, "{}", g.text);
    assert_eq!(g.cache_control, "public, max-age=180");
    assert!(!g.vary.contains("Signature"), "{}", g.vary);
    // 95 followers on three servers: pages of at most 40, walked by `next`.
    let mut want = HashSet::new();
    let mut followers = Vec::new();
    for i in 0..95 {
        let f = remote(&format!("http://h{}.example", i % 3), &format!("u{i:02}"));
        want.insert(f.id.clone());
        followers.push(f);
    }
    app.seed_followers(alice_id, &followers).await;
    let collection = get(&format!("{alice}/followers"), None).await;
    assert_eq!(collection.status, 200);
    assert_eq!(collection.cache_control, "public, max-age=60");
    assert_eq!(collection.body["type"], "OrderedCollection");
    assert_eq!(collection.body["totalItems"], 95);
    assert!(collection.body.get("orderedItems").is_none());
    let mut next = collection.body["first"].as_str().unwrap().to_string();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let p = get(&next, None).await;
        assert_eq!(p.status, 200, "{next}: {}", p.text);
        assert_eq!(p.body["type"], "OrderedCollectionPage");
        assert_eq!(p.body["partOf"], format!("{alice}/followers"));
        assert_eq!(p.body["id"], next.as_str());
        let items = p.body["orderedItems"].as_array().unwrap();
        assert!(items.len() <= 40, "{}", items.len());
        seen.extend(items.iter().map(|i| i.as_str().unwrap().to_string()));
        pages += 1;
        match p.body["next"].as_str() {
            Some(n) => next = n.to_string(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 95, "no follower twice");
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), want);
    // The order is stable: the first page again is the same.
    let again = get(collection.body["first"].as_str().unwrap(), None).await;
    let first: Vec<&str> = again.body["orderedItems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        first,
        seen[..40].iter().map(String::as_str).collect::<Vec<_>>()
    );
    // A hostile cursor is refused, not run.
    let long = "x".repeat(3000);
    let g = get(&format!("{alice}/followers?page=true&after={long}"), None).await;
    assert_eq!(g.status, 400, "{}", g.text);
    // Following and outbox: paged too (empty first pages).
    for c in ["following", "outbox"] {
        let g = get(&format!("{alice}/{c}"), None).await;
        assert_eq!(g.status, 200);
        assert_eq!(g.body["type"], "OrderedCollection");
        let p = get(g.body["first"].as_str().unwrap(), None).await;
        assert_eq!(p.body["type"], "OrderedCollectionPage", "{c}");
        assert_eq!(p.body["orderedItems"], json!([]), "{c}");
        assert!(p.body.get("next").is_none(), "{c}");
    }
    assert_eq!(
        get(&format!("{base}/users/nobody/followers"), None)
            .await
            .status,
        404
    );
    app.stop().await;
}

async fn followers_synchronization_lists_only_the_signers_authority(backend: Backend) {
    // Authorized fetch off: the partial collections want a signature anyway.
    let app = spawn_app(backend, AppOptions::default()).await;
    let sink = sink_at(2, 173).await;
    let alice_id = app.create_actor("alice").await;
    let alice = format!("{}/users/alice", app.http_base);
    let on = |i: usize, n: &str| sink.actor(i, n).unwrap();
    let followers = vec![
        on(0, "a1"),
        on(0, "a2"),
        on(0, "a3"),
        on(1, "b1"),
        on(1, "b2"),
        remote("http://elsewhere.example", "e1"),
    ];
    app.seed_followers(alice_id, &followers).await;
    let url = format!("{alice}/followers_synchronization");
    let g = get(&url, None).await;
    assert_eq!(g.status, 401, "{}", g.text);
    for (server, want) in [(0, vec!["a1", "a2", "a3"]), (1, vec!["b1", "b2"])] {
        let g = get(&url, Some((&sink, server, "instance"))).await;
        assert_eq!(g.status, 200, "{}", g.text);
        assert_eq!(g.body["type"], "OrderedCollection");
        assert_eq!(g.body["id"], url.as_str());
        assert!(
            g.cache_control.starts_with("private"),
            "{}",
            g.cache_control
        );
        let mut items: Vec<String> = g.body["orderedItems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        items.sort();
        let want: Vec<String> = want.iter().map(|n| on(server, n).id).collect();
        assert_eq!(items, want, "server {server}");
    }
    assert_eq!(
        get(
            &format!("{}/users/nobody/followers_synchronization", app.http_base),
            Some((&sink, 0, "instance"))
        )
        .await
        .status,
        404
    );
    app.stop().await;
}

/// The `Collection-Synchronization` header of each POST server `i`
/// received of activity `id`, and whether the signature covered it.
fn sync_headers(sink: &Sink, i: usize, id: &str) -> Vec<(Option<String>, bool)> {
    sink.received(i)
        .into_iter()
        .filter(|r| r.activity_id.as_deref() == Some(id))
        .map(|r| {
            assert_eq!(r.verified, Ok(()), "{:?}", r.verified);
            let header = |n: &str| {
                r.headers
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
            };
            let signed =
                header("signature").is_some_and(|s| s.contains("collection-synchronization"));
            (header("collection-synchronization"), signed)
        })
        .collect()
}

fn followers_only(actor: &str, text: &str) -> Value {
    json!({
        "@context": "https://www.w3.org/ns/activitystreams",
        "type": "Create",
        "actor": actor,
        "to": [format!("{actor}/followers")],
        "object": {"type": "Note", "attributedTo": actor, "content": text,
                   "to": [format!("{actor}/followers")]},
    })
}

async fn followers_only_posts_carry_a_signed_collection_synchronization(backend: Backend) {
    // Below 6 followers, followers-only posts synchronize.
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![("STAMPEDE_FOLLOWERS_SYNC_MAX", "6".into())],
            ..AppOptions::default()
        },
    )
    .await;
    let sink = sink_at(2, 176).await;
    let alice_id = app.create_actor("alice").await;
    let alice = format!("{}/users/alice", app.http_base);
    let on = |i: usize, n: &str| sink.actor(i, n).unwrap();
    let mut followers = vec![
        on(0, "a1"),
        on(0, "a2"),
        on(0, "a3"),
        on(1, "b1"),
        on(1, "b2"),
    ];
    app.seed_followers(alice_id, &followers).await;
    let publish = |json: Value| {
        let app = &app;
        async move { app.publish("alice", &json, "").await.unwrap().activity_id }
    };
    let arrived = |id: String| {
        let sink = &sink;
        async move {
            wait_for("both servers' POSTs", Duration::from_secs(30), || async {
                (0..2).all(|i| !sync_headers(sink, i, &id).is_empty())
            })
            .await;
        }
    };
    let expect = |followers: &[SinkActor], i: usize| {
        let prefix = format!("http://{}/", sink.addr(i).unwrap());
        let d = Digest::of_ids(
            followers
                .iter()
                .filter(|f| f.id.starts_with(&prefix))
                .map(|f| f.id.as_str()),
        );
        format!(
            "collectionId=\"{alice}/followers\", url=\"{alice}/followers_synchronization\", digest=\"{}\"",
            d.hex()
        )
    };

    let first = publish(followers_only(&alice, "for my 5 followers")).await;
    arrived(first.clone()).await;
    for i in 0..2 {
        let got = sync_headers(&sink, i, &first);
        assert_eq!(got.len(), 1, "server {i}: one POST to its shared inbox");
        assert_eq!(
            got[0].0.as_deref(),
            Some(expect(&followers, i).as_str()),
            "server {i}"
        );
        assert!(got[0].1, "server {i}: the signature covers the header");
    }
    // Public: no header.
    let public = publish(stampede_core::activity::public_note(&alice, "hello")).await;
    arrived(public.clone()).await;
    for i in 0..2 {
        assert_eq!(
            sync_headers(&sink, i, &public),
            [(None, false)],
            "server {i}"
        );
    }
    // A sixth follower (a real Follow): not below 6 any more, no header.
    sink.follow(0, "a4", &alice).await.unwrap();
    followers.push(on(0, "a4"));
    wait_for("the sixth follower", Duration::from_secs(20), || async {
        app.store.follower_count(alice_id).await.unwrap() == 6
    })
    .await;
    let above = publish(followers_only(&alice, "for my 6 followers")).await;
    arrived(above.clone()).await;
    for i in 0..2 {
        assert_eq!(
            sync_headers(&sink, i, &above),
            [(None, false)],
            "server {i}"
        );
    }
    // Nor is the partial collection offered at the limit: what one signed
    // GET can make stampede read stays below it.
    let at_limit = get(
        &format!("{alice}/followers_synchronization"),
        Some((&sink, 0, "instance")),
    )
    .await;
    assert_eq!(at_limit.status, 404, "{}", at_limit.text);
    // One leaves: the digests follow every change.
    assert!(app
        .store
        .remove_follower(alice_id, &on(1, "b1").id)
        .await
        .unwrap());
    followers.retain(|f| f.id != on(1, "b1").id);
    let after = publish(followers_only(&alice, "for my 5 followers again")).await;
    arrived(after.clone()).await;
    for i in 0..2 {
        let got = sync_headers(&sink, i, &after);
        assert_eq!(
            got[0].0.as_deref(),
            Some(expect(&followers, i).as_str()),
            "server {i}"
        );
        assert!(got[0].1);
    }
    // What the partial collection lists matches the digest sent.
    let g = get(
        &format!("{alice}/followers_synchronization"),
        Some((&sink, 0, "instance")),
    )
    .await;
    let listed = Digest::of_ids(
        g.body["orderedItems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap()),
    );
    assert!(expect(&followers, 0).ends_with(&format!("digest=\"{}\"", listed.hex())));
    app.stop().await;
}
