//! `stampede bench delivery|fanout|ingest|inbound|influx|scale`: end-to-end benchmarks
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

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};

use crate::scratch::{BackendSet, Deployment, ExternalUrls, Purpose, Scratch, FAKE_SERVERS};

mod chart;
mod delivery;
mod fanout;
mod inbound;
mod influx;
mod ingest;
mod sampling;
mod scale;
mod shards;

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
            Which::Influx(_) | Which::Scale(_) | Which::Shards(_) => Kind::Delivery,
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
    /// The seed's story compressed: local actors with many followers on
    /// thousands of fake hosts (some dead, slow or 429ing) post while a
    /// follow storm arrives and DMs are sent; per-class latency, queue head
    /// age and delivery rate over time, host concurrency against its limit.
    Influx(InfluxArgs),
    /// Delivery as 1, 2, 4 processes (--backend external) to servers that
    /// answer after a fixed delay: steady-state deliveries/s and the ratio
    /// to one process against targets, the broker's CPU and memory per
    /// delivery.
    Scale(ScaleArgs),
    /// The broker's ceiling for delivery jobs (--backend external, a
    /// cluster's nodes in STAMPEDE_AMQP_URL): one quorum queue per class
    /// against K shards; jobs/s and the broker's CPU per job.
    Shards(ShardsArgs),
}

#[derive(Debug, Args)]
struct ShardsArgs {
    /// Shard counts (STAMPEDE_DELIVERY_SHARDS), one run each; the ratios
    /// are to the first.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    shards: Vec<u16>,
    /// Delivery jobs per run.
    #[arg(long, default_value_t = 60_000)]
    messages: usize,
    /// Connections, each publishing and consuming (the node list rotated
    /// for each, so they spread over a cluster's nodes).
    #[arg(long, default_value_t = 3)]
    connections: usize,
    /// Unacknowledged jobs per consumer.
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
    /// Jobs per confirmed batch, as fanout publishes a page.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// More ports whose listening processes are the broker's VMs.
    #[arg(long, value_delimiter = ',')]
    broker_ports: Vec<u16>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ScaleArgs {
    #[command(flatten)]
    common: Common,
    /// Numbers of `stampede serve delivery` processes, one run each; the
    /// ratios are to the first.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    replicas: Vec<usize>,
    /// Every fake server answers after this long (ms).
    #[arg(long, default_value_t = 200)]
    slow_ms: u64,
    /// Followers of the publishing actor, each with an inbox of its own:
    /// the deliveries of each run.
    #[arg(long, default_value_t = 2_000)]
    followers: usize,
    /// Fake hosts the followers are spread over (many: the processes, not
    /// the hosts' limits, bound the rate).
    #[arg(long, default_value_t = 200)]
    hosts: usize,
    /// Unacknowledged deliveries per process (STAMPEDE_PREFETCH): a process
    /// does at most prefetch / slow-ms deliveries a second.
    #[arg(long, default_value_t = 16)]
    prefetch: u16,
    /// STAMPEDE_HOST_CONCURRENCY.
    #[arg(long, default_value_t = 16)]
    host_limit: usize,
    /// The least ratio to the first run per number of processes
    /// (PROCESSES=RATIO, comma-separated); the bench fails below one.
    #[arg(long, default_value = "2=1.8,4=3.4")]
    targets: String,
    /// More ports whose listening processes are the broker's VMs, summed
    /// with those of STAMPEDE_AMQP_URL's ports (the other nodes of a
    /// cluster when the URL names one).
    #[arg(long, value_delimiter = ',')]
    broker_ports: Vec<u16>,
    /// The fake servers verify every Nth signature (1: all).
    #[arg(long, default_value_t = 10)]
    verify_every: usize,
}

#[derive(Debug, Args)]
struct InfluxArgs {
    #[command(flatten)]
    common: Common,
    /// Local actors posting.
    #[arg(long, default_value_t = 3)]
    actors: usize,
    /// Followers of each local actor (each with an inbox of its own).
    #[arg(long, default_value_t = 10_000)]
    followers: usize,
    /// Fake hosts the followers are spread over.
    #[arg(long, default_value_t = 2_000)]
    hosts: usize,
    /// Posts of each actor (public notes to its followers: the bulk class).
    #[arg(long, default_value_t = 2)]
    posts: usize,
    /// Signed Follows from remote actors to the local ones through the
    /// inbox edge, each answered with an Accept (the interactive class).
    #[arg(long, default_value_t = 2_000)]
    follows: usize,
    /// Direct messages to one remote actor each, sent between the posts
    /// (the interactive class).
    #[arg(long, default_value_t = 50)]
    dms: usize,
    /// The posts, the Follows and the DMs are spread evenly over this many
    /// seconds.
    #[arg(long, default_value_t = 10.0)]
    storm_secs: f64,
    /// Percentage of hosts down (not listening).
    #[arg(long, default_value_t = 5.0)]
    dead_pct: f64,
    /// Percentage of hosts answering in 2 to 5 s.
    #[arg(long, default_value_t = 5.0)]
    slow_pct: f64,
    /// Percentage of hosts that serve `--limited-concurrency` requests at
    /// once and answer 429 to more (at least one host when above 0).
    #[arg(long, default_value_t = 0.5)]
    limited_pct: f64,
    /// Requests a limited host serves at once.
    #[arg(long, default_value_t = 3)]
    limited_concurrency: usize,
    /// Cluster-wide limit of requests in flight to one host
    /// (STAMPEDE_HOST_CONCURRENCY); the bench fails if a host saw more.
    #[arg(long, default_value_t = 8)]
    host_limit: usize,
    /// The bench fails when the interactive class's p99 (Publish or Follow
    /// to the remote server's receipt) is above this.
    #[arg(long, default_value_t = 2_000)]
    interactive_p99_ms: u64,
    /// Run delivery as this many `stampede serve delivery` processes
    /// (--backend external only); 0: delivery in this process with the rest.
    #[arg(long, default_value_t = 0)]
    delivery_replicas: usize,
    /// STAMPEDE_RETRY_SCHEDULE_SECS for the run (the default schedule when
    /// not given): a 429 or a failure comes back after its first delay.
    #[arg(long)]
    retry_schedule_secs: Option<String>,
    /// The fake servers verify every Nth signature (1: all).
    #[arg(long, default_value_t = 10)]
    verify_every: usize,
    /// Draw queue head age and delivery rate per class over time as SVG here.
    #[arg(long)]
    svg: Option<PathBuf>,
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
    /// Requests in flight at once (the connections of the load generator);
    /// a list runs the warm run once per value (`1,16,64,256`).
    #[arg(
        long,
        alias = "concurrency",
        value_delimiter = ',',
        default_value = "64"
    )]
    connections: Vec<usize>,
    /// After each warm run, one more at this many POSTs a second, open loop,
    /// for the latency at that rate (0: skip it).
    #[arg(long, default_value_t = 15_000.0)]
    rate: f64,
    /// Which inbox the activities are POSTed to.
    #[arg(long, value_enum, default_value = "shared")]
    inbox: InboxKind,
    /// What is POSTed: a small `Like`, or a `Create` of a note of about
    /// 2.4 KB (what most of the fediverse's traffic is).
    #[arg(long, value_enum, default_value = "like")]
    activity: ActivityKind,
    /// Consume the application's stream through `InboundService.Subscribe`
    /// (acknowledged as `stampede tail` does), as a real application, rather
    /// than count it in the queue.
    #[arg(long)]
    subscribe: bool,
    /// Run ingest and inbox each as a process of its own (`stampede serve
    /// ingest`, `stampede serve inbox`), as production does, rather than in
    /// the bench's process; their CPU is read from /proc. External backends
    /// only.
    #[arg(long)]
    processes: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum InboxKind {
    /// `POST /users/bench/inbox` (a local actor's own).
    Personal,
    /// `POST /inbox`.
    Shared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ActivityKind {
    /// A `Like` (about 250 bytes).
    Like,
    /// A `Create` of a note, about 2.4 KB.
    Create,
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
    /// STAMPEDE_SIGNATURE_STYLE for the run: `cavage` signs as before
    /// signature styles were remembered (no memory looked at), `auto` (the
    /// default) looks each host up once per process, then in memory.
    #[arg(long, default_value = "auto")]
    signature_style: String,
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
        Which::Influx(a) => influx::run(a).await,
        Which::Scale(a) => scale::run(a).await,
        Which::Shards(a) => shards::run(a).await,
    }
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

/// Backends of a bench's own ([`Scratch`]: a fresh namespace, and an
/// embedded data directory or a scratch PostgreSQL database next to
/// STAMPEDE_DATABASE_URL), and the variables to run on them with, for fake
/// servers on this machine.
async fn scratch(kind: BackendKind) -> anyhow::Result<(HashMap<&'static str, String>, Scratch)> {
    let backends = match kind {
        BackendKind::Embedded => BackendSet::Embedded,
        BackendKind::External => BackendSet::External(ExternalUrls {
            amqp: env("STAMPEDE_AMQP_URL")?,
            redis: env("STAMPEDE_REDIS_URL")?,
            admin_database: env("STAMPEDE_DATABASE_URL")?,
        }),
    };
    let scratch = Scratch::create(Purpose::Bench, backends).await?;
    let mut vars = scratch.vars();
    vars.extend(FAKE_SERVERS.map(|(k, v)| (k, v.to_string())));
    Ok((vars, scratch))
}

/// stampede in this process on backends of the bench's own, with `extra`
/// settings.
async fn deploy(
    kind: BackendKind,
    services: Services,
    extra: &[(&'static str, String)],
) -> anyhow::Result<Deployment> {
    let (vars, scratch) = scratch(kind).await?;
    let settings = vars.into_iter().chain(extra.iter().cloned());
    match services {
        Services::All => Deployment::start(scratch, settings, |_| {}, crate::up::run).await,
        Services::FanoutOnly => {
            Deployment::start(
                scratch,
                settings,
                |_| {},
                |p, _| async move {
                    stampede_fanout::Fanout::new(p)
                        .run()
                        .await
                        .map_err(anyhow::Error::from)
                },
            )
            .await
        }
    }
}

/// Stops a bench's deployment, giving its services 30 s (how they end is
/// not what a bench checks), and removes its backends.
/// Creates the local actor `name` through the gRPC API of `d` and reads
/// it back from the store; the channel for more calls.
async fn bench_actor(
    d: &Deployment,
    name: &str,
) -> anyhow::Result<(
    tonic::transport::Channel,
    stampede_backends::store::LocalActor,
)> {
    use stampede_proto::api::actor_service_client::ActorServiceClient;
    use stampede_proto::api::CreateActorRequest;
    let channel = tonic::transport::Channel::from_shared(d.grpc.clone())?
        .connect()
        .await?;
    ActorServiceClient::new(channel.clone())
        .create_actor(CreateActorRequest {
            name: name.into(),
            ..Default::default()
        })
        .await?;
    let actor = d
        .process
        .backends
        .store
        .actor_by_name(name)
        .await?
        .context("the bench actor vanished")?;
    Ok((channel, actor))
}

/// `stampede up` with `vars` on `scratch`, and count-only fake servers
/// (personal inboxes) beside it; the deployment is stopped again when the
/// servers fail to start.
async fn deployment_and_sink(
    scratch: Scratch,
    vars: impl IntoIterator<Item = (&'static str, String)>,
    hosts: usize,
    verify_every: usize,
) -> anyhow::Result<(Deployment, sampling::BenchSink)> {
    let d = Deployment::start(scratch, vars, |_| {}, crate::up::run).await?;
    let sink = sampling::BenchSink::start(stampede_sink::SinkOptions {
        servers: hosts,
        shared_inbox: std::sync::Arc::new(|_| false),
        verify_every,
        count_only: true,
        ..stampede_sink::SinkOptions::default()
    })
    .await;
    match sink {
        Ok(s) => Ok((d, s)),
        Err(e) => {
            stop(d).await?;
            Err(e)
        }
    }
}

/// Publishes a public note by `actor` of `d` through the gRPC API; its id.
async fn publish_note(
    channel: tonic::transport::Channel,
    d: &Deployment,
    actor: &str,
    text: &str,
) -> anyhow::Result<String> {
    use stampede_proto::api::publish_service_client::PublishServiceClient;
    use stampede_proto::api::PublishRequest;
    let note = stampede_core::activity::public_note(&format!("{}/users/{actor}", d.base), text);
    Ok(PublishServiceClient::new(channel)
        .publish(PublishRequest {
            actor: actor.into(),
            activity_json: note.to_string(),
            idempotency_key: String::new(),
        })
        .await?
        .into_inner()
        .activity_id)
}

/// Kills the extra delivery processes; how those that had exited by
/// themselves ended.
async fn stop_replicas(replicas: Vec<tokio::process::Child>) -> Vec<String> {
    let mut exited = Vec::new();
    for mut child in replicas {
        if let Ok(Some(status)) = child.try_wait() {
            exited.push(status.to_string());
        }
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    exited
}

async fn stop(d: Deployment) -> anyhow::Result<()> {
    let (_, scratch) = d.stop(Some(Duration::from_secs(30))).await;
    scratch.remove().await
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
