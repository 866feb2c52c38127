//! The edge's HTTP/1.1 server, built for hostile clients: every connection
//! has a deadline in each of its phases, so one that trickles its request
//! head a byte at a time (slowloris) or sits idle is closed instead of
//! holding a socket and a task forever. `STAMPEDE_HTTP_HEADER_TIMEOUT_SECS`
//! bounds a request head from its first byte (and a new connection's wait
//! for it), `STAMPEDE_HTTP_IDLE_TIMEOUT_SECS` a keep-alive connection
//! between requests; the body's deadline is the handler's
//! (`STAMPEDE_HTTP_BODY_TIMEOUT_SECS`, answered 408). Connections are
//! counted: at `STAMPEDE_HTTP_MAX_CONNECTIONS` the server stops accepting
//! (they wait in the kernel's backlog), and a client (an address, an IPv6
//! /64; trusted proxies aside) past `STAMPEDE_HTTP_MAX_CONNECTIONS_PER_CLIENT`
//! is closed at once. Each request carries the peer address (`ConnectInfo`)
//! for the edge's rate limit.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How long connections may take to finish their requests after shutdown
/// begins; then they are closed.
const DRAIN: Duration = Duration::from_secs(10);

/// The connection limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// From a request head's first byte (or a new connection) to its end.
    pub header: Duration,
    /// Between the end of a response and the next request's first byte.
    pub idle: Duration,
    /// Connections open at once.
    pub connections: usize,
    /// Connections open at once from one client.
    pub per_client: usize,
    /// Peers exempt from the per-client limit (an ingress carries many
    /// clients' connections).
    pub trusted: Vec<ipnet::IpNet>,
}

/// Open connections per client, bounded by the open connections.
#[derive(Default)]
struct PerClient(std::sync::Mutex<HashMap<String, usize>>);

/// One client's connection, counted until dropped.
struct ClientSlot {
    map: Arc<PerClient>,
    key: String,
}

impl PerClient {
    fn take(self: &Arc<Self>, key: String, limit: usize) -> Option<ClientSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            map: self.clone(),
            key,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut m = self.map.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

const IDLE: u8 = 0;
const HEAD: u8 = 1;
const BUSY: u8 = 2;

/// Where a connection is, and since when (ms after `start`).
struct Phase {
    start: Instant,
    phase: AtomicU8,
    since_ms: AtomicU64,
}

impl Phase {
    fn new(start: Instant) -> Self {
        // A new connection waits for its first request head.
        Self {
            start,
            phase: AtomicU8::new(HEAD),
            since_ms: AtomicU64::new(0),
        }
    }

    fn set(&self, phase: u8) {
        self.since_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.phase.store(phase, Ordering::Release);
    }

    /// When the current phase's deadline passes (`None` while a request is
    /// being served: the handler bounds that itself).
    fn deadline(&self, d: &Limits) -> Option<Instant> {
        let limit = match self.phase.load(Ordering::Acquire) {
            IDLE => d.idle,
            HEAD => d.header,
            _ => return None,
        };
        let since = Duration::from_millis(self.since_ms.load(Ordering::Relaxed));
        Some(self.start + since + limit)
    }
}

/// The socket, noting when an idle connection starts sending a request.
struct Watched {
    io: TcpStream,
    phase: Arc<Phase>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before && self.phase.phase.load(Ordering::Acquire) == IDLE {
            self.phase.set(HEAD);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Serves `app` on `listener` until `shutdown`, then lets open requests
/// finish (up to ten seconds).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = Arc::new(limits);
    let open = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let per_client = Arc::new(PerClient::default());
    let mut conns = JoinSet::new();
    loop {
        // A permit first: at the cap, connections wait in the backlog.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            p = open.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, say: the connection stays in the
                // backlog, so retrying at once would spin.
                tracing::warn!(error = %e, "accept failed; retrying in 50 ms");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ip = peer.ip().to_canonical();
        let slot = if limits.trusted.iter().any(|n| n.contains(&ip)) {
            None
        } else {
            match per_client.take(crate::inbox_edge::rate_key(ip), limits.per_client) {
                Some(slot) => Some(slot),
                None => {
                    tracing::debug!(%peer, "connection refused: too many from this client");
                    continue;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = connection(stream, peer, app.clone(), limits.clone(), shutdown.clone());
        conns.spawn(async move {
            conn.await;
            drop((permit, slot));
        });
    }
    drop(listener);
    let drained =
        tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::info!(
            connections = conns.len(),
            "closing connections still open after the drain"
        );
        conns.abort_all();
    }
    Ok(())
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    deadlines: Arc<Limits>,
    shutdown: CancellationToken,
) {
    let phase = Arc::new(Phase::new(Instant::now()));
    let io = TokioIo::new(Watched {
        io: stream,
        phase: phase.clone(),
    });
    let svc_phase = phase.clone();
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let (app, phase) = (app.clone(), svc_phase.clone());
        phase.set(BUSY);
        req.extensions_mut().insert(ConnectInfo(peer));
        async move {
            let resp = app.oneshot(req.map(axum::body::Body::new)).await;
            phase.set(IDLE);
            resp
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    let mut draining = false;
    // The watchdog is one timer, reset only when it fires (no wake-up per
    // request): to the current phase's deadline, but never further than the
    // shorter of the two limits ahead. A phase that begins after a wake ends
    // no sooner than that, so no deadline is missed.
    let recheck = deadlines.header.min(deadlines.idle);
    let next = |now: Instant| {
        let far = now + recheck;
        phase.deadline(&deadlines).map_or(far, |d| d.min(far))
    };
    let watchdog = tokio::time::sleep_until(next(Instant::now()).into());
    tokio::pin!(watchdog);
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut watchdog => {
                let now = Instant::now();
                if phase.deadline(&deadlines).is_some_and(|d| d <= now) {
                    tracing::debug!(%peer, "connection closed: request head or idle deadline passed");
                    return;
                }
                watchdog.as_mut().reset(next(now).into());
            }
        }
    }
}
