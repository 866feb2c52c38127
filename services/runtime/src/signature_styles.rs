//! Which signature style each remote host takes (README, "Outbound
//! contract"). With `STAMPEDE_SIGNATURE_STYLE=auto`, a host's first request
//! is signed in the style remembered for it, else draft-cavage; on a 400 or
//! 401 the caller tries the other style once at once and tells
//! [`StyleMemory::learned`] which one worked. The memory is shared in the
//! cache (Redis, or process memory for `stampede up`) for 30 days, behind a
//! bounded in-process LRU, so a warm delivery costs no cache round trip.
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use stampede_backends::cache::Cache;

use crate::config::SignatureStyle;

/// How long the cache remembers a host's style.
pub const REMEMBERED: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long this process believes what it read (or did not find) in the
/// cache before reading it again: another process may have learnt better.
const LOCAL_TTL: Duration = Duration::from_secs(600);
/// Hosts held in the in-process LRU.
const LOCAL_HOSTS: usize = 16_384;

/// The cache key of a host's remembered style (named here, not in
/// `federation::cache_keys`, because the process holds the memory; listed
/// there too).
pub fn cache_key(host: &str) -> String {
    format!("sigstyle:{host}")
}

/// One of the two signature styles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// draft-cavage-http-signatures-12.
    Cavage,
    /// RFC 9421.
    Rfc9421,
}

impl Style {
    /// The `Accept-Signature` a retry in this style honours: the refused
    /// reply's, for RFC 9421 (cavage has nothing to take from it).
    pub fn accept_from(self, reply: Option<&str>) -> Option<Arc<str>> {
        match self {
            Style::Rfc9421 => reply.map(Arc::from),
            Style::Cavage => None,
        }
    }

    /// The other style.
    pub fn other(self) -> Self {
        match self {
            Style::Cavage => Style::Rfc9421,
            Style::Rfc9421 => Style::Cavage,
        }
    }

    /// `cavage` or `rfc9421`.
    pub fn as_str(self) -> &'static str {
        match self {
            Style::Cavage => "cavage",
            Style::Rfc9421 => "rfc9421",
        }
    }
}

/// How to sign the first request to a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The style.
    pub style: Style,
    /// For RFC 9421: the `Accept-Signature` the host asked with, when it
    /// did (the signer covers what it can of it).
    pub accept_signature: Option<Arc<str>>,
    /// Whether the style may change on a 400 or 401 (`auto`).
    pub may_switch: bool,
}

#[derive(Clone)]
struct Local {
    style: Style,
    accept_signature: Option<Arc<str>>,
    until: Instant,
}

/// The per-host memory of signature styles. One per process.
pub struct StyleMemory {
    setting: SignatureStyle,
    cache: Arc<dyn Cache>,
    local: Mutex<LruCache<String, Local>>,
}

impl StyleMemory {
    /// A memory over `cache` for the configured `setting`.
    pub fn new(setting: SignatureStyle, cache: Arc<dyn Cache>) -> Self {
        let cap = NonZeroUsize::new(LOCAL_HOSTS).unwrap_or(NonZeroUsize::MIN);
        Self {
            setting,
            cache,
            local: Mutex::new(LruCache::new(cap)),
        }
    }

    /// The configured setting.
    pub fn setting(&self) -> SignatureStyle {
        self.setting
    }

    /// How to sign the first request to `host`: the fixed style, or (auto)
    /// the one remembered for it, else cavage. Reads the cache only when
    /// this process has not looked for `host` in the last minutes.
    pub async fn choose(&self, host: &str) -> Choice {
        let fixed = |style| Choice {
            style,
            accept_signature: None,
            may_switch: false,
        };
        match self.setting {
            SignatureStyle::Cavage => return fixed(Style::Cavage),
            SignatureStyle::Rfc9421 => return fixed(Style::Rfc9421),
            SignatureStyle::Auto => {}
        }
        let now = Instant::now();
        if let Ok(mut l) = self.local.lock() {
            if let Some(e) = l.get(host) {
                if e.until > now {
                    return Choice {
                        style: e.style,
                        accept_signature: e.accept_signature.clone(),
                        may_switch: true,
                    };
                }
            }
        }
        let (style, accept_signature) = match self.cache.get(&cache_key(host)).await {
            Ok(Some(raw)) => decode(&raw),
            Ok(None) => (Style::Cavage, None),
            Err(e) => {
                tracing::warn!(inbox_host = %host, error = %e, "reading the host's signature style failed; signing cavage");
                (Style::Cavage, None)
            }
        };
        self.hold(host, style, accept_signature.clone());
        Choice {
            style,
            accept_signature,
            may_switch: true,
        }
    }

    /// Remembers that `host` took `style` (with the `Accept-Signature` it
    /// asked for, if any): in this process at once, in the cache for 30
    /// days. Best effort: a cache away costs a second knock later.
    pub async fn learned(&self, host: &str, style: Style, accept_signature: Option<&str>) {
        let accept: Option<Arc<str>> = accept_signature
            .filter(|a| {
                style == Style::Rfc9421 && a.len() <= stampede_core::rfc9421::MAX_ACCEPT_SIGNATURE
            })
            .map(Arc::from);
        self.hold(host, style, accept.clone());
        let mut value = style.as_str().as_bytes().to_vec();
        if let Some(a) = &accept {
            value.push(b'\n');
            value.extend_from_slice(a.as_bytes());
        }
        tracing::info!(inbox_host = %host, style = style.as_str(), "signature style learnt for the host");
        if let Err(e) = self.cache.set(&cache_key(host), &value, REMEMBERED).await {
            tracing::warn!(inbox_host = %host, error = %e, "remembering the host's signature style failed");
        }
    }

    fn hold(&self, host: &str, style: Style, accept_signature: Option<Arc<str>>) {
        if let Ok(mut l) = self.local.lock() {
            l.put(
                host.to_string(),
                Local {
                    style,
                    accept_signature,
                    until: Instant::now() + LOCAL_TTL,
                },
            );
        }
    }
}

/// `cavage`, `rfc9421`, or `rfc9421\n{Accept-Signature}`; anything else is
/// cavage (the default).
fn decode(raw: &[u8]) -> (Style, Option<Arc<str>>) {
    let text = std::str::from_utf8(raw).unwrap_or("");
    let (style, rest) = text.split_once('\n').unwrap_or((text, ""));
    match style {
        "rfc9421" => (Style::Rfc9421, (!rest.is_empty()).then(|| Arc::from(rest))),
        _ => (Style::Cavage, None),
    }
}

/// Whether a status says the host may want the other style: 400 or 401.
pub fn refused_signature(status: u16) -> bool {
    matches!(status, 400 | 401)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stampede_backends::cache::memory::MemoryCache;

    /// The in-memory cache (`stampede up`'s).
    fn memory() -> Arc<dyn Cache> {
        Arc::new(MemoryCache::new())
    }

    #[tokio::test]
    async fn auto_starts_cavage_remembers_what_worked_and_reads_the_cache_once() {
        let cache = memory();
        let m = StyleMemory::new(SignatureStyle::Auto, cache.clone());
        let c = m.choose("a.example").await;
        assert_eq!((c.style, c.may_switch), (Style::Cavage, true));
        m.learned(
            "a.example",
            Style::Rfc9421,
            Some(r#"sig1=("@method");nonce"#),
        )
        .await;
        let c = m.choose("a.example").await;
        assert_eq!(c.style, Style::Rfc9421);
        assert_eq!(
            c.accept_signature.as_deref(),
            Some(r#"sig1=("@method");nonce"#)
        );
        // Another process (a fresh memory over the same cache) reads it.
        let other = StyleMemory::new(SignatureStyle::Auto, cache.clone());
        assert_eq!(other.choose("a.example").await.style, Style::Rfc9421);
        // Once read, the cache is not asked again: change it behind the
        // memory's back and the process still holds what it read.
        cache
            .set(&cache_key("a.example"), b"cavage", REMEMBERED)
            .await
            .unwrap();
        assert_eq!(other.choose("a.example").await.style, Style::Rfc9421);
        // A host never seen is cavage, and so remembered locally.
        cache
            .set(&cache_key("b.example"), b"garbage", REMEMBERED)
            .await
            .unwrap();
        assert_eq!(other.choose("b.example").await.style, Style::Cavage);
        m.learned("a.example", Style::Cavage, Some("ignored for cavage"))
            .await;
        let c = m.choose("a.example").await;
        assert_eq!((c.style, c.accept_signature), (Style::Cavage, None));
    }

    #[tokio::test]
    async fn fixed_styles_never_switch_nor_read() {
        for (setting, style) in [
            (SignatureStyle::Cavage, Style::Cavage),
            (SignatureStyle::Rfc9421, Style::Rfc9421),
        ] {
            let cache = memory();
            cache
                .set(
                    &cache_key("a.example"),
                    style.other().as_str().as_bytes(),
                    REMEMBERED,
                )
                .await
                .unwrap();
            let m = StyleMemory::new(setting, cache);
            let c = m.choose("a.example").await;
            assert_eq!((c.style, c.may_switch), (style, false));
        }
    }

    #[test]
    fn only_400_and_401_switch() {
        assert!(refused_signature(401) && refused_signature(400));
        for s in [200, 202, 403, 404, 410, 429, 500] {
            assert!(!refused_signature(s), "{s}");
        }
    }
}
