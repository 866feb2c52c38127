//! Library: the sink, fake remote fediverse servers for tests, the demo and
//! benchmarks (`stampede sink`). Many HTTP servers on 127.0.0.1 in one
//! process, each a "host" with actors whose documents carry inboxes (with or
//! without a shared inbox) and a public key. Every POST to an inbox is checked
//! the way Mastodon checks it: the `Signature` (draft-cavage, key fetched from
//! the `keyId` and cached), the `Digest` against the body, and the `Date`
//! window. Each server counts what it received and misbehaves on request:
//! a fixed status, slowness, `Retry-After`, or down (not listening).
#![deny(missing_docs)]

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
use stampede_core::digest::digest_header;
use stampede_core::digest::verify_digest_header;
use stampede_core::keys::{
    generate_rsa_2048, load_private_key, parse_public_key_pem, KeyPair, ParsedPublicKey,
};
use stampede_core::signature::{parse_signature_header, verify_request};
use stampede_core::signature::{sign_request, POST_HEADERS};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Errors of the sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A listener failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Key generation failed.
    #[error(transparent)]
    Core(#[from] stampede_core::CoreError),
    /// No such server.
    #[error("no server {0}")]
    NoServer(usize),
}

/// How a server answers inbox POSTs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behavior {
    /// 202 Accepted after verifying.
    Ok,
    /// Always this status (after recording the request).
    Status(u16),
    /// 429 with this `Retry-After` (seconds).
    RetryAfter(u64),
    /// Answers 202 after this long.
    Slow(Duration),
}

/// One POST a server received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Request path (`/inbox` or `/users/{name}/inbox`).
    pub path: String,
    /// The activity's `id`, if the body had one.
    pub activity_id: Option<String>,
    /// `Ok` when signature, digest and date verified; the reason otherwise.
    pub verified: Result<(), String>,
    /// The `keyId` of the signature, if parsed.
    pub key_id: Option<String>,
    /// The body as JSON (`Null` when it was not JSON).
    pub body: Value,
    /// The status answered.
    pub status: u16,
    /// When it arrived.
    pub at: std::time::Instant,
}

/// A key the sink's actors sign with.
struct SinkKey {
    pair: KeyPair,
    public_pem: String,
}

impl SinkKey {
    fn generate() -> Result<Self, SinkError> {
        let k = generate_rsa_2048()?;
        Ok(Self {
            pair: load_private_key(&k.private_pkcs8_der)?,
            public_pem: k.public_pem,
        })
    }
}

struct ServerState {
    base: String,
    host: String,
    shared_inbox: bool,
    behavior: Mutex<Behavior>,
    received: Mutex<Vec<Received>>,
    keys: Arc<Mutex<HashMap<String, Arc<ParsedPublicKey>>>>,
    client: reqwest::Client,
    key: Mutex<Arc<SinkKey>>,
    fetches: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    verify_every: usize,
    count_only: bool,
    /// POSTs received by all the servers: every `verify_every`th of them is
    /// verified, counted across servers so that a benchmark with one POST per
    /// server (shared inboxes) samples as sparsely as one with many.
    seq: Arc<AtomicUsize>,
    total: AtomicUsize,
    unverified: AtomicUsize,
    /// Count-only mode: accepted copies per (path, activity id).
    accepted: Mutex<HashMap<(String, String), u32>>,
    /// Count-only mode: when each accepted POST arrived.
    arrivals: Mutex<Vec<std::time::Instant>>,
    /// Documents served instead of the generated ones, by path: a hostile
    /// server's answers.
    documents: Mutex<HashMap<String, Value>>,
    /// GETs answered, by path.
    gets: Mutex<HashMap<String, usize>>,
}

/// Counts a POST in progress; tracks the most seen at once.
struct InFlight<'a>(&'a ServerState);

impl<'a> InFlight<'a> {
    fn enter(s: &'a ServerState) -> Self {
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(s)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How [`Sink::send`] signs (or mis-signs) a request.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Send no signature at all.
    pub unsigned: bool,
    /// Sign with a key that no document publishes (one per sink).
    pub wrong_key: bool,
    /// Sign with this `keyId` instead of the actor's `#main-key`.
    pub key_id: Option<String>,
    /// Change the body after signing.
    pub tamper_body: bool,
    /// Change the signed `Date` after signing (by one second).
    pub tamper_date: bool,
    /// Date to send instead of now.
    pub date: Option<SystemTime>,
    /// Send this body instead of the activity's JSON.
    pub raw_body: Option<Vec<u8>>,
    /// Sign for, and send, this `Host` instead of the URL's (a request
    /// signed for another server, replayed).
    pub host: Option<String>,
    /// Connect from this local address (127.0.0.0/8 is all loopback on
    /// Linux): a client of its own address.
    pub source: Option<std::net::IpAddr>,
    /// More headers, sent unsigned (`X-Forwarded-For`, say).
    pub headers: Vec<(String, String)>,
}

/// What a remote server answered to [`Sink::send`].
#[derive(Debug, Clone)]
pub struct SendResult {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After`, when given.
    pub retry_after: Option<String>,
}

/// One fake server.
pub struct Server {
    state: Arc<ServerState>,
    addr: SocketAddr,
    down: Mutex<Option<CancellationToken>>,
}

/// A remote actor hosted by the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkActor {
    /// Actor id.
    pub id: String,
    /// Personal inbox.
    pub inbox: String,
    /// Shared inbox, when the server has one.
    pub shared_inbox: Option<String>,
    /// `host:port`.
    pub host: String,
}

/// Options of a sink.
#[derive(Clone)]
pub struct SinkOptions {
    /// Number of servers.
    pub servers: usize,
    /// Which servers (by index) have a shared inbox.
    pub shared_inbox: Arc<dyn Fn(usize) -> bool + Send + Sync>,
    /// Verify every Nth POST's signature and digest, counted across all the
    /// servers (1: all; 0: none), so the sink is not the bottleneck of a
    /// benchmark.
    pub verify_every: usize,
    /// Keep only counts (accepted copies per inbox and activity, arrival
    /// times), not every request: for benchmarks.
    pub count_only: bool,
    /// The loopback address server `i` listens on (default 127.0.0.1; any
    /// of 127.0.0.0/8 gives a server a host of its own).
    pub bind: Arc<dyn Fn(usize) -> std::net::IpAddr + Send + Sync>,
}

impl Default for SinkOptions {
    fn default() -> Self {
        Self {
            servers: 1,
            shared_inbox: Arc::new(|_| true),
            verify_every: 1,
            count_only: false,
            bind: Arc::new(|_| std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        }
    }
}

/// A set of fake servers.
pub struct Sink {
    servers: Vec<Server>,
    shutdown: CancellationToken,
    /// The key `SendOptions::wrong_key` signs with: published nowhere,
    /// made once (a forger needs one key, and keys are slow to make).
    forged: tokio::sync::OnceCell<Arc<SinkKey>>,
}

impl Sink {
    /// Starts the servers on 127.0.0.1, each on its own free port.
    pub async fn start(opts: SinkOptions) -> Result<Self, SinkError> {
        let key = Arc::new(
            tokio::task::spawn_blocking(SinkKey::generate)
                .await
                .map_err(|e| SinkError::Io(std::io::Error::other(e)))??,
        );
        let keys = Arc::new(Mutex::new(HashMap::new()));
        let seq = Arc::new(AtomicUsize::new(0));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| SinkError::Io(std::io::Error::other(e)))?;
        let shutdown = CancellationToken::new();
        let mut servers = Vec::with_capacity(opts.servers);
        for i in 0..opts.servers {
            let listener = TcpListener::bind(((opts.bind)(i), 0)).await?;
            let addr = listener.local_addr()?;
            let state = Arc::new(ServerState {
                base: format!("http://{addr}"),
                host: addr.to_string(),
                shared_inbox: (opts.shared_inbox)(i),
                behavior: Mutex::new(Behavior::Ok),
                received: Mutex::new(Vec::new()),
                keys: keys.clone(),
                client: client.clone(),
                key: Mutex::new(key.clone()),
                fetches: AtomicUsize::new(0),
                in_flight: AtomicUsize::new(0),
                max_in_flight: AtomicUsize::new(0),
                verify_every: opts.verify_every,
                count_only: opts.count_only,
                seq: seq.clone(),
                total: AtomicUsize::new(0),
                unverified: AtomicUsize::new(0),
                accepted: Mutex::new(HashMap::new()),
                arrivals: Mutex::new(Vec::new()),
                documents: Mutex::new(HashMap::new()),
                gets: Mutex::new(HashMap::new()),
            });
            let token = shutdown.child_token();
            tokio::spawn(accept_loop(listener, router(state.clone()), token.clone()));
            servers.push(Server {
                state,
                addr,
                down: Mutex::new(Some(token)),
            });
        }
        Ok(Self {
            servers,
            shutdown,
            forged: tokio::sync::OnceCell::new(),
        })
    }

    /// The signing key of server `from`, or the forger's for `wrong_key`.
    async fn signing_key(
        &self,
        from: usize,
        opts: &SendOptions,
    ) -> Result<Arc<SinkKey>, SinkError> {
        if opts.wrong_key {
            return self
                .forged
                .get_or_try_init(|| async {
                    tokio::task::spawn_blocking(SinkKey::generate)
                        .await
                        .map_err(|e| SinkError::Io(std::io::Error::other(e)))?
                        .map(Arc::new)
                })
                .await
                .cloned();
        }
        self.server(from)?
            .state
            .key
            .lock()
            .map(|k| k.clone())
            .map_err(|_| SinkError::NoServer(from))
    }

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

    /// The headers of a `method` request of `url` (with `body`, which may
    /// be empty) by actor `actor` of server `from`, signed draft-cavage
    /// style as `opts` asks (its `key_id`, `wrong_key`, `host`); with a body,
    /// its `digest` and `content-type` too.
    pub async fn signed_request_headers(
        &self,
        from: usize,
        actor: &str,
        method: &str,
        url: &str,
        body: &[u8],
        opts: &SendOptions,
    ) -> Result<Vec<(String, String)>, SinkError> {
        let u = url::Url::parse(url).map_err(|e| SinkError::Io(std::io::Error::other(e)))?;
        let host = opts
            .host
            .clone()
            .unwrap_or_else(|| stampede_core::targets::inbox_host(url).unwrap_or_default());
        let date = httpdate::fmt_http_date(SystemTime::now());
        let digest = digest_header(body);
        let path = match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_string(),
        };
        let with_body = !body.is_empty();
        let covered: &[&str] = if with_body {
            POST_HEADERS
        } else {
            stampede_core::signature::GET_HEADERS
        };
        let sig = self
            .signature(
                from, actor, &host, method, &path, &date, &digest, covered, opts,
            )
            .await?;
        let mut headers = vec![
            ("host".to_string(), host),
            ("date".to_string(), date),
            ("signature".to_string(), sig),
        ];
        if with_body {
            headers.push(("digest".into(), digest));
            headers.push(("content-type".into(), "application/activity+json".into()));
        }
        Ok(headers)
    }

    /// The `Signature` header actor `actor` of server `from` puts on a request.
    #[allow(clippy::too_many_arguments)]
    async fn signature(
        &self,
        from: usize,
        actor: &str,
        host: &str,
        method: &str,
        path: &str,
        date: &str,
        digest: &str,
        covered: &[&str],
        opts: &SendOptions,
    ) -> Result<String, SinkError> {
        let s = &self.server(from)?.state;
        let key_id = opts
            .key_id
            .clone()
            .unwrap_or_else(|| format!("{}/users/{actor}#main-key", s.base));
        let key = self.signing_key(from, opts).await?;
        Ok(sign_request(
            &key.pair,
            &key_id,
            method,
            path,
            covered,
            |h| match h {
                "host" => Some(host),
                "date" => Some(date),
                "digest" => Some(digest),
                _ => None,
            },
        )?)
    }

    /// The headers of a POST of `body` by actor `actor` of server `from` to
    /// `url`, signed as [`Sink::send`] signs them (for `Verify`, say).
    pub async fn signed_headers(
        &self,
        from: usize,
        actor: &str,
        url: &str,
        body: &[u8],
    ) -> Result<Vec<(String, String)>, SinkError> {
        let u = url::Url::parse(url).map_err(|e| SinkError::Io(std::io::Error::other(e)))?;
        let host = stampede_core::targets::inbox_host(url).unwrap_or_default();
        let date = httpdate::fmt_http_date(SystemTime::now());
        let digest = digest_header(body);
        let sig = self
            .signature(
                from,
                actor,
                &host,
                "POST",
                u.path(),
                &date,
                &digest,
                POST_HEADERS,
                &SendOptions::default(),
            )
            .await?;
        Ok(vec![
            ("host".into(), host),
            ("date".into(), date),
            ("digest".into(), digest),
            ("content-type".into(), "application/activity+json".into()),
            ("signature".into(), sig),
        ])
    }

    /// The headers of a POST of `body` to `url` signed with RFC 9421 by actor
    /// `actor` of server `from`: `rsa-v1_5-sha256` over `@method`,
    /// `@authority`, `@path`, `content-digest` and `date`.
    pub fn signed_headers_rfc9421(
        &self,
        from: usize,
        actor: &str,
        url: &str,
        body: &[u8],
    ) -> Result<Vec<(String, String)>, SinkError> {
        use base64::Engine;
        let s = &self.server(from)?.state;
        let u = url::Url::parse(url).map_err(|e| SinkError::Io(std::io::Error::other(e)))?;
        let host = stampede_core::targets::inbox_host(url).unwrap_or_default();
        let date = httpdate::fmt_http_date(SystemTime::now());
        let digest = stampede_core::digest::content_digest_header(body);
        let created = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let input = format!(
            "sig1=(\"@method\" \"@authority\" \"@path\" \"content-digest\" \"date\");created={created};keyid=\"{}/users/{actor}#main-key\";alg=\"rsa-v1_5-sha256\"",
            s.base
        );
        // The verifier's own signature base, then the signature over it.
        let placeholder = "sig1=:AAAA:".to_string();
        let headers = [
            ("host", host.as_str()),
            ("date", date.as_str()),
            ("content-digest", digest.as_str()),
            ("signature-input", input.as_str()),
            ("signature", placeholder.as_str()),
        ];
        let req = stampede_core::verify::HttpRequest {
            method: "POST",
            scheme: u.scheme(),
            path_and_query: u.path(),
            headers: &headers,
            body,
        };
        let signed = stampede_core::verify::parse(&req)?;
        let key = s
            .key
            .lock()
            .map(|k| k.clone())
            .map_err(|_| SinkError::NoServer(from))?;
        let sig = stampede_core::signature::rsa_sha256_sign(&key.pair, signed.base.as_bytes())?;
        Ok(vec![
            ("host".into(), host),
            ("date".into(), date),
            ("content-digest".into(), digest),
            ("content-type".into(), "application/activity+json".into()),
            ("signature-input".into(), input),
            (
                "signature".into(),
                format!(
                    "sig1=:{}:",
                    base64::engine::general_purpose::STANDARD.encode(sig)
                ),
            ),
        ])
    }

    /// POSTs `activity` as actor `actor` of server `from` to `inbox` (a URL),
    /// signed draft-cavage style as Mastodon signs, or mis-signed as `opts` asks.
    pub async fn send(
        &self,
        from: usize,
        actor: &str,
        inbox: &str,
        activity: &Value,
        opts: SendOptions,
    ) -> Result<SendResult, SinkError> {
        let s = &self.server(from)?.state;
        let url = url::Url::parse(inbox).map_err(|e| SinkError::Io(std::io::Error::other(e)))?;
        let host = opts.host.clone().unwrap_or_else(|| match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        });
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let body = opts
            .raw_body
            .clone()
            .unwrap_or_else(|| activity.to_string().into_bytes());
        let date_at = opts.date.unwrap_or_else(SystemTime::now);
        let date = httpdate::fmt_http_date(date_at);
        let digest = digest_header(&body);
        let client = match opts.source {
            None => s.client.clone(),
            Some(ip) => reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .local_address(ip)
                .build()
                .map_err(|e| SinkError::Io(std::io::Error::other(e)))?,
        };
        let mut req = client
            .post(url.clone())
            .header("content-type", "application/activity+json");
        if opts.host.is_some() {
            req = req.header("host", host.as_str());
        }
        for (k, v) in &opts.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if !opts.unsigned {
            let sig = self
                .signature(
                    from,
                    actor,
                    &host,
                    "POST",
                    &path,
                    &date,
                    &digest,
                    POST_HEADERS,
                    &opts,
                )
                .await?;
            req = req.header("signature", sig);
        }
        let date = if opts.tamper_date {
            httpdate::fmt_http_date(date_at + Duration::from_secs(1))
        } else {
            date
        };
        let mut body = body;
        if opts.tamper_body {
            if let Some(b) = body.iter_mut().rev().find(|b| b.is_ascii_alphanumeric()) {
                *b = if *b == b'a' { b'b' } else { b'a' };
            }
        }
        let resp = req
            .header("date", date)
            .header("digest", digest)
            .body(body)
            .send()
            .await
            .map_err(|e| SinkError::Io(std::io::Error::other(e)))?;
        Ok(SendResult {
            status: resp.status().as_u16(),
            retry_after: resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        })
    }

    /// Actor `actor` of server `from` follows the local actor `target` (its
    /// id) with a signed Follow to the target's inbox. The Follow's id is
    /// `{actor id}/follows/{target}`, so following twice is one follow.
    pub async fn follow(
        &self,
        from: usize,
        actor: &str,
        target: &str,
    ) -> Result<SendResult, SinkError> {
        let me = self.actor(from, actor).ok_or(SinkError::NoServer(from))?;
        let follow = serde_json::json!({
            "@context": "https://www.w3.org/ns/activitystreams",
            "id": format!("{}/follows/{}", me.id, target.rsplit('/').next().unwrap_or(target)),
            "type": "Follow",
            "actor": me.id,
            "object": target,
        });
        self.send(
            from,
            actor,
            &format!("{target}/inbox"),
            &follow,
            SendOptions::default(),
        )
        .await
    }

    /// Number of servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether there are no servers.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    fn server(&self, i: usize) -> Result<&Server, SinkError> {
        self.servers.get(i).ok_or(SinkError::NoServer(i))
    }

    /// `host:port` of server `i`.
    pub fn addr(&self, i: usize) -> Option<SocketAddr> {
        self.servers.get(i).map(|s| s.addr)
    }

    /// The actor `name` on server `i`.
    pub fn actor(&self, i: usize, name: &str) -> Option<SinkActor> {
        let s = &self.servers.get(i)?.state;
        Some(actor_of(s, name))
    }

    /// Sets how server `i` answers.
    pub fn set_behavior(&self, i: usize, b: Behavior) -> Result<(), SinkError> {
        let s = self.server(i)?;
        if let Ok(mut g) = s.state.behavior.lock() {
            *g = b;
        }
        Ok(())
    }

    /// Takes server `i` down: it stops listening and drops its connections.
    pub fn set_down(&self, i: usize) -> Result<(), SinkError> {
        let s = self.server(i)?;
        if let Ok(mut g) = s.down.lock() {
            if let Some(t) = g.take() {
                t.cancel();
            }
        }
        Ok(())
    }

    /// Brings server `i` back up on the same port.
    pub async fn set_up(&self, i: usize) -> Result<(), SinkError> {
        let s = self.server(i)?;
        let listener = TcpListener::bind(s.addr).await?;
        let token = self.shutdown.child_token();
        tokio::spawn(accept_loop(
            listener,
            router(s.state.clone()),
            token.clone(),
        ));
        if let Ok(mut g) = s.down.lock() {
            *g = Some(token);
        }
        Ok(())
    }

    /// The most POSTs server `i` had in progress at once since the last reset.
    pub fn max_in_flight(&self, i: usize) -> usize {
        self.servers
            .get(i)
            .map_or(0, |s| s.state.max_in_flight.load(Ordering::SeqCst))
    }

    /// Starts counting [`Sink::max_in_flight`] afresh.
    pub fn reset_max_in_flight(&self, i: usize) {
        if let Some(s) = self.servers.get(i) {
            s.state.max_in_flight.store(0, Ordering::SeqCst);
        }
    }

    /// What server `i` received so far.
    pub fn received(&self, i: usize) -> Vec<Received> {
        self.servers
            .get(i)
            .and_then(|s| s.state.received.lock().ok().map(|r| r.clone()))
            .unwrap_or_default()
    }

    /// Activities of `kind` (`Accept`, `Create`, …) received by all servers.
    pub fn received_of_type(&self, kind: &str) -> usize {
        (0..self.len())
            .map(|i| {
                self.received(i)
                    .iter()
                    .filter(|r| r.body["type"] == kind)
                    .count()
            })
            .sum()
    }

    /// POSTs received by all servers.
    pub fn total_received(&self) -> usize {
        self.servers
            .iter()
            .map(|s| s.state.total.load(Ordering::Relaxed))
            .sum()
    }

    /// Count-only mode: accepted copies at server `i` per (path, activity id).
    pub fn accepted_copies(&self, i: usize) -> HashMap<(String, String), u32> {
        self.servers
            .get(i)
            .and_then(|s| s.state.accepted.lock().ok().map(|a| a.clone()))
            .unwrap_or_default()
    }

    /// Count-only mode: arrival times of every accepted POST, all servers.
    pub fn arrivals(&self) -> Vec<std::time::Instant> {
        let mut out = Vec::new();
        for s in &self.servers {
            if let Ok(a) = s.state.arrivals.lock() {
                out.extend_from_slice(&a);
            }
        }
        out
    }

    /// POSTs that failed verification, across all servers.
    pub fn total_unverified(&self) -> usize {
        self.servers
            .iter()
            .map(|s| s.state.unverified.load(Ordering::Relaxed))
            .sum()
    }

    /// Stops every server.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn actor_of(s: &ServerState, name: &str) -> SinkActor {
    let id = format!("{}/users/{name}", s.base);
    SinkActor {
        inbox: format!("{id}/inbox"),
        shared_inbox: s.shared_inbox.then(|| format!("{}/inbox", s.base)),
        host: s.host.clone(),
        id,
    }
}

async fn accept_loop(listener: TcpListener, app: Router, down: CancellationToken) {
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

fn router(state: Arc<ServerState>) -> Router {
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
    uri: Uri,
) -> Response {
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
    let _in_flight = InFlight::enter(&s);
    let behavior = s.behavior.lock().map(|b| b.clone()).unwrap_or(Behavior::Ok);
    if let Behavior::Slow(d) = behavior {
        tokio::time::sleep(d).await;
    }
    let path = uri.path().to_string();
    let path_and_query = uri.path_and_query().map_or(path.clone(), |p| p.to_string());
    let n = s.seq.fetch_add(1, Ordering::Relaxed);
    let check = s.verify_every != 0 && n % s.verify_every == 0;
    let (verified, key_id) = if check {
        verify(&s, &method, &path_and_query, &headers, &body).await
    } else {
        (Ok(()), None)
    };
    let status = match (&behavior, &verified) {
        (Behavior::Status(code), _) => *code,
        (Behavior::RetryAfter(_), _) => 429,
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
                *a.entry((path, id)).or_insert(0) += 1;
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
        });
    }
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok(match behavior {
        Behavior::RetryAfter(secs) => (code, [("retry-after", secs.to_string())]).into_response(),
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
    let r = verify_request(&params, method.as_str(), path_and_query, h, &required, &key)
        .map_err(|e| e.to_string());
    (r, key_id)
}

async fn fetch_key(s: &ServerState, key_id: &str) -> Result<Arc<ParsedPublicKey>, String> {
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
    let key = Arc::new(parse_public_key_pem(pem).map_err(|e| e.to_string())?);
    if let Ok(mut m) = s.keys.lock() {
        m.insert(key_id.to_string(), key.clone());
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `verify_every` samples the POSTs of all servers together: one POST
    /// to each of 12 servers with every 5th verified is 3 verifications,
    /// not 12 (each server's first).
    #[tokio::test]
    async fn verification_is_sampled_across_servers() {
        let sink = Sink::start(SinkOptions {
            servers: 12,
            verify_every: 5,
            ..Default::default()
        })
        .await
        .unwrap();
        let from = sink.actor(0, "alice").unwrap();
        for i in 0..sink.len() {
            let inbox = sink.actor(i, "bob").unwrap().shared_inbox.unwrap();
            let activity = serde_json::json!({
                "id": format!("{}/activities/{i}", from.id),
                "type": "Create",
                "actor": from.id,
            });
            let r = sink
                .send(0, "alice", &inbox, &activity, SendOptions::default())
                .await
                .unwrap();
            assert_eq!(r.status, 202);
        }
        let received: Vec<Received> = (0..sink.len()).flat_map(|i| sink.received(i)).collect();
        assert_eq!(received.len(), 12);
        assert!(received.iter().all(|r| r.verified.is_ok()));
        let verified = received.iter().filter(|r| r.key_id.is_some()).count();
        assert_eq!(verified, 3);
        sink.shutdown();
    }
}
