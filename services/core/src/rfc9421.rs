//! Signing requests with HTTP Message Signatures (RFC 9421), the way recent
//! fediverse servers (Fedify, Mastodon) sign them: `rsa-v1_5-sha256` over
//! `@method`, `@target-uri` and, with a body, `content-digest` (RFC 9530),
//! with the `created`, `keyid` and `alg` parameters. The signature base is
//! built by the same structured-field code ([`crate::sfv`]) the verifier
//! ([`crate::verify`]) reads it back with.
//!
//! A remote may ask for more with an `Accept-Signature` field (RFC 9421
//! §5.1): [`Profile::from_accept_signature`] takes what of it we can cover.
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeyPair;
use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RSA_PSS_SHA512};
use base64::{engine::general_purpose::STANDARD, Engine as _};

use crate::keys::Alg;
use crate::sfv::{self, Bare, Item, Member};
use crate::CoreError;

/// The components stampede covers on a request with a body.
pub const POST_COMPONENTS: &[&str] = &["@method", "@target-uri", "content-digest"];
/// The components stampede covers on a request without one (a GET).
pub const GET_COMPONENTS: &[&str] = &["@method", "@target-uri"];

/// Longest `Accept-Signature` value looked at (a remote's claim).
pub const MAX_ACCEPT_SIGNATURE: usize = 1024;
/// Most components taken from an `Accept-Signature`.
const MAX_COMPONENTS: usize = 16;

/// What a signature covers and which parameters it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// The label (`sig1`).
    pub label: String,
    /// Covered components, in order: derived ones (`@method`, …) and
    /// lower-case header names.
    pub components: Vec<String>,
    /// `rsa-v1_5-sha256` or `rsa-pss-sha512` (both need an RSA key).
    pub alg: Alg,
    /// `expires`, as seconds after `created`.
    pub expires_in: Option<i64>,
    /// Whether to add a random `nonce`.
    pub nonce: bool,
    /// A `tag` to add.
    pub tag: Option<String>,
}

static STANDARD_POST: std::sync::LazyLock<Profile> =
    std::sync::LazyLock::new(|| Profile::standard(true));
static STANDARD_GET: std::sync::LazyLock<Profile> =
    std::sync::LazyLock::new(|| Profile::standard(false));

impl Profile {
    /// [`Profile::standard`], made once: what a delivery signs with unless
    /// the host asked for more.
    pub fn standard_ref(has_body: bool) -> &'static Self {
        if has_body {
            &STANDARD_POST
        } else {
            &STANDARD_GET
        }
    }

    /// What stampede signs by default: [`POST_COMPONENTS`] with a body,
    /// [`GET_COMPONENTS`] without, `rsa-v1_5-sha256`, label `sig1`.
    pub fn standard(has_body: bool) -> Self {
        let components = if has_body {
            POST_COMPONENTS
        } else {
            GET_COMPONENTS
        };
        Self {
            label: "sig1".into(),
            components: components.iter().map(|c| c.to_string()).collect(),
            alg: Alg::RsaV15Sha256,
            expires_in: None,
            nonce: false,
            tag: None,
        }
    }

    /// The profile a remote asks for in `Accept-Signature` (RFC 9421 §5.1),
    /// as far as we can cover it: its first requested signature's label,
    /// the components [`can_cover`] allows (in its order; ours added where
    /// it left them out, so the request stays bound to its method, target
    /// and body), `rsa-pss-sha512` if asked for (any other algorithm is not
    /// one an RSA key makes: ours stays), a `nonce`, a `tag`, `expires`.
    /// `None` when the value is not a dictionary of inner lists, or too long.
    pub fn from_accept_signature(value: &str, has_body: bool) -> Option<Self> {
        if value.len() > MAX_ACCEPT_SIGNATURE {
            return None;
        }
        let dict = sfv::parse_dictionary(value).ok()?;
        let (label, items, params) = dict.into_iter().find_map(|(label, m)| match m {
            Member::List(items, params) => Some((label, items, params)),
            Member::Item(_) => None,
        })?;
        let mut p = Self::standard(has_body);
        p.label = label;
        let mut components: Vec<String> = Vec::with_capacity(items.len() + 3);
        for item in items.iter().take(MAX_COMPONENTS) {
            if let Bare::String(name) = &item.bare {
                // Parameterised components (`;sf`, `;req`, …) are not ours to make.
                if item.params.is_empty() && can_cover(name, has_body) && !components.contains(name)
                {
                    components.push(name.clone());
                }
            }
        }
        let has = |c: &[String], n: &str| c.iter().any(|x| x == n);
        let bound_to_target = has(&components, "@target-uri")
            || (has(&components, "@authority")
                && (has(&components, "@path") || has(&components, "@request-target")));
        for ours in &p.components {
            let needed = match ours.as_str() {
                "@target-uri" => !bound_to_target,
                other => !has(&components, other),
            };
            if needed {
                components.push(ours.clone());
            }
        }
        p.components = components;
        for (k, v) in params {
            match (k.as_str(), v) {
                ("alg", Bare::String(a)) if a == "rsa-pss-sha512" => p.alg = Alg::RsaPssSha512,
                ("nonce", _) => p.nonce = true,
                ("tag", Bare::String(t)) if t.len() <= 128 => p.tag = Some(t),
                ("expires", _) => p.expires_in = Some(300),
                _ => {}
            }
        }
        Some(p)
    }
}

/// Whether stampede can cover component `name` on its requests: the derived
/// components of a request, and the headers it sends (`content-digest` and
/// `content-type` only with a body).
pub fn can_cover(name: &str, has_body: bool) -> bool {
    match name {
        "@method" | "@target-uri" | "@authority" | "@scheme" | "@request-target" | "@path"
        | "@query" | "host" | "date" | "accept" => true,
        "content-digest" | "content-type" => has_body,
        _ => false,
    }
}

/// The request being signed.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// `POST`, `GET`.
    pub method: &'a str,
    /// `https` (`http` in tests).
    pub scheme: &'a str,
    /// `host[:port]`, as the `Host` header carries it.
    pub authority: &'a str,
    /// Path and query.
    pub path_and_query: &'a str,
}

/// The two header values of a signed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeaders {
    /// `Signature-Input`.
    pub input: String,
    /// `Signature`.
    pub signature: String,
}

/// The value of one covered component of `t` (RFC 9421 §2); headers come
/// from `lookup` (lower-case names).
fn component<'a>(
    t: &Target<'_>,
    name: &str,
    lookup: &impl Fn(&str) -> Option<&'a str>,
    out: &mut String,
) -> Result<(), CoreError> {
    let (path, query) = match t.path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (t.path_and_query, None),
    };
    match name {
        "@method" => out.push_str(t.method),
        "@target-uri" => {
            out.push_str(t.scheme);
            out.push_str("://");
            out.push_str(t.authority);
            out.push_str(t.path_and_query);
        }
        "@authority" => out.extend(t.authority.chars().map(|c| c.to_ascii_lowercase())),
        "@scheme" => out.push_str(t.scheme),
        "@request-target" => out.push_str(t.path_and_query),
        "@path" => out.push_str(if path.is_empty() { "/" } else { path }),
        "@query" => {
            out.push('?');
            out.push_str(query.unwrap_or(""));
        }
        n if n.starts_with('@') => {
            return Err(CoreError::MalformedSignature(format!(
                "cannot sign component {n}"
            )))
        }
        header => out.push_str(
            lookup(header)
                .ok_or_else(|| CoreError::MissingHeader(header.to_string()))?
                .trim(),
        ),
    }
    Ok(())
}

/// The signature parameters' inner list (`("@method" …);created=…;…`).
fn params_list(
    profile: &Profile,
    key_id: &str,
    created: i64,
    nonce: Option<&str>,
) -> (Vec<Item>, sfv::Params) {
    let items = profile
        .components
        .iter()
        .map(|c| Item {
            bare: Bare::String(c.clone()),
            params: Vec::new(),
        })
        .collect();
    let mut params = Vec::with_capacity(6);
    params.push(("created".to_string(), Bare::Integer(created)));
    params.push(("keyid".to_string(), Bare::String(key_id.to_string())));
    params.push((
        "alg".to_string(),
        Bare::String(profile.alg.name().to_string()),
    ));
    if let Some(e) = profile.expires_in {
        params.push(("expires".to_string(), Bare::Integer(created + e)));
    }
    if let Some(n) = nonce {
        params.push(("nonce".to_string(), Bare::String(n.to_string())));
    }
    if let Some(t) = &profile.tag {
        params.push(("tag".to_string(), Bare::String(t.clone())));
    }
    (items, params)
}

/// The signature base (RFC 9421 §2.5) and the `Signature-Input` member's
/// value (the serialized inner list with its parameters).
pub fn signature_base<'a>(
    profile: &Profile,
    key_id: &str,
    t: &Target<'_>,
    lookup: impl Fn(&str) -> Option<&'a str>,
    created: i64,
    nonce: Option<&str>,
) -> Result<(String, String), CoreError> {
    let (items, params) = params_list(profile, key_id, created, nonce);
    let mut list = String::with_capacity(160 + key_id.len());
    sfv::serialize_list(&items, &params, &mut list);
    let mut base = String::with_capacity(256 + list.len());
    for item in &items {
        let Bare::String(name) = &item.bare else {
            continue;
        };
        sfv::serialize_item(item, &mut base);
        base.push_str(": ");
        component(t, name, &lookup, &mut base)?;
        base.push('\n');
    }
    base.push_str("\"@signature-params\": ");
    base.push_str(&list);
    Ok((base, list))
}

/// Signs `t` as `profile` says with `key`: the `Signature-Input` and
/// `Signature` header values. `created` is unix seconds; `nonce` is used
/// when the profile asks for one. The RSA step is the CPU-heavy part: run
/// it on a blocking pool.
pub fn sign<'a>(
    key: &KeyPair,
    key_id: &str,
    profile: &Profile,
    t: &Target<'_>,
    lookup: impl Fn(&str) -> Option<&'a str>,
    created: i64,
    nonce: Option<&str>,
) -> Result<SignatureHeaders, CoreError> {
    let generated;
    let nonce = match (profile.nonce, nonce) {
        (false, _) => None,
        (true, Some(n)) => Some(n),
        (true, None) => {
            generated = random_nonce()?;
            Some(generated.as_str())
        }
    };
    let (base, list) = signature_base(profile, key_id, t, lookup, created, nonce)?;
    let encoding = match profile.alg {
        Alg::RsaV15Sha256 => &RSA_PKCS1_SHA256,
        Alg::RsaPssSha512 => &RSA_PSS_SHA512,
        Alg::Ed25519 => {
            return Err(CoreError::Key(
                "an RSA key cannot sign ed25519 signatures".into(),
            ))
        }
    };
    let mut sig = vec![0u8; key.public_modulus_len()];
    key.sign(encoding, &SystemRandom::new(), base.as_bytes(), &mut sig)
        .map_err(|e| CoreError::Key(format!("signing failed: {e}")))?;
    let mut input = String::with_capacity(profile.label.len() + 1 + list.len());
    input.push_str(&profile.label);
    input.push('=');
    input.push_str(&list);
    let mut signature = String::with_capacity(profile.label.len() + 4 + sig.len() * 4 / 3 + 4);
    signature.push_str(&profile.label);
    signature.push_str("=:");
    STANDARD.encode_string(&sig, &mut signature);
    signature.push(':');
    Ok(SignatureHeaders { input, signature })
}

/// 16 random bytes, base64.
fn random_nonce() -> Result<String, CoreError> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).map_err(|e| CoreError::Key(format!("no randomness: {e}")))?;
    Ok(STANDARD.encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::content_digest_header;
    use crate::keys::{generate_rsa_2048, load_private_key, VerifyingKey};
    use crate::verify::{
        check_coverage_and_digest, check_time, parse, verify_signature, HttpRequest, Scheme,
    };

    fn key() -> (KeyPair, VerifyingKey) {
        let k = generate_rsa_2048().unwrap();
        (
            load_private_key(&k.private_pkcs8_der).unwrap(),
            VerifyingKey::from_pem(&k.public_pem).unwrap(),
        )
    }

    /// Signs a POST (or a GET when `body` is empty) to
    /// `https://remote.example/inbox?x=1` and verifies it as the inbox
    /// service verifies a request.
    fn round_trip(profile: &Profile, body: &[u8], tamper: bool) -> Result<Scheme, CoreError> {
        let (pair, public) = key();
        let digest = content_digest_header(body);
        let date = "Tue, 20 Apr 2021 02:07:55 GMT";
        let method = if body.is_empty() { "GET" } else { "POST" };
        let t = Target {
            method,
            scheme: "https",
            authority: "remote.example",
            path_and_query: "/inbox?x=1",
        };
        let lookup = |h: &str| match h {
            "content-digest" => Some(digest.as_str()),
            "content-type" => Some("application/activity+json"),
            "date" => Some(date),
            "host" => Some("remote.example"),
            "accept" => Some("application/activity+json"),
            _ => None,
        };
        let now = 1_700_000_000;
        let h = sign(
            &pair,
            "https://s.example/users/a#main-key",
            profile,
            &t,
            lookup,
            now,
            None,
        )?;
        let mut headers = vec![
            ("host", "remote.example"),
            ("content-type", "application/activity+json"),
            ("accept", "application/activity+json"),
            ("signature-input", h.input.as_str()),
            ("signature", h.signature.as_str()),
        ];
        if !body.is_empty() {
            headers.push(("content-digest", digest.as_str()));
        }
        if profile.components.iter().any(|c| c == "date") {
            headers.push(("date", date));
        }
        let path = if tamper { "/outbox?x=1" } else { "/inbox?x=1" };
        let req = HttpRequest {
            method,
            scheme: "https",
            path_and_query: path,
            headers: &headers,
            body,
        };
        let s = parse(&req)?;
        assert_eq!(s.key_id, "https://s.example/users/a#main-key");
        assert_eq!(s.created, Some(now));
        check_coverage_and_digest(&req, &s)?;
        if !profile.components.iter().any(|c| c == "date") {
            check_time(&req, &s, now + 10, 3600, 300)?;
        }
        verify_signature(&s, &public)?;
        Ok(s.scheme)
    }

    #[test]
    fn signs_what_the_verifier_accepts_post_and_get() {
        let body = br#"{"type":"Create"}"#;
        assert_eq!(
            round_trip(&Profile::standard(true), body, false),
            Ok(Scheme::Rfc9421)
        );
        assert_eq!(
            round_trip(&Profile::standard(false), b"", false),
            Ok(Scheme::Rfc9421)
        );
        assert_eq!(
            round_trip(&Profile::standard(true), body, true),
            Err(CoreError::BadSignature)
        );
        assert_eq!(
            round_trip(&Profile::standard(false), b"", true),
            Err(CoreError::BadSignature)
        );
    }

    #[test]
    fn the_standard_headers_look_as_fedify_sends_them() {
        let (pair, _) = key();
        let t = Target {
            method: "POST",
            scheme: "https",
            authority: "remote.example",
            path_and_query: "/inbox",
        };
        let h = sign(
            &pair,
            "https://s.example/users/a#main-key",
            &Profile::standard(true),
            &t,
            |_| Some("sha-256=:AAAA:"),
            1_700_000_000,
            None,
        )
        .unwrap();
        assert_eq!(
            h.input,
            r#"sig1=("@method" "@target-uri" "content-digest");created=1700000000;keyid="https://s.example/users/a#main-key";alg="rsa-v1_5-sha256""#
        );
        assert!(h.signature.starts_with("sig1=:") && h.signature.ends_with(':'));
    }

    #[test]
    fn accept_signature_is_honoured_as_far_as_we_can_cover_it() {
        let p = Profile::from_accept_signature(
            r#"sig-b=("@authority" "@path" "date" "content-type" "x-secret" "@query-param";name="a" "content-digest");keyid="theirs";alg="rsa-pss-sha512";nonce;tag="fedi""#,
            true,
        )
        .unwrap();
        assert_eq!(p.label, "sig-b");
        assert_eq!(
            p.components,
            [
                "@authority",
                "@path",
                "date",
                "content-type",
                "content-digest",
                "@method"
            ],
            "what we cannot make is left out, @method added, @authority with @path binds the target"
        );
        assert_eq!(p.alg, Alg::RsaPssSha512);
        assert!(p.nonce);
        assert_eq!(p.tag.as_deref(), Some("fedi"));
        assert_eq!(round_trip(&p, br#"{"a":1}"#, false), Ok(Scheme::Rfc9421));
        assert_eq!(
            round_trip(&p, br#"{"a":1}"#, true),
            Err(CoreError::BadSignature)
        );
        // An algorithm an RSA key cannot make leaves ours; a GET drops the body's components.
        let p = Profile::from_accept_signature(
            r#"sig1=("@method" "content-digest" "@target-uri");alg="ed25519";expires"#,
            false,
        )
        .unwrap();
        assert_eq!(p.components, ["@method", "@target-uri"]);
        assert_eq!(p.alg, Alg::RsaV15Sha256);
        assert_eq!(p.expires_in, Some(300));
        assert_eq!(round_trip(&p, b"", false), Ok(Scheme::Rfc9421));
        for bad in ["", "sig1=:AAAA:", "sig1=(", &"a".repeat(2000)] {
            assert_eq!(Profile::from_accept_signature(bad, true), None, "{bad}");
        }
    }

    /// RFC 9421 §4.3: the proxy's `rsa-v1_5-sha256` signature with
    /// test-key-rsa (appendix B.1.1). PKCS#1 v1.5 is deterministic, so the
    /// signer must make the published bytes exactly.
    #[test]
    fn reproduces_the_rfc_9421_section_4_3_signature() {
        let der =
            crate::keys::pem_decode(include_str!("../tests/vectors/test-key-rsa-private.pem"))
                .unwrap();
        let pair = KeyPair::from_der(&der).unwrap();
        let profile = Profile {
            label: "proxy_sig".into(),
            components: [
                "@method",
                "@authority",
                "@path",
                "content-digest",
                "content-type",
                "content-length",
                "forwarded",
            ]
            .iter()
            .map(|c| c.to_string())
            .collect(),
            alg: Alg::RsaV15Sha256,
            expires_in: Some(60),
            nonce: false,
            tag: None,
        };
        let t = Target {
            method: "POST",
            scheme: "https",
            authority: "origin.host.internal.example",
            path_and_query: "/foo?param=Value&Pet=dog",
        };
        let h = sign(
            &pair,
            "test-key-rsa",
            &profile,
            &t,
            |h| match h {
                "content-digest" => Some("sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:"),
                "content-type" => Some("application/json"),
                "content-length" => Some("18"),
                "forwarded" => Some("for=192.0.2.123;host=example.com;proto=https"),
                _ => None,
            },
            1_618_884_480,
            None,
        )
        .unwrap();
        assert_eq!(
            h.input,
            r#"proxy_sig=("@method" "@authority" "@path" "content-digest" "content-type" "content-length" "forwarded");created=1618884480;keyid="test-key-rsa";alg="rsa-v1_5-sha256";expires=1618884540"#
        );
        assert_eq!(
            h.signature,
            "proxy_sig=:S6ZzPXSdAMOPjN/6KXfXWNO/f7V6cHm7BXYUh3YD/fRad4BCaRZxP+JH+8XY1I6+8Cy+CM5g92iHgxtRPz+MjniOaYmdkDcnL9cCpXJleXsOckpURl49GwiyUpZ10KHgOEe11sx3G2gxI8S0jnxQB+Pu68U9vVcasqOWAEObtNKKZd8tSFu7LB5YAv0RAGhB8tmpv7sFnIm9y+7X5kXQfi8NMaZaA8i2ZHwpBdg7a6CMfwnnrtflzvZdXAsD3LH2TwevU+/PBPv0B6NMNk93wUs/vfJvye+YuI87HU38lZHowtznbLVdp770I6VHR6WfgS9ddzirrswsE1w5o0LV/g==:"
        );
    }

    #[test]
    fn a_component_we_cannot_make_is_an_error_not_a_guess() {
        let (pair, _) = key();
        let mut p = Profile::standard(false);
        p.components.push("@status".into());
        let t = Target {
            method: "GET",
            scheme: "https",
            authority: "r.example",
            path_and_query: "/",
        };
        assert!(sign(&pair, "k", &p, &t, |_| None, 1, None).is_err());
        let mut p = Profile::standard(false);
        p.components.push("date".into());
        assert_eq!(
            sign(&pair, "k", &p, &t, |_| None, 1, None),
            Err(CoreError::MissingHeader("date".into()))
        );
    }
}
