//! RSA-2048 keys of local actors: generation, PKCS#8 storage, and the
//! SubjectPublicKeyInfo PEM published in actor documents.
use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_2048_8192_SHA256};
use base64::{engine::general_purpose::STANDARD, Engine as _};

use crate::CoreError;

pub use aws_lc_rs::rsa::KeyPair;
pub use aws_lc_rs::signature::ParsedPublicKey;

/// A freshly generated key: the private half as PKCS#8 DER (to store), the
/// public half as PEM (to publish).
pub struct GeneratedKey {
    /// PKCS#8 v1 DER of the private key. Never log it.
    pub private_pkcs8_der: Vec<u8>,
    /// `-----BEGIN PUBLIC KEY-----` PEM of the SubjectPublicKeyInfo.
    pub public_pem: String,
}

impl std::fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("private_pkcs8_der", &"<redacted>")
            .field("public_pem", &self.public_pem)
            .finish()
    }
}

/// Generates an RSA-2048 key pair (what Mastodon and most of the fediverse
/// expect for `rsa-sha256`).
pub fn generate_rsa_2048() -> Result<GeneratedKey, CoreError> {
    let pair = KeyPair::generate(KeySize::Rsa2048).map_err(|e| CoreError::Key(e.to_string()))?;
    let pkcs8: Pkcs8V1Der<'static> = pair.as_der().map_err(|e| CoreError::Key(e.to_string()))?;
    let spki: PublicKeyX509Der<'static> = pair
        .public_key()
        .as_der()
        .map_err(|e| CoreError::Key(e.to_string()))?;
    Ok(GeneratedKey {
        private_pkcs8_der: pkcs8.as_ref().to_vec(),
        public_pem: pem_encode("PUBLIC KEY", spki.as_ref()),
    })
}

/// Loads a private key stored as PKCS#8 DER.
pub fn load_private_key(pkcs8_der: &[u8]) -> Result<KeyPair, CoreError> {
    KeyPair::from_pkcs8(pkcs8_der).map_err(|e| CoreError::Key(e.to_string()))
}

/// Parses a remote actor's `publicKeyPem` (SubjectPublicKeyInfo or PKCS#1
/// `RSA PUBLIC KEY`) into a key ready for `rsa-sha256` verification.
pub fn parse_public_key_pem(pem: &str) -> Result<ParsedPublicKey, CoreError> {
    let der = pem_decode(pem)?;
    ParsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, der)
        .map_err(|e| CoreError::Key(format!("unusable public key: {e}")))
}

/// PEM-encodes `der` under `label`, 64 columns as RFC 7468 asks.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Decodes the first PEM block in `pem`, whatever its label.
pub fn pem_decode(pem: &str) -> Result<Vec<u8>, CoreError> {
    let start = pem
        .find("-----BEGIN ")
        .ok_or_else(|| CoreError::Key("no PEM header".into()))?;
    let rest = &pem[start..];
    let body_start = rest
        .find('\n')
        .ok_or_else(|| CoreError::Key("truncated PEM".into()))?;
    let body = &rest[body_start..];
    let end = body
        .find("-----END ")
        .ok_or_else(|| CoreError::Key("no PEM footer".into()))?;
    let b64: String = body[..end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    STANDARD
        .decode(b64)
        .map_err(|e| CoreError::Key(format!("bad PEM base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_round_trips() {
        let k = generate_rsa_2048().unwrap();
        assert!(k.public_pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        let pair = load_private_key(&k.private_pkcs8_der).unwrap();
        assert_eq!(pair.public_modulus_len(), 256);
        parse_public_key_pem(&k.public_pem).unwrap();
        assert!(!format!("{k:?}").contains(&STANDARD.encode(&k.private_pkcs8_der)));
    }

    #[test]
    fn bad_pem_is_refused() {
        assert!(parse_public_key_pem("nope").is_err());
        assert!(
            parse_public_key_pem("-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----")
                .is_err()
        );
    }
}
