//! Object Integrity Proofs (FEP-8b32): a Data Integrity proof
//! (`DataIntegrityProof`, cryptosuite `eddsa-jcs-2022`, purpose
//! `assertionMethod`) attached to an activity by its author, so that the
//! activity can be believed when a third server forwards it.
//!
//! Verification (W3C vc-di-eddsa, "eddsa-jcs-2022"): the proof options are
//! the proof without `proofValue` (its `@context`, when it has one, must be
//! the document's); the document is taken without `proof`; each is canonicalized (RFC 8785,
//! [`crate::jcs`]) and hashed with SHA-256; the Ed25519 signature in
//! `proofValue` (multibase base58btc) must verify over
//! `SHA-256(options) || SHA-256(document)` with the key the
//! `verificationMethod` names (an Ed25519 Multikey, FEP-521a). Whose key it
//! is, and whether that may speak for the activity, is the caller's to
//! decide (`federation/src/verify.rs`).
use aws_lc_rs::digest::{digest, SHA256};
use serde_json::{Map, Value};

use crate::jcs::canonicalize;
use crate::keys::{Alg, VerifyingKey};
use crate::multibase::decode_base58btc;
use crate::CoreError;

/// The only proof type verified.
pub const PROOF_TYPE: &str = "DataIntegrityProof";
/// The only cryptosuite verified.
pub const CRYPTOSUITE: &str = "eddsa-jcs-2022";
/// The only proof purpose accepted for an activity.
pub const PURPOSE: &str = "assertionMethod";
/// The most proofs in a `proof` array looked at.
pub const MAX_PROOFS: usize = 4;
/// The longest `verificationMethod` accepted (ids elsewhere are capped the same).
pub const MAX_METHOD_BYTES: usize = 2048;

fn invalid(reason: impl Into<String>) -> CoreError {
    CoreError::InvalidProof(reason.into())
}

/// A proof read from a document, ready to verify.
#[derive(Debug, Clone)]
pub struct Proof {
    /// The key's id (`verificationMethod`).
    pub verification_method: String,
    /// `created`, unix seconds, when given.
    pub created: Option<i64>,
    /// The proof options: the proof without `proofValue`.
    options: Map<String, Value>,
    /// The Ed25519 signature.
    signature: Vec<u8>,
}

/// Whether `doc` carries a proof: the only cost for an activity without one.
pub fn has_proof(doc: &Value) -> bool {
    doc.get("proof").is_some()
}

/// Reads the `eddsa-jcs-2022` proof of `doc` and checks what needs no key:
/// type, cryptosuite, purpose, `proofValue` (64 bytes), `@context`, and
/// `created` no further ahead of `now` (unix seconds) than `max_future_secs`
/// and `expires` not past. `proof` may be an array (a proof set): exactly
/// one of its (at most [`MAX_PROOFS`]) members must be `eddsa-jcs-2022`.
pub fn read_proof(doc: &Value, now: i64, max_future_secs: i64) -> Result<Proof, CoreError> {
    let o = doc
        .as_object()
        .ok_or_else(|| invalid("the document is not an object"))?;
    let proof = match o.get("proof") {
        Some(p @ Value::Object(_)) => p,
        Some(Value::Array(set)) => {
            if set.len() > MAX_PROOFS {
                return Err(invalid(format!("more than {MAX_PROOFS} proofs")));
            }
            let mut ours = set
                .iter()
                .filter(|p| p.get("cryptosuite").and_then(Value::as_str) == Some(CRYPTOSUITE));
            match (ours.next(), ours.next()) {
                (Some(p), None) => p,
                (None, _) => return Err(invalid(format!("no {CRYPTOSUITE} proof"))),
                (Some(_), Some(_)) => {
                    return Err(invalid(format!("more than one {CRYPTOSUITE} proof")))
                }
            }
        }
        Some(_) => return Err(invalid("`proof` is not an object")),
        None => return Err(invalid("no proof")),
    };
    let mut options = proof
        .as_object()
        .cloned()
        .ok_or_else(|| invalid("a proof that is not an object"))?;
    let field = |name: &str| options.get(name).and_then(Value::as_str);
    if field("type") != Some(PROOF_TYPE) {
        return Err(invalid(format!(
            "proof type {:?}, not {PROOF_TYPE}",
            field("type")
        )));
    }
    if field("cryptosuite") != Some(CRYPTOSUITE) {
        return Err(invalid(format!(
            "cryptosuite {:?}, not {CRYPTOSUITE}",
            field("cryptosuite")
        )));
    }
    if field("proofPurpose") != Some(PURPOSE) {
        return Err(invalid(format!(
            "proof purpose {:?}, not {PURPOSE}",
            field("proofPurpose")
        )));
    }
    let verification_method = field("verificationMethod")
        .ok_or_else(|| invalid("no verificationMethod"))?
        .to_string();
    if verification_method.len() > MAX_METHOD_BYTES {
        return Err(invalid(format!(
            "verificationMethod longer than {MAX_METHOD_BYTES} bytes"
        )));
    }
    let created = match options.get("created") {
        None => None,
        Some(Value::String(s)) => {
            let t = parse_datetime(s).ok_or_else(|| invalid("`created` is not a date-time"))?;
            if t > now.saturating_add(max_future_secs) {
                return Err(invalid(format!(
                    "created {s}, {}s ahead of our clock",
                    t.saturating_sub(now)
                )));
            }
            Some(t)
        }
        Some(_) => return Err(invalid("`created` is not a string")),
    };
    match options.get("expires") {
        None => {}
        Some(Value::String(s)) => {
            let t = parse_datetime(s).ok_or_else(|| invalid("`expires` is not a date-time"))?;
            if t <= now {
                return Err(invalid(format!("expired at {s}")));
            }
        }
        Some(_) => return Err(invalid("`expires` is not a string")),
    }
    let value = match options.remove("proofValue") {
        Some(Value::String(s)) => s,
        _ => return Err(invalid("no proofValue string")),
    };
    let signature = decode_base58btc(&value).map_err(|e| invalid(format!("proofValue: {e}")))?;
    if signature.len() != 64 {
        return Err(invalid(format!(
            "an Ed25519 signature of {} bytes, not 64",
            signature.len()
        )));
    }
    // A proof that names a @context must name the document's very own: a
    // prefix (as Data Integrity allows) would have the signed document
    // differ from the one received. One that names none is signed without:
    // the options are the proof as received (FEP-8b32's vector verifies
    // only so; the W3C vector's proof carries the document's @context).
    match (options.get("@context"), o.get("@context")) {
        (Some(p), Some(d)) if p != d => {
            return Err(invalid("the proof's @context is not the document's"))
        }
        (Some(_), None) => return Err(invalid("a proof @context on a document without one")),
        _ => {}
    }
    Ok(Proof {
        verification_method,
        created,
        options,
        signature,
    })
}

/// What the signature covers: SHA-256 of the canonical proof options, then
/// SHA-256 of the canonical document without `proof`.
pub fn hash_data(doc: &Value, proof: &Proof) -> Result<[u8; 64], CoreError> {
    let mut unsecured = doc
        .as_object()
        .cloned()
        .ok_or_else(|| invalid("the document is not an object"))?;
    unsecured.remove("proof");
    let options = canonicalize(&Value::Object(proof.options.clone()))?;
    let document = canonicalize(&Value::Object(unsecured))?;
    let mut out = [0u8; 64];
    out[..32].copy_from_slice(digest(&SHA256, options.as_bytes()).as_ref());
    out[32..].copy_from_slice(digest(&SHA256, document.as_bytes()).as_ref());
    Ok(out)
}

/// Verifies `proof` (read from `doc`) with `key`, which must be Ed25519.
pub fn verify_proof(doc: &Value, proof: &Proof, key: &VerifyingKey) -> Result<(), CoreError> {
    let data = hash_data(doc, proof)?;
    key.verify(Alg::Ed25519, &data, &proof.signature)
}

/// Signs `doc` as its author: adds an `eddsa-jcs-2022` proof by the key
/// `verification_method` (a PKCS#8 Ed25519 key), `created` at unix
/// seconds. What verification expects, for tests and fake remote servers.
pub fn sign(
    doc: &Value,
    verification_method: &str,
    created: i64,
    pkcs8: &[u8],
) -> Result<Value, CoreError> {
    use aws_lc_rs::signature::Ed25519KeyPair;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
        .or_else(|_| Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8))
        .map_err(|e| CoreError::Key(format!("not an Ed25519 PKCS#8 key: {e}")))?;
    let mut options = Map::new();
    options.insert("type".into(), PROOF_TYPE.into());
    options.insert("cryptosuite".into(), CRYPTOSUITE.into());
    options.insert("verificationMethod".into(), verification_method.into());
    options.insert("proofPurpose".into(), PURPOSE.into());
    options.insert("created".into(), format_datetime(created).into());
    let proof = Proof {
        verification_method: verification_method.into(),
        created: Some(created),
        options: options.clone(),
        signature: Vec::new(),
    };
    let mut unsecured = doc.clone();
    if let Some(o) = unsecured.as_object_mut() {
        o.remove("proof");
    }
    let sig = pair.sign(&hash_data(&unsecured, &proof)?);
    options.insert(
        "proofValue".into(),
        crate::multibase::encode_base58btc(sig.as_ref()).into(),
    );
    if let Some(o) = unsecured.as_object_mut() {
        o.insert("proof".into(), Value::Object(options));
    }
    Ok(unsecured)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Reads an XML Schema `dateTimeStamp` / RFC 3339 date-time
/// (`2023-02-24T23:36:38Z`, fractions of a second and `±hh:mm` offsets
/// allowed) as unix seconds; `None` when it is not one.
pub fn parse_datetime(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b.len() > 40 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        rest = &frac[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let rb = rest.as_bytes();
            if rb.len() != 6 || !matches!(rb[0], b'+' | b'-') || rb[3] != b':' {
                return None;
            }
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if rb[0] == b'-' {
                -o
            } else {
                o
            }
        }
    };
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset)
}

/// Unix seconds as `YYYY-MM-DDThh:mm:ssZ`.
pub fn format_datetime(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Hinnant's `civil_from_days`.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::multibase::{ed25519_multikey, ed25519_spki_pem};
    use serde_json::json;

    /// The Multikey of both published vectors (FEP-521a, vc-di-eddsa).
    const MULTIKEY: &str = "z6MkrJVnaZkeFzdQyMZu1cgjg7k1pZZ6pvBQ7XJPt4swbTQ2";
    /// 2023-02-24T23:36:38Z, the vectors' `created`.
    const CREATED: i64 = 1_677_281_798;

    fn key() -> VerifyingKey {
        VerifyingKey::from_pem(&ed25519_spki_pem(&ed25519_multikey(MULTIKEY).unwrap())).unwrap()
    }

    /// FEP-8b32's own vector (`fep-8b32.feature`, "Verifying a signature"):
    /// a `Create` whose proof has no `@context` of its own.
    fn fep_8b32_vector() -> Value {
        json!({
            "@context": [
                "https://www.w3.org/ns/activitystreams",
                "https://w3id.org/security/data-integrity/v1"
            ],
            "type": "Create",
            "actor": "https://server.example/users/alice",
            "object": {
                "type": "Note",
                "content": "Hello world"
            },
            "proof": {
                "type": "DataIntegrityProof",
                "cryptosuite": "eddsa-jcs-2022",
                "verificationMethod": "https://server.example/users/alice#ed25519-key",
                "proofPurpose": "assertionMethod",
                "proofValue": "z3sXaxjKs4M3BRicwWA9peyNPJvJqxtGsDmpt1jjoHCjgeUf71TRFz56osPSfDErszyLp5Ks1EhYSgpDaNM977Rg2",
                "created": "2023-02-24T23:36:38Z"
            }
        })
    }

    /// The W3C vc-di-eddsa recommendation's eddsa-jcs-2022 example (its
    /// proof carries the document's `@context`).
    fn w3c_vector() -> Value {
        json!({
            "@context": [
                "https://www.w3.org/ns/credentials/v2",
                "https://www.w3.org/ns/credentials/examples/v2"
            ],
            "id": "urn:uuid:58172aac-d8ba-11ed-83dd-0b3aef56cc33",
            "type": ["VerifiableCredential", "AlumniCredential"],
            "name": "Alumni Credential",
            "description": "A minimum viable example of an Alumni Credential.",
            "issuer": "https://vc.example/issuers/5678",
            "validFrom": "2023-01-01T00:00:00Z",
            "credentialSubject": {
                "id": "did:example:abcdefgh",
                "alumniOf": "The School of Examples"
            },
            "proof": {
                "type": "DataIntegrityProof",
                "cryptosuite": "eddsa-jcs-2022",
                "created": "2023-02-24T23:36:38Z",
                "verificationMethod": "did:key:z6MkrJVnaZkeFzdQyMZu1cgjg7k1pZZ6pvBQ7XJPt4swbTQ2#z6MkrJVnaZkeFzdQyMZu1cgjg7k1pZZ6pvBQ7XJPt4swbTQ2",
                "proofPurpose": "assertionMethod",
                "@context": [
                    "https://www.w3.org/ns/credentials/v2",
                    "https://www.w3.org/ns/credentials/examples/v2"
                ],
                "proofValue": "z2HnFSSPPBzR36zdDgK8PbEHeXbR56YF24jwMpt3R1eHXQzJDMWS93FCzpvJpwTWd3GAVFuUfjoJdcnTMuVor51aX"
            }
        })
    }

    fn verify(doc: &Value) -> Result<(), CoreError> {
        let p = read_proof(doc, CREATED + 60, 300)?;
        verify_proof(doc, &p, &key())
    }

    #[test]
    fn the_published_vectors_verify() {
        let doc = fep_8b32_vector();
        let p = read_proof(&doc, CREATED, 0).unwrap();
        assert_eq!(
            p.verification_method,
            "https://server.example/users/alice#ed25519-key"
        );
        assert_eq!(p.created, Some(CREATED));
        verify(&doc).unwrap();
        verify(&w3c_vector()).unwrap();
    }

    #[test]
    fn a_tampered_document_or_proof_fails() {
        let mut doc = fep_8b32_vector();
        doc["object"]["content"] = json!("Hello world!");
        assert_eq!(verify(&doc), Err(CoreError::BadSignature));
        // The options are signed too: another key id, another time.
        let mut doc = fep_8b32_vector();
        doc["proof"]["verificationMethod"] = json!("https://server.example/users/alice#other");
        assert_eq!(verify(&doc), Err(CoreError::BadSignature));
        let mut doc = fep_8b32_vector();
        doc["proof"]["created"] = json!("2023-02-24T23:36:39Z");
        assert_eq!(verify(&doc), Err(CoreError::BadSignature));
        // A member added anywhere, even one a reader may ignore.
        let mut doc = fep_8b32_vector();
        doc["to"] = json!(["https://www.w3.org/ns/activitystreams#Public"]);
        assert_eq!(verify(&doc), Err(CoreError::BadSignature));
        // Another key.
        let doc = fep_8b32_vector();
        let p = read_proof(&doc, CREATED, 0).unwrap();
        let pair = aws_lc_rs::signature::Ed25519KeyPair::generate().unwrap();
        use aws_lc_rs::signature::KeyPair as _;
        let raw: [u8; 32] = pair.public_key().as_ref().try_into().unwrap();
        let wrong = VerifyingKey::from_pem(&ed25519_spki_pem(&raw)).unwrap();
        assert_eq!(verify_proof(&doc, &p, &wrong), Err(CoreError::BadSignature));
        // The signature's bytes flipped.
        let mut doc = fep_8b32_vector();
        doc["proof"]["proofValue"] = json!(
            "z3sXaxjKs4M3BRicwWA9peyNPJvJqxtGsDmpt1jjoHCjgeUf71TRFz56osPSfDErszyLp5Ks1EhYSgpDaNM977Rg3"
        );
        assert!(verify(&doc).is_err());
    }

    #[test]
    fn proofs_of_another_kind_are_refused() {
        let refused = |edit: &dyn Fn(&mut Value)| {
            let mut doc = fep_8b32_vector();
            edit(&mut doc);
            match read_proof(&doc, CREATED, 300) {
                Err(CoreError::InvalidProof(r)) => r,
                other => panic!("{other:?}"),
            }
        };
        assert!(
            refused(&|d| d["proof"]["cryptosuite"] = json!("eddsa-rdfc-2022"))
                .contains("cryptosuite")
        );
        assert!(refused(&|d| d["proof"]["type"] = json!("Ed25519Signature2020")).contains("type"));
        assert!(
            refused(&|d| d["proof"]["proofPurpose"] = json!("authentication")).contains("purpose")
        );
        assert!(
            refused(&|d| d["proof"]["proofValue"] = json!("u3sXaxjKs4M3")).contains("proofValue")
        );
        assert!(refused(&|d| d["proof"]["proofValue"] = json!("z3sXaxjKs4M3")).contains("64"));
        assert!(
            refused(&|d| d["proof"]["proofValue"] = json!(format!("z{}", "2".repeat(500))))
                .contains("longer")
        );
        assert!(refused(&|d| {
            d["proof"]
                .as_object_mut()
                .unwrap()
                .remove("verificationMethod");
        })
        .contains("verificationMethod"));
        assert!(refused(&|d| d["proof"]["verificationMethod"] =
            json!(format!("https://x/{}", "a".repeat(3000))))
        .contains("longer"));
        assert!(refused(
            &|d| d["proof"]["@context"] = json!("https://www.w3.org/ns/activitystreams")
        )
        .contains("@context"));
        assert!(refused(&|d| d["proof"] = json!("z3sX")).contains("not an object"));
        assert!(
            refused(&|d| d["proof"]["expires"] = json!("2023-02-24T23:36:38Z")).contains("expired")
        );
        // Ahead of the clock by more than the skew allowed.
        let doc = fep_8b32_vector();
        assert!(read_proof(&doc, CREATED - 300, 300).is_ok());
        assert!(read_proof(&doc, CREATED - 301, 300).is_err());
        assert!(refused(&|d| d["proof"]["created"] = json!("yesterday")).contains("created"));
    }

    #[test]
    fn a_proof_set_holds_one_of_ours() {
        let mut doc = fep_8b32_vector();
        let ours = doc["proof"].clone();
        let other = json!({"type": "DataIntegrityProof", "cryptosuite": "ecdsa-jcs-2019", "proofValue": "z1"});
        doc["proof"] = json!([other, ours]);
        verify(&doc).unwrap();
        doc["proof"] = json!([ours, ours]);
        assert!(verify(&doc).is_err());
        doc["proof"] = json!([other]);
        assert!(verify(&doc).is_err());
        doc["proof"] = json!([other, other, other, other, ours]);
        assert!(verify(&doc).is_err());
    }

    #[test]
    fn sign_then_verify() {
        let pair = aws_lc_rs::signature::Ed25519KeyPair::generate().unwrap();
        use aws_lc_rs::signature::KeyPair as _;
        let pkcs8 = pair.to_pkcs8().unwrap();
        let mut doc = fep_8b32_vector();
        doc.as_object_mut().unwrap().remove("proof");
        let signed = sign(&doc, "https://s.example/u#k", CREATED, pkcs8.as_ref()).unwrap();
        assert_eq!(signed["proof"]["created"], "2023-02-24T23:36:38Z");
        let raw: [u8; 32] = pair.public_key().as_ref().try_into().unwrap();
        let key = VerifyingKey::from_pem(&ed25519_spki_pem(&raw)).unwrap();
        let p = read_proof(&signed, CREATED, 0).unwrap();
        verify_proof(&signed, &p, &key).unwrap();
    }

    #[test]
    fn date_times() {
        assert_eq!(parse_datetime("2023-02-24T23:36:38Z"), Some(CREATED));
        assert_eq!(parse_datetime("2023-02-24T23:36:38.123Z"), Some(CREATED));
        assert_eq!(parse_datetime("2023-02-25T01:36:38+02:00"), Some(CREATED));
        assert_eq!(parse_datetime("2023-02-24T22:36:38-01:00"), Some(CREATED));
        assert_eq!(parse_datetime("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(format_datetime(CREATED), "2023-02-24T23:36:38Z");
        assert_eq!(format_datetime(0), "1970-01-01T00:00:00Z");
        for bad in [
            "2023-02-24 23:36:38Z",
            "2023-02-24T23:36:38",
            "2023-13-24T23:36:38Z",
            "2023-02-24T23:36:38.Z",
            "2023-02-24T23:36:38+2:00",
            "+023-02-24T23:36:38Z",
            "2023-02-24T23:36:38Z and more text to be long",
        ] {
            assert_eq!(parse_datetime(bad), None, "{bad}");
        }
    }
}
