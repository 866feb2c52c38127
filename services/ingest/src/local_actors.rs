//! Which local actors exist, as the inbox edge asks on every POST to a
//! personal inbox: answered from memory, the store read only on a miss
//! (docs/ARCHITECTURE.md, "Local actors at the edge").
//!
//! Two bounded LRUs: actors found ([`FOUND_TTL`], [`FOUND_CAPACITY`]) and
//! names found absent ([`ABSENT_TTL`], [`ABSENT_CAPACITY`]: a sender
//! spraying made-up names churns only these). A creation or deletion
//! through the API forgets both at once in the process that made it and
//! moves [`LOCAL_ACTORS_VERSION`] in the cache; every ingest process looks
//! at that version every [`REFRESH`] and forgets what it holds when it
//! moved. So a deleted actor's inbox answers 404, and a new one's 202, on
//! every replica within about two seconds; should the cache be
//! unreachable, within the TTLs.
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;
use prometheus_client::metrics::counter::Counter;
use stampede_backends::store::Store;
use stampede_backends::Result;
use stampede_federation::cache_keys::LOCAL_ACTORS_VERSION;
use stampede_runtime::Backends;
use tokio_util::sync::CancellationToken;

/// How long an actor found is believed without asking the store again.
pub const FOUND_TTL: Duration = Duration::from_secs(30);
/// How long a name found absent is believed.
pub const ABSENT_TTL: Duration = Duration::from_secs(5);
/// Actors held (a few hundred bytes each).
pub const FOUND_CAPACITY: usize = 10_000;
/// Absent names held.
pub const ABSENT_CAPACITY: usize = 4_096;
/// How often the version in the cache is looked at.
pub const REFRESH: Duration = Duration::from_secs(1);

/// How long the version key lives: refreshed by every change.
const VERSION_TTL: Duration = Duration::from_secs(400 * 86400);

struct Memory {
    /// Name → (store id, when read).
    found: LruCache<String, (i64, Instant)>,
    /// Name → when read.
    absent: LruCache<String, Instant>,
}

/// The local actors one ingest process holds in memory.
pub struct LocalActors {
    memory: Mutex<Memory>,
    /// Moved by every forgetting: a store read that began before one does
    /// not put what it read back.
    generation: AtomicU64,
    /// The version last seen in the cache.
    seen: Mutex<Option<Vec<u8>>>,
    from_memory: Counter,
    from_store: Counter,
}

/// Whether `name` could be a stored actor's (1 to 64 of `[a-z0-9_]`, the
/// instance actor's `_instance` included): others are not looked up.
fn storable(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn capacity(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
}

impl LocalActors {
    /// Empty; lookups counted in `metrics`.
    pub fn new(metrics: &stampede_runtime::metrics::Metrics) -> Self {
        let count = |source| {
            metrics
                .local_actor_lookups
                .get_or_create(&[("source", source)])
                .clone()
        };
        Self {
            memory: Mutex::new(Memory {
                found: LruCache::new(capacity(FOUND_CAPACITY)),
                absent: LruCache::new(capacity(ABSENT_CAPACITY)),
            }),
            generation: AtomicU64::new(0),
            seen: Mutex::new(None),
            from_memory: count("memory"),
            from_store: count("store"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store id of the local actor `name`, `None` when there is none.
    /// Never reads a private key.
    pub async fn id_of(&self, store: &dyn Store, name: &str) -> Result<Option<i64>> {
        if !storable(name) {
            return Ok(None);
        }
        let now = Instant::now();
        {
            let mut m = self.lock();
            if let Some(&(id, at)) = m.found.get(name) {
                if now.duration_since(at) < FOUND_TTL {
                    self.from_memory.inc();
                    return Ok(Some(id));
                }
            } else if let Some(&at) = m.absent.get(name) {
                if now.duration_since(at) < ABSENT_TTL {
                    self.from_memory.inc();
                    return Ok(None);
                }
            }
        }
        let generation = self.generation.load(Ordering::Acquire);
        let found = store.actor_ref_by_name(name).await?.map(|a| a.id);
        self.from_store.inc();
        let mut m = self.lock();
        // Forgotten meanwhile: what was read may be what was forgotten.
        if self.generation.load(Ordering::Acquire) == generation {
            match found {
                Some(id) => {
                    m.absent.pop(name);
                    m.found.put(name.to_string(), (id, now));
                }
                None => {
                    m.found.pop(name);
                    m.absent.put(name.to_string(), now);
                }
            }
        }
        Ok(found)
    }

    /// Forgets every actor held (an actor was created or deleted).
    pub fn forget_all(&self) {
        let mut m = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        m.found.clear();
        m.absent.clear();
    }

    /// After a creation or deletion: forgets here at once, and moves the
    /// version so that every other ingest process forgets within
    /// [`REFRESH`]. A cache away is logged, not failed: the change is made,
    /// and the others see it within the TTLs.
    pub async fn changed(&self, b: &Backends) {
        self.forget_all();
        if let Err(e) = b.cache.incr(LOCAL_ACTORS_VERSION, VERSION_TTL).await {
            tracing::warn!(error = %e, "local actors version not moved; other ingest processes see the change within their ttl");
        }
    }

    /// Looks at the version; forgets everything when it moved (a cache
    /// restarted or flushed loses the key, which is a move too).
    pub async fn refresh(&self, b: &Backends) -> Result<bool> {
        let version = b.cache.get(LOCAL_ACTORS_VERSION).await?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == version {
            return Ok(false);
        }
        *seen = version;
        drop(seen);
        self.forget_all();
        Ok(true)
    }

    /// Follows the version until `shutdown`, every [`REFRESH`]. A failure
    /// is logged once per run of failures; the TTLs still hold.
    pub async fn follow(self: std::sync::Arc<Self>, b: Backends, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REFRESH) => {}
            }
            match self.refresh(&b).await {
                Ok(_) => {
                    if failing {
                        tracing::info!("local actors version readable again");
                    }
                    failing = false;
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "reading the local actors version failed; actors held expire by ttl");
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_an_actor_could_have_are_looked_up() {
        assert!(storable("alice"));
        assert!(storable("_instance"));
        assert!(storable("a_1"));
        assert!(!storable(""));
        assert!(!storable("Alice"));
        assert!(!storable("a.b"));
        assert!(!storable(&"a".repeat(65)));
    }
}
