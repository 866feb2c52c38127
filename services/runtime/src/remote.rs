//! Resolving a remote actor id to its inboxes: Redis first, then the
//! PostgreSQL remote-actor cache, then a signed GET of the actor document
//! (servers in authorized-fetch mode require the signature). Unknown or gone
//! actors are negative-cached so a flood of them costs one fetch each.
use std::time::Duration;

use crate::http::MAX_RESPONSE_BYTES;
use crate::process::Process;
use crate::store::{LocalActor, RemoteActor};
use serde_json::{json, Value};
use stampede_core::keys::load_private_key;
use stampede_core::signature::{sign_request, GET_HEADERS};
use url::Url;

use crate::{Error, Result};

const TTL: Duration = Duration::from_secs(24 * 3600);
const NEGATIVE_TTL: Duration = Duration::from_secs(3600);
const ACCEPT: &str =
    "application/activity+json, application/ld+json; profile=\"https://www.w3.org/ns/activitystreams\"";

/// The remote-actor resolver.
#[derive(Clone)]
pub struct Resolver {
    p: Process,
}

impl Resolver {
    /// A resolver over a process's backends and client.
    pub fn new(p: Process) -> Self {
        Self { p }
    }

    /// The remote actor `id`, or `None` when it is gone or has no inbox (a
    /// collection, say). Fetch requests are signed by the local actor `signer`.
    pub async fn resolve(&self, id: &str, signer: &LocalActor) -> Result<Option<RemoteActor>> {
        let b = &self.p.backends;
        let key = format!("actor:{id}");
        let count = |r: &'static str| {
            self.p
                .metrics
                .remote_actor_lookups
                .get_or_create(&[("result", r)])
                .inc();
        };
        if let Some(raw) = b.cache.get(&key).await? {
            count("cache");
            return Ok(decode(id, &raw));
        }
        if let Some(a) = b.store.remote_actor(id).await? {
            count("store");
            b.cache.set(&key, &encode(Some(&a)), TTL).await?;
            return Ok(Some(a));
        }
        // Boxed: rare, and inline it would size the caller's future for it.
        match Box::pin(self.fetch(id, signer)).await {
            Ok(found) => {
                count("fetched");
                if let Some(a) = &found {
                    b.store.put_remote_actor(a).await?;
                }
                let ttl = if found.is_some() { TTL } else { NEGATIVE_TTL };
                b.cache.set(&key, &encode(found.as_ref()), ttl).await?;
                Ok(found)
            }
            Err(e) => {
                count("failed");
                Err(e)
            }
        }
    }

    /// Stores an actor learnt elsewhere (from its key document, an `Update`).
    pub async fn remember(&self, a: &RemoteActor) -> Result<()> {
        let b = &self.p.backends;
        b.store.put_remote_actor(a).await?;
        b.cache
            .set(&format!("actor:{}", a.id), &encode(Some(a)), TTL)
            .await
    }

    /// Forgets a deleted actor.
    pub async fn forget(&self, id: &str) -> Result<()> {
        let b = &self.p.backends;
        b.store.delete_remote_actor(id).await?;
        b.cache
            .set(&format!("actor:{id}"), &encode(None), NEGATIVE_TTL)
            .await
    }

    async fn fetch(&self, id: &str, signer: &LocalActor) -> Result<Option<RemoteActor>> {
        let resp = signed_get(&self.p, id, signer).await?;
        match resp.status {
            200..=299 => {}
            404 | 410 => return Ok(None),
            s => return Err(Error::Http(format!("GET {id} answered {s}"))),
        }
        let doc = stampede_core::activity::parse_json(&resp.body)
            .map_err(|e| Error::Http(format!("actor document {id}: {e}")))?;
        Ok(parse_actor(id, &doc))
    }
}

/// A GET signed by the local actor `signer` (servers in authorized-fetch
/// mode refuse unsigned ones), behind the SSRF guard.
pub async fn signed_get(
    p: &Process,
    id: &str,
    signer: &LocalActor,
) -> Result<crate::http::Response> {
    let url = Url::parse(id).map_err(|e| Error::Invalid(format!("bad url {id}: {e}")))?;
    p.http.check_url(&url)?;
    let key_id = format!("{}#main-key", p.cfg.actor_id(&signer.name));
    let host = stampede_core::targets::inbox_host(id).unwrap_or_default();
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let signature = {
        let (host, date, pkcs8) = (host.clone(), date.clone(), signer.private_key.0.clone());
        p.signer
            .run(move || {
                let pair = load_private_key(&pkcs8)?;
                sign_request(&pair, &key_id, "GET", &path, GET_HEADERS, |h| match h {
                    "host" => Some(host.as_str()),
                    "date" => Some(date.as_str()),
                    _ => None,
                })
            })
            .await??
    };
    let req = p
        .http
        .client()
        .get(url.clone())
        .header("accept", ACCEPT)
        .header("date", date)
        .header("signature", signature);
    p.http.send(req, &url, MAX_RESPONSE_BYTES).await
}

/// Reads the inboxes and key out of an actor document; `None` when it has no
/// inbox or claims another origin's id.
pub fn parse_actor(requested: &str, doc: &Value) -> Option<RemoteActor> {
    let id = doc.get("id")?.as_str()?;
    let same_origin = |a: &str, b: &str| match (Url::parse(a), Url::parse(b)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    };
    if !same_origin(id, requested) {
        return None;
    }
    let inbox = doc.get("inbox")?.as_str()?.to_string();
    let shared_inbox = doc
        .get("endpoints")
        .and_then(|e| e.get("sharedInbox"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let key = doc.get("publicKey");
    Some(RemoteActor {
        id: id.to_string(),
        inbox,
        shared_inbox,
        key_id: key
            .and_then(|k| k.get("id"))
            .and_then(Value::as_str)
            .map(str::to_string),
        public_key_pem: key
            .and_then(|k| k.get("publicKeyPem"))
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

fn encode(a: Option<&RemoteActor>) -> Vec<u8> {
    match a {
        Some(a) => json!({
            "inbox": a.inbox,
            "shared_inbox": a.shared_inbox,
            "key_id": a.key_id,
            "pem": a.public_key_pem,
        }),
        None => json!({"gone": true}),
    }
    .to_string()
    .into_bytes()
}

fn decode(id: &str, raw: &[u8]) -> Option<RemoteActor> {
    let v: Value = serde_json::from_slice(raw).ok()?;
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    Some(RemoteActor {
        id: id.to_string(),
        inbox: s("inbox")?,
        shared_inbox: s("shared_inbox"),
        key_id: s("key_id"),
        public_key_pem: s("pem"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actor_document_and_cache_round_trip() {
        let doc = json!({
            "id": "https://r.example/u/a",
            "inbox": "https://r.example/u/a/inbox",
            "endpoints": {"sharedInbox": "https://r.example/inbox"},
            "publicKey": {"id": "https://r.example/u/a#main-key", "publicKeyPem": "PEM"}
        });
        let a = parse_actor("https://r.example/u/a", &doc).unwrap();
        assert_eq!(a.shared_inbox.as_deref(), Some("https://r.example/inbox"));
        assert_eq!(decode(&a.id, &encode(Some(&a))), Some(a));
        assert_eq!(decode("x", &encode(None)), None);
    }

    #[test]
    fn refuses_a_document_of_another_origin() {
        let doc = json!({"id": "https://evil.example/u/a", "inbox": "https://evil.example/inbox"});
        assert_eq!(parse_actor("https://r.example/u/a", &doc), None);
    }
}
