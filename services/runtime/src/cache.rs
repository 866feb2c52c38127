//! The hot shared state the services are written against (remote-actor
//! cache, later dedup, host health and rate limits). Redis implements it
//! ([`crate::redis_cache`]).
use std::time::Duration;

use async_trait::async_trait;

use crate::Result;

/// A key-value cache with expiry.
#[async_trait]
pub trait Cache: Send + Sync + 'static {
    /// The value under `key`, if present.
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// The values under `keys`, in order, in one round trip.
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>>;
    /// Sets `key` to `value` for `ttl`.
    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()>;
    /// Sets `key` only if absent; true when it was set.
    async fn set_nx(&self, key: &str, value: &[u8], ttl: Duration) -> Result<bool>;
    /// Increments the counter `key` (created with expiry `ttl`) and returns
    /// its new value: fixed-window rate limits.
    async fn incr(&self, key: &str, ttl: Duration) -> Result<u64>;
    /// Removes `key`.
    async fn del(&self, key: &str) -> Result<()>;
    /// Whether the cache answers.
    async fn ping(&self) -> Result<()>;
}
