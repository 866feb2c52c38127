//! `stampede bench delivery|fanout`: end-to-end benchmarks against this
//! machine's own ceiling, measured first in the same run, with a correctness
//! check that fails the bench (nothing lost, nothing duplicated).
//!
//! Everything runs in this process: stampede (all in one, on the embedded
//! backends or on RabbitMQ/Redis/PostgreSQL), and for delivery a sink of
//! fake servers on its own runtime threads (`stampede-sink`) so its CPU is
//! reported apart.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use serde_json::json;

use crate::loadgen;
use stampede_backends::queue::{ready_messages, QueueName};
use stampede_backends::store::{Follower, NewActor, PrivateKey};
use stampede_core::activity::public_note;
use stampede_proto::api::actor_service_client::ActorServiceClient;
use stampede_proto::api::publish_service_client::PublishServiceClient;
use stampede_proto::api::{CreateActorRequest, PublishRequest};
use stampede_runtime::process::{Listeners, Process};
use stampede_runtime::Config;
use stampede_runtime::Role;
use stampede_sink::{Sink, SinkOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// `stampede bench …`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: Which,
}

impl BenchArgs {
    /// The service whose runtime this bench's in-process services get
    /// ([`stampede_runtime::Config::runtime_threads_for`]): `delivery` where
    /// they sign, else the service it measures.
    pub fn runs_as(&self) -> stampede_runtime::Role {
        use stampede_runtime::ServiceKind as Kind;
        stampede_runtime::Role::Service(match self.which {
            Which::Delivery(_) => Kind::Delivery,
            Which::Fanout(_) => Kind::Fanout,
            Which::Ingest(_) => Kind::Ingest,
            Which::Inbound(_) => Kind::Inbox,
        })
    }
}

#[derive(Debug, Subcommand)]
enum Which {
    /// One Create to many followers: signed POSTs/s against the signing ceiling.
    Delivery(DeliveryArgs),
    /// One activity to a million followers: time until every delivery job is queued.
    Fanout(FanoutArgs),
    /// A burst of inbox POSTs at the edge, answered 202 after a durable
    /// enqueue; then kill -9 and count what is queued.
    Ingest(IngestArgs),
    /// Pre-signed inbound activities from many remote actors through the
    /// edge, the queue and verification to the application's stream.
    Inbound(InboundArgs),
}

#[derive(Debug, Args)]
struct InboundArgs {
    #[command(flatten)]
    common: Common,
    /// Signed POSTs per run (four runs: cavage and RFC 9421, each with a cold then a warm key cache).
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Remote actors signing them (each its own key id).
    #[arg(long, default_value_t = 1_000)]
    actors: usize,
    /// Fake servers the actors live on.
    #[arg(long, default_value_t = 100)]
    servers: usize,
    /// Requests in flight at once (the connections of the load generator).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// After each warm run, one more at this many POSTs a second, open loop,
    /// for the latency at that rate (0: skip it).
    #[arg(long, default_value_t = 15_000.0)]
    rate: f64,
}

#[derive(Debug, Args)]
struct IngestArgs {
    #[command(flatten)]
    common: Common,
    /// Inbox POSTs in the burst.
    #[arg(long, default_value_t = 100_000)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    /// Embedded queue, store and cache in a temporary data directory.
    Embedded,
    /// RabbitMQ, Redis, PostgreSQL from STAMPEDE_AMQP_URL, STAMPEDE_REDIS_URL,
    /// STAMPEDE_DATABASE_URL (a scratch database is created next to it).
    External,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Every follower has only a personal inbox: one POST per follower.
    Personal,
    /// Every server has a shared inbox: one POST per server.
    Shared,
    /// Both, one after the other.
    Both,
}

#[derive(Debug, Args)]
struct Common {
    /// Backends to run on.
    #[arg(long, value_enum, default_value = "embedded")]
    backend: BackendKind,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

#[derive(Debug, Args)]
struct DeliveryArgs {
    #[command(flatten)]
    common: Common,
    /// Followers of the publishing actor.
    #[arg(long, default_value_t = 10_000)]
    followers: usize,
    /// Fake servers they live on.
    #[arg(long, default_value_t = 1_000)]
    hosts: usize,
    /// Personal inboxes, shared inboxes, or both.
    #[arg(long, value_enum, default_value = "both")]
    mode: Mode,
    /// The fake servers verify every Nth signature (1: all). Verifying
    /// costs them about a twentieth of what signing costs stampede, on the
    /// same cores: a sample keeps the check without measuring the servers.
    #[arg(long, default_value_t = 10)]
    verify_every: usize,
    /// Unacknowledged deliveries per worker (STAMPEDE_PREFETCH).
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
}

#[derive(Debug, Args)]
struct FanoutArgs {
    #[command(flatten)]
    common: Common,
    /// Followers of the publishing actor.
    #[arg(long, default_value_t = 1_000_000)]
    followers: usize,
    /// Servers they live on (each with a shared inbox).
    #[arg(long, default_value_t = 50_000)]
    hosts: usize,
}

/// Runs a benchmark; an error when its correctness check fails.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.which {
        Which::Delivery(a) => delivery(a).await,
        Which::Fanout(a) => fanout(a).await,
        Which::Ingest(a) => ingest(a).await,
        Which::Inbound(a) => inbound(a).await,
    }
}

// ---------------------------------------------------------------- ceilings

/// RSA-2048 PKCS#1 v1.5 SHA-256 signatures per second with aws-lc-rs (the
/// library delivery signs with): on one core, and on all cores at once.
fn signing_ceiling(for_each: Duration) -> anyhow::Result<(f64, f64, usize)> {
    let key = stampede_core::keys::generate_rsa_2048()?;
    let pair = Arc::new(stampede_core::keys::load_private_key(
        &key.private_pkcs8_der,
    )?);
    let msg = b"(request-target): post /inbox\nhost: remote.example\ndate: Fri, 27 Nov 2026 12:00:00 GMT\ndigest: SHA-256=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
    let sign = move || stampede_core::signature::rsa_sha256_sign(&pair, msg).is_ok();
    let run = |threads: usize| rate_on_threads(threads, for_each, sign.clone());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok((run(1)?, run(cores)?, cores))
}

/// Successful calls of `work` per second on `threads` threads: the best of
/// three rounds of `for_each / 3`. A shared machine's rate dips while a
/// neighbour runs; the ceiling is what the machine can do, so a dip must not
/// lower it (that would flatter every ratio measured against it).
fn rate_on_threads(
    threads: usize,
    for_each: Duration,
    work: impl Fn() -> bool + Clone + Send + 'static,
) -> anyhow::Result<f64> {
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        best = best.max(one_round(threads, for_each / 3, work.clone())?);
    }
    Ok(best)
}

fn one_round(
    threads: usize,
    for_each: Duration,
    work: impl Fn() -> bool + Clone + Send + 'static,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let work = work.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while started.elapsed() < for_each {
                    if work() {
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h
            .join()
            .map_err(|_| anyhow::anyhow!("a measuring thread panicked"))?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------- process facts

/// Peak resident set of this process, MiB (`VmHWM`).
fn peak_rss_mib() -> f64 {
    peak_rss_mib_of("self")
}

/// Peak resident set of process `pid` (or `self`), MiB.
fn peak_rss_mib_of(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Starts peak-RSS accounting afresh (Linux `clear_refs` 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// CPU seconds of this process (user + system).
pub fn process_cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .map_or(0.0, |s| cpu_of_stat(&s))
}

fn cpu_of_stat(stat: &str) -> f64 {
    // Fields after the parenthesised command: state is field 3; utime 14, stime 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds of this process's threads whose name starts with `name`.
fn threads_cpu_secs(name: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    dir.flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim().starts_with(name))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .map(|s| cpu_of_stat(&s))
        .sum()
}

/// Percentiles of sorted latencies, milliseconds, with what they measure.
fn latency_json(sorted: &[f64], what: &str) -> serde_json::Value {
    json!({
        "what": what,
        "min": sorted.first().copied().unwrap_or(0.0),
        "p50": percentile(sorted, 0.5),
        "p90": percentile(sorted, 0.9),
        "p99": percentile(sorted, 0.99),
        "max": sorted.last().copied().unwrap_or(0.0),
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------- deployment

/// Fake servers on runtime threads of their own (`stampede-sink`), so their
/// CPU is measured apart from stampede's.
struct BenchSink {
    sink: Arc<Sink>,
    rt: tokio::runtime::Runtime,
}

impl BenchSink {
    async fn start(opts: SinkOptions) -> anyhow::Result<Self> {
        let rt = side_runtime("stampede-sink")?;
        let sink = Arc::new(rt.spawn(Sink::start(opts)).await??);
        Ok(Self { sink, rt })
    }

    fn stop(self) {
        self.sink.shutdown();
        drop(self.sink);
        self.rt.shutdown_background();
    }
}

/// A one-thread runtime named `name`, for what stands for the remote side
/// (fake servers, load generator): apart from stampede's runtime, its CPU
/// measured by thread name.
fn side_runtime(name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()?)
}

/// Runs the load generator on a runtime thread of its own (`stampede-load`),
/// as the remote servers are apart from stampede: not on the runtime of the
/// services it drives, whose threads are sized as `stampede up`'s.
async fn on_load_thread<T: Send + 'static>(
    load: impl std::future::Future<Output = T> + Send + 'static,
) -> anyhow::Result<T> {
    let rt = side_runtime("stampede-load")?;
    let out = rt.spawn(load).await;
    rt.shutdown_background();
    Ok(out?)
}

enum Cleanup {
    Dir(PathBuf),
    External {
        admin_url: String,
        db: String,
        amqp: String,
        redis: String,
        namespace: String,
    },
}

struct Deployment {
    p: Process,
    base: String,
    grpc: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    cleanup: Cleanup,
}

#[derive(PartialEq, Eq)]
enum Services {
    /// All four (stampede up).
    All,
    /// Fanout only: jobs stay queued for counting.
    FanoutOnly,
}

fn env(var: &str) -> anyhow::Result<String> {
    std::env::var(var).with_context(|| format!("{var}: needed by --backend external"))
}

/// Backends of a bench's own: a fresh namespace, and an embedded data
/// directory or a scratch PostgreSQL database. The variables to run with,
/// and how to clean up.
async fn scratch(kind: BackendKind) -> anyhow::Result<(HashMap<&'static str, String>, Cleanup)> {
    let ns = format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let mut vars: HashMap<&'static str, String> = HashMap::from([
        ("STAMPEDE_NAMESPACE", ns.clone()),
        ("STAMPEDE_ALLOW_PRIVATE_NETWORKS", "true".into()),
        ("STAMPEDE_INBOUND_RATE_LIMIT", "0".into()),
        // The fake servers are a hundred servers but one address and one
        // domain (127.0.0.1): rationed as one, a cold run's 1,000 key
        // fetches would wait for the next minute.
        ("STAMPEDE_KEY_FETCH_RATE_LIMIT", "0".into()),
    ]);
    let cleanup = match kind {
        BackendKind::Embedded => {
            let dir = std::env::temp_dir().join(format!("stampede-{ns}"));
            vars.insert("STAMPEDE_DATA_DIR", dir.display().to_string());
            Cleanup::Dir(dir)
        }
        BackendKind::External => {
            let (amqp, redis, admin_url) = (
                env("STAMPEDE_AMQP_URL")?,
                env("STAMPEDE_REDIS_URL")?,
                env("STAMPEDE_DATABASE_URL")?,
            );
            let db = format!("stampede_{ns}");
            let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .await?;
            let db_url = match admin_url.rsplit_once('/') {
                Some((head, _)) => format!("{head}/{db}"),
                None => bail!("STAMPEDE_DATABASE_URL has no database name"),
            };
            vars.insert("STAMPEDE_AMQP_URL", amqp.clone());
            vars.insert("STAMPEDE_REDIS_URL", redis.clone());
            vars.insert("STAMPEDE_DATABASE_URL", db_url);
            Cleanup::External {
                admin_url,
                db,
                amqp,
                redis,
                namespace: ns,
            }
        }
    };
    Ok((vars, cleanup))
}

impl Cleanup {
    async fn run(self) -> anyhow::Result<()> {
        match self {
            Cleanup::Dir(d) => {
                let _ = std::fs::remove_dir_all(d);
            }
            Cleanup::External {
                admin_url,
                db,
                amqp,
                redis,
                namespace,
            } => {
                stampede_backends::queue::amqp::AmqpQueue::connect(
                    &amqp,
                    &namespace,
                    "bench-cleanup",
                )
                .await?
                .delete_all()
                .await?;
                stampede_backends::cache::redis::RedisCache::connect(&redis, &namespace)
                    .await?
                    .delete_all()
                    .await?;
                let (client, conn) =
                    tokio_postgres::connect(&admin_url, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                    .await?;
            }
        }
        Ok(())
    }
}

async fn deploy(
    kind: BackendKind,
    services: Services,
    extra: &[(&'static str, String)],
) -> anyhow::Result<Deployment> {
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let metrics = TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", http.local_addr()?);
    let grpc_url = format!("http://{}", grpc.local_addr()?);
    let (mut vars, cleanup) = scratch(kind).await?;
    vars.insert("STAMPEDE_PUBLIC_URL", base.clone());
    vars.insert("STAMPEDE_HTTP_ADDR", http.local_addr()?.to_string());
    vars.insert("STAMPEDE_GRPC_ADDR", grpc.local_addr()?.to_string());
    vars.insert("STAMPEDE_METRICS_ADDR", metrics.local_addr()?.to_string());
    for (k, v) in extra {
        vars.insert(k, v.clone());
    }
    let cfg = Config::from_lookup(|k| vars.get(k).cloned())?;
    let shutdown = CancellationToken::new();
    let p = Process::connect(cfg, Role::AllInOne, shutdown.clone()).await?;
    let task = match services {
        Services::All => tokio::spawn(crate::up::run(
            p.clone(),
            Listeners {
                http: Some(http),
                grpc,
                metrics,
            },
        )),
        Services::FanoutOnly => {
            let f = stampede_fanout::Fanout::new(p.clone());
            tokio::spawn(async move { f.run().await.map_err(anyhow::Error::from) })
        }
    };
    Ok(Deployment {
        p,
        base,
        grpc: grpc_url,
        shutdown,
        task,
        cleanup,
    })
}

impl Deployment {
    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        drop(self.p);
        self.cleanup.run().await?;
        Ok(())
    }
}

fn write_json(path: &Option<PathBuf>, v: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_vec_pretty(v)?)
            .with_context(|| format!("writing {}", p.display()))?;
        println!("results written to {}", p.display());
    }
    Ok(())
}

// ---------------------------------------------------------------- delivery

async fn delivery(a: DeliveryArgs) -> anyhow::Result<()> {
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
        let r = delivery_run(&a, mode, all).await?;
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

async fn delivery_run(
    a: &DeliveryArgs,
    mode: Mode,
    ceiling: f64,
) -> anyhow::Result<serde_json::Value> {
    let shared = mode == Mode::Shared;
    let d = deploy(
        a.common.backend,
        Services::All,
        &[
            ("STAMPEDE_PREFETCH", a.prefetch.to_string()),
            ("STAMPEDE_LOG_FORMAT", "text".into()),
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
    let result = delivery_measure(a, mode, ceiling, &d, &sink.sink).await;
    sink.stop();
    d.stop().await?;
    result
}

async fn delivery_measure(
    a: &DeliveryArgs,
    mode: Mode,
    ceiling: f64,
    d: &Deployment,
    sink: &Sink,
) -> anyhow::Result<serde_json::Value> {
    let channel = Channel::from_shared(d.grpc.clone())?.connect().await?;
    ActorServiceClient::new(channel.clone())
        .create_actor(CreateActorRequest {
            name: "bench".into(),
            ..Default::default()
        })
        .await?;
    let store = d.p.backends.store.clone();
    let actor = store
        .actor_by_name("bench")
        .await?
        .context("the bench actor vanished")?;
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
    let note = public_note(&format!("{}/users/bench", d.base), "benchmark");
    let started = Instant::now();
    let id = PublishServiceClient::new(channel)
        .publish(PublishRequest {
            actor: "bench".into(),
            activity_json: note.to_string(),
            idempotency_key: String::new(),
        })
        .await?
        .into_inner()
        .activity_id;
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

// ---------------------------------------------------------------- fanout

/// RabbitMQ's memory per message of a queue, from `rabbitmqctl` on this
/// machine (external backend only; `None` when it cannot be asked).
async fn broker_bytes_per_message(d: &Deployment, q: QueueName) -> Option<f64> {
    let Cleanup::External {
        amqp, namespace, ..
    } = &d.cleanup
    else {
        return None;
    };
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

async fn fanout(a: FanoutArgs) -> anyhow::Result<()> {
    if a.followers == 0 || a.hosts == 0 {
        bail!("--followers and --hosts must be at least 1");
    }
    println!(
        "stampede bench fanout: one activity to {} followers on {} hosts, backend {:?}",
        a.followers, a.hosts, a.common.backend
    );
    let d = deploy(a.common.backend, Services::FanoutOnly, &[]).await?;
    let result = fanout_measure(&a, &d).await;
    d.stop().await?;
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

async fn fanout_measure(a: &FanoutArgs, d: &Deployment) -> anyhow::Result<serde_json::Value> {
    let store = d.p.backends.store.clone();
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
        &d.p.cfg,
        &d.p.backends,
        &actor,
        body.as_bytes(),
        None,
    )
    .await?;
    let deadline = started + Duration::from_secs(a.common.timeout_secs);
    let depth = || async {
        ready_messages(&*d.p.backends.queue, QueueName::Delivery)
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
    let broker = broker_bytes_per_message(d, QueueName::Delivery).await;
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

// ---------------------------------------------------------------- ingest

/// An inbound activity as a remote server would POST it (the edge checks
/// only cheap things; the signature is shaped right but not verified here:
/// the edge never verifies).
fn inbound_body(n: usize) -> (String, Vec<u8>) {
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
    let (vars, cleanup) = scratch(kind).await?;
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
    cleanup.run().await?;
    Ok(n as f64 / secs.max(1e-9))
}

async fn ingest(a: IngestArgs) -> anyhow::Result<()> {
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
    let (mut vars, cleanup) = scratch(a.common.backend).await?;
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
        match ingest_measure(&a, &vars, &base, metrics, ceiling).await {
            Err(e) if attempt < 3 && e.downcast_ref::<ChildExited>().is_some() => {
                println!("  {e}; trying other ports");
            }
            r => break r,
        }
    };
    cleanup.run().await?;
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

/// The socket address of a `http://127.0.0.1:port` base URL.
fn socket_addr(base: &str) -> anyhow::Result<std::net::SocketAddr> {
    let u = url::Url::parse(base)?;
    let host = u.host_str().context("base URL without host")?;
    let port = u.port_or_known_default().context("base URL without port")?;
    Ok(format!("{host}:{port}").parse()?)
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

async fn ingest_measure(
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

// ---------------------------------------------------------------- inbound

/// RSA-2048 verifications per second (parse + digest + verify of a cavage
/// request, as the inbox does), on one core and on all.
fn verify_ceiling(for_each: Duration) -> anyhow::Result<(f64, f64)> {
    use stampede_core::verify::{self, HttpRequest};
    let key = stampede_core::keys::generate_rsa_2048()?;
    let pair = stampede_core::keys::load_private_key(&key.private_pkcs8_der)?;
    let verifying = Arc::new(stampede_core::keys::VerifyingKey::from_pem(
        &key.public_pem,
    )?);
    let body = Arc::new(inbound_body(0).1);
    let digest = stampede_core::digest::digest_header(&body);
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let sig = stampede_core::signature::sign_request(
        &pair,
        "https://r0.bench.example/users/a0#main-key",
        "POST",
        "/inbox",
        stampede_core::signature::POST_HEADERS,
        |h| match h {
            "host" => Some("social.example"),
            "date" => Some(date.as_str()),
            "digest" => Some(digest.as_str()),
            _ => None,
        },
    )?;
    let headers = Arc::new(vec![
        ("host".to_string(), "social.example".to_string()),
        ("date".to_string(), date.clone()),
        ("digest".to_string(), digest.clone()),
        ("signature".to_string(), sig),
    ]);
    let check = move || {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let req = HttpRequest {
            method: "POST",
            scheme: "https",
            path_and_query: "/inbox",
            headers: &h,
            body: &body,
        };
        verify::parse(&req)
            .and_then(|s| {
                verify::check_coverage_and_digest(&req, &s)?;
                verify::verify_signature(&s, &verifying)
            })
            .is_ok()
    };
    let run = |threads: usize| rate_on_threads(threads, for_each, check.clone());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok((run(1)?, run(cores)?))
}

async fn inbound(a: InboundArgs) -> anyhow::Result<()> {
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
            match inbound_run(&a, &d, &sink.sink, scheme, cache, rate, one).await {
                Ok(r) => runs.push(r),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        d.stop().await?;
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
    ready_messages(&*d.p.backends.queue, QueueName::App)
        .await
        .unwrap_or(0)
}

async fn inbound_run(
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
    let accepted_before = d.p.metrics.inbound_count("verify", "accepted");
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
    let accepted = d.p.metrics.inbound_count("verify", "accepted") - accepted_before;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_percentiles() {
        let stat = "123 (stampede sink) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert!((cpu_of_stat(stat) - 3.0).abs() < 1e-9);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert!(peak_rss_mib() > 0.0);
    }
}
