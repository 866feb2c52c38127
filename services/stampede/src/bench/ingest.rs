//! `stampede bench ingest`: a burst of inbox POSTs at the edge (a child
//! `stampede up` running ingest alone), answered 202 after a durable enqueue,
//! against the queue's own enqueue rate; then kill -9, and every request
//! answered 202 must be queued.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use serde_json::json;
use stampede_backends::queue::QueueName;
use stampede_runtime::Config;

use super::sampling::{latency_json, on_load_thread, peak_rss_mib_of};
use super::{scratch, socket_addr, write_json, BackendKind, IngestArgs};
use crate::loadgen;

/// An inbound activity as a remote server would POST it (the edge checks
/// only cheap things; the signature is shaped right but not verified here:
/// the edge never verifies).
pub(super) fn inbound_body(n: usize) -> (String, Vec<u8>) {
    let host = n % 1000;
    let id = format!("https://r{host}.bench.example/activities/{n}");
    let body = json!({
        "@context": "https://www.w3.org/ns/activitystreams",
        "id": id,
        "type": "Create",
        "actor": format!("https://r{host}.bench.example/users/a{}", n % 7),
        "to": ["https://www.w3.org/ns/activitystreams#Public"],
        "object": {
            "id": format!("{id}/note"),
            "type": "Note",
            "content": "a burst at the edge",
        },
    });
    (id, body.to_string().into_bytes())
}

/// Durable enqueues per second of the queue alone, in this process, with
/// the same concurrency and message size: the edge's ceiling.
async fn enqueue_ceiling(kind: BackendKind, concurrency: usize, n: usize) -> anyhow::Result<f64> {
    let (vars, scratch) = scratch(kind).await?;
    let cfg = Config::from_lookup(|k| vars.get(k).cloned())?;
    let backends = stampede_runtime::Backends::open(&cfg, "bench-ceiling").await?;
    let q = backends.queue.clone();
    let payload = inbound_body(0).1;
    let started = Instant::now();
    let results = futures::stream::iter(0..n)
        .map(|_| {
            let q = q.clone();
            let payload = payload.clone();
            async move {
                q.publish(
                    QueueName::Inbound,
                    stampede_backends::queue::OutMessage {
                        kind: "bench.Ceiling",
                        payload,
                        route: None,
                    },
                )
                .await
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    let secs = started.elapsed().as_secs_f64();
    for r in results {
        r?;
    }
    drop(q);
    drop(backends);
    // Let the embedded store's threads close before the directory goes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    scratch.remove().await?;
    Ok(n as f64 / secs.max(1e-9))
}

/// Runs `stampede bench ingest`.
pub(super) async fn run(a: IngestArgs) -> anyhow::Result<()> {
    if a.requests == 0 || a.concurrency == 0 {
        bail!("--requests and --concurrency must be at least 1");
    }
    println!(
        "stampede bench ingest: {} inbox POSTs, {} at once, backend {:?}",
        a.requests, a.concurrency, a.common.backend
    );
    let ceiling = enqueue_ceiling(a.common.backend, a.concurrency, a.requests.min(20_000)).await?;
    println!("ceiling: durable enqueues of the queue alone: {ceiling:.0}/s");

    // stampede as a child process running only the edge, so it can be killed.
    let (mut vars, scratch) = scratch(a.common.backend).await?;
    vars.insert("STAMPEDE_UP_SERVICES", "ingest".into());
    vars.insert("RUST_LOG", "warn".into());
    let port = |l: std::net::TcpListener| l.local_addr().map(|a| a.port());
    let mut attempt = 0;
    let result = loop {
        // Free ports, found by binding and letting go: the child binds them
        // again, and another socket may take one in between. Then the child
        // exits at once, and the bench tries other ports.
        let (http, grpc, metrics) = (
            port(std::net::TcpListener::bind("127.0.0.1:0")?)?,
            port(std::net::TcpListener::bind("127.0.0.1:0")?)?,
            port(std::net::TcpListener::bind("127.0.0.1:0")?)?,
        );
        let base = format!("http://127.0.0.1:{http}");
        vars.insert("STAMPEDE_PUBLIC_URL", base.clone());
        vars.insert("STAMPEDE_HTTP_ADDR", format!("127.0.0.1:{http}"));
        vars.insert("STAMPEDE_GRPC_ADDR", format!("127.0.0.1:{grpc}"));
        vars.insert("STAMPEDE_METRICS_ADDR", format!("127.0.0.1:{metrics}"));
        attempt += 1;
        match measure(&a, &vars, &base, metrics, ceiling).await {
            Err(e) if attempt < 3 && e.downcast_ref::<ChildExited>().is_some() => {
                println!("  {e}; trying other ports");
            }
            r => break r,
        }
    };
    scratch.remove().await?;
    let r = result?;
    println!();
    println!(
        "{:>8} {:>8} {:>9} {:>9} {:>6} {:>7} {:>7} {:>7} {:>8} {:>8}  check",
        "POSTs",
        "202s",
        "seconds",
        "202s/s",
        "ratio",
        "p50 ms",
        "p99 ms",
        "max ms",
        "RSS MiB",
        "queued"
    );
    let n = |k: &str| r[k].as_f64().unwrap_or(0.0);
    println!(
        "{:>8} {:>8} {:>9.2} {:>9.0} {:>6.2} {:>7.1} {:>7.1} {:>7.1} {:>8.0} {:>8}  {}",
        n("requests"),
        n("accepted"),
        n("seconds"),
        n("rate"),
        n("ratio"),
        r["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
        r["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
        r["latency_ms"]["max"].as_f64().unwrap_or(0.0),
        n("peak_rss_mib"),
        n("queued_after_kill"),
        r["check"]["summary"].as_str().unwrap_or("")
    );
    write_json(&a.common.json, &r)?;
    if !r["check"]["ok"].as_bool().unwrap_or(false) {
        bail!("correctness check failed");
    }
    Ok(())
}

/// The child `stampede up` of `bench ingest` exited before it was ready
/// (most likely a port taken between choosing it and binding it).
#[derive(Debug)]
struct ChildExited(std::process::ExitStatus);

impl std::fmt::Display for ChildExited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stampede up exited before it was ready ({})", self.0)
    }
}

impl std::error::Error for ChildExited {}

async fn measure(
    a: &IngestArgs,
    vars: &HashMap<&'static str, String>,
    base: &str,
    metrics_port: u16,
    ceiling: f64,
) -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    // The backends are the bench's choice, not the caller's environment's.
    for var in [
        "STAMPEDE_AMQP_URL",
        "STAMPEDE_REDIS_URL",
        "STAMPEDE_DATABASE_URL",
    ] {
        if !vars.contains_key(var) {
            cmd.env_remove(var);
        }
    }
    let mut child = cmd
        .arg("up")
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("child pid")?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(a.concurrency)
        .build()?;
    let ready = format!("http://127.0.0.1:{metrics_port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if matches!(client.get(&ready).send().await, Ok(r) if r.status() == 200) {
            break;
        }
        if let Some(status) = child.try_wait()? {
            return Err(ChildExited(status).into());
        }
        if Instant::now() > deadline {
            bail!("stampede did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let addr = socket_addr(base)?;
    let authority = addr.to_string();
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    // Built before the clock starts: the remote servers' work, not stampede's.
    let (ids, requests): (Vec<String>, Vec<Vec<u8>>) = (0..a.requests)
        .map(|n| {
            let (id, body) = inbound_body(n);
            let headers = [
                ("content-type".to_string(), "application/activity+json".to_string()),
                ("date".to_string(), date.clone()),
                ("digest".to_string(), stampede_core::digest::digest_header(&body)),
                ("signature".to_string(), format!(
                    "keyId=\"https://r{}.bench.example/users/a{}#main-key\",algorithm=\"rsa-sha256\",headers=\"(request-target) host date digest\",signature=\"AAAA\"",
                    n % 1000,
                    n % 7
                )),
            ];
            (id, loadgen::post(&authority, "/inbox", &headers, &body))
        })
        .unzip();
    let started = Instant::now();
    let answers = on_load_thread(loadgen::run(addr, requests, a.concurrency, None)).await?;
    let results: Vec<(String, u16, f64)> = ids
        .into_iter()
        .zip(answers)
        .map(|(id, (status, ms))| (id, status, ms))
        .collect();
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss = peak_rss_mib_of(&pid.to_string());
    // kill -9 right after the burst: what was answered 202 must be queued.
    child.start_kill()?;
    child.wait().await?;
    let accepted: std::collections::HashSet<String> = results
        .iter()
        .filter(|(_, s, _)| *s == 202)
        .map(|(id, _, _)| id.clone())
        .collect();
    let mut lat: Vec<f64> = results
        .iter()
        .filter(|(_, s, _)| *s == 202)
        .map(|(_, _, ms)| *ms)
        .collect();
    lat.sort_by(|x, y| x.total_cmp(y));
    let other: usize = results.iter().filter(|(_, s, _)| *s != 202).count();
    let queued = queued_inbound_ids(vars).await?;
    let lost = accepted.iter().filter(|id| !queued.contains(*id)).count();
    let ok = lost == 0 && !accepted.is_empty();
    let rate = accepted.len() as f64 / seconds.max(1e-9);
    Ok(json!({
        "bench": "ingest",
        "backend": if vars.contains_key("STAMPEDE_AMQP_URL") { "external" } else { "embedded" },
        "requests": a.requests,
        "concurrency": a.concurrency,
        "accepted": accepted.len(),
        "not_accepted": other,
        "seconds": seconds,
        "rate": rate,
        "ceiling": ceiling,
        "ceiling_what": "durable enqueues/s of the queue alone, same concurrency and size",
        "ratio": rate / ceiling.max(1e-9),
        "latency_ms": latency_json(&lat, "202 answer per request"),
        "peak_rss_mib": peak_rss,
        "queued_after_kill": queued.len(),
        "check": {
            "ok": ok,
            "lost_after_kill": lost,
            "summary": if ok { "ok".to_string() } else { format!("FAILED: {lost} answered 202 but not queued after kill -9 ({} accepted)", accepted.len()) },
        },
    }))
}

/// The activity ids of the inbound jobs left in the queue (after the kill).
async fn queued_inbound_ids(
    vars: &HashMap<&'static str, String>,
) -> anyhow::Result<std::collections::HashSet<String>> {
    let cfg = Config::from_lookup(|k| vars.get(k).cloned())?;
    let backends = stampede_runtime::Backends::open(&cfg, "bench-count").await?;
    let q = backends.queue.clone();
    let mut consumer = q.consume(QueueName::Inbound, 1000).await?;
    let mut ids = std::collections::HashSet::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(3), consumer.next()).await;
        let Ok(Some(Ok(m))) = next else { break };
        if let Ok(job) =
            <stampede_proto::queue::InboundJob as prost::Message>::decode(m.payload.as_ref())
        {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&job.body) {
                if let Some(id) = v.get("id").and_then(|i| i.as_str()) {
                    ids.insert(id.to_string());
                }
            }
        }
        let _ = m.acker.ack().await;
    }
    drop(consumer);
    drop(q);
    drop(backends);
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(ids)
}
