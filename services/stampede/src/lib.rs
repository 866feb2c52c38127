//! Binary crate: the `stampede` command. `serve` runs one service as its own
//! process; the rest talk gRPC to ONE address, ingest's (README, "gRPC API"), taken
//! from `--server` or `STAMPEDE_GRPC_ADDR`.
#![deny(missing_docs)]

mod bench;
mod client;
mod demo;
mod json;
mod loadgen;
pub mod scratch;
mod sink;
pub mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use stampede_runtime::process::run_main;
use stampede_runtime::{Role, ServiceKind as Kind};

/// The stampede command line.
#[derive(Debug, Parser)]
#[command(
    name = "stampede",
    version,
    about = "Federation delivery for the fediverse"
)]
pub struct Cli {
    /// gRPC address of ingest (host:port or URL).
    #[arg(
        long,
        global = true,
        env = "STAMPEDE_GRPC_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    server: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs ingest, inbox, fanout and delivery in one process.
    Up,
    /// Runs one service as its own process (RabbitMQ, Redis and PostgreSQL required).
    Serve {
        /// The service.
        service: Service,
    },
    /// Applies the PostgreSQL schema migrations and exits.
    Migrate,
    /// Local actors.
    Actor {
        #[command(subcommand)]
        command: ActorCommand,
    },
    /// Publishes an activity as a local actor.
    Publish {
        /// The local actor's name.
        #[arg(long)]
        actor: String,
        /// A file holding the activity JSON (`-` for standard input).
        #[arg(long, conflicts_with = "text", required_unless_present = "text")]
        file: Option<PathBuf>,
        /// Text of a public note (becomes a Create{Note} to the public and followers).
        #[arg(long)]
        text: Option<String>,
        /// Makes the call idempotent: the same key publishes once.
        #[arg(long, default_value = "")]
        idempotency_key: String,
    },
    /// Queue depths, delivery counts, failing hosts and what parked deliveries wait for.
    Status {
        /// One JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Prints verified inbound activities as they come, one JSON object a line.
    ///
    /// When the connection to the server is lost, says so on standard error
    /// and reconnects with backoff; activities not yet acknowledged come
    /// again (at least once).
    Tail {
        /// How long to keep trying to reconnect before giving up (exit 1).
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        reconnect_for: u64,
    },
    /// Dead letters.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Per-host delivery controls.
    Host {
        #[command(subcommand)]
        command: HostCommand,
    },
    /// Which servers we are behind on: per host, deliveries pending and
    /// their mean age, in flight, limit, circuit, last answer, policy.
    Hosts {
        /// At most this many hosts.
        #[arg(long, default_value_t = 20)]
        top: u32,
        /// Order: most pending first, oldest backlog first, or most failures first.
        #[arg(long, value_enum, default_value_t = HostSort::Pending)]
        sort: HostSort,
    },
    /// Published activities.
    Activity {
        #[command(subcommand)]
        command: ActivityCommand,
    },
    /// Remote domain policies, applied by every process within 5 s.
    Domain {
        #[command(subcommand)]
        command: DomainCommand,
    },
    /// Fake remote servers on 127.0.0.1 that verify every delivery they get.
    Sink(sink::SinkArgs),
    /// Benchmarks against this machine's own ceiling: delivery, fanout, ingest, inbound.
    Bench(bench::BenchArgs),
    /// Shows stampede at work in a minute: embedded stampede plus fake
    /// servers that follow, fail, slow down and die, live progress, a summary.
    Demo(demo::DemoArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Service {
    Ingest,
    Inbox,
    Fanout,
    Delivery,
}

#[derive(Debug, Subcommand)]
enum ActorCommand {
    /// Creates a local actor (stampede generates its RSA-2048 key).
    Create {
        /// Preferred username: 1 to 64 of [a-z0-9_].
        name: String,
        /// Display name.
        #[arg(long, default_value = "")]
        display_name: String,
        /// Follow requests wait for the application's decision.
        #[arg(long)]
        manually_approves_followers: bool,
    },
    /// Shows a local actor.
    Get {
        /// The name.
        name: String,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Deletes a local actor with its keys, followers and activities. No
    /// remote server is told; its inbox answers 404 from then on.
    Delete {
        /// The name.
        name: String,
        /// Yes, delete it (without this the verb only says what it would do).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum HostCommand {
    /// Parks deliveries to HOST (as in inbox URLs: name, with :port if not the default).
    Pause {
        /// The host.
        host: String,
    },
    /// Resumes deliveries to HOST.
    Resume {
        /// The host.
        host: String,
    },
    /// Hosts whose deliveries are failing, longest failing first.
    List {
        /// Only those failing for STAMPEDE_HOST_UNAVAILABLE_SECS (fanout
        /// skips them until they are found back).
        #[arg(long)]
        unavailable: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum HostSort {
    Pending,
    Oldest,
    Failures,
}

#[derive(Debug, Subcommand)]
enum ActivityCommand {
    /// Where an activity's deliveries are: targets by state, from the
    /// durable records.
    Status {
        /// The activity's id (as `publish` printed it).
        id: String,
        /// With a line per host.
        #[arg(long)]
        hosts: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DomainCommand {
    /// Nothing in or out: inbound refused (403), no deliveries, its follows
    /// of local actors removed and its keys forgotten.
    Suspend {
        /// The domain (its subdomains are covered unless they have a rule).
        domain: String,
        /// Why, for the other operators.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Federates, but its activities reach the application marked `silenced`.
    Silence {
        /// The domain.
        domain: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Federates (in allow-list mode, only allowed domains do).
    Allow {
        /// The domain.
        domain: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Removes the domain's rule.
    Remove {
        /// The domain.
        domain: String,
    },
    /// Lists the rules and the federation mode.
    List,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Lists dead letters, newest first.
    List {
        /// Only this inbox host.
        #[arg(long)]
        host: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// One JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Queues dead letters for delivery again.
    Replay {
        /// One dead letter.
        #[arg(long, conflicts_with_all = ["host", "all"], required_unless_present_any = ["host", "all"])]
        id: Option<String>,
        /// Every dead letter of this inbox host.
        #[arg(long, conflicts_with = "all")]
        host: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Deletes dead letters for good, replayed or not.
    Purge {
        /// Every dead letter of this inbox host.
        #[arg(long, conflicts_with = "all")]
        host: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

/// Entry point of the `stampede` binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // Every remote host delivered to keeps a pooled connection, and every
    // remote server posting keeps one open at the edge: raise the soft
    // open-file limit to the hard one (often 1,024 against 500,000 or more),
    // as servers do. Where it cannot be raised, the limit stays as it was.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    match cli.command {
        Command::Serve { service } => match service {
            Service::Ingest => run_main(Role::Service(Kind::Ingest), stampede_ingest::serve),
            Service::Inbox => run_main(Role::Service(Kind::Inbox), stampede_inbox::serve),
            Service::Fanout => run_main(Role::Service(Kind::Fanout), stampede_fanout::serve),
            Service::Delivery => run_main(Role::Service(Kind::Delivery), stampede_delivery::serve),
        },
        Command::Up => run_main(Role::AllInOne, up::run),
        command => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Command::Bench(args) = &command {
                // The benches run stampede's services in this process: on
                // as many runtime threads as `stampede up` running them would.
                if let Ok(cfg) = stampede_runtime::Config::from_env() {
                    builder.worker_threads(cfg.runtime_threads_for(args.runs_as()));
                }
            }
            let rt = match builder.enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let _runtime = rt.enter();
            if matches!(command, Command::Demo(_) | Command::Bench(_)) {
                stampede_runtime::telemetry::init_with_default("error");
            } else {
                stampede_runtime::telemetry::init();
            }
            match rt.block_on(run(&cli.server, command)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(server: &str, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { .. } | Command::Up => unreachable_serve(),
        Command::Migrate => {
            let cfg = stampede_runtime::Config::from_env()?;
            let url = cfg.database_url.context(
                "STAMPEDE_DATABASE_URL: not set (migrate applies the PostgreSQL schema)",
            )?;
            let store = stampede_backends::store::postgres::PgStore::connect_with(
                url.expose(),
                1,
                cfg.database_statements,
            )?;
            stampede_backends::store::Store::migrate(&store)
                .await
                .context("failed to apply migrations")?;
            println!("migrations applied");
            Ok(())
        }
        Command::Actor { command } => {
            let c = client::Client::connect(server).await?;
            match command {
                ActorCommand::Create {
                    name,
                    display_name,
                    manually_approves_followers,
                } => {
                    let a = c
                        .create_actor(name, display_name, manually_approves_followers)
                        .await?;
                    println!("created {}", a.id);
                    println!("  inbox        {}", a.inbox);
                    println!("  shared inbox {}", a.shared_inbox);
                    println!("  key          {}", a.key_id);
                }
                ActorCommand::Get { name, json } => {
                    let a = c.get_actor(name).await?;
                    if json {
                        println!("{}", json::actor(&a));
                        return Ok(());
                    }
                    println!("{}", a.id);
                    println!("  followers    {}", a.followers_count);
                    println!("  inbox        {}", a.inbox);
                    println!("  key          {}", a.key_id);
                }
                ActorCommand::Delete { name, yes } => {
                    let a = c.get_actor(name.clone()).await?;
                    if !yes {
                        anyhow::bail!(
                            "deleting {} would take its key, its {} followers and its activities with it, and tell no remote server; run again with --yes",
                            a.id,
                            a.followers_count
                        );
                    }
                    c.delete_actor(name).await?;
                    println!("deleted {}", a.id);
                }
            }
            Ok(())
        }
        Command::Publish {
            actor,
            file,
            text,
            idempotency_key,
        } => {
            let c = client::Client::connect(server).await?;
            let json = match (file, text) {
                (Some(path), _) if path.as_os_str() == "-" => {
                    std::io::read_to_string(std::io::stdin()).context("failed to read stdin")?
                }
                (Some(path), _) => std::fs::read_to_string(&path)
                    .with_context(|| format!("failed to read {}", path.display()))?,
                (None, Some(text)) => {
                    // The note is addressed to the actor's followers collection,
                    // so it needs the actor's id; the server assigns the ids.
                    let a = c.get_actor(actor.clone()).await?;
                    stampede_core::activity::public_note(&a.id, &text).to_string()
                }
                (None, None) => anyhow::bail!("give --file or --text"),
            };
            let r = c.publish(actor, json, idempotency_key).await?;
            if r.created {
                println!("published {}", r.activity_id);
            } else {
                println!("already published {} (same idempotency key)", r.activity_id);
            }
            Ok(())
        }
        Command::Tail { reconnect_for } => {
            use std::io::Write;
            let stdout = std::io::stdout();
            let print = |a: &stampede_proto::api::InboundActivity| {
                let activity: serde_json::Value = serde_json::from_str(&a.activity_json)
                    .unwrap_or_else(|_| serde_json::Value::String(a.activity_json.clone()));
                let line = serde_json::json!({
                    "verdict": a.verdict,
                    "recipient_inbox": a.recipient_inbox,
                    "actor": a.actor,
                    "activity": activity,
                });
                let mut out = stdout.lock();
                writeln!(out, "{line}")?;
                out.flush()?;
                Ok(())
            };
            tail(server, reconnect_for, print).await
        }
        Command::Status { json } => {
            let c = client::Client::connect(server).await?;
            let s = c.status().await?;
            if json {
                println!("{}", json::status(&s));
                return Ok(());
            }
            println!(
                "{:<40} {:>10} {:>10} {:>12} {:>9}",
                "QUEUE", "MESSAGES", "CONSUMERS", "CLASS", "HEAD AGE"
            );
            for q in &s.queues {
                // Head age: delivery classes only (what a user waits for).
                let age = if q.class.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.1}s", q.head_age_ms as f64 / 1000.0)
                };
                let class = if q.class.is_empty() { "-" } else { &q.class };
                println!(
                    "{:<40} {:>10} {:>10} {:>12} {:>9}",
                    q.queue, q.messages, q.consumers, class, age
                );
            }
            println!();
            println!("activities   {}", s.activities);
            println!("delivered    {}", s.delivered);
            println!("failed       {}", s.failed);
            if !s.failing_hosts.is_empty() {
                println!();
                print_failing_hosts(&s.failing_hosts);
            }
            if !s.paused_hosts.is_empty() {
                println!("paused hosts {}", s.paused_hosts.join(", "));
            }
            if !s.parked.is_empty() {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                println!(
                    "\n{:<32} {:>10} {:>14}",
                    "PARKED (WAITING, NOT TRIED)", "DELIVERIES", "NEXT DUE IN"
                );
                for p in &s.parked {
                    println!(
                        "{:<32} {:>10} {:>13}s",
                        p.reason,
                        p.deliveries,
                        ((p.next_due_unix_ms - now).max(0) as u64).div_ceil(1000)
                    );
                }
            }
            if !s.busy_hosts.is_empty() {
                println!(
                    "\n{:<32} {:>10} {:>10} {:>9} {:>6}",
                    "BUSY HOST (LAST 1-2 MIN)", "DELIVERIES", "LATENCY", "IN FLIGHT", "LIMIT"
                );
                for h in &s.busy_hosts {
                    println!(
                        "{:<32} {:>10} {:>8}ms {:>9} {:>6}",
                        h.host, h.deliveries, h.latency_ms, h.in_flight, h.limit
                    );
                }
            }
            Ok(())
        }
        Command::Dlq { command } => {
            // Refused before anything is asked of the server: a purge is
            // for good, so everything is never the default.
            if let DlqCommand::Purge { host, all: false } = &command {
                if host.as_deref().is_none_or(|h| h.trim().is_empty()) {
                    anyhow::bail!(
                        "dlq purge deletes dead letters for good: name the host with \
                         --host H, or purge every one with --all"
                    );
                }
            }
            let c = client::Client::connect(server).await?;
            match command {
                DlqCommand::Replay { id, host, all } => {
                    let n = c
                        .replay(id.unwrap_or_default(), host.unwrap_or_default(), all)
                        .await?;
                    println!("replayed {n} dead letters");
                }
                DlqCommand::Purge { host, all } => {
                    let n = c.purge(host.unwrap_or_default(), all).await?;
                    println!("purged {n} dead letters");
                }
                DlqCommand::List { host, limit, json } => {
                    let rows = c.dead_letters(host.unwrap_or_default(), limit).await?;
                    if json {
                        println!("{}", json::dead_letters(&rows));
                        return Ok(());
                    }
                    println!(
                        "{:<8} {:<28} {:>6} {:>8}  {:<40} REASON",
                        "ID", "HOST", "STATUS", "ATTEMPTS", "ACTIVITY"
                    );
                    for d in rows {
                        let status = if d.last_status == 0 {
                            "-".to_string()
                        } else {
                            d.last_status.to_string()
                        };
                        println!(
                            "{:<8} {:<28} {:>6} {:>8}  {:<40} {}",
                            d.id, d.host, status, d.attempts, d.activity_id, d.reason
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Host { command } => {
            let c = client::Client::connect(server).await?;
            let (host, paused) = match command {
                HostCommand::Pause { host } => (host, true),
                HostCommand::Resume { host } => (host, false),
                HostCommand::List { unavailable, limit } => {
                    let hosts = c.failing_hosts(unavailable, limit).await?;
                    print_failing_hosts(&hosts);
                    return Ok(());
                }
            };
            c.set_host_paused(host.clone(), paused).await?;
            println!("{host} {}", if paused { "paused" } else { "resumed" });
            Ok(())
        }
        Command::Hosts { top, sort } => {
            let c = client::Client::connect(server).await?;
            let sort = match sort {
                HostSort::Pending => "pending",
                HostSort::Oldest => "oldest",
                HostSort::Failures => "failures",
            };
            let hosts = c.hosts(sort.into(), top).await?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let ago = |ms: i64| {
                if ms <= 0 {
                    "-".to_string()
                } else {
                    format!("{}s ago", (now - ms).max(0) / 1000)
                }
            };
            println!(
                "{:<32} {:>8} {:>8} {:>9} {:>5} {:<11} {:>8} {:>6} {:>12} {:>12} POLICY",
                "HOST",
                "PENDING",
                "AGE",
                "IN FLIGHT",
                "LIMIT",
                "CIRCUIT",
                "FAILURES",
                "LAST",
                "ANSWERED",
                "LAST 2XX"
            );
            for h in hosts {
                let last = if h.last_answer_unix_ms == 0 {
                    "-".to_string()
                } else if h.last_status == 0 {
                    "none".to_string()
                } else {
                    h.last_status.to_string()
                };
                println!(
                    "{:<32} {:>8} {:>7}s {:>9} {:>5} {:<11} {:>8} {:>6} {:>12} {:>12} {}",
                    h.host,
                    h.pending,
                    h.pending_age_secs,
                    h.in_flight,
                    h.limit,
                    h.circuit,
                    h.failures,
                    last,
                    ago(h.last_answer_unix_ms),
                    ago(h.last_success_unix_ms),
                    h.policy
                );
            }
            Ok(())
        }
        Command::Activity {
            command: ActivityCommand::Status { id, hosts },
        } => {
            let c = client::Client::connect(server).await?;
            let d = c.activity_delivery(id, hosts).await?;
            println!(
                "{} ({})",
                d.activity_id,
                if d.fanned_out {
                    "fanned out"
                } else {
                    "fanout in progress"
                }
            );
            let header = || {
                println!(
                    "{:<32} {:>7} {:>7} {:>9} {:>8} {:>6} {:>7} {:>11} {:>10}",
                    "HOST",
                    "TOTAL",
                    "PENDING",
                    "DELIVERED",
                    "RETRYING",
                    "DEAD",
                    "POLICY",
                    "UNAVAILABLE",
                    "SUPERSEDED"
                )
            };
            let line = |name: &str, k: &stampede_proto::api::DeliveryCounts| {
                println!(
                    "{:<32} {:>7} {:>7} {:>9} {:>8} {:>6} {:>7} {:>11} {:>10}",
                    name,
                    k.total,
                    k.pending,
                    k.delivered,
                    k.retrying,
                    k.dead_lettered,
                    k.skipped_policy,
                    k.skipped_unavailable,
                    k.superseded
                )
            };
            header();
            for h in &d.hosts {
                line(&h.host, &h.counts.unwrap_or_default());
            }
            line("(all)", &d.counts.unwrap_or_default());
            Ok(())
        }
        Command::Domain { command } => {
            let c = client::Client::connect(server).await?;
            let (domain, policy, reason) = match command {
                DomainCommand::List => {
                    let r = c.domain_policies().await?;
                    println!("federation mode: {}", r.mode);
                    println!("{:<40} {:<8} {:<29} REASON", "DOMAIN", "POLICY", "CHANGED");
                    for p in r.policies {
                        println!(
                            "{:<40} {:<8} {:<29} {}",
                            p.domain,
                            p.policy,
                            unix_ms_utc(p.updated_unix_ms),
                            p.reason
                        );
                    }
                    return Ok(());
                }
                DomainCommand::Remove { domain } => {
                    if c.remove_domain_policy(domain.clone()).await? {
                        println!("{domain}: rule removed");
                    } else {
                        println!("{domain}: had no rule");
                    }
                    return Ok(());
                }
                DomainCommand::Suspend { domain, reason } => (domain, "suspend", reason),
                DomainCommand::Silence { domain, reason } => (domain, "silence", reason),
                DomainCommand::Allow { domain, reason } => (domain, "allow", reason),
            };
            let p = c.set_domain_policy(domain, policy, reason).await?;
            if policy == "suspend" {
                println!(
                    "{} suspended: {} follows removed, {} keys forgotten",
                    p.domain, p.follows_removed, p.keys_forgotten
                );
            } else {
                println!("{}: {}", p.domain, p.policy);
            }
            Ok(())
        }
        Command::Sink(args) => sink::run(args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Bench(args) => bench::run(args).await,
    }
}

/// A bad command line as one line (clap's error up to its first blank
/// line, and the usage), exit status 2; help and version as clap prints
/// them.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let text = e.render().to_string();
    let message: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let usage = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Usage: "))
        .map(|u| format!(" (usage: {u})"))
        .unwrap_or_default();
    eprintln!("{}{usage}", message.join(" "));
    ExitCode::from(2)
}

/// `stampede tail`: prints each activity with `print`; when the connection
/// is lost, says so on standard error and reconnects with backoff (250 ms
/// doubling to 5 s) for up to `reconnect_for` seconds, then gives up naming
/// the address.
async fn tail(
    server: &str,
    reconnect_for: u64,
    mut print: impl FnMut(&stampede_proto::api::InboundActivity) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use client::TailError;
    use std::time::{Duration, Instant};
    let limit = Duration::from_secs(reconnect_for);
    let mut c = client::Client::connect(server).await?;
    loop {
        let why = match c.tail(&mut print).await {
            TailError::Refused(e) | TailError::Output(e) => return Err(e),
            TailError::Lost(why) => why,
        };
        let url = c.url().to_string();
        eprintln!(
            "tail: lost stampede at {url}: {why}; reconnecting for up to {reconnect_for} s \
             (activities not yet acknowledged come again)"
        );
        let since = Instant::now();
        let mut delay = Duration::from_millis(250);
        c = loop {
            let left = limit.saturating_sub(since.elapsed());
            if left.is_zero() {
                anyhow::bail!(
                    "lost stampede at {url} ({why}) and could not reconnect within {reconnect_for} s"
                );
            }
            tokio::time::sleep(delay.min(left)).await;
            match client::Client::connect(server).await {
                Ok(c) => {
                    eprintln!("tail: reconnected to {url}");
                    break c;
                }
                Err(e) => {
                    delay = (delay * 2).min(Duration::from_secs(5));
                    eprintln!("tail: {e:#}; trying again in {:.1} s", delay.as_secs_f64());
                }
            }
        };
    }
}

/// The failing hosts table (`status`, `host list`).
fn print_failing_hosts(hosts: &[stampede_proto::api::FailingHost]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    println!(
        "{:<32} {:>9} {:>14} {:>14}",
        "FAILING HOST", "FAILURES", "FAILING FOR", "CIRCUIT"
    );
    for h in hosts {
        let circuit = if h.unavailable {
            "unavailable".to_string()
        } else if h.circuit_open_until_unix_ms > now {
            format!("open {}s", (h.circuit_open_until_unix_ms - now) / 1000)
        } else {
            "half-open".to_string()
        };
        println!(
            "{:<32} {:>9} {:>13}s {:>14}",
            h.host,
            h.failures,
            (now - h.failing_since_unix_ms).max(0) / 1000,
            circuit
        );
    }
}

/// An HTTP date (`Sun, 06 Dec 2026 15:26:16 GMT`) for unix milliseconds.
fn unix_ms_utc(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    httpdate::fmt_http_date(t)
}

fn unreachable_serve() -> anyhow::Result<()> {
    anyhow::bail!("serve runs from main")
}
