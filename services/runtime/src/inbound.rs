//! Verifying an inbound signed request end to end: signature syntax, date
//! window, digest, blocked domains, that the key belongs to the activity's
//! actor (same origin, owner = actor), the key itself (cached or fetched,
//! refetched once on failure for rotation), and the cheap drop of `Delete`s
//! of actors whose keys we never had. Used by the inbox service and by the
//! `Verify` gRPC call.
use std::time::Instant;

use serde_json::Value;
use stampede_core::activity::id_of;
use stampede_core::verify::{
    check_coverage_and_digest, check_time, parse, verify_signature, HttpRequest,
};
use stampede_core::CoreError;
use url::Url;

use crate::keys::{KeyError, KeyResolver, Known};
use crate::process::Process;

/// The outcome of verification (also the `result` label of the inbound metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Verified.
    Accepted,
    /// Missing, malformed or wrong signature, or a key that is not the actor's.
    BadSignature,
    /// `Date`/`created` outside the window, or expired.
    StaleDate,
    /// The body does not match its digest.
    DigestMismatch,
    /// The key could not be had (gone, or its server unreachable).
    KeyUnavailable,
    /// The actor's or key's domain is blocked.
    Blocked,
    /// A `Delete` of an actor whose key is gone or was never known: dropped
    /// without fetching anything.
    DroppedDelete,
}

impl Verdict {
    /// The verdict's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::BadSignature => "bad_signature",
            Verdict::StaleDate => "stale_date",
            Verdict::DigestMismatch => "digest_mismatch",
            Verdict::KeyUnavailable => "key_unavailable",
            Verdict::Blocked => "blocked",
            Verdict::DroppedDelete => "dropped_delete",
        }
    }
}

/// A verification result.
#[derive(Debug, Clone)]
pub struct Verification {
    /// The verdict.
    pub verdict: Verdict,
    /// Why, for a person.
    pub reason: String,
    /// The signature's key id, when it parsed.
    pub key_id: Option<String>,
    /// The key's owner, when the key was had.
    pub owner: Option<String>,
    /// Whether trying again later may succeed (the key's server was unreachable).
    pub transient: bool,
}

impl Verification {
    fn no(verdict: Verdict, reason: impl Into<String>, key_id: Option<&str>) -> Self {
        Self {
            verdict,
            reason: reason.into(),
            key_id: key_id.map(str::to_string),
            owner: None,
            transient: false,
        }
    }
}

/// What verification needs to know of the activity.
#[derive(Debug, Clone)]
pub struct ActivityInfo {
    /// `id`.
    pub id: Option<String>,
    /// First `type`.
    pub kind: String,
    /// `actor` id.
    pub actor: String,
    /// The object's id, embedded or referenced.
    pub object_id: Option<String>,
}

/// Reads the fields verification needs; an error names what is missing.
pub fn activity_info(json: &Value) -> Result<ActivityInfo, String> {
    let o = json.as_object().ok_or("the body is not a JSON object")?;
    let kind = stampede_core::activity::types(o)
        .first()
        .map(|t| t.to_string())
        .ok_or("no type")?;
    let actor = o
        .get("actor")
        .and_then(id_of)
        .ok_or("no actor")?
        .to_string();
    Ok(ActivityInfo {
        id: o.get("id").and_then(Value::as_str).map(str::to_string),
        kind,
        actor,
        object_id: o.get("object").and_then(id_of).map(str::to_string),
    })
}

/// The URL and its host, lower-cased; `None` when it is not a URL with a host.
fn url_and_host(url: &str) -> Option<(Url, String)> {
    let u = Url::parse(url).ok()?;
    let host = u.host_str()?.to_ascii_lowercase();
    Some((u, host))
}

/// The verifier of one process.
#[derive(Clone)]
pub struct Verifier {
    p: Process,
    keys: KeyResolver,
}

impl Verifier {
    /// A verifier over a process's caches and client.
    pub fn new(p: Process) -> Self {
        let keys = KeyResolver::new(p.clone());
        Self { p, keys }
    }

    /// The key resolver (side effects update it).
    pub fn keys(&self) -> &KeyResolver {
        &self.keys
    }

    /// Verifies `req`; with `activity`, also that the key is its actor's.
    pub async fn verify(
        &self,
        req: &HttpRequest<'_>,
        activity: Option<&ActivityInfo>,
    ) -> Verification {
        let started = Instant::now();
        let v = self.verify_inner(req, activity).await;
        self.p
            .metrics
            .verify_seconds
            .observe(started.elapsed().as_secs_f64());
        v
    }

    async fn verify_inner(
        &self,
        req: &HttpRequest<'_>,
        activity: Option<&ActivityInfo>,
    ) -> Verification {
        let cfg = &self.p.cfg;
        let signed = match parse(req) {
            Ok(s) => s,
            Err(e) => return Verification::no(Verdict::BadSignature, e.to_string(), None),
        };
        let key_id = Some(signed.key_id.as_str());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if let Err(e) = check_time(
            req,
            &signed,
            now,
            cfg.inbound_max_age_secs,
            cfg.inbound_max_future_secs,
        ) {
            return Verification::no(Verdict::StaleDate, e.to_string(), key_id);
        }
        match check_coverage_and_digest(req, &signed) {
            Ok(()) => {}
            Err(CoreError::DigestMismatch) => {
                return Verification::no(
                    Verdict::DigestMismatch,
                    "the body does not match its digest",
                    key_id,
                )
            }
            Err(e) => return Verification::no(Verdict::BadSignature, e.to_string(), key_id),
        }
        // Each URL parsed once: parsing was a visible share of a message's CPU.
        let Some((key_url, key_host)) = url_and_host(&signed.key_id) else {
            return Verification::no(Verdict::BadSignature, "keyId is not a URL", key_id);
        };
        if cfg.is_blocked(&key_host) {
            return Verification::no(Verdict::Blocked, format!("{key_host} is blocked"), key_id);
        }
        if let Some(a) = activity {
            let actor = url_and_host(&a.actor);
            if actor.as_ref().is_some_and(|(_, h)| cfg.is_blocked(h)) {
                return Verification::no(Verdict::Blocked, "the actor's domain is blocked", key_id);
            }
            if actor.map(|(u, _)| u.origin()) != Some(key_url.origin()) {
                return Verification::no(
                    Verdict::BadSignature,
                    format!(
                        "key {} cannot speak for {}: another origin",
                        signed.key_id, a.actor
                    ),
                    key_id,
                );
            }
            let self_delete =
                a.kind == "Delete" && a.object_id.as_deref().is_none_or(|o| o == a.actor);
            if self_delete {
                match self.keys.known(&signed.key_id).await {
                    Ok(Known::Key(_)) => {}
                    Ok(Known::Gone) | Ok(Known::Unknown) => {
                        return Verification::no(
                            Verdict::DroppedDelete,
                            "Delete of an actor whose key is gone or unknown",
                            key_id,
                        )
                    }
                    Err(e) => {
                        let mut v =
                            Verification::no(Verdict::KeyUnavailable, e.to_string(), key_id);
                        v.transient = true;
                        return v;
                    }
                }
            }
        }
        let (mut key, fresh) = match self.keys.get(&signed.key_id).await {
            Ok(k) => k,
            Err(e @ KeyError::Gone(_)) => {
                return Verification::no(Verdict::KeyUnavailable, e.to_string(), key_id)
            }
            Err(e @ KeyError::Unavailable(_)) => {
                let mut v = Verification::no(Verdict::KeyUnavailable, e.to_string(), key_id);
                v.transient = true;
                return v;
            }
        };
        let mut result = verify_signature(&signed, &key.key);
        if result.is_err() && !fresh {
            // The remote may have rotated its key: fetch it once more.
            match self.keys.refetch(&signed.key_id).await {
                Ok(k) => {
                    key = k;
                    result = verify_signature(&signed, &key.key);
                }
                Err(e) => return Verification::no(Verdict::KeyUnavailable, e.to_string(), key_id),
            }
        }
        if let Err(e) = result {
            return Verification::no(Verdict::BadSignature, e.to_string(), key_id);
        }
        if let Some(a) = activity {
            if key.owner != a.actor {
                return Verification::no(
                    Verdict::BadSignature,
                    format!("key owner {} is not the actor {}", key.owner, a.actor),
                    key_id,
                );
            }
        }
        Verification {
            verdict: Verdict::Accepted,
            reason: "verified".into(),
            key_id: Some(signed.key_id.clone()),
            owner: Some(key.owner.clone()),
            transient: false,
        }
    }
}
