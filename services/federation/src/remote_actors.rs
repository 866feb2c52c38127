//! Resolving a remote actor id to its inboxes: Redis first, then the
//! PostgreSQL remote-actor cache, then a signed GET of the actor document
//! (servers in authorized-fetch mode require the signature). Unknown or gone
//! actors are negative-cached so a flood of them costs one fetch each.
use crate::cache_keys;
use std::time::Duration;

use serde_json::{json, Value};
use stampede_backends::store::{LocalActor, RemoteActor};
use stampede_core::keys::load_private_key;
use stampede_core::rfc9421::{self, Profile, Target};
use stampede_core::signature::{sign_request, GET_HEADERS};
use stampede_runtime::http_client::MAX_RESPONSE_BYTES;
use stampede_runtime::policy::{Decision, PolicySet};
use stampede_runtime::process::Process;
use stampede_runtime::signature_styles::{refused_signature, Style};
use std::sync::Arc;
use url::Url;

use stampede_runtime::{Config, Error, Result};

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
        let key = cache_keys::remote_actor(id);
        let count = |r: &'static str| {
            self.p
                .metrics
                .remote_actor_lookups
                .get_or_create(&[("result", r)])
                .inc();
        };
        if let Some(raw) = b.cache.get(&key).await? {
            match decode(id, &raw) {
                Some(a) if !plausible(&a) => {}
                Some(a) if self.p.policy.is_blocked_url(&a.inbox) => {
                    count("cache");
                    return Ok(None);
                }
                found => {
                    count("cache");
                    return Ok(found);
                }
            }
        }
        if let Some(a) = b.store.remote_actor(id).await?.filter(plausible) {
            count("store");
            b.cache.set(&key, &encode(Some(&a)), TTL).await?;
            if self.p.policy.is_blocked_url(&a.inbox) {
                return Ok(None);
            }
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
        Ok(b.cache
            .set(&cache_keys::remote_actor(&a.id), &encode(Some(a)), TTL)
            .await?)
    }

    /// Forgets a deleted actor.
    pub async fn forget(&self, id: &str) -> Result<()> {
        let b = &self.p.backends;
        b.store.delete_remote_actor(id).await?;
        Ok(b.cache
            .set(&cache_keys::remote_actor(id), &encode(None), NEGATIVE_TTL)
            .await?)
    }

    async fn fetch(&self, id: &str, signer: &LocalActor) -> Result<Option<RemoteActor>> {
        let resp = signed_get(&self.p, id, signer).await?;
        match resp.status {
            200..=299 => {}
            404 | 410 => return Ok(None),
            s => return Err(Error::Http(format!("GET {id} answered {s}"))),
        }
        if !resp.complete {
            return Err(Error::Http(format!("GET {id}: not read whole")));
        }
        if !resp.is_activity_json() {
            tracing::info!(actor = %id, content_type = ?resp.content_type, "not an ActivityStreams document; ignored");
            return Ok(None);
        }
        let doc = stampede_core::activity::parse_json(&resp.body)
            .map_err(|e| Error::Http(format!("actor document {id}: {e}")))?;
        Ok(remote_actor(
            &self.p.cfg,
            &self.p.policy.snapshot(),
            id,
            &doc,
        ))
    }
}

/// A GET signed by the local actor `signer` (servers in authorized-fetch
/// mode refuse unsigned ones), behind the SSRF guard, in the host's
/// signature style: with `STAMPEDE_SIGNATURE_STYLE=auto`, a 400 or 401 is
/// answered by one more GET at once in the other style, and the style is
/// remembered only when that one succeeds (a 401 may also mean the
/// document is gone or hidden: it never flips the memory by itself).
pub async fn signed_get(
    p: &Process,
    id: &str,
    signer: &LocalActor,
) -> Result<stampede_runtime::http_client::Response> {
    let url = Url::parse(id).map_err(|e| Error::Invalid(format!("bad url {id}: {e}")))?;
    p.http.check_url(&url)?;
    let host = stampede_core::targets::inbox_host(id).unwrap_or_default();
    let choice = p.styles.choose(&host).await;
    let first = get_once(
        p,
        &url,
        &host,
        signer,
        choice.style,
        choice.accept_signature,
    )
    .await?;
    if !(choice.may_switch && refused_signature(first.status)) {
        return Ok(first);
    }
    let other = choice.style.other();
    let accept = other.accept_from(first.accept_signature.as_deref());
    tracing::debug!(url = %id, status = first.status, style = other.as_str(), "signed GET refused; trying the other signature style");
    let second = get_once(p, &url, &host, signer, other, accept.clone()).await?;
    if (200..300).contains(&second.status) {
        p.styles.learned(&host, other, accept.as_deref()).await;
    }
    Ok(second)
}

/// One GET of `url` signed in `style` by `signer`.
async fn get_once(
    p: &Process,
    url: &Url,
    host: &str,
    signer: &LocalActor,
    style: Style,
    accept_signature: Option<Arc<str>>,
) -> Result<stampede_runtime::http_client::Response> {
    let key_id = p.cfg.key_id(&signer.name);
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let pkcs8 = signer.private_key.0.clone();
    let req = p
        .http
        .client()
        .get(url.clone())
        .header("accept", ACCEPT)
        .header("date", date.clone());
    let req = match style {
        Style::Cavage => {
            let host = host.to_string();
            let path = url[url::Position::BeforePath..url::Position::AfterQuery].to_string();
            let signature = p
                .signer
                .run(move || {
                    let pair = load_private_key(&pkcs8)?;
                    sign_request(&pair, &key_id, "GET", &path, GET_HEADERS, |h| match h {
                        "host" => Some(host.as_str()),
                        "date" => Some(date.as_str()),
                        _ => None,
                    })
                })
                .await??;
            req.header("signature", signature)
        }
        Style::Rfc9421 => {
            let url2 = url.clone();
            let created = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let signed = p
                .signer
                .run(move || {
                    let pair = load_private_key(&pkcs8)?;
                    let asked = accept_signature
                        .as_deref()
                        .and_then(|a| Profile::from_accept_signature(a, false));
                    let profile = asked.as_ref().unwrap_or(Profile::standard_ref(false));
                    let target = Target {
                        method: "GET",
                        scheme: url2.scheme(),
                        authority: &url2[url::Position::BeforeHost..url::Position::AfterPort],
                        path_and_query: &url2[url::Position::BeforePath..url::Position::AfterQuery],
                    };
                    let authority = target.authority;
                    rfc9421::sign(
                        &pair,
                        &key_id,
                        profile,
                        &target,
                        |h| match h {
                            "date" => Some(date.as_str()),
                            "host" => Some(authority),
                            "accept" => Some(ACCEPT),
                            _ => None,
                        },
                        created,
                        None,
                    )
                })
                .await??;
            req.header("signature-input", signed.input)
                .header("signature", signed.signature)
        }
    };
    p.http.send(req, url, MAX_RESPONSE_BYTES).await
}

/// The actor an actor document fetched from `fetched_from` describes (see
/// [`stampede_core::documents::parse_actor`]: its id must be of the origin
/// fetched); `None` also when its inbox or shared inbox is on a blocked
/// domain or on this server (a loop), or is not an http(s) URL.
pub fn remote_actor(
    cfg: &Config,
    policy: &PolicySet,
    fetched_from: &str,
    doc: &Value,
) -> Option<RemoteActor> {
    let a = stampede_core::documents::parse_actor(fetched_from, doc)?;
    let usable = |inbox: &str| {
        Url::parse(inbox).is_ok_and(|u| {
            matches!(u.scheme(), "http" | "https")
                && u.host_str()
                    .is_some_and(|h| policy.decide(h) != Decision::Blocked)
                && stampede_core::targets::inbox_host(inbox)
                    .is_some_and(|a| !cfg.is_own_authority(&a))
        })
    };
    if !usable(&a.inbox) || a.shared_inbox.as_deref().is_some_and(|s| !usable(s)) {
        tracing::info!(actor = %a.id, "actor document names an inbox on a blocked or unusable host; ignored");
        return None;
    }
    let (key_id, public_key_pem) = match a.key {
        Some(k) => (Some(k.id), Some(k.pem)),
        None => (None, None),
    };
    Some(RemoteActor {
        id: a.id,
        inbox: a.inbox,
        shared_inbox: a.shared_inbox,
        key_id,
        public_key_pem,
    })
}

/// Whether a remembered actor obeys the origin rule (its key of its own
/// origin); rows written before the rule was enforced may not, and are
/// fetched afresh instead of believed.
fn plausible(a: &RemoteActor) -> bool {
    a.key_id
        .as_deref()
        .is_none_or(|k| stampede_core::documents::same_origin(k, &a.id))
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

    fn policy(cfg: &Config) -> std::sync::Arc<PolicySet> {
        stampede_runtime::policy::DomainPolicies::new(cfg).snapshot()
    }

    #[test]
    fn actor_document_and_cache_round_trip() {
        let doc = json!({
            "id": "https://r.example/u/a",
            "inbox": "https://r.example/u/a/inbox",
            "endpoints": {"sharedInbox": "https://r.example/inbox"},
            "publicKey": {"id": "https://r.example/u/a#main-key", "publicKeyPem": "PEM"}
        });
        let cfg = Config::from_lookup(|_| None).unwrap();
        let a = remote_actor(&cfg, &policy(&cfg), "https://r.example/u/a", &doc).unwrap();
        assert_eq!(a.shared_inbox.as_deref(), Some("https://r.example/inbox"));
        assert_eq!(decode(&a.id, &encode(Some(&a))), Some(a));
        assert_eq!(decode("x", &encode(None)), None);
    }

    #[test]
    fn refuses_a_document_of_another_origin() {
        let cfg = Config::from_lookup(|_| None).unwrap();
        let doc = json!({"id": "https://evil.example/u/a", "inbox": "https://evil.example/inbox"});
        assert_eq!(
            remote_actor(&cfg, &policy(&cfg), "https://r.example/u/a", &doc),
            None
        );
    }

    #[test]
    fn refuses_an_inbox_on_a_blocked_domain() {
        let cfg = Config::from_lookup(|k| {
            (k == "STAMPEDE_BLOCKED_DOMAINS").then(|| "blocked.example".to_string())
        })
        .unwrap();
        let doc = |inbox: &str, shared: &str| json!({"id": "https://r.example/u/a", "inbox": inbox, "endpoints": {"sharedInbox": shared}});
        let ok = doc("https://r.example/u/a/inbox", "https://r.example/inbox");
        assert!(remote_actor(&cfg, &policy(&cfg), "https://r.example/u/a", &ok).is_some());
        for bad in [
            doc(
                "https://x.Blocked.example./inbox",
                "https://r.example/inbox",
            ),
            doc(
                "https://r.example/u/a/inbox",
                "https://blocked.example/inbox",
            ),
            doc("ftp://r.example/inbox", "https://r.example/inbox"),
            doc(
                "http://127.0.0.1:8080/users/alice/inbox",
                "https://r.example/inbox",
            ),
        ] {
            assert_eq!(
                remote_actor(&cfg, &policy(&cfg), "https://r.example/u/a", &bad),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn a_remembered_actor_with_another_origins_key_is_not_believed() {
        let poisoned = RemoteActor {
            id: "https://victim.example/users/alice".into(),
            inbox: "https://evil.example/steal".into(),
            shared_inbox: None,
            key_id: Some("https://evil.example/k".into()),
            public_key_pem: None,
        };
        assert!(!plausible(&poisoned));
        assert!(plausible(&RemoteActor {
            key_id: Some("https://victim.example/users/alice#main-key".into()),
            ..poisoned.clone()
        }));
        assert!(plausible(&RemoteActor {
            key_id: None,
            ..poisoned
        }));
    }
}
