//! ActivityStreams activities as stampede publishes them: validation,
//! id assignment under the public URL, addressing, and the delivered body
//! (without `bto`/`bcc`, which ActivityPub §6 says must not be delivered).
use serde_json::{Map, Value};

use crate::CoreError;

/// The public collection, in the three spellings servers send.
pub const PUBLIC: &str = "https://www.w3.org/ns/activitystreams#Public";
const PUBLIC_ALIASES: &[&str] = &[PUBLIC, "as:Public", "Public"];

/// The ActivityStreams 2.0 context URL.
pub const AS_CONTEXT: &str = "https://www.w3.org/ns/activitystreams";

/// Activity types of the ActivityStreams vocabulary (§3.1 of
/// <https://www.w3.org/TR/activitystreams-vocabulary/>) plus the extensions
/// common in the fediverse.
pub const ACTIVITY_TYPES: &[&str] = &[
    "Accept",
    "Add",
    "Announce",
    "Arrive",
    "Block",
    "Create",
    "Delete",
    "Dislike",
    "Flag",
    "Follow",
    "Ignore",
    "Invite",
    "Join",
    "Leave",
    "Like",
    "Listen",
    "Move",
    "Offer",
    "Question",
    "Reject",
    "Read",
    "Remove",
    "TentativeReject",
    "TentativeAccept",
    "Travel",
    "Undo",
    "Update",
    "View",
    "EmojiReact",
];

/// Nesting limit for JSON we accept: deeper documents are refused before
/// anything walks them.
pub const MAX_JSON_DEPTH: usize = 32;

/// Where an activity is addressed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Addressing {
    /// Addressed to the public collection.
    pub public: bool,
    /// Ids in `to`, `cc` and `audience` (actors or collections), in order, without duplicates.
    pub open: Vec<String>,
    /// Ids in `bto` and `bcc`: delivered, never shown.
    pub blind: Vec<String>,
}

/// An activity ready to store and deliver.
#[derive(Debug, Clone)]
pub struct PreparedActivity {
    /// ActivityPub id of the activity.
    pub id: String,
    /// First activity type.
    pub kind: String,
    /// Id of the object, embedded or referenced, when there is one.
    pub object_id: Option<String>,
    /// The activity as stored (ids assigned), with `bto`/`bcc`.
    pub json: Value,
    /// The exact bytes POSTed to every inbox: `json` without `bto`/`bcc`.
    pub delivered_body: Vec<u8>,
    /// Its addressing.
    pub addressing: Addressing,
}

/// Parses `body` as JSON, refusing anything deeper than [`MAX_JSON_DEPTH`].
pub fn parse_json(body: &[u8]) -> Result<Value, CoreError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| CoreError::MalformedJson(e.to_string()))?;
    if depth(&v) > MAX_JSON_DEPTH {
        return Err(CoreError::MalformedJson(format!(
            "nested deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    Ok(v)
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The types of an object (`type` as a string or an array of strings).
pub fn types(o: &Map<String, Value>) -> Vec<&str> {
    match o.get("type") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// The id of a value that is either an id string or an object with `id`.
pub fn id_of(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("id").and_then(Value::as_str),
        _ => None,
    }
}

/// Validates and completes an activity published by the local actor
/// `actor_id`: it must be a JSON object of an activity type; `actor` is set
/// when absent and must be `actor_id` when present; `id` (and the id of an
/// embedded object created by it) is minted by `mint` when absent; `@context`
/// is added when absent.
pub fn prepare_outbound(
    body: &[u8],
    actor_id: &str,
    mut mint: impl FnMut(&'static str) -> String,
) -> Result<PreparedActivity, CoreError> {
    let mut json = parse_json(body)?;
    let obj = json
        .as_object_mut()
        .ok_or_else(|| CoreError::NotAnActivity("the body is not a JSON object".into()))?;
    let kind = {
        let ts = types(obj);
        if ts.is_empty() {
            return Err(CoreError::NotAnActivity("no `type`".into()));
        }
        match ts.iter().find(|t| ACTIVITY_TYPES.contains(t)) {
            Some(t) => (*t).to_string(),
            None => {
                return Err(CoreError::NotAnActivity(format!(
                    "type `{}` is not an activity type (wrap an object in a Create)",
                    ts.join(",")
                )))
            }
        }
    };
    match obj.get("actor") {
        None => {
            obj.insert("actor".into(), Value::String(actor_id.to_string()));
        }
        Some(a) if id_of(a) == Some(actor_id) => {}
        Some(_) => {
            return Err(CoreError::InvalidField {
                field: "actor",
                reason: format!("must be the publishing actor {actor_id}"),
            })
        }
    }
    if !obj.contains_key("@context") {
        obj.insert("@context".into(), Value::String(AS_CONTEXT.into()));
    }
    let id = match obj.get("id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) | None => {
            let id = mint("activities");
            obj.insert("id".into(), Value::String(id.clone()));
            id
        }
        Some(_) => {
            return Err(CoreError::InvalidField {
                field: "id",
                reason: "must be a string".into(),
            })
        }
    };
    let to = obj.get("to").cloned();
    let cc = obj.get("cc").cloned();
    if let Some(Value::Object(inner)) = obj.get_mut("object") {
        if !inner.contains_key("id") && (kind == "Create" || kind == "Update") {
            inner.insert("id".into(), Value::String(mint("objects")));
        }
        if kind == "Create" {
            inner
                .entry("attributedTo")
                .or_insert_with(|| Value::String(actor_id.to_string()));
            if let (false, Some(to)) = (inner.contains_key("to"), to) {
                inner.insert("to".into(), to);
            }
            if let (false, Some(cc)) = (inner.contains_key("cc"), cc) {
                inner.insert("cc".into(), cc);
            }
        }
    }
    let object_id = obj.get("object").and_then(id_of).map(str::to_string);
    let addressing = addressing(obj);
    let delivered_body = delivered_body(&json)?;
    Ok(PreparedActivity {
        id,
        kind,
        object_id,
        json,
        delivered_body,
        addressing,
    })
}

/// Reads the addressing of an activity: `to`, `cc`, `audience` (open) and
/// `bto`, `bcc` (blind), each a string, an object with `id`, or an array.
pub fn addressing(obj: &Map<String, Value>) -> Addressing {
    let mut a = Addressing::default();
    for (field, blind) in [
        ("to", false),
        ("cc", false),
        ("audience", false),
        ("bto", true),
        ("bcc", true),
    ] {
        let Some(v) = obj.get(field) else { continue };
        let items: Vec<&Value> = match v {
            Value::Array(xs) => xs.iter().collect(),
            other => vec![other],
        };
        for item in items {
            let Some(id) = id_of(item) else { continue };
            if PUBLIC_ALIASES.contains(&id) {
                a.public = true;
                continue;
            }
            if a.open.iter().any(|x| x == id) || a.blind.iter().any(|x| x == id) {
                continue;
            }
            if blind {
                a.blind.push(id.to_string());
            } else {
                a.open.push(id.to_string());
            }
        }
    }
    a
}

/// Serializes the activity as delivered: `bto` and `bcc` removed from it and
/// from an embedded object.
pub fn delivered_body(json: &Value) -> Result<Vec<u8>, CoreError> {
    let needs_strip = |o: &Map<String, Value>| o.contains_key("bto") || o.contains_key("bcc");
    let strip = match json {
        Value::Object(o) => {
            needs_strip(o)
                || matches!(o.get("object"), Some(Value::Object(inner)) if needs_strip(inner))
        }
        _ => false,
    };
    if !strip {
        return serde_json::to_vec(json).map_err(|e| CoreError::MalformedJson(e.to_string()));
    }
    let mut copy = json.clone();
    if let Value::Object(o) = &mut copy {
        o.remove("bto");
        o.remove("bcc");
        if let Some(Value::Object(inner)) = o.get_mut("object") {
            inner.remove("bto");
            inner.remove("bcc");
        }
    }
    serde_json::to_vec(&copy).map_err(|e| CoreError::MalformedJson(e.to_string()))
}

/// A public `Create{Note}` of `text` by `actor_id`, addressed to the public
/// and the actor's followers, as Mastodon addresses a public post.
pub fn public_note(actor_id: &str, text: &str) -> Value {
    serde_json::json!({
        "@context": AS_CONTEXT,
        "type": "Create",
        "actor": actor_id,
        "to": [PUBLIC],
        "cc": [format!("{actor_id}/followers")],
        "object": {
            "type": "Note",
            "attributedTo": actor_id,
            "content": text,
            "to": [PUBLIC],
            "cc": [format!("{actor_id}/followers")],
        }
    })
}

/// The answer of `local_actor_id` to a Follow (`Accept` or `Reject`): the
/// Follow as received is the object, addressed to its actor.
pub fn follow_answer(kind: &str, local_actor_id: &str, follow: &Value, follower: &str) -> Value {
    serde_json::json!({
        "@context": AS_CONTEXT,
        "type": kind,
        "actor": local_actor_id,
        "object": follow,
        "to": [follower],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "https://s.example/users/alice";

    fn minter() -> impl FnMut(&'static str) -> String {
        let mut n = 0;
        move |kind| {
            n += 1;
            format!("https://s.example/{kind}/{n}")
        }
    }

    #[test]
    fn assigns_ids_actor_and_context() {
        let body = br#"{"type":"Create","object":{"type":"Note","content":"hi"},"to":["https://www.w3.org/ns/activitystreams#Public"]}"#;
        let p = prepare_outbound(body, ME, minter()).unwrap();
        assert_eq!(p.id, "https://s.example/activities/1");
        assert_eq!(p.object_id.as_deref(), Some("https://s.example/objects/2"));
        assert_eq!(p.json["actor"], ME);
        assert_eq!(p.json["object"]["attributedTo"], ME);
        assert_eq!(p.json["@context"], AS_CONTEXT);
        assert!(p.addressing.public);
    }

    #[test]
    fn keeps_given_ids() {
        let body = br#"{"id":"https://s.example/a/9","type":"Like","actor":"https://s.example/users/alice","object":"https://r.example/n/1"}"#;
        let p = prepare_outbound(body, ME, minter()).unwrap();
        assert_eq!(p.id, "https://s.example/a/9");
        assert_eq!(p.object_id.as_deref(), Some("https://r.example/n/1"));
    }

    #[test]
    fn refuses_what_is_not_an_activity() {
        assert!(matches!(
            prepare_outbound(b"{not json", ME, minter()),
            Err(CoreError::MalformedJson(_))
        ));
        assert!(matches!(
            prepare_outbound(b"[1,2]", ME, minter()),
            Err(CoreError::NotAnActivity(_))
        ));
        assert!(matches!(
            prepare_outbound(br#"{"type":"Note","content":"x"}"#, ME, minter()),
            Err(CoreError::NotAnActivity(_))
        ));
        assert!(matches!(
            prepare_outbound(br#"{"content":"x"}"#, ME, minter()),
            Err(CoreError::NotAnActivity(_))
        ));
        assert!(matches!(
            prepare_outbound(
                br#"{"type":"Like","actor":"https://evil.example/u/x","object":"o"}"#,
                ME,
                minter()
            ),
            Err(CoreError::InvalidField { field: "actor", .. })
        ));
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        assert!(matches!(
            parse_json(deep.as_bytes()),
            Err(CoreError::MalformedJson(_))
        ));
    }

    #[test]
    fn addressing_and_blind_copies() {
        let body = br#"{"type":"Create","to":["https://r.example/u/a",{"id":"https://q.example/u/b"}],"cc":"as:Public","bcc":["https://z.example/u/c","https://r.example/u/a"],"bto":"https://y.example/u/d","object":{"type":"Note","bcc":["https://z.example/u/c"]}}"#;
        let p = prepare_outbound(body, ME, minter()).unwrap();
        assert!(p.addressing.public);
        assert_eq!(
            p.addressing.open,
            ["https://r.example/u/a", "https://q.example/u/b"]
        );
        assert_eq!(
            p.addressing.blind,
            ["https://y.example/u/d", "https://z.example/u/c"]
        );
        let delivered: Value = serde_json::from_slice(&p.delivered_body).unwrap();
        assert!(delivered.get("bcc").is_none());
        assert!(delivered.get("bto").is_none());
        assert!(delivered["object"].get("bcc").is_none());
        assert!(p.json.get("bcc").is_some(), "the stored copy keeps bcc");
    }

    #[test]
    fn public_note_is_a_create() {
        let n = public_note(ME, "hello");
        let p = prepare_outbound(&serde_json::to_vec(&n).unwrap(), ME, minter()).unwrap();
        assert_eq!(p.kind, "Create");
        assert_eq!(p.addressing.open, [format!("{ME}/followers")]);
    }
}
