//! The fake servers themselves: what each serves (actor documents, keys,
//! documents a test asks for) and how it checks every POST to an inbox the
//! way Mastodon does (signature, digest, date), counting what it received.
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::{json, Value};
use stampede_core::digest::verify_digest_header;
use stampede_core::keys::{
    generate_rsa_2048, load_private_key, parse_public_key_pem, KeyPair, ParsedPublicKey,
};
use stampede_core::signature::{parse_signature_header, verify_request};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{Behavior, Received, Sink, SinkActor, SinkError};

/// A key the sink's actors sign with.
pub(crate) struct SinkKey {
    pub(crate) pair: KeyPair,
    pub(crate) public_pem: String,
}

impl SinkKey {
    pub(crate) fn generate() -> Result<Self, SinkError> {
        let k = generate_rsa_2048()?;
        Ok(Self {
            pair: load_private_key(&k.private_pkcs8_der)?,
            public_pem: k.public_pem,
        })
    }
}

/// Fetched keys by key id, parsed and as PEM, shared by the servers.
pub(crate) type KeyCache = Arc<Mutex<HashMap<String, Arc<(ParsedPublicKey, String)>>>>;

pub(crate) struct ServerState {
    pub(crate) base: String,
    pub(crate) host: String,
    pub(crate) shared_inbox: bool,
    pub(crate) behavior: Mutex<Behavior>,
    pub(crate) received: Mutex<Vec<Received>>,
    pub(crate) keys: KeyCache,
    pub(crate) client: reqwest::Client,
    pub(crate) key: Mutex<Arc<SinkKey>>,
    pub(crate) fetches: AtomicUsize,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) max_in_flight: AtomicUsize,
    pub(crate) verify_every: usize,
    pub(crate) count_only: bool,
    /// POSTs received by all the servers: every `verify_every`th of them is
    /// verified, counted across servers so that a benchmark with one POST per
    /// server (shared inboxes) samples as sparsely as one with many.
    pub(crate) seq: Arc<AtomicUsize>,
    pub(crate) total: AtomicUsize,
    pub(crate) unverified: AtomicUsize,
    /// Count-only mode: accepted copies per (path, activity id), and when
    /// the first of them reached the server (before a slow one's answer).
    pub(crate) accepted: Mutex<HashMap<(String, String), (u32, std::time::Instant)>>,
    /// Count-only mode: when each accepted POST arrived.
    pub(crate) arrivals: Mutex<Vec<std::time::Instant>>,
    /// Documents served instead of the generated ones, by path: a hostile
    /// server's answers.
    pub(crate) documents: Mutex<HashMap<String, Value>>,
    /// GETs answered, by path.
    pub(crate) gets: Mutex<HashMap<String, usize>>,
    /// The signature styles taken.
    pub(crate) styles: crate::Styles,
    /// Sent with a 401 refusing a style.
    pub(crate) accept_signature: Option<String>,
    /// Where every request is recorded, raw, one JSON line each.
    pub(crate) record: Option<Arc<Mutex<std::io::BufWriter<std::fs::File>>>>,
    /// This server's index.
    pub(crate) index: usize,
}

/// One request as [`crate::SinkOptions::record`] writes it: a JSON line.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Recorded {
    /// The server's index.
    pub server: usize,
    /// `POST`, `GET`.
    pub method: String,
    /// `http` (the sink listens without TLS).
    pub scheme: String,
    /// Path and query as received.
    pub path: String,
    /// Every header, names lower-case, in order (the `host` among them).
    pub headers: Vec<(String, String)>,
    /// The body, base64.
    pub body: String,
    /// The status answered.
    pub status: u16,
}

/// Appends one request to the record, if the servers keep one.
fn record(
    s: &ServerState,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
    status: u16,
) {
    use base64::Engine as _;
    use std::io::Write as _;
    let Some(file) = &s.record else {
        return;
    };
    let r = Recorded {
        server: s.index,
        method: method.as_str().to_string(),
        scheme: "http".into(),
        path: path_and_query.to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: base64::engine::general_purpose::STANDARD.encode(body),
        status,
    };
    if let (Ok(line), Ok(mut f)) = (serde_json::to_string(&r), file.lock()) {
        let _ = writeln!(f, "{line}").and_then(|()| f.flush());
    }
}

/// Whether a request is signed (either style), and whether RFC 9421.
fn signed_style(headers: &HeaderMap) -> Option<bool> {
    if headers.contains_key("signature-input") {
        Some(true)
    } else if headers.contains_key("signature")
        || headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| {
                a.get(..10)
                    .is_some_and(|p| p.eq_ignore_ascii_case("signature "))
            })
    {
        Some(false)
    } else {
        None
    }
}

/// The 401 of a server refusing a request's signature style, with its
/// `Accept-Signature` when it takes RFC 9421 only and has one to send.
fn wrong_style(s: &ServerState) -> Response {
    match (&s.accept_signature, s.styles) {
        (Some(a), crate::Styles::Rfc9421Only) => {
            (StatusCode::UNAUTHORIZED, [("accept-signature", a.clone())]).into_response()
        }
        _ => StatusCode::UNAUTHORIZED.into_response(),
    }
}

/// Counts a POST in progress; tracks the most seen at once.
pub(crate) struct InFlight<'a>(&'a ServerState);

impl<'a> InFlight<'a> {
    /// Counts a request in; returns the guard and how many are in progress
    /// with it.
    fn enter(s: &'a ServerState) -> (Self, usize) {
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_in_flight.fetch_max(now, Ordering::SeqCst);
        (Self(s), now)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One fake server.
pub struct Server {
    pub(crate) state: Arc<ServerState>,
    pub(crate) addr: SocketAddr,
    pub(crate) down: Mutex<Option<CancellationToken>>,
}

pub(crate) fn actor_of(s: &ServerState, name: &str) -> SinkActor {
    let id = format!("{}/users/{name}", s.base);
    SinkActor {
        inbox: format!("{id}/inbox"),
        shared_inbox: s.shared_inbox.then(|| format!("{}/inbox", s.base)),
        host: s.host.clone(),
        id,
    }
}

pub(crate) async fn accept_loop(listener: TcpListener, app: Router, down: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = down.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors (or another resource): the
                        // connection stays in the backlog, so retrying at
                        // once would spin. Wait for connections to close.
                        tracing::warn!(error = %e, "sink: accept failed; retrying in 50 ms");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let svc = TowerToHyperService::new(app.clone());
                conns.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
    drop(listener);
    conns.abort_all();
}

pub(crate) fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/users/{name}", get(actor_doc))
        .route("/users/{name}/inbox", post(inbox))
        .route("/inbox", post(inbox))
        .fallback(other)
        .with_state(state)
}

/// Any other request: a server answering a fixed status (5xx, 410, 429)
/// answers it everywhere, as a broken server does; otherwise 404.
async fn other(State(s): State<Arc<ServerState>>, method: Method, uri: Uri) -> Response {
    if method == Method::GET {
        if let Some(r) = got(&s, uri.path()) {
            return r;
        }
    }
    let behavior = s.behavior.lock().map(|b| b.clone()).unwrap_or(Behavior::Ok);
    match behavior {
        Behavior::Status(code) => StatusCode::from_u16(code)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            .into_response(),
        Behavior::RetryAfter(secs) => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", secs.to_string())],
        )
            .into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Counts a GET of `path`; the document served there instead, if any.
fn got(s: &ServerState, path: &str) -> Option<Response> {
    if let Ok(mut g) = s.gets.lock() {
        *g.entry(path.to_string()).or_insert(0) += 1;
    }
    let doc = s.documents.lock().ok()?.get(path).cloned()?;
    Some(
        (
            [("content-type", "application/activity+json")],
            doc.to_string(),
        )
            .into_response(),
    )
}

async fn actor_doc(
    State(s): State<Arc<ServerState>>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path_and_query = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    if signed_style(&headers).is_some_and(|rfc9421| !s.styles.takes(rfc9421)) {
        record(&s, &method, path_and_query, &headers, b"", 401);
        return wrong_style(&s);
    }
    record(&s, &method, path_and_query, &headers, b"", 200);
    s.fetches.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = got(&s, uri.path()) {
        return r;
    }
    let pem = s
        .key
        .lock()
        .map(|k| k.public_pem.clone())
        .unwrap_or_default();
    let a = actor_of(&s, &name);
    let mut doc = json!({
        "@context": ["https://www.w3.org/ns/activitystreams", "https://w3id.org/security/v1"],
        "id": a.id,
        "type": "Person",
        "preferredUsername": name,
        "inbox": a.inbox,
        "outbox": format!("{}/outbox", a.id),
        "followers": format!("{}/followers", a.id),
        "publicKey": {
            "id": format!("{}#main-key", a.id),
            "owner": a.id,
            "publicKeyPem": pem,
        }
    });
    if let Some(shared) = a.shared_inbox {
        doc["endpoints"] = json!({"sharedInbox": shared});
    }
    (
        [("content-type", "application/activity+json")],
        doc.to_string(),
    )
        .into_response()
}

async fn inbox(
    State(s): State<Arc<ServerState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Infallible> {
    let reached = std::time::Instant::now();
    let (_in_flight, now_in_flight) = InFlight::enter(&s);
    let behavior = s.behavior.lock().map(|b| b.clone()).unwrap_or(Behavior::Ok);
    let over_limit = match behavior {
        Behavior::Slow(d) => {
            tokio::time::sleep(d).await;
            false
        }
        Behavior::Limited { concurrent, delay } if now_in_flight <= concurrent => {
            tokio::time::sleep(delay).await;
            false
        }
        Behavior::Limited { .. } => true,
        _ => false,
    };
    let path = uri.path().to_string();
    let path_and_query = uri.path_and_query().map_or(path.clone(), |p| p.to_string());
    let n = s.seq.fetch_add(1, Ordering::Relaxed);
    let check = s.verify_every != 0 && n % s.verify_every == 0;
    let style = signed_style(&headers);
    let refused_style = style.is_some_and(|rfc9421| !s.styles.takes(rfc9421));
    let (verified, key_id) = if refused_style {
        (
            Err("signature style not taken by this server".to_string()),
            None,
        )
    } else if check && style == Some(true) {
        verify_rfc9421(&s, &method, &path_and_query, &headers, &body).await
    } else if check {
        verify(&s, &method, &path_and_query, &headers, &body).await
    } else {
        (Ok(()), None)
    };
    let status = match (&behavior, &verified) {
        _ if refused_style => 401,
        (Behavior::Status(code), _) => *code,
        (Behavior::RetryAfter(_), _) => 429,
        _ if over_limit => 429,
        (_, Ok(())) => 202,
        (_, Err(_)) => 401,
    };
    s.total.fetch_add(1, Ordering::Relaxed);
    if verified.is_err() {
        s.unverified.fetch_add(1, Ordering::Relaxed);
    }
    if s.count_only {
        if status < 300 {
            // Only the id: a whole JSON tree per POST would make the sink
            // cost more than what it measures.
            #[derive(serde::Deserialize)]
            struct Id<'a> {
                #[serde(borrow)]
                id: Option<std::borrow::Cow<'a, str>>,
            }
            let id = serde_json::from_slice::<Id<'_>>(&body)
                .ok()
                .and_then(|i| i.id)
                .unwrap_or_default()
                .into_owned();
            if let Ok(mut a) = s.accepted.lock() {
                a.entry((path, id)).or_insert((0, reached)).0 += 1;
            }
            if let Ok(mut a) = s.arrivals.lock() {
                a.push(std::time::Instant::now());
            }
        }
    } else if let Ok(mut r) = s.received.lock() {
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        r.push(Received {
            path,
            activity_id: json.get("id").and_then(Value::as_str).map(str::to_string),
            verified,
            key_id,
            body: json,
            status,
            at: std::time::Instant::now(),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
        });
    }
    record(&s, &method, &path_and_query, &headers, &body, status);
    if refused_style {
        return Ok(wrong_style(&s));
    }
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok(match behavior {
        Behavior::RetryAfter(secs) => (code, [("retry-after", secs.to_string())]).into_response(),
        _ if over_limit => (code, [("retry-after", "1")]).into_response(),
        _ => code.into_response(),
    })
}

/// Verifies a signed POST as Mastodon does.
async fn verify(
    s: &ServerState,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> (Result<(), String>, Option<String>) {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(sig) = h("signature") else {
        return (Err("no signature header".into()), None);
    };
    let params = match parse_signature_header(sig) {
        Ok(p) => p,
        Err(e) => return (Err(e.to_string()), None),
    };
    let key_id = Some(params.key_id.clone());
    if h("host") != Some(s.host.as_str()) {
        return (
            Err(format!("host header {:?} is not {}", h("host"), s.host)),
            key_id,
        );
    }
    match h("date").map(httpdate::parse_http_date) {
        Some(Ok(d)) => {
            let now = SystemTime::now();
            let skew = now
                .duration_since(d)
                .or_else(|e| Ok::<_, ()>(e.duration()))
                .unwrap_or_default();
            if skew > Duration::from_secs(300) {
                return (Err("date outside 5 minutes".into()), key_id);
            }
        }
        _ => return (Err("missing or bad date".into()), key_id),
    }
    match h("digest") {
        Some(d) => {
            if let Err(e) = verify_digest_header(d, body) {
                return (Err(e.to_string()), key_id);
            }
        }
        None => return (Err("no digest header".into()), key_id),
    }
    let key = match fetch_key(s, &params.key_id).await {
        Ok(k) => k,
        Err(e) => return (Err(e), key_id),
    };
    let required = ["(request-target)", "host", "date", "digest"];
    let r = verify_request(
        &params,
        method.as_str(),
        path_and_query,
        h,
        &required,
        &key.0,
    )
    .map_err(|e| e.to_string());
    (r, key_id)
}

/// Verifies a POST signed with RFC 9421 through stampede's verifier (the
/// recorded requests are checked by an independent one in the tests).
async fn verify_rfc9421(
    s: &ServerState,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> (Result<(), String>, Option<String>) {
    use stampede_core::verify::{
        check_coverage_and_digest, check_time, parse, verify_signature, HttpRequest,
    };
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
        .collect();
    if headers.get("host").and_then(|v| v.to_str().ok()) != Some(s.host.as_str()) {
        return (Err("host header is not this server".into()), None);
    }
    let req = HttpRequest {
        method: method.as_str(),
        scheme: "http",
        path_and_query,
        headers: &pairs,
        body,
    };
    let signed = match parse(&req) {
        Ok(p) => p,
        Err(e) => return (Err(e.to_string()), None),
    };
    let key_id = Some(signed.key_id.clone());
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let checked = check_time(&req, &signed, now, 300, 300)
        .and_then(|()| check_coverage_and_digest(&req, &signed));
    if let Err(e) = checked {
        return (Err(e.to_string()), key_id);
    }
    let pem = match fetch_key(s, &signed.key_id).await {
        Ok(k) => k.1.clone(),
        Err(e) => return (Err(e), key_id),
    };
    let r = stampede_core::keys::VerifyingKey::from_pem(&pem)
        .and_then(|k| verify_signature(&signed, &k))
        .map_err(|e| e.to_string());
    (r, key_id)
}

async fn fetch_key(
    s: &ServerState,
    key_id: &str,
) -> Result<Arc<(ParsedPublicKey, String)>, String> {
    if let Some(k) = s.keys.lock().ok().and_then(|m| m.get(key_id).cloned()) {
        return Ok(k);
    }
    let url = key_id.split('#').next().unwrap_or(key_id);
    let raw = s
        .client
        .get(url)
        .header("accept", "application/activity+json")
        .send()
        .await
        .map_err(|e| format!("key fetch failed: {e}"))?
        .bytes()
        .await
        .map_err(|e| format!("key fetch failed: {e}"))?;
    let doc: Value =
        serde_json::from_slice(&raw).map_err(|e| format!("key document is not json: {e}"))?;
    let pk = &doc["publicKey"];
    if pk["id"].as_str() != Some(key_id) {
        return Err(format!("actor document has no key {key_id}"));
    }
    let pem = pk["publicKeyPem"].as_str().ok_or("no publicKeyPem")?;
    let key = Arc::new((
        parse_public_key_pem(pem).map_err(|e| e.to_string())?,
        pem.to_string(),
    ));
    if let Ok(mut m) = s.keys.lock() {
        m.insert(key_id.to_string(), key.clone());
    }
    Ok(key)
}

impl Sink {
    /// Gives server `i` a new key: its actors' documents publish it and its
    /// actors sign with it from now on.
    pub async fn rotate_key(&self, i: usize) -> Result<(), SinkError> {
        let s = self.server(i)?;
        let key = tokio::task::spawn_blocking(SinkKey::generate)
            .await
            .map_err(|e| SinkError::Io(std::io::Error::other(e)))??;
        if let Ok(mut k) = s.state.key.lock() {
            *k = Arc::new(key);
        }
        Ok(())
    }

    /// GETs of actor documents (key fetches) server `i` has answered.
    pub fn fetches(&self, i: usize) -> usize {
        self.servers
            .get(i)
            .map_or(0, |s| s.state.fetches.load(Ordering::Relaxed))
    }

    /// Server `i` answers GETs of `path` with `doc` from now on (instead of
    /// a generated actor document, or 404): what a hostile server serves.
    pub fn serve_document(&self, i: usize, path: &str, doc: Value) -> Result<(), SinkError> {
        let s = self.server(i)?;
        if let Ok(mut d) = s.state.documents.lock() {
            d.insert(path.to_string(), doc);
        }
        Ok(())
    }

    /// GETs of `path` server `i` has answered (any status).
    pub fn gets(&self, i: usize, path: &str) -> usize {
        self.servers
            .get(i)
            .and_then(|s| s.state.gets.lock().ok()?.get(path).copied())
            .unwrap_or(0)
    }

    /// GETs server `i` has answered, all paths.
    pub fn total_gets(&self, i: usize) -> usize {
        self.servers
            .get(i)
            .and_then(|s| s.state.gets.lock().ok().map(|g| g.values().sum()))
            .unwrap_or(0)
    }

    /// The public key (PEM) server `i`'s actors sign with now.
    pub fn public_pem(&self, i: usize) -> Option<String> {
        let s = self.servers.get(i)?;
        s.state.key.lock().ok().map(|k| k.public_pem.clone())
    }
}
