//! The admin console in a real browser (headless Chromium over WebDriver):
//! logging in with the token, the overview's live charts, pausing a host
//! from the Hosts page, replaying a dead letter from the page, the session
//! and CSRF checks, and a walk over every page without a console error.
//! With `STAMPEDE_CONSOLE_SCREENSHOTS=1` the walk saves each page as
//! `docs/console-{page}.png` (the README shows them).
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stampede_core::activity::public_note;
use stampede_proto::api::{
    actor_service_client::ActorServiceClient, admin_service_client::AdminServiceClient,
    publish_service_client::PublishServiceClient, CreateActorRequest, ListDeadLettersRequest,
    ListDomainPoliciesRequest, PublishRequest, StatusRequest,
};
use stampede_sink::{Behavior, Sink, SinkOptions};

use crate::helpers::{spawn_app, wait_for, AppOptions, Backend, TestApp};
use crate::webdriver::Browser;

const TOKEN: &str = "console-test-token-0123456789";

/// A gRPC request carrying the API token.
fn authed<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

async fn spawn(backend: Backend) -> (TestApp, String) {
    let app = spawn_app(
        backend,
        AppOptions {
            extra: vec![
                ("STAMPEDE_API_TOKEN", TOKEN.into()),
                ("STAMPEDE_RETRY_SCHEDULE_SECS", "1,1,1".into()),
            ],
            ..AppOptions::default()
        },
    )
    .await;
    let base = app.console.clone().expect("the console runs with ingest");
    (app, base)
}

async fn create_actor(app: &TestApp, name: &str) -> i64 {
    ActorServiceClient::new(app.grpc.clone())
        .create_actor(authed(CreateActorRequest {
            name: name.into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    app.store.actor_by_name(name).await.unwrap().unwrap().id
}

async fn publish(app: &TestApp, text: &str) -> String {
    let alice = format!("{}/users/alice", app.http_base);
    PublishServiceClient::new(app.grpc.clone())
        .publish(authed(PublishRequest {
            actor: "alice".into(),
            activity_json: public_note(&alice, text).to_string(),
            idempotency_key: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .activity_id
}

/// `Create`s server `i` answered 2xx, by their note's text.
fn delivered(sink: &Sink, i: usize, text: &str) -> usize {
    sink.received(i)
        .iter()
        .filter(|r| {
            r.body["type"] == "Create"
                && r.body["object"]["content"]
                    .as_str()
                    .is_some_and(|c| c.contains(text))
                && (200..300).contains(&r.status)
        })
        .count()
}

fn received(sink: &Sink, i: usize, text: &str) -> usize {
    sink.received(i)
        .iter()
        .filter(|r| {
            r.body["type"] == "Create"
                && r.body["object"]["content"]
                    .as_str()
                    .is_some_and(|c| c.contains(text))
        })
        .count()
}

/// Logs in through the form and waits for the overview.
async fn login(b: &Browser, base: &str) {
    b.goto(&format!("{base}/")).await;
    b.find("#token").await.send_keys(TOKEN).await;
    b.click("#login-submit").await;
    loaded(b, "overview").await;
}

/// Waits for `page`'s data to be shown; on failure, says what the page
/// shows and what its console said.
async fn loaded(b: &Browser, page: &str) {
    let start = Instant::now();
    while b
        .try_find(&format!("body[data-loaded={page}]"))
        .await
        .is_none()
    {
        if start.elapsed() > Duration::from_secs(15) {
            let body = b.eval("return document.body.innerText;", json!([])).await;
            let log = b.console_log().await;
            panic!("page {page} not loaded: {body}\nconsole: {log:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens `page` and waits for its data.
async fn open(b: &Browser, base: &str, page: &str) {
    b.goto(&format!("{base}/#{page}")).await;
    loaded(b, page).await;
}

/// The console errors so far (level SEVERE), favicon requests aside.
async fn console_errors(b: &Browser) -> Vec<String> {
    b.console_log()
        .await
        .into_iter()
        .filter(|(level, _)| level == "SEVERE")
        .map(|(_, m)| m)
        .collect()
}

/// Saves the page as `docs/console-{name}.png` when asked to.
async fn screenshot(b: &Browser, name: &str) {
    if std::env::var("STAMPEDE_CONSOLE_SCREENSHOTS").as_deref() != Ok("1") {
        return;
    }
    let png = b.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(format!("console-{name}.png"));
    std::fs::write(&path, png).unwrap();
}

/// How many pixels of a chart are drawn in colour (its lines), not the
/// white, grey and black of the frame and the labels.
async fn coloured_pixels(b: &Browser, id: &str) -> u64 {
    b.eval(
        "const c = document.getElementById(arguments[0]);
         const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
         let n = 0;
         for (let i = 0; i < d.length; i += 4) {
           const mx = Math.max(d[i], d[i + 1], d[i + 2]), mn = Math.min(d[i], d[i + 1], d[i + 2]);
           if (mx - mn > 60) n++;
         }
         return n;",
        json!([id]),
    )
    .await
    .as_u64()
    .unwrap()
}

async fn chart_last(b: &Browser, id: &str) -> i64 {
    b.eval(
        "return Number(document.getElementById(arguments[0]).dataset.last || 0);",
        json!([id]),
    )
    .await
    .as_i64()
    .unwrap()
}

/// A request from the page's own script, as an attacker's page could not
/// make it: `fetch` with the session cookie and the given CSRF token.
async fn page_post(b: &Browser, path: &str, csrf: &str, body: Value) -> u64 {
    b.eval_async(
        "const done = arguments[arguments.length - 1];
         fetch(arguments[0], { method: 'POST', headers: { 'content-type': 'application/json',
           'x-csrf-token': arguments[1] }, body: JSON.stringify(arguments[2]) })
           .then(r => done(r.status), e => done(String(e)));",
        json!([path, csrf, body]),
    )
    .await
    .as_u64()
    .unwrap()
}

/// Log in (a wrong token first), the overview's charts drawn and moving as
/// deliveries happen, the Activities page's progress and per-host
/// breakdown, and a walk over every page with no console error.
async fn login_overview_charts_and_a_walk_without_errors(backend: Backend) {
    let (app, base) = spawn(backend).await;
    let sink = Sink::start(SinkOptions {
        servers: 2,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let alice = create_actor(&app, "alice").await;
    app.seed_followers(
        alice,
        &[
            sink.actor(0, "bob").unwrap(),
            sink.actor(1, "carol").unwrap(),
        ],
    )
    .await;
    let b = Browser::start().await;
    let started = Instant::now();

    // A wrong token: the form again, with the reason; no session.
    b.goto(&format!("{base}/")).await;
    screenshot(&b, "login").await;
    b.find("#token")
        .await
        .send_keys("not-the-token-at-all")
        .await;
    b.click("#login-submit").await;
    assert_eq!(b.find("#login-error").await.text().await, "wrong token");
    // The refused login is the one error expected (its 401): the walk
    // starts after it.
    let refused = console_errors(&b).await;
    assert!(
        refused.len() == 1 && refused[0].contains("/login") && refused[0].contains("401"),
        "{refused:?}"
    );
    login(&b, &base).await;
    let cookie_visible = b.eval("return document.cookie;", json!([])).await;
    assert_eq!(cookie_visible, json!(""), "the session cookie is HttpOnly");

    // Deliveries happen: the overview's deliveries chart shows them, and
    // its points move on every few seconds.
    let first = chart_last(&b, "chart-deliveries").await;
    let id = publish(&app, "first post").await;
    wait_for(
        "both servers to get the post",
        Duration::from_secs(30),
        || async {
            delivered(&sink, 0, "first post") == 1 && delivered(&sink, 1, "first post") == 1
        },
    )
    .await;
    wait_for(
        "the deliveries chart to show the deliveries",
        Duration::from_secs(30),
        || async {
            b.eval(
                "return state.points.some(p => (p.deliveries.delivered || 0) > 0);",
                json!([]),
            )
            .await
                == json!(true)
                && b.find("#legend-deliveries")
                    .await
                    .text()
                    .await
                    .contains("delivered")
                && coloured_pixels(&b, "chart-deliveries").await > 20
        },
    )
    .await;
    // An inbound Follow accepted at the edge shows on the inbound chart.
    let alice_id = format!("{}/users/alice", app.http_base);
    assert_eq!(sink.follow(0, "dave", &alice_id).await.unwrap().status, 202);
    wait_for(
        "the inbound chart to show the Follow",
        Duration::from_secs(30),
        || async {
            b.eval(
                "return state.points.some(p => p.inbound.accepted > 0)
                 && state.points.some(p => p.inbound.verified > 0);",
                json!([]),
            )
            .await
                == json!(true)
        },
    )
    .await;
    let later = chart_last(&b, "chart-deliveries").await;
    assert!(
        later > first,
        "the chart's last point moved: {first} -> {later}"
    );
    wait_for("one more update", Duration::from_secs(20), || async {
        chart_last(&b, "chart-deliveries").await > later
    })
    .await;
    for chart in [
        "chart-depth",
        "chart-age",
        "chart-inbound",
        "chart-keycache",
    ] {
        let points = b
            .eval(
                "return Number(document.getElementById(arguments[0]).dataset.points || 0);",
                json!([chart]),
            )
            .await;
        assert!(points.as_u64().unwrap() > 0, "{chart} has points");
    }
    let depth_series = b
        .eval(
            "return Number(document.getElementById('chart-depth').dataset.series);",
            json!([]),
        )
        .await;
    assert!(
        depth_series.as_u64().unwrap() >= 3,
        "a depth line per delivery class at least"
    );
    screenshot(&b, "overview").await;

    // Activities: the post, its progress, its hosts.
    open(&b, &base, "activities").await;
    let row = b.find("#activities tbody a.activity-link").await;
    assert_eq!(row.text().await, id);
    b.find("#activities .progress .ok").await;
    b.click("#activities tbody a.activity-link").await;
    wait_for(
        "the per-host breakdown",
        Duration::from_secs(10),
        || async {
            b.eval(
                "return document.querySelectorAll('#activity-hosts tbody tr').length;",
                json!([]),
            )
            .await
                == json!(2)
        },
    )
    .await;
    screenshot(&b, "activities").await;

    // The other pages, each loaded.
    for page in ["hosts", "dead-letters", "domains"] {
        open(&b, &base, page).await;
    }
    // A rule added and removed from the Domains page.
    b.find("#domain-name").await.send_keys("spam.example").await;
    b.click("#domain-form button[type=submit]").await;
    b.find("#domains tr[data-domain='spam.example']").await;
    screenshot(&b, "domains").await;
    b.click("button[data-id='remove-spam.example']").await;
    wait_for("the rule removed", Duration::from_secs(10), || async {
        b.try_find("#domains tr[data-domain='spam.example']")
            .await
            .is_none()
    })
    .await;

    let errors = console_errors(&b).await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
    eprintln!("console walk: {:?}", started.elapsed());
    b.quit().await;
    app.stop().await;
}

/// Pausing a host from the Hosts page holds its deliveries (the other
/// server still gets them) until Resume; a dead letter replayed from the
/// Dead letters page is delivered.
async fn pause_from_the_hosts_page_and_replay_from_the_dead_letters_page(backend: Backend) {
    let (app, base) = spawn(backend).await;
    // Servers on addresses of their own, so a domain rule may name them.
    let sink = Sink::start(SinkOptions {
        servers: 2,
        bind: std::sync::Arc::new(|i| std::net::IpAddr::from([127, 0, 0, 71 + i as u8])),
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let alice = create_actor(&app, "alice").await;
    app.seed_followers(
        alice,
        &[
            sink.actor(0, "bob").unwrap(),
            sink.actor(1, "carol").unwrap(),
        ],
    )
    .await;
    let (h0, h1) = (
        sink.actor(0, "bob").unwrap().host,
        sink.actor(1, "carol").unwrap().host,
    );
    publish(&app, "post one").await;
    wait_for("post one everywhere", Duration::from_secs(30), || async {
        delivered(&sink, 0, "post one") == 1 && delivered(&sink, 1, "post one") == 1
    })
    .await;

    let b = Browser::start().await;
    login(&b, &base).await;
    open(&b, &base, "hosts").await;
    b.click(&format!("button[data-id='pause-{h0}']")).await;
    b.find(&format!("#hosts tr[data-host='{h0}'] .tag.paused"))
        .await;
    screenshot(&b, "hosts").await;

    publish(&app, "post two").await;
    wait_for(
        "post two at the host not paused",
        Duration::from_secs(30),
        || async { delivered(&sink, 1, "post two") == 1 },
    )
    .await;
    let mut admin = AdminServiceClient::new(app.grpc.clone());
    wait_for(
        "post two parked for the paused host",
        Duration::from_secs(30),
        || async {
            let s = admin
                .clone()
                .status(authed(StatusRequest {}))
                .await
                .unwrap()
                .into_inner();
            s.parked
                .iter()
                .any(|p| p.reason == "paused" && p.deliveries >= 1)
        },
    )
    .await;
    assert_eq!(
        received(&sink, 0, "post two"),
        0,
        "the paused host was sent to"
    );

    // Resume from the page: the held delivery goes (within its 5 s park).
    b.click(&format!("button[data-id='resume-{h0}']")).await;
    wait_for(
        "post two at the resumed host",
        Duration::from_secs(30),
        || async { delivered(&sink, 0, "post two") == 1 },
    )
    .await;

    // A 4xx dead-letters at once; replayed from the page once the server
    // takes posts again, it is delivered.
    sink.set_behavior(1, Behavior::Status(422)).unwrap();
    publish(&app, "post three").await;
    let start = Instant::now();
    let dead = loop {
        let l = admin
            .list_dead_letters(authed(ListDeadLettersRequest {
                limit: 10,
                host: h1.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        if let Some(d) = l.dead_letters.into_iter().next() {
            break d;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "post three not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    sink.set_behavior(1, Behavior::Ok).unwrap();
    open(&b, &base, "dead-letters").await;
    b.find("#dlq-host").await.send_keys(&h1).await;
    b.click("#dlq-filter button[type=submit]").await;
    b.find(&format!("#dead-letters tr[data-id='{}']", dead.id))
        .await;
    screenshot(&b, "dead-letters").await;
    b.click(&format!("button[data-id='replay-{}']", dead.id))
        .await;
    wait_for(
        "post three delivered after the replay",
        Duration::from_secs(30),
        || async { delivered(&sink, 1, "post three") == 1 },
    )
    .await;

    // Another one, purged from the page with the host's button.
    sink.set_behavior(1, Behavior::Status(422)).unwrap();
    publish(&app, "post four").await;
    wait_for(
        "post four dead-lettered",
        Duration::from_secs(30),
        || async { other_dead_letters(&app, &h1, &dead.id).await == 1 },
    )
    .await;
    b.click("#dlq-filter button[type=submit]").await;
    b.eval("document.body.dataset.confirm = 'yes';", json!([]))
        .await;
    b.click("#dlq-purge-host").await;
    wait_for(
        "the host's dead letters purged",
        Duration::from_secs(15),
        || async { other_dead_letters(&app, &h1, &dead.id).await == 0 },
    )
    .await;
    b.find("#dead-letters tbody td.muted").await;

    // Silence the first server's domain from the Hosts page.
    open(&b, &base, "hosts").await;
    b.click(&format!("button[data-id='silence-{h0}']")).await;
    b.find(&format!("#hosts tr[data-host='{h0}'] .tag.silence"))
        .await;
    let rules = AdminServiceClient::new(app.grpc.clone())
        .list_domain_policies(authed(ListDomainPoliciesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .policies;
    assert!(
        rules
            .iter()
            .any(|r| r.domain == "127.0.0.71" && r.policy == "silence"),
        "{rules:?}"
    );
    let errors = console_errors(&b).await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
    b.quit().await;
    app.stop().await;
}

crate::both_backends!(
    login_overview_charts_and_a_walk_without_errors,
    pause_from_the_hosts_page_and_replay_from_the_dead_letters_page
);

/// What the console refuses: the API without a session, an action without
/// the session's CSRF token (from a script and from a plain client), a
/// session made up; and what it takes: the token's session and its CSRF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_session_or_with_a_wrong_csrf_token_are_refused() {
    let (app, base) = spawn(Backend::Embedded).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let paused = || async {
        AdminServiceClient::new(app.grpc.clone())
            .status(authed(StatusRequest {}))
            .await
            .unwrap()
            .into_inner()
            .paused_hosts
    };
    let pause = json!({ "host": "victim.example" }).to_string();

    // No session: the API answers 401, actions too; the page is the login.
    let r = http.get(format!("{base}/api/hosts")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(format!("{base}/api/hosts/pause"))
        .body(pause.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let page = http
        .get(format!("{base}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("id=\"login-form\""));
    // A made-up session.
    let r = http
        .get(format!("{base}/api/hosts"))
        .header("cookie", "stampede_session=99999999999.00.00")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The token's session: a cookie HttpOnly and SameSite=Strict.
    let r = http
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    let session: Value = serde_json::from_slice(
        &http
            .get(format!("{base}/api/session"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    let csrf = session["csrf"].as_str().unwrap().to_string();

    // With the session but no CSRF token, or a wrong one: 403, nothing done.
    for token in [None, Some("00"), Some(&csrf[..csrf.len() - 2])] {
        let mut req = http
            .post(format!("{base}/api/hosts/pause"))
            .header("cookie", &cookie)
            .body(pause.clone());
        if let Some(t) = token {
            req = req.header("x-csrf-token", t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 403, "CSRF token {token:?}");
        assert!(r.text().await.unwrap().contains("CSRF"));
    }
    assert!(paused().await.is_empty(), "a refused action paused a host");
    // Bad input: a clear 400 with the reason.
    let r = http
        .post(format!("{base}/api/hosts/pause"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .body("{\"host\": 7}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("body:"));
    let r = http
        .post(format!("{base}/api/hosts/pause"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .body(json!({ "host": "a/b" }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // The right CSRF token: done.
    let r = http
        .post(format!("{base}/api/hosts/pause"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .body(pause.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(paused().await, vec!["victim.example".to_string()]);

    // In the browser: the page's script with a wrong token is refused too.
    let b = Browser::start().await;
    login(&b, &base).await;
    let status = page_post(
        &b,
        "/api/hosts/resume",
        "0000",
        json!({ "host": "victim.example" }),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(paused().await, vec!["victim.example".to_string()]);
    b.quit().await;
    app.stop().await;
}

/// Without a token the console answers loopback only, as the gRPC API
/// does: a session comes with the page, actions still need its CSRF token,
/// and a page reached under another name (DNS rebinding) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_console_answers_loopback_names_only() {
    let app = spawn_app(Backend::Embedded, AppOptions::default()).await;
    let base = app.console.clone().unwrap();
    let http = reqwest::Client::new();
    let r = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap().to_string();
    assert!(r.text().await.unwrap().contains("/assets/app.js"));
    let r = http
        .get(format!("{base}/api/hosts"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(format!("{base}/api/hosts/pause"))
        .header("cookie", &cookie)
        .body(json!({ "host": "victim.example" }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "an action without the CSRF token");
    for host in ["evil.example", "evil.example:8081", "10.1.2.3:8081"] {
        let r = http
            .get(format!("{base}/api/hosts"))
            .header("host", host)
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "Host: {host}");
        assert!(r.text().await.unwrap().contains("loopback"));
    }
    app.stop().await;
}

/// Dead letters of `host` but `except`, through the gRPC API.
async fn other_dead_letters(app: &TestApp, host: &str, except: &str) -> usize {
    AdminServiceClient::new(app.grpc.clone())
        .list_dead_letters(authed(ListDeadLettersRequest {
            limit: 10,
            host: host.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .dead_letters
        .into_iter()
        .filter(|d| d.id != except)
        .count()
}
