//! `stampede bench fanout`: one activity to a million followers, the time
//! until every delivery job is queued against reading every target from the
//! store alone; exactly one job per target.
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use stampede_backends::queue::{ready_messages, QueueName};
use stampede_backends::store::{Follower, NewActor, PrivateKey};
use stampede_core::activity::public_note;

use super::sampling::{peak_rss_mib, reset_peak_rss};
use super::{deploy, stop, write_json, FanoutArgs, Services};
use crate::scratch::Deployment;

/// RabbitMQ's memory per message of a queue, from `rabbitmqctl` on this
/// machine (external backend only; `None` when it cannot be asked).
async fn broker_bytes_per_message(d: &Deployment, q: QueueName) -> Option<f64> {
    let amqp = &d.scratch.external()?.amqp;
    let namespace = d.scratch.namespace();
    let vhost = url::Url::parse(amqp).ok().map(|u| {
        let p = u.path().trim_start_matches('/').to_string();
        if p.is_empty() {
            "/".to_string()
        } else {
            p.replace("%2f", "/").replace("%2F", "/")
        }
    })?;
    let out = tokio::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "-p",
            &vhost,
            "name",
            "messages",
            "memory",
        ])
        .output()
        .await
        .ok()?;
    let want = format!("{namespace}.{}", q.suffix());
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            [name, messages, memory] if *name == want => {
                let (m, b): (f64, f64) = (messages.parse().ok()?, memory.parse().ok()?);
                (m > 0.0).then(|| b / m)
            }
            _ => None,
        }
    })
}

/// Runs `stampede bench fanout`.
pub(super) async fn run(a: FanoutArgs) -> anyhow::Result<()> {
    if a.followers == 0 || a.hosts == 0 {
        bail!("--followers and --hosts must be at least 1");
    }
    println!(
        "stampede bench fanout: one activity to {} followers on {} hosts, backend {:?}",
        a.followers, a.hosts, a.common.backend
    );
    // Fanout alone, nothing draining its jobs: no bound on the bulk queue
    // (the bench measures expansion, not backpressure).
    let no_bound = [("STAMPEDE_BULK_QUEUE_BOUND", "0".to_string())];
    let d = deploy(a.common.backend, Services::FanoutOnly, &no_bound).await?;
    let result = measure(&a, &d).await;
    stop(d).await?;
    let r = result?;
    println!();
    println!(
        "{:>9} {:>7} {:>8} {:>11} {:>14} {:>6} {:>8} {:>9} {:>12}  check",
        "followers",
        "targets",
        "seconds",
        "followers/s",
        "ceiling (scan)",
        "ratio",
        "RSS MiB",
        "job bytes",
        "broker B/msg"
    );
    let n = |k: &str| r[k].as_f64().unwrap_or(0.0);
    println!(
        "{:>9} {:>7} {:>8.2} {:>11.0} {:>14.0} {:>6.2} {:>8.0} {:>9} {:>12}  {}",
        n("followers"),
        n("targets"),
        n("seconds"),
        n("rate"),
        n("ceiling"),
        n("ratio"),
        n("peak_rss_mib"),
        n("job_bytes"),
        r["broker_bytes_per_message"]
            .as_f64()
            .map_or("-".to_string(), |b| format!("{b:.0}")),
        r["check"]["summary"].as_str().unwrap_or("")
    );
    write_json(&a.common.json, &r)?;
    if !r["check"]["ok"].as_bool().unwrap_or(false) {
        bail!("correctness check failed");
    }
    Ok(())
}

async fn measure(a: &FanoutArgs, d: &Deployment) -> anyhow::Result<serde_json::Value> {
    let store = d.process.backends.store.clone();
    let key = tokio::task::spawn_blocking(stampede_core::keys::generate_rsa_2048).await??;
    let actor = store
        .create_actor(NewActor {
            name: "bench".into(),
            display_name: String::new(),
            summary: String::new(),
            manually_approves_followers: false,
            private_key: PrivateKey(key.private_pkcs8_der),
            public_key_pem: key.public_pem,
        })
        .await?;
    let seeding = Instant::now();
    let chunk = 20_000;
    let mut j = 0;
    while j < a.followers {
        let end = (j + chunk).min(a.followers);
        let batch: Vec<Follower> = (j..end)
            .map(|k| {
                let h = k % a.hosts;
                Follower {
                    actor: format!("https://h{h}.bench.example/users/u{k}"),
                    inbox: format!("https://h{h}.bench.example/users/u{k}/inbox"),
                    shared_inbox: Some(format!("https://h{h}.bench.example/inbox")),
                    host: format!("h{h}.bench.example"),
                    follow_id: None,
                }
            })
            .collect();
        store.add_followers(actor.id, &batch).await?;
        j = end;
    }
    let targets = a.hosts.min(a.followers);
    println!(
        "{} followers seeded in {:.1} s",
        a.followers,
        seeding.elapsed().as_secs_f64()
    );
    // Ceiling: reading every distinct target from the store, alone.
    let scan = Instant::now();
    let mut after: Option<String> = None;
    let mut scanned = 0usize;
    loop {
        let page = store
            .follower_targets(actor.id, after.as_deref(), stampede_fanout::PAGE)
            .await?;
        scanned += page.len();
        let done = page.len() < stampede_fanout::PAGE as usize;
        after = page.last().cloned();
        if done {
            break;
        }
    }
    let scan_secs = scan.elapsed().as_secs_f64();
    if scanned != targets {
        bail!("store scan found {scanned} targets, expected {targets}");
    }
    reset_peak_rss();
    let rss_before = peak_rss_mib();
    let body = public_note(&format!("{}/users/bench", d.base), "to a million").to_string();
    let started = Instant::now();
    let published = stampede_federation::publish::publish(
        &d.process.cfg,
        &d.process.backends,
        &actor.to_ref(),
        body.as_bytes(),
        None,
    )
    .await?;
    let deadline = started + Duration::from_secs(a.common.timeout_secs);
    // The class's queue its jobs go to (bulk beyond STAMPEDE_BULK_AUDIENCE).
    let followers = Some(a.followers as u64);
    let class = stampede_fanout::classify(&d.process.cfg, "Create", 0, followers);
    let queue = QueueName::delivery(class);
    let depth = || async {
        ready_messages(&*d.process.backends.queue, queue)
            .await
            .unwrap_or(0)
    };
    let mut queued = 0;
    while Instant::now() < deadline {
        queued = depth().await;
        if queued >= targets as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    // Late duplicates would show up now.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let final_depth = depth().await;
    let job = stampede_proto::queue::DeliveryJob {
        activity_key: published.inserted.key.clone(),
        inbox: format!("https://h{}.bench.example/inbox", a.hosts - 1),
        ..Default::default()
    };
    let job_bytes = prost::Message::encoded_len(&job);
    let broker = broker_bytes_per_message(d, queue).await;
    let ok = final_depth == targets as u64;
    let rate = a.followers as f64 / seconds.max(1e-9);
    let ceiling = a.followers as f64 / scan_secs.max(1e-9);
    Ok(json!({
        "bench": "fanout",
        "backend": format!("{:?}", a.common.backend).to_lowercase(),
        "followers": a.followers,
        "hosts": a.hosts,
        "targets": targets,
        "seconds": seconds,
        "rate": rate,
        "ceiling": ceiling,
        "ceiling_what": "followers/s of reading every distinct target from the store alone",
        "ratio": rate / ceiling.max(1e-9),
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_mib": rss_before,
        "job_bytes": job_bytes,
        "broker_bytes_per_message": broker,
        "check": {
            "ok": ok,
            "queued": final_depth,
            "expected": targets,
            "summary": if ok { "ok".to_string() } else { format!("FAILED: {final_depth} jobs queued, {targets} expected (reached {queued} in time)") },
        },
    }))
}
