//! Who may use the console (README, "Admin console"). With
//! `STAMPEDE_API_TOKEN` set, a person logs in with the token and gets a
//! session cookie; without it, only loopback peers are answered (as the gRPC
//! API does) and a session is handed out on the first page.
//!
//! Sessions are stateless: the cookie is `{expiry}.{nonce}.{tag}`, the tag
//! an HMAC-SHA256 of expiry and nonce under the token, so any ingest replica
//! knows a session another made and there is no table to grow or bound.
//! The CSRF token is the HMAC of the session under the same key: tied to
//! the session, sent by the page in `X-CSRF-Token` on every action, and
//! unreadable by another origin.
use std::net::SocketAddr;

use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use axum::http::HeaderMap;
use stampede_runtime::grpc::Auth;

/// The session cookie's name.
pub(crate) const COOKIE: &str = "stampede_session";
/// The header carrying the CSRF token on actions.
pub(crate) const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts.
const LIFETIME_SECS: i64 = 12 * 3600;

/// Issues and checks sessions and CSRF tokens.
pub(crate) struct Sessions {
    auth: Auth,
    key: hmac::Key,
    rng: SystemRandom,
}

impl Sessions {
    /// Sessions keyed by `token` (the API token), or by a random key of this
    /// process when there is none (loopback only: one process serves it).
    pub(crate) fn new(auth: Auth, token: Option<&str>) -> Result<Self, String> {
        let rng = SystemRandom::new();
        let key = match token {
            Some(t) => hmac::Key::new(hmac::HMAC_SHA256, t.as_bytes()),
            None => {
                let mut k = [0u8; 32];
                rng.fill(&mut k)
                    .map_err(|_| "no random bytes for the console's session key".to_string())?;
                hmac::Key::new(hmac::HMAC_SHA256, &k)
            }
        };
        Ok(Self { auth, key, rng })
    }

    /// Whether a person must log in with the token.
    pub(crate) fn requires_login(&self) -> bool {
        self.auth.requires_token()
    }

    /// Whether `given` is the API token (constant time).
    pub(crate) fn token_matches(&self, given: &str) -> bool {
        self.auth.token_matches(given)
    }

    /// Why a request from `peer` to `host` is refused before any session is
    /// looked at: without a token, a peer that is not loopback, or a `Host`
    /// that is not a loopback name (a page of another site whose name was
    /// rebound to 127.0.0.1 must not drive the console).
    pub(crate) fn refuse_peer(
        &self,
        peer: Option<SocketAddr>,
        headers: &HeaderMap,
    ) -> Option<&'static str> {
        if self.requires_login() {
            return None;
        }
        if !Auth::is_loopback(peer) {
            return Some("the console answers loopback only; set STAMPEDE_API_TOKEN to open it");
        }
        let host = headers
            .get(axum::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        if !loopback_host(host) {
            return Some("the console answers loopback names only (127.0.0.1, [::1], localhost)");
        }
        None
    }

    /// A new session valid from `now` (unix seconds).
    pub(crate) fn issue(&self, now: i64) -> Result<String, String> {
        let mut nonce = [0u8; 16];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| "no random bytes for a session".to_string())?;
        let (exp, nonce) = (now + LIFETIME_SECS, hex(&nonce));
        let tag = hmac::sign(&self.key, format!("session:{exp}:{nonce}").as_bytes());
        Ok(format!("{exp}.{nonce}.{}", hex(tag.as_ref())))
    }

    /// Whether `session` was issued here (or by a replica with the same
    /// token) and has not expired at `now`.
    pub(crate) fn valid(&self, session: &str, now: i64) -> bool {
        let mut parts = session.splitn(3, '.');
        let (Some(exp), Some(nonce), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        let (Ok(exp_n), Some(tag)) = (exp.parse::<i64>(), unhex(tag)) else {
            return false;
        };
        exp_n > now
            && hmac::verify(&self.key, format!("session:{exp}:{nonce}").as_bytes(), &tag).is_ok()
    }

    /// The CSRF token of `session`.
    pub(crate) fn csrf(&self, session: &str) -> String {
        hex(hmac::sign(&self.key, format!("csrf:{session}").as_bytes()).as_ref())
    }

    /// Whether `given` is the CSRF token of `session` (constant time).
    pub(crate) fn csrf_matches(&self, session: &str, given: &str) -> bool {
        unhex(given).is_some_and(|tag| {
            hmac::verify(&self.key, format!("csrf:{session}").as_bytes(), &tag).is_ok()
        })
    }
}

/// The session cookie among the request's cookies.
pub(crate) fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// The `Set-Cookie` value for `session` (empty: clears it). HttpOnly (no
/// script reads it) and SameSite=Strict (no other site's page sends it);
/// Secure unless the page was reached over plain HTTP on a loopback name,
/// where the browser would otherwise drop it and nothing leaves the machine.
pub(crate) fn set_cookie(session: &str, headers: &HeaderMap) -> String {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let secure = if https || !loopback_host(host) {
        "; Secure"
    } else {
        ""
    };
    let age = if session.is_empty() { 0 } else { LIFETIME_SECS };
    format!("{COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={age}{secure}")
}

/// Whether a `Host` header names this machine's loopback.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(token: Option<&str>) -> Sessions {
        let auth = Auth::new(token.map(stampede_runtime::config::Secret::new));
        Sessions::new(auth, token).unwrap()
    }

    #[test]
    fn a_session_is_valid_until_it_expires_and_only_under_its_key() {
        let s = sessions(Some("0123456789abcdef-token"));
        let v = s.issue(1000).unwrap();
        assert!(s.valid(&v, 1001));
        assert!(!s.valid(&v, 1000 + LIFETIME_SECS));
        let other = sessions(Some("0123456789abcdef-other"));
        assert!(!other.valid(&v, 1001));
        // Moving the expiry breaks the tag.
        let (_, rest) = v.split_once('.').unwrap();
        assert!(!s.valid(&format!("99999999999.{rest}"), 1001));
        assert!(!s.valid("garbage", 1001));
    }

    #[test]
    fn the_csrf_token_is_tied_to_its_session() {
        let s = sessions(None);
        let (a, b) = (s.issue(1).unwrap(), s.issue(1).unwrap());
        assert!(s.csrf_matches(&a, &s.csrf(&a)));
        assert!(!s.csrf_matches(&b, &s.csrf(&a)));
        assert!(!s.csrf_matches(&a, "00"));
        assert!(!s.csrf_matches(&a, "not hex"));
    }

    #[test]
    fn loopback_names() {
        for h in [
            "127.0.0.1:8081",
            "localhost:8081",
            "[::1]:8081",
            "127.0.0.1",
            "LOCALHOST",
        ] {
            assert!(loopback_host(h), "{h}");
        }
        for h in ["evil.example:8081", "10.0.0.1:8081", "", "[::2]:1"] {
            assert!(!loopback_host(h), "{h}");
        }
    }

    #[test]
    fn the_cookie_is_http_only_and_same_site_strict() {
        let mut h = HeaderMap::new();
        h.insert("host", "127.0.0.1:8081".parse().unwrap());
        let c = set_cookie("v", &h);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure"));
        h.insert("host", "admin.example".parse().unwrap());
        assert!(set_cookie("v", &h).contains("; Secure"));
        let mut h2 = HeaderMap::new();
        h2.insert("cookie", format!("a=b; {COOKIE}=xyz").parse().unwrap());
        assert_eq!(session_cookie(&h2), Some("xyz"));
    }
}
