//! Remote public keys for verifying inbound requests: memory, then Redis,
//! then PostgreSQL, then a GET signed by the instance actor. One fetch at a
//! time per key (concurrent requests for the same key wait for it), negative
//! answers cached (a flood of requests signed by a deleted actor costs one
//! fetch), and a forced refetch when a cached key stops verifying (rotation).
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use serde_json::{json, Value};
use stampede_core::keys::VerifyingKey;
use tokio::sync::OnceCell;
use url::Url;

use crate::process::Process;
use crate::remote::{parse_actor, signed_get};
use crate::store::RemoteKey;
use crate::{Error, Result};

const TTL: Duration = Duration::from_secs(24 * 3600);
const NEGATIVE_TTL: Duration = Duration::from_secs(2 * 3600);
/// How long this process trusts its in-memory copy before asking Redis again.
const MEMORY_TTL: Duration = Duration::from_secs(600);

/// A verified-usable key and its owner.
#[derive(Debug)]
pub struct KeyEntry {
    /// Key id.
    pub key_id: String,
    /// The actor owning the key.
    pub owner: String,
    /// The parsed key.
    pub key: VerifyingKey,
    /// When this process loaded it.
    pub loaded: Instant,
}

/// What the caches know of a key, without fetching.
#[derive(Debug, Clone)]
pub enum Known {
    /// Cached.
    Key(Arc<KeyEntry>),
    /// Known gone (404/410 or its actor deleted).
    Gone,
    /// Never seen.
    Unknown,
}

/// Why a key could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    /// The key's server says it does not exist (404/410), or its document is unusable.
    #[error("key gone: {0}")]
    Gone(String),
    /// The key's server could not be reached or failed; try later.
    #[error("key unavailable: {0}")]
    Unavailable(String),
}

#[derive(Clone)]
enum Slot {
    Key(Arc<KeyEntry>),
    Gone(Instant),
}

type Flight = Arc<OnceCell<std::result::Result<Arc<KeyEntry>, KeyError>>>;

/// The key resolver of one process.
#[derive(Clone)]
pub struct KeyResolver {
    p: Process,
    memory: Arc<Mutex<LruCache<String, Slot>>>,
    inflight: Arc<Mutex<HashMap<String, Flight>>>,
}

fn cache_key(key_id: &str) -> String {
    format!("key:{key_id}")
}

impl KeyResolver {
    /// A resolver over a process's backends and client.
    pub fn new(p: Process) -> Self {
        let cap = NonZeroUsize::new(16_384).unwrap_or(NonZeroUsize::MIN);
        Self {
            p,
            memory: Arc::new(Mutex::new(LruCache::new(cap))),
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn count(&self, result: &'static str) {
        self.p
            .metrics
            .key_cache
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// What the caches know of `key_id`; never fetches.
    pub async fn known(&self, key_id: &str) -> Result<Known> {
        if let Some(slot) = self
            .memory
            .lock()
            .ok()
            .and_then(|mut m| m.get(key_id).cloned())
        {
            match slot {
                Slot::Key(k) if k.loaded.elapsed() < MEMORY_TTL => return Ok(Known::Key(k)),
                Slot::Gone(at) if at.elapsed() < MEMORY_TTL => return Ok(Known::Gone),
                _ => {}
            }
        }
        let b = &self.p.backends;
        if let Some(raw) = b.cache.get(&cache_key(key_id)).await? {
            let v: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
            if v.get("gone").is_some() {
                self.remember(key_id, Slot::Gone(Instant::now()));
                return Ok(Known::Gone);
            }
            if let (Some(owner), Some(pem)) = (v["owner"].as_str(), v["pem"].as_str()) {
                if let Ok(k) = self.entry(key_id, owner, pem) {
                    return Ok(Known::Key(k));
                }
            }
        }
        if let Some(k) = b.store.remote_key(key_id).await? {
            if let Ok(e) = self.entry(key_id, &k.owner, &k.public_key_pem) {
                b.cache
                    .set(
                        &cache_key(key_id),
                        &json!({"owner": k.owner, "pem": k.public_key_pem})
                            .to_string()
                            .into_bytes(),
                        TTL,
                    )
                    .await?;
                return Ok(Known::Key(e));
            }
        }
        Ok(Known::Unknown)
    }

    fn remember(&self, key_id: &str, slot: Slot) {
        if let Ok(mut m) = self.memory.lock() {
            m.put(key_id.to_string(), slot);
        }
    }

    fn entry(
        &self,
        key_id: &str,
        owner: &str,
        pem: &str,
    ) -> std::result::Result<Arc<KeyEntry>, KeyError> {
        let key = VerifyingKey::from_pem(pem)
            .map_err(|e| KeyError::Gone(format!("unusable key: {e}")))?;
        let e = Arc::new(KeyEntry {
            key_id: key_id.to_string(),
            owner: owner.to_string(),
            key,
            loaded: Instant::now(),
        });
        self.remember(key_id, Slot::Key(e.clone()));
        Ok(e)
    }

    /// The key `key_id`, from a cache or fetched; the flag says whether it
    /// was fetched just now (then a failing signature is not the cache's fault).
    pub async fn get(&self, key_id: &str) -> std::result::Result<(Arc<KeyEntry>, bool), KeyError> {
        match self.known(key_id).await {
            Ok(Known::Key(k)) => {
                self.count("hit");
                return Ok((k, false));
            }
            Ok(Known::Gone) => {
                self.count("hit");
                return Err(KeyError::Gone(format!("{key_id} is known gone")));
            }
            Ok(Known::Unknown) => {}
            Err(e) => return Err(KeyError::Unavailable(e.to_string())),
        }
        self.count("miss");
        // Boxed: the network path is rare, and inline it would size every
        // message's future for it.
        Box::pin(self.fetch(key_id)).await.map(|k| (k, true))
    }

    /// Fetches `key_id` from its server again, replacing what the caches hold
    /// (the remote rotated its key).
    pub async fn refetch(&self, key_id: &str) -> std::result::Result<Arc<KeyEntry>, KeyError> {
        Box::pin(self.fetch(key_id)).await
    }

    /// Fetches once per key at a time: concurrent callers share the fetch.
    async fn fetch(&self, key_id: &str) -> std::result::Result<Arc<KeyEntry>, KeyError> {
        let flight = {
            let mut m = self
                .inflight
                .lock()
                .map_err(|_| KeyError::Unavailable("lock poisoned".into()))?;
            m.entry(key_id.to_string()).or_default().clone()
        };
        let result = flight.get_or_init(|| self.fetch_now(key_id)).await.clone();
        if let Ok(mut m) = self.inflight.lock() {
            if m.get(key_id).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                m.remove(key_id);
            }
        }
        result
    }

    async fn fetch_now(&self, key_id: &str) -> std::result::Result<Arc<KeyEntry>, KeyError> {
        let unavailable = |e: Error| KeyError::Unavailable(e.to_string());
        let url = {
            let mut u =
                Url::parse(key_id).map_err(|e| KeyError::Gone(format!("bad key id: {e}")))?;
            u.set_fragment(None);
            u.to_string()
        };
        let instance = self.p.instance_actor().await.map_err(unavailable)?;
        let resp = match signed_get(&self.p, &url, &instance).await {
            Ok(r) => r,
            Err(Error::Refused(r)) => {
                self.fetched("refused");
                return Err(KeyError::Gone(format!("refused: {r}")));
            }
            Err(e) => {
                self.fetched("failed");
                return Err(unavailable(e));
            }
        };
        match resp.status {
            200..=299 => {}
            404 | 410 => {
                self.fetched("gone");
                self.mark_gone(key_id).await;
                return Err(KeyError::Gone(format!("{url} answered {}", resp.status)));
            }
            s => {
                self.fetched("failed");
                return Err(KeyError::Unavailable(format!("{url} answered {s}")));
            }
        }
        let doc = stampede_core::activity::parse_json(&resp.body)
            .map_err(|e| KeyError::Gone(format!("key document: {e}")))?;
        let Some((owner, pem)) = key_in_document(key_id, &doc) else {
            self.fetched("invalid");
            return Err(KeyError::Gone(format!("{url} has no key {key_id}")));
        };
        let entry = self.entry(key_id, &owner, &pem)?;
        self.fetched("fetched");
        let b = &self.p.backends;
        let stored = RemoteKey {
            key_id: key_id.to_string(),
            owner: owner.clone(),
            public_key_pem: pem.clone(),
        };
        b.store.put_remote_key(&stored).await.map_err(unavailable)?;
        b.cache
            .set(
                &cache_key(key_id),
                &json!({"owner": owner, "pem": pem}).to_string().into_bytes(),
                TTL,
            )
            .await
            .map_err(unavailable)?;
        // The key document is usually the actor document: keep its inboxes.
        if let Some(actor) = parse_actor(&owner, &doc) {
            crate::remote::Resolver::new(self.p.clone())
                .remember(&actor)
                .await
                .map_err(unavailable)?;
        }
        Ok(entry)
    }

    fn fetched(&self, result: &'static str) {
        self.p
            .metrics
            .key_fetches
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// Remembers that `key_id` is gone, everywhere.
    pub async fn mark_gone(&self, key_id: &str) {
        self.remember(key_id, Slot::Gone(Instant::now()));
        let _ = self
            .p
            .backends
            .cache
            .set(&cache_key(key_id), br#"{"gone":true}"#, NEGATIVE_TTL)
            .await;
    }

    /// Forgets the keys of a deleted actor and remembers them gone.
    pub async fn forget_owner(&self, owner: &str, key_ids: &[String]) -> Result<()> {
        self.p.backends.store.delete_remote_keys_of(owner).await?;
        for k in key_ids {
            self.mark_gone(k).await;
        }
        Ok(())
    }

    /// Replaces the cached key from an `Update` of its actor.
    pub async fn update(&self, key_id: &str, owner: &str, pem: &str) -> Result<()> {
        if VerifyingKey::from_pem(pem).is_err() {
            return Err(Error::Invalid("unusable key in update".into()));
        }
        self.p
            .backends
            .store
            .put_remote_key(&RemoteKey {
                key_id: key_id.into(),
                owner: owner.into(),
                public_key_pem: pem.into(),
            })
            .await?;
        self.p
            .backends
            .cache
            .set(
                &cache_key(key_id),
                &json!({"owner": owner, "pem": pem}).to_string().into_bytes(),
                TTL,
            )
            .await?;
        if let Ok(mut m) = self.memory.lock() {
            m.pop(key_id);
        }
        Ok(())
    }
}

/// Finds `key_id` in a fetched document: an actor with `publicKey` (an object
/// or an array), or the key object itself. Returns (owner, PEM).
pub fn key_in_document(key_id: &str, doc: &Value) -> Option<(String, String)> {
    let pick = |k: &Value, default_owner: Option<&str>| -> Option<(String, String)> {
        if k.get("id")?.as_str()? != key_id {
            return None;
        }
        let pem = k.get("publicKeyPem")?.as_str()?.to_string();
        let owner = k
            .get("owner")
            .and_then(Value::as_str)
            .or(default_owner)?
            .to_string();
        Some((owner, pem))
    };
    let doc_id = doc.get("id").and_then(Value::as_str);
    match doc.get("publicKey") {
        Some(Value::Array(keys)) => keys.iter().find_map(|k| pick(k, doc_id)),
        Some(k @ Value::Object(_)) => pick(k, doc_id),
        _ => pick(doc, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_in_actor_and_key_documents() {
        let actor = json!({"id": "https://r/u/a", "publicKey": {"id": "https://r/u/a#main-key", "owner": "https://r/u/a", "publicKeyPem": "P"}});
        assert_eq!(
            key_in_document("https://r/u/a#main-key", &actor),
            Some(("https://r/u/a".into(), "P".into()))
        );
        assert_eq!(key_in_document("https://r/u/a#other", &actor), None);
        let many = json!({"id": "https://r/u/a", "publicKey": [{"id": "k1", "publicKeyPem": "A"}, {"id": "k2", "publicKeyPem": "B"}]});
        assert_eq!(
            key_in_document("k2", &many),
            Some(("https://r/u/a".into(), "B".into()))
        );
        let key = json!({"id": "k", "owner": "https://r/u/a", "publicKeyPem": "C"});
        assert_eq!(
            key_in_document("k", &key),
            Some(("https://r/u/a".into(), "C".into()))
        );
    }
}
