//! Published test vectors: draft-cavage-http-signatures-12 appendix C and
//! RFC 9421 appendix B.2 and §4.3, verified through the same `verify`
//! functions the inbox service uses.
#![allow(clippy::unwrap_used)]

use stampede_core::keys::VerifyingKey;
use stampede_core::verify::{
    check_coverage_and_digest, parse, verify_signature, HttpRequest, Scheme,
};
use stampede_core::CoreError;

const CAVAGE_KEY: &str = include_str!("vectors/cavage-test-key.pem");
const RSA_KEY: &str = include_str!("vectors/test-key-rsa.pem");
const RSA_PSS_KEY: &str = include_str!("vectors/test-key-rsa-pss.pem");
const ED25519_KEY: &str = include_str!("vectors/test-key-ed25519.pem");

const BODY: &[u8] = br#"{"hello": "world"}"#;

fn cavage_request<'a>(extra: &'a [(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut h = vec![
        ("host", "example.com"),
        ("date", "Sun, 05 Jan 2014 21:31:40 GMT"),
        ("content-type", "application/json"),
        (
            "digest",
            "SHA-256=X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=",
        ),
        ("content-length", "18"),
    ];
    h.extend_from_slice(extra);
    h
}

fn verify_cavage(headers: &[(&str, &str)]) -> Result<(), CoreError> {
    let req = HttpRequest {
        method: "POST",
        scheme: "https",
        path_and_query: "/foo?param=value&pet=dog",
        headers,
        body: BODY,
    };
    let s = parse(&req)?;
    assert_eq!(s.scheme, Scheme::Cavage);
    let key = VerifyingKey::from_pem_allowing_1024_bit_rsa(CAVAGE_KEY)?;
    verify_signature(&s, &key)?;
    check_coverage_and_digest(&req, &s)
}

#[test]
fn cavage_c1_default_test() {
    let h = cavage_request(&[(
        "authorization",
        r#"Signature keyId="Test",algorithm="rsa-sha256",signature="SjWJWbWN7i0wzBvtPl8rbASWz5xQW6mcJmn+ibttBqtifLN7Sazz6m79cNfwwb8DMJ5cou1s7uEGKKCs+FLEEaDV5lp7q25WqS+lavg7T8hc0GppauB6hbgEKTwblDHYGEtbGmtdHgVCk9SuS13F0hZ8FD0k/5OxEPXe5WozsbM=""#,
    )]);
    // The signature verifies, but covers only the date: not enough for an inbox.
    match verify_cavage(&h) {
        Err(CoreError::MalformedSignature(m)) => assert!(m.contains("(request-target)"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn cavage_c2_basic_test() {
    let h = cavage_request(&[(
        "authorization",
        r#"Signature keyId="Test",algorithm="rsa-sha256",headers="(request-target) host date",signature="qdx+H7PHHDZgy4y/Ahn9Tny9V3GP6YgBPyUXMmoxWtLbHpUnXS2mg2+SbrQDMCJypxBLSPQR2aAjn7ndmw2iicw3HMbe8VfEdKFYRqzic+efkb3nndiv/x1xSHDJWeSWkx3ButlYSuBskLu6kd9Fswtemr3lgdDEmn04swr2Os0=""#,
    )]);
    // Verifies; refused only because a request with a body must cover its digest.
    match verify_cavage(&h) {
        Err(CoreError::MalformedSignature(m)) => assert!(m.contains("digest"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn cavage_c3_all_headers_test() {
    let h = cavage_request(&[(
        "signature",
        r#"keyId="Test",algorithm="rsa-sha256",headers="(request-target) host date content-type digest content-length",signature="vSdrb+dS3EceC9bcwHSo4MlyKS59iFIrhgYkz8+oVLEEzmYZZvRs8rgOp+63LEM3v+MFHB32NfpB2bEKBIvB1q52LaEUHFv120V01IL+TAD48XaERZFukWgHoBTLMhYS2Gb51gWxpeIq8knRmPnYePbF5MOkR0Zkly4zKH7s1dE=""#,
    )]);
    verify_cavage(&h).unwrap();
    // A tampered signed header breaks it.
    let mut bad = h.clone();
    bad[1] = ("date", "Sun, 05 Jan 2014 21:31:41 GMT");
    assert_eq!(verify_cavage(&bad), Err(CoreError::BadSignature));
}

const CONTENT_DIGEST: &str =
    "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:";

fn rfc9421(input: &str, signature: &str, key_pem: &str, authority: &str) -> Result<(), CoreError> {
    let headers = [
        ("host", authority),
        ("date", "Tue, 20 Apr 2021 02:07:55 GMT"),
        ("content-type", "application/json"),
        ("content-digest", CONTENT_DIGEST),
        ("content-length", "18"),
        ("forwarded", "for=192.0.2.123;host=example.com;proto=https"),
        ("signature-input", input),
        ("signature", signature),
    ];
    let req = HttpRequest {
        method: "POST",
        scheme: "https",
        path_and_query: "/foo?param=Value&Pet=dog",
        headers: &headers,
        body: BODY,
    };
    let s = parse(&req)?;
    assert_eq!(s.scheme, Scheme::Rfc9421);
    verify_signature(&s, &VerifyingKey::from_pem(key_pem)?)
}

#[test]
fn rfc9421_b21_minimal_rsa_pss_sha512() {
    rfc9421(
        r#"sig-b21=();created=1618884473;keyid="test-key-rsa-pss";nonce="b3k2pp5k7z-50gnwp.yemd""#,
        "sig-b21=:d2pmTvmbncD3xQm8E9ZV2828BjQWGgiwAaw5bAkgibUopemLJcWDy/lkbbHAve4cRAtx31Iq786U7it++wgGxbtRxf8Udx7zFZsckzXaJMkA7ChG52eSkFxykJeNqsrWH5S+oxNFlD4dzVuwe8DhTSja8xxbR/Z2cOGdCbzR72rgFWhzx2VjBqJzsPLMIQKhO4DGezXehhWwE56YCE+O6c0mKZsfxVrogUvA4HELjVKWmAvtl6UnCh8jYzuVG5WSb/QEVPnP5TmcAnLH1g+s++v6d4s8m0gCw1fV5/SITLq9mhho8K3+7EPYTU8IU1bLhdxO5Nyt8C8ssinQ98Xw9Q==:",
        RSA_PSS_KEY,
        "example.com",
    )
    .unwrap();
}

#[test]
fn rfc9421_b22_selective_rsa_pss_sha512() {
    rfc9421(
        r#"sig-b22=("@authority" "content-digest" "@query-param";name="Pet");created=1618884473;keyid="test-key-rsa-pss";tag="header-example""#,
        "sig-b22=:LjbtqUbfmvjj5C5kr1Ugj4PmLYvx9wVjZvD9GsTT4F7GrcQEdJzgI9qHxICagShLRiLMlAJjtq6N4CDfKtjvuJyE5qH7KT8UCMkSowOB4+ECxCmT8rtAmj/0PIXxi0A0nxKyB09RNrCQibbUjsLS/2YyFYXEu4TRJQzRw1rLEuEfY17SARYhpTlaqwZVtR8NV7+4UKkjqpcAoFqWFQh62s7Cl+H2fjBSpqfZUJcsIk4N6wiKYd4je2U/lankenQ99PZfB4jY3I5rSV2DSBVkSFsURIjYErOs0tFTQosMTAoxk//0RoKUqiYY8Bh0aaUEb0rQl3/XaVe4bXTugEjHSw==:",
        RSA_PSS_KEY,
        "example.com",
    )
    .unwrap();
}

#[test]
fn rfc9421_b23_full_coverage_rsa_pss_sha512() {
    let input = r#"sig-b23=("date" "@method" "@path" "@query" "@authority" "content-type" "content-digest" "content-length");created=1618884473;keyid="test-key-rsa-pss""#;
    let sig = "sig-b23=:bbN8oArOxYoyylQQUU6QYwrTuaxLwjAC9fbY2F6SVWvh0yBiMIRGOnMYwZ/5MR6fb0Kh1rIRASVxFkeGt683+qRpRRU5p2voTp768ZrCUb38K0fUxN0O0iC59DzYx8DFll5GmydPxSmme9v6ULbMFkl+V5B1TP/yPViV7KsLNmvKiLJH1pFkh/aYA2HXXZzNBXmIkoQoLd7YfW91kE9o/CCoC1xMy7JA1ipwvKvfrs65ldmlu9bpG6A9BmzhuzF8Eim5f8ui9eH8LZH896+QIF61ka39VBrohr9iyMUJpvRX2Zbhl5ZJzSRxpJyoEZAFL2FUo5fTIztsDZKEgM4cUA==:";
    rfc9421(input, sig, RSA_PSS_KEY, "example.com").unwrap();
    // Another authority is another request.
    assert_eq!(
        rfc9421(input, sig, RSA_PSS_KEY, "example.org"),
        Err(CoreError::BadSignature)
    );
}

#[test]
fn rfc9421_b26_ed25519() {
    rfc9421(
        r#"sig-b26=("date" "@method" "@path" "@authority" "content-type" "content-length");created=1618884473;keyid="test-key-ed25519""#,
        "sig-b26=:wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw==:",
        ED25519_KEY,
        "example.com",
    )
    .unwrap();
}

#[test]
fn rfc9421_section_4_3_proxy_rsa_v1_5_sha256() {
    // The proxy's signature of RFC 9421 §4.3, made at origin.host.internal.example.
    rfc9421(
        r#"proxy_sig=("@method" "@authority" "@path" "content-digest" "content-type" "content-length" "forwarded");created=1618884480;keyid="test-key-rsa";alg="rsa-v1_5-sha256";expires=1618884540"#,
        "proxy_sig=:S6ZzPXSdAMOPjN/6KXfXWNO/f7V6cHm7BXYUh3YD/fRad4BCaRZxP+JH+8XY1I6+8Cy+CM5g92iHgxtRPz+MjniOaYmdkDcnL9cCpXJleXsOckpURl49GwiyUpZ10KHgOEe11sx3G2gxI8S0jnxQB+Pu68U9vVcasqOWAEObtNKKZd8tSFu7LB5YAv0RAGhB8tmpv7sFnIm9y+7X5kXQfi8NMaZaA8i2ZHwpBdg7a6CMfwnnrtflzvZdXAsD3LH2TwevU+/PBPv0B6NMNk93wUs/vfJvye+YuI87HU38lZHowtznbLVdp770I6VHR6WfgS9ddzirrswsE1w5o0LV/g==:",
        RSA_KEY,
        "origin.host.internal.example",
    )
    .unwrap();
}

#[test]
fn rfc9421_wrong_key_type_for_alg_is_refused() {
    let r = rfc9421(
        r#"sig1=("@method");created=1618884473;keyid="k";alg="ed25519""#,
        "sig1=:AAAA:",
        RSA_KEY,
        "example.com",
    );
    assert!(matches!(r, Err(CoreError::MalformedSignature(_))), "{r:?}");
}
