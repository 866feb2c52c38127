//! `stampede bench inbound`: pre-signed activities from many remote actors
//! through the edge, the queue and verification to the application's
//! stream, per signature scheme with a cold then a warm key cache, against
//! the verification ceiling.
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use stampede_backends::queue::{ready_messages, QueueName};
use stampede_sink::{Sink, SinkOptions};

use super::sampling::{
    comm_cpu_secs, cpu_secs_of, cpu_spent, latency_json, on_load_thread, peak_rss_mib,
    process_cpu_secs, reset_peak_rss, threads_cpu_secs, verify_ceiling, BenchSink,
};
use super::{
    deploy, scratch, socket_addr, stop, stop_replicas, write_json, ActivityKind, BackendKind,
    InboundArgs, InboxKind, Services,
};
use crate::loadgen;
use crate::scratch::Deployment;

/// Runs `stampede bench inbound`.
pub(super) async fn run(a: InboundArgs) -> anyhow::Result<()> {
    if a.requests == 0 || a.actors == 0 || a.servers == 0 || a.connections.contains(&0) {
        bail!("--requests, --actors, --servers and --connections must be at least 1");
    }
    let Some(&first) = a.connections.first() else {
        bail!("--connections needs at least one value");
    };
    if !(a.rate >= 0.0 && a.rate.is_finite()) {
        bail!("--rate must be a number of POSTs a second, or 0");
    }
    if a.processes && a.common.backend != BackendKind::External {
        bail!("--processes needs --backend external: the embedded backends belong to one process");
    }
    println!(
        "stampede bench inbound: {} signed POSTs per run from {} actors on {} servers, backend {:?}, {:?} inbox, {:?}, stream {}",
        a.requests,
        a.actors,
        a.servers,
        a.common.backend,
        a.inbox,
        a.activity,
        if a.subscribe { "consumed through Subscribe" } else { "counted in the queue" }
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
        let (d, target) = if a.processes {
            separate(a.common.backend).await?
        } else {
            let d = deploy(
                a.common.backend,
                Services::All,
                &[("STAMPEDE_UP_SERVICES", "ingest,inbox".into())],
            )
            .await?;
            let target = Target {
                base: d.base.clone(),
                grpc: d.grpc.clone(),
                children: Vec::new(),
                inbox_metrics: None,
            };
            (d, target)
        };
        if a.inbox == InboxKind::Personal {
            if let Err(e) = create_actor(&target.grpc, BENCH_ACTOR).await {
                target.stop().await;
                stop(d).await?;
                return Err(e);
            }
        }
        // Cold at the first connection count, then warm at each, then paced.
        let last = a.connections.last().copied().unwrap_or(first);
        let paced = (a.rate > 0.0).then_some(("warm", last, Some(a.rate)));
        let plan = std::iter::once(("cold", first, None))
            .chain(a.connections.iter().map(|&c| ("warm", c, None)))
            .chain(paced);
        for (cache, connections, rate) in plan {
            let run = Run {
                scheme,
                cache,
                connections,
                offered: rate,
            };
            match one_run(&a, &d, &target, &sink.sink, run, one).await {
                Ok(r) => runs.push(r),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let exited = target.stop().await;
        stop(d).await?;
        if failure.is_none() && !exited.is_empty() {
            failure = Some(anyhow::anyhow!(
                "service processes exited during the run: {}",
                exited.join(", ")
            ));
        }
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
        "{:<8} {:<5} {:>5} {:>8} {:>7} {:>8} {:>10} {:>9} {:>6} {:>7} {:>7} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7}  check",
        "scheme",
        "keys",
        "conns",
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
        "DB µs",
        "AMQP µs",
        "PG µs",
        "Redis µs",
    );
    if a.processes {
        println!("(separate processes: the CPU column is the bench's own process, the load generator and the subscriber; ingest and inbox follow each row)");
    }
    for r in &runs {
        let n = |k: &str| r[k].as_f64().unwrap_or(0.0);
        println!(
            "{:<8} {:<5} {:>5} {:>8} {:>7} {:>8.2} {:>10.0} {:>9.0} {:>6.2} {:>7.1} {:>7.1} {:>8.0} {:>7.0} {:>7.0} {:>7.0} {:>7.0} {:>7.0}  {}",
            r["scheme"].as_str().unwrap_or(""),
            r["key_cache"].as_str().unwrap_or(""),
            n("connections"),
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
            r["backend_cpu_us_per_activity"]["rabbitmq"].as_f64().unwrap_or(0.0),
            r["backend_cpu_us_per_activity"]["postgresql"].as_f64().unwrap_or(0.0),
            r["backend_cpu_us_per_activity"]["redis"].as_f64().unwrap_or(0.0),
            r["check"]["summary"].as_str().unwrap_or("")
        );
        if a.processes {
            let p = &r["process_cpu_us_per_activity"];
            println!(
                "         ingest {:.0} µs, inbox {:.0} µs, whole machine less the load generator {:.3} ms an activity",
                p["ingest"].as_f64().unwrap_or(0.0),
                p["inbox"].as_f64().unwrap_or(0.0),
                r["machine_cpu_ms_per_activity"].as_f64().unwrap_or(0.0),
            );
        }
    }
    let ok = runs
        .iter()
        .all(|r| r["check"]["ok"].as_bool().unwrap_or(false));
    write_json(
        &a.common.json,
        &json!({
            "bench": "inbound",
            "backend": format!("{:?}", a.common.backend).to_lowercase(),
            "inbox": format!("{:?}", a.inbox).to_lowercase(),
            "activity": format!("{:?}", a.activity).to_lowercase(),
            "stream": if a.subscribe { "subscribe" } else { "queue depth" },
            "services": if a.processes { "ingest and inbox each a process of its own" } else { "ingest and inbox in the bench's process" },
            "ceiling": {"what": "RSA-2048 cavage parse + digest + verify per second", "one_core": one, "all_cores": all},
            "runs": runs,
        }),
    )?;
    if !ok {
        bail!("correctness check failed");
    }
    Ok(())
}

/// The local actor whose inbox `--inbox personal` POSTs to.
const BENCH_ACTOR: &str = "bench";

/// The backend servers whose CPU is read from /proc (external backends
/// only): by name in the results, by command.
const BACKEND_PROCESSES: [(&str, &str); 3] = [
    ("rabbitmq", "beam.smp"),
    ("postgresql", "postgres"),
    ("redis", "redis-server"),
];

/// A `Create` of a public note by `actor`, about 2.4 KB as Mastodon sends
/// one (a paragraph or two of text, its addressing, a few fields).
fn create_note(actor: &str, n: &str, base: &str) -> Vec<u8> {
    const SIZE: usize = 2400;
    const PUBLIC: &str = "https://www.w3.org/ns/activitystreams#Public";
    let note = format!("{actor}/statuses/{n}");
    let build = |content: &str| {
        json!({
            "@context": ["https://www.w3.org/ns/activitystreams", {"sensitive": "as:sensitive", "Hashtag": "as:Hashtag"}],
            "id": format!("{note}/activity"),
            "type": "Create",
            "actor": actor,
            "published": "2026-12-06T12:00:00Z",
            "to": [PUBLIC],
            "cc": [format!("{actor}/followers"), format!("{base}/users/{BENCH_ACTOR}")],
            "object": {
                "id": note,
                "type": "Note",
                "summary": null,
                "inReplyTo": null,
                "published": "2026-12-06T12:00:00Z",
                "url": note,
                "attributedTo": actor,
                "to": [PUBLIC],
                "cc": [format!("{actor}/followers")],
                "sensitive": false,
                "content": content,
                "tag": [{"type": "Hashtag", "href": format!("{base}/tags/bench"), "name": "#bench"}],
                "attachment": [],
            }
        })
        .to_string()
    };
    let bare = build("").len();
    let words = "federation carries every post to every follower's server as one signed request; ";
    let text: String = words
        .chars()
        .cycle()
        .take(SIZE.saturating_sub(bare + 7))
        .collect();
    build(&format!("<p>{text}</p>")).into_bytes()
}

/// Consumes the application's stream through `Subscribe` until `want`
/// activities came (or `timeout`), acknowledging as `stampede tail` does
/// (every 64, or 20 ms after the first not acknowledged); how many came.
async fn subscribe_until(grpc: String, want: u64, timeout: Duration) -> anyhow::Result<u64> {
    use stampede_proto::api::inbound_service_client::InboundServiceClient;
    use stampede_proto::api::SubscribeRequest;
    let channel = tonic::transport::Channel::from_shared(grpc)?
        .connect()
        .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<SubscribeRequest>(64);
    tx.send(SubscribeRequest::default()).await.ok();
    let mut stream = InboundServiceClient::new(channel)
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let deadline = tokio::time::Instant::now() + timeout;
    let every = Duration::from_millis(20);
    let flush = tokio::time::sleep(every);
    tokio::pin!(flush);
    let (mut got, mut handled, mut unacked) = (0u64, 0u64, 0u32);
    while got < want {
        tokio::select! {
            m = stream.message() => {
                let Some(m) = m? else { break };
                got += 1;
                handled = m.delivery_id;
                unacked += 1;
                if unacked == 1 {
                    flush.as_mut().reset(tokio::time::Instant::now() + every);
                }
                if unacked < 64 && got < want {
                    continue;
                }
            }
            _ = &mut flush, if unacked > 0 => {}
            _ = tokio::time::sleep_until(deadline) => break,
        }
        unacked = 0;
        tx.send(SubscribeRequest {
            ack_through: handled,
            ..SubscribeRequest::default()
        })
        .await
        .context("the stream closed")?;
    }
    // Half-closed: the server reads the last acknowledgement, then ends.
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = stream.message().await {}
    })
    .await;
    Ok(got)
}

async fn app_depth(d: &Deployment) -> u64 {
    ready_messages(&*d.process.backends.queue, QueueName::App)
        .await
        .unwrap_or(0)
}

/// One run of the plan: the signature scheme, the key cache (`cold`,
/// `warm`), the connections and the offered rate (`None`: closed loop).
struct Run<'a> {
    scheme: &'a str,
    cache: &'a str,
    connections: usize,
    offered: Option<f64>,
}

async fn one_run(
    a: &InboundArgs,
    d: &Deployment,
    target: &Target,
    sink: &Sink,
    run: Run<'_>,
    ceiling_one: f64,
) -> anyhow::Result<serde_json::Value> {
    let Run {
        scheme,
        cache,
        connections,
        offered,
    } = run;
    let path = match a.inbox {
        InboxKind::Personal => format!("/users/{BENCH_ACTOR}/inbox"),
        InboxKind::Shared => "/inbox".to_string(),
    };
    let url = format!("{}{path}", target.base);
    let addr = socket_addr(&target.base)?;
    let authority = addr.to_string();
    // Pre-signed: signing is the remote servers' work, not measured.
    let mut requests = Vec::with_capacity(a.requests);
    let mut body_bytes = 0;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    for n in 0..a.requests {
        let actor = n % a.actors;
        let server = actor % a.servers;
        let name = format!("a{actor}");
        let me = sink.actor(server, &name).context("sink server")?;
        let body = match a.activity {
            ActivityKind::Like => json!({
                "@context": "https://www.w3.org/ns/activitystreams",
                "id": format!("{}/likes/{tag}-{n}", me.id),
                "type": "Like",
                "actor": me.id,
                "object": format!("{}/notes/1", target.base),
            })
            .to_string()
            .into_bytes(),
            ActivityKind::Create => create_note(&me.id, &format!("{tag}-{n}"), &target.base),
        };
        let headers = if scheme == "cavage" {
            sink.signed_headers(server, &name, &url, &body).await?
        } else {
            sink.signed_headers_rfc9421(server, &name, &url, &body)?
        };
        body_bytes = body.len();
        requests.push(loadgen::post(&authority, &path, &headers, &body));
    }
    let accepted_before = target.accepted(d).await?;
    let depth_before = app_depth(d).await;
    reset_peak_rss();
    match offered {
        Some(r) => println!("  {scheme} {cache}: {} POSTs at {r:.0}/s", a.requests),
        None => println!("  {scheme} {cache}: {} POSTs", a.requests),
    }
    let timeout = Duration::from_secs(a.common.timeout_secs);
    let consumer = a.subscribe.then(|| {
        tokio::spawn(subscribe_until(
            target.grpc.clone(),
            depth_before + a.requests as u64,
            timeout,
        ))
    });
    let external = a.common.backend == super::BackendKind::External;
    let backends_before = BACKEND_PROCESSES.map(|(_, comm)| comm_cpu_secs(comm));
    let cpu_before = process_cpu_secs();
    let children_before = target.children_cpu_secs();
    let db_before = threads_cpu_secs("stampede-db-");
    let started = Instant::now();
    let load_before = threads_cpu_secs("stampede-load");
    let results = on_load_thread(loadgen::run(addr, requests, connections, offered)).await?;
    let load_cpu = threads_cpu_secs("stampede-load") - load_before;
    let edge_secs = started.elapsed().as_secs_f64();
    let want = depth_before + a.requests as u64;
    let deadline = started + timeout;
    let consumed = match consumer {
        Some(c) => Some(c.await??),
        None => {
            while app_depth(d).await < want && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            None
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let cpu = process_cpu_secs() - cpu_before;
    let children_cpu: Vec<(&str, f64)> = target
        .children_cpu_secs()
        .into_iter()
        .zip(children_before)
        .map(|((name, after), (_, before))| (name, after - before))
        .collect();
    let db_cpu = threads_cpu_secs("stampede-db-") - db_before;
    let mut backend_cpu = serde_json::Map::new();
    for (i, (name, comm)) in BACKEND_PROCESSES.iter().enumerate() {
        let secs = if external {
            cpu_spent(&backends_before[i], &comm_cpu_secs(comm))
        } else {
            0.0
        };
        backend_cpu.insert((*name).into(), json!(secs * 1e6 / a.requests as f64));
    }
    let delivered = match consumed {
        // What the subscriber took, less what was queued before the run.
        Some(n) => n.saturating_sub(depth_before),
        None => {
            tokio::time::sleep(Duration::from_millis(500)).await;
            app_depth(d).await - depth_before
        }
    };
    let accepted = target.accepted(d).await? - accepted_before;
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
        "connections": connections,
        "inbox": format!("{:?}", a.inbox).to_lowercase(),
        "activity": format!("{:?}", a.activity).to_lowercase(),
        "body_bytes": body_bytes,
        "offered_rate": offered,
        "load": match offered {
            Some(r) => format!("open loop: {r:.0} POSTs a second over {connections} connections; latency from when each was due"),
            None => format!("closed loop: {connections} in flight"),
        },
        "posts": a.requests,
        "seconds": seconds,
        "edge_seconds": edge_secs,
        "rate": rate,
        "ceiling_one_core": ceiling_one,
        "ratio": rate / ceiling_one.max(1e-9),
        "cpu_us_per_activity": cpu * 1e6 / a.requests as f64,
        "process_cpu_us_per_activity": children_cpu
            .iter()
            .map(|(name, secs)| ((*name).to_string(), json!(secs * 1e6 / a.requests as f64)))
            .collect::<serde_json::Map<_, _>>(),
        // Every stampede process and backend server, less the load
        // generator's threads (the remote servers' work).
        "machine_cpu_ms_per_activity": (cpu - load_cpu
            + children_cpu.iter().map(|(_, s)| s).sum::<f64>()
            + backend_cpu.values().filter_map(|v| v.as_f64()).sum::<f64>() * a.requests as f64 / 1e6)
            * 1e3 / a.requests as f64,
        "db_cpu_us_per_activity": db_cpu * 1e6 / a.requests as f64,
        "backend_cpu_us_per_activity": backend_cpu,
        "machine_load_average": std::fs::read_to_string("/proc/loadavg").ok().and_then(|l| l.split_whitespace().next().and_then(|v| v.parse::<f64>().ok())),
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

/// Where the load goes and where the results are read: ingest and inbox in
/// the bench's process, or each a process of its own (`--processes`).
struct Target {
    /// The edge: its HTTP listener and public URL.
    base: String,
    /// Ingest's gRPC API (actors, the application's stream).
    grpc: String,
    /// The service processes (`--processes`), by service.
    children: Vec<(&'static str, tokio::process::Child)>,
    /// The inbox process's `/metrics` (`--processes`).
    inbox_metrics: Option<String>,
}

impl Target {
    /// Activities the inbox verified and accepted so far.
    async fn accepted(&self, d: &Deployment) -> anyhow::Result<u64> {
        let Some(url) = &self.inbox_metrics else {
            return Ok(d.process.metrics.inbound_count("verify", "accepted"));
        };
        let text = reqwest::get(url).await?.error_for_status()?.text().await?;
        Ok(accepted_in(&text))
    }

    /// CPU seconds of each service process so far.
    fn children_cpu_secs(&self) -> Vec<(&'static str, f64)> {
        self.children
            .iter()
            .map(|(name, c)| {
                let secs = c.id().map_or(0.0, |pid| cpu_secs_of(&pid.to_string()));
                (*name, secs)
            })
            .collect()
    }

    /// Stops the service processes; those that had exited by themselves.
    async fn stop(self) -> Vec<String> {
        let names: Vec<&str> = self.children.iter().map(|(n, _)| *n).collect();
        let exited = stop_replicas(self.children.into_iter().map(|(_, c)| c).collect()).await;
        if exited.is_empty() {
            Vec::new()
        } else {
            vec![format!("{} of {names:?}: {exited:?}", exited.len())]
        }
    }
}

/// The verify-stage `accepted` count in a `/metrics` page.
fn accepted_in(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("stampede_inbound_activities_total{")
                && l.contains("stage=\"verify\"")
                && l.contains("result=\"accepted\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// An address on loopback that was free a moment ago.
fn free_addr() -> anyhow::Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Ingest and inbox each a process of its own (`stampede serve …`) on
/// backends of the bench's own; the deployment in this process runs only
/// fanout (idle here) and gives the bench the backends' handles.
async fn separate(kind: BackendKind) -> anyhow::Result<(Deployment, Target)> {
    let (vars, scratch) = scratch(kind).await?;
    let d = Deployment::start(
        scratch,
        vars.clone()
            .into_iter()
            .chain([("STAMPEDE_UP_SERVICES", "fanout".to_string())]),
        |_| {},
        crate::up::run,
    )
    .await?;
    let http = free_addr()?;
    let base = format!("http://{http}");
    let mut target = Target {
        base: base.clone(),
        grpc: String::new(),
        children: Vec::new(),
        inbox_metrics: None,
    };
    let started = async {
        let exe = std::env::current_exe().context("finding this binary to run the services")?;
        let mut ready = Vec::new();
        for service in ["ingest", "inbox"] {
            let (grpc, metrics) = (free_addr()?, free_addr()?);
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.args(["serve", service])
                .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
                .env("STAMPEDE_PUBLIC_URL", &base)
                .env("STAMPEDE_GRPC_ADDR", grpc.to_string())
                .env("STAMPEDE_METRICS_ADDR", metrics.to_string())
                .env("STAMPEDE_LOG_FORMAT", "text")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true);
            if service == "ingest" {
                cmd.env("STAMPEDE_HTTP_ADDR", http.to_string())
                    .env("STAMPEDE_ADMIN_ADDR", "off");
                target.grpc = format!("http://{grpc}");
            } else {
                target.inbox_metrics = Some(format!("http://{metrics}/metrics"));
            }
            let child = cmd.spawn().with_context(|| format!("starting {service}"))?;
            target.children.push((service, child));
            ready.push((service, format!("http://{metrics}/readyz")));
        }
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        for (service, url) in ready {
            loop {
                if client
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    break;
                }
                for (name, c) in &mut target.children {
                    if let Ok(Some(status)) = c.try_wait() {
                        bail!("{name} exited while starting: {status}");
                    }
                }
                if Instant::now() > deadline {
                    bail!("{service} not ready within 60 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        anyhow::Ok(())
    }
    .await;
    match started {
        Ok(()) => Ok((d, target)),
        Err(e) => {
            target.stop().await;
            stop(d).await?;
            Err(e)
        }
    }
}

/// Creates the local actor `name` through ingest's gRPC API.
async fn create_actor(grpc: &str, name: &str) -> anyhow::Result<()> {
    use stampede_proto::api::actor_service_client::ActorServiceClient;
    use stampede_proto::api::CreateActorRequest;
    let channel = tonic::transport::Channel::from_shared(grpc.to_string())?
        .connect()
        .await?;
    ActorServiceClient::new(channel)
        .create_actor(CreateActorRequest {
            name: name.into(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accepted_count_is_read_from_the_inbox_metrics() {
        let page = "# HELP stampede_inbound_activities Inbound activities\n\
stampede_inbound_activities_total{stage=\"edge\",result=\"accepted\"} 7\n\
stampede_inbound_activities_total{stage=\"verify\",result=\"accepted\"} 1234\n\
stampede_inbound_activities_total{stage=\"verify\",result=\"rejected\"} 3\n";
        assert_eq!(accepted_in(page), 1234);
        assert_eq!(accepted_in(""), 0);
    }
}
