//! Entry points of the fuzz targets (`services/core/fuzz`, run by
//! `scripts/fuzz`) and of the test that replays their corpora on the stable
//! toolchain (`tests/fuzz_corpora.rs`). Each takes arbitrary bytes as a
//! remote server could send them, runs every parser that reads such bytes,
//! and checks what must hold whatever the input; a panic is a finding.
use serde_json::Value;

use crate::verify::HttpRequest;

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// The fuzz targets: name (a corpus folder) and entry point.
pub const TARGETS: &[(&str, Target)] = &[
    ("cavage_signature", cavage_signature),
    ("rfc9421_signature", rfc9421_signature),
    ("digests", digests),
    ("activity", activity),
    ("documents", documents),
    ("webfinger", webfinger),
];

/// Splits `data` at the first `sep` into text parts (lossy: the parsers
/// take `&str`, as header values arrive after the HTTP layer checked them).
fn split2(data: &[u8], sep: u8) -> (String, &[u8]) {
    match data.iter().position(|b| *b == sep) {
        Some(i) => (
            String::from_utf8_lossy(&data[..i]).into_owned(),
            &data[i + 1..],
        ),
        None => (String::from_utf8_lossy(data).into_owned(), &[]),
    }
}

/// The cavage `Signature` header, alone and as a whole request's (also in
/// the `Authorization: Signature …` form).
pub fn cavage_signature(data: &[u8]) {
    let value = String::from_utf8_lossy(data);
    let _ = crate::signature::parse_signature_header(&value);
    let auth = format!("Signature {value}");
    for headers in [
        vec![
            ("signature", value.as_ref()),
            ("host", "social.example"),
            ("date", "Sun, 06 Dec 2026 10:00:00 GMT"),
            (
                "digest",
                "SHA-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=",
            ),
        ],
        vec![("authorization", auth.as_str()), ("host", "social.example")],
    ] {
        let req = HttpRequest {
            method: "POST",
            scheme: "https",
            path_and_query: "/inbox",
            headers: &headers,
            body: b"{}",
        };
        check_request(&req);
    }
}

/// RFC 9421 `Signature-Input` and `Signature` (structured-field
/// dictionaries), split at the first newline, and the signature base built
/// from them.
pub fn rfc9421_signature(data: &[u8]) {
    let (input, rest) = split2(data, b'\n');
    let signature = String::from_utf8_lossy(rest);
    let _ = crate::sfv::parse_dictionary(&input);
    let _ = crate::sfv::parse_dictionary(&signature);
    let headers = [
        ("signature-input", input.as_str()),
        ("signature", signature.as_ref()),
        ("host", "social.example"),
        ("date", "Sun, 06 Dec 2026 10:00:00 GMT"),
        (
            "content-digest",
            "sha-256=:RK/0qy18MlBSVnWgjwz6lZEWjP/lF5HF9bvEF8FabDg=:",
        ),
        ("content-type", "application/activity+json"),
    ];
    let req = HttpRequest {
        method: "POST",
        scheme: "https",
        path_and_query: "/users/alice/inbox?page=1",
        headers: &headers,
        body: b"{\"hello\": \"world\"}",
    };
    check_request(&req);
}

/// Everything verification does with a parsed request short of the key.
fn check_request(req: &HttpRequest) {
    if let Ok(signed) = crate::verify::parse(req) {
        let _ = crate::verify::check_coverage_and_digest(req, &signed);
        for now in [0, 1_796_000_000, i64::MIN, i64::MAX] {
            let _ = crate::verify::check_time(req, &signed, now, 3600, 300);
        }
    }
}

/// `Digest` (RFC 3230) and `Content-Digest` (RFC 9530) headers against a
/// body: the header is the first line, the body the rest. A header that
/// verifies must still verify, and the body's own digests must too.
pub fn digests(data: &[u8]) {
    let (header, body) = split2(data, b'\n');
    let _ = crate::digest::verify_digest_header(&header, body);
    let _ = crate::digest::verify_content_digest(&header, body);
    assert!(crate::digest::verify_digest_header(&crate::digest::digest_header(body), body).is_ok());
    assert!(crate::digest::verify_content_digest(
        &crate::digest::content_digest_header(body),
        body
    )
    .is_ok());
}

/// An activity's JSON: parsing (depth limit), types, addressing, the
/// delivered body without `bto`/`bcc`, and preparing it for publishing.
pub fn activity(data: &[u8]) {
    if let Ok(v) = crate::activity::parse_json(data) {
        if let Value::Object(o) = &v {
            let _ = crate::activity::types(o);
            let _ = crate::activity::addressing(o);
            if let Some(a) = o.get("actor") {
                let _ = crate::activity::id_of(a);
            }
        }
        // An Object Integrity Proof read and checked against a key, and
        // the canonical form (RFC 8785) of whatever parsed.
        if let Ok(p) = crate::integrity::read_proof(&v, 1_700_000_000, 300) {
            if let Ok(key) =
                crate::keys::VerifyingKey::from_pem(&crate::multibase::ed25519_spki_pem(&[1; 32]))
            {
                let _ = crate::integrity::verify_proof(&v, &p, &key);
            }
        }
        if let Ok(c) = crate::jcs::canonicalize(&v) {
            // Canonical JSON is JSON, and canonical again as it is.
            let back = serde_json::from_str::<Value>(&c).ok();
            assert!(back.is_some(), "canonical JSON does not parse: {c}");
            if let Some(back) = back {
                assert_eq!(
                    crate::jcs::canonicalize(&back).ok().as_deref(),
                    Some(c.as_str())
                );
            }
        }
        if let Ok(body) = crate::activity::delivered_body(&v) {
            // What is delivered never carries the blind recipients.
            if let Ok(Value::Object(d)) = serde_json::from_slice::<Value>(&body) {
                assert!(!d.contains_key("bto") && !d.contains_key("bcc"));
                if let Some(Value::Object(inner)) = d.get("object") {
                    assert!(!inner.contains_key("bto") && !inner.contains_key("bcc"));
                }
            }
        }
    }
    let mut n = 0;
    if let Ok(p) =
        crate::activity::prepare_outbound(data, "https://social.example/users/alice", |k| {
            n += 1;
            format!("https://social.example/{k}/{n}")
        })
    {
        assert!(!p.id.is_empty());
        assert!(!p.delivered_body.is_empty());
    }
}

/// Actor and key documents as fetched from `https://r.example/users/a`:
/// whatever they say, what is kept is of that origin.
pub fn documents(data: &[u8]) {
    let Ok(doc) = crate::activity::parse_json(data) else {
        return;
    };
    let fetched = "https://r.example/users/a";
    if let Some(a) = crate::documents::parse_actor(fetched, &doc) {
        assert!(crate::documents::same_origin(&a.id, fetched));
        if let Some(k) = &a.key {
            assert!(crate::documents::same_origin(&k.id, fetched));
            assert_eq!(k.owner, a.id);
        }
    }
    for key_id in [
        "https://r.example/users/a#main-key",
        "https://r.example/users/a",
    ] {
        if let Ok(found) = crate::documents::key_in_document(fetched, key_id, &doc) {
            assert!(crate::documents::same_origin(&found.key.owner, fetched));
            assert_eq!(found.key.id, key_id);
            let _ = crate::documents::lists_key(&doc, &found.key);
        }
        if let Ok(found) = crate::documents::assertion_key_in_document(fetched, key_id, &doc) {
            assert!(crate::documents::same_origin(&found.key.owner, fetched));
            assert_eq!(found.key.id, key_id);
            let _ = crate::documents::lists_assertion_key(&doc, &found.key);
        }
    }
}

/// The WebFinger `resource` parameter, and host names as policy compares
/// them (a `Host` header, a URL's host).
pub fn webfinger(data: &[u8]) {
    let resource = String::from_utf8_lossy(data);
    let domain = crate::targets::normalize_domain(&resource);
    let _ = crate::targets::domain_within(&domain, "bad.example");
    let _ = crate::targets::inbox_host(&resource);
    if let Ok(name) =
        crate::webfinger::local_name(&resource, "social.example", "https://social.example/users/")
    {
        assert!(!name.is_empty() && !name.contains('/'));
    }
}
