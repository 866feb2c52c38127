//! Multibase base58btc (`z…`) and Ed25519 Multikeys (FEP-521a): the
//! encodings of an Object Integrity Proof's `proofValue` and of the
//! `publicKeyMultibase` of an actor's `assertionMethod`. Inputs are bounded
//! before any arithmetic: base58 decoding is quadratic in the length.
use crate::keys::pem_encode;
use crate::CoreError;

const ALPHABET: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// The longest multibase string decoded: an Ed25519 signature (64 bytes)
/// is 87 or 88 characters, a Multikey (34 bytes) 48; nothing legitimate
/// comes near.
pub const MAX_MULTIBASE_CHARS: usize = 128;

/// The multicodec prefix of an Ed25519 public key (0xed, as a varint).
pub const ED25519_PUB_PREFIX: [u8; 2] = [0xed, 0x01];

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo, before the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

fn err(reason: impl Into<String>) -> CoreError {
    CoreError::InvalidField {
        field: "multibase",
        reason: reason.into(),
    }
}

/// Decodes base58 (Bitcoin alphabet) text of at most
/// [`MAX_MULTIBASE_CHARS`] characters.
pub fn base58_decode(s: &str) -> Result<Vec<u8>, CoreError> {
    if s.len() > MAX_MULTIBASE_CHARS {
        return Err(err(format!("longer than {MAX_MULTIBASE_CHARS} characters")));
    }
    let zeros = s.bytes().take_while(|b| *b == b'1').count();
    // Big-endian base-256 digits of the number, built one base-58 digit at a time.
    let mut num: Vec<u8> = Vec::with_capacity(s.len());
    for c in s.bytes() {
        let mut carry = ALPHABET
            .iter()
            .position(|a| *a == c)
            .ok_or_else(|| err("a character outside the base58 alphabet"))?
            as u32;
        for byte in num.iter_mut().rev() {
            carry += u32::from(*byte) * 58;
            *byte = (carry & 0xff) as u8;
            carry >>= 8;
        }
        while carry > 0 {
            num.insert(0, (carry & 0xff) as u8);
            carry >>= 8;
        }
    }
    let mut out = vec![0u8; zeros];
    out.extend(num.into_iter().skip_while(|b| *b == 0));
    Ok(out)
}

/// Encodes bytes as base58 (Bitcoin alphabet).
pub fn base58_encode(bytes: &[u8]) -> String {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    // Little-endian base-58 digits.
    let mut digits: Vec<u8> = Vec::with_capacity(bytes.len() * 138 / 100 + 1);
    for b in bytes {
        let mut carry = u32::from(*b);
        for d in digits.iter_mut() {
            carry += u32::from(*d) << 8;
            *d = (carry % 58) as u8;
            carry /= 58;
        }
        while carry > 0 {
            digits.push((carry % 58) as u8);
            carry /= 58;
        }
    }
    let mut out = String::with_capacity(zeros + digits.len());
    out.extend(std::iter::repeat_n('1', zeros));
    out.extend(digits.iter().rev().map(|d| ALPHABET[*d as usize] as char));
    out
}

/// Decodes a multibase string that must be base58btc (`z` prefix).
pub fn decode_base58btc(s: &str) -> Result<Vec<u8>, CoreError> {
    let rest = s
        .strip_prefix('z')
        .ok_or_else(|| err("not base58btc multibase (no `z` prefix)"))?;
    base58_decode(rest)
}

/// Encodes bytes as a base58btc multibase string (`z…`).
pub fn encode_base58btc(bytes: &[u8]) -> String {
    format!("z{}", base58_encode(bytes))
}

/// The 32 bytes of an Ed25519 public key from a Multikey's
/// `publicKeyMultibase` (base58btc of 0xed01 and the key).
pub fn ed25519_multikey(public_key_multibase: &str) -> Result<[u8; 32], CoreError> {
    let bytes = decode_base58btc(public_key_multibase)?;
    let key = bytes
        .strip_prefix(&ED25519_PUB_PREFIX)
        .ok_or_else(|| err("not an Ed25519 Multikey (no 0xed01 prefix)"))?;
    key.try_into()
        .map_err(|_| err(format!("an Ed25519 key of {} bytes, not 32", key.len())))
}

/// The `publicKeyMultibase` of an Ed25519 public key.
pub fn ed25519_multikey_encode(key: &[u8; 32]) -> String {
    let mut bytes = ED25519_PUB_PREFIX.to_vec();
    bytes.extend_from_slice(key);
    encode_base58btc(&bytes)
}

/// An Ed25519 public key as SubjectPublicKeyInfo PEM, the form keys are
/// cached and parsed in ([`crate::keys::VerifyingKey::from_pem`]).
pub fn ed25519_spki_pem(key: &[u8; 32]) -> String {
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(key);
    pem_encode("PUBLIC KEY", &der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base58_round_trips_and_keeps_leading_zeros() {
        for bytes in [&b""[..], &[0], &[0, 0, 1], &[0xff; 64], b"hello world"] {
            assert_eq!(base58_decode(&base58_encode(bytes)).unwrap(), bytes);
        }
        // The classic vector: "Hello World!" in base58btc.
        assert_eq!(base58_encode(b"Hello World!"), "2NEpo7TZRRrLZSi2U");
        assert_eq!(base58_decode("2NEpo7TZRRrLZSi2U").unwrap(), b"Hello World!");
        assert_eq!(base58_encode(&[0, 0, 0x28, 0x7f, 0xb4, 0xcd]), "11233QC4");
    }

    #[test]
    fn base58_refuses_what_it_must() {
        assert!(base58_decode("0OIl").is_err(), "not in the alphabet");
        assert!(base58_decode(&"2".repeat(MAX_MULTIBASE_CHARS + 1)).is_err());
        assert!(decode_base58btc("f00").is_err(), "base16 multibase");
        assert!(decode_base58btc("").is_err());
    }

    /// FEP-521a's and the W3C vc-di-eddsa test key. FEP-521a also gives it
    /// in base64url (`u7QGwDY2Tjn93PVFWWq02piP1NE9_XRlg-c8-jhJiDqKBDw`):
    /// 0xed01 then b00d8d93….
    #[test]
    fn the_published_multikey() {
        let key = ed25519_multikey("z6MkrJVnaZkeFzdQyMZu1cgjg7k1pZZ6pvBQ7XJPt4swbTQ2").unwrap();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "b00d8d938e7f773d51565aad36a623f5344f7f5d1960f9cf3e8e12620ea2810f"
        );
        assert_eq!(
            ed25519_multikey_encode(&key),
            "z6MkrJVnaZkeFzdQyMZu1cgjg7k1pZZ6pvBQ7XJPt4swbTQ2"
        );
        crate::keys::VerifyingKey::from_pem(&ed25519_spki_pem(&key)).unwrap();
        // Another codec (0x1200: P-256), a short key.
        assert!(ed25519_multikey(&encode_base58btc(&[0x80, 0x24, 1, 2])).is_err());
        assert!(ed25519_multikey(&encode_base58btc(&[0xed, 0x01, 1, 2])).is_err());
    }
}
