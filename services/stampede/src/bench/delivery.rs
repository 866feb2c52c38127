//! `stampede bench delivery`: one Create to many followers on fake servers,
//! signed POSTs a second against the signing ceiling; nothing lost, nothing
//! duplicated, every signature the servers checked valid.
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use stampede_backends::store::Follower;
use stampede_sink::{Sink, SinkOptions};

use super::sampling::{
    latency_json, peak_rss_mib, process_cpu_secs, reset_peak_rss, signing_ceiling,
    threads_cpu_secs, BenchSink,
};
use super::{bench_actor, deploy, publish_note, stop, write_json, DeliveryArgs, Mode, Services};
use crate::scratch::Deployment;

/// Runs `stampede bench delivery`.
pub(super) async fn run(a: DeliveryArgs) -> anyhow::Result<()> {
    if a.followers == 0 || a.hosts == 0 {
        bail!("--followers and --hosts must be at least 1");
    }
    // Each fake host holds a listener and an accepted connection, and
    // delivery's pool a connection to it: three descriptors a host.
    let (soft, _) = rlimit::Resource::NOFILE.get()?;
    let wanted = 3 * a.hosts as u64 + 512;
    if wanted > soft {
        bail!(
            "--hosts {} needs about {wanted} open files (a listener, an accepted and a pooled \
             connection per host) but the limit is {soft}: raise it (ulimit -Hn) or use fewer hosts",
            a.hosts
        );
    }
    println!(
        "stampede bench delivery: one Create to {} followers on {} hosts, backend {:?}",
        a.followers, a.hosts, a.common.backend
    );
    let (one, all, cores) =
        tokio::task::spawn_blocking(|| signing_ceiling(Duration::from_secs(3))).await??;
    println!(
        "ceiling: RSA-2048 signing with aws-lc-rs: {one:.0}/s on one core, {all:.0}/s on all {cores} cores"
    );
    let modes = match a.mode {
        Mode::Both => vec![Mode::Personal, Mode::Shared],
        m => vec![m],
    };
    let mut runs = Vec::new();
    let mut ok = true;
    for mode in modes {
        let r = one_mode(&a, mode, all).await?;
        ok &= r["check"]["ok"].as_bool().unwrap_or(false);
        runs.push(r);
    }
    println!();
    println!(
        "{:<9} {:>7} {:>8} {:>9} {:>9} {:>6} {:>7} {:>7} {:>7} {:>8} {:>8} {:>6}  check",
        "mode",
        "POSTs",
        "seconds",
        "POSTs/s",
        "ceiling",
        "ratio",
        "p50 ms",
        "p99 ms",
        "max ms",
        "RSS MiB",
        "sink CPU",
        "sign %"
    );
    for r in &runs {
        println!(
            "{:<9} {:>7} {:>8.2} {:>9.0} {:>9.0} {:>6.2} {:>7.0} {:>7.0} {:>7.0} {:>8.0} {:>7.1}s {:>5.0}%  {}",
            r["mode"].as_str().unwrap_or(""),
            r["posts"],
            r["seconds"].as_f64().unwrap_or(0.0),
            r["rate"].as_f64().unwrap_or(0.0),
            r["ceiling"].as_f64().unwrap_or(0.0),
            r["ratio"].as_f64().unwrap_or(0.0),
            r["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
            r["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
            r["latency_ms"]["max"].as_f64().unwrap_or(0.0),
            r["peak_rss_mib"].as_f64().unwrap_or(0.0),
            r["sink_cpu_secs"].as_f64().unwrap_or(0.0),
            r["signing_share"].as_f64().unwrap_or(0.0) * 100.0,
            r["check"]["summary"].as_str().unwrap_or("")
        );
    }
    write_json(
        &a.common.json,
        &json!({
            "bench": "delivery",
            "backend": format!("{:?}", a.common.backend).to_lowercase(),
            "followers": a.followers,
            "hosts": a.hosts,
            "ceiling": {
                "what": "RSA-2048 PKCS#1 v1.5 SHA-256 signatures/s, aws-lc-rs",
                "one_core": one,
                "all_cores": all,
                "cores": cores,
                "cpu_us_per_signature": cores as f64 * 1e6 / all.max(1e-9),
            },
            "runs": runs,
        }),
    )?;
    if !ok {
        bail!("correctness check failed");
    }
    Ok(())
}

async fn one_mode(a: &DeliveryArgs, mode: Mode, ceiling: f64) -> anyhow::Result<serde_json::Value> {
    let shared = mode == Mode::Shared;
    let d = deploy(
        a.common.backend,
        Services::All,
        &[
            ("STAMPEDE_PREFETCH", a.prefetch.to_string()),
            ("STAMPEDE_LOG_FORMAT", "text".into()),
            ("STAMPEDE_SIGNATURE_STYLE", a.signature_style.clone()),
        ],
    )
    .await?;
    let sink = BenchSink::start(SinkOptions {
        servers: a.hosts,
        shared_inbox: Arc::new(move |_| shared),
        verify_every: a.verify_every,
        count_only: true,
        ..SinkOptions::default()
    })
    .await?;
    let result = measure(a, mode, ceiling, &d, &sink.sink).await;
    sink.stop();
    stop(d).await?;
    result
}

async fn measure(
    a: &DeliveryArgs,
    mode: Mode,
    ceiling: f64,
    d: &Deployment,
    sink: &Sink,
) -> anyhow::Result<serde_json::Value> {
    let (channel, actor) = bench_actor(d, "bench").await?;
    let store = d.process.backends.store.clone();
    // Followers: u{j} on server j % hosts.
    let mut followers = Vec::with_capacity(a.followers);
    for j in 0..a.followers {
        let f = sink
            .actor(j % a.hosts, &format!("u{j}"))
            .context("sink server")?;
        followers.push(Follower {
            actor: f.id,
            inbox: f.inbox,
            shared_inbox: f.shared_inbox,
            host: f.host,
            follow_id: None,
        });
    }
    store.add_followers(actor.id, &followers).await?;
    // Expected copies per server: the distinct targets.
    let mut expected: Vec<std::collections::HashSet<String>> = vec![Default::default(); a.hosts];
    for (j, f) in followers.iter().enumerate() {
        let target = f.shared_inbox.clone().unwrap_or_else(|| f.inbox.clone());
        let path = url::Url::parse(&target)?.path().to_string();
        expected[j % a.hosts].insert(path);
    }
    let total: usize = expected.iter().map(|e| e.len()).sum();
    println!(
        "{}: {} followers seeded; publishing (expect {total} POSTs)",
        if mode == Mode::Shared {
            "shared"
        } else {
            "personal"
        },
        a.followers
    );
    let cpu_before = threads_cpu_secs("stampede-sink");
    let (sign_before, all_before) = (threads_cpu_secs("stampede-sign-"), process_cpu_secs());
    reset_peak_rss();
    let started = Instant::now();
    let id = publish_note(channel, d, "bench", "benchmark").await?;
    let deadline = started + Duration::from_secs(a.common.timeout_secs);
    let mut last = Instant::now();
    while sink.total_received() < total {
        if Instant::now() > deadline {
            break;
        }
        if last.elapsed() > Duration::from_secs(2) {
            println!(
                "  {} of {total} POSTs after {:.1} s",
                sink.total_received(),
                started.elapsed().as_secs_f64()
            );
            last = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let polled = started.elapsed().as_secs_f64();
    let sign_cpu = threads_cpu_secs("stampede-sign-") - sign_before;
    let all_cpu = process_cpu_secs() - all_before;
    // Anything more (a duplicate) would come soon after.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sink_cpu = threads_cpu_secs("stampede-sink") - cpu_before;
    let mut lost = 0usize;
    let mut duplicated = 0usize;
    for (i, want) in expected.iter().enumerate() {
        let got = sink.accepted_copies(i);
        for path in want {
            match got.get(&(path.clone(), id.clone())) {
                None => lost += 1,
                Some(n) => duplicated += (*n as usize).saturating_sub(1),
            }
        }
    }
    let unverified = sink.total_unverified();
    let mut lat: Vec<f64> = sink
        .arrivals()
        .into_iter()
        .map(|t| t.saturating_duration_since(started).as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(|x, y| x.total_cmp(y));
    // Until the last POST arrived, not until the 5 ms poll above saw it (a
    // few percent of a shared-inbox run). The CPU figures span the poll.
    let seconds = match lat.last() {
        Some(ms) if lat.len() >= total => ms / 1000.0,
        _ => polled,
    };
    let rate = total as f64 / seconds.max(1e-9);
    let us_per_post = 1e6 / total.max(1) as f64;
    let ok = lost == 0 && duplicated == 0 && unverified == 0;
    let summary = if ok {
        "ok".to_string()
    } else {
        format!("FAILED: {lost} lost, {duplicated} duplicated, {unverified} unverified")
    };
    Ok(json!({
        "mode": if mode == Mode::Shared { "shared" } else { "personal" },
        "posts": total,
        "seconds": seconds,
        "rate": rate,
        "ceiling": ceiling,
        "ratio": rate / ceiling.max(1e-9),
        "latency_ms": latency_json(&lat, "from Publish to arrival at the server"),
        "peak_rss_mib": peak_rss_mib(),
        "sink_cpu_secs": sink_cpu,
        "sink_verified_every": a.verify_every,
        "signature_style": a.signature_style,
        "signing_cpu_secs": sign_cpu,
        "process_cpu_secs": all_cpu,
        "signing_share": sign_cpu / all_cpu.max(1e-9),
        // Where the run's CPU went per POST: a signature here against the
        // ceiling's `cpu_us_per_signature` shows what the neighbours and the
        // preemptions took; `other` is all the rest (HTTP on both ends, the
        // queue and the store, the fake servers included).
        "cpu_us_per_post": {
            "signing": sign_cpu * us_per_post,
            "other": (all_cpu - sign_cpu) * us_per_post,
            "sink": sink_cpu * us_per_post,
        },
        "check": {"ok": ok, "lost": lost, "duplicated": duplicated, "unverified": unverified, "summary": summary},
    }))
}
