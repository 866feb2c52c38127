//! Verifying an inbound signed request end to end: signature syntax, that
//! it was addressed to us (its signed host), date window, digest, blocked
//! domains, that the key belongs to the activity's actor (same origin, owner
//! = actor) and the activity's ids to the actor's origin, the key itself
//! (cached or fetched, refetched on failure for rotation at most once per
//! `STAMPEDE_KEY_REFETCH_SECS`), and the cheap drop of `Delete`s of actors
//! whose keys we never had. Used by the inbox service and by the `Verify`
//! gRPC call.
//!
//! An activity may carry an Object Integrity Proof (FEP-8b32,
//! `eddsa-jcs-2022`) by its author: then the proof must verify with the
//! author's `assertionMethod` key (of the actor's origin, controlled by the
//! actor), and the request's signature may be another server's, which
//! forwarded it. Without a proof, the signer must be the actor.
use std::time::{Duration, Instant};

use serde_json::Value;
use stampede_core::activity::id_of;
use stampede_core::verify::{
    check_coverage_and_digest, check_time, parse, verify_signature, HttpRequest,
};
use stampede_core::CoreError;
use url::Url;

use crate::key_resolver::{KeyError, KeyResolver, Known, Purpose};
use stampede_runtime::process::Process;

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
    /// The activity's id (or, for `Create`/`Update`/`Delete`, its object's)
    /// is of another origin than its actor: it speaks for another server.
    ForeignId,
    /// The body is an activity that cannot be read (`Verify`: no type, no
    /// actor, an id too long), so nothing about its actor can be verified.
    Malformed,
    /// The signature was made for another server (its signed `host` /
    /// `@authority` is not our public host or an alias): a replay.
    WrongHost,
    /// The activity's Object Integrity Proof does not verify, or cannot be
    /// used: another cryptosuite, `created` ahead of the clock, a key not
    /// the actor's or of another origin, a tampered document.
    BadProof,
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
            Verdict::ForeignId => "foreign_id",
            Verdict::Malformed => "malformed",
            Verdict::WrongHost => "wrong_host",
            Verdict::BadProof => "bad_proof",
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
    /// Whether trying again later may succeed (the key's server was
    /// unreachable, or a fetch was rationed).
    pub transient: bool,
    /// When a transient verdict is worth trying again, if known.
    pub retry_after: Option<Duration>,
    /// Whether it is transient because one of our own backends failed
    /// (not the key's server): worth trying again as soon as it is back.
    pub backend: bool,
    /// The `verificationMethod` of the activity's Object Integrity Proof,
    /// when one verified.
    pub proof_key_id: Option<String>,
    /// Whether the request was signed by another actor than the
    /// activity's (a forward), which the proof vouches for: `key_id` is
    /// the forwarder's, `owner` the actor.
    pub forwarded: bool,
}

impl Verification {
    fn no(verdict: Verdict, reason: impl Into<String>, key_id: Option<&str>) -> Self {
        Self {
            verdict,
            reason: reason.into(),
            key_id: key_id.map(str::to_string),
            owner: None,
            transient: false,
            retry_after: None,
            backend: false,
            proof_key_id: None,
            forwarded: false,
        }
    }

    fn later(mut self, wait: Option<Duration>) -> Self {
        self.transient = true;
        self.retry_after = wait;
        self
    }

    /// The verdict for a key that could not be had.
    fn key_error(e: KeyError, key_id: Option<&str>) -> Self {
        let v = Verification::no(Verdict::KeyUnavailable, e.to_string(), key_id);
        match e {
            KeyError::Gone(_) => v,
            KeyError::Unavailable(_) => v.later(None),
            KeyError::Backend(_) => Verification {
                backend: true,
                ..v.later(None)
            },
            KeyError::Throttled { wait, .. } => v.later(Some(wait)),
        }
    }
}

/// The longest id (activity, actor, object) accepted: real ones are a URL
/// of a hundred bytes or so, and each is kept for a week as a dedup mark.
pub const MAX_ID_BYTES: usize = 2048;

/// How long the inbox remembers an activity id per inbox to drop replays;
/// a forwarded activity's proof older than this is refused, so a captured
/// forward cannot be replayed once its id is forgotten.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// What verification needs to know of the activity.
#[derive(Debug, Clone)]
pub struct ActivityInfo {
    /// `id`.
    pub id: Option<String>,
    /// First `type`.
    pub kind: String,
    /// `actor` id.
    pub actor: String,
    /// The object's id, embedded or referenced (the first, for several).
    pub object_id: Option<String>,
    /// Every object's id, when `object` is an array: all are checked.
    pub more_object_ids: Vec<String>,
    /// Whether any of its types is `Create`, `Update` or `Delete`: it
    /// asserts authorship of its objects.
    pub asserts_objects: bool,
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
    let id = o.get("id").and_then(Value::as_str).map(str::to_string);
    let mut object_ids: Vec<String> = match o.get("object") {
        Some(Value::Array(objects)) => objects
            .iter()
            .filter_map(id_of)
            .map(str::to_string)
            .collect(),
        Some(object) => id_of(object).map(str::to_string).into_iter().collect(),
        None => Vec::new(),
    };
    for (what, v) in [("actor", Some(&actor)), ("id", id.as_ref())]
        .into_iter()
        .chain(object_ids.iter().map(|o| ("object id", Some(o))))
    {
        if v.is_some_and(|v| v.len() > MAX_ID_BYTES) {
            return Err(format!("{what} longer than {MAX_ID_BYTES} bytes"));
        }
    }
    let asserts_objects = stampede_core::activity::types(o)
        .iter()
        .any(|t| matches!(*t, "Create" | "Update" | "Delete"));
    let object_id = (!object_ids.is_empty()).then(|| object_ids.remove(0));
    Ok(ActivityInfo {
        id,
        kind,
        actor,
        object_id,
        more_object_ids: object_ids,
        asserts_objects,
    })
}

/// Whether the activity's ids are of its actor's origin (`actor` already
/// parsed): its own id, and for `Create`, `Update` and `Delete` (any of its
/// types) every object's, which such an activity asserts authorship of. Mastodon checks
/// the same (`invalid_origin?`).
fn ids_of_actor_origin(actor: &Url, a: &ActivityInfo) -> Result<(), String> {
    use stampede_core::documents::same_origin_as;
    if let Some(id) = &a.id {
        if !same_origin_as(actor, id) {
            return Err(format!(
                "activity id {id} is of another origin than its actor"
            ));
        }
    }
    if a.asserts_objects {
        for o in a.object_id.iter().chain(&a.more_object_ids) {
            if !same_origin_as(actor, o) {
                return Err(format!("object id {o} is of another origin than the actor"));
            }
        }
    }
    Ok(())
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
    /// `client` names who sent it (the edge's rate-limit key; empty when
    /// unknown): key fetches it causes are rationed per client.
    pub async fn verify(
        &self,
        req: &HttpRequest<'_>,
        activity: Option<&ActivityInfo>,
        client: &str,
    ) -> Verification {
        static NO_BODY: Value = Value::Null;
        self.verify_activity(req, activity.map(|a| (a, &NO_BODY)), client)
            .await
    }

    /// [`Verifier::verify`] of an activity and its parsed body: when the
    /// body carries an Object Integrity Proof, the proof is verified too,
    /// and it lets another server's signature (a forward) stand for the
    /// actor's.
    pub async fn verify_activity(
        &self,
        req: &HttpRequest<'_>,
        activity: Option<(&ActivityInfo, &Value)>,
        client: &str,
    ) -> Verification {
        let started = Instant::now();
        let v = self.verify_inner(req, activity, client).await;
        self.p
            .metrics
            .verify_seconds
            .observe(started.elapsed().as_secs_f64());
        v
    }

    async fn verify_inner(
        &self,
        req: &HttpRequest<'_>,
        activity: Option<(&ActivityInfo, &Value)>,
        client: &str,
    ) -> Verification {
        // The body only matters when it carries a proof: one lookup.
        let proof_doc = activity
            .map(|(_, doc)| doc)
            .filter(|doc| stampede_core::integrity::has_proof(doc));
        let activity = activity.map(|(a, _)| a);
        let cfg = &self.p.cfg;
        let signed = match parse(req) {
            Ok(s) => s,
            Err(e) => return Verification::no(Verdict::BadSignature, e.to_string(), None),
        };
        if signed.key_id.len() > MAX_ID_BYTES {
            // Key ids name cache entries and fetches: bounded like other ids.
            return Verification::no(
                Verdict::BadSignature,
                format!("keyId longer than {MAX_ID_BYTES} bytes"),
                None,
            );
        }
        let key_id = Some(signed.key_id.as_str());
        // The signed host (cavage `host`, RFC 9421 `@authority` or the
        // authority of `@target-uri`, all read from this header) must be
        // ours: a request a victim signed for another server cannot be
        // replayed to us.
        match req.header("host") {
            Some(h) if cfg.is_own_authority(h) => {}
            h => {
                return Verification::no(
                    Verdict::WrongHost,
                    format!(
                        "signed for host {:?}, not {}",
                        h.unwrap_or(""),
                        cfg.public_host()
                    ),
                    key_id,
                )
            }
        }
        let now = stampede_backends::clock::now_secs();
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
        if self.p.policy.is_blocked(&key_host) {
            return Verification::no(Verdict::Blocked, format!("{key_host} is blocked"), key_id);
        }
        // The author's proof, read (not yet verified) when there is one.
        let mut proof = None;
        if let Some(a) = activity {
            let actor = url_and_host(&a.actor);
            if actor
                .as_ref()
                .is_some_and(|(_, h)| self.p.policy.is_blocked(h))
            {
                return Verification::no(Verdict::Blocked, "the actor's domain is blocked", key_id);
            }
            let forwarded = actor
                .as_ref()
                .is_some_and(|(u, _)| u.origin() != key_url.origin());
            if let Some(doc) = proof_doc {
                match stampede_core::integrity::read_proof(doc, now, cfg.inbound_max_future_secs) {
                    Ok(p) if forwarded => {
                        // A forward stands on its proof alone: one without a
                        // creation time, or older than the inboxes remember
                        // activity ids, could be replayed for ever.
                        let Some(created) = p.created else {
                            return Verification::no(
                                Verdict::BadProof,
                                "a forwarded activity's proof without `created`",
                                key_id,
                            );
                        };
                        if now.saturating_sub(created) > REPLAY_WINDOW.as_secs() as i64 {
                            return Verification::no(
                                Verdict::BadProof,
                                format!(
                                    "a forwarded activity's proof created {}s ago, more than the {}s activity ids are remembered",
                                    now.saturating_sub(created),
                                    REPLAY_WINDOW.as_secs()
                                ),
                                key_id,
                            );
                        }
                        proof = Some(p);
                    }
                    Ok(p) => proof = Some(p),
                    Err(e) if forwarded => {
                        return Verification::no(Verdict::BadProof, e.to_string(), key_id)
                    }
                    // Signed by its author: a proof we cannot read (another
                    // cryptosuite, `null`) adds nothing to that signature and
                    // takes nothing from it. One we can read must verify.
                    Err(e) => {
                        tracing::debug!(error = %e, actor = %a.actor, "a proof we cannot read on an activity its author signed: ignored");
                    }
                }
            }
            let Some((url, _)) = actor.filter(|_| !forwarded || proof.is_some()) else {
                return Verification::no(
                    Verdict::BadSignature,
                    format!(
                        "key {} cannot speak for {}: another origin, and no proof by the actor",
                        signed.key_id, a.actor
                    ),
                    key_id,
                );
            };
            if let Some(p) = &proof {
                if !stampede_core::documents::same_origin_as(&url, &p.verification_method) {
                    return Verification::no(
                        Verdict::BadProof,
                        format!(
                            "proof key {} cannot speak for {}: another origin",
                            p.verification_method, a.actor
                        ),
                        key_id,
                    );
                }
            }
            if let Err(reason) = ids_of_actor_origin(&url, a) {
                return Verification::no(Verdict::ForeignId, reason, key_id);
            }
            let self_delete =
                a.kind == "Delete" && a.object_id.as_deref().is_none_or(|o| o == a.actor);
            if self_delete {
                // The author's key: the proof's when the signer is another's.
                let known = match (&proof, forwarded) {
                    (Some(p), true) => {
                        self.keys
                            .known_for(Purpose::Assertions, &p.verification_method)
                            .await
                    }
                    _ => self.keys.known(&signed.key_id).await,
                };
                match known {
                    Ok(Known::Key(_)) => {}
                    Ok(Known::Gone) | Ok(Known::Unknown) => {
                        return Verification::no(
                            Verdict::DroppedDelete,
                            "Delete of an actor whose key is gone or unknown",
                            key_id,
                        )
                    }
                    Err(e) => {
                        return Verification::no(Verdict::KeyUnavailable, e.to_string(), key_id)
                            .later(None)
                    }
                }
            }
        }
        let (mut key, fresh) = match self.keys.get(&signed.key_id, client).await {
            Ok(k) => k,
            Err(e) => return Verification::key_error(e, key_id),
        };
        let mut result = verify_signature(&signed, &key.key);
        if result.is_err() && !fresh {
            // The remote may have rotated its key: fetch it once more, at
            // most once per refetch window. Within the window the request
            // may still be genuine (a rotation just after a forged request
            // took the refetch), so it is tried again after the window.
            match self.keys.refetch(&signed.key_id, client).await {
                Ok(k) => {
                    key = k;
                    result = verify_signature(&signed, &key.key);
                }
                Err(KeyError::Throttled { reason, wait }) => {
                    return Verification::no(
                        Verdict::BadSignature,
                        format!("signature does not verify with the cached key ({reason})"),
                        key_id,
                    )
                    .later(Some(wait))
                }
                Err(e) => return Verification::key_error(e, key_id),
            }
        }
        if let Err(e) = result {
            return Verification::no(Verdict::BadSignature, e.to_string(), key_id);
        }
        let mut owner = key.owner.clone();
        let mut proof_key_id = None;
        if let Some(a) = activity {
            match (&proof, proof_doc) {
                (Some(p), Some(doc)) => {
                    // FEP-8b32: a proof that fails refuses the activity,
                    // whoever signed the request.
                    if let Err(v) = self.check_proof(doc, p, a, client, key_id).await {
                        return v;
                    }
                    proof_key_id = Some(p.verification_method.clone());
                    owner = a.actor.clone();
                }
                _ if key.owner != a.actor => {
                    return Verification::no(
                        Verdict::BadSignature,
                        format!("key owner {} is not the actor {}", key.owner, a.actor),
                        key_id,
                    );
                }
                _ => {}
            }
        }
        let forwarded = owner != key.owner;
        Verification {
            verdict: Verdict::Accepted,
            reason: if forwarded {
                format!("verified: forwarded by {}, proof by the actor", key.owner)
            } else {
                "verified".into()
            },
            key_id: Some(signed.key_id.clone()),
            owner: Some(owner),
            transient: false,
            retry_after: None,
            backend: false,
            proof_key_id,
            forwarded,
        }
    }

    /// Verifies the activity's proof (read from `doc`) with its
    /// `verificationMethod`: an `assertionMethod` key of the actor's origin
    /// (checked before), controlled by the actor, fetched (or refetched,
    /// for rotation, at most once per `STAMPEDE_KEY_REFETCH_SECS`) like
    /// the keys of requests.
    async fn check_proof(
        &self,
        doc: &Value,
        proof: &stampede_core::integrity::Proof,
        a: &ActivityInfo,
        client: &str,
        key_id: Option<&str>,
    ) -> Result<(), Verification> {
        use stampede_core::integrity::verify_proof;
        let method = proof.verification_method.as_str();
        let (mut key, fresh) = self
            .keys
            .get_for(Purpose::Assertions, method, client)
            .await
            .map_err(|e| Verification::key_error(e, key_id))?;
        let mut result = verify_proof(doc, proof, &key.key);
        if matches!(result, Err(CoreError::BadSignature)) && !fresh {
            match self
                .keys
                .refetch_for(Purpose::Assertions, method, client)
                .await
            {
                Ok(k) => {
                    key = k;
                    result = verify_proof(doc, proof, &key.key);
                }
                Err(KeyError::Throttled { reason, wait }) => {
                    return Err(Verification::no(
                        Verdict::BadProof,
                        format!("proof does not verify with the cached key {method} ({reason})"),
                        key_id,
                    )
                    .later(Some(wait)))
                }
                Err(e) => return Err(Verification::key_error(e, key_id)),
            }
        }
        if let Err(e) = result {
            return Err(Verification::no(
                Verdict::BadProof,
                format!("proof by {method}: {e}"),
                key_id,
            ));
        }
        if key.owner != a.actor {
            return Err(Verification::no(
                Verdict::BadProof,
                format!(
                    "proof key {method} is controlled by {}, not the actor {}",
                    key.owner, a.actor
                ),
                key_id,
            ));
        }
        Ok(())
    }
}
