//! Service: inbox. Will verify inbound HTTP Signatures, cache remote keys,
//! drop duplicates, apply Follow/Undo/Delete and hand verified activities to
//! the application. For now it runs as a process with gRPC health,
//! reflection and metrics, so deployments have their final shape.
#![deny(missing_docs)]

use stampede_runtime::process::{Listeners, Process};

/// What inbox fails at.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// A backend failed.
    #[error(transparent)]
    Runtime(#[from] stampede_runtime::Error),
}

/// Runs inbox as its own process until shutdown.
pub async fn serve(p: Process, l: Listeners) -> Result<(), InboxError> {
    let metrics = p.spawn_metrics(l.metrics);
    let routes = p.grpc_routes(&["stampede.inbox"])?;
    tracing::info!(service = "inbox", "started");
    stampede_runtime::process::serve_grpc(routes, l.grpc, p.shutdown.clone()).await?;
    let _ = metrics.await;
    Ok(())
}
