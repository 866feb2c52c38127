//! The consume loop shared by queue-driven services: up to `prefetch`
//! messages handled at once, a poisoned message moved to the dead-letter
//! queue with its reason (never a crash, never a loop), and a graceful stop
//! that finishes in-flight messages within a grace period; messages still
//! unacknowledged then go back to the queue when the channel closes.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::Result;
use stampede_backends::queue::{Incoming, Queue, QueueName};

/// How long a stopping worker waits for in-flight messages.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// The loop of [`consume`]: `queue` until `shutdown`, calling `handle` for
/// every message. `handle` owns the message and settles it.
async fn consume_loop<H, F>(
    q: Arc<dyn Queue>,
    queue: QueueName,
    prefetch: u16,
    shutdown: CancellationToken,
    handle: H,
) -> Result<()>
where
    H: Fn(Incoming) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let mut consumer = q.consume(queue, prefetch).await?;
    let mut tasks = JoinSet::new();
    let limit = usize::from(prefetch.max(1));
    tracing::info!(queue = queue.suffix(), prefetch, "consuming");
    loop {
        while tasks.len() >= limit {
            let _ = tasks.join_next().await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            next = consumer.next() => match next {
                Some(Ok(msg)) => {
                    tasks.spawn(handle(msg));
                }
                Some(Err(e)) => {
                    tracing::error!(queue = queue.suffix(), error = %e, "consumer failed");
                    break;
                }
                None => {
                    tracing::warn!(queue = queue.suffix(), "consumer ended");
                    break;
                }
            }
        }
    }
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            queue = queue.suffix(),
            left = tasks.len(),
            "in-flight messages returned to the queue"
        );
        tasks.abort_all();
    }
    drop(consumer);
    Ok(())
}

/// A queue-driven service: it settles every message it is handed.
pub trait Handler: Clone + Send + Sync + 'static {
    /// Processes and settles one message.
    fn handle(&self, msg: Incoming) -> impl Future<Output = ()> + Send;
}

/// Consumes `queue` for the process until its shutdown, handing every
/// message to `handler`.
pub async fn consume<H: Handler>(
    p: &crate::process::Process,
    queue: QueueName,
    prefetch: u16,
    handler: H,
) -> Result<()> {
    let metrics = p.metrics.clone();
    consume_loop(
        p.backends.queue.clone(),
        queue,
        prefetch,
        p.shutdown.clone(),
        move |msg| {
            metrics.queue_age(queue.suffix(), msg.ready_unix_ms);
            // One span per message, a child of the span that published it.
            let span = tracing::info_span!(
                "consume",
                queue = queue.suffix(),
                redelivered = msg.redelivered
            );
            crate::telemetry::set_parent(&span, msg.traceparent.as_deref());
            let h = handler.clone();
            tracing::Instrument::instrument(async move { h.handle(msg).await }, span)
        },
    )
    .await
}

/// Moves a message that cannot be processed to the dead-letter queue with
/// `reason`, then acknowledges it. Should the dead-letter publish fail, the
/// message goes back to its queue instead of being lost.
pub async fn poison(
    q: &dyn Queue,
    metrics: &Metrics,
    from: QueueName,
    msg: Incoming,
    reason: &str,
) {
    metrics
        .poisoned
        .get_or_create(&[("queue", from.suffix())])
        .inc();
    tracing::warn!(
        queue = from.suffix(),
        reason,
        "poisoned message dead-lettered"
    );
    match q
        .dead_letter(from, msg.kind.as_deref(), &msg.payload, reason)
        .await
    {
        Ok(()) => {
            if let Err(e) = msg.acker.ack().await {
                tracing::warn!(error = %e, "ack after dead-letter failed");
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "dead-letter publish failed; returning message");
            let _ = msg.acker.requeue().await;
        }
    }
}

/// Decodes a protobuf queue message after checking its `type` property.
pub fn decode<M: prost::Message + Default>(msg: &Incoming, kind: &str) -> Result<M, String> {
    match msg.kind.as_deref() {
        Some(k) if k == kind => {}
        Some(k) => return Err(format!("unexpected message type `{k}`, expected `{kind}`")),
        None => return Err(format!("message has no type, expected `{kind}`")),
    }
    M::decode(msg.payload.as_ref()).map_err(|e| format!("cannot decode {kind}: {e}"))
}
