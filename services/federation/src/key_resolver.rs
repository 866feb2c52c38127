//! Remote public keys for verifying inbound requests: memory, then Redis,
//! then PostgreSQL, then a GET signed by the instance actor. One fetch at a
//! time per key (concurrent requests for the same key wait for it), and
//! every fetch bound to the origin fetched (docs/ARCHITECTURE.md, "Trust boundaries"): a key document
//! names only owners of its own origin, a key document that is not its
//! owner's actor document is believed only when that actor document lists
//! the key. Fetches are a resource a remote request can spend, so they are
//! rationed: a key that stops verifying is fetched again (rotation) at most
//! once per `STAMPEDE_KEY_REFETCH_SECS`, gone, invalid and refused keys are
//! remembered, and fetches per remote host per minute are capped.
//!
//! Two kinds of keys, kept apart ([`Purpose`]): the keys that sign requests
//! (`publicKey`, PEM) and the Ed25519 keys of Object Integrity Proofs
//! (`assertionMethod`, FEP-521a Multikeys). Each has its own cache entries,
//! so a key published for one is never used for the other; proof keys are
//! kept in memory and Redis only (a day), not in the store.
use crate::cache_keys;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use serde_json::{json, Value};
use stampede_core::documents::{
    assertion_key_in_document, key_in_document, lists_assertion_key, lists_key, same_origin,
    FoundKey, KeyDocError,
};
use stampede_core::keys::VerifyingKey;
use stampede_core::targets::normalize_domain;
use tokio::sync::OnceCell;
use url::Url;

use crate::remote_actors::{remote_actor, signed_get};
use stampede_backends::store::RemoteKey;
use stampede_runtime::process::Process;
use stampede_runtime::{Error, Result};

const TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a key that its server says is gone (404/410) is remembered so.
const GONE_TTL: Duration = Duration::from_secs(2 * 3600);
/// How long a key whose document was unusable (no such key, another
/// origin's owner) or that the SSRF guard refused is remembered so: short,
/// a server may fix its documents.
const INVALID_TTL: Duration = Duration::from_secs(15 * 60);
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
    /// Known not to be had for now: gone (404/410, its actor deleted), or
    /// its document refused (invalid, another origin's, SSRF-refused).
    Gone,
    /// Never seen.
    Unknown,
}

/// Why a key could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    /// The key's server says it does not exist (404/410), or its document
    /// is unusable or was refused: trying again soon will not help.
    #[error("key gone: {0}")]
    Gone(String),
    /// The key's server could not be reached or failed; try later.
    #[error("key unavailable: {0}")]
    Unavailable(String),
    /// One of our own backends (store, cache) failed: try again as soon as
    /// it is back.
    #[error("key lookup failed: {0}")]
    Backend(String),
    /// Fetching now would exceed a ration (a refetch within
    /// `STAMPEDE_KEY_REFETCH_SECS`, or the remote host's fetches this
    /// minute); the wait says when it may be tried again.
    #[error("key fetch throttled: {reason}")]
    Throttled {
        /// Which ration.
        reason: String,
        /// When a fetch may be tried again.
        wait: Duration,
    },
}

/// What a key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Signing requests: a `publicKey` of the owner's actor document.
    Requests,
    /// Object Integrity Proofs: an Ed25519 Multikey of the controller's
    /// `assertionMethod`.
    Assertions,
}

impl Purpose {
    /// The key's name in this process's memory (and its fetch in flight).
    fn memory_key(self, key_id: &str) -> String {
        match self {
            Purpose::Requests => key_id.to_string(),
            // A space cannot be in a URL: no key id of requests looks so.
            Purpose::Assertions => format!("assertion {key_id}"),
        }
    }

    fn cache_key(self, key_id: &str) -> String {
        match self {
            Purpose::Requests => cache_keys::remote_key(key_id),
            Purpose::Assertions => cache_keys::assertion_key(key_id),
        }
    }

    fn refetch_mark(self, key_id: &str) -> String {
        match self {
            Purpose::Requests => cache_keys::key_refetched(key_id),
            Purpose::Assertions => cache_keys::assertion_key_refetched(key_id),
        }
    }

    /// Finds the key in a document fetched for it.
    fn find(self, fetched_from: &str, key_id: &str, doc: &Value) -> Result<FoundKey, KeyDocError> {
        match self {
            Purpose::Requests => key_in_document(fetched_from, key_id, doc),
            Purpose::Assertions => assertion_key_in_document(fetched_from, key_id, doc),
        }
    }

    /// Whether the owner's actor document lists the key.
    fn listed(self, owner_doc: &Value, key: &stampede_core::documents::PublishedKey) -> bool {
        match self {
            Purpose::Requests => lists_key(owner_doc, key),
            Purpose::Assertions => lists_assertion_key(owner_doc, key),
        }
    }
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

use stampede_backends::clock::now_ms as unix_ms;

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
        self.known_for(Purpose::Requests, key_id).await
    }

    /// What the caches know of `key_id` for `purpose`; never fetches.
    pub async fn known_for(&self, purpose: Purpose, key_id: &str) -> Result<Known> {
        let memory_key = purpose.memory_key(key_id);
        if let Some(slot) = self
            .memory
            .lock()
            .ok()
            .and_then(|mut m| m.get(&memory_key).cloned())
        {
            match slot {
                Slot::Key(k) if k.loaded.elapsed() < MEMORY_TTL => return Ok(Known::Key(k)),
                Slot::Gone(at) if at.elapsed() < MEMORY_TTL => return Ok(Known::Gone),
                _ => {}
            }
        }
        let b = &self.p.backends;
        if let Some(raw) = b.cache.get(&purpose.cache_key(key_id)).await? {
            let v: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
            if v.get("gone").is_some() {
                self.remember(&memory_key, Slot::Gone(Instant::now()));
                return Ok(Known::Gone);
            }
            if let (Some(owner), Some(pem)) = (v["owner"].as_str(), v["pem"].as_str()) {
                if let Ok(k) = self.entry(purpose, key_id, owner, pem) {
                    return Ok(Known::Key(k));
                }
            }
        }
        if purpose == Purpose::Assertions {
            // Not kept in the store.
            return Ok(Known::Unknown);
        }
        if let Some(k) = b.store.remote_key(key_id).await? {
            if let Ok(e) = self.entry(purpose, key_id, &k.owner, &k.public_key_pem) {
                b.cache
                    .set(
                        &cache_keys::remote_key(key_id),
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

    /// A usable entry for (key, owner, PEM), remembered in memory; refused
    /// when the owner is of another origin than the key (a row written
    /// before the origin rule was enforced).
    fn entry(
        &self,
        purpose: Purpose,
        key_id: &str,
        owner: &str,
        pem: &str,
    ) -> std::result::Result<Arc<KeyEntry>, KeyError> {
        if !same_origin(key_id, owner) {
            return Err(KeyError::Gone(format!(
                "owner {owner} is of another origin than key {key_id}"
            )));
        }
        let key = VerifyingKey::from_pem(pem)
            .map_err(|e| KeyError::Gone(format!("unusable key: {e}")))?;
        if purpose == Purpose::Assertions && key.is_rsa() {
            return Err(KeyError::Gone(format!("{key_id} is not an Ed25519 key")));
        }
        let e = Arc::new(KeyEntry {
            key_id: key_id.to_string(),
            owner: owner.to_string(),
            key,
            loaded: Instant::now(),
        });
        self.remember(&purpose.memory_key(key_id), Slot::Key(e.clone()));
        Ok(e)
    }

    /// The key `key_id`, from a cache or fetched for `client` (whose request
    /// asks for it: see [`KeyResolver::ration`]); the flag says whether it
    /// was fetched just now (then a failing signature is not the cache's fault).
    pub async fn get(
        &self,
        key_id: &str,
        client: &str,
    ) -> std::result::Result<(Arc<KeyEntry>, bool), KeyError> {
        self.get_for(Purpose::Requests, key_id, client).await
    }

    /// [`KeyResolver::get`] for a key of `purpose`.
    pub async fn get_for(
        &self,
        purpose: Purpose,
        key_id: &str,
        client: &str,
    ) -> std::result::Result<(Arc<KeyEntry>, bool), KeyError> {
        match self.known_for(purpose, key_id).await {
            Ok(Known::Key(k)) => {
                self.count("hit");
                return Ok((k, false));
            }
            Ok(Known::Gone) => {
                self.count("hit");
                return Err(KeyError::Gone(format!("{key_id} is known gone")));
            }
            Ok(Known::Unknown) => {}
            Err(e) => return Err(KeyError::Backend(e.to_string())),
        }
        self.count("miss");
        // Boxed: the network path is rare, and inline it would size every
        // message's future for it.
        Box::pin(self.fetch(purpose, key_id, client))
            .await
            .map(|k| (k, true))
    }

    /// Fetches `key_id` from its server again, replacing what the caches hold
    /// (the remote may have rotated its key), unless it was refetched within
    /// `STAMPEDE_KEY_REFETCH_SECS`: forged requests naming a real key would
    /// otherwise make us send its server a GET each.
    pub async fn refetch(
        &self,
        key_id: &str,
        client: &str,
    ) -> std::result::Result<Arc<KeyEntry>, KeyError> {
        self.refetch_for(Purpose::Requests, key_id, client).await
    }

    /// [`KeyResolver::refetch`] for a key of `purpose`.
    pub async fn refetch_for(
        &self,
        purpose: Purpose,
        key_id: &str,
        client: &str,
    ) -> std::result::Result<Arc<KeyEntry>, KeyError> {
        let window = self.p.cfg.key_refetch;
        let mark = purpose.refetch_mark(key_id);
        let cache = &self.p.backends.cache;
        let now = unix_ms();
        let first = cache
            .set_nx(&mark, now.to_string().as_bytes(), window)
            .await
            .map_err(|e| KeyError::Backend(e.to_string()))?;
        if !first {
            self.fetched("throttled");
            let since = cache
                .get(&mark)
                .await
                .ok()
                .flatten()
                .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<i64>().ok())
                .unwrap_or(now);
            let elapsed = Duration::from_millis((now - since).max(0) as u64);
            return Err(KeyError::Throttled {
                reason: format!(
                    "{key_id} was refetched {}s ago; at most once in {}s",
                    elapsed.as_secs(),
                    window.as_secs()
                ),
                wait: window.saturating_sub(elapsed).max(Duration::from_secs(1)),
            });
        }
        Box::pin(self.fetch(purpose, key_id, client)).await
    }

    /// Fetches once per key at a time: concurrent callers share the fetch.
    async fn fetch(
        &self,
        purpose: Purpose,
        key_id: &str,
        client: &str,
    ) -> std::result::Result<Arc<KeyEntry>, KeyError> {
        let memory_key = purpose.memory_key(key_id);
        let flight = {
            let mut m = self
                .inflight
                .lock()
                .map_err(|_| KeyError::Unavailable("lock poisoned".into()))?;
            m.entry(memory_key.clone()).or_default().clone()
        };
        let result = flight
            .get_or_init(|| self.fetch_now(purpose, key_id, client))
            .await
            .clone();
        if let Ok(mut m) = self.inflight.lock() {
            if m.get(&memory_key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                m.remove(&memory_key);
            }
        }
        result
    }

    /// Takes one fetch from the ration of `client` for `url`'s domain this
    /// minute (`STAMPEDE_KEY_FETCH_RATE_LIMIT`). Per client: forged requests
    /// from one address naming a server's actors spend that address's
    /// ration, not the server's, whose own requests keep theirs. Per domain
    /// (no port, normalised), so ports and spellings of one host share it.
    async fn ration(&self, url: &Url, client: &str) -> std::result::Result<(), KeyError> {
        let limit = self.p.cfg.key_fetch_rate_limit;
        if limit == 0 {
            return Ok(());
        }
        let domain = normalize_domain(url.host_str().unwrap_or_default());
        let now = unix_ms() / 1000;
        let key = cache_keys::key_fetches(&domain, client, (now / 60) as u64);
        let n = self
            .p
            .backends
            .cache
            .incr(&key, Duration::from_secs(61))
            .await
            .map_err(|e| KeyError::Backend(e.to_string()))?;
        if n > limit {
            self.fetched("throttled");
            return Err(KeyError::Throttled {
                reason: format!("over {limit} key fetches a minute to {domain} for this client"),
                wait: Duration::from_secs((60 - now % 60) as u64 + 1),
            });
        }
        Ok(())
    }

    /// A signed GET of `url` within its host's ration; the document and
    /// the status it came with, or why there is none.
    async fn get_document(&self, url: &Url, client: &str) -> std::result::Result<Value, Fetched> {
        self.ration(url, client).await.map_err(Fetched::Key)?;
        let instance = self
            .p
            .instance_actor()
            .await
            .map_err(|e| Fetched::Key(KeyError::Backend(e.to_string())))?;
        let resp = match signed_get(&self.p, url.as_str(), &instance).await {
            Ok(r) => r,
            Err(Error::Refused(r)) => return Err(Fetched::Refused(r)),
            Err(e) => return Err(Fetched::Key(KeyError::Unavailable(e.to_string()))),
        };
        match resp.status {
            200..=299 => {}
            s @ (404 | 410) => return Err(Fetched::Gone(s)),
            s => {
                return Err(Fetched::Key(KeyError::Unavailable(format!(
                    "{url} answered {s}"
                ))))
            }
        }
        if !resp.complete {
            // Cut off: not the document, so nothing to judge it by.
            return Err(Fetched::Key(KeyError::Unavailable(format!(
                "{url}: the document was not read whole"
            ))));
        }
        if !resp.is_activity_json() {
            return Err(Fetched::Invalid(format!(
                "{url} answered {}, not application/activity+json",
                resp.content_type.as_deref().unwrap_or("no content type")
            )));
        }
        stampede_core::activity::parse_json(&resp.body)
            .map_err(|e| Fetched::Invalid(format!("{url}: {e}")))
    }

    async fn fetch_now(
        &self,
        purpose: Purpose,
        key_id: &str,
        client: &str,
    ) -> std::result::Result<Arc<KeyEntry>, KeyError> {
        let url = match Url::parse(key_id) {
            Ok(mut u) if u.host().is_some() => {
                u.set_fragment(None);
                u
            }
            _ => return Err(KeyError::Gone(format!("bad key id {key_id}"))),
        };
        let result = async {
            let doc = self.get_document(&url, client).await?;
            let found = purpose
                .find(url.as_str(), key_id, &doc)
                .map_err(|e| match e {
                    KeyDocError::NoSuchKey => {
                        Fetched::Invalid(format!("{url} has no key {key_id}"))
                    }
                    e => Fetched::Invalid(e.to_string()),
                })?;
            let key = found.key;
            if found.owner_confirmed {
                // The key document is the owner's actor document: keep its inboxes.
                self.remember_actor(url.as_str(), &doc).await;
            } else {
                // A key document of its own: believed only if the owner's
                // actor document (same origin, checked above) lists the key.
                let owner_url = Url::parse(&key.owner)
                    .map_err(|_| Fetched::Invalid(format!("owner {} is not a URL", key.owner)))?;
                let owner_doc = self.get_document(&owner_url, client).await?;
                let is_owner = owner_doc.get("id").and_then(Value::as_str) == Some(&key.owner);
                if !is_owner || !purpose.listed(&owner_doc, &key) {
                    return Err(Fetched::Invalid(format!(
                        "the actor {} does not list key {key_id}",
                        key.owner
                    )));
                }
                self.remember_actor(&key.owner, &owner_doc).await;
            }
            Ok(key)
        }
        .await;
        let key = match result {
            Ok(k) => k,
            Err(Fetched::Key(e)) => {
                self.fetched(match e {
                    KeyError::Throttled { .. } => "throttled",
                    _ => "failed",
                });
                return Err(e);
            }
            Err(Fetched::Gone(status)) => {
                self.fetched("gone");
                self.mark_negative(purpose, key_id, GONE_TTL).await;
                return Err(KeyError::Gone(format!("{url} answered {status}")));
            }
            Err(Fetched::Refused(r)) => {
                self.fetched("refused");
                self.mark_negative(purpose, key_id, INVALID_TTL).await;
                return Err(KeyError::Gone(format!("refused: {r}")));
            }
            Err(Fetched::Invalid(r)) => {
                self.fetched("invalid");
                self.mark_negative(purpose, key_id, INVALID_TTL).await;
                tracing::info!(key_id, ?purpose, reason = %r, "key document refused");
                return Err(KeyError::Gone(r));
            }
        };
        let unavailable = |e: stampede_backends::Error| KeyError::Backend(e.to_string());
        let entry = self.entry(purpose, key_id, &key.owner, &key.pem)?;
        self.fetched("fetched");
        let b = &self.p.backends;
        if purpose == Purpose::Requests {
            b.store
                .put_remote_key(&RemoteKey {
                    key_id: key_id.to_string(),
                    owner: key.owner.clone(),
                    public_key_pem: key.pem.clone(),
                })
                .await
                .map_err(unavailable)?;
        }
        b.cache
            .set(
                &purpose.cache_key(key_id),
                &json!({"owner": key.owner, "pem": key.pem})
                    .to_string()
                    .into_bytes(),
                TTL,
            )
            .await
            .map_err(unavailable)?;
        Ok(entry)
    }

    /// Remembers the actor an actor document fetched from `fetched_from`
    /// describes, when it may (its id of that origin, an inbox, no blocked
    /// host). Best effort: the key is what was asked for.
    async fn remember_actor(&self, fetched_from: &str, doc: &Value) {
        if let Some(actor) = remote_actor(&self.p.cfg, &self.p.policy.snapshot(), fetched_from, doc)
        {
            if let Err(e) = crate::remote_actors::Resolver::new(self.p.clone())
                .remember(&actor)
                .await
            {
                tracing::warn!(actor = %actor.id, error = %e, "remembering an actor failed");
            }
        }
    }

    fn fetched(&self, result: &'static str) {
        self.p
            .metrics
            .key_fetches
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// Remembers that `key_id` cannot be had, everywhere, for `ttl`.
    async fn mark_negative(&self, purpose: Purpose, key_id: &str, ttl: Duration) {
        self.remember(&purpose.memory_key(key_id), Slot::Gone(Instant::now()));
        let _ = self
            .p
            .backends
            .cache
            .set(&purpose.cache_key(key_id), br#"{"gone":true}"#, ttl)
            .await;
    }

    /// Remembers that `key_id` is gone, everywhere.
    pub async fn mark_gone(&self, key_id: &str) {
        self.mark_negative(Purpose::Requests, key_id, GONE_TTL)
            .await
    }

    /// Remembers that the `assertionMethod` key `key_id` is gone, everywhere
    /// (its actor was deleted).
    pub async fn mark_assertion_key_gone(&self, key_id: &str) {
        self.mark_negative(Purpose::Assertions, key_id, GONE_TTL)
            .await
    }

    /// Forgets the keys of a deleted actor and remembers them gone.
    pub async fn forget_owner(&self, owner: &str, key_ids: &[String]) -> Result<()> {
        self.p.backends.store.delete_remote_keys_of(owner).await?;
        for k in key_ids {
            self.mark_gone(k).await;
        }
        Ok(())
    }

    /// Replaces the cached key from an `Update` of its actor. The key's id
    /// must be of the actor's origin (an actor cannot adopt another
    /// server's key id).
    pub async fn update(&self, key_id: &str, owner: &str, pem: &str) -> Result<()> {
        if !same_origin(key_id, owner) {
            return Err(Error::Invalid(format!(
                "key {key_id} is of another origin than {owner}"
            )));
        }
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
                &cache_keys::remote_key(key_id),
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

/// Why a fetched document gave no key.
enum Fetched {
    /// No answer worth remembering (unreachable, 5xx, throttled).
    Key(KeyError),
    /// 404 or 410.
    Gone(u16),
    /// The SSRF guard refused the URL.
    Refused(String),
    /// The document is not JSON or does not hold the key for its origin.
    Invalid(String),
}
