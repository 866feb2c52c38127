//! Documents fetched from remote servers (actors, keys) and the rules that
//! bind what they say: a document speaks only for the origin (scheme, host,
//! port) of the URL it was fetched from, so a server can publish nothing
//! about another server's actors; and a document is an actor's only when
//! its `id` is the very URL it was fetched from, so a file elsewhere on the
//! origin (an upload, say) cannot pass for one of its actors (Mastodon's
//! CVE-2024-23832 was this).
use serde_json::Value;
use url::Url;

/// Whether `a` and `b` are URLs of the same origin (scheme, host, port).
/// Anything that is not an absolute URL with a host has no origin.
pub fn same_origin(a: &str, b: &str) -> bool {
    match (Url::parse(a), Url::parse(b)) {
        (Ok(a), Ok(b)) => a.host().is_some() && a.origin() == b.origin(),
        _ => false,
    }
}

/// Whether `url` is of the origin of `base` (already parsed). Per inbound
/// activity, so the common case is a string comparison: an id that begins
/// with `base`'s own serialized origin (`scheme://host[:port]`, as the `url`
/// crate writes it) followed by `/`, `?`, `#` or nothing is of that origin
/// without being parsed; anything else is parsed and compared.
pub fn same_origin_as(base: &Url, url: &str) -> bool {
    if base.host().is_some() && base.username().is_empty() && base.password().is_none() {
        let origin = &base[..url::Position::BeforePath];
        if let Some(rest) = url.strip_prefix(origin) {
            if rest.is_empty() || rest.starts_with(['/', '?', '#']) {
                return true;
            }
        }
    }
    Url::parse(url).is_ok_and(|u| u.host().is_some() && u.origin() == base.origin())
}

/// Whether `a` and `b` name the same document: equal URLs once parsed
/// (case of scheme and host, default ports), fragments aside.
pub fn same_document(a: &str, b: &str) -> bool {
    let doc = |s: &str| {
        Url::parse(s).ok().map(|mut u| {
            u.set_fragment(None);
            u
        })
    };
    matches!((doc(a), doc(b)), (Some(a), Some(b)) if a == b && a.host().is_some())
}

/// A key published in a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedKey {
    /// The key id.
    pub id: String,
    /// The actor it claims to belong to.
    pub owner: String,
    /// The SPKI PEM.
    pub pem: String,
}

/// What an actor document says about its actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorDocument {
    /// `id`.
    pub id: String,
    /// `inbox`.
    pub inbox: String,
    /// `endpoints.sharedInbox`.
    pub shared_inbox: Option<String>,
    /// The first key of `publicKey` (an object, or the first of an array).
    pub key: Option<PublishedKey>,
}

/// The keys a document publishes: `publicKey` as an object or an array; a
/// key's owner defaults to the document's `id`.
fn published_keys(doc: &Value) -> impl Iterator<Item = PublishedKey> + '_ {
    let doc_id = doc.get("id").and_then(Value::as_str);
    let one = move |k: &Value| -> Option<PublishedKey> {
        Some(PublishedKey {
            id: k.get("id")?.as_str()?.to_string(),
            owner: k
                .get("owner")
                .and_then(Value::as_str)
                .or(doc_id)?
                .to_string(),
            pem: k.get("publicKeyPem")?.as_str()?.to_string(),
        })
    };
    let keys: Vec<&Value> = match doc.get("publicKey") {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(k @ Value::Object(_)) => vec![k],
        _ => Vec::new(),
    };
    keys.into_iter().filter_map(one)
}

/// The most `assertionMethod` entries looked at in one document.
pub const MAX_ASSERTION_METHODS: usize = 16;

/// The Ed25519 Multikeys (FEP-521a) a document lists in `assertionMethod`
/// (an object, or an array of objects; references by id are skipped), as
/// keys whose owner is their `controller` and whose PEM is the key's
/// SubjectPublicKeyInfo. Entries of another type or codec are skipped.
fn assertion_keys(doc: &Value) -> impl Iterator<Item = PublishedKey> + '_ {
    let one = |k: &Value| -> Option<PublishedKey> {
        if k.get("type").and_then(Value::as_str) != Some("Multikey") {
            return None;
        }
        let raw =
            crate::multibase::ed25519_multikey(k.get("publicKeyMultibase")?.as_str()?).ok()?;
        Some(PublishedKey {
            id: k.get("id")?.as_str()?.to_string(),
            owner: k.get("controller")?.as_str()?.to_string(),
            pem: crate::multibase::ed25519_spki_pem(&raw),
        })
    };
    let keys: Vec<&Value> = match doc.get("assertionMethod") {
        Some(Value::Array(a)) => a.iter().take(MAX_ASSERTION_METHODS).collect(),
        Some(k @ Value::Object(_)) => vec![k],
        _ => Vec::new(),
    };
    keys.into_iter().filter_map(one)
}

/// Whether `doc` (an actor document) lists `key` in `assertionMethod`: its
/// id, controlled by the document's actor, with the same key.
pub fn lists_assertion_key(doc: &Value, key: &PublishedKey) -> bool {
    let id = doc.get("id").and_then(Value::as_str);
    assertion_keys(doc).any(|k| k.id == key.id && k.pem == key.pem && Some(k.owner.as_str()) == id)
}

/// Finds the Multikey `key_id` in the document fetched from `fetched_from`:
/// an actor document listing it in `assertionMethod`, or the Multikey
/// itself (its `id` the key's). Bound to the origin fetched like
/// [`key_in_document`]: the key's id, the document's and the key's
/// `controller` must be of it; the owner is confirmed only when the
/// document is the controller's actor document, fetched from its id.
pub fn assertion_key_in_document(
    fetched_from: &str,
    key_id: &str,
    doc: &Value,
) -> Result<FoundKey, KeyDocError> {
    let origin =
        Url::parse(fetched_from).map_err(|_| KeyDocError::ForeignOrigin("the key URL".into()))?;
    if !same_origin_as(&origin, key_id) {
        return Err(KeyDocError::ForeignOrigin(format!("key {key_id}")));
    }
    let doc_id = doc.get("id").and_then(Value::as_str);
    if let Some(id) = doc_id {
        if !same_origin_as(&origin, id) {
            return Err(KeyDocError::ForeignOrigin(format!("document {id}")));
        }
    }
    let key = if doc.get("assertionMethod").is_some() {
        assertion_keys(doc).find(|k| k.id == key_id)
    } else if doc_id == Some(key_id) {
        // The Multikey itself, with its controller.
        let mut wrapped = serde_json::Map::new();
        wrapped.insert("assertionMethod".into(), doc.clone());
        assertion_keys(&Value::Object(wrapped)).find(|k| k.id == key_id)
    } else {
        None
    };
    let key = key.ok_or(KeyDocError::NoSuchKey)?;
    if !same_origin_as(&origin, &key.owner) {
        return Err(KeyDocError::ForeignOrigin(format!(
            "controller {}",
            key.owner
        )));
    }
    let owner_confirmed =
        doc_id == Some(key.owner.as_str()) && same_document(&key.owner, fetched_from);
    Ok(FoundKey {
        key,
        owner_confirmed,
    })
}

/// Reads an actor document fetched from `fetched_from`. `None` when its `id`
/// is not the URL fetched (a server cannot describe another server's
/// actor, nor a document elsewhere on its origin an actor), or it has no
/// inbox (a collection, say). A key it lists is kept only when the key's id
/// is of the actor's origin and its owner is the actor.
pub fn parse_actor(fetched_from: &str, doc: &Value) -> Option<ActorDocument> {
    let id = doc.get("id")?.as_str()?;
    if !same_document(id, fetched_from) {
        return None;
    }
    let origin = Url::parse(fetched_from).ok()?;
    let inbox = doc.get("inbox")?.as_str()?.to_string();
    let shared_inbox = doc
        .get("endpoints")
        .and_then(|e| e.get("sharedInbox"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let key = published_keys(doc).find(|k| k.owner == id && same_origin_as(&origin, &k.id));
    Some(ActorDocument {
        id: id.to_string(),
        inbox,
        shared_inbox,
        key,
    })
}

/// Whether `doc` (an actor document) lists `key`: its id, with the same PEM
/// (whitespace aside).
pub fn lists_key(doc: &Value, key: &PublishedKey) -> bool {
    let squash = |p: &str| p.split_whitespace().collect::<String>();
    published_keys(doc).any(|k| k.id == key.id && squash(&k.pem) == squash(&key.pem))
}

/// A key found in the document fetched for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundKey {
    /// The key, its owner bound to the origin fetched.
    pub key: PublishedKey,
    /// The document is the owner's own actor document (its `id` is the
    /// owner and the URL fetched), so the owner is confirmed. Otherwise the
    /// owner's actor document must be fetched and list the key.
    pub owner_confirmed: bool,
}

/// Why a fetched document yields no usable key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyDocError {
    /// The document does not publish the key asked for.
    NoSuchKey,
    /// The document, or the key's owner, is of another origin than the URL
    /// fetched: it speaks for someone else.
    ForeignOrigin(String),
}

impl std::fmt::Display for KeyDocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyDocError::NoSuchKey => f.write_str("the document has no such key"),
            KeyDocError::ForeignOrigin(what) => {
                write!(f, "{what} is of another origin than the URL fetched")
            }
        }
    }
}

/// Finds `key_id` in the document fetched from `fetched_from` (an actor
/// document with `publicKey`, or the key object itself). The document's
/// `id` and the key's owner must be of the origin of `fetched_from`.
pub fn key_in_document(
    fetched_from: &str,
    key_id: &str,
    doc: &Value,
) -> Result<FoundKey, KeyDocError> {
    let origin =
        Url::parse(fetched_from).map_err(|_| KeyDocError::ForeignOrigin("the key URL".into()))?;
    if !same_origin_as(&origin, key_id) {
        return Err(KeyDocError::ForeignOrigin(format!("key {key_id}")));
    }
    let doc_id = doc.get("id").and_then(Value::as_str);
    if let Some(id) = doc_id {
        if !same_origin_as(&origin, id) {
            return Err(KeyDocError::ForeignOrigin(format!("document {id}")));
        }
    }
    let key = if doc.get("publicKey").is_some() {
        published_keys(doc).find(|k| k.id == key_id)
    } else {
        // The key object itself: it must name its owner.
        (doc_id == Some(key_id))
            .then(|| {
                Some(PublishedKey {
                    id: key_id.to_string(),
                    owner: doc.get("owner")?.as_str()?.to_string(),
                    pem: doc.get("publicKeyPem")?.as_str()?.to_string(),
                })
            })
            .flatten()
    };
    let key = key.ok_or(KeyDocError::NoSuchKey)?;
    if !same_origin_as(&origin, &key.owner) {
        return Err(KeyDocError::ForeignOrigin(format!("owner {}", key.owner)));
    }
    let owner_confirmed =
        doc_id == Some(key.owner.as_str()) && same_document(&key.owner, fetched_from);
    Ok(FoundKey {
        key,
        owner_confirmed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn origins_compare_scheme_host_and_port() {
        assert!(same_origin(
            "https://a.example/u/1",
            "https://a.example/x#k"
        ));
        assert!(same_origin(
            "https://A.example/u",
            "https://a.example:443/v"
        ));
        assert!(!same_origin("https://a.example/u", "http://a.example/u"));
        assert!(!same_origin(
            "https://a.example/u",
            "https://a.example:8443/u"
        ));
        assert!(!same_origin("https://a.example/u", "https://b.a.example/u"));
        assert!(!same_origin("urn:x:1", "urn:x:1"));
        assert!(!same_origin("not a url", "not a url"));
        // The string fast path agrees with parsing.
        let base = Url::parse("https://a.example/users/x").unwrap();
        for (u, same) in [
            ("https://a.example/notes/1", true),
            ("https://a.example", true),
            ("https://a.example?x", true),
            ("https://a.example#k", true),
            ("https://A.EXAMPLE/notes/1", true),
            ("https://a.example:443/n", true),
            ("https://a.example.evil/n", false),
            ("https://a.example:8443/n", false),
            ("https://a.example@evil.example/n", false),
            // WHATWG URLs (and so reqwest) read a backslash as a slash.
            ("https://a.example\\@evil.example/n", true),
            ("http://a.example/n", false),
        ] {
            assert_eq!(same_origin_as(&base, u), same, "{u}");
        }
    }

    #[test]
    fn an_actor_document_and_its_key() {
        let doc = json!({
            "id": "https://r.example/u/a",
            "inbox": "https://r.example/u/a/inbox",
            "endpoints": {"sharedInbox": "https://r.example/inbox"},
            "publicKey": {"id": "https://r.example/u/a#main-key", "owner": "https://r.example/u/a", "publicKeyPem": "PEM"}
        });
        let a = parse_actor("https://r.example/u/a", &doc).unwrap();
        assert_eq!(a.shared_inbox.as_deref(), Some("https://r.example/inbox"));
        assert_eq!(a.key.as_ref().unwrap().pem, "PEM");
        let k = key_in_document(
            "https://r.example/u/a",
            "https://r.example/u/a#main-key",
            &doc,
        )
        .unwrap();
        assert!(k.owner_confirmed);
        assert_eq!(k.key.owner, "https://r.example/u/a");
        assert_eq!(
            key_in_document("https://r.example/u/a", "https://r.example/u/a#other", &doc),
            Err(KeyDocError::NoSuchKey)
        );
        let listed = |id: &str, pem: &str| PublishedKey {
            id: id.into(),
            owner: "https://r.example/u/a".into(),
            pem: pem.into(),
        };
        assert!(lists_key(
            &doc,
            &listed("https://r.example/u/a#main-key", "PEM")
        ));
        assert!(!lists_key(
            &doc,
            &listed("https://r.example/u/a#other", "PEM")
        ));
        assert!(
            !lists_key(&doc, &listed("https://r.example/u/a#main-key", "OTHER")),
            "the same id with another key"
        );
    }

    #[test]
    fn a_key_array_and_a_key_document() {
        let many = json!({"id": "https://r/u/a", "publicKey": [{"id": "https://r/k1", "publicKeyPem": "A"}, {"id": "https://r/k2", "publicKeyPem": "B"}]});
        let k = key_in_document("https://r/u/a", "https://r/k2", &many).unwrap();
        assert_eq!(
            (k.key.owner.as_str(), k.key.pem.as_str()),
            ("https://r/u/a", "B")
        );
        let key = json!({"id": "https://r/k", "owner": "https://r/u/a", "publicKeyPem": "C"});
        let k = key_in_document("https://r/k", "https://r/k", &key).unwrap();
        assert_eq!(k.key.owner, "https://r/u/a");
        assert!(
            !k.owner_confirmed,
            "a key document must be confirmed by its owner"
        );
    }

    /// The hijack: evil.example answers for its own key URL with a document
    /// claiming to be victim.example's actor, with evil's inbox.
    #[test]
    fn a_document_cannot_speak_for_another_origin() {
        let evil = json!({
            "id": "https://victim.example/users/alice",
            "inbox": "https://evil.example/steal",
            "publicKey": {"id": "https://evil.example/k", "owner": "https://victim.example/users/alice", "publicKeyPem": "P"}
        });
        assert!(matches!(
            key_in_document("https://evil.example/k", "https://evil.example/k", &evil),
            Err(KeyDocError::ForeignOrigin(_))
        ));
        assert_eq!(parse_actor("https://evil.example/k", &evil), None);
        // The owner alone of another origin.
        let owner_only = json!({
            "id": "https://evil.example/k",
            "publicKey": {"id": "https://evil.example/k", "owner": "https://victim.example/users/alice", "publicKeyPem": "P"}
        });
        assert!(matches!(
            key_in_document(
                "https://evil.example/k",
                "https://evil.example/k",
                &owner_only
            ),
            Err(KeyDocError::ForeignOrigin(_))
        ));
        // A key id of another origin than the URL fetched.
        assert!(matches!(
            key_in_document(
                "https://evil.example/k",
                "https://victim.example/k",
                &owner_only
            ),
            Err(KeyDocError::ForeignOrigin(_))
        ));
    }

    /// A document elsewhere on the actor's origin (an uploaded file) cannot
    /// pass for the actor, nor confirm the actor's key.
    #[test]
    fn a_document_is_an_actor_only_at_its_own_url() {
        let upload = json!({
            "id": "https://r.example/users/alice", "inbox": "https://r.example/media/steal",
            "publicKey": {"id": "https://r.example/media/x.json#k", "owner": "https://r.example/users/alice", "publicKeyPem": "P"}
        });
        let fetched = "https://r.example/media/x.json";
        assert_eq!(parse_actor(fetched, &upload), None);
        let k = key_in_document(fetched, "https://r.example/media/x.json#k", &upload).unwrap();
        assert!(!k.owner_confirmed, "the owner's own document must list it");
        // GoToSocial's key URL answers with a stub whose id is the actor.
        let stub = json!({"id": "https://g.example/users/bob", "publicKey": {"id": "https://g.example/users/bob/main-key", "owner": "https://g.example/users/bob", "publicKeyPem": "P"}});
        let k = key_in_document(
            "https://g.example/users/bob/main-key",
            "https://g.example/users/bob/main-key",
            &stub,
        )
        .unwrap();
        assert!(!k.owner_confirmed);
        assert_eq!(k.key.owner, "https://g.example/users/bob");
        assert!(same_document(
            "https://R.example:443/u#x",
            "https://r.example/u"
        ));
        assert!(!same_document(
            "https://r.example/u",
            "https://r.example/u/"
        ));
    }

    /// FEP-8b32's actor: an Ed25519 Multikey in `assertionMethod`.
    fn multikey_actor() -> Value {
        json!({
            "id": "https://server.example/users/alice",
            "inbox": "https://server.example/users/alice/inbox",
            "assertionMethod": [{
                "id": "https://server.example/users/alice#ed25519-key",
                "type": "Multikey",
                "controller": "https://server.example/users/alice",
                "publicKeyMultibase": "z6MkrJVnaZkeFzdQyMZu1cgjg7k1pZZ6pvBQ7XJPt4swbTQ2"
            }]
        })
    }

    #[test]
    fn an_assertion_method_multikey() {
        let doc = multikey_actor();
        let actor = "https://server.example/users/alice";
        let kid = "https://server.example/users/alice#ed25519-key";
        let k = assertion_key_in_document(actor, kid, &doc).unwrap();
        assert!(k.owner_confirmed);
        assert_eq!(k.key.owner, actor);
        assert!(k.key.pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert!(lists_assertion_key(&doc, &k.key));
        // Not a key for requests, and no other key for assertions.
        assert_eq!(
            key_in_document(actor, kid, &doc),
            Err(KeyDocError::NoSuchKey)
        );
        assert_eq!(
            assertion_key_in_document(actor, &format!("{actor}#main-key"), &doc),
            Err(KeyDocError::NoSuchKey)
        );
        // Another codec, another type, no controller: not a key.
        for (field, v) in [
            (
                "publicKeyMultibase",
                json!("zDnaerDaTF5BXEavCrfRZEk316dpbLsfPDZ3WJ5hRTPFU2169"),
            ),
            ("type", json!("JsonWebKey")),
            ("controller", Value::Null),
        ] {
            let mut d = multikey_actor();
            d["assertionMethod"][0][field] = v;
            assert_eq!(
                assertion_key_in_document(actor, kid, &d),
                Err(KeyDocError::NoSuchKey),
                "{field}"
            );
        }
        // A controller of another origin.
        let mut d = multikey_actor();
        d["assertionMethod"][0]["controller"] = json!("https://victim.example/users/bob");
        assert!(matches!(
            assertion_key_in_document(actor, kid, &d),
            Err(KeyDocError::ForeignOrigin(_))
        ));
        // A key id of another origin than the URL fetched.
        assert!(matches!(
            assertion_key_in_document("https://evil.example/k", kid, &doc),
            Err(KeyDocError::ForeignOrigin(_))
        ));
        // The Multikey document itself: its controller must confirm it.
        let alone = doc["assertionMethod"][0].clone();
        let k = assertion_key_in_document(kid, kid, &alone).unwrap();
        assert!(!k.owner_confirmed);
        assert!(lists_assertion_key(&doc, &k.key));
        let mut other = multikey_actor();
        other["assertionMethod"][0]["publicKeyMultibase"] =
            json!(crate::multibase::ed25519_multikey_encode(&[7; 32]));
        assert!(
            !lists_assertion_key(&other, &k.key),
            "another key under the id"
        );
    }

    #[test]
    fn an_actor_keeps_only_its_own_key() {
        let doc = json!({
            "id": "https://r.example/u/a", "inbox": "https://r.example/u/a/inbox",
            "publicKey": {"id": "https://other.example/k", "owner": "https://r.example/u/a", "publicKeyPem": "P"}
        });
        assert_eq!(
            parse_actor("https://r.example/u/a", &doc).unwrap().key,
            None
        );
        let doc = json!({
            "id": "https://r.example/u/a", "inbox": "https://r.example/u/a/inbox",
            "publicKey": {"id": "https://r.example/u/a#k", "owner": "https://r.example/u/b", "publicKeyPem": "P"}
        });
        assert_eq!(
            parse_actor("https://r.example/u/a", &doc).unwrap().key,
            None
        );
    }
}
