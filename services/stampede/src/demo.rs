//! `stampede demo`: stampede on embedded defaults plus a sink of fake remote
//! servers in one process. The sink's actors follow a local actor through
//! real signed Follow requests, some servers then die, slow down or fail for
//! a while, the local actor posts, and the demo shows delivery live and ends
//! with a table whose counts it checks against what the servers received.
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use stampede_core::activity::public_note;
use stampede_proto::api::actor_service_client::ActorServiceClient;
use stampede_proto::api::publish_service_client::PublishServiceClient;
use stampede_proto::api::{CreateActorRequest, PublishRequest};
use stampede_runtime::process::{Listeners, Process, ALL_IN_ONE};
use stampede_runtime::queue::{ready_messages, QueueName};
use stampede_runtime::Config;
use stampede_sink::{Behavior, Sink, SinkOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Flags of `stampede demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Fake remote servers.
    #[arg(long, default_value_t = 50)]
    servers: usize,
    /// Remote followers, spread over the servers.
    #[arg(long, default_value_t = 500)]
    followers: usize,
    /// Posts to publish.
    #[arg(long, default_value_t = 3)]
    posts: usize,
    /// Share of servers that are down for good (their deliveries end as dead letters).
    #[arg(long, default_value_t = 0.1)]
    dead: f64,
    /// Share of servers that answer after `--slow-secs`.
    #[arg(long, default_value_t = 0.1)]
    slow: f64,
    /// Share of servers that answer 503 for a few seconds, then recover.
    #[arg(long, default_value_t = 0.1)]
    failing: f64,
    /// How long a slow server takes to answer.
    #[arg(long, default_value_t = 1.5)]
    slow_secs: f64,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Keep the demo's data directory (printed at the start).
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Class {
    Healthy,
    Slow,
    Failing,
    Dead,
}

impl Class {
    const ALL: [Class; 4] = [Class::Healthy, Class::Slow, Class::Failing, Class::Dead];

    fn label(self) -> &'static str {
        match self {
            Class::Healthy => "healthy",
            Class::Slow => "slow",
            Class::Failing => "failing, then back",
            Class::Dead => "dead",
        }
    }
}

/// Retry delays of the demo: short, so dead servers end as dead letters
/// within seconds instead of two days.
const DEMO_RETRIES: &str = "1,2,4";
/// How long failing servers answer 503.
const FAILING_FOR: Duration = Duration::from_secs(4);

fn share(n: usize, of: f64) -> usize {
    ((n as f64) * of.clamp(0.0, 1.0)).round() as usize
}

/// Runs the demo; an error when its counts do not match.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.servers == 0 || args.followers == 0 || args.posts == 0 {
        bail!("--servers, --followers and --posts must be at least 1");
    }
    if args.dead + args.slow + args.failing > 1.0 {
        bail!("--dead + --slow + --failing must not exceed 1");
    }
    let (n_dead, n_slow, n_failing) = (
        share(args.servers, args.dead),
        share(args.servers, args.slow),
        share(args.servers, args.failing),
    );
    let class_of = |i: usize| {
        if i < n_dead {
            Class::Dead
        } else if i < n_dead + n_slow {
            Class::Slow
        } else if i < n_dead + n_slow + n_failing {
            Class::Failing
        } else {
            Class::Healthy
        }
    };

    // stampede on embedded defaults, in a data directory of its own.
    let data_dir =
        std::env::temp_dir().join(format!("stampede-demo-{}", uuid::Uuid::new_v4().simple()));
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let metrics = TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", http.local_addr()?);
    let vars: HashMap<&str, String> = HashMap::from([
        ("STAMPEDE_PUBLIC_URL", base.clone()),
        ("STAMPEDE_HTTP_ADDR", http.local_addr()?.to_string()),
        ("STAMPEDE_GRPC_ADDR", grpc.local_addr()?.to_string()),
        ("STAMPEDE_METRICS_ADDR", metrics.local_addr()?.to_string()),
        ("STAMPEDE_DATA_DIR", data_dir.display().to_string()),
        ("STAMPEDE_ALLOW_PRIVATE_NETWORKS", "true".into()),
        ("STAMPEDE_RETRY_SCHEDULE_SECS", DEMO_RETRIES.into()),
        ("STAMPEDE_DELIVERY_TIMEOUT_SECS", "10".into()),
    ]);
    let cfg = Config::from_lookup(|k| vars.get(k).cloned())?;
    let shutdown = CancellationToken::new();
    let p = Process::connect(cfg, ALL_IN_ONE, shutdown.clone()).await?;
    let grpc_url = format!("http://{}", grpc.local_addr()?);
    println!(
        "stampede on embedded defaults, data in {}",
        data_dir.display()
    );
    let up = tokio::spawn(crate::up::run(
        p.clone(),
        Listeners {
            http: Some(http),
            grpc,
            metrics,
        },
    ));
    let result = drive(
        &args,
        &p,
        &base,
        &grpc_url,
        class_of,
        (n_dead, n_slow, n_failing),
    )
    .await;
    shutdown.cancel();
    match up.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("stampede stopped with an error: {e:#}"),
        Err(e) => eprintln!("stampede task failed: {e}"),
    }
    drop(p);
    if args.keep {
        println!("data kept in {}", data_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    result
}

async fn drive(
    args: &DemoArgs,
    p: &Process,
    base: &str,
    grpc_url: &str,
    class_of: impl Fn(usize) -> Class,
    (n_dead, n_slow, n_failing): (usize, usize, usize),
) -> anyhow::Result<()> {
    // The local application's side: gRPC, as an application would.
    let channel = Channel::from_shared(grpc_url.to_string())?
        .connect()
        .await
        .context("connecting to stampede's gRPC API")?;
    ActorServiceClient::new(channel.clone())
        .create_actor(CreateActorRequest {
            name: "demo".into(),
            display_name: "stampede demo".into(),
            ..Default::default()
        })
        .await
        .context("creating the local actor")?;
    let store = p.backends.store.clone();
    let local = store
        .actor_by_name("demo")
        .await?
        .context("the local actor vanished")?;
    let actor_id = format!("{base}/users/demo");

    // Every fourth server has no shared inbox: its followers get a POST each.
    let sink = Arc::new(
        Sink::start(SinkOptions {
            servers: args.servers,
            shared_inbox: Arc::new(|i| i % 4 != 3),
            ..SinkOptions::default()
        })
        .await?,
    );
    println!(
        "{} fake servers on 127.0.0.1: {} healthy, {n_slow} slow, {n_failing} failing for a while, {n_dead} dead",
        args.servers,
        args.servers - n_dead - n_slow - n_failing
    );

    // Real signed Follows, answered by signed Accepts.
    let started = Instant::now();
    let follows = futures::stream::iter(0..args.followers)
        .map(|j| {
            let sink = sink.clone();
            let actor_id = actor_id.clone();
            async move {
                sink.follow(j % args.servers, &format!("u{j}"), &actor_id)
                    .await
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    for r in follows {
        let r = r?;
        if r.status != 202 {
            bail!("a Follow was answered {}", r.status);
        }
    }
    let tty = std::io::stdout().is_terminal();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    loop {
        let n = store.follower_count(local.id).await?;
        let accepts = sink.received_of_type("Accept");
        progress_line(
            tty,
            &format!(
                "following: {n}/{} followers, {accepts} Accepts delivered",
                args.followers
            ),
        );
        if n as usize == args.followers && accepts == args.followers {
            break;
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for follows");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    finish_line(tty);
    println!(
        "{} followers in {:.1} s (signed Follows verified, signed Accepts delivered)",
        args.followers,
        started.elapsed().as_secs_f64()
    );

    // The trouble begins.
    for i in 0..sink.len() {
        match class_of(i) {
            Class::Dead => sink.set_down(i)?,
            Class::Slow => {
                sink.set_behavior(i, Behavior::Slow(Duration::from_secs_f64(args.slow_secs)))?
            }
            Class::Failing => sink.set_behavior(i, Behavior::Status(503))?,
            Class::Healthy => {}
        }
    }
    // What each post must reach: one POST per shared inbox, else one per follower.
    let mut per_server = vec![0usize; sink.len()];
    for j in 0..args.followers {
        per_server[j % args.servers] += 1;
    }
    let targets: Vec<usize> = per_server
        .iter()
        .enumerate()
        .map(|(i, &f)| if i % 4 != 3 { usize::from(f > 0) } else { f })
        .collect();
    let expected = targets.iter().sum::<usize>() * args.posts;

    let before = Counts::read(p).await?;
    let started = Instant::now();
    let mut ids = Vec::with_capacity(args.posts);
    let mut publisher = PublishServiceClient::new(channel);
    for k in 0..args.posts {
        let note = public_note(&actor_id, &format!("stampede demo post {}", k + 1));
        let r = publisher
            .publish(PublishRequest {
                actor: "demo".into(),
                activity_json: note.to_string(),
                idempotency_key: String::new(),
            })
            .await
            .context("publishing")?;
        ids.push(r.into_inner().activity_id);
    }
    println!(
        "published {} posts: {expected} deliveries to make",
        args.posts
    );
    let mut recovered = false;
    // Deliveries per second over the last two seconds.
    let mut window: std::collections::VecDeque<(Instant, u64)> = Default::default();
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let done = loop {
        if !recovered && started.elapsed() >= FAILING_FOR {
            for i in 0..sink.len() {
                if class_of(i) == Class::Failing {
                    sink.set_behavior(i, Behavior::Ok)?;
                }
            }
            recovered = true;
        }
        let now = Counts::read(p).await?.since(&before);
        let finished = now.delivered + now.failed;
        let secs = started.elapsed().as_secs_f64();
        window.push_back((Instant::now(), now.delivered));
        while window.len() > 2 && window[0].0.elapsed() > Duration::from_secs(2) {
            window.pop_front();
        }
        let rate = match (window.front(), window.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                (b.1 - a.1) as f64 / b.0.duration_since(a.0).as_secs_f64()
            }
            _ => 0.0,
        };
        let line = format!(
            "{} {finished:>6}/{expected} done  {:>7.1} deliveries/s  retries {:>5}  dead-lettered {:>4}  queue {:>5}  {secs:>5.1} s",
            bar(finished, expected, 24),
            rate,
            now.retries,
            now.failed,
            now.queue,
        );
        if tty {
            progress_line(true, &line);
        } else if last_print.elapsed() >= Duration::from_secs(2) {
            println!("{line}");
            last_print = Instant::now();
        }
        if finished as usize >= expected && now.queue == 0 {
            break now;
        }
        if Instant::now() > deadline {
            finish_line(tty);
            bail!("timed out: {finished} of {expected} deliveries finished");
        }
        tokio::time::sleep(Duration::from_millis(if tty { 100 } else { 250 })).await;
    };
    let elapsed = started.elapsed().as_secs_f64();
    finish_line(tty);

    // What the servers saw, by class.
    let mut rows: HashMap<Class, [usize; 5]> = HashMap::new();
    let mut received_ok = 0usize;
    let mut unverified = 0usize;
    let mut duplicates = 0usize;
    for i in 0..sink.len() {
        let row = rows.entry(class_of(i)).or_default();
        row[0] += 1;
        row[1] += per_server[i];
        row[2] += targets[i] * args.posts;
        let mut seen: HashMap<(String, String), usize> = HashMap::new();
        for r in sink.received(i) {
            let Some(id) = r.activity_id.as_ref().filter(|id| ids.contains(id)) else {
                continue;
            };
            if r.verified.is_err() {
                unverified += 1;
            }
            if (200..300).contains(&r.status) {
                row[3] += 1;
                received_ok += 1;
                *seen.entry((r.path.clone(), id.clone())).or_default() += 1;
            } else {
                row[4] += 1;
            }
        }
        duplicates += seen.values().map(|n| n - 1).sum::<usize>();
    }
    println!();
    println!(
        "{:<20} {:>8} {:>10} {:>11} {:>10} {:>15}",
        "servers", "count", "followers", "deliveries", "received", "refused tries"
    );
    let mut total = [0usize; 5];
    for c in Class::ALL {
        let r = rows.get(&c).copied().unwrap_or_default();
        for (t, v) in total.iter_mut().zip(r) {
            *t += v;
        }
        println!(
            "{:<20} {:>8} {:>10} {:>11} {:>10} {:>15}",
            c.label(),
            r[0],
            r[1],
            r[2],
            r[3],
            r[4]
        );
    }
    println!(
        "{:<20} {:>8} {:>10} {:>11} {:>10} {:>15}",
        "total", total[0], total[1], total[2], total[3], total[4]
    );
    println!();
    println!(
        "stampede: delivered {}, retried {}, dead-lettered {} (dead servers, after {DEMO_RETRIES} s of retries), in {elapsed:.1} s ({:.0} deliveries/s overall)",
        done.delivered, done.retries, done.failed, done.delivered as f64 / elapsed.max(0.001)
    );
    println!(
        "servers:  received {received_ok} signed copies, {unverified} failed verification, {duplicates} duplicates"
    );
    let ok = done.delivered as usize == received_ok && unverified == 0 && duplicates == 0;
    if ok {
        println!("check:    delivered == received: ok");
        Ok(())
    } else {
        bail!(
            "check failed: stampede delivered {} but the servers received {received_ok} ({unverified} unverified, {duplicates} duplicates)",
            done.delivered
        )
    }
}

/// Delivery counters and the delivery queue's depth.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    delivered: u64,
    retries: u64,
    failed: u64,
    queue: u64,
}

impl Counts {
    async fn read(p: &Process) -> anyhow::Result<Self> {
        let q = &*p.backends.queue;
        let queue = ready_messages(q, QueueName::Delivery)
            .await
            .context("queue depth")?
            + ready_messages(q, QueueName::Fanout)
                .await
                .context("queue depth")?;
        Ok(Self {
            delivered: p.metrics.delivery_count("delivered"),
            retries: p.metrics.delivery_count("retry"),
            failed: p.metrics.delivery_count("failed") + p.metrics.delivery_count("gone"),
            queue,
        })
    }

    fn since(&self, before: &Counts) -> Counts {
        Counts {
            delivered: self.delivered - before.delivered,
            retries: self.retries - before.retries,
            failed: self.failed - before.failed,
            queue: self.queue,
        }
    }
}

fn bar(done: u64, total: usize, width: usize) -> String {
    let filled = ((done as usize).min(total) * width)
        .checked_div(total)
        .unwrap_or(width);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

fn progress_line(tty: bool, line: &str) {
    if tty {
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\r\x1b[2K{line}");
        let _ = out.flush();
    }
}

fn finish_line(tty: bool) {
    if tty {
        println!();
    }
}
