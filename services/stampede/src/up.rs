//! `stampede up`: ingest, inbox, fanout and delivery in one process, on one
//! HTTP port, one gRPC port and one runtime (`STAMPEDE_UP_SERVICES` picks a
//! subset: `ingest` alone is just the edge).
use stampede_delivery::Delivery;
use stampede_fanout::Fanout;
use stampede_inbox::Inbox;
use stampede_ingest::Ingest;
use stampede_runtime::process::{serve_grpc, Listeners, Process};
use stampede_runtime::ServiceKind;

/// Runs the configured services until shutdown.
pub async fn run(p: Process, l: Listeners) -> anyhow::Result<()> {
    let on = |s: ServiceKind| p.cfg.up_services.contains(&s);
    let metrics = p.spawn_metrics(l.metrics);
    let names: Vec<&str> = p.cfg.up_services.iter().map(|s| s.health_name()).collect();
    let mut routes = p.grpc_routes(&names)?;
    let ingest = Ingest::from_process(&p);
    // The gRPC API and the HTTP edge are ingest's.
    let console_addr = l
        .admin
        .as_ref()
        .filter(|_| on(ServiceKind::Ingest))
        .and_then(|a| a.local_addr().ok());
    let (http, console) = if on(ServiceKind::Ingest) {
        ingest.add_grpc(&mut routes, p.auth());
        (
            l.http
                .map(|listener| ingest.spawn_http(listener, p.shutdown.clone())),
            l.admin
                .map(|listener| ingest.spawn_console(listener, p.shutdown.clone())),
        )
    } else {
        (None, None)
    };
    let fanout = on(ServiceKind::Fanout).then(|| tokio::spawn(Fanout::new(p.clone()).run()));
    let delivery = on(ServiceKind::Delivery).then(|| tokio::spawn(Delivery::new(p.clone()).run()));
    let inbox = on(ServiceKind::Inbox).then(|| tokio::spawn(Inbox::new(p.clone()).run()));
    println!(
        "stampede is up: http {}  grpc {}  metrics {}  console {}\n  backends: {}\n  services: {}",
        p.cfg.http_addr,
        p.cfg.grpc_addr,
        p.cfg.metrics_addr,
        console_addr.map_or("off".to_string(), |a| format!("http://{a}/")),
        p.backends.summary,
        p.cfg
            .up_services
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let grpc = serve_grpc(routes, l.grpc, p.shutdown.clone()).await;
    p.shutdown.cancel();
    if let Some(h) = http {
        let _ = h.await;
    }
    if let Some(h) = console {
        let _ = h.await;
    }
    if let Some(f) = fanout {
        f.await??;
    }
    if let Some(d) = delivery {
        d.await??;
    }
    if let Some(i) = inbox {
        i.await??;
    }
    let _ = metrics.await;
    grpc?;
    Ok(())
}
