//! The ActivityPub documents of local actors, Mastodon-compatible: what
//! remote servers fetch to verify our signatures and address us.
use serde_json::{json, Value};
use stampede_backends::store::ActorProfile;
use stampede_runtime::Config;

/// The `Person` document of a local actor.
pub fn person(cfg: &Config, a: &ActorProfile) -> Value {
    let id = cfg.actor_id(&a.name);
    json!({
        "@context": [
            "https://www.w3.org/ns/activitystreams",
            "https://w3id.org/security/v1",
            {"manuallyApprovesFollowers": "as:manuallyApprovesFollowers"}
        ],
        "id": id,
        "type": if a.name == stampede_runtime::process::INSTANCE_ACTOR { "Application" } else { "Person" },
        "preferredUsername": a.name,
        "name": if a.display_name.is_empty() { &a.name } else { &a.display_name },
        "summary": a.summary,
        "url": id,
        "inbox": format!("{id}/inbox"),
        "outbox": format!("{id}/outbox"),
        "followers": format!("{id}/followers"),
        "following": format!("{id}/following"),
        "manuallyApprovesFollowers": a.manually_approves_followers,
        "endpoints": {"sharedInbox": format!("{}/inbox", cfg.base())},
        "publicKey": {
            "id": cfg.key_id(&a.name),
            "owner": id,
            "publicKeyPem": a.public_key_pem,
        }
    })
}

/// The gRPC view of a local actor.
pub fn actor_message(cfg: &Config, a: &ActorProfile, followers: u64) -> stampede_proto::api::Actor {
    let id = cfg.actor_id(&a.name);
    stampede_proto::api::Actor {
        name: a.name.clone(),
        inbox: format!("{id}/inbox"),
        shared_inbox: format!("{}/inbox", cfg.base()),
        followers: format!("{id}/followers"),
        key_id: cfg.key_id(&a.name),
        public_key_pem: a.public_key_pem.clone(),
        manually_approves_followers: a.manually_approves_followers,
        followers_count: followers,
        id,
    }
}

/// Whether `name` is a valid local actor name: 1 to 64 of `[a-z0-9_]`, not
/// starting with `_` (reserved for the instance actor).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('_')
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}
