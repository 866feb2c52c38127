//! `stampede bench influx`: the seed's story compressed. Local actors with
//! many followers on thousands of fake hosts (some dead, some answering in
//! 2–5 s, a few answering 429 above a small concurrency) post while a storm
//! of signed Follows arrives at the inbox edge (each answered with an
//! Accept) and DMs are sent between the posts. Measured from outside: per
//! class, the time from `Publish` (or the Follow's POST) to the remote
//! server's receipt; the bulk drain; queue depth and head age per class and
//! delivery rate per class over time; the most requests one host saw at
//! once against the cluster-wide limit. Fails when the interactive p99 is
//! over its bound, a host saw more than the limit, or an activity was lost
//! or duplicated. With `--delivery-replicas N` delivery runs as N processes
//! of this binary (`stampede serve delivery`) on RabbitMQ/Redis/PostgreSQL.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use stampede_backends::queue::{class_name, QueueName};
use stampede_backends::store::Follower;
use stampede_core::activity::public_note;
use stampede_proto::api::actor_service_client::ActorServiceClient;
use stampede_proto::api::publish_service_client::PublishServiceClient;
use stampede_proto::api::{CreateActorRequest, PublishRequest};
use stampede_sink::{Behavior, Sink};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::chart::{self, Line, Panel};
use super::sampling::latency_json;
use super::{
    deployment_and_sink, scratch, stop, stop_replicas, write_json, BackendKind, InfluxArgs,
};
use crate::scratch::Deployment;

/// How often queue depth and head age are sampled, and the width of a
/// delivery-rate bin.
const TICK: Duration = Duration::from_millis(500);
/// Followers seeded per store call.
const SEED_CHUNK: usize = 2_000;
/// The classes in priority order, as the delivery queues are.
const CLASSES: [&str; 3] = ["interactive", "normal", "bulk"];
const COLORS: [&str; 3] = ["#d62728", "#1f77b4", "#7f7f7f"];
const INTERACTIVE: usize = 0;
const NORMAL: usize = 1;
const BULK: usize = 2;

/// How a fake host answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostKind {
    Healthy,
    /// Not listening.
    Dead,
    /// 202 after this long.
    Slow(Duration),
    /// Serves `--limited-concurrency` at once, 429 to more.
    Limited,
}

impl HostKind {
    fn name(self) -> &'static str {
        match self {
            HostKind::Healthy => "healthy",
            HostKind::Dead => "dead",
            HostKind::Slow(_) => "slow",
            HostKind::Limited => "limited",
        }
    }
}

/// A well-mixed hash of `i` (splitmix64): the hosts' kinds are spread over
/// the indices, the same every run.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Each host's kind: the percentages of `hosts` (at least one host for a
/// percentage above 0), on hosts picked by [`mix`].
fn plan_hosts(a: &InfluxArgs) -> Vec<HostKind> {
    let count = |pct: f64| {
        if pct <= 0.0 {
            0
        } else {
            ((a.hosts as f64 * pct / 100.0).round() as usize).max(1)
        }
    };
    let mut order: Vec<usize> = (0..a.hosts).collect();
    order.sort_by_key(|i| mix(*i as u64));
    let mut kinds = vec![HostKind::Healthy; a.hosts];
    let (dead, slow, limited) = (count(a.dead_pct), count(a.slow_pct), count(a.limited_pct));
    for (rank, i) in order.into_iter().enumerate() {
        kinds[i] = if rank < dead {
            HostKind::Dead
        } else if rank < dead + slow {
            HostKind::Slow(Duration::from_millis(2_000 + mix(i as u64 + 1) % 3_001))
        } else if rank < dead + slow + limited {
            HostKind::Limited
        } else {
            HostKind::Healthy
        };
    }
    kinds
}

fn validate(a: &InfluxArgs) -> anyhow::Result<()> {
    if a.actors == 0 || a.followers == 0 || a.hosts == 0 || a.host_limit == 0 {
        bail!("--actors, --followers, --hosts and --host-limit must be at least 1");
    }
    let pcts = [a.dead_pct, a.slow_pct, a.limited_pct];
    if pcts.iter().any(|p| !(0.0..100.0).contains(p)) || pcts.iter().sum::<f64>() >= 100.0 {
        bail!("--dead-pct, --slow-pct and --limited-pct must leave some hosts healthy");
    }
    if !(a.storm_secs >= 0.0 && a.storm_secs.is_finite()) {
        bail!("--storm-secs must be a number of seconds");
    }
    if a.delivery_replicas > 0 && a.common.backend != BackendKind::External {
        bail!("--delivery-replicas needs --backend external (processes share RabbitMQ, Redis and PostgreSQL)");
    }
    if a.limited_concurrency == 0 {
        bail!("--limited-concurrency must be at least 1");
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
    Ok(())
}

/// Runs `stampede bench influx`.
pub(super) async fn run(a: InfluxArgs) -> anyhow::Result<()> {
    validate(&a)?;
    let kinds = plan_hosts(&a);
    let n_of = |k: &str| kinds.iter().filter(|h| h.name() == k).count();
    println!(
        "stampede bench influx: {} actors x {} followers on {} hosts ({} dead, {} slow, {} limited), \
         {} posts each, {} follows, {} DMs over {} s; host limit {}, backend {:?}{}",
        a.actors,
        a.followers,
        a.hosts,
        n_of("dead"),
        n_of("slow"),
        n_of("limited"),
        a.posts,
        a.follows,
        a.dms,
        a.storm_secs,
        a.host_limit,
        a.common.backend,
        if a.delivery_replicas > 0 {
            format!(", delivery in {} processes", a.delivery_replicas)
        } else {
            String::new()
        }
    );
    // The posts go to the bulk class: their audience is over the bound.
    let bulk_audience = (a.followers / 2).clamp(1, 1_000);
    let mut settings: Vec<(&'static str, String)> = vec![
        ("STAMPEDE_HOST_CONCURRENCY", a.host_limit.to_string()),
        ("STAMPEDE_BULK_AUDIENCE", bulk_audience.to_string()),
        ("STAMPEDE_LOG_FORMAT", "text".into()),
    ];
    if let Some(s) = &a.retry_schedule_secs {
        settings.push(("STAMPEDE_RETRY_SCHEDULE_SECS", s.clone()));
    }
    let (vars, scratch) = scratch(a.common.backend).await?;
    let mut replica_env = vars.clone();
    replica_env.extend(settings.iter().cloned());
    let mut here = settings.clone();
    if a.delivery_replicas > 0 {
        here.push(("STAMPEDE_UP_SERVICES", "ingest,inbox,fanout".into()));
    }
    let (d, sink) = deployment_and_sink(
        scratch,
        vars.into_iter().chain(here),
        a.hosts,
        a.verify_every,
    )
    .await?;
    let mut replicas = Vec::new();
    let result = async {
        for (i, kind) in kinds.iter().enumerate() {
            match kind {
                HostKind::Healthy => {}
                HostKind::Dead => sink.sink.set_down(i)?,
                HostKind::Slow(d) => sink.sink.set_behavior(i, Behavior::Slow(*d))?,
                HostKind::Limited => sink.sink.set_behavior(
                    i,
                    Behavior::Limited {
                        concurrent: a.limited_concurrency,
                        delay: Duration::from_millis(100),
                    },
                )?,
            }
        }
        for _ in 0..a.delivery_replicas {
            replicas.push(spawn_replica(&replica_env, &d.base)?);
        }
        let run = Run {
            a: &a,
            d: &d,
            sink: sink.sink.clone(),
            rt: sink.handle(),
            kinds: &kinds,
        };
        run.measure().await
    }
    .await;
    let exited = stop_replicas(replicas).await;
    sink.stop();
    stop(d).await?;
    let mut report = result?;
    if !exited.is_empty() {
        report["check"]["ok"] = json!(false);
        let summary = format!(
            "{}; delivery processes exited early: {}",
            report["check"]["summary"].as_str().unwrap_or(""),
            exited.join(", ")
        );
        report["check"]["summary"] = json!(summary);
    }
    print_report(&report);
    write_json(&a.common.json, &report)?;
    if let Some(path) = &a.svg {
        std::fs::write(path, svg(&report))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("chart written to {}", path.display());
    }
    if report["check"]["ok"] != json!(true) {
        bail!(
            "correctness check failed: {}",
            report["check"]["summary"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `stampede serve delivery` as a child of this process, on the bench's
/// backends, signing as the deployment's public URL.
pub(super) fn spawn_replica(
    env: &HashMap<&'static str, String>,
    base: &str,
) -> anyhow::Result<tokio::process::Child> {
    let exe = std::env::current_exe().context("finding this binary to run delivery replicas")?;
    tokio::process::Command::new(exe)
        .args(["serve", "delivery"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("STAMPEDE_PUBLIC_URL", base)
        .env("STAMPEDE_GRPC_ADDR", "127.0.0.1:0")
        .env("STAMPEDE_METRICS_ADDR", "127.0.0.1:0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting a delivery replica")
}

struct Run<'a> {
    a: &'a InfluxArgs,
    d: &'a Deployment,
    sink: Arc<Sink>,
    rt: tokio::runtime::Handle,
    kinds: &'a [HostKind],
}

/// What the bench sent, and when.
struct Sent {
    id: String,
    at: Instant,
    /// The local actor (posts) or the recipient's host (DMs).
    to: usize,
    /// The recipient's inbox path (DMs).
    path: String,
}

/// A Follow sent to the edge.
struct FollowSent {
    host: usize,
    path: String,
    at: Instant,
    status: Result<u16, String>,
}

/// One sample of the delivery queues: seconds since the storm began, ready
/// messages and head age (ms) per class.
struct Sample {
    t: f64,
    depth: [u64; 3],
    age_ms: [u64; 3],
}

fn class_index(q: QueueName) -> Option<usize> {
    q.delivery_class()
        .and_then(|c| CLASSES.iter().position(|n| *n == class_name(c)))
}

/// Seconds from `t0` to `t`, negative before it.
fn since(t0: Instant, t: Instant) -> f64 {
    if t >= t0 {
        (t - t0).as_secs_f64()
    } else {
        -(t0 - t).as_secs_f64()
    }
}

fn ms(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}

impl Run<'_> {
    async fn measure(&self) -> anyhow::Result<serde_json::Value> {
        let a = self.a;
        let channel = Channel::from_shared(self.d.grpc.clone())?.connect().await?;
        let live: Vec<usize> = (0..a.hosts)
            .filter(|i| self.kinds[*i] != HostKind::Dead)
            .collect();
        let followers = self.seed(channel.clone()).await?;
        println!(
            "{} followers seeded; the storm begins",
            a.actors * a.followers
        );
        let t0 = Instant::now() + Duration::from_millis(200);
        let window = Duration::from_secs_f64(a.storm_secs);
        let due = move |n: usize, total: usize, offset: f64| {
            t0 + window.mul_f64((n as f64 + offset) / total.max(1) as f64)
        };
        let sampling = CancellationToken::new();
        let sampler = tokio::spawn(sample_queues(
            self.d.process.backends.queue.clone(),
            self.d.process.backends.cache.clone(),
            t0,
            sampling.clone(),
        ));
        let publish = PublishServiceClient::new(channel);
        let posts = {
            let mut client = publish.clone();
            let base = self.d.base.clone();
            async move {
                let total = a.actors * a.posts;
                let mut out = Vec::with_capacity(total);
                for n in 0..total {
                    tokio::time::sleep_until(due(n, total, 0.0).into()).await;
                    let k = n % a.actors;
                    let note =
                        public_note(&format!("{base}/users/influx{k}"), &format!("post {n}"));
                    let at = Instant::now();
                    let id = client
                        .publish(PublishRequest {
                            actor: format!("influx{k}"),
                            activity_json: note.to_string(),
                            idempotency_key: String::new(),
                        })
                        .await
                        .context("publishing a post")?
                        .into_inner()
                        .activity_id;
                    out.push(Sent {
                        id,
                        at,
                        to: k,
                        path: String::new(),
                    });
                }
                anyhow::Ok(out)
            }
        };
        let dms = {
            let mut client = publish.clone();
            let (sink, live) = (self.sink.clone(), &live);
            async move {
                let mut out = Vec::with_capacity(a.dms);
                for n in 0..a.dms {
                    // Between the posts: half a step after each.
                    tokio::time::sleep_until(due(n, a.dms, 0.5).into()).await;
                    let host = live[(n * 7 + 3) % live.len()];
                    let to = sink.actor(host, &format!("dm{n}")).context("sink server")?;
                    let dm = json!({
                        "type": "Create",
                        "to": [to.id],
                        "object": {"type": "Note", "content": format!("dm {n}"), "to": [to.id]},
                    });
                    let at = Instant::now();
                    let id = client
                        .publish(PublishRequest {
                            actor: format!("influx{}", n % a.actors),
                            activity_json: dm.to_string(),
                            idempotency_key: String::new(),
                        })
                        .await
                        .context("publishing a DM")?
                        .into_inner()
                        .activity_id;
                    out.push(Sent {
                        id,
                        at,
                        to: host,
                        path: format!("/users/dm{n}/inbox"),
                    });
                }
                anyhow::Ok(out)
            }
        };
        let follows = {
            let (sink, live, rt, base) = (self.sink.clone(), &live, self.rt.clone(), &self.d.base);
            async move {
                let mut sending = Vec::with_capacity(a.follows);
                for n in 0..a.follows {
                    tokio::time::sleep_until(due(n, a.follows, 0.0).into()).await;
                    let host = live[n % live.len()];
                    let target = format!("{base}/users/influx{}", n % a.actors);
                    let sink = sink.clone();
                    sending.push(rt.spawn(async move {
                        let name = format!("n{n}");
                        let at = Instant::now();
                        let status = sink
                            .follow(host, &name, &target)
                            .await
                            .map(|r| r.status)
                            .map_err(|e| e.to_string());
                        FollowSent {
                            host,
                            path: format!("/users/{name}/inbox"),
                            at,
                            status,
                        }
                    }));
                }
                let mut out = Vec::with_capacity(sending.len());
                for s in sending {
                    out.push(s.await?);
                }
                anyhow::Ok(out)
            }
        };
        let (posts, dms, follows) = tokio::join!(posts, dms, follows);
        let (posts, dms, follows) = match (posts, dms, follows) {
            (Ok(p), Ok(d), Ok(f)) => (p, d, f),
            (p, d, f) => {
                sampling.cancel();
                let _ = sampler.await;
                return Err(p
                    .err()
                    .or(d.err())
                    .or(f.err())
                    .unwrap_or_else(|| anyhow::anyhow!("the storm failed")));
            }
        };
        println!(
            "storm sent in {:.1} s: {} posts, {} DMs, {} follows; waiting for every live inbox",
            t0.elapsed().as_secs_f64(),
            posts.len(),
            dms.len(),
            follows.len()
        );
        let want = Expected::new(&followers, &posts, &dms, &follows);
        let deadline = Instant::now() + Duration::from_secs(self.a.common.timeout_secs);
        let mut last = Instant::now();
        let mut missing = want.missing(&self.sink);
        while missing > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            missing = want.missing(&self.sink);
            if last.elapsed() > Duration::from_secs(3) {
                println!(
                    "  {missing} of {} still to arrive after {:.1} s",
                    want.total,
                    t0.elapsed().as_secs_f64()
                );
                last = Instant::now();
            }
        }
        // A duplicate would come soon after.
        tokio::time::sleep(Duration::from_secs(1)).await;
        sampling.cancel();
        let samples = sampler.await?;
        Ok(self.report(t0, &want, &posts, &dms, &follows, &samples))
    }

    /// Creates the local actors and their followers; the live followers'
    /// (host, inbox path) per actor.
    async fn seed(&self, channel: Channel) -> anyhow::Result<Vec<Vec<(usize, String)>>> {
        let a = self.a;
        let mut api = ActorServiceClient::new(channel);
        let store = self.d.process.backends.store.clone();
        let mut live = Vec::with_capacity(a.actors);
        for k in 0..a.actors {
            let name = format!("influx{k}");
            api.create_actor(CreateActorRequest {
                name: name.clone(),
                ..Default::default()
            })
            .await
            .context("creating a local actor")?;
            let actor = store
                .actor_by_name(&name)
                .await?
                .context("a local actor vanished")?;
            let mut mine = Vec::new();
            let mut batch = Vec::with_capacity(SEED_CHUNK);
            for j in 0..a.followers {
                let host = (j + k) % a.hosts;
                let f = self
                    .sink
                    .actor(host, &format!("a{k}f{j}"))
                    .context("sink server")?;
                if self.kinds[host] != HostKind::Dead {
                    mine.push((host, format!("/users/a{k}f{j}/inbox")));
                }
                batch.push(Follower {
                    actor: f.id,
                    inbox: f.inbox,
                    shared_inbox: None,
                    host: f.host,
                    follow_id: None,
                });
                if batch.len() == SEED_CHUNK {
                    store.add_followers(actor.id, &batch).await?;
                    batch.clear();
                }
            }
            if !batch.is_empty() {
                store.add_followers(actor.id, &batch).await?;
            }
            live.push(mine);
        }
        Ok(live)
    }

    fn report(
        &self,
        t0: Instant,
        want: &Expected,
        posts: &[Sent],
        dms: &[Sent],
        follows: &[FollowSent],
        samples: &[Sample],
    ) -> serde_json::Value {
        let a = self.a;
        let post_class = if a.followers > (a.followers / 2).clamp(1, 1_000) {
            BULK
        } else {
            NORMAL
        };
        let post_at: HashMap<&str, Instant> = posts.iter().map(|p| (p.id.as_str(), p.at)).collect();
        let dm_at: HashMap<&str, Instant> = dms.iter().map(|p| (p.id.as_str(), p.at)).collect();
        let follow_at: HashMap<(usize, &str), Instant> = follows
            .iter()
            .map(|f| ((f.host, f.path.as_str()), f.at))
            .collect();
        let snapshot: Vec<_> = (0..a.hosts).map(|i| self.sink.accepted_at(i)).collect();
        let (mut post_ms, mut dm_ms, mut accept_ms) = (Vec::new(), Vec::new(), Vec::new());
        // Interactive latencies by the kind of host they went to.
        let mut by_kind: HashMap<&'static str, Vec<f64>> = HashMap::new();
        let mut bins: [Vec<u64>; 3] = Default::default();
        let mut duplicated = 0u64;
        let mut unexpected = 0u64;
        let mut accepts_at: HashMap<(usize, &str), u32> = HashMap::new();
        for (i, got) in snapshot.iter().enumerate() {
            for ((path, id), (n, at)) in got {
                duplicated += u64::from(n.saturating_sub(1));
                let class = if let Some(sent) = post_at.get(id.as_str()) {
                    post_ms.push(ms(*sent, *at));
                    post_class
                } else if let Some(sent) = dm_at.get(id.as_str()) {
                    dm_ms.push(ms(*sent, *at));
                    by_kind
                        .entry(self.kinds[i].name())
                        .or_default()
                        .push(ms(*sent, *at));
                    INTERACTIVE
                } else if let Some(((_, p), sent)) = follow_at.get_key_value(&(i, path.as_str())) {
                    // Anything else at a new follower's inbox is its Accept:
                    // one each.
                    let seen = accepts_at.entry((i, p)).or_insert(0);
                    *seen += 1;
                    if *seen > 1 {
                        duplicated += 1;
                    }
                    accept_ms.push(ms(*sent, *at));
                    by_kind
                        .entry(self.kinds[i].name())
                        .or_default()
                        .push(ms(*sent, *at));
                    INTERACTIVE
                } else {
                    unexpected += 1;
                    continue;
                };
                let bin = (since(t0, *at) / TICK.as_secs_f64()).max(0.0) as usize;
                let b = &mut bins[class];
                if b.len() <= bin {
                    b.resize(bin + 1, 0);
                }
                b[bin] += 1;
            }
        }
        let lost = want.missing_in(&snapshot);
        let drain = want.last_post_arrival(&snapshot).and_then(|last| {
            let first = posts.iter().map(|p| p.at).min()?;
            (lost == 0).then(|| ms(first, last) / 1000.0)
        });
        let sort = |v: &mut Vec<f64>| v.sort_by(|x, y| x.total_cmp(y));
        let mut interactive: Vec<f64> = dm_ms.iter().chain(accept_ms.iter()).copied().collect();
        for v in [&mut post_ms, &mut dm_ms, &mut accept_ms, &mut interactive]
            .into_iter()
            .chain(by_kind.values_mut())
        {
            sort(v);
        }
        let by_kind: serde_json::Map<String, serde_json::Value> = by_kind
            .iter()
            .map(|(k, v)| {
                let mut l = latency_json(v, "to hosts of this kind");
                l["deliveries"] = json!(v.len());
                (k.to_string(), l)
            })
            .collect();
        let p99 = latency_json(&interactive, "")["p99"]
            .as_f64()
            .unwrap_or(0.0);
        let (max_in_flight, busiest) = (0..a.hosts)
            .map(|i| (self.sink.max_in_flight(i), i))
            .max()
            .unwrap_or((0, 0));
        let limited_max = (0..a.hosts)
            .filter(|i| self.kinds[*i] == HostKind::Limited)
            .map(|i| self.sink.max_in_flight(i))
            .max();
        let refused: Vec<String> = follows
            .iter()
            .filter_map(|f| match &f.status {
                Ok(202) => None,
                Ok(s) => Some(format!("{s}")),
                Err(e) => Some(e.clone()),
            })
            .collect();
        let unverified = self.sink.total_unverified();
        let mut failures = Vec::new();
        if interactive.is_empty() && (a.follows > 0 || a.dms > 0) {
            failures.push("no interactive delivery arrived".to_string());
        }
        if p99 > a.interactive_p99_ms as f64 {
            failures.push(format!(
                "interactive p99 {p99:.0} ms over {} ms",
                a.interactive_p99_ms
            ));
        }
        if max_in_flight > a.host_limit {
            failures.push(format!(
                "host {busiest} saw {max_in_flight} requests at once, limit {}",
                a.host_limit
            ));
        }
        if lost > 0 {
            failures.push(format!("{lost} of {} lost", want.total));
        }
        if duplicated > 0 {
            failures.push(format!("{duplicated} duplicated"));
        }
        if unverified > 0 {
            failures.push(format!("{unverified} signatures did not verify"));
        }
        if !refused.is_empty() {
            failures.push(format!(
                "{} follows not answered 202 (first: {})",
                refused.len(),
                refused[0]
            ));
        }
        let ok = failures.is_empty();
        let summary = if ok {
            "ok".to_string()
        } else {
            format!("FAILED: {}", failures.join("; "))
        };
        let rate_len = bins.iter().map(Vec::len).max().unwrap_or(0);
        let per_class = |f: &dyn Fn(usize) -> serde_json::Value| {
            serde_json::Value::Object(
                CLASSES
                    .iter()
                    .enumerate()
                    .map(|(c, n)| (n.to_string(), f(c)))
                    .collect(),
            )
        };
        let kinds_count = |k: &str| self.kinds.iter().filter(|h| h.name() == k).count();
        let post_latency = latency_json(&post_ms, "from Publish to the remote server's receipt");
        let no_class = || json!({"deliveries": 0});
        json!({
            "bench": "influx",
            "backend": format!("{:?}", a.common.backend).to_lowercase(),
            "actors": a.actors,
            "followers": a.followers,
            "posts_per_actor": a.posts,
            "follows": a.follows,
            "dms": a.dms,
            "storm_secs": a.storm_secs,
            "delivery_replicas": a.delivery_replicas,
            "host_limit": a.host_limit,
            "bulk_audience": (a.followers / 2).clamp(1, 1_000),
            "hosts": {
                "total": a.hosts,
                "healthy": kinds_count("healthy"),
                "dead": kinds_count("dead"),
                "slow": kinds_count("slow"),
                "slow_answer": "2 to 5 s",
                "limited": kinds_count("limited"),
                "limited_concurrency": a.limited_concurrency,
            },
            "classes": {
                "interactive": {
                    "what": "Accepts (from the Follow's POST) and DMs (from Publish) to the remote server's receipt",
                    "deliveries": interactive.len(),
                    "latency_ms": latency_json(&interactive, "Follow POST or Publish to the remote server's receipt"),
                    "accepts": latency_json(&accept_ms, "from the Follow's POST at the edge to the Accept's receipt"),
                    "dms": latency_json(&dm_ms, "from Publish to the DM's receipt"),
                    "by_host_kind": by_kind,
                },
                "normal": if post_class == NORMAL {
                    json!({"what": "the posts", "deliveries": post_ms.len(), "latency_ms": post_latency, "drain_secs": drain})
                } else { no_class() },
                "bulk": if post_class == BULK {
                    json!({"what": "the posts", "deliveries": post_ms.len(), "latency_ms": post_latency, "drain_secs": drain})
                } else { no_class() },
            },
            "max_in_flight": {
                "max": max_in_flight,
                "host": busiest,
                "host_kind": self.kinds.get(busiest).map_or("", |k| k.name()),
                "limit": a.host_limit,
                "limited_hosts_max": limited_max,
                "what": "the most POSTs one fake host had in progress at once (the sink's own count)",
            },
            "series": {
                "interval_secs": TICK.as_secs_f64(),
                "queues": {
                    "t": samples.iter().map(|s| (s.t * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
                    "depth": per_class(&|c| json!(samples.iter().map(|s| s.depth[c]).collect::<Vec<_>>())),
                    "head_age_ms": per_class(&|c| json!(samples.iter().map(|s| s.age_ms[c]).collect::<Vec<_>>())),
                },
                "delivery_rate": {
                    "what": "accepted deliveries a second as the remote servers received them, per 0.5 s",
                    "t": (0..rate_len).map(|b| b as f64 * TICK.as_secs_f64()).collect::<Vec<_>>(),
                    "per_sec": per_class(&|c| json!((0..rate_len)
                        .map(|b| bins[c].get(b).copied().unwrap_or(0) as f64 / TICK.as_secs_f64())
                        .collect::<Vec<_>>())),
                },
            },
            "check": {
                "ok": ok,
                "interactive_p99_ms": p99,
                "interactive_p99_bound_ms": a.interactive_p99_ms,
                "max_in_flight": max_in_flight,
                "host_limit": a.host_limit,
                "expected": want.total,
                "lost": lost,
                "duplicated": duplicated,
                "unexpected": unexpected,
                "unverified": unverified,
                "follows_refused": refused.len(),
                "summary": summary,
            },
        })
    }
}

/// Samples ready messages and head age per delivery class every [`TICK`]
/// until `stop`, as `stampede status` reads them.
async fn sample_queues(
    queue: Arc<dyn stampede_backends::queue::Queue>,
    cache: Arc<dyn stampede_backends::cache::Cache>,
    t0: Instant,
    stop: CancellationToken,
) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return out,
            _ = tick.tick() => {}
        }
        let at = Instant::now();
        let Ok(depths) = queue.depths().await else {
            continue;
        };
        let ages = stampede_federation::queue_heads::head_ages(&*cache, &depths)
            .await
            .unwrap_or_default();
        let mut s = Sample {
            t: since(t0, at),
            depth: [0; 3],
            age_ms: [0; 3],
        };
        for dp in &depths {
            if let Some(c) = class_index(dp.name) {
                s.depth[c] = dp.messages;
                s.age_ms[c] = ages.get(&dp.name).copied().unwrap_or(0);
            }
        }
        out.push(s);
    }
}

/// What one fake server accepted: copies per (inbox path, activity id),
/// and when the first reached it.
type Got = HashMap<(String, String), (u32, Instant)>;

/// What every live inbox should get: per host, (inbox path, activity id),
/// and the new followers' inboxes, each owed an Accept.
struct Expected {
    copies: HashMap<usize, Vec<(String, String)>>,
    accepts: HashMap<usize, Vec<String>>,
    /// The activity ids the bench sent: anything else at a new follower's
    /// inbox is its Accept.
    sent: HashSet<String>,
    posts: HashSet<String>,
    total: usize,
}

impl Expected {
    fn new(
        followers: &[Vec<(usize, String)>],
        posts: &[Sent],
        dms: &[Sent],
        follows: &[FollowSent],
    ) -> Self {
        let mut copies: HashMap<usize, Vec<(String, String)>> = HashMap::new();
        for p in posts {
            for (host, path) in &followers[p.to] {
                copies
                    .entry(*host)
                    .or_default()
                    .push((path.clone(), p.id.clone()));
            }
        }
        for m in dms {
            copies
                .entry(m.to)
                .or_default()
                .push((m.path.clone(), m.id.clone()));
        }
        let mut accepts: HashMap<usize, Vec<String>> = HashMap::new();
        for f in follows.iter().filter(|f| matches!(f.status, Ok(202))) {
            accepts.entry(f.host).or_default().push(f.path.clone());
        }
        let total = copies.values().map(Vec::len).sum::<usize>()
            + accepts.values().map(Vec::len).sum::<usize>();
        Self {
            copies,
            accepts,
            sent: posts.iter().chain(dms).map(|s| s.id.clone()).collect(),
            posts: posts.iter().map(|s| s.id.clone()).collect(),
            total,
        }
    }

    fn hosts(&self) -> Vec<usize> {
        let mut h: Vec<usize> = self
            .copies
            .keys()
            .chain(self.accepts.keys())
            .copied()
            .collect();
        h.sort_unstable();
        h.dedup();
        h
    }

    /// Copies not yet arrived, reading the sink.
    fn missing(&self, sink: &Sink) -> usize {
        self.hosts()
            .into_iter()
            .map(|h| self.missing_at(h, &sink.accepted_at(h)))
            .sum()
    }

    /// Copies missing in a snapshot of every host.
    fn missing_in(&self, snapshot: &[Got]) -> usize {
        let empty = HashMap::new();
        self.hosts()
            .into_iter()
            .map(|h| self.missing_at(h, snapshot.get(h).unwrap_or(&empty)))
            .sum()
    }

    fn missing_at(&self, host: usize, got: &Got) -> usize {
        let copies = self.copies.get(&host).map_or(0, |want| {
            want.iter().filter(|k| !got.contains_key(*k)).count()
        });
        let accepts = self.accepts.get(&host).map_or(0, |paths| {
            let answered: HashSet<&str> = got
                .keys()
                .filter(|(_, id)| !self.sent.contains(id))
                .map(|(p, _)| p.as_str())
                .collect();
            paths
                .iter()
                .filter(|p| !answered.contains(p.as_str()))
                .count()
        });
        copies + accepts
    }

    /// When the last expected copy of a post arrived.
    fn last_post_arrival(&self, snapshot: &[Got]) -> Option<Instant> {
        self.copies
            .iter()
            .flat_map(|(h, want)| {
                want.iter()
                    .filter(|(_, id)| self.posts.contains(id))
                    .filter_map(move |k| snapshot.get(*h)?.get(k).map(|(_, at)| *at))
            })
            .max()
    }
}

fn print_report(r: &serde_json::Value) {
    println!();
    println!(
        "{:<12} {:>10} {:>8} {:>8} {:>8} {:>9}",
        "class", "deliveries", "p50 ms", "p99 ms", "max ms", "drain s"
    );
    for c in CLASSES {
        let v = &r["classes"][c];
        if v["deliveries"].as_u64().unwrap_or(0) == 0 {
            continue;
        }
        let l = &v["latency_ms"];
        println!(
            "{:<12} {:>10} {:>8.0} {:>8.0} {:>8.0} {:>9}",
            c,
            v["deliveries"].as_u64().unwrap_or(0),
            l["p50"].as_f64().unwrap_or(0.0),
            l["p99"].as_f64().unwrap_or(0.0),
            l["max"].as_f64().unwrap_or(0.0),
            v["drain_secs"]
                .as_f64()
                .map_or_else(|| "-".to_string(), |s| format!("{s:.1}")),
        );
    }
    for (what, k) in [("  accepts", "accepts"), ("  DMs", "dms")] {
        let l = &r["classes"]["interactive"][k];
        println!(
            "{:<12} {:>10} {:>8.0} {:>8.0} {:>8.0}",
            what,
            "",
            l["p50"].as_f64().unwrap_or(0.0),
            l["p99"].as_f64().unwrap_or(0.0),
            l["max"].as_f64().unwrap_or(0.0),
        );
    }
    if let Some(kinds) = r["classes"]["interactive"]["by_host_kind"].as_object() {
        for (k, l) in kinds {
            println!(
                "{:<12} {:>10} {:>8.0} {:>8.0} {:>8.0}",
                format!("  to {k}"),
                l["deliveries"].as_u64().unwrap_or(0),
                l["p50"].as_f64().unwrap_or(0.0),
                l["p99"].as_f64().unwrap_or(0.0),
                l["max"].as_f64().unwrap_or(0.0),
            );
        }
    }
    let m = &r["max_in_flight"];
    println!(
        "most requests at once at one host: {} (host {}, {}), limit {}",
        m["max"],
        m["host"],
        m["host_kind"].as_str().unwrap_or(""),
        m["limit"]
    );
    let ages = &r["series"]["queues"]["head_age_ms"];
    let worst = |c: &str| {
        ages[c].as_array().map_or(0, |v| {
            v.iter().filter_map(|x| x.as_u64()).max().unwrap_or(0)
        })
    };
    println!(
        "oldest queue head seen: interactive {} ms, normal {} ms, bulk {} ms",
        worst("interactive"),
        worst("normal"),
        worst("bulk")
    );
    println!("check: {}", r["check"]["summary"].as_str().unwrap_or(""));
}

/// The report's time series as a chart: queue head age and delivery rate
/// per class over time.
fn svg(r: &serde_json::Value) -> String {
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default()
    };
    let q = &r["series"]["queues"];
    let qt = floats(&q["t"]);
    let rt = floats(&r["series"]["delivery_rate"]["t"]);
    let lines = |ts: &[f64], of: &serde_json::Value, scale: f64| -> Vec<Line> {
        CLASSES
            .iter()
            .zip(COLORS)
            .map(|(c, color)| Line {
                name: c,
                color,
                points: ts
                    .iter()
                    .copied()
                    .zip(floats(&of[*c]).into_iter().map(|y| y * scale))
                    .collect(),
            })
            .collect()
    };
    let title = format!(
        "stampede bench influx: {} actors x {} followers, {} hosts, {} follows, {} DMs ({}{})",
        r["actors"],
        r["followers"],
        r["hosts"]["total"],
        r["follows"],
        r["dms"],
        r["backend"].as_str().unwrap_or(""),
        match r["delivery_replicas"].as_u64() {
            Some(n) if n > 0 => format!(", {n} delivery processes"),
            _ => String::new(),
        }
    );
    chart::draw(
        &title,
        "seconds since the storm began",
        &[
            Panel {
                title: "queue head age per class".into(),
                y_label: "head age (s)",
                lines: lines(&qt, &q["head_age_ms"], 0.001),
            },
            Panel {
                title: "delivery rate per class (receipts at the fake servers)".into(),
                y_label: "deliveries / s",
                lines: lines(&rt, &r["series"]["delivery_rate"]["per_sec"], 1.0),
            },
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: InfluxArgs,
    }

    #[test]
    fn hosts_are_planned_by_percentage_spread_and_at_least_one_each() {
        let a = Cli::parse_from(["x", "--hosts", "2000"]).a;
        let kinds = plan_hosts(&a);
        let n = |k: &str| kinds.iter().filter(|h| h.name() == k).count();
        assert_eq!((n("dead"), n("slow"), n("limited")), (100, 100, 10));
        assert!(kinds[..1000].contains(&HostKind::Dead));
        assert!(kinds[1000..].contains(&HostKind::Dead));
        for k in &kinds {
            if let HostKind::Slow(d) = k {
                assert!((2_000..=5_000).contains(&(d.as_millis() as u64)), "{d:?}");
            }
        }
        let a = Cli::parse_from(["x", "--hosts", "40", "--slow-pct", "0"]).a;
        let kinds = plan_hosts(&a);
        let n = |k: &str| kinds.iter().filter(|h| h.name() == k).count();
        assert_eq!((n("dead"), n("slow"), n("limited")), (2, 0, 1));
        assert_eq!(plan_hosts(&a), kinds, "the same every run");
    }
}
