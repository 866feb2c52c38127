//! Body digests: the `Digest` header of RFC 3230 (`SHA-256=<base64>`), which
//! Mastodon-compatible servers require on signed POSTs.
use aws_lc_rs::digest::{digest, SHA256};
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

/// Checks a `Digest` header (RFC 3230, possibly listing several algorithms)
/// against `body`. Only SHA-256 is accepted: SHA-1 and MD5 are too weak to
/// bind a body to a signature.
pub fn verify_digest_header(header: &str, body: &[u8]) -> Result<(), CoreError> {
    let mut saw_sha256 = false;
    for part in header.split(',') {
        let part = part.trim();
        let Some((alg, value)) = part.split_once('=') else {
            continue;
        };
        if alg.eq_ignore_ascii_case("sha-256") {
            saw_sha256 = true;
            let want = STANDARD
                .decode(value.trim())
                .map_err(|_| CoreError::DigestMismatch)?;
            if want.as_slice() == digest(&SHA256, body).as_ref() {
                return Ok(());
            }
        }
    }
    if saw_sha256 {
        Err(CoreError::DigestMismatch)
    } else {
        Err(CoreError::MissingHeader("digest (SHA-256)".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
