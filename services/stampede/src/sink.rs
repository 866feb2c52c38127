//! `stampede sink`: fake remote servers in this process until Ctrl-C,
//! printing their addresses and, every few seconds, what they received.
use std::time::Duration;

use clap::Args;
use stampede_sink::{Sink, SinkOptions};

/// Flags of `stampede sink`.
#[derive(Debug, Args)]
pub struct SinkArgs {
    /// Number of servers.
    #[arg(long, default_value_t = 10)]
    servers: usize,
    /// Every Nth server has no shared inbox (0: all have one).
    #[arg(long, default_value_t = 0)]
    no_shared_every: usize,
}

pub async fn run(args: SinkArgs) -> anyhow::Result<()> {
    let every = args.no_shared_every;
    let opts = SinkOptions {
        servers: args.servers,
        shared_inbox: std::sync::Arc::new(move |i| every == 0 || (i + 1) % every != 0),
    };
    let sink = Sink::start(opts).await?;
    for i in 0..sink.len() {
        if let Some(a) = sink.actor(i, "alice") {
            println!("server {i}: http://{}  actor {}", a.host, a.id);
        }
    }
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stampede_runtime::shutdown::signal() => break,
            _ = tick.tick() => {
                println!("received {} (unverified {})", sink.total_received(), sink.total_unverified());
            }
        }
    }
    Ok(())
}
