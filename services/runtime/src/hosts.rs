//! Per-host controls shared by every delivery worker: an operator's pause,
//! kept in PostgreSQL (durable) and Redis (what workers read per delivery).
use crate::{Backends, Result};

fn key(host: &str) -> String {
    format!("paused:{host}")
}

/// Pauses deliveries to `host`: they are parked, not tried, until resumed.
pub async fn pause(b: &Backends, host: &str) -> Result<()> {
    b.store.set_host_paused(host, true).await?;
    b.cache
        .set(
            &key(host),
            b"1",
            std::time::Duration::from_secs(365 * 24 * 3600),
        )
        .await
}

/// Resumes deliveries to `host`.
pub async fn resume(b: &Backends, host: &str) -> Result<()> {
    b.store.set_host_paused(host, false).await?;
    b.cache.del(&key(host)).await
}

/// Whether deliveries to `host` are paused.
pub async fn is_paused(b: &Backends, host: &str) -> Result<bool> {
    Ok(b.cache.get(&key(host)).await?.is_some())
}
