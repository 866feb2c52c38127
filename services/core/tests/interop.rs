//! Interop with an independent implementation: Python's `httpsig`
//! (draft-cavage) and `http-message-signatures` (RFC 9421) sign requests that
//! stampede verifies, and both verify requests stampede signs.
//! `scripts/test` installs them (tests/interop/requirements.txt) and sets
//! `STAMPEDE_TEST_PYTHON`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use serde_json::{json, Value};
use stampede_core::digest::digest_header;
use stampede_core::keys::{generate_rsa_2048, load_private_key, VerifyingKey};
use stampede_core::signature::{sign_request, POST_HEADERS};
use stampede_core::verify::{
    check_coverage_and_digest, check_time, parse, verify_signature, HttpRequest, Scheme,
};
use stampede_core::CoreError;

fn python() -> String {
    let py = std::env::var("STAMPEDE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import httpsig, http_message_signatures, requests"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{py} lacks the interop peer's libraries: run scripts/test, which installs services/core/tests/interop/requirements.txt");
    py
}

fn peer(args: &[&str], input: Option<&Value>) -> Value {
    // Cargo sets CARGO_MANIFEST_DIR when it runs tests; read it then, not at
    // compile time, so a binary reused from another checkout finds this one's script.
    let dir =
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    let script = format!("{dir}/tests/interop/peer.py");
    let mut child = Command::new(python())
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(v) = input {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(v.to_string().as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "peer {args:?} failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn check(signed: &Value, body: &[u8]) -> Result<Scheme, CoreError> {
    let headers: Vec<(String, String)> = signed["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h[0].as_str().unwrap().to_ascii_lowercase(),
                h[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let req = HttpRequest {
        method: signed["method"].as_str().unwrap(),
        scheme: "https",
        path_and_query: signed["path"].as_str().unwrap(),
        headers: &headers,
        body,
    };
    let s = parse(&req)?;
    check_time(&req, &s, now(), 3600, 300)?;
    check_coverage_and_digest(&req, &s)?;
    verify_signature(
        &s,
        &VerifyingKey::from_pem(signed["public_key_pem"].as_str().unwrap())?,
    )?;
    Ok(s.scheme)
}

#[test]
fn stampede_verifies_what_the_independent_peer_signs() {
    for (alg, scheme) in [
        ("cavage-rsa-sha256", Scheme::Cavage),
        ("rsa-v1_5-sha256", Scheme::Rfc9421),
        ("rsa-pss-sha512", Scheme::Rfc9421),
        ("ed25519", Scheme::Rfc9421),
    ] {
        let signed = peer(&["sign", alg], None);
        let body = STANDARD.decode(signed["body"].as_str().unwrap()).unwrap();
        assert_eq!(check(&signed, &body), Ok(scheme), "{alg}");
        let mut tampered = body.clone();
        tampered[2] ^= 1;
        assert_eq!(
            check(&signed, &tampered),
            Err(CoreError::DigestMismatch),
            "{alg} tampered body"
        );
    }
}

#[test]
fn the_independent_peer_verifies_what_stampede_signs() {
    let key = generate_rsa_2048().unwrap();
    let pair = load_private_key(&key.private_pkcs8_der).unwrap();
    let body = br#"{"type":"Create"}"#;
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let digest = digest_header(body);
    let host = "remote.example";
    let sig = sign_request(
        &pair,
        "https://s.example/users/a#main-key",
        "POST",
        "/inbox",
        POST_HEADERS,
        |h| match h {
            "host" => Some(host),
            "date" => Some(date.as_str()),
            "digest" => Some(digest.as_str()),
            _ => None,
        },
    )
    .unwrap();
    let request = |digest: &str| {
        json!({
            "public_key_pem": key.public_pem,
            "method": "POST",
            "path": "/inbox",
            "host": host,
            "headers": [["Host", host], ["Date", date], ["Digest", digest], ["Signature", sig]],
        })
    };
    assert_eq!(
        peer(&["verify-cavage"], Some(&request(&digest)))["verified"],
        true
    );
    assert_eq!(
        peer(&["verify-cavage"], Some(&request("SHA-256=AAAA")))["verified"],
        false
    );
}

#[test]
fn the_independent_peer_verifies_what_stampede_signs_with_rfc_9421() {
    use stampede_core::digest::content_digest_header;
    use stampede_core::rfc9421::{sign, Profile, Target};
    let key = generate_rsa_2048().unwrap();
    let pair = load_private_key(&key.private_pkcs8_der).unwrap();
    let host = "remote.example";
    let created = now();
    for (method, body) in [("POST", &br#"{"type":"Create"}"#[..]), ("GET", &b""[..])] {
        let digest = content_digest_header(body);
        let t = Target {
            method,
            scheme: "https",
            authority: host,
            path_and_query: "/users/bob/inbox?page=1",
        };
        let h = sign(
            &pair,
            "https://s.example/users/a#main-key",
            Profile::standard_ref(!body.is_empty()),
            &t,
            |n| (n == "content-digest").then_some(digest.as_str()),
            created,
            None,
        )
        .unwrap();
        let request = |path: &str, body: &[u8]| {
            let mut headers = vec![
                json!(["Host", host]),
                json!(["Signature-Input", h.input]),
                json!(["Signature", h.signature]),
            ];
            if method == "POST" {
                headers.push(json!(["Content-Digest", digest]));
            }
            json!({
                "public_key_pem": key.public_pem,
                "method": method,
                "path": path,
                "host": host,
                "headers": headers,
                "body": STANDARD.encode(body),
            })
        };
        let ok = peer(
            &["verify-rfc9421"],
            Some(&request("/users/bob/inbox?page=1", body)),
        );
        assert_eq!(ok["verified"], true, "{method}: {ok}");
        let moved = peer(
            &["verify-rfc9421"],
            Some(&request("/users/eve/inbox?page=1", body)),
        );
        assert_eq!(moved["verified"], false, "{method}: another target");
        if method == "POST" {
            let tampered = peer(
                &["verify-rfc9421"],
                Some(&request("/users/bob/inbox?page=1", b"{}")),
            );
            assert_eq!(tampered["verified"], false, "another body");
        }
    }
}
