//! How long the head of each delivery class's queue has waited, for
//! `stampede status`, whichever process answers it. Neither backend can
//! peek at a queue's head without taking it, so the delivery workers say
//! what they see: every few seconds each writes to the shared cache when
//! the message it last started from each class became ready, and a reader
//! takes the head's age as the time since, while the queue has ready
//! messages (the same reckoning as the metric
//! `stampede_queue_oldest_message_age_seconds`). With several workers the
//! last to write wins: they take from the same heads.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use stampede_backends::cache::Cache;
use stampede_backends::clock::now_ms;
use stampede_backends::queue::{Depth, QueueName};
use stampede_runtime::metrics::Metrics;
use stampede_runtime::Result;
use tokio_util::sync::CancellationToken;

/// A report outlives its writer this long (a worker gone, a class idle).
const KEPT: Duration = Duration::from_secs(600);

/// Writes this worker's view of the delivery queues' heads to the cache
/// every `every` until `shutdown`. Best effort: status only.
pub async fn report(
    metrics: Arc<Metrics>,
    cache: Arc<dyn Cache>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for q in QueueName::DELIVERY {
            let Some(ready) = metrics.last_ready(q.suffix()) else {
                continue;
            };
            let key = crate::cache_keys::queue_head(q.suffix());
            if let Err(e) = cache.set(&key, ready.to_string().as_bytes(), KEPT).await {
                tracing::debug!(error = %e, queue = q.suffix(), "reporting a queue head failed");
            }
        }
    }
}

/// The head age, in milliseconds, of each delivery queue in `depths`: 0
/// when it has no ready message or no worker has reported on it.
pub async fn head_ages(cache: &dyn Cache, depths: &[Depth]) -> Result<HashMap<QueueName, u64>> {
    let queues: Vec<&Depth> = depths
        .iter()
        .filter(|d| d.name.delivery_class().is_some())
        .collect();
    let keys: Vec<String> = queues
        .iter()
        .map(|d| crate::cache_keys::queue_head(d.name.suffix()))
        .collect();
    let values = cache.get_many(&keys).await?;
    let now = now_ms();
    Ok(queues
        .iter()
        .zip(values)
        .map(|(d, v)| {
            let ready = v
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|v| v.parse::<i64>().ok());
            let age = match ready {
                Some(ready) if d.messages > 0 => (now - ready).max(0) as u64,
                _ => 0,
            };
            (d.name, age)
        })
        .collect())
}
