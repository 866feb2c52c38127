//! `stampede bench delivery|fanout|ingest|inbound`: end-to-end benchmarks
//! against this machine's own ceiling, measured first in the same run, with a
//! correctness check that fails the bench (nothing lost, nothing duplicated).
//!
//! Everything runs in this process: stampede (all in one, on the embedded
//! backends or on RabbitMQ/Redis/PostgreSQL), and for delivery a sink of
//! fake servers on its own runtime threads (`stampede-sink`) so its CPU is
//! reported apart. This module holds the flags and what the benches share;
//! each bench is a module of its own, and [`sampling`] measures.
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};

use stampede_runtime::process::{Listeners, Process};
use stampede_runtime::Config;
use stampede_runtime::Role;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod delivery;
mod fanout;
mod inbound;
mod ingest;
mod sampling;

pub(crate) use sampling::process_cpu_secs;

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
        Which::Delivery(a) => delivery::run(a).await,
        Which::Fanout(a) => fanout::run(a).await,
        Which::Ingest(a) => ingest::run(a).await,
        Which::Inbound(a) => inbound::run(a).await,
    }
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

/// The socket address of a `http://127.0.0.1:port` base URL.
fn socket_addr(base: &str) -> anyhow::Result<std::net::SocketAddr> {
    let u = url::Url::parse(base)?;
    let host = u.host_str().context("base URL without host")?;
    let port = u.port_or_known_default().context("base URL without port")?;
    Ok(format!("{host}:{port}").parse()?)
}
