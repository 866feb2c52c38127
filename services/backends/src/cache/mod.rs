//! The hot shared state the services are written against (remote-actor
//! cache, dedup, host health and delivery slots, rate limits,
//! parked-delivery counts). Two
//! implementations keep this contract, checked by one test suite
//! (`tests/contract/`): Redis ([`redis`]) and process memory
//! ([`memory`]) for the embedded layout.
use std::time::Duration;

use async_trait::async_trait;

use crate::Result;

pub mod memory;
pub mod redis;

/// One lease to take in a counted semaphore (see [`Cache::lease`]).
#[derive(Debug, Clone, Copy)]
pub struct LeaseTake<'a> {
    /// The semaphore.
    pub key: &'a str,
    /// Who holds the lease: unique per lease. A take whose holder already
    /// holds an unexpired lease of the semaphore takes nothing and says so
    /// ([`Leased::already_held`]): a holder named after a job marks that
    /// job in flight for every process.
    pub holder: &'a str,
    /// At most this many unexpired leases are held at once...
    pub limit: u32,
    /// ...or fewer: the value under this key, when present, lowers the
    /// limit to its leading integer divided by 1000 (at least 1), so a limit
    /// that moves (kept in thousandths) is applied in the same round trip.
    pub limit_key: Option<&'a str>,
    /// This many of the limit are kept for takes that reserve none (while
    /// the limit is 2 or more; at least one is always left): a priority.
    pub reserve: u32,
    /// The lease expires this long from now unless renewed.
    pub ttl: Duration,
}

/// What [`Cache::lease`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leased {
    /// Whether the lease was taken.
    pub taken: bool,
    /// Whether it was not, because its holder already holds one.
    pub already_held: bool,
    /// Unexpired leases held in the semaphore after the call.
    pub held: u32,
    /// The limit that was applied.
    pub limit: u32,
    /// The values of the keys read, in order.
    pub values: Vec<Option<Vec<u8>>>,
}

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
    /// [`Cache::hash_incr`] of several fields of one hash in one round trip.
    async fn hash_incr_many(&self, key: &str, by: &[(String, i64)], ttl: Duration) -> Result<()>;
    /// Every field of the hash `key` with its integer value (none when absent).
    async fn hash_get_all(&self, key: &str) -> Result<Vec<(String, i64)>>;
    /// Sets fields of the hash `key` to these values, in one round trip.
    async fn hash_set_many(&self, key: &str, values: &[(String, i64)], ttl: Duration)
        -> Result<()>;
    /// Removes `fields` from the hash `key`.
    async fn hash_del(&self, key: &str, fields: &[String]) -> Result<()>;
    /// Sets `key` to `value` for `ttl` only if it holds `expected` now
    /// (`None`: only if absent); true when it was set. Compare-and-set, for
    /// state several processes update.
    async fn set_if(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool>;
    /// In one round trip: releases the leases `release` (semaphore,
    /// holder), reads the values of `read`, then takes the lease `take` if
    /// fewer than its limit are held (expired leases are dropped first).
    /// A semaphore exists while a lease in it is unexpired.
    async fn lease(
        &self,
        release: &[(String, String)],
        read: &[String],
        take: Option<LeaseTake<'_>>,
    ) -> Result<Leased>;
    /// Extends the unexpired leases among `leases` (semaphore, holder) to
    /// `ttl` from now; an expired one is not revived (its slot may be
    /// another's already). Returns how many were extended.
    async fn lease_renew(&self, leases: &[(String, String)], ttl: Duration) -> Result<u32>;
    /// Unexpired leases held in each semaphore of `keys`, in order.
    async fn lease_counts(&self, keys: &[String]) -> Result<Vec<u32>>;
    /// Removes `key`.
    async fn del(&self, key: &str) -> Result<()>;
    /// Whether the cache answers.
    async fn ping(&self) -> Result<()>;
}
