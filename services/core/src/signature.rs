//! HTTP Signatures as the fediverse uses them: draft-cavage-http-signatures-12
//! (<https://datatracker.ietf.org/doc/html/draft-cavage-http-signatures-12>)
//! with `rsa-sha256` (and `hs2019`, which Mastodon sends with RSA keys).
//!
//! Signing and verifying are pure functions over the request's method, path
//! and headers; the caller supplies a header lookup and the key.
use std::borrow::Cow;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeyPair;
use aws_lc_rs::signature::{ParsedPublicKey, RSA_PKCS1_SHA256};
use base64::{engine::general_purpose::STANDARD, Engine as _};

use crate::CoreError;

/// Headers stampede signs on a POST: what Mastodon requires.
pub const POST_HEADERS: &[&str] = &["(request-target)", "host", "date", "digest"];
/// Headers stampede signs on a GET (key and actor fetches in authorized-fetch mode).
pub const GET_HEADERS: &[&str] = &["(request-target)", "host", "date"];

/// Builds the cavage signing string: one `name: value` line per covered
/// header, in the order given, `(request-target)` as `method path`.
pub fn signing_string<'a>(
    method: &str,
    path_and_query: &str,
    headers: &[&str],
    lookup: impl Fn(&str) -> Option<&'a str>,
    created: Option<i64>,
    expires: Option<i64>,
) -> Result<String, CoreError> {
    let mut s = String::with_capacity(256);
    for (i, name) in headers.iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        let name = name.trim();
        s.push_str(name);
        s.push_str(": ");
        match name {
            "(request-target)" => {
                for c in method.chars() {
                    s.push(c.to_ascii_lowercase());
                }
                s.push(' ');
                s.push_str(path_and_query);
            }
            "(created)" => {
                let c = created.ok_or_else(|| CoreError::MissingHeader("(created)".into()))?;
                s.push_str(&c.to_string());
            }
            "(expires)" => {
                let e = expires.ok_or_else(|| CoreError::MissingHeader("(expires)".into()))?;
                s.push_str(&e.to_string());
            }
            _ => {
                let v = lookup(name).ok_or_else(|| CoreError::MissingHeader(name.to_string()))?;
                s.push_str(v.trim());
            }
        }
    }
    Ok(s)
}

/// Signs `signing_string` with RSASSA-PKCS1-v1_5 SHA-256. This is the CPU-heavy
/// step (about 0.3 ms for RSA-2048): callers on an async runtime run it on a
/// blocking pool.
pub fn rsa_sha256_sign(key: &KeyPair, signing_string: &[u8]) -> Result<Vec<u8>, CoreError> {
    let mut sig = vec![0u8; key.public_modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        signing_string,
        &mut sig,
    )
    .map_err(|e| CoreError::Key(format!("signing failed: {e}")))?;
    Ok(sig)
}

/// Formats the `Signature` header value.
pub fn signature_header(key_id: &str, headers: &[&str], signature: &[u8]) -> String {
    let mut out = String::with_capacity(key_id.len() + 420);
    out.push_str("keyId=\"");
    out.push_str(key_id);
    out.push_str("\",algorithm=\"rsa-sha256\",headers=\"");
    out.push_str(&headers.join(" "));
    out.push_str("\",signature=\"");
    STANDARD.encode_string(signature, &mut out);
    out.push('"');
    out
}

/// Signs a request: builds the signing string over `headers` and returns the
/// `Signature` header value.
pub fn sign_request<'a>(
    key: &KeyPair,
    key_id: &str,
    method: &str,
    path_and_query: &str,
    headers: &[&str],
    lookup: impl Fn(&str) -> Option<&'a str>,
) -> Result<String, CoreError> {
    let s = signing_string(method, path_and_query, headers, lookup, None, None)?;
    let sig = rsa_sha256_sign(key, s.as_bytes())?;
    Ok(signature_header(key_id, headers, &sig))
}

/// The parameters of a parsed cavage `Signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureParams {
    /// `keyId`: for the fediverse, the URL of the key (`{actor}#main-key`).
    pub key_id: String,
    /// `algorithm`, lower-cased; `hs2019` when absent (the draft's default).
    pub algorithm: String,
    /// Covered headers, lower-cased; `["date"]` when absent (the draft's default).
    pub headers: Vec<String>,
    /// The decoded signature bytes.
    pub signature: Vec<u8>,
    /// `created`, unix seconds, when present.
    pub created: Option<i64>,
    /// `expires`, unix seconds, when present.
    pub expires: Option<i64>,
}

/// Parses a cavage `Signature` (or `Authorization: Signature …`) header value.
pub fn parse_signature_header(value: &str) -> Result<SignatureParams, CoreError> {
    let value = value.trim();
    let value = value
        .strip_prefix("Signature ")
        .or_else(|| value.strip_prefix("signature "))
        .unwrap_or(value);
    let mut key_id = None;
    let mut algorithm = None;
    let mut headers = None;
    let mut signature = None;
    let mut created = None;
    let mut expires = None;
    for (k, v) in params(value)? {
        let is = |name: &str| k.eq_ignore_ascii_case(name);
        if is("keyid") {
            key_id = Some(v.into_owned());
        } else if is("algorithm") {
            algorithm = Some(v.to_ascii_lowercase());
        } else if is("headers") {
            headers = Some(
                v.split_ascii_whitespace()
                    .map(|h| h.to_ascii_lowercase())
                    .collect::<Vec<_>>(),
            );
        } else if is("signature") {
            signature = Some(STANDARD.decode(v.as_bytes()).map_err(|e| {
                CoreError::MalformedSignature(format!("signature is not base64: {e}"))
            })?);
        } else if is("created") {
            created = Some(parse_int("created", &v)?);
        } else if is("expires") {
            expires = Some(parse_int("expires", &v)?);
        }
    }
    let key_id = key_id.ok_or_else(|| CoreError::MalformedSignature("no keyId".into()))?;
    let signature =
        signature.ok_or_else(|| CoreError::MalformedSignature("no signature".into()))?;
    let headers = headers.unwrap_or_else(|| vec!["date".to_string()]);
    if headers.is_empty() {
        return Err(CoreError::MalformedSignature("empty headers".into()));
    }
    Ok(SignatureParams {
        key_id,
        algorithm: algorithm.unwrap_or_else(|| "hs2019".into()),
        headers,
        signature,
        created,
        expires,
    })
}

fn parse_int(name: &str, v: &str) -> Result<i64, CoreError> {
    v.parse()
        .map_err(|_| CoreError::MalformedSignature(format!("{name} is not an integer")))
}

/// Splits `k="v",k2=v2` into pairs; quoted values may hold commas and `\"`.
/// Names and values borrow from the input unless a value has escapes.
fn params(input: &str) -> Result<Vec<(&str, Cow<'_, str>)>, CoreError> {
    let b = input.as_bytes();
    let mut out = Vec::with_capacity(6);
    let mut i = 0;
    loop {
        while i < b.len() && (b[i] == b',' || b[i].is_ascii_whitespace()) {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && b[i] != b'=' {
            i += 1;
        }
        let key = input[start..i].trim();
        i = (i + 1).min(b.len());
        let val = if b.get(i) == Some(&b'"') {
            i += 1;
            // The delimiters are ASCII, so scanning bytes never splits a
            // character; an escape keeps the character after the backslash.
            let mut owned: Option<String> = None;
            let mut seg = i;
            let mut closed = false;
            while i < b.len() {
                match b[i] {
                    b'\\' => {
                        owned
                            .get_or_insert_with(String::new)
                            .push_str(&input[seg..i]);
                        i += 1;
                        seg = i;
                        i += input[i..].chars().next().map_or(0, char::len_utf8);
                    }
                    b'"' => {
                        closed = true;
                        break;
                    }
                    _ => i += 1,
                }
            }
            if !closed {
                return Err(CoreError::MalformedSignature("unterminated quote".into()));
            }
            let rest = &input[seg..i];
            i += 1;
            match owned {
                Some(mut o) => {
                    o.push_str(rest);
                    Cow::Owned(o.trim().to_string())
                }
                None => Cow::Borrowed(rest.trim()),
            }
        } else {
            let vstart = i;
            while i < b.len() && b[i] != b',' {
                i += 1;
            }
            Cow::Borrowed(input[vstart..i].trim())
        };
        if key.is_empty() {
            return Err(CoreError::MalformedSignature("empty parameter name".into()));
        }
        out.push((key, val));
    }
    Ok(out)
}

/// Verifies a parsed cavage signature over the request with an RSA public key.
/// `required` lists headers the signature must cover (for example `digest`
/// when the request has a body).
pub fn verify_request<'a>(
    params: &SignatureParams,
    method: &str,
    path_and_query: &str,
    lookup: impl Fn(&str) -> Option<&'a str>,
    required: &[&str],
    key: &ParsedPublicKey,
) -> Result<(), CoreError> {
    match params.algorithm.as_str() {
        "rsa-sha256" | "hs2019" => {}
        other => {
            return Err(CoreError::MalformedSignature(format!(
                "unsupported algorithm {other}"
            )))
        }
    }
    for r in required {
        if !params.headers.iter().any(|h| h == r) {
            return Err(CoreError::MalformedSignature(format!(
                "signature does not cover `{r}`"
            )));
        }
    }
    let names: Vec<&str> = params.headers.iter().map(String::as_str).collect();
    let s = signing_string(
        method,
        path_and_query,
        &names,
        lookup,
        params.created,
        params.expires,
    )?;
    key.verify_sig(s.as_bytes(), &params.signature)
        .map_err(|_| CoreError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{generate_rsa_2048, load_private_key, parse_public_key_pem};

    fn headers<'a>(h: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> + 'a {
        move |n| h.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
    }

    #[test]
    fn signing_string_matches_the_draft_layout() {
        // draft-cavage-http-signatures-12, appendix C.2 request.
        let h = [
            ("host", "example.com"),
            ("date", "Sun, 05 Jan 2014 21:31:40 GMT"),
            ("content-type", "application/json"),
            (
                "digest",
                "SHA-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=",
            ),
            ("content-length", "18"),
        ];
        let s = signing_string(
            "POST",
            "/foo?param=value&pet=dog",
            &["(request-target)", "host", "date"],
            headers(&h),
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            s,
            "(request-target): post /foo?param=value&pet=dog\nhost: example.com\ndate: Sun, 05 Jan 2014 21:31:40 GMT"
        );
    }

    #[test]
    fn parses_mastodon_style_header() {
        let p = parse_signature_header(
            r#"keyId="https://a.example/users/x#main-key",algorithm="rsa-sha256",headers="(request-target) host date digest",signature="AAEC""#,
        )
        .unwrap();
        assert_eq!(p.key_id, "https://a.example/users/x#main-key");
        assert_eq!(p.headers, ["(request-target)", "host", "date", "digest"]);
        assert_eq!(p.signature, [0, 1, 2]);
        assert!(parse_signature_header("keyId=\"x\"").is_err());
        assert!(parse_signature_header("keyId=\"x,signature=\"AA==\"").is_err());
    }

    #[test]
    fn parameter_names_ignore_case_and_values_may_be_escaped_or_bare() {
        let p = parse_signature_header(
            r#"Signature KEYID="https://a.example/k\"ey#é\\" , Algorithm=RSA-SHA256,created=1700000000, headers="(created)  Host",signature="AAEC""#,
        )
        .unwrap();
        assert_eq!(p.key_id, r#"https://a.example/k"ey#é\"#);
        assert_eq!(p.algorithm, "rsa-sha256");
        assert_eq!(p.created, Some(1_700_000_000));
        assert_eq!(p.headers, ["(created)", "host"]);
        assert_eq!(p.signature, [0, 1, 2]);
        // An escaped non-ASCII character stays whole.
        let p = parse_signature_header(r#"keyId="a\éb",signature="AAEC""#).unwrap();
        assert_eq!(p.key_id, "aéb");
        assert!(parse_signature_header(r#"keyId="a\"#).is_err());
        assert!(parse_signature_header(r#"=x,keyId="a",signature="AAEC""#).is_err());
        assert!(parse_signature_header(r#"keyId="a",signature="AAEC",created=soon"#).is_err());
    }

    #[test]
    fn sign_then_verify_and_tamper() {
        let k = generate_rsa_2048().unwrap();
        let pair = load_private_key(&k.private_pkcs8_der).unwrap();
        let public = parse_public_key_pem(&k.public_pem).unwrap();
        let h = [
            ("host", "b.example"),
            ("date", "Fri, 27 Nov 2026 12:00:00 GMT"),
            ("digest", "SHA-256=abc"),
        ];
        let sig = sign_request(&pair, "k", "POST", "/inbox", POST_HEADERS, headers(&h)).unwrap();
        let p = parse_signature_header(&sig).unwrap();
        verify_request(&p, "POST", "/inbox", headers(&h), &["digest"], &public).unwrap();
        assert_eq!(
            verify_request(&p, "POST", "/users/x/inbox", headers(&h), &[], &public),
            Err(CoreError::BadSignature)
        );
        let tampered = [h[0], h[1], ("digest", "SHA-256=abd")];
        assert_eq!(
            verify_request(&p, "POST", "/inbox", headers(&tampered), &[], &public),
            Err(CoreError::BadSignature)
        );
        let get = sign_request(&pair, "k", "GET", "/x", GET_HEADERS, headers(&h)).unwrap();
        let p = parse_signature_header(&get).unwrap();
        assert!(matches!(
            verify_request(&p, "GET", "/x", headers(&h), &["digest"], &public),
            Err(CoreError::MalformedSignature(_))
        ));
    }
}
