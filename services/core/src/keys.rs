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

/// A fresh Ed25519 key pair: the private half as PKCS#8 DER and the 32
/// bytes of the public half (an Object Integrity Proof key, FEP-521a).
pub fn generate_ed25519() -> Result<(Vec<u8>, [u8; 32]), CoreError> {
    use aws_lc_rs::signature::Ed25519KeyPair;
    let pair = Ed25519KeyPair::generate().map_err(|e| CoreError::Key(e.to_string()))?;
    let pkcs8 = pair.to_pkcs8().map_err(|e| CoreError::Key(e.to_string()))?;
    let public: [u8; 32] = pair
        .public_key()
        .as_ref()
        .try_into()
        .map_err(|_| CoreError::Key("an Ed25519 public key not of 32 bytes".into()))?;
    Ok((pkcs8.as_ref().to_vec(), public))
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

/// Signature algorithms stampede verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256: cavage `rsa-sha256` (and `hs2019`
    /// with an RSA key, as Mastodon sends it), RFC 9421 `rsa-v1_5-sha256`.
    RsaV15Sha256,
    /// RSASSA-PSS with SHA-512: RFC 9421 `rsa-pss-sha512`.
    RsaPssSha512,
    /// Ed25519: RFC 9421 `ed25519`.
    Ed25519,
}

impl Alg {
    /// The RFC 9421 `alg` name.
    pub fn name(self) -> &'static str {
        match self {
            Alg::RsaV15Sha256 => "rsa-v1_5-sha256",
            Alg::RsaPssSha512 => "rsa-pss-sha512",
            Alg::Ed25519 => "ed25519",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    Ed25519,
}

/// A remote public key, parsed once, ready for the algorithms its type allows.
pub struct VerifyingKey {
    kind: KeyKind,
    der: Vec<u8>,
    rsa_sha256: Option<ParsedPublicKey>,
    min_rsa_bits: usize,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kind", &self.kind)
            .finish()
    }
}

/// DER of the rsaEncryption OID (1.2.840.113549.1.1.1).
const OID_RSA: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
/// DER of the Ed25519 OID (1.3.101.112).
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

impl VerifyingKey {
    /// Parses a PEM public key (SubjectPublicKeyInfo for RSA or Ed25519, or
    /// PKCS#1 `RSA PUBLIC KEY`). RSA keys must have at least 2048 bits.
    pub fn from_pem(pem: &str) -> Result<Self, CoreError> {
        Self::parse(pem, 2048)
    }

    /// As [`Self::from_pem`] but accepting 1024-bit RSA keys, which only old
    /// test vectors (draft-cavage appendix C) still use.
    pub fn from_pem_allowing_1024_bit_rsa(pem: &str) -> Result<Self, CoreError> {
        Self::parse(pem, 1024)
    }

    fn parse(pem: &str, min_rsa_bits: usize) -> Result<Self, CoreError> {
        let der = pem_decode(pem)?;
        let head = &der[..der.len().min(24)];
        let kind = if contains(head, OID_ED25519) {
            KeyKind::Ed25519
        } else if contains(head, OID_RSA) || pem.contains("BEGIN RSA PUBLIC KEY") {
            KeyKind::Rsa
        } else {
            return Err(CoreError::Key("unsupported public key type".into()));
        };
        let mut key = Self {
            kind,
            der,
            rsa_sha256: None,
            min_rsa_bits,
        };
        if kind == KeyKind::Rsa {
            let alg = if min_rsa_bits < 2048 {
                &aws_lc_rs::signature::RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY
            } else {
                &RSA_PKCS1_2048_8192_SHA256
            };
            key.rsa_sha256 = Some(
                ParsedPublicKey::new(alg, key.der.clone())
                    .map_err(|e| CoreError::Key(format!("unusable RSA key: {e}")))?,
            );
        } else {
            ParsedPublicKey::new(&aws_lc_rs::signature::ED25519, key.der.clone())
                .map_err(|e| CoreError::Key(format!("unusable Ed25519 key: {e}")))?;
        }
        Ok(key)
    }

    /// Whether this is an RSA key.
    pub fn is_rsa(&self) -> bool {
        self.kind == KeyKind::Rsa
    }

    /// The algorithm to use when a signature does not name one.
    pub fn default_alg(&self) -> Alg {
        match self.kind {
            KeyKind::Rsa => Alg::RsaV15Sha256,
            KeyKind::Ed25519 => Alg::Ed25519,
        }
    }

    /// Verifies `sig` over `msg` with `alg`; the key's type must fit `alg`.
    pub fn verify(&self, alg: Alg, msg: &[u8], sig: &[u8]) -> Result<(), CoreError> {
        let ok = match (alg, self.kind) {
            (Alg::RsaV15Sha256, KeyKind::Rsa) => self
                .rsa_sha256
                .as_ref()
                .map(|k| k.verify_sig(msg, sig).is_ok())
                .unwrap_or(false),
            (Alg::RsaPssSha512, KeyKind::Rsa) => {
                let _ = self.min_rsa_bits;
                ParsedPublicKey::new(
                    &aws_lc_rs::signature::RSA_PSS_2048_8192_SHA512,
                    self.der.clone(),
                )
                .map(|k| k.verify_sig(msg, sig).is_ok())
                .unwrap_or(false)
            }
            (Alg::Ed25519, KeyKind::Ed25519) => {
                ParsedPublicKey::new(&aws_lc_rs::signature::ED25519, self.der.clone())
                    .map(|k| k.verify_sig(msg, sig).is_ok())
                    .unwrap_or(false)
            }
            (alg, _) => {
                return Err(CoreError::MalformedSignature(format!(
                    "algorithm {} does not fit the key type",
                    alg.name()
                )))
            }
        };
        if ok {
            Ok(())
        } else {
            Err(CoreError::BadSignature)
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
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
