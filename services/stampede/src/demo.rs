//! `stampede demo`: stampede on embedded defaults plus a sink of fake remote
//! servers in one process. The sink's actors follow a local actor through
//! real signed Follow requests, some servers then die, slow down or fail for
//! a while, the local actor posts, and the demo shows delivery live and ends
//! with a table whose counts it checks against what the servers received.
//!
//! Long on purpose: the demo is one story told in order (settings, follow,
//! misbehaving servers, publish, live progress, summary, check), read top
//! to bottom; its deployment is `scratch.rs`'s.
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use stampede_backends::queue::{ready_deliveries, ready_messages, QueueName};
use stampede_core::activity::public_note;
use stampede_federation::parked::{self, Parked, Reason};
use stampede_proto::api::actor_service_client::ActorServiceClient;
use stampede_proto::api::publish_service_client::PublishServiceClient;
use stampede_proto::api::{CreateActorRequest, PublishRequest};
use stampede_runtime::metrics::DeliveryOutcome;
use stampede_runtime::process::Process;
use stampede_runtime::Config;
use stampede_sink::{Behavior, Sink, SinkOptions};
use tonic::transport::Channel;

use crate::scratch::{BackendSet, Deployment, Purpose, Scratch, FAKE_SERVERS};

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
    /// Keep the admin console open after the summary, until Ctrl-C, and
    /// the demo's data directory (printed at the start) after it.
    #[arg(long)]
    keep: bool,
    /// Without --keep, on a terminal: how long the console stays up after
    /// the summary.
    #[arg(long, default_value_t = 60)]
    console_secs: u64,
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

/// The demo's delivery settings: production's story (retries, a circuit
/// that opens, probes that double, a host given up as unavailable) told in
/// seconds instead of days. The timings fit together: a failing server
/// answers 503 for a second, so its circuit, if it opens, opens within
/// about 1.2 s of its first failure (its fifth failure, at the latest on the
/// first retries) and its first probe, 2 s later, finds it back well before
/// it could count as unavailable (4 s after its first failure: a host is
/// only found back by a delivery or a probe, and an unavailable host's
/// deliveries are dead-lettered while its circuit is open). A dead server's
/// deliveries, parked behind its circuit, come back when it turns
/// unavailable and are dead-lettered.
const DEMO_SETTINGS: [(&str, &str); 5] = [
    // A server without a shared inbox gets a POST per follower: 30 at once
    // for ten followers and three posts. 16 in flight to a host (8 by
    // default) serves a slow one in two rounds, where 8 would park the
    // half its lane cannot hold for 5 s and more.
    ("STAMPEDE_HOST_CONCURRENCY", "16"),
    // Retries after 1, 2 and 4 s (±20 %), then a dead letter.
    ("STAMPEDE_RETRY_SCHEDULE_SECS", "1,2,4"),
    // Five failures in a row open a host's circuit...
    ("STAMPEDE_CIRCUIT_FAILURES", "5"),
    // ...for 2 s, then 4, 8... after each failed probe.
    ("STAMPEDE_CIRCUIT_OPEN_SECS", "2"),
    // A host found back gets its whole concurrency at once.
    ("STAMPEDE_HOST_RAMP_SECS", "0"),
];
/// A host failing this long is unavailable: its deliveries are dead
/// letters. Set in code: `STAMPEDE_HOST_UNAVAILABLE_SECS` refuses less than
/// a minute, a guard against an operator's slip of units.
const DEMO_HOST_UNAVAILABLE: Duration = Duration::from_secs(4);
/// How long failing servers answer 503: less than a circuit's first
/// opening, so the first probe finds them back.
const FAILING_FOR: Duration = Duration::from_secs(1);

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
    let scratch = Scratch::create(Purpose::Demo, BackendSet::Embedded).await?;
    let data_dir = scratch
        .data_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    println!("stampede on embedded defaults, data in {data_dir}");
    let settings = FAKE_SERVERS
        .into_iter()
        .chain([("STAMPEDE_DELIVERY_TIMEOUT_SECS", "10")])
        .chain(DEMO_SETTINGS)
        .map(|(k, v)| (k, v.to_string()));
    let d = Deployment::start(
        scratch,
        settings,
        |cfg| cfg.host_unavailable_after = DEMO_HOST_UNAVAILABLE,
        crate::up::run,
    )
    .await?;
    println!(
        "console:  {} (the admin console: watch the run there)",
        d.console
    );
    let result = drive(
        &args,
        &d.process,
        &d.base,
        &d.grpc,
        class_of,
        (n_dead, n_slow, n_failing),
    )
    .await;
    keep_console(&args, &d.console).await;
    let (ended, scratch) = d.stop(None).await;
    if let Err(e) = ended {
        eprintln!("{e:#}");
    }
    if args.keep {
        println!("data kept in {data_dir}");
    } else {
        let _ = scratch.remove().await;
    }
    result
}

/// Keeps the console up after the summary: until Ctrl-C with `--keep`,
/// else for `--console-secs` when a person is watching (a terminal).
async fn keep_console(args: &DemoArgs, console: &str) {
    let wait = if args.keep {
        println!("console:  {console} stays open; Ctrl-C to stop");
        None
    } else if std::io::stdout().is_terminal() && args.console_secs > 0 {
        println!(
            "console:  {console} stays up for {} s (--keep to keep it open; Ctrl-C to stop now)",
            args.console_secs
        );
        Some(Duration::from_secs(args.console_secs))
    } else {
        return;
    };
    match wait {
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
        Some(d) => {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
    }
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
        // The Accepts counted too: a server has an Accept a moment before
        // stampede counts it delivered, and one counted after the counts
        // below are taken would pass for a post's delivery.
        let counted = p.metrics.delivery_count(DeliveryOutcome::Delivered);
        if n as usize == args.followers
            && accepts == args.followers
            && counted as usize >= args.followers
        {
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
    // The failing servers come back after a while.
    let recover = {
        let sink = sink.clone();
        let failing: Vec<usize> = (0..sink.len())
            .filter(|&i| class_of(i) == Class::Failing)
            .collect();
        tokio::spawn(async move {
            tokio::time::sleep(FAILING_FOR).await;
            for i in failing {
                let _ = sink.set_behavior(i, Behavior::Ok);
            }
        })
    };
    // Deliveries per second over the last two seconds.
    let mut window: std::collections::VecDeque<(Instant, u64)> = Default::default();
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let done = loop {
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
        // Once the queue is empty, what is left is in flight or parked:
        // say what it waits for.
        let waiting = if now.queue == 0 && (finished as usize) < expected {
            Waiting::read(p).await?.text(unix_ms())
        } else {
            None
        };
        let line = match waiting {
            Some(w) => format!(
                "{} {finished:>6}/{expected} done  {secs:>5.1} s  {w}",
                bar(finished, expected, 24),
            ),
            None => format!(
                "{} {finished:>6}/{expected} done  {:>7.1} deliveries/s  retries {:>5}  dead-lettered {:>4}  queue {:>5}  {secs:>5.1} s",
                bar(finished, expected, 24),
                rate,
                now.retries,
                now.failed,
                now.queue,
            ),
        };
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
            recover.abort();
            bail!("timed out: {finished} of {expected} deliveries finished");
        }
        tokio::time::sleep(Duration::from_millis(if tty { 100 } else { 250 })).await;
    };
    recover.abort();
    let elapsed = started.elapsed().as_secs_f64();
    finish_line(tty);

    // What the servers saw, by class, and the dead letters stampede kept.
    let class_of_host: HashMap<String, Class> = (0..sink.len())
        .filter_map(|i| Some((sink.actor(i, "x")?.host, class_of(i))))
        .collect();
    let dead_letters: Vec<_> = store
        .dead_letters((expected + 100) as u32, None)
        .await?
        .into_iter()
        .filter(|d| ids.contains(&d.activity_id))
        .collect();
    let mut rows: HashMap<Class, [usize; 6]> = HashMap::new();
    for d in &dead_letters {
        if let Some(c) = class_of_host.get(&d.host) {
            rows.entry(*c).or_default()[4] += 1;
        }
    }
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
                row[5] += 1;
            }
        }
        duplicates += seen.values().map(|n| n - 1).sum::<usize>();
    }
    println!();
    println!(
        "{:<20} {:>6} {:>10} {:>11} {:>9} {:>14} {:>14}",
        "servers", "count", "followers", "deliveries", "received", "dead-lettered", "refused tries"
    );
    let mut total = [0usize; 6];
    for c in Class::ALL {
        let r = rows.get(&c).copied().unwrap_or_default();
        for (t, v) in total.iter_mut().zip(r) {
            *t += v;
        }
        println!(
            "{:<20} {:>6} {:>10} {:>11} {:>9} {:>14} {:>14}",
            c.label(),
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5]
        );
    }
    println!(
        "{:<20} {:>6} {:>10} {:>11} {:>9} {:>14} {:>14}",
        "total", total[0], total[1], total[2], total[3], total[4], total[5]
    );
    println!();
    println!(
        "stampede: delivered {}, retried {}, dead-lettered {}, in {elapsed:.1} s ({:.0} deliveries/s overall)",
        done.delivered,
        done.retries,
        done.failed,
        done.delivered as f64 / elapsed.max(0.001)
    );
    let dead_hosts: Vec<&String> = class_of_host
        .iter()
        .filter(|(_, c)| **c == Class::Dead)
        .map(|(h, _)| h)
        .collect();
    if !dead_hosts.is_empty() {
        let opened = store
            .failing_hosts(10_000)
            .await?
            .into_iter()
            .filter(|h| h.open_until_unix_ms > 0 && dead_hosts.contains(&&h.host))
            .count();
        let dead_of_dead: Vec<_> = dead_letters
            .iter()
            .filter(|d| class_of_host.get(&d.host) == Some(&Class::Dead))
            .collect();
        println!(
            "dead:     {}",
            dead_story(&p.cfg, opened, dead_hosts.len(), &dead_of_dead)
        );
    }
    println!(
        "servers:  received {received_ok} signed copies, {unverified} failed verification, {duplicates} duplicates"
    );
    let settled = done.delivered + done.failed;
    let ok = done.delivered as usize == received_ok
        && settled as usize == expected
        && total[4] == done.failed as usize
        && unverified == 0
        && duplicates == 0;
    if ok {
        println!("check:    delivered == received, delivered + dead-lettered == {expected}: ok");
        Ok(())
    } else {
        bail!(
            "check failed: stampede delivered {} and dead-lettered {} ({} dead letters recorded) of {expected}, the servers received {received_ok} ({unverified} unverified, {duplicates} duplicates)",
            done.delivered,
            done.failed,
            total[4]
        )
    }
}

/// One line on the dead servers: their circuits and their dead letters,
/// grouped by why they stopped and after how many attempts.
fn dead_story(
    cfg: &Config,
    circuits_opened: usize,
    servers: usize,
    dead_letters: &[&stampede_backends::store::DeadLetter],
) -> String {
    let mut by: std::collections::BTreeMap<String, (usize, u32, u32)> = Default::default();
    for d in dead_letters {
        let why = if d.reason.starts_with("host unavailable") {
            format!(
                "host unavailable (failing {} s)",
                cfg.host_unavailable_after.as_secs()
            )
        } else if d.reason.starts_with("gave up after") {
            "retries exhausted".to_string()
        } else {
            d.reason
                .split(':')
                .next()
                .unwrap_or(d.reason.as_str())
                .to_string()
        };
        let e = by.entry(why).or_insert((0, d.attempts, d.attempts));
        e.0 += 1;
        e.1 = e.1.min(d.attempts);
        e.2 = e.2.max(d.attempts);
    }
    let groups: Vec<String> = by
        .into_iter()
        .map(|(why, (n, lo, hi))| {
            let attempts = if lo == hi {
                format!("{lo} attempt{}", if lo == 1 { "" } else { "s" })
            } else {
                format!("{lo}-{hi} attempts")
            };
            format!("{n} {why} after {attempts}")
        })
        .collect();
    format!(
        "circuit opened after {} failures in a row at {circuits_opened} of {servers} servers; {} dead letters: {}",
        cfg.circuit_failures,
        dead_letters.len(),
        if groups.is_empty() {
            "none".to_string()
        } else {
            groups.join(", ")
        }
    )
}

/// What unfinished deliveries are waiting for, from the shared state that
/// `stampede status` reads too: deliveries parked per reason and the open
/// circuits they wait behind, and (in this process) those in flight.
struct Waiting {
    in_flight: i64,
    parked: Vec<Parked>,
    /// When each open circuit closes (unix ms).
    open_until: Vec<i64>,
}

impl Waiting {
    async fn read(p: &Process) -> anyhow::Result<Self> {
        let parked = parked::parked(&*p.backends.cache)
            .await
            .context("parked deliveries")?;
        let now = unix_ms();
        let open_until = if parked.iter().any(|x| x.reason == Reason::CircuitOpen) {
            p.backends
                .store
                .failing_hosts(10_000)
                .await
                .context("failing hosts")?
                .into_iter()
                .map(|h| h.open_until_unix_ms)
                .filter(|u| *u > now)
                .collect()
        } else {
            Vec::new()
        };
        let in_flight = ["normal", "ramping", "probe"]
            .into_iter()
            .map(|c| {
                p.metrics
                    .delivery_in_flight
                    .get_or_create(&[("host_class", c)])
                    .get()
            })
            .sum();
        Ok(Self {
            in_flight,
            parked,
            open_until,
        })
    }

    /// "waiting: 38 deliveries parked behind 5 open circuits, next probe in
    /// 12 s; …", or `None` when nothing waits.
    fn text(&self, now_ms: i64) -> Option<String> {
        let secs = |t: i64| ((t - now_ms).max(0) as u64).div_ceil(1000);
        let mut parts = Vec::new();
        for p in &self.parked {
            let n = match p.deliveries {
                1 => "1 delivery".to_string(),
                n => format!("{n} deliveries"),
            };
            let due = secs(p.next_due_ms);
            parts.push(match p.reason {
                Reason::CircuitOpen => match self.open_until.iter().min() {
                    Some(first) => {
                        let circuits = match self.open_until.len() {
                            1 => "1 open circuit".to_string(),
                            k => format!("{k} open circuits"),
                        };
                        let probe = secs(*first);
                        // Back before the probe: to be dead-lettered, their
                        // hosts now unavailable.
                        if due < probe {
                            format!("{n} parked behind {circuits}, back in {due} s, next probe in {probe} s")
                        } else {
                            format!("{n} parked behind {circuits}, next probe in {probe} s")
                        }
                    }
                    None => format!("{n} parked behind circuits being probed, back in {due} s"),
                },
                Reason::Retry => format!(
                    "{} retr{}, next in {due} s",
                    p.deliveries,
                    if p.deliveries == 1 { "y" } else { "ies" }
                ),
                Reason::Saturated => format!("{n} parked behind busy hosts, back in {due} s"),
                Reason::Paused => format!("{n} parked for paused hosts"),
                Reason::LocalExhausted => {
                    format!("{n} parked for want of local resources, back in {due} s")
                }
                Reason::InFlight => {
                    format!("{n} parked while a copy is in flight elsewhere, back in {due} s")
                }
            });
        }
        if self.in_flight > 0 {
            parts.push(format!("{} in flight", self.in_flight));
        }
        (!parts.is_empty()).then(|| format!("waiting: {}", parts.join("; ")))
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
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
        let queue = ready_deliveries(q).await.context("queue depth")?
            + ready_messages(q, QueueName::Fanout)
                .await
                .context("queue depth")?;
        Ok(Self {
            delivered: p.metrics.delivery_count(DeliveryOutcome::Delivered),
            retries: p.metrics.delivery_count(DeliveryOutcome::Retry),
            // Every outcome that ends a delivery with a dead letter.
            failed: DeliveryOutcome::ALL
                .into_iter()
                .filter(|o| o.is_dead_letter())
                .map(|o| p.metrics.delivery_count(o))
                .sum(),
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
        // Line wrap off while drawing: a line wider than the terminal is cut
        // at its edge instead of wrapping (which \r could not redraw).
        let _ = write!(out, "\r\x1b[2K\x1b[?7l{line}\x1b[?7h");
        let _ = out.flush();
    }
}

fn finish_line(tty: bool) {
    if tty {
        println!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_waiting_line_says_what_each_parked_delivery_waits_for() {
        let now = 1_000_000;
        let w = Waiting {
            in_flight: 2,
            parked: vec![
                Parked {
                    reason: Reason::CircuitOpen,
                    deliveries: 38,
                    next_due_ms: now + 11_500,
                },
                Parked {
                    reason: Reason::Retry,
                    deliveries: 1,
                    next_due_ms: now + 400,
                },
                Parked {
                    reason: Reason::Saturated,
                    deliveries: 14,
                    next_due_ms: now + 3_000,
                },
            ],
            open_until: vec![now + 20_000, now + 11_200, now + 11_900],
        };
        assert_eq!(
            w.text(now).as_deref(),
            Some(
                "waiting: 38 deliveries parked behind 3 open circuits, next probe in 12 s; \
                 1 retry, next in 1 s; 14 deliveries parked behind busy hosts, back in 3 s; \
                 2 in flight"
            )
        );
        // Back before the next probe (their hosts turn unavailable first).
        let soon = Waiting {
            in_flight: 0,
            parked: vec![Parked {
                reason: Reason::CircuitOpen,
                deliveries: 1,
                next_due_ms: now + 900,
            }],
            open_until: vec![now + 2_500],
        };
        assert_eq!(
            soon.text(now).as_deref(),
            Some(
                "waiting: 1 delivery parked behind 1 open circuit, back in 1 s, next probe in 3 s"
            )
        );
        // Every circuit half-open: being probed.
        let probing = Waiting {
            in_flight: 0,
            parked: vec![Parked {
                reason: Reason::CircuitOpen,
                deliveries: 3,
                next_due_ms: now + 2_000,
            }],
            open_until: vec![],
        };
        assert_eq!(
            probing.text(now).as_deref(),
            Some("waiting: 3 deliveries parked behind circuits being probed, back in 2 s")
        );
        let idle = Waiting {
            in_flight: 0,
            parked: vec![],
            open_until: vec![],
        };
        assert_eq!(idle.text(now), None);
    }

    #[test]
    fn the_dead_servers_line_groups_dead_letters_by_why_and_attempts() {
        let mut cfg = Config::from_lookup(|k| {
            DEMO_SETTINGS
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        })
        .unwrap();
        cfg.host_unavailable_after = DEMO_HOST_UNAVAILABLE;
        let letter = |reason: &str, attempts: u32| stampede_backends::store::DeadLetter {
            id: 0,
            activity_id: String::new(),
            activity_key: String::new(),
            inbox: String::new(),
            host: String::new(),
            reason: reason.into(),
            last_status: None,
            attempts,
            first_attempt_unix_ms: 0,
            last_attempt_unix_ms: 0,
        };
        let letters = [
            letter("host unavailable: failing since Thu, 01 Jan 1970", 1),
            letter("host unavailable: failing since Thu, 01 Jan 1970", 0),
            letter("gave up after 4 attempts: connection refused", 4),
        ];
        let refs: Vec<_> = letters.iter().collect();
        assert_eq!(
            dead_story(&cfg, 5, 5, &refs),
            "circuit opened after 5 failures in a row at 5 of 5 servers; 3 dead letters: \
             2 host unavailable (failing 4 s) after 0-1 attempts, 1 retries exhausted after 4 attempts"
        );
    }
}
