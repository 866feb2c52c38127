//! The outbound HTTP client: one pooled keep-alive client per process, with
//! the SSRF guard (docs/ARCHITECTURE.md, "Trust boundaries") on every request (refuse loopback, private,
//! link-local and other non-global addresses unless
//! `STAMPEDE_ALLOW_PRIVATE_NETWORKS`, checked on the URL's literal address and
//! again on every address DNS returns, so a name cannot rebind to an internal
//! one), time limits, and a cap on the response body read.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::Url;

use crate::{Config, Error, Result};

/// Largest response body stampede reads from a remote server (inbox replies
/// are discarded; actor documents are small).
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Whether `ip` is an address a federation request may reach: public
/// unicast only.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x2002 {
                // 6to4: the relay reaches the IPv4 address in bits 16..48.
                let v4 =
                    Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
                return is_public_v4(v4);
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || s[..6] == [0; 6] // ::/96, IPv4-compatible (deprecated): any v4 behind it
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated, still routed inside)
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x2001 && s[1] == 0) // Teredo: tunnels to an embedded v4
                || (s[0] == 0x0100 && s[1..4] == [0; 3]) // discard-only 100::/64
                || (s[0] == 0x0064 && s[1] == 0xff9b)) // NAT64 (well-known and local-use) can reach private v4
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared 100.64/10
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18/15
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF 192.0.0/24
        || o[0] >= 240) // reserved
}

/// Resolver that drops non-public addresses (and refuses names that resolve
/// only to such addresses).
struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(Box::new(Error::Refused(format!(
                    "{host} resolves to no public address"
                )))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// A response with its body read up to the cap.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After`, when present.
    pub retry_after: Option<String>,
    /// `Content-Type`, when present.
    pub content_type: Option<String>,
    /// `Accept-Signature` (RFC 9421 §5.1) of a 4xx answer, when present.
    pub accept_signature: Option<String>,
    /// Body, at most the cap.
    pub body: Bytes,
    /// Whether the body was read to its end: false when it was cut at the
    /// cap or the connection failed midway (a document read so is not the
    /// document, and must not be judged).
    pub complete: bool,
}

impl Response {
    /// Whether the answer is an ActivityStreams document by its
    /// `Content-Type` (`application/activity+json`, or
    /// `application/ld+json` with any profile), as Mastodon requires of
    /// fetched objects: a file a user uploaded to the origin is not one.
    pub fn is_activity_json(&self) -> bool {
        self.content_type.as_deref().is_some_and(|ct| {
            let media = ct.split(';').next().unwrap_or("").trim();
            media.eq_ignore_ascii_case("application/activity+json")
                || media.eq_ignore_ascii_case("application/ld+json")
        })
    }
}

/// The guarded outbound client.
#[derive(Clone)]
pub struct OutboundClient {
    client: reqwest::Client,
    allow_private: bool,
}

impl OutboundClient {
    /// Builds the client: pooled keep-alive connections, connect and total
    /// time limits, no redirects (a redirect would skip the signature's host).
    pub fn new(cfg: &Config) -> Result<Self> {
        let ua = format!("stampede/{} (+{})", env!("CARGO_PKG_VERSION"), cfg.base());
        let mut b = reqwest::Client::builder()
            .user_agent(ua)
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(cfg.delivery_timeout)
            .timeout(cfg.delivery_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            .tcp_keepalive(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            // Never a proxy from the environment (`HTTPS_PROXY`, …): the
            // proxy would resolve names itself, past the guard's resolver.
            .no_proxy();
        if !cfg.allow_private_networks {
            b = b.dns_resolver(Arc::new(GuardedResolver));
        }
        let client = b.build().map_err(|e| Error::Http(e.to_string()))?;
        Ok(Self {
            client,
            allow_private: cfg.allow_private_networks,
        })
    }

    /// Refuses a URL the guard forbids before any connection: a scheme other
    /// than https (http only with private networks allowed) or a literal
    /// non-public address.
    pub fn check_url(&self, url: &Url) -> Result<()> {
        match url.scheme() {
            "https" => {}
            "http" if self.allow_private => {}
            s => return Err(Error::Refused(format!("scheme {s} not allowed"))),
        }
        let host = url
            .host()
            .ok_or_else(|| Error::Refused("url has no host".into()))?;
        if self.allow_private {
            return Ok(());
        }
        let ip = match host {
            url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
            url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
            url::Host::Domain(d)
                if d.eq_ignore_ascii_case("localhost") || d.ends_with(".localhost") =>
            {
                return Err(Error::Refused(format!("{d} is a loopback name")))
            }
            url::Host::Domain(_) => None,
        };
        match ip {
            Some(ip) if !is_public(ip) => {
                Err(Error::Refused(format!("{ip} is not a public address")))
            }
            _ => Ok(()),
        }
    }

    /// Sends a request built on the underlying client, after the guard,
    /// and reads at most `max_body` bytes of the answer.
    pub async fn send(
        &self,
        req: reqwest::RequestBuilder,
        url: &Url,
        max_body: usize,
    ) -> Result<Response> {
        self.check_url(url)?;
        let mut resp = req.send().await.map_err(classify)?;
        let status = resp.status().as_u16();
        let header = |name: reqwest::header::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let retry_after = header(reqwest::header::RETRY_AFTER);
        let content_type = header(reqwest::header::CONTENT_TYPE);
        // Read only from a refusal: what a host asks signatures to cover.
        let accept_signature = if (400..500).contains(&status) {
            header(reqwest::header::HeaderName::from_static("accept-signature"))
        } else {
            None
        };
        let mut body = BytesMut::new();
        let mut complete = false;
        while body.len() < max_body {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    let room = max_body - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) => {
                    complete = true;
                    break;
                }
                Err(_) => break,
            }
        }
        Ok(Response {
            status,
            retry_after,
            content_type,
            accept_signature,
            body: body.freeze(),
            complete,
        })
    }

    /// The underlying client, to build requests.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

/// Whether an I/O error means this side ran out of something (descriptors,
/// local ports, buffers, memory) rather than the remote failing.
fn local_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

fn classify(e: reqwest::Error) -> Error {
    let mut source: Option<&dyn std::error::Error> = Some(&e);
    while let Some(s) = source {
        if let Some(Error::Refused(r)) = s.downcast_ref::<Error>() {
            return Error::Refused(r.clone());
        }
        let text = s.to_string();
        if text.contains("resolves to no public address") {
            return Error::Refused(text);
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if local_exhaustion(io) {
                return Error::Exhausted(format!("{e}: {io}"));
            }
        }
        source = s.source();
    }
    if e.is_timeout() {
        Error::Http(format!("timed out: {e}"))
    } else if e.is_connect() {
        Error::Http(format!("connection failed: {e}"))
    } else {
        Error::Http(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_ports_or_memory_is_local() {
        for code in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRNOTAVAIL,
        ] {
            assert!(
                local_exhaustion(&std::io::Error::from_raw_os_error(code)),
                "{code}"
            );
        }
        for code in [
            libc::ECONNREFUSED,
            libc::ECONNRESET,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
        ] {
            assert!(
                !local_exhaustion(&std::io::Error::from_raw_os_error(code)),
                "{code}"
            );
        }
        assert!(!local_exhaustion(&std::io::Error::other("no")));
    }

    #[test]
    fn private_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
            "::127.0.0.1",
            "::10.0.0.1",
            "fec0::1",
            "2002:7f00:1::1",
            "2002:a00:1::1",
            "2002:c0a8:101::1",
            "2001:0:4136:e378::1",
            "64:ff9b:1::a00:1",
            "100::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "2606:4700::1111",
            "1.1.1.1",
            "2002:5db8:d822::1",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn guard_refuses_literal_private_and_plain_http() {
        let strict = OutboundClient::new(&Config::from_lookup(|_| None).unwrap()).unwrap();
        for u in [
            "http://example.com/inbox",
            "https://127.0.0.1/inbox",
            "https://[::1]/inbox",
            "https://localhost/inbox",
            "https://10.0.0.1/inbox",
        ] {
            assert!(
                matches!(
                    strict.check_url(&Url::parse(u).unwrap()),
                    Err(Error::Refused(_))
                ),
                "{u}"
            );
        }
        assert!(strict
            .check_url(&Url::parse("https://example.com/inbox").unwrap())
            .is_ok());
        let open = OutboundClient::new(
            &Config::from_lookup(|k| {
                (k == "STAMPEDE_ALLOW_PRIVATE_NETWORKS").then(|| "true".into())
            })
            .unwrap(),
        )
        .unwrap();
        assert!(open
            .check_url(&Url::parse("http://127.0.0.1:9/inbox").unwrap())
            .is_ok());
    }

    #[tokio::test]
    async fn resolver_refuses_names_of_private_addresses() {
        use std::str::FromStr;
        // `localhost` resolves to loopback only: the resolver refuses it.
        let r = GuardedResolver
            .resolve(Name::from_str("localhost").unwrap())
            .await;
        let e = r.err().unwrap();
        assert!(e.to_string().contains("no public address"), "{e}");
    }
}
