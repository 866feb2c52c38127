//! Verifying a signed inbound request, whichever scheme signed it:
//! draft-cavage (`Signature`, or `Authorization: Signature …`) or RFC 9421
//! (`Signature-Input` + `Signature`). Pure: the caller supplies the request,
//! the clock and the key; [`parse`] says which key is needed.
use crate::digest::{verify_content_digest, verify_digest_header};
use crate::keys::{Alg, VerifyingKey};
use crate::sfv::{self, Bare, Member};
use crate::signature::{parse_signature_header, signing_string};
use crate::CoreError;

/// The request as received. Header names are lower-case; a repeated header
/// appears once per value, in order.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    /// `POST`, `GET`, …
    pub method: &'a str,
    /// `https` (or `http` behind a proxy in tests).
    pub scheme: &'a str,
    /// Path and query as sent.
    pub path_and_query: &'a str,
    /// Headers.
    pub headers: &'a [(&'a str, &'a str)],
    /// Body.
    pub body: &'a [u8],
}

impl<'a> HttpRequest<'a> {
    /// First value of header `name`.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
    }

    /// All values of `name`, trimmed and joined with `, ` (RFC 9421 §2.1).
    fn combined(&self, name: &str) -> Option<String> {
        let vals: Vec<&str> = self
            .headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.trim())
            .collect();
        (!vals.is_empty()).then(|| vals.join(", "))
    }
}

/// Which scheme signed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// draft-cavage-http-signatures-12.
    Cavage,
    /// RFC 9421.
    Rfc9421,
}

/// A parsed signature with the exact bytes it signs.
#[derive(Debug, Clone)]
pub struct Signed {
    /// Scheme.
    pub scheme: Scheme,
    /// `keyId` / `keyid`.
    pub key_id: String,
    /// The algorithm named by the signature, when it names a specific one.
    pub alg: Option<Alg>,
    /// Cavage `hs2019`: the algorithm follows the key.
    pub hs2019: bool,
    /// What the signature covers (lower-case header names, `(request-target)`, `@method`, …).
    pub covered: Vec<String>,
    /// The signing string / signature base.
    pub base: String,
    /// The signature bytes.
    pub signature: Vec<u8>,
    /// `created`, unix seconds.
    pub created: Option<i64>,
    /// `expires`, unix seconds.
    pub expires: Option<i64>,
}

/// Whether the request carries any signature.
pub fn has_signature(req: &HttpRequest) -> bool {
    req.header("signature").is_some()
        || req
            .header("authorization")
            .is_some_and(|a| a.len() > 10 && a[..10].eq_ignore_ascii_case("signature "))
}

/// Parses the request's signature and builds what it signs.
pub fn parse(req: &HttpRequest) -> Result<Signed, CoreError> {
    if let Some(input) = req.header("signature-input") {
        return parse_rfc9421(req, input);
    }
    let raw = match (req.header("signature"), req.header("authorization")) {
        (Some(s), _) => s,
        (None, Some(a)) if a.len() > 10 && a[..10].eq_ignore_ascii_case("signature ") => &a[10..],
        _ => return Err(CoreError::MissingHeader("signature".into())),
    };
    let p = parse_signature_header(raw)?;
    let (alg, hs2019) = match p.algorithm.as_str() {
        "rsa-sha256" => (Some(Alg::RsaV15Sha256), false),
        "hs2019" => (None, true),
        "ed25519" => (Some(Alg::Ed25519), false),
        other => {
            return Err(CoreError::MalformedSignature(format!(
                "unsupported algorithm {other}"
            )))
        }
    };
    let names: Vec<&str> = p.headers.iter().map(String::as_str).collect();
    let base = signing_string(
        req.method,
        req.path_and_query,
        &names,
        |h| req.header(h),
        p.created,
        p.expires,
    )?;
    Ok(Signed {
        scheme: Scheme::Cavage,
        key_id: p.key_id,
        alg,
        hs2019,
        covered: p.headers,
        base,
        signature: p.signature,
        created: p.created,
        expires: p.expires,
    })
}

fn parse_rfc9421(req: &HttpRequest, input: &str) -> Result<Signed, CoreError> {
    let inputs = sfv::parse_dictionary(input)?;
    let sigs = sfv::parse_dictionary(
        &req.combined("signature")
            .ok_or_else(|| CoreError::MissingHeader("signature".into()))?,
    )?;
    // The first labelled signature that names a key.
    for (label, member) in &inputs {
        let Member::List(items, params) = member else {
            continue;
        };
        let param = |k: &str| params.iter().find(|(pk, _)| pk == k).map(|(_, v)| v);
        let Some(Bare::String(key_id)) = param("keyid") else {
            continue;
        };
        let signature = match sigs.iter().find(|(l, _)| l == label) {
            Some((
                _,
                Member::Item(sfv::Item {
                    bare: Bare::Bytes(b),
                    ..
                }),
            )) => b.clone(),
            _ => {
                return Err(CoreError::MalformedSignature(format!(
                    "no signature labelled {label}"
                )))
            }
        };
        let alg = match param("alg") {
            None => None,
            Some(Bare::String(a)) => Some(match a.as_str() {
                "rsa-v1_5-sha256" => Alg::RsaV15Sha256,
                "rsa-pss-sha512" => Alg::RsaPssSha512,
                "ed25519" => Alg::Ed25519,
                other => {
                    return Err(CoreError::MalformedSignature(format!(
                        "unsupported alg {other}"
                    )))
                }
            }),
            Some(_) => return Err(CoreError::MalformedSignature("alg is not a string".into())),
        };
        let int = |k: &str| match param(k) {
            Some(Bare::Integer(n)) => Ok(Some(*n)),
            None => Ok(None),
            Some(_) => Err(CoreError::MalformedSignature(format!(
                "{k} is not an integer"
            ))),
        };
        let (created, expires) = (int("created")?, int("expires")?);
        let mut base = String::with_capacity(512);
        let mut covered = Vec::with_capacity(items.len());
        for item in items {
            let Bare::String(name) = &item.bare else {
                return Err(CoreError::MalformedSignature(
                    "component is not a string".into(),
                ));
            };
            let value = component(req, name, &item.params)?;
            sfv::serialize_item(item, &mut base);
            base.push_str(": ");
            base.push_str(&value);
            base.push('\n');
            covered.push(name.clone());
        }
        base.push_str("\"@signature-params\": ");
        sfv::serialize_list(items, params, &mut base);
        return Ok(Signed {
            scheme: Scheme::Rfc9421,
            key_id: key_id.clone(),
            alg,
            hs2019: false,
            covered,
            base,
            signature,
            created,
            expires,
        });
    }
    Err(CoreError::MalformedSignature(
        "no signature with a keyid".into(),
    ))
}

/// The value of one covered component (RFC 9421 §2).
fn component(req: &HttpRequest, name: &str, params: &sfv::Params) -> Result<String, CoreError> {
    let (path, query) = match req.path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (req.path_and_query, None),
    };
    let authority = || {
        req.header("host")
            .map(|h| h.trim().to_ascii_lowercase())
            .ok_or_else(|| CoreError::MissingHeader("host".into()))
    };
    if params.iter().any(|(k, _)| k != "name") {
        return Err(CoreError::MalformedSignature(format!(
            "unsupported parameters on component {name}"
        )));
    }
    Ok(match name {
        "@method" => req.method.to_ascii_uppercase(),
        "@authority" => authority()?,
        "@scheme" => req.scheme.to_ascii_lowercase(),
        "@target-uri" => format!("{}://{}{}", req.scheme, authority()?, req.path_and_query),
        "@request-target" => req.path_and_query.to_string(),
        "@path" => {
            if path.is_empty() {
                "/".to_string()
            } else {
                path.to_string()
            }
        }
        "@query" => format!("?{}", query.unwrap_or("")),
        "@query-param" => {
            let Some((_, Bare::String(want))) = params.iter().find(|(k, _)| k == "name") else {
                return Err(CoreError::MalformedSignature(
                    "@query-param without name".into(),
                ));
            };
            query
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .find(|(k, _)| k == want)
                .map(|(_, v)| v.to_string())
                .ok_or_else(|| CoreError::MissingHeader(format!("query parameter {want}")))?
        }
        n if n.starts_with('@') => {
            return Err(CoreError::MalformedSignature(format!(
                "unsupported component {n}"
            )))
        }
        header => req
            .combined(header)
            .ok_or_else(|| CoreError::MissingHeader(header.to_string()))?,
    })
}

/// Checks that the signature covers what binds it to this request (method,
/// target, host, a date, and the body's digest when there is a body) and that
/// the digest matches the body.
pub fn check_coverage_and_digest(req: &HttpRequest, s: &Signed) -> Result<(), CoreError> {
    let covers = |n: &str| s.covered.iter().any(|c| c == n);
    let need = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(CoreError::MalformedSignature(format!(
                "signature does not cover {what}"
            )))
        }
    };
    match s.scheme {
        Scheme::Cavage => {
            need(covers("(request-target)"), "(request-target)")?;
            need(covers("host"), "host")?;
            need(covers("date") || covers("(created)"), "date")?;
            if !req.body.is_empty() {
                need(covers("digest"), "digest")?;
                let d = req
                    .header("digest")
                    .ok_or_else(|| CoreError::MissingHeader("digest".into()))?;
                verify_digest_header(d, req.body)?;
            }
        }
        Scheme::Rfc9421 => {
            need(covers("@method"), "@method")?;
            need(
                covers("@target-uri")
                    || (covers("@authority") && (covers("@path") || covers("@request-target"))),
                "@target-uri (or @authority and @path)",
            )?;
            need(s.created.is_some() || covers("date"), "created or date")?;
            if !req.body.is_empty() {
                need(covers("content-digest"), "content-digest")?;
                let d = req
                    .header("content-digest")
                    .ok_or_else(|| CoreError::MissingHeader("content-digest".into()))?;
                verify_content_digest(d, req.body)?;
            }
        }
    }
    Ok(())
}

/// Checks the request's age: the `Date` header and `created` must lie within
/// `max_past` seconds before `now` and `max_future` after it; `expires` must
/// not have passed.
pub fn check_time(
    req: &HttpRequest,
    s: &Signed,
    now: i64,
    max_past: i64,
    max_future: i64,
) -> Result<(), CoreError> {
    // Saturating: `created` and `expires` are the sender's integers, and
    // i64::MIN or i64::MAX must not overflow (a panic, or a wrapped answer).
    let within = |t: i64, what: &str| {
        if t < now.saturating_sub(max_past) {
            Err(CoreError::StaleDate(format!(
                "{what} is {}s old",
                now.saturating_sub(t)
            )))
        } else if t > now.saturating_add(max_future) {
            Err(CoreError::StaleDate(format!(
                "{what} is {}s in the future",
                t.saturating_sub(now)
            )))
        } else {
            Ok(())
        }
    };
    let mut dated = false;
    if let Some(d) = req.header("date") {
        let t = httpdate::parse_http_date(d.trim())
            .map_err(|_| CoreError::StaleDate("unreadable date".into()))?
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        within(t, "date")?;
        dated = true;
    }
    if let Some(c) = s.created {
        within(c, "created")?;
        dated = true;
    }
    if let Some(e) = s.expires {
        if e < now {
            return Err(CoreError::StaleDate("signature expired".into()));
        }
    }
    if dated {
        Ok(())
    } else {
        Err(CoreError::StaleDate("no date".into()))
    }
}

/// Verifies the signature with `key`.
pub fn verify_signature(s: &Signed, key: &VerifyingKey) -> Result<(), CoreError> {
    let msg = s.base.as_bytes();
    match s.alg {
        Some(alg) => key.verify(alg, msg, &s.signature),
        // hs2019, or RFC 9421 without `alg`: the key's type decides. An RSA
        // key signs RSASSA-PKCS1-v1_5 SHA-256 in the fediverse, RSASSA-PSS
        // SHA-512 per the specifications; both are accepted.
        None => match key.verify(key.default_alg(), msg, &s.signature) {
            Err(CoreError::BadSignature) if key.is_rsa() => {
                key.verify(Alg::RsaPssSha512, msg, &s.signature)
            }
            r => r,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(created: Option<i64>, expires: Option<i64>) -> Signed {
        Signed {
            scheme: Scheme::Cavage,
            key_id: "k".into(),
            alg: None,
            hs2019: true,
            covered: vec![],
            base: String::new(),
            signature: vec![],
            created,
            expires,
        }
    }

    #[test]
    fn extreme_created_and_expires_are_refused_without_overflow() {
        let req = HttpRequest {
            method: "POST",
            scheme: "https",
            path_and_query: "/inbox",
            headers: &[],
            body: b"",
        };
        let now = 1_700_000_000;
        for c in [i64::MIN, i64::MIN + 1, -1, i64::MAX, i64::MAX - 1] {
            // With windows as wide as i64 allows, the arithmetic must not overflow.
            let _ = check_time(&req, &signed(Some(c), None), now, i64::MAX, i64::MAX);
            let _ = check_time(
                &req,
                &signed(Some(c), Some(c)),
                i64::MIN,
                i64::MAX,
                i64::MAX,
            );
            let r = check_time(&req, &signed(Some(c), None), now, 3600, 300);
            assert!(matches!(r, Err(CoreError::StaleDate(_))), "{c}: {r:?}");
        }
        for e in [i64::MIN, -1] {
            let r = check_time(&req, &signed(Some(now), Some(e)), now, 3600, 300);
            assert!(matches!(r, Err(CoreError::StaleDate(_))), "{e}: {r:?}");
        }
        assert!(check_time(&req, &signed(Some(now), Some(i64::MAX)), now, 3600, 300).is_ok());
        let r = check_time(&req, &signed(Some(now), None), i64::MIN, 3600, 300);
        assert!(r.is_err());
    }
}
