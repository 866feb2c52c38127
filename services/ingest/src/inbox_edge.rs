//! The inbox edge: `POST /inbox` and `POST /users/{name}/inbox`. Only cheap
//! checks here (size, content type, a signature present, JSON, the date
//! window, blocked domains, a per-client-address rate limit in Redis); then
//! a durable, publisher-confirmed enqueue and 202. Verification is the inbox
//! service's. Nothing in the body is believed here: the rate limit is keyed
//! on the address the connection came from (or, behind a trusted proxy, the
//! address it forwarded for), never on the actor the body claims.
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use prost::Message;
use stampede_backends::queue::{OutMessage, QueueName};
use stampede_core::activity::parse_json;
use stampede_federation::verify::activity_info;
use stampede_proto::queue::{Header, InboundJob};

use crate::Ingest;

use stampede_proto::kinds::INBOUND_JOB;

fn answer(
    s: &Ingest,
    status: StatusCode,
    result: &'static str,
    reason: impl Into<String>,
) -> Response {
    s.metrics.inbound_edge(result);
    let reason = reason.into();
    tracing::debug!(result, %reason, status = status.as_u16(), "inbound refused at the edge");
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        reason + "\n",
    )
        .into_response();
    // A backend away: the sender's retry is welcome soon.
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("10"));
    }
    r
}

/// The client a request came from: the peer address, or, when the peer is a
/// trusted proxy (`STAMPEDE_TRUSTED_PROXIES`), the last address in
/// `X-Forwarded-For` that is not itself a trusted proxy (each proxy appends
/// the address it received from, so addresses left of the first untrusted
/// one are the client's own claims).
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    // An IPv4 peer of a dual-stack listener arrives as ::ffff:a.b.c.d.
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>().map(|ip| ip.to_canonical()) else {
            // Unreadable: the hop that wrote it is as far as we can trust.
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}

/// The rate-limit key of a client address: IPv6 by its /64 (one subscriber's
/// allocation: a host with a /64 has 2^64 addresses to rotate through).
pub(crate) fn rate_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// Counts a request against its client's window (`STAMPEDE_INBOUND_RATE_LIMIT`
/// a minute); the 429 when the client is over it. Before anything else is
/// done for the request: every request costs, refused ones too. A failing
/// cache lets requests through.
async fn rate_limited(s: &Ingest, client: IpAddr) -> Option<Response> {
    let limit = s.cfg.inbound_rate_limit;
    if limit == 0 {
        return None;
    }
    let now = stampede_backends::clock::now_secs().max(0) as u64;
    let key = stampede_federation::cache_keys::edge_requests(&rate_key(client), now / 60);
    match s.backends.cache.incr(&key, Duration::from_secs(61)).await {
        Ok(n) if n > limit => {
            s.metrics.inbound_edge("rate_limited");
            Some(
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, (60 - now % 60).to_string())],
                    format!("rate limited: over {limit} requests a minute from {client}\n"),
                )
                    .into_response(),
            )
        }
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "rate limit unavailable; letting the request through");
            None
        }
    }
}

/// `POST /inbox`.
pub async fn shared_inbox(
    State(s): State<Ingest>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let client = client_address(peer.ip(), &headers, &s.cfg.trusted_proxies);
    if let Some(r) = rate_limited(&s, client).await {
        discard_rest(body);
        return r;
    }
    let inbox = format!("{}/inbox", s.cfg.base());
    accept(s, client, uri, headers, body, inbox).await
}

/// `POST /users/{name}/inbox`. Whether the actor exists comes from memory
/// (`local_actors`): the store is read on a miss, without the actor's keys.
pub async fn actor_inbox(
    State(s): State<Ingest>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let client = client_address(peer.ip(), &headers, &s.cfg.trusted_proxies);
    if let Some(r) = rate_limited(&s, client).await {
        discard_rest(body);
        return r;
    }
    let refused = match s.actors.id_of(&*s.backends.store, &name).await {
        Ok(Some(_)) => None,
        Ok(None) => {
            Some((StatusCode::NOT_FOUND, format!("no actor named {name}\n")).into_response())
        }
        Err(e) => Some(answer(
            &s,
            crate::error::http_status("actor lookup", &e),
            "unavailable",
            "store unavailable",
        )),
    };
    if let Some(r) = refused {
        discard_rest(body);
        return r;
    }
    let inbox = format!("{}/inbox", s.cfg.actor_id(&name));
    accept(s, client, uri, headers, body, inbox).await
}

/// Most of a rejected request's unread body read and thrown away, and for
/// how long, after its answer: a socket closed with unread data sends a
/// reset, which can destroy the answer before the remote server, still
/// sending, reads it. Beyond these the connection is closed anyway.
const DISCARD_BYTES: usize = 8 << 20;
const DISCARD_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and drops what is left of a rejected request's body (up to the
/// limits above) while its answer is sent.
fn discard_rest(body: Body) {
    use futures::StreamExt;
    tokio::spawn(async move {
        let mut data = body.into_data_stream();
        let mut left = DISCARD_BYTES;
        let _ = tokio::time::timeout(DISCARD_TIME, async {
            while let Some(Ok(chunk)) = data.next().await {
                left = left.saturating_sub(chunk.len());
                if left == 0 {
                    break;
                }
            }
        })
        .await;
    });
}

async fn accept(
    s: Ingest,
    client: IpAddr,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
    inbox: String,
) -> Response {
    let span = tracing::info_span!("inbox.receive", path = %uri.path(), %client);
    stampede_runtime::telemetry::set_parent(
        &span,
        headers.get("traceparent").and_then(|v| v.to_str().ok()),
    );
    tracing::Instrument::instrument(receive(s, client, uri, headers, body, inbox), span).await
}

/// The checks a request fails on its headers alone, before its body is read.
fn refused_at_headers(s: &Ingest, headers: &HeaderMap) -> Option<Response> {
    let cfg = &s.cfg;
    let h = |n: &header::HeaderName| headers.get(n).and_then(|v| v.to_str().ok());
    if let Some(len) = h(&header::CONTENT_LENGTH).and_then(|l| l.parse::<usize>().ok()) {
        if len > cfg.max_activity_bytes {
            return Some(answer(
                s,
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("body over {} bytes", cfg.max_activity_bytes),
            ));
        }
    }
    if let Some(ct) = h(&header::CONTENT_TYPE) {
        let ct = ct.to_ascii_lowercase();
        if !(ct.starts_with("application/activity+json")
            || ct.starts_with("application/ld+json")
            || ct.starts_with("application/json"))
        {
            return Some(answer(
                s,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "malformed",
                "content type must be application/activity+json",
            ));
        }
    }
    let has_signature = headers.contains_key("signature")
        || h(&header::AUTHORIZATION)
            .is_some_and(|a| a.len() > 10 && a[..10].eq_ignore_ascii_case("signature "));
    if !has_signature {
        return Some(answer(
            s,
            StatusCode::UNAUTHORIZED,
            "bad_signature",
            "missing signature",
        ));
    }
    None
}

async fn receive(
    s: Ingest,
    client: IpAddr,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
    inbox: String,
) -> Response {
    if let Some(r) = refused_at_headers(&s, &headers) {
        discard_rest(body);
        return r;
    }
    let cfg = &s.cfg;
    let h = |n: &header::HeaderName| headers.get(n).and_then(|v| v.to_str().ok());
    let read = axum::body::to_bytes(body, cfg.max_activity_bytes);
    let body = match tokio::time::timeout(cfg.http_body_timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return answer(
                &s,
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("body over {} bytes", cfg.max_activity_bytes),
            )
        }
        Err(_) => {
            let mut r = answer(
                &s,
                StatusCode::REQUEST_TIMEOUT,
                "timed_out",
                format!(
                    "the body did not arrive within {} s",
                    cfg.http_body_timeout.as_secs()
                ),
            );
            r.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return r;
        }
    };
    let json = match parse_json(&body) {
        Ok(j) => j,
        Err(e) => return answer(&s, StatusCode::BAD_REQUEST, "malformed", e.to_string()),
    };
    let info = match activity_info(&json) {
        Ok(i) => i,
        Err(e) => {
            return answer(
                &s,
                StatusCode::BAD_REQUEST,
                "malformed",
                format!("not an activity: {e}"),
            )
        }
    };
    let now = stampede_backends::clock::now_secs();
    if let Some(d) = h(&header::DATE) {
        let Ok(t) = httpdate::parse_http_date(d) else {
            return answer(
                &s,
                StatusCode::UNAUTHORIZED,
                "stale_date",
                "unreadable date",
            );
        };
        let t = t
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if t < now - cfg.inbound_max_age_secs || t > now + cfg.inbound_max_future_secs {
            return answer(
                &s,
                StatusCode::UNAUTHORIZED,
                "stale_date",
                "date outside the allowed window",
            );
        }
    }
    let host = url::Url::parse(&info.actor)
        .ok()
        .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
        .unwrap_or_default();
    if host.is_empty() {
        return answer(
            &s,
            StatusCode::BAD_REQUEST,
            "malformed",
            "actor is not a URL",
        );
    }
    if s.policy.is_blocked(&host) {
        return answer(&s, StatusCode::FORBIDDEN, "blocked", "domain blocked");
    }
    let job = InboundJob {
        method: "POST".into(),
        path: uri
            .path_and_query()
            .map_or_else(|| uri.path().to_string(), |p| p.to_string()),
        headers: headers
            .iter()
            .filter_map(|(k, v)| {
                Some(Header {
                    name: k.as_str().to_string(),
                    value: v.to_str().ok()?.to_string(),
                })
            })
            .collect(),
        body: body.to_vec(),
        recipient_inbox: inbox,
        received_unix_ms: now * 1000,
        attempt: 0,
        trace: stampede_runtime::telemetry::current_trace_context(),
        client: rate_key(client),
    };
    let msg = OutMessage {
        kind: INBOUND_JOB,
        payload: job.encode_to_vec(),
        route: None,
    };
    match s.backends.queue.publish(QueueName::Inbound, msg).await {
        Ok(()) => {
            s.metrics.inbound_edge("accepted");
            tracing::debug!(activity_id = ?info.id, actor = %info.actor, "inbound queued");
            StatusCode::ACCEPTED.into_response()
        }
        Err(e) => answer(
            &s,
            crate::error::http_status("inbound enqueue", &e),
            "unavailable",
            "the queue cannot take the activity now; retry later",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // An untrusted peer's header is its own claim.
        assert_eq!(
            client_address(ip("203.0.113.9"), &xff(&["198.51.100.1"]), &trusted),
            ip("203.0.113.9")
        );
        // Behind the ingress: the address it forwarded for.
        assert_eq!(
            client_address(ip("10.1.1.1"), &xff(&["198.51.100.1"]), &trusted),
            ip("198.51.100.1")
        );
        // A client's forged hops left of the real one are ignored.
        assert_eq!(
            client_address(
                ip("10.1.1.1"),
                &xff(&["1.2.3.4, 198.51.100.1", "10.2.2.2"]),
                &trusted
            ),
            ip("198.51.100.1")
        );
        // Garbage stops the walk at the last hop a proxy wrote.
        assert_eq!(
            client_address(ip("10.1.1.1"), &xff(&["1.2.3.4, junk, 10.3.3.3"]), &trusted),
            ip("10.3.3.3")
        );
        assert_eq!(
            client_address(ip("10.1.1.1"), &HeaderMap::new(), &trusted),
            ip("10.1.1.1")
        );
    }

    #[test]
    fn ipv4_mapped_peers_are_their_ipv4_address() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            client_address(ip("::ffff:203.0.113.9"), &HeaderMap::new(), &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_address(
                ip("::ffff:10.1.1.1"),
                &xff(&["::ffff:198.51.100.1"]),
                &trusted
            ),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn ipv6_clients_are_limited_by_their_64() {
        let a = rate_key("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = rate_key("2001:db8:1:2:bbbb::9".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, rate_key("2001:db8:1:3::1".parse().unwrap()));
        assert_eq!(rate_key("192.0.2.7".parse().unwrap()), "192.0.2.7");
    }
}
