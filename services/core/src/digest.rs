//! Body digests: the `Digest` header of RFC 3230 (`SHA-256=<base64>`), which
//! Mastodon-compatible servers require on signed POSTs.
use aws_lc_rs::digest::{digest, SHA256, SHA512};
use base64::{engine::general_purpose::STANDARD, Engine as _};

use crate::CoreError;

/// The `Digest` header value for `body`: `SHA-256=<base64 of sha256(body)>`.
pub fn digest_header(body: &[u8]) -> String {
    let d = digest(&SHA256, body);
    let mut out = String::with_capacity(52);
    out.push_str("SHA-256=");
    STANDARD.encode_string(d.as_ref(), &mut out);
    out
}

/// A short fixed-size name for a tuple of strings (SHA-256 of the parts,
/// each length-prefixed, first 16 bytes, base64 without padding): keys of
/// marks whose parts come from remote input, so neither their size nor
/// their text is the sender's to choose.
pub fn tuple_hash(parts: &[&str]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p.as_bytes());
    }
    let d = ctx.finish();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&d.as_ref()[..16])
}

/// Checks a `Digest` header (RFC 3230, possibly listing several algorithms)
/// against `body`. Only SHA-256 and SHA-512 count: SHA-1 and MD5 are too weak
/// to bind a body to a signature.
pub fn verify_digest_header(header: &str, body: &[u8]) -> Result<(), CoreError> {
    let mut saw_sha256 = false;
    for part in header.split(',') {
        let part = part.trim();
        let Some((alg, value)) = part.split_once('=') else {
            continue;
        };
        let alg = if alg.eq_ignore_ascii_case("sha-256") {
            &SHA256
        } else if alg.eq_ignore_ascii_case("sha-512") {
            &SHA512
        } else {
            continue;
        };
        saw_sha256 = true;
        let want = STANDARD
            .decode(value.trim())
            .map_err(|_| CoreError::DigestMismatch)?;
        if want.as_slice() == digest(alg, body).as_ref() {
            return Ok(());
        }
    }
    if saw_sha256 {
        Err(CoreError::DigestMismatch)
    } else {
        Err(CoreError::MissingHeader(
            "digest (SHA-256 or SHA-512)".into(),
        ))
    }
}

/// Checks a `Content-Digest` header (RFC 9530: a structured dictionary such
/// as `sha-256=:…:`) against `body`. Every SHA-256 or SHA-512 member must
/// match, and at least one must be present.
pub fn verify_content_digest(header: &str, body: &[u8]) -> Result<(), CoreError> {
    let dict = crate::sfv::parse_dictionary(header).map_err(|_| CoreError::DigestMismatch)?;
    let mut checked = false;
    for (alg, member) in dict {
        let want = match member {
            crate::sfv::Member::Item(crate::sfv::Item {
                bare: crate::sfv::Bare::Bytes(b),
                ..
            }) => b,
            _ => continue,
        };
        let got = match alg.as_str() {
            "sha-256" => digest(&SHA256, body),
            "sha-512" => digest(&SHA512, body),
            _ => continue,
        };
        if want.as_slice() != got.as_ref() {
            return Err(CoreError::DigestMismatch);
        }
        checked = true;
    }
    if checked {
        Ok(())
    } else {
        Err(CoreError::MissingHeader(
            "content-digest (sha-256 or sha-512)".into(),
        ))
    }
}

/// The `Content-Digest` header value for `body` with SHA-256.
pub fn content_digest_header(body: &[u8]) -> String {
    let mut out = String::from("sha-256=:");
    STANDARD.encode_string(digest(&SHA256, body), &mut out);
    out.push(':');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuple_hashes_are_short_and_unambiguous() {
        let a = tuple_hash(&["ab", "c"]);
        assert_eq!(a.len(), 22);
        assert_ne!(a, tuple_hash(&["a", "bc"]));
        assert_eq!(a, tuple_hash(&["ab", "c"]));
        assert_eq!(tuple_hash(&["x".repeat(1 << 20).as_str()]).len(), 22);
    }

    #[test]
    fn digest_of_known_body() {
        // sha256("hello") from any reference implementation.
        assert_eq!(
            digest_header(b"hello"),
            "SHA-256=LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ="
        );
    }

    #[test]
    fn verify_accepts_match_and_refuses_mismatch() {
        let h = digest_header(b"{}");
        assert!(verify_digest_header(&h, b"{}").is_ok());
        assert_eq!(
            verify_digest_header(&h, b"{ }"),
            Err(CoreError::DigestMismatch)
        );
        assert!(matches!(
            verify_digest_header("SHA=abc", b"{}"),
            Err(CoreError::MissingHeader(_))
        ));
        let multi = format!("SHA=xyz, {h}");
        assert!(verify_digest_header(&multi, b"{}").is_ok());
    }

    #[test]
    fn content_digest_of_the_rfc_9421_example_body() {
        // RFC 9421 appendix B.2: the test request's body and its sha-512 digest.
        let body = br#"{"hello": "world"}"#;
        let h = "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:";
        assert!(verify_content_digest(h, body).is_ok());
        assert_eq!(
            verify_content_digest(h, b"{}"),
            Err(CoreError::DigestMismatch)
        );
        assert!(verify_content_digest(&content_digest_header(body), body).is_ok());
        assert!(matches!(
            verify_content_digest("md5=:AAAA:", body),
            Err(CoreError::MissingHeader(_))
        ));
    }
}
