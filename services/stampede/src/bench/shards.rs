//! `stampede bench shards`: the broker's ceiling for delivery jobs, one
//! quorum queue per class against K. Delivery jobs (routed by host, as
//! fanout routes them) are published in confirmed batches and consumed and
//! acknowledged over several connections, each given the node list in
//! another order so that they spread over a cluster's nodes. No HTTP, no
//! signing: what bounds it is the broker.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use prost::Message;
use serde_json::json;
use stampede_backends::queue::amqp::{AmqpOptions, AmqpQueue};
use stampede_backends::queue::{route_of, OutMessage, Queue, QueueName};
use stampede_proto::kinds::DELIVERY_JOB;
use stampede_proto::queue::DeliveryJob;

use super::sampling::{cpu_secs_of, listening_pids, rss_mib_of};
use super::{write_json, ShardsArgs};

/// Runs `stampede bench shards`.
pub(super) async fn run(a: ShardsArgs) -> anyhow::Result<()> {
    let list = std::env::var("STAMPEDE_AMQP_URL").context(
        "bench shards runs on RabbitMQ: set STAMPEDE_AMQP_URL (a cluster's nodes, comma-separated)",
    )?;
    let urls: Vec<String> = list
        .split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    if a.shards.is_empty() || a.connections == 0 || a.messages == 0 {
        bail!("--shards, --connections and --messages must not be empty or 0");
    }
    let mut ports: Vec<u16> = urls
        .iter()
        .filter_map(|u| url::Url::parse(u).ok())
        .map(|u| u.port().unwrap_or(5672))
        .collect();
    ports.extend(a.broker_ports.iter().copied());
    ports.sort_unstable();
    ports.dedup();
    let brokers = listening_pids(&ports);
    println!(
        "stampede bench shards: {} delivery jobs through {} node(s) ({} broker VMs found), \
         {} connections each publishing batches of {} and consuming with prefetch {}",
        a.messages,
        urls.len(),
        brokers.len(),
        a.connections,
        a.batch,
        a.prefetch
    );
    let mut runs = Vec::new();
    for &k in &a.shards {
        let r = one_run(&a, &urls, k, &brokers).await?;
        println!(
            "  shards {k:>2}: {:>8.0} jobs/s  broker {:>6.0} µs CPU per job, RSS {:+.0} MiB",
            r["jobs_per_sec"].as_f64().unwrap_or(0.0),
            r["broker_cpu_us_per_job"].as_f64().unwrap_or(0.0),
            r["broker_rss_growth_mib"].as_f64().unwrap_or(0.0),
        );
        runs.push(r);
    }
    let first = runs
        .first()
        .and_then(|r| r["jobs_per_sec"].as_f64())
        .unwrap_or(0.0);
    for r in &mut runs {
        let ratio = r["jobs_per_sec"].as_f64().unwrap_or(0.0) / first.max(1e-9);
        r["ratio_to_first"] = json!(ratio);
    }
    write_json(
        &a.json,
        &json!({ "bench": "shards", "nodes": urls.len(), "runs": runs }),
    )
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

async fn one_run(
    a: &ShardsArgs,
    urls: &[String],
    shards: u16,
    brokers: &[u32],
) -> anyhow::Result<serde_json::Value> {
    let ns = format!(
        "benchsh{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let mut queues = Vec::with_capacity(a.connections);
    for i in 0..a.connections {
        let mut order = urls.to_vec();
        order.rotate_left(i % urls.len());
        let q = AmqpQueue::connect_with(
            &order.join(","),
            &ns,
            "bench-shards",
            AmqpOptions {
                delivery_shards: shards,
            },
        )
        .await?;
        queues.push(q);
    }
    let consumed = Arc::new(AtomicUsize::new(0));
    let total = a.messages;
    let (cpu0, rss0) = broker_now(brokers);
    let started = Instant::now();
    let mut consumers = Vec::new();
    for q in &queues {
        let mut c = q.consume(QueueName::Delivery, a.prefetch).await?;
        let consumed = consumed.clone();
        consumers.push(tokio::spawn(async move {
            while consumed.load(Ordering::Relaxed) < total {
                let Ok(next) = tokio::time::timeout(Duration::from_millis(200), c.next()).await
                else {
                    continue;
                };
                let Some(m) = next else { break };
                let m = m?;
                m.acker.ack().await?;
                consumed.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let per = total.div_ceil(a.connections);
    let mut publishers = Vec::new();
    for (i, q) in queues.iter().enumerate() {
        let q = q.clone();
        let batch = a.batch.max(1);
        let n = per.min(total.saturating_sub(i * per));
        publishers.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < n {
                let msgs: Vec<OutMessage> = (sent..(sent + batch).min(n))
                    .map(|j| job(i * per + j))
                    .collect();
                sent += msgs.len();
                q.publish_batch(QueueName::Delivery, msgs).await?;
            }
            anyhow::Ok(())
        }));
    }
    for p in publishers {
        p.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while consumed.load(Ordering::Relaxed) < total {
        if Instant::now() > deadline {
            bail!(
                "only {} of {total} jobs consumed in 600 s",
                consumed.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let (cpu1, rss1) = broker_now(brokers);
    for c in consumers {
        c.await??;
    }
    if let Some(q) = queues.first() {
        q.delete_all().await?;
    }
    Ok(json!({
        "shards": shards,
        "jobs": total,
        "seconds": secs,
        "jobs_per_sec": total as f64 / secs.max(1e-9),
        "broker_cpu_us_per_job": (cpu1 - cpu0) * 1e6 / total as f64,
        "broker_rss_growth_mib": rss1 - rss0,
    }))
}

/// Delivery job `i`: one of 997 hosts, routed by its host as fanout does.
fn job(i: usize) -> OutMessage {
    let host = format!("h{}.example", i % 997);
    let inbox = format!("https://{host}/users/u{i}/inbox");
    OutMessage {
        kind: DELIVERY_JOB,
        payload: DeliveryJob {
            activity_key: "0196f0c2-5d1e-7bb4-a0a1-2f7e5c8d9e10".into(),
            inbox,
            attempt: 0,
            first_attempt_unix_ms: 1_700_000_000_000,
            ..DeliveryJob::default()
        }
        .encode_to_vec(),
        route: Some(route_of(&host)),
    }
}
