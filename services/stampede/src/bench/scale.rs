//! `stampede bench scale`: does delivery scale with its processes? Remote
//! servers that all answer after a fixed delay (latency-bound work: a
//! process holds at most `STAMPEDE_PREFETCH` deliveries in flight, so one
//! does at most prefetch / delay a second), one Create to many followers,
//! delivered by 1, 2, 4… `stampede serve delivery` processes of this binary
//! on RabbitMQ/Redis/PostgreSQL. Per run: the steady-state deliveries a
//! second (from the servers' receipts, the middle 80 % of them), the ratio
//! to the first run against a target, and what the broker spent: CPU and
//! resident memory of its VMs (the processes listening on the AMQP ports,
//! all nodes of a cluster with `--broker-ports`) per delivery. Fails when a
//! delivery was lost or duplicated, a delivery process exited, or a target
//! was missed.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use stampede_backends::store::Follower;
use stampede_sink::{Behavior, Sink};

use super::influx::spawn_replica;
use super::sampling::{cpu_secs_of, listening_pids, rss_mib_of};
use super::{
    bench_actor, deployment_and_sink, publish_note, scratch, stop, stop_replicas, write_json,
    BackendKind, ScaleArgs,
};
use crate::scratch::Deployment;

/// Followers seeded per store call.
const SEED_CHUNK: usize = 2_000;

/// `--targets 2=1.8,4=3.4`: the least ratio to the first run per number of
/// processes.
pub(super) fn parse_targets(s: &str) -> anyhow::Result<Vec<(usize, f64)>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            let (n, r) = t
                .split_once('=')
                .with_context(|| format!("target {t:?}: PROCESSES=RATIO, as 2=1.8"))?;
            let n: usize = n.trim().parse().with_context(|| format!("target {t:?}"))?;
            let r: f64 = r.trim().parse().with_context(|| format!("target {t:?}"))?;
            if n == 0 || !(r.is_finite() && r >= 0.0) {
                bail!("target {t:?}: at least one process, a ratio of 0 or more");
            }
            Ok((n, r))
        })
        .collect()
}

fn validate(a: &ScaleArgs) -> anyhow::Result<Vec<(usize, f64)>> {
    if a.common.backend != BackendKind::External {
        bail!("bench scale needs --backend external (delivery processes share RabbitMQ, Redis and PostgreSQL)");
    }
    if a.replicas.is_empty() || a.replicas.contains(&0) {
        bail!("--replicas: one or more numbers of delivery processes, each at least 1");
    }
    if a.followers < 10 || a.hosts == 0 || a.host_limit == 0 || a.prefetch == 0 {
        bail!("--followers at least 10; --hosts, --host-limit and --prefetch at least 1");
    }
    let (soft, _) = rlimit::Resource::NOFILE.get()?;
    // A listener and accepted connections per fake host, a pooled
    // connection per host in each delivery process (its own limit).
    let wanted = 2 * a.hosts as u64 + 512;
    if wanted > soft {
        bail!(
            "--hosts {} needs about {wanted} open files but the limit is {soft}: raise it (ulimit -Hn) or use fewer hosts",
            a.hosts
        );
    }
    parse_targets(&a.targets)
}

/// The broker's VMs: the processes listening on the AMQP URLs' ports (a
/// comma-separated list for a cluster) and on `--broker-ports`.
fn broker_pids(a: &ScaleArgs) -> Vec<u32> {
    let mut ports: Vec<u16> = std::env::var("STAMPEDE_AMQP_URL")
        .unwrap_or_default()
        .split(',')
        .filter_map(|u| url::Url::parse(u.trim()).ok())
        .map(|u| u.port().unwrap_or(5672))
        .collect();
    ports.extend(a.broker_ports.iter().copied());
    ports.sort_unstable();
    ports.dedup();
    listening_pids(&ports)
}

/// Runs `stampede bench scale`.
pub(super) async fn run(a: ScaleArgs) -> anyhow::Result<()> {
    let targets = validate(&a)?;
    let brokers = broker_pids(&a);
    let max_rate = a.prefetch as f64 * 1000.0 / a.slow_ms.max(1) as f64;
    println!(
        "stampede bench scale: one Create to {} followers on {} hosts answering after {} ms; \
         delivery as {:?} processes, prefetch {} (at most {max_rate:.0}/s a process), host limit {}; \
         broker VMs {:?}",
        a.followers, a.hosts, a.slow_ms, a.replicas, a.prefetch, a.host_limit, brokers
    );
    let mut runs: Vec<serde_json::Value> = Vec::new();
    for &n in &a.replicas {
        let mut r = one_run(&a, n, &brokers).await?;
        let base = runs
            .first()
            .unwrap_or(&r)
            .get("rate")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0);
        let rate = r["rate"].as_f64().unwrap_or(0.0);
        let ratio = rate / base.max(1e-9);
        r["ratio"] = json!(ratio);
        let target = targets.iter().find(|(p, _)| *p == n).map(|(_, t)| *t);
        r["target_ratio"] = json!(target);
        if let Some(t) = target {
            if ratio < t {
                let summary = format!(
                    "{}; ratio {ratio:.2} below its target {t}",
                    r["check"]["summary"].as_str().unwrap_or("")
                );
                r["check"]["ok"] = json!(false);
                r["check"]["summary"] = json!(summary.trim_start_matches("ok; "));
            }
        }
        runs.push(r);
    }
    print_table(&runs);
    let ok = runs.iter().all(|r| r["check"]["ok"] == json!(true));
    write_json(
        &a.common.json,
        &json!({
            "bench": "scale",
            "backend": "external",
            "followers": a.followers,
            "hosts": a.hosts,
            "slow_ms": a.slow_ms,
            "prefetch": a.prefetch,
            "host_limit": a.host_limit,
            "latency_bound_rate_per_process": max_rate,
            "broker_pids": brokers,
            "check": {"ok": ok},
            "runs": runs,
        }),
    )?;
    if !ok {
        bail!("correctness check failed");
    }
    Ok(())
}

fn print_table(runs: &[serde_json::Value]) {
    println!();
    println!(
        "{:>9} {:>10} {:>8} {:>11} {:>6} {:>7} {:>12} {:>12} {:>10} {:>12} {:>9}  check",
        "processes",
        "deliveries",
        "seconds",
        "steady /s",
        "ratio",
        "target",
        "broker µs/d",
        "broker MiB",
        "B/delivery",
        "delivery µs/d",
        "pg µs/d",
    );
    for r in runs {
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
        println!(
            "{:>9} {:>10} {:>8.2} {:>11.1} {:>6.2} {:>7} {:>12.0} {:>12.1} {:>10.0} {:>12.0} {:>9.0}  {}",
            r["replicas"].as_u64().unwrap_or(0),
            r["deliveries"].as_u64().unwrap_or(0),
            f(&r["seconds"]),
            f(&r["rate"]),
            f(&r["ratio"]),
            r["target_ratio"]
                .as_f64()
                .map_or("-".to_string(), |t| format!("{t:.2}")),
            f(&r["broker"]["cpu_us_per_delivery"]),
            f(&r["broker"]["rss_mib_peak"]),
            f(&r["broker"]["rss_growth_bytes_per_delivery"]),
            f(&r["delivery_cpu_us_per_delivery"]),
            f(&r["postgres"]["cpu_us_per_delivery"]),
            r["check"]["summary"].as_str().unwrap_or("")
        );
    }
}

/// Broker CPU seconds and resident MiB, summed over its VMs.
fn broker_now(pids: &[u32]) -> (f64, f64) {
    pids.iter().fold((0.0, 0.0), |(c, m), p| {
        (
            c + cpu_secs_of(&p.to_string()),
            m + rss_mib_of(&p.to_string()),
        )
    })
}

/// CPU seconds of every PostgreSQL process on this machine (the server's
/// backends live as long as the pools' connections).
fn postgres_cpu() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "postgres")
        })
        .map(|p| cpu_secs_of(&p))
        .sum()
}

/// One run with `n` delivery processes, on backends of its own.
async fn one_run(a: &ScaleArgs, n: usize, brokers: &[u32]) -> anyhow::Result<serde_json::Value> {
    let settings: Vec<(&'static str, String)> = vec![
        ("STAMPEDE_PREFETCH", a.prefetch.to_string()),
        ("STAMPEDE_HOST_CONCURRENCY", a.host_limit.to_string()),
        // One class: the whole audience's posts are normal, not bulk.
        ("STAMPEDE_BULK_AUDIENCE", (a.followers + 1).to_string()),
        ("STAMPEDE_LOG_FORMAT", "text".into()),
    ];
    let (vars, scratch) = scratch(a.common.backend).await?;
    let mut replica_env = vars.clone();
    replica_env.extend(settings.iter().cloned());
    let here = settings
        .into_iter()
        .chain([("STAMPEDE_UP_SERVICES", "ingest,inbox,fanout".to_string())]);
    let (d, sink) = deployment_and_sink(
        scratch,
        vars.into_iter().chain(here),
        a.hosts,
        a.verify_every,
    )
    .await?;
    let mut replicas = Vec::new();
    let result = async {
        for i in 0..a.hosts {
            sink.sink
                .set_behavior(i, Behavior::Slow(Duration::from_millis(a.slow_ms)))?;
        }
        for _ in 0..n {
            replicas.push(spawn_replica(&replica_env, &d.base)?);
        }
        measure(a, n, &d, &sink.sink, &replicas, brokers).await
    }
    .await;
    let exited = stop_replicas(replicas).await;
    sink.stop();
    stop(d).await?;
    let mut r = result?;
    if !exited.is_empty() {
        r["check"]["ok"] = json!(false);
        r["check"]["summary"] = json!(format!(
            "delivery processes exited early: {}",
            exited.join(", ")
        ));
    }
    Ok(r)
}

async fn measure(
    a: &ScaleArgs,
    n: usize,
    d: &Deployment,
    sink: &Sink,
    replicas: &[tokio::process::Child],
    brokers: &[u32],
) -> anyhow::Result<serde_json::Value> {
    let (channel, actor) = bench_actor(d, "scale").await?;
    let store = d.process.backends.store.clone();
    let mut batch = Vec::with_capacity(SEED_CHUNK);
    for j in 0..a.followers {
        let f = sink
            .actor(j % a.hosts, &format!("u{j}"))
            .context("sink server")?;
        batch.push(Follower {
            actor: f.id,
            inbox: f.inbox,
            shared_inbox: None,
            host: f.host,
            follow_id: None,
        });
        if batch.len() == SEED_CHUNK || j + 1 == a.followers {
            store.add_followers(actor.id, &batch).await?;
            batch.clear();
        }
    }
    // Every delivery process consuming every class before the work comes.
    let queue = d.process.backends.queue.clone();
    let ready_by = Instant::now() + Duration::from_secs(60);
    loop {
        let depths = queue.depths().await?;
        let consumers = depths
            .iter()
            .filter(|q| q.name.delivery_class().is_some())
            .map(|q| q.consumers)
            .min()
            .unwrap_or(0);
        if consumers >= n as u64 {
            break;
        }
        if Instant::now() > ready_by {
            bail!("{n} delivery processes did not all consume within 60 s ({consumers} did)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pids: Vec<String> = replicas
        .iter()
        .filter_map(|c| c.id())
        .map(|p| p.to_string())
        .collect();
    let delivery_cpu = || pids.iter().map(|p| cpu_secs_of(p)).sum::<f64>();
    let delivery_before = delivery_cpu();
    // The broker's and PostgreSQL's idle CPU over a second, taken off what
    // the run used (both run background work: Raft ticks, checkpoints).
    let (idle_broker, idle_pg) = {
        let (b0, p0) = (broker_now(brokers).0, postgres_cpu());
        tokio::time::sleep(Duration::from_secs(1)).await;
        (broker_now(brokers).0 - b0, postgres_cpu() - p0)
    };
    let pg_before = postgres_cpu();
    let (cpu_before, rss_before) = broker_now(brokers);
    let mut rss_peak = rss_before;
    println!(
        "{n} delivery process(es): {} followers seeded; publishing",
        a.followers
    );
    let started = Instant::now();
    let id = publish_note(channel, d, "scale", "scale").await?;
    let deadline = started + Duration::from_secs(a.common.timeout_secs);
    let mut last = Instant::now();
    while sink.total_received() < a.followers && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss_peak = rss_peak.max(broker_now(brokers).1);
        if last.elapsed() > Duration::from_secs(3) {
            println!(
                "  {} of {} after {:.1} s",
                sink.total_received(),
                a.followers,
                started.elapsed().as_secs_f64()
            );
            last = Instant::now();
        }
    }
    let (cpu_after, rss_after) = broker_now(brokers);
    let run_secs = started.elapsed().as_secs_f64();
    let pg_cpu_secs = (postgres_cpu() - pg_before - idle_pg * run_secs).max(0.0);
    let broker_cpu_secs = (cpu_after - cpu_before - idle_broker * run_secs).max(0.0);
    let delivery_cpu_secs = delivery_cpu() - delivery_before;
    // A duplicate would come soon after.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut lost = 0usize;
    let mut duplicated = 0usize;
    let mut want: HashMap<usize, Vec<String>> = HashMap::new();
    for j in 0..a.followers {
        want.entry(j % a.hosts)
            .or_default()
            .push(format!("/users/u{j}/inbox"));
    }
    for (host, paths) in &want {
        let got = sink.accepted_copies(*host);
        for p in paths {
            match got.get(&(p.clone(), id.clone())) {
                None => lost += 1,
                Some(c) => duplicated += (*c as usize).saturating_sub(1),
            }
        }
    }
    let unverified = sink.total_unverified();
    // The servers' answers, in order: the steady state is the middle 80 %
    // (the first processes' start and the last stragglers left out).
    let mut at: Vec<f64> = sink
        .arrivals()
        .into_iter()
        .map(|t| t.saturating_duration_since(started).as_secs_f64())
        .collect();
    at.sort_by(|x, y| x.total_cmp(y));
    let (rate, window) = steady_rate(&at);
    let deliveries = at.len();
    let per = 1.0 / deliveries.max(1) as f64;
    let ok = lost == 0 && duplicated == 0 && unverified == 0;
    let summary = if ok {
        "ok".to_string()
    } else {
        format!("FAILED: {lost} lost, {duplicated} duplicated, {unverified} unverified")
    };
    Ok(json!({
        "replicas": n,
        "deliveries": deliveries,
        "seconds": at.last().copied().unwrap_or(0.0),
        "rate": rate,
        "rate_what": "deliveries/s between the 10th and the 90th percentile of the servers' answers",
        "steady_window_secs": window,
        "first_answer_secs": at.first().copied().unwrap_or(0.0),
        "broker": {
            "pids": brokers,
            "cpu_secs": broker_cpu_secs,
            "cpu_us_per_delivery": broker_cpu_secs * 1e6 * per,
            "idle_cpu_per_sec": idle_broker,
            "rss_mib_before": rss_before,
            "rss_mib_peak": rss_peak,
            "rss_mib_after": rss_after,
            "rss_growth_bytes_per_delivery": (rss_peak - rss_before).max(0.0) * 1048576.0 * per,
        },
        "postgres": {
            "cpu_secs": pg_cpu_secs,
            "cpu_us_per_delivery": pg_cpu_secs * 1e6 * per,
            "idle_cpu_per_sec": idle_pg,
        },
        "delivery_cpu_secs": delivery_cpu_secs,
        "delivery_cpu_us_per_delivery": delivery_cpu_secs * 1e6 * per,
        "check": {"ok": ok, "lost": lost, "duplicated": duplicated, "unverified": unverified, "summary": summary},
    }))
}

/// Deliveries a second between the 10th and the 90th percentile of sorted
/// answer times, and that window's length; over the whole run when it is
/// too short to cut.
fn steady_rate(sorted: &[f64]) -> (f64, f64) {
    let n = sorted.len();
    if n < 10 {
        let w = sorted.last().copied().unwrap_or(0.0);
        return (n as f64 / w.max(1e-9), w);
    }
    let (lo, hi) = (n / 10, n - 1 - n / 10);
    let w = sorted[hi] - sorted[lo];
    ((hi - lo) as f64 / w.max(1e-9), w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_the_steady_rate_leaves_the_ends_out() {
        assert_eq!(
            parse_targets("2=1.8, 4=3.4").unwrap(),
            vec![(2, 1.8), (4, 3.4)]
        );
        assert!(parse_targets("").unwrap().is_empty());
        assert!(parse_targets("2").is_err());
        assert!(parse_targets("0=1").is_err());
        // 100 answers 0.1 s apart after a slow start and before a straggler.
        let mut at: Vec<f64> = (0..100).map(|i| 5.0 + i as f64 * 0.1).collect();
        at[0] = 0.0;
        at[99] = 60.0;
        let (rate, window) = steady_rate(&at);
        // The 11th (6.0 s) to the 90th (13.9 s): 79 answers in 7.9 s.
        assert!((window - 7.9).abs() < 1e-9, "{window}");
        assert!((rate - 10.0).abs() < 1e-9, "{rate}");
    }
}
