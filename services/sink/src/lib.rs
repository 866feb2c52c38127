//! Library: the sink, fake remote fediverse servers for tests, the demo and
//! benchmarks (`stampede sink`). Many HTTP servers on 127.0.0.1 in one
//! process, each a "host" with actors whose documents carry inboxes (with or
//! without a shared inbox) and a public key. Every POST to an inbox is checked
//! the way Mastodon checks it: the `Signature` (draft-cavage, or RFC 9421
//! with `Signature-Input`; key fetched from the `keyId` and cached), the
//! `Digest` or `Content-Digest` against the body, and the `Date` (or
//! `created`) window. A server may take one style only (`Styles`), and the
//! servers may record every request raw for an independent checker. Each
//! server counts what it received and misbehaves on request: a fixed
//! status, slowness, `Retry-After`, or down (not listening).
#![deny(missing_docs)]

mod sender;
mod server;

pub use sender::{SendOptions, SendResult};
use server::{accept_loop, actor_of, router, ServerState, SinkKey};
pub use server::{Recorded, Server};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
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
    /// Answers 202 after `delay` while at most `concurrent` requests are in
    /// progress, and 429 (`Retry-After: 1`) at once to any beyond: a small
    /// server protecting itself.
    Limited {
        /// Requests served at once.
        concurrent: usize,
        /// Time to answer one.
        delay: Duration,
    },
}

/// Which signature styles a server takes (`stampede sink --signature-style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Styles {
    /// draft-cavage and RFC 9421.
    #[default]
    Both,
    /// draft-cavage only: a request signed RFC 9421 is answered 401.
    CavageOnly,
    /// RFC 9421 only: a request signed draft-cavage is answered 401.
    Rfc9421Only,
}

impl Styles {
    /// `both`, `cavage-only`, `rfc9421-only`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "both" => Some(Styles::Both),
            "cavage-only" => Some(Styles::CavageOnly),
            "rfc9421-only" => Some(Styles::Rfc9421Only),
            _ => None,
        }
    }

    /// Whether a request signed RFC 9421 (`rfc9421`) or not is taken.
    pub fn takes(self, rfc9421: bool) -> bool {
        match self {
            Styles::Both => true,
            Styles::CavageOnly => !rfc9421,
            Styles::Rfc9421Only => rfc9421,
        }
    }
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
    /// Its headers, names lower-case, in order.
    pub headers: Vec<(String, String)>,
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
    /// Which signature styles the servers take, on inbox POSTs and on
    /// signed GETs of their actors (an unsigned GET is always served).
    pub signature_style: Styles,
    /// The `Accept-Signature` a server sends with a 401 refusing a style
    /// (RFC 9421 §5.1), if any.
    pub accept_signature: Option<String>,
    /// Appends every request the servers receive (inbox POSTs, GETs of
    /// actors), raw (method, path, headers, body), as a JSON line to this
    /// file: what a checker that is not stampede's reads.
    pub record: Option<std::path::PathBuf>,
}

impl Default for SinkOptions {
    fn default() -> Self {
        Self {
            servers: 1,
            shared_inbox: Arc::new(|_| true),
            verify_every: 1,
            count_only: false,
            bind: Arc::new(|_| std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
            signature_style: Styles::Both,
            accept_signature: None,
            record: None,
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
        let record = match &opts.record {
            Some(path) => Some(Arc::new(Mutex::new(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )))),
            None => None,
        };
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
                styles: opts.signature_style,
                accept_signature: opts.accept_signature.clone(),
                record: record.clone(),
                index: i,
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
        self.accepted_at(i)
            .into_iter()
            .map(|(k, (n, _))| (k, n))
            .collect()
    }

    /// Count-only mode: accepted copies at server `i` per (path, activity
    /// id), with when the first of them reached the server: its receipt,
    /// before a slow server's answer.
    pub fn accepted_at(&self, i: usize) -> HashMap<(String, String), (u32, std::time::Instant)> {
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
