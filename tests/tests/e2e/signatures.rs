//! Outbound signature styles (README, "Outbound contract"): with
//! `STAMPEDE_SIGNATURE_STYLE=auto` a server that takes one style costs two
//! requests at first contact and one ever after; a fixed style never
//! switches; an `Accept-Signature` is honoured. Every signed request the
//! fake servers received (deliveries, Accepts, key fetches) is then checked
//! by implementations stampede did not write: Python's `httpsig` and
//! `http-message-signatures` (`services/core/tests/interop/check_recorded.py`).
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use stampede_core::activity::public_note;
use stampede_sink::{Recorded, Sink, SinkOptions, Styles};

use crate::helpers::{spawn_app, wait_for, AppOptions, Backend, TestApp};

/// The Python with the independent libraries, or `None` (with a loud
/// message) when run by hand without `STAMPEDE_TEST_PYTHON` and without
/// them: `scripts/test` sets it, and a set one that lacks them fails.
fn independent_python() -> Option<String> {
    let given = std::env::var("STAMPEDE_TEST_PYTHON").ok();
    let py = given.clone().unwrap_or_else(|| "python3".into());
    let ok = std::process::Command::new(&py)
        .args(["-c", "import httpsig, http_message_signatures, requests"])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(py);
    }
    assert!(
        given.is_none(),
        "STAMPEDE_TEST_PYTHON={py} lacks httpsig or http-message-signatures: run scripts/test, which installs services/core/tests/interop/requirements.txt"
    );
    eprintln!(
        "\n*** SKIPPING the independent check of the recorded signatures: STAMPEDE_TEST_PYTHON is unset \
         and {py} lacks httpsig / http-message-signatures (scripts/test sets it up) ***\n"
    );
    None
}

/// Runs the independent checker over a sink's record: one result per
/// signed request, or `None` when there is no Python to run it with.
fn check_independently(record: &Path) -> Option<Vec<Value>> {
    let py = independent_python()?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../services/core/tests/interop/check_recorded.py");
    let out = std::process::Command::new(py)
        .arg(script)
        .arg(record)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the checker failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    for r in &results {
        assert_eq!(r["ok"], true, "independent check failed: {r}");
    }
    println!(
        "{}: {} signed requests verified by httpsig / http-message-signatures",
        record.display(),
        results.len()
    );
    Some(results)
}

/// What a sink recorded, in order.
fn recorded(path: &Path) -> Vec<Recorded> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Which style signed a recorded request.
fn style(r: &Recorded) -> &'static str {
    if r.headers.iter().any(|(k, _)| k == "signature-input") {
        "rfc9421"
    } else if r.headers.iter().any(|(k, _)| k == "signature") {
        "cavage"
    } else {
        "unsigned"
    }
}

/// (method, path, status, style) of each request server `server` recorded.
fn seen(rec: &[Recorded], server: usize) -> Vec<(String, String, u16, &'static str)> {
    rec.iter()
        .filter(|r| r.server == server)
        .map(|r| (r.method.clone(), r.path.clone(), r.status, style(r)))
        .collect()
}

fn record_file(app: &TestApp, name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("stampede-sigs-{}-{name}.jsonl", app.namespace));
    let _ = std::fs::remove_file(&p);
    p
}

async fn sink(styles: Styles, record: &Path, servers: usize, accept: Option<&str>) -> Sink {
    Sink::start(SinkOptions {
        servers,
        signature_style: styles,
        accept_signature: accept.map(str::to_string),
        record: Some(record.to_path_buf()),
        ..SinkOptions::default()
    })
    .await
    .unwrap()
}

/// A remote follows alice; the Accept arrives.
async fn follow_and_wait_for_accept(sink: &Sink, server: usize, alice_id: &str) {
    let r = sink.follow(server, "bob", alice_id).await.unwrap();
    assert_eq!(r.status, 202);
    wait_for("the Accept", Duration::from_secs(30), || async {
        sink.received(server)
            .iter()
            .any(|x| x.body["type"] == "Accept" && x.status == 202)
    })
    .await;
}

async fn auto_knocks_twice_at_first_contact_then_once(backend: Backend) {
    let app = spawn_app(backend, AppOptions::default()).await;
    let alice = app.create_actor("alice").await;
    let alice_id = format!("{}/users/alice", app.http_base);
    // Server 0 of each sink is met first by a key fetch (bob's Follow),
    // server 1 by a delivery.
    let (r_file, c_file) = (record_file(&app, "rfc9421"), record_file(&app, "cavage"));
    let only_9421 = sink(Styles::Rfc9421Only, &r_file, 2, None).await;
    let only_cavage = sink(Styles::CavageOnly, &c_file, 2, None).await;
    app.seed_followers(
        alice,
        &[
            only_9421.actor(1, "carol").unwrap(),
            only_cavage.actor(1, "carol").unwrap(),
        ],
    )
    .await;
    follow_and_wait_for_accept(&only_9421, 0, &alice_id).await;
    follow_and_wait_for_accept(&only_cavage, 0, &alice_id).await;
    for n in 1..=3 {
        let note = app
            .publish("alice", &public_note(&alice_id, &format!("post {n}")), "")
            .await
            .unwrap();
        wait_for("the post everywhere", Duration::from_secs(30), || async {
            [&only_9421, &only_cavage].iter().all(|s| {
                (0..2).all(|i| {
                    s.received(i).iter().any(|x| {
                        x.activity_id.as_deref() == Some(note.activity_id.as_str())
                            && x.status == 202
                    })
                })
            })
        })
        .await;
    }
    let (r, c) = (recorded(&r_file), recorded(&c_file));
    let post = |path: &str, status: u16, style: &'static str| {
        ("POST".to_string(), path.to_string(), status, style)
    };
    // The key fetch: cavage refused, RFC 9421 at once, remembered for the
    // Accept and the posts (the same host).
    let r0 = seen(&r, 0);
    let gets: Vec<_> = r0.iter().filter(|x| x.0 == "GET").collect();
    assert_eq!(
        (gets[0].2, gets[0].3, gets[1].2, gets[1].3),
        (401, "cavage", 200, "rfc9421"),
        "{r0:?}"
    );
    assert!(
        gets[2..].iter().all(|g| g.2 == 200 && g.3 == "rfc9421"),
        "{r0:?}"
    );
    let posts: Vec<_> = r0.iter().filter(|x| x.0 == "POST").collect();
    assert_eq!(
        posts.len(),
        4,
        "the Accept and three posts, one POST each: {r0:?}"
    );
    assert!(
        posts.iter().all(|x| x.2 == 202 && x.3 == "rfc9421"),
        "after the GET that learnt it, every POST costs one: {r0:?}"
    );
    // First contact by a delivery: two POSTs, then one each.
    assert_eq!(
        seen(&r, 1),
        [
            post("/inbox", 401, "cavage"),
            post("/inbox", 202, "rfc9421"),
            post("/inbox", 202, "rfc9421"),
            post("/inbox", 202, "rfc9421"),
        ]
    );
    // A cavage-only server never sees RFC 9421 (cavage is the default).
    for i in 0..2 {
        assert!(
            seen(&c, i).iter().all(|x| x.3 == "cavage" && x.2 < 300),
            "{:?}",
            seen(&c, i)
        );
    }
    assert_eq!(seen(&c, 1).len(), 3, "one POST per post");
    // stampede's own verifier, in the sink, took every request it let in.
    for s in [&only_9421, &only_cavage] {
        for i in 0..2 {
            for x in s.received(i).iter().filter(|x| x.status == 202) {
                assert_eq!(x.verified, Ok(()));
            }
        }
    }
    // And so do the independent implementations, every signed request:
    // deliveries and the Accept in both styles, key fetches in both.
    if let Some(results) = check_independently(&r_file) {
        let styles: Vec<(&str, &str)> = results
            .iter()
            .map(|x| (x["method"].as_str().unwrap(), x["style"].as_str().unwrap()))
            .collect();
        for want in [
            ("GET", "cavage"),
            ("GET", "rfc9421"),
            ("POST", "cavage"),
            ("POST", "rfc9421"),
        ] {
            assert!(styles.contains(&want), "{want:?} not checked: {styles:?}");
        }
        assert_eq!(
            results.len(),
            r.iter().filter(|x| style(x) != "unsigned").count()
        );
        for x in results.iter().filter(|x| x["style"] == "rfc9421") {
            let covered = x["covered"].as_array().unwrap();
            for c in ["@method", "@target-uri"] {
                assert!(covered.contains(&json!(c)), "{x}");
            }
            if x["method"] == "POST" {
                assert!(covered.contains(&json!("content-digest")), "{x}");
            }
        }
    }
    if let Some(results) = check_independently(&c_file) {
        assert!(results.iter().any(|x| x["method"] == "GET"));
        assert_eq!(results.iter().filter(|x| x["method"] == "POST").count(), 7);
        assert_eq!(
            results.len(),
            c.iter().filter(|x| style(x) != "unsigned").count()
        );
    }
    let _ = (std::fs::remove_file(&r_file), std::fs::remove_file(&c_file));
    app.stop().await;
}

async fn a_fixed_style_never_switches(backend: Backend) {
    for (fixed, sink_styles) in [
        ("cavage", Styles::Rfc9421Only),
        ("rfc9421", Styles::CavageOnly),
    ] {
        let app = spawn_app(
            backend,
            AppOptions {
                extra: vec![("STAMPEDE_SIGNATURE_STYLE", fixed.to_string())],
                ..AppOptions::default()
            },
        )
        .await;
        let alice = app.create_actor("alice").await;
        let alice_id = format!("{}/users/alice", app.http_base);
        let file = record_file(&app, fixed);
        let other = sink(sink_styles, &file, 1, None).await;
        let ok = sink(Styles::Both, &file, 1, None).await;
        app.seed_followers(
            alice,
            &[other.actor(0, "f").unwrap(), ok.actor(0, "f").unwrap()],
        )
        .await;
        for n in 1..=2 {
            app.publish("alice", &public_note(&alice_id, &format!("post {n}")), "")
                .await
                .unwrap();
            wait_for("the refusals", Duration::from_secs(30), || async {
                other.total_received() >= n && ok.total_received() >= n
            })
            .await;
        }
        // A 401 is a refusal like any: dead-lettered, no second knock.
        wait_for("two dead letters", Duration::from_secs(30), || async {
            app.store.dead_letters(10, None).await.unwrap().len() == 2
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            other.total_received(),
            2,
            "one POST per post, never the other style"
        );
        assert_eq!(ok.total_received(), 2);
        let rec = recorded(&file);
        assert_eq!(rec.len(), 4);
        assert!(rec.iter().all(|x| style(x) == fixed), "{fixed}");
        if let Some(results) = check_independently(&file) {
            assert_eq!(results.len(), 4);
            assert!(results.iter().all(|x| x["style"] == fixed));
        }
        let _ = std::fs::remove_file(&file);
        app.stop().await;
    }
}

async fn an_accept_signature_is_honoured_and_remembered(backend: Backend) {
    let app = spawn_app(backend, AppOptions::default()).await;
    let alice = app.create_actor("alice").await;
    let alice_id = format!("{}/users/alice", app.http_base);
    let file = record_file(&app, "accept");
    let asking = sink(
        Styles::Rfc9421Only,
        &file,
        1,
        Some(r#"sig7=("@method" "@authority" "@path" "date" "content-digest" "x-unknown");created;keyid;nonce;tag="stampede-test""#),
    )
    .await;
    app.seed_followers(alice, &[asking.actor(0, "f").unwrap()])
        .await;
    for n in 1..=2 {
        app.publish("alice", &public_note(&alice_id, &format!("post {n}")), "")
            .await
            .unwrap();
        wait_for("the post", Duration::from_secs(30), || async {
            asking
                .received(0)
                .iter()
                .filter(|x| x.status == 202)
                .count()
                == n
        })
        .await;
    }
    let rec = recorded(&file);
    let statuses: Vec<(u16, &str)> = rec.iter().map(|x| (x.status, style(x))).collect();
    assert_eq!(
        statuses,
        [(401, "cavage"), (202, "rfc9421"), (202, "rfc9421")]
    );
    for x in &rec[1..] {
        let input = &x
            .headers
            .iter()
            .find(|(k, _)| k == "signature-input")
            .unwrap()
            .1;
        assert!(
            input.starts_with(
                r#"sig7=("@method" "@authority" "@path" "date" "content-digest");created="#
            ) && input.contains(";nonce=")
                && input.contains(r#";tag="stampede-test""#),
            "{input}"
        );
    }
    if let Some(results) = check_independently(&file) {
        assert_eq!(results.len(), 3);
        for x in &results[1..] {
            assert_eq!(x["label"], "sig7");
            assert_eq!(x["tag"], "stampede-test");
            assert!(
                x["covered"].as_array().unwrap().contains(&json!("date")),
                "{x}"
            );
        }
    }
    let _ = std::fs::remove_file(&file);
    app.stop().await;
}

crate::both_backends!(
    auto_knocks_twice_at_first_contact_then_once,
    a_fixed_style_never_switches,
    an_accept_signature_is_honoured_and_remembered,
);
