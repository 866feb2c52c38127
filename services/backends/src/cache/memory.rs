//! The embedded cache: the same [`Cache`] as Redis, in process memory. Hot
//! state only (remote actors, dedup marks, rate-limit windows, host flags):
//! what it loses on restart is rebuilt from the store or simply expires.
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::cache::{Cache, LeaseTake, Leased};
use crate::Result;

/// How many independently locked maps the keys are spread over. A map
/// that grows rehashes every entry it holds, and a sweep visits them all,
/// under its lock: with one map of a week's dedup marks, every request
/// touching the cache waited for that (a resize at 57,000 entries stalled
/// inbound requests for 10–15 ms). Spread over 64, each stall is a
/// sixty-fourth of the size and holds up only the keys of its shard.
const SHARDS: usize = 64;
/// A shard's expired entries are swept after this many writes to it.
const SWEEP_EVERY: u64 = 4096;

type Map = HashMap<String, (Vec<u8>, Instant)>;
/// Hashes (few, small: parked-delivery counts) with their expiry.
type Hashes = HashMap<String, (HashMap<String, i64>, Instant)>;
/// Semaphores: each holder's lease expiry.
type Leases = HashMap<String, HashMap<String, Instant>>;

#[derive(Default)]
struct Shard {
    map: Mutex<Map>,
    writes: AtomicU64,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, Map> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The map for a write, swept of expired entries now and then.
    fn for_write(&self) -> MutexGuard<'_, Map> {
        let mut map = self.lock();
        if self.writes.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            let now = Instant::now();
            map.retain(|_, (_, until)| *until > now);
        }
        map
    }
}

/// The in-memory implementation of [`Cache`].
pub struct MemoryCache {
    shards: Box<[Shard]>,
    /// Picks a key's shard; seeded per process, so remote input (activity
    /// ids are dedup keys) cannot aim at one shard.
    hasher: RandomState,
    /// Hashes, apart from the plain values: a handful of keys written by
    /// our own code, never by remote input.
    hashes: Mutex<Hashes>,
    /// Semaphores (one per host being delivered to): our own keys, as many
    /// as hosts with a delivery in flight.
    leases: Mutex<Leases>,
}

impl Default for MemoryCache {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
            hashes: Mutex::default(),
            leases: Mutex::default(),
        }
    }
}

impl MemoryCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, key: &str) -> &Shard {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    fn lock(&self, key: &str) -> MutexGuard<'_, Map> {
        self.shard(key).lock()
    }

    fn for_write(&self, key: &str) -> MutexGuard<'_, Map> {
        self.shard(key).for_write()
    }

    /// The hashes, without the expired ones.
    fn hashes(&self) -> MutexGuard<'_, Hashes> {
        let mut h = self.hashes.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        h.retain(|_, (_, until)| *until > now);
        h
    }

    fn leases(&self) -> MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The fields of the hash `key`, made to live at least `ttl` from now
/// (never shortened).
fn hash_for<'a>(h: &'a mut Hashes, key: &str, ttl: Duration) -> &'a mut HashMap<String, i64> {
    let until = Instant::now() + ttl;
    let (fields, expiry) = h
        .entry(key.to_string())
        .or_insert_with(|| (HashMap::new(), until));
    *expiry = (*expiry).max(until);
    fields
}

/// The limit a semaphore's limit key sets: its leading integer / 1000.
fn limit_of(v: &[u8]) -> Option<u32> {
    let digits = v.iter().take_while(|b| b.is_ascii_digit()).count();
    let n: u64 = std::str::from_utf8(&v[..digits]).ok()?.parse().ok()?;
    Some((n / 1000).clamp(1, u64::from(u32::MAX)) as u32)
}

#[async_trait]
impl Cache for MemoryCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .lock(key)
            .get(key)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(v, _)| v.clone()))
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        let now = Instant::now();
        Ok(keys
            .iter()
            .map(|k| {
                self.lock(k)
                    .get(k)
                    .filter(|(_, until)| *until > now)
                    .map(|(v, _)| v.clone())
            })
            .collect())
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        self.for_write(key)
            .insert(key.to_string(), (value.to_vec(), Instant::now() + ttl));
        Ok(())
    }

    async fn set_nx(&self, key: &str, value: &[u8], ttl: Duration) -> Result<bool> {
        let mut map = self.for_write(key);
        let now = Instant::now();
        if map.get(key).is_some_and(|(_, until)| *until > now) {
            return Ok(false);
        }
        map.insert(key.to_string(), (value.to_vec(), now + ttl));
        Ok(true)
    }

    async fn incr(&self, key: &str, ttl: Duration) -> Result<u64> {
        let mut map = self.for_write(key);
        let now = Instant::now();
        let entry = map
            .entry(key.to_string())
            .or_insert_with(|| (b"0".to_vec(), now + ttl));
        if entry.1 <= now {
            *entry = (b"0".to_vec(), now + ttl);
        }
        let n = std::str::from_utf8(&entry.0)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        entry.0 = n.to_string().into_bytes();
        Ok(n)
    }

    async fn hash_incr(&self, key: &str, field: &str, by: i64, ttl: Duration) -> Result<i64> {
        let mut h = self.hashes();
        let n = hash_for(&mut h, key, ttl)
            .entry(field.to_string())
            .or_insert(0);
        *n += by;
        Ok(*n)
    }

    async fn hash_incr_many(&self, key: &str, by: &[(String, i64)], ttl: Duration) -> Result<()> {
        let mut h = self.hashes();
        let fields = hash_for(&mut h, key, ttl);
        for (field, n) in by {
            *fields.entry(field.clone()).or_insert(0) += n;
        }
        Ok(())
    }

    async fn hash_set_many(
        &self,
        key: &str,
        values: &[(String, i64)],
        ttl: Duration,
    ) -> Result<()> {
        let mut h = self.hashes();
        let fields = hash_for(&mut h, key, ttl);
        for (field, v) in values {
            fields.insert(field.clone(), *v);
        }
        Ok(())
    }

    async fn hash_get_all(&self, key: &str) -> Result<Vec<(String, i64)>> {
        Ok(self.hashes().get(key).map_or_else(Vec::new, |(fields, _)| {
            fields.iter().map(|(f, n)| (f.clone(), *n)).collect()
        }))
    }

    async fn hash_del(&self, key: &str, fields: &[String]) -> Result<()> {
        let mut h = self.hashes();
        if let Some((map, _)) = h.get_mut(key) {
            for f in fields {
                map.remove(f);
            }
            if map.is_empty() {
                h.remove(key);
            }
        }
        Ok(())
    }

    async fn set_if(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool> {
        let mut map = self.for_write(key);
        let now = Instant::now();
        let current = map
            .get(key)
            .filter(|(_, until)| *until > now)
            .map(|(v, _)| v.as_slice());
        if current != expected {
            return Ok(false);
        }
        map.insert(key.to_string(), (value.to_vec(), now + ttl));
        Ok(true)
    }

    async fn lease(
        &self,
        release: &[(String, String)],
        read: &[String],
        take: Option<LeaseTake<'_>>,
    ) -> Result<Leased> {
        let values = self.get_many(read).await?;
        let lowered = match take.and_then(|t| t.limit_key) {
            Some(k) => self.get(k).await?.as_deref().and_then(limit_of),
            None => None,
        };
        let mut leases = self.leases();
        for (sem, holder) in release {
            if let Some(held) = leases.get_mut(sem) {
                held.remove(holder);
                if held.is_empty() {
                    leases.remove(sem);
                }
            }
        }
        let mut out = Leased {
            values,
            ..Leased::default()
        };
        if let Some(t) = take {
            let now = Instant::now();
            let limit = lowered
                .map_or(t.limit, |l| l.min(t.limit))
                .saturating_sub(t.reserve)
                .max(1);
            let held = leases.entry(t.key.to_string()).or_default();
            held.retain(|_, until| *until > now);
            if held.contains_key(t.holder) {
                out.already_held = true;
            } else if (held.len() as u64) < u64::from(limit) {
                held.insert(t.holder.to_string(), now + t.ttl);
                out.taken = true;
            }
            out.held = held.len() as u32;
            out.limit = limit;
            if held.is_empty() {
                leases.remove(t.key);
            }
        }
        Ok(out)
    }

    async fn lease_renew(&self, leases: &[(String, String)], ttl: Duration) -> Result<u32> {
        let mut all = self.leases();
        let now = Instant::now();
        let mut n = 0;
        for (sem, holder) in leases {
            if let Some(until) = all.get_mut(sem).and_then(|h| h.get_mut(holder)) {
                if *until > now {
                    *until = now + ttl;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    async fn lease_counts(&self, keys: &[String]) -> Result<Vec<u32>> {
        let all = self.leases();
        let now = Instant::now();
        Ok(keys
            .iter()
            .map(|k| {
                all.get(k)
                    .map_or(0, |h| h.values().filter(|u| **u > now).count() as u32)
            })
            .collect())
    }

    async fn del(&self, key: &str) -> Result<()> {
        self.lock(key).remove(key);
        self.hashes().remove(key);
        self.leases().remove(key);
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_expire_and_counters_count_per_window() {
        let c = MemoryCache::new();
        let short = Duration::from_millis(50);
        assert!(c.set_nx("k", b"1", short).await.unwrap());
        assert!(!c.set_nx("k", b"2", short).await.unwrap());
        assert_eq!(c.get("k").await.unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(c.incr("n", short).await.unwrap(), 1);
        assert_eq!(c.incr("n", short).await.unwrap(), 2);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(c.get("k").await.unwrap(), None);
        assert!(c.set_nx("k", b"3", short).await.unwrap());
        assert_eq!(c.incr("n", short).await.unwrap(), 1);
        c.del("k").await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), None);
    }

    #[tokio::test]
    async fn hash_fields_count_and_the_hash_expires_no_sooner_than_asked() {
        let c = MemoryCache::new();
        let long = Duration::from_millis(300);
        let short = Duration::from_millis(30);
        assert_eq!(c.hash_incr("h", "a", 1, long).await.unwrap(), 1);
        assert_eq!(c.hash_incr("h", "a", 2, short).await.unwrap(), 3);
        assert_eq!(c.hash_incr("h", "b", 1, short).await.unwrap(), 1);
        let mut all = c.hash_get_all("h").await.unwrap();
        all.sort();
        assert_eq!(all, [("a".to_string(), 3), ("b".to_string(), 1)]);
        // The shorter expiry of the later writes did not cut the hash short.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(c.hash_get_all("h").await.unwrap().len(), 2);
        c.hash_del("h", &["a".to_string()]).await.unwrap();
        assert_eq!(c.hash_get_all("h").await.unwrap(), [("b".to_string(), 1)]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(c.hash_get_all("h").await.unwrap().is_empty());
        assert!(c.hash_get_all("absent").await.unwrap().is_empty());
    }

    #[test]
    fn keys_spread_over_shards_and_each_shard_sweeps_itself() {
        let c = MemoryCache::new();
        let used: std::collections::HashSet<usize> = (0..1000)
            .map(|n| {
                let shard = c.shard(&format!("dedup:https://r{n}.example/a/{n}"));
                (shard as *const Shard as usize - c.shards.as_ptr() as usize)
                    / std::mem::size_of::<Shard>()
            })
            .collect();
        assert!(
            used.len() > SHARDS / 2,
            "1,000 keys on {} shards",
            used.len()
        );

        let shard = Shard::default();
        let past = Instant::now();
        for n in 0..100 {
            shard.for_write().insert(format!("old{n}"), (vec![], past));
        }
        let later = Instant::now() + Duration::from_secs(60);
        for _ in 100..SWEEP_EVERY {
            shard.for_write().insert("live".into(), (vec![], later));
        }
        assert_eq!(shard.lock().len(), 1, "the expired entries are swept");
    }
}
