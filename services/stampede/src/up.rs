//! `stampede up`: ingest, inbox, fanout and delivery in one process, on one
//! HTTP port, one gRPC port and one runtime.
use stampede_delivery::Delivery;
use stampede_fanout::Fanout;
use stampede_inbox::Inbox;
use stampede_ingest::Ingest;
use stampede_runtime::process::{serve_grpc, Listeners, Process};

/// Runs all four services until shutdown.
pub async fn run(p: Process, l: Listeners) -> anyhow::Result<()> {
    let metrics = p.spawn_metrics(l.metrics);
    let mut routes = p.grpc_routes(&[
        "stampede.ingest",
        "stampede.inbox",
        "stampede.fanout",
        "stampede.delivery",
    ])?;
    let ingest = Ingest::from_process(&p);
    ingest.add_grpc(&mut routes, p.auth());
    let http = l
        .http
        .map(|listener| ingest.spawn_http(listener, p.shutdown.clone()));
    let fanout = tokio::spawn(Fanout::new(p.clone()).run());
    let delivery = tokio::spawn(Delivery::new(p.clone()).run());
    let inbox = tokio::spawn(Inbox::new(p.clone()).run());
    println!(
        "stampede is up: http {}  grpc {}  metrics {}\n  backends: {}",
        p.cfg.http_addr, p.cfg.grpc_addr, p.cfg.metrics_addr, p.backends.summary
    );
    let grpc = serve_grpc(routes, l.grpc, p.shutdown.clone()).await;
    p.shutdown.cancel();
    let (f, d, i) = (fanout.await, delivery.await, inbox.await);
    if let Some(h) = http {
        let _ = h.await;
    }
    let _ = metrics.await;
    grpc?;
    f??;
    d??;
    i??;
    Ok(())
}
