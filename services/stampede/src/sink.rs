//! `stampede sink`: fake remote servers in this process until Ctrl-C. They
//! serve actor documents and WebFinger, verify the signature and digest of
//! every POST, count, and misbehave as asked (down, 410, 5xx, 429, slow).
//! With `--follow`, their actors follow a local actor of any deployment
//! through real signed Follow requests.
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use futures::StreamExt;
use stampede_sink::{Behavior, Sink, SinkOptions, Styles};

/// Flags of `stampede sink`.
#[derive(Debug, Args)]
pub struct SinkArgs {
    /// Number of servers.
    #[arg(long, default_value_t = 10)]
    servers: usize,
    /// Every Nth server has no shared inbox (0: all have one).
    #[arg(long, default_value_t = 0)]
    no_shared_every: usize,
    /// This many servers (the first ones) are down: nothing listens.
    #[arg(long, default_value_t = 0)]
    down: usize,
    /// The next ones answer 410 Gone.
    #[arg(long, default_value_t = 0)]
    gone: usize,
    /// The next ones answer `--failing-status`.
    #[arg(long, default_value_t = 0)]
    failing: usize,
    /// Status of failing servers.
    #[arg(long, default_value_t = 503)]
    failing_status: u16,
    /// The next ones answer 429 with `Retry-After: --retry-after`.
    #[arg(long, default_value_t = 0)]
    rate_limited: usize,
    /// Seconds in the `Retry-After` of rate-limited servers.
    #[arg(long, default_value_t = 30)]
    retry_after: u64,
    /// The next ones answer after `--slow-secs`.
    #[arg(long, default_value_t = 0)]
    slow: usize,
    /// How long slow servers take.
    #[arg(long, default_value_t = 5.0)]
    slow_secs: f64,
    /// A local actor's id (`https://.../users/NAME`) that each server's
    /// actors follow with signed Follow requests.
    #[arg(long)]
    follow: Option<String>,
    /// Followers per server with `--follow`.
    #[arg(long, default_value_t = 1)]
    followers_per_server: usize,
    /// Verify every Nth POST's signature and digest, counted across all the
    /// servers (1: all, 0: none).
    #[arg(long, default_value_t = 1)]
    verify_every: usize,
    /// Keep counts only, not every request (long runs, benchmarks).
    #[arg(long)]
    count_only: bool,
    /// Which signature styles the servers take: `cavage-only`,
    /// `rfc9421-only` (the other answered 401) or `both`.
    #[arg(long, default_value = "both", value_parser = parse_styles)]
    signature_style: Styles,
    /// Append every request received, raw, as JSON lines to this file.
    #[arg(long)]
    record: Option<std::path::PathBuf>,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 5)]
    every: u64,
}

fn parse_styles(s: &str) -> Result<Styles, String> {
    Styles::parse(s)
        .ok_or_else(|| format!("`{s}`: expected `cavage-only`, `rfc9421-only` or `both`"))
}

fn behaviors(a: &SinkArgs) -> Vec<(String, Option<Behavior>)> {
    let mut out = Vec::with_capacity(a.servers);
    let plan = [
        (a.down, "down".to_string(), None),
        (a.gone, "410".to_string(), Some(Behavior::Status(410))),
        (
            a.failing,
            a.failing_status.to_string(),
            Some(Behavior::Status(a.failing_status)),
        ),
        (
            a.rate_limited,
            format!("429 Retry-After {}", a.retry_after),
            Some(Behavior::RetryAfter(a.retry_after)),
        ),
        (
            a.slow,
            format!("slow {} s", a.slow_secs),
            Some(Behavior::Slow(Duration::from_secs_f64(a.slow_secs))),
        ),
    ];
    for (n, label, b) in plan {
        for _ in 0..n {
            out.push((label.clone(), b.clone()));
        }
    }
    while out.len() < a.servers {
        out.push(("ok".into(), Some(Behavior::Ok)));
    }
    out
}

pub async fn run(args: SinkArgs) -> anyhow::Result<()> {
    let misbehaving = args.down + args.gone + args.failing + args.rate_limited + args.slow;
    if misbehaving > args.servers {
        bail!("--down, --gone, --failing, --rate-limited and --slow add up to more than --servers");
    }
    let every = args.no_shared_every;
    let opts = SinkOptions {
        servers: args.servers,
        shared_inbox: std::sync::Arc::new(move |i| every == 0 || (i + 1) % every != 0),
        verify_every: args.verify_every,
        count_only: args.count_only,
        signature_style: args.signature_style,
        record: args.record.clone(),
        ..SinkOptions::default()
    };
    let sink = Sink::start(opts).await?;
    if let Some(target) = &args.follow {
        let sink = &sink;
        let results = futures::stream::iter(0..sink.len())
            .flat_map(|i| {
                futures::stream::iter((0..args.followers_per_server).map(move |j| (i, j)))
            })
            .map(|(i, j)| async move { sink.follow(i, &format!("f{j}"), target).await })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        let mut refused = 0;
        for r in results {
            if r?.status != 202 {
                refused += 1;
            }
        }
        println!(
            "sent {} signed Follows to {target} ({refused} refused)",
            sink.len() * args.followers_per_server
        );
        // Misbehaviour starts once the Accepts are in (or after 30 s).
        let want = (sink.len() * args.followers_per_server).saturating_sub(refused);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let accepts = sink.received_of_type("Accept");
            if accepts >= want || tokio::time::Instant::now() > deadline {
                println!("{accepts} signed Accepts received");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for (i, (label, b)) in behaviors(&args).into_iter().enumerate() {
        match b {
            None => sink.set_down(i)?,
            Some(b) => sink.set_behavior(i, b)?,
        }
        if let Some(a) = sink.actor(i, "f0") {
            println!(
                "server {i:>4}: http://{}  {label:<18} actor {}",
                a.host, a.id
            );
        }
    }
    let mut tick = tokio::time::interval(Duration::from_secs(args.every.max(1)));
    loop {
        tokio::select! {
            _ = stampede_runtime::shutdown::signal() => break,
            _ = tick.tick() => {
                println!(
                    "received {} POSTs ({} failed verification), sink CPU {:.1} s",
                    sink.total_received(),
                    sink.total_unverified(),
                    crate::bench::process_cpu_secs()
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: SinkArgs,
    }

    #[test]
    fn misbehaviour_is_assigned_in_order() {
        let t = T::parse_from([
            "t",
            "--servers",
            "6",
            "--down",
            "1",
            "--gone",
            "1",
            "--failing",
            "1",
            "--rate-limited",
            "1",
            "--slow",
            "1",
        ]);
        let labels: Vec<String> = behaviors(&t.a).into_iter().map(|(l, _)| l).collect();
        assert_eq!(
            labels,
            ["down", "410", "503", "429 Retry-After 30", "slow 5 s", "ok"]
        );
    }
}
