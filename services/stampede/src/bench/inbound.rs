//! `stampede bench inbound`: pre-signed activities from many remote actors
//! through the edge, the queue and verification to the application's
//! stream, per signature scheme with a cold then a warm key cache, against
//! the verification ceiling.
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use stampede_backends::queue::{ready_messages, QueueName};
use stampede_sink::{Sink, SinkOptions};

use super::sampling::{
    latency_json, on_load_thread, peak_rss_mib, process_cpu_secs, reset_peak_rss, threads_cpu_secs,
    verify_ceiling, BenchSink,
};
use super::{deploy, socket_addr, stop, write_json, InboundArgs, Services};
use crate::loadgen;
use crate::scratch::Deployment;

/// Runs `stampede bench inbound`.
pub(super) async fn run(a: InboundArgs) -> anyhow::Result<()> {
    if a.requests == 0 || a.actors == 0 || a.servers == 0 || a.concurrency == 0 {
        bail!("--requests, --actors, --servers and --concurrency must be at least 1");
    }
    if !(a.rate >= 0.0 && a.rate.is_finite()) {
        bail!("--rate must be a number of POSTs a second, or 0");
    }
    println!(
        "stampede bench inbound: {} signed POSTs per run from {} actors on {} servers, backend {:?}",
        a.requests, a.actors, a.servers, a.common.backend
    );
    let (one, all) =
        tokio::task::spawn_blocking(|| verify_ceiling(Duration::from_secs(3))).await??;
    println!("ceiling: RSA-2048 verification (parse + digest + verify): {one:.0}/s on one core, {all:.0}/s on all");
    let sink = BenchSink::start(SinkOptions {
        servers: a.servers,
        count_only: true,
        ..SinkOptions::default()
    })
    .await?;
    let mut runs = Vec::new();
    let mut failure = None;
    for scheme in ["cavage", "rfc9421"] {
        // A deployment of its own per scheme: its key cache starts cold.
        let d = deploy(
            a.common.backend,
            Services::All,
            &[("STAMPEDE_UP_SERVICES", "ingest,inbox".into())],
        )
        .await?;
        let paced = (a.rate > 0.0).then_some(("warm", Some(a.rate)));
        for (cache, rate) in [("cold", None), ("warm", None)].into_iter().chain(paced) {
            match one_run(&a, &d, &sink.sink, scheme, cache, rate, one).await {
                Ok(r) => runs.push(r),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        stop(d).await?;
        if failure.is_some() {
            break;
        }
    }
    sink.stop();
    if let Some(e) = failure {
        return Err(e);
    }
    println!();
    println!(
        "{:<8} {:<5} {:>8} {:>7} {:>8} {:>10} {:>9} {:>6} {:>7} {:>7} {:>8} {:>7} {:>7}  check",
        "scheme",
        "keys",
        "offered",
        "POSTs",
        "seconds",
        "verified/s",
        "ceiling1",
        "ratio",
        "p50 ms",
        "p99 ms",
        "RSS MiB",
        "CPU µs",
        "DB µs"
    );
    for r in &runs {
        let n = |k: &str| r[k].as_f64().unwrap_or(0.0);
        println!(
            "{:<8} {:<5} {:>8} {:>7} {:>8.2} {:>10.0} {:>9.0} {:>6.2} {:>7.1} {:>7.1} {:>8.0} {:>7.0} {:>7.0}  {}",
            r["scheme"].as_str().unwrap_or(""),
            r["key_cache"].as_str().unwrap_or(""),
            r["offered_rate"]
                .as_f64()
                .map_or_else(|| "max".to_string(), |o| format!("{o:.0}/s")),
            n("posts"),
            n("seconds"),
            n("rate"),
            n("ceiling_one_core"),
            n("ratio"),
            r["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
            r["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
            n("peak_rss_mib"),
            n("cpu_us_per_activity"),
            n("db_cpu_us_per_activity"),
            r["check"]["summary"].as_str().unwrap_or("")
        );
    }
    let ok = runs
        .iter()
        .all(|r| r["check"]["ok"].as_bool().unwrap_or(false));
    write_json(
        &a.common.json,
        &json!({
            "bench": "inbound",
            "backend": format!("{:?}", a.common.backend).to_lowercase(),
            "ceiling": {"what": "RSA-2048 cavage parse + digest + verify per second", "one_core": one, "all_cores": all},
            "runs": runs,
        }),
    )?;
    if !ok {
        bail!("correctness check failed");
    }
    Ok(())
}

async fn app_depth(d: &Deployment) -> u64 {
    ready_messages(&*d.process.backends.queue, QueueName::App)
        .await
        .unwrap_or(0)
}

async fn one_run(
    a: &InboundArgs,
    d: &Deployment,
    sink: &Sink,
    scheme: &str,
    cache: &str,
    offered: Option<f64>,
    ceiling_one: f64,
) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}/inbox", d.base);
    let addr = socket_addr(&d.base)?;
    let authority = addr.to_string();
    // Pre-signed: signing is the remote servers' work, not measured.
    let mut requests = Vec::with_capacity(a.requests);
    let tag = uuid::Uuid::new_v4().simple().to_string();
    for n in 0..a.requests {
        let actor = n % a.actors;
        let server = actor % a.servers;
        let name = format!("a{actor}");
        let me = sink.actor(server, &name).context("sink server")?;
        let body = json!({
            "@context": "https://www.w3.org/ns/activitystreams",
            "id": format!("{}/likes/{tag}-{n}", me.id),
            "type": "Like",
            "actor": me.id,
            "object": format!("{}/notes/1", d.base),
        })
        .to_string()
        .into_bytes();
        let headers = if scheme == "cavage" {
            sink.signed_headers(server, &name, &url, &body).await?
        } else {
            sink.signed_headers_rfc9421(server, &name, &url, &body)?
        };
        requests.push(loadgen::post(&authority, "/inbox", &headers, &body));
    }
    let accepted_before = d.process.metrics.inbound_count("verify", "accepted");
    let depth_before = app_depth(d).await;
    reset_peak_rss();
    match offered {
        Some(r) => println!("  {scheme} {cache}: {} POSTs at {r:.0}/s", a.requests),
        None => println!("  {scheme} {cache}: {} POSTs", a.requests),
    }
    let cpu_before = process_cpu_secs();
    let db_before = threads_cpu_secs("stampede-db-");
    let started = Instant::now();
    let load_before = threads_cpu_secs("stampede-load");
    let results = on_load_thread(loadgen::run(addr, requests, a.concurrency, offered)).await?;
    let load_cpu = threads_cpu_secs("stampede-load") - load_before;
    let edge_secs = started.elapsed().as_secs_f64();
    let want = depth_before + a.requests as u64;
    let deadline = started + Duration::from_secs(a.common.timeout_secs);
    while app_depth(d).await < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = process_cpu_secs() - cpu_before;
    let db_cpu = threads_cpu_secs("stampede-db-") - db_before;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let delivered = app_depth(d).await - depth_before;
    let accepted = d.process.metrics.inbound_count("verify", "accepted") - accepted_before;
    let not_202 = results.iter().filter(|(s, _)| *s != 202).count();
    // Open loop: the worst latency of each 50 ms of the schedule, which
    // tells a stall (a few windows) from a slow steady state (all of them).
    let worst_by_50ms: Option<Vec<f64>> = offered.map(|rate| {
        let mut worst = Vec::new();
        for (i, (_, ms)) in results.iter().enumerate() {
            let w = (i as f64 / rate / 0.05) as usize;
            if worst.len() <= w {
                worst.resize(w + 1, 0.0);
            }
            worst[w] = f64::max(worst[w], (*ms * 10.0).round() / 10.0);
        }
        worst
    });
    let mut lat: Vec<f64> = results.iter().map(|(_, ms)| *ms).collect();
    lat.sort_by(|x, y| x.total_cmp(y));
    let ok = not_202 == 0 && accepted == a.requests as u64 && delivered == a.requests as u64;
    let rate = a.requests as f64 / seconds.max(1e-9);
    Ok(json!({
        "scheme": scheme,
        "key_cache": cache,
        "offered_rate": offered,
        "load": match offered {
            Some(r) => format!("open loop: {r:.0} POSTs a second over {} connections; latency from when each was due", a.concurrency),
            None => format!("closed loop: {} in flight", a.concurrency),
        },
        "posts": a.requests,
        "seconds": seconds,
        "edge_seconds": edge_secs,
        "rate": rate,
        "ceiling_one_core": ceiling_one,
        "ratio": rate / ceiling_one.max(1e-9),
        "cpu_us_per_activity": cpu * 1e6 / a.requests as f64,
        "db_cpu_us_per_activity": db_cpu * 1e6 / a.requests as f64,
        "load_cpu_us_per_activity": load_cpu * 1e6 / a.requests as f64,
        "latency_ms": latency_json(&lat, "edge answer (202) per request"),
        "latency_max_ms_per_50ms": worst_by_50ms,
        "peak_rss_mib": peak_rss_mib(),
        "check": {
            "ok": ok,
            "not_202": not_202,
            "verified_accepted": accepted,
            "on_application_stream": delivered,
            "summary": if ok { "ok".to_string() } else { format!("FAILED: {not_202} not 202, {accepted} accepted, {delivered} on the stream of {}", a.requests) },
        },
    }))
}
