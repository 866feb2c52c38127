//! The sink as a sending server: signed POSTs and GETs to stampede, well
//! formed or hostile on request (unsigned, signed with another key, for
//! another host, tampered, from another address).
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use stampede_core::digest::digest_header;
use stampede_core::signature::{sign_request, POST_HEADERS};

use crate::server::SinkKey;
use crate::{Sink, SinkError};

/// How [`Sink::send`] signs (or mis-signs) a request.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Send no signature at all.
    pub unsigned: bool,
    /// Sign with a key that no document publishes (one per sink).
    pub wrong_key: bool,
    /// Sign with this `keyId` instead of the actor's `#main-key`.
    pub key_id: Option<String>,
    /// Change the body after signing.
    pub tamper_body: bool,
    /// Change the signed `Date` after signing (by one second).
    pub tamper_date: bool,
    /// Date to send instead of now.
    pub date: Option<SystemTime>,
    /// Send this body instead of the activity's JSON.
    pub raw_body: Option<Vec<u8>>,
    /// Sign for, and send, this `Host` instead of the URL's (a request
    /// signed for another server, replayed).
    pub host: Option<String>,
    /// Connect from this local address (127.0.0.0/8 is all loopback on
    /// Linux): a client of its own address.
    pub source: Option<std::net::IpAddr>,
    /// More headers, sent unsigned (`X-Forwarded-For`, say).
    pub headers: Vec<(String, String)>,
}

/// What a remote server answered to [`Sink::send`].
#[derive(Debug, Clone)]
pub struct SendResult {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After`, when given.
    pub retry_after: Option<String>,
}

impl Sink {
    /// The signing key of server `from`, or the forger's for `wrong_key`.
    async fn signing_key(
        &self,
        from: usize,
        opts: &SendOptions,
    ) -> Result<Arc<SinkKey>, SinkError> {
        if opts.wrong_key {
            return self
                .forged
                .get_or_try_init(|| async {
                    tokio::task::spawn_blocking(SinkKey::generate)
                        .await
                        .map_err(|e| SinkError::Io(std::io::Error::other(e)))?
                        .map(Arc::new)
                })
                .await
                .cloned();
        }
        self.server(from)?
            .state
            .key
            .lock()
            .map(|k| k.clone())
            .map_err(|_| SinkError::NoServer(from))
    }

    /// The headers of a `method` request of `url` (with `body`, which may
    /// be empty) by actor `actor` of server `from`, signed draft-cavage
    /// style as `opts` asks (its `key_id`, `wrong_key`, `host`); with a body,
    /// its `digest` and `content-type` too.
    pub async fn signed_request_headers(
        &self,
        from: usize,
        actor: &str,
        method: &str,
        url: &str,
        body: &[u8],
        opts: &SendOptions,
    ) -> Result<Vec<(String, String)>, SinkError> {
        let u = url::Url::parse(url).map_err(|e| SinkError::Io(std::io::Error::other(e)))?;
        let host = opts
            .host
            .clone()
            .unwrap_or_else(|| stampede_core::targets::inbox_host(url).unwrap_or_default());
        let date = httpdate::fmt_http_date(SystemTime::now());
        let digest = digest_header(body);
        let path = match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_string(),
        };
        let with_body = !body.is_empty();
        let covered: &[&str] = if with_body {
            POST_HEADERS
        } else {
            stampede_core::signature::GET_HEADERS
        };
        let sig = self
            .signature(
                from, actor, &host, method, &path, &date, &digest, covered, opts,
            )
            .await?;
        let mut headers = vec![
            ("host".to_string(), host),
            ("date".to_string(), date),
            ("signature".to_string(), sig),
        ];
        if with_body {
            headers.push(("digest".into(), digest));
            headers.push(("content-type".into(), "application/activity+json".into()));
        }
        Ok(headers)
    }

    /// The `Signature` header actor `actor` of server `from` puts on a request.
    #[allow(clippy::too_many_arguments)]
    async fn signature(
        &self,
        from: usize,
        actor: &str,
        host: &str,
        method: &str,
        path: &str,
        date: &str,
        digest: &str,
        covered: &[&str],
        opts: &SendOptions,
    ) -> Result<String, SinkError> {
        let s = &self.server(from)?.state;
        let key_id = opts
            .key_id
            .clone()
            .unwrap_or_else(|| format!("{}/users/{actor}#main-key", s.base));
        let key = self.signing_key(from, opts).await?;
        Ok(sign_request(
            &key.pair,
            &key_id,
            method,
            path,
            covered,
            |h| match h {
                "host" => Some(host),
                "date" => Some(date),
                "digest" => Some(digest),
                _ => None,
            },
        )?)
    }

    /// The headers of a POST of `body` by actor `actor` of server `from` to
    /// `url`, signed as [`Sink::send`] signs them (for `Verify`, say).
    pub async fn signed_headers(
        &self,
        from: usize,
        actor: &str,
        url: &str,
        body: &[u8],
    ) -> Result<Vec<(String, String)>, SinkError> {
        let u = url::Url::parse(url).map_err(|e| SinkError::Io(std::io::Error::other(e)))?;
        let host = stampede_core::targets::inbox_host(url).unwrap_or_default();
        let date = httpdate::fmt_http_date(SystemTime::now());
        let digest = digest_header(body);
        let sig = self
            .signature(
                from,
                actor,
                &host,
                "POST",
                u.path(),
                &date,
                &digest,
                POST_HEADERS,
                &SendOptions::default(),
            )
            .await?;
        Ok(vec![
            ("host".into(), host),
            ("date".into(), date),
            ("digest".into(), digest),
            ("content-type".into(), "application/activity+json".into()),
            ("signature".into(), sig),
        ])
    }

    /// The headers of a POST of `body` to `url` signed with RFC 9421 by actor
    /// `actor` of server `from`: `rsa-v1_5-sha256` over `@method`,
    /// `@authority`, `@path`, `content-digest` and `date`.
    pub fn signed_headers_rfc9421(
        &self,
        from: usize,
        actor: &str,
        url: &str,
        body: &[u8],
    ) -> Result<Vec<(String, String)>, SinkError> {
        use base64::Engine;
        let s = &self.server(from)?.state;
        let u = url::Url::parse(url).map_err(|e| SinkError::Io(std::io::Error::other(e)))?;
        let host = stampede_core::targets::inbox_host(url).unwrap_or_default();
        let date = httpdate::fmt_http_date(SystemTime::now());
        let digest = stampede_core::digest::content_digest_header(body);
        let created = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let input = format!(
            "sig1=(\"@method\" \"@authority\" \"@path\" \"content-digest\" \"date\");created={created};keyid=\"{}/users/{actor}#main-key\";alg=\"rsa-v1_5-sha256\"",
            s.base
        );
        // The verifier's own signature base, then the signature over it.
        let placeholder = "sig1=:AAAA:".to_string();
        let headers = [
            ("host", host.as_str()),
            ("date", date.as_str()),
            ("content-digest", digest.as_str()),
            ("signature-input", input.as_str()),
            ("signature", placeholder.as_str()),
        ];
        let req = stampede_core::verify::HttpRequest {
            method: "POST",
            scheme: u.scheme(),
            path_and_query: u.path(),
            headers: &headers,
            body,
        };
        let signed = stampede_core::verify::parse(&req)?;
        let key = s
            .key
            .lock()
            .map(|k| k.clone())
            .map_err(|_| SinkError::NoServer(from))?;
        let sig = stampede_core::signature::rsa_sha256_sign(&key.pair, signed.base.as_bytes())?;
        Ok(vec![
            ("host".into(), host),
            ("date".into(), date),
            ("content-digest".into(), digest),
            ("content-type".into(), "application/activity+json".into()),
            ("signature-input".into(), input),
            (
                "signature".into(),
                format!(
                    "sig1=:{}:",
                    base64::engine::general_purpose::STANDARD.encode(sig)
                ),
            ),
        ])
    }

    /// POSTs `activity` as actor `actor` of server `from` to `inbox` (a URL),
    /// signed draft-cavage style as Mastodon signs, or mis-signed as `opts` asks.
    pub async fn send(
        &self,
        from: usize,
        actor: &str,
        inbox: &str,
        activity: &Value,
        opts: SendOptions,
    ) -> Result<SendResult, SinkError> {
        let s = &self.server(from)?.state;
        let url = url::Url::parse(inbox).map_err(|e| SinkError::Io(std::io::Error::other(e)))?;
        let host = opts.host.clone().unwrap_or_else(|| match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        });
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let body = opts
            .raw_body
            .clone()
            .unwrap_or_else(|| activity.to_string().into_bytes());
        let date_at = opts.date.unwrap_or_else(SystemTime::now);
        let date = httpdate::fmt_http_date(date_at);
        let digest = digest_header(&body);
        let client = match opts.source {
            None => s.client.clone(),
            Some(ip) => reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .local_address(ip)
                .build()
                .map_err(|e| SinkError::Io(std::io::Error::other(e)))?,
        };
        let mut req = client
            .post(url.clone())
            .header("content-type", "application/activity+json");
        if opts.host.is_some() {
            req = req.header("host", host.as_str());
        }
        for (k, v) in &opts.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        if !opts.unsigned {
            let sig = self
                .signature(
                    from,
                    actor,
                    &host,
                    "POST",
                    &path,
                    &date,
                    &digest,
                    POST_HEADERS,
                    &opts,
                )
                .await?;
            req = req.header("signature", sig);
        }
        let date = if opts.tamper_date {
            httpdate::fmt_http_date(date_at + Duration::from_secs(1))
        } else {
            date
        };
        let mut body = body;
        if opts.tamper_body {
            if let Some(b) = body.iter_mut().rev().find(|b| b.is_ascii_alphanumeric()) {
                *b = if *b == b'a' { b'b' } else { b'a' };
            }
        }
        let resp = req
            .header("date", date)
            .header("digest", digest)
            .body(body)
            .send()
            .await
            .map_err(|e| SinkError::Io(std::io::Error::other(e)))?;
        Ok(SendResult {
            status: resp.status().as_u16(),
            retry_after: resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        })
    }

    /// Actor `actor` of server `from` follows the local actor `target` (its
    /// id) with a signed Follow to the target's inbox. The Follow's id is
    /// `{actor id}/follows/{target}`, so following twice is one follow.
    pub async fn follow(
        &self,
        from: usize,
        actor: &str,
        target: &str,
    ) -> Result<SendResult, SinkError> {
        let me = self.actor(from, actor).ok_or(SinkError::NoServer(from))?;
        let follow = serde_json::json!({
            "@context": "https://www.w3.org/ns/activitystreams",
            "id": format!("{}/follows/{}", me.id, target.rsplit('/').next().unwrap_or(target)),
            "type": "Follow",
            "actor": me.id,
            "object": target,
        });
        self.send(
            from,
            actor,
            &format!("{target}/inbox"),
            &follow,
            SendOptions::default(),
        )
        .await
    }
}
