//! The embedded cache: the same [`Cache`] as Redis, in process memory. Hot
//! state only (remote actors, dedup marks, rate-limit windows, host flags):
//! what it loses on restart is rebuilt from the store or simply expires.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::cache::Cache;
use crate::Result;

/// Expired entries are swept after this many writes.
const SWEEP_EVERY: u64 = 4096;

/// The in-memory implementation of [`Cache`].
#[derive(Default)]
pub struct MemoryCache {
    map: Mutex<HashMap<String, (Vec<u8>, Instant)>>,
    writes: AtomicU64,
}

impl MemoryCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, (Vec<u8>, Instant)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The map for a write, swept of expired entries now and then.
    fn for_write(&self) -> MutexGuard<'_, HashMap<String, (Vec<u8>, Instant)>> {
        let mut map = self.lock();
        if self.writes.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            let now = Instant::now();
            map.retain(|_, (_, until)| *until > now);
        }
        map
    }
}

#[async_trait]
impl Cache for MemoryCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let map = self.lock();
        Ok(map
            .get(key)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(v, _)| v.clone()))
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        let map = self.lock();
        let now = Instant::now();
        Ok(keys
            .iter()
            .map(|k| {
                map.get(k)
                    .filter(|(_, until)| *until > now)
                    .map(|(v, _)| v.clone())
            })
            .collect())
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        self.for_write()
            .insert(key.to_string(), (value.to_vec(), Instant::now() + ttl));
        Ok(())
    }

    async fn set_nx(&self, key: &str, value: &[u8], ttl: Duration) -> Result<bool> {
        let mut map = self.for_write();
        let now = Instant::now();
        if map.get(key).is_some_and(|(_, until)| *until > now) {
            return Ok(false);
        }
        map.insert(key.to_string(), (value.to_vec(), now + ttl));
        Ok(true)
    }

    async fn incr(&self, key: &str, ttl: Duration) -> Result<u64> {
        let mut map = self.for_write();
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

    async fn del(&self, key: &str) -> Result<()> {
        self.lock().remove(key);
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
}
