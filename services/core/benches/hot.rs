//! The per-message and per-delivery hot functions:
//! `cargo bench -p stampede-core --bench hot`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use stampede_core::activity::{parse_json, prepare_outbound, public_note};
use stampede_core::digest::{digest_header, verify_digest_header};
use stampede_core::keys::{generate_rsa_2048, load_private_key, VerifyingKey};
use stampede_core::signature::{parse_signature_header, sign_request, POST_HEADERS};
use stampede_core::targets::{group_by_shared_inbox, Recipient};
use stampede_core::verify::{self, HttpRequest};
use std::hint::black_box;

const DATE: &str = "Fri, 27 Nov 2026 12:00:00 GMT";
const HOST: &str = "remote.example";
const PATH: &str = "/inbox";

fn body() -> Vec<u8> {
    public_note("https://social.example/users/alice", &"word ".repeat(100))
        .to_string()
        .into_bytes()
}

fn crypto(c: &mut Criterion) {
    let key = generate_rsa_2048().unwrap();
    let pair = load_private_key(&key.private_pkcs8_der).unwrap();
    let verifying = VerifyingKey::from_pem(&key.public_pem).unwrap();
    let body = body();
    let digest = digest_header(&body);
    let lookup = |h: &str| match h {
        "host" => Some(HOST),
        "date" => Some(DATE),
        "digest" => Some(digest.as_str()),
        _ => None,
    };
    let sig = sign_request(
        &pair,
        "https://social.example/users/alice#main-key",
        "POST",
        PATH,
        POST_HEADERS,
        lookup,
    )
    .unwrap();

    let mut g = c.benchmark_group("signature");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign rsa-sha256 (cavage, 2048)", |b| {
        b.iter(|| {
            sign_request(
                &pair,
                "https://social.example/users/alice#main-key",
                "POST",
                PATH,
                POST_HEADERS,
                lookup,
            )
            .unwrap()
        })
    });
    let headers = [
        ("host", HOST),
        ("date", DATE),
        ("digest", digest.as_str()),
        ("content-type", "application/activity+json"),
        ("signature", sig.as_str()),
    ];
    let req = HttpRequest {
        method: "POST",
        scheme: "https",
        path_and_query: PATH,
        headers: &headers,
        body: &body,
    };
    g.bench_function("parse Signature header", |b| {
        b.iter(|| parse_signature_header(black_box(&sig)).unwrap())
    });
    g.bench_function("parse + digest + verify (cavage, 2048)", |b| {
        b.iter(|| {
            let s = verify::parse(black_box(&req)).unwrap();
            verify::check_coverage_and_digest(&req, &s).unwrap();
            verify::verify_signature(&s, &verifying).unwrap();
        })
    });
    g.finish();

    let mut g = c.benchmark_group("digest");
    for size in [1024usize, 16 * 1024] {
        let b = vec![b'x'; size];
        let d = digest_header(&b);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("digest SHA-256", size), &b, |bn, b| {
            bn.iter(|| digest_header(black_box(b)))
        });
        g.bench_with_input(BenchmarkId::new("verify Digest", size), &b, |bn, b| {
            bn.iter(|| verify_digest_header(&d, black_box(b)).unwrap())
        });
    }
    g.finish();
}

fn activities(c: &mut Criterion) {
    let body = body();
    let mut g = c.benchmark_group("activity");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("parse JSON (limits checked)", |b| {
        b.iter(|| parse_json(black_box(&body)).unwrap())
    });
    g.bench_function("prepare outbound Create{Note}", |b| {
        b.iter(|| {
            prepare_outbound(
                black_box(&body),
                "https://social.example/users/alice",
                |k| format!("https://social.example/{k}/1"),
            )
            .unwrap()
        })
    });
    g.finish();

    // 10,000 followers on 1,000 servers, 9 of 10 with a shared inbox.
    let inboxes: Vec<(String, Option<String>)> = (0..10_000)
        .map(|i| {
            let host = i % 1000;
            (
                format!("https://h{host}.example/users/u{i}/inbox"),
                (host % 10 != 0).then(|| format!("https://h{host}.example/inbox")),
            )
        })
        .collect();
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(inboxes.len() as u64));
    g.bench_function("group 10,000 recipients by shared inbox", |b| {
        b.iter(|| {
            group_by_shared_inbox(inboxes.iter().map(|(i, s)| Recipient {
                inbox: i,
                shared_inbox: s.as_deref(),
            }))
            .len()
        })
    });
    g.finish();
}

criterion_group!(benches, crypto, activities);
criterion_main!(benches);
