//! The hot shared state the services are written against (remote-actor
//! cache, dedup, host health, rate limits, parked-delivery counts). Two
//! implementations keep this contract, checked by one test suite
//! (`tests/contract/`): Redis ([`redis`]) and process memory
//! ([`memory`]) for the embedded layout.
use std::time::Duration;

use async_trait::async_trait;

use crate::Result;

pub mod memory;
pub mod redis;

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
    /// Adds `by` to the integer `field` of the hash `key` and returns its new
    /// value. The hash lives at least `ttl` from now: its expiry is extended,
    /// never shortened, so a later write with a shorter `ttl` does not cut
    /// short what an earlier one still needs.
    async fn hash_incr(&self, key: &str, field: &str, by: i64, ttl: Duration) -> Result<i64>;
    /// Every field of the hash `key` with its integer value (none when absent).
    async fn hash_get_all(&self, key: &str) -> Result<Vec<(String, i64)>>;
    /// Removes `fields` from the hash `key`.
    async fn hash_del(&self, key: &str, fields: &[String]) -> Result<()>;
    /// Removes `key`.
    async fn del(&self, key: &str) -> Result<()>;
    /// Whether the cache answers.
    async fn ping(&self) -> Result<()>;
}
