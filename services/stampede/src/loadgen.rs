//! The benches' load generator: pre-serialized HTTP/1.1 requests written to
//! keep-alive connections, one request in flight per connection, answers
//! parsed only as far as their status and length. A general-purpose client
//! spends about as much CPU per request as the server it drives; on cores
//! shared with stampede that would be measured as stampede's cost.
//!
//! Two kinds of load. Closed loop (no rate): every connection sends its next
//! request as soon as the last is answered, which finds the highest rate,
//! but at saturation each request's latency is just the number in flight
//! over that rate. Open loop (a rate): request `i` is due at `i / rate`
//! seconds whatever the answers do, and its latency counts from when it was
//! due, so time spent waiting for a free connection or a late timer counts
//! against the server (no coordinated omission): the latency at that rate.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request, serialized: `POST {path}` to `authority` with `headers`
/// (a `host` among them is replaced by `authority`) and `body`.
pub fn post(authority: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.len() + headers.len() * 64);
    out.extend_from_slice(format!("POST {path} HTTP/1.1\r\nhost: {authority}\r\n").as_bytes());
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("host") || k.eq_ignore_ascii_case("content-length") {
            continue;
        }
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

/// Sends every request over `concurrency` connections to `addr`, as fast as
/// they are answered or, with `rate`, that many a second (module note);
/// returns, in request order, each answer's status (0: no answer) and
/// latency in ms.
pub async fn run(
    addr: SocketAddr,
    requests: Vec<Vec<u8>>,
    concurrency: usize,
    rate: Option<f64>,
) -> Vec<(u16, f64)> {
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    // The connections are open before the clock starts, as a remote
    // server's keep-alive connections are; one that fails is retried
    // when its first request is sent.
    let conns = futures::future::join_all((0..concurrency.max(1)).map(|_| connect(addr))).await;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(conns.len());
    for conn in conns {
        let (requests, next) = (Arc::clone(&requests), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut conn = conn.ok();
            let mut buf = Vec::with_capacity(4096);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(req) = requests.get(i) else { break };
                let t = match rate {
                    Some(rate) => {
                        let due = start + Duration::from_secs_f64(i as f64 / rate);
                        tokio::time::sleep_until(due).await;
                        due.into_std()
                    }
                    None => Instant::now(),
                };
                let status = match exchange(&mut conn, addr, req, &mut buf).await {
                    Ok(s) => s,
                    Err(_) => {
                        conn = None;
                        0
                    }
                };
                done.push((i, status, t.elapsed().as_secs_f64() * 1000.0));
            }
            done
        }));
    }
    let mut out = vec![(0u16, 0.0f64); requests.len()];
    for t in tasks {
        if let Ok(done) = t.await {
            for (i, status, ms) in done {
                out[i] = (status, ms);
            }
        }
    }
    out
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

async fn exchange(
    conn: &mut Option<TcpStream>,
    addr: SocketAddr,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<u16> {
    let stream = match conn {
        Some(s) => s,
        None => conn.insert(connect(addr).await?),
    };
    stream.write_all(req).await?;
    buf.clear();
    loop {
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Err(std::io::Error::other(e)),
        };
        let status = resp.code.unwrap_or(0);
        let mut length = 0usize;
        let mut chunked = false;
        let mut close = false;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = true;
            } else if h.name.eq_ignore_ascii_case("connection") {
                close = h.value.eq_ignore_ascii_case(b"close");
            }
        }
        if chunked {
            while !buf[head..].ends_with(b"0\r\n\r\n") {
                if stream.read_buf(buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        } else {
            while buf.len() < head + length {
                if stream.read_buf(buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
        if close {
            *conn = None;
        }
        return Ok(status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_in_order_over_keep_alive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut headers = [httparse::EMPTY_HEADER; 16];
                        let mut req = httparse::Request::new(&mut headers);
                        if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                            let len: usize = req
                                .headers
                                .iter()
                                .find(|h| h.name == "content-length")
                                .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                                .unwrap();
                            if buf.len() >= n + len {
                                let body = buf[n..n + len].to_vec();
                                buf.drain(..n + len);
                                let status = if body == b"bad" { 400 } else { 202 };
                                let answer =
                                    format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nok");
                                s.write_all(answer.as_bytes()).await.unwrap();
                                continue;
                            }
                        }
                        if s.read_buf(&mut buf).await.unwrap() == 0 {
                            return;
                        }
                    }
                });
            }
        });
        let requests: Vec<Vec<u8>> = (0..50)
            .map(|i| {
                let body: &[u8] = if i % 10 == 3 { b"bad" } else { b"{}" };
                post(
                    &addr.to_string(),
                    "/inbox",
                    &[("host".into(), "x".into())],
                    body,
                )
            })
            .collect();
        let out = run(addr, requests.clone(), 4, None).await;
        assert_eq!(out.len(), 50);
        for (i, (status, _)) in out.iter().enumerate() {
            assert_eq!(*status, if i % 10 == 3 { 400 } else { 202 }, "request {i}");
        }
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            4,
            "one connection per slot, kept alive"
        );
        // Open loop: 50 requests at 500/s take about 0.1 s, however fast
        // the answers come.
        let started = Instant::now();
        let out = run(addr, requests, 4, Some(500.0)).await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(95), "{took:?}");
        for (i, (status, _)) in out.iter().enumerate() {
            assert_eq!(*status, if i % 10 == 3 { 400 } else { 202 }, "request {i}");
        }
    }
}
