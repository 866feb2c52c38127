//! Domain policies at runtime (docs/ARCHITECTURE.md, "Domain policy"): the
//! rules live in the store (`stampede domain`, `AdminService.SetDomainPolicy`),
//! every process keeps a snapshot in memory and reloads it when the version
//! in the cache moves, which it looks at every second, so a change is seen
//! everywhere within [`REFRESH`] plus a store read. The most specific rule
//! wins: one for `a.example` beats one for `example`.
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use stampede_backends::store::{DomainPolicy, PolicyKind};
use stampede_core::targets::normalize_domain;
use tokio_util::sync::CancellationToken;

use crate::{Backends, Config, Result};

/// The cache key whose value moves on every change of a domain policy.
pub const VERSION_KEY: &str = "policy:version";

/// How often a process looks at the version.
pub const REFRESH: Duration = Duration::from_secs(1);

/// A full reload however the version looks (a cache flushed or restarted
/// can go back to a value already seen).
const RELOAD: Duration = Duration::from_secs(30);

/// How long the version key lives: refreshed by every change.
const VERSION_TTL: Duration = Duration::from_secs(400 * 86400);

/// What is done with a remote host's traffic, both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Federates.
    Federate,
    /// Federates; its inbound activities are marked `silenced`.
    Silenced,
    /// Nothing in or out (suspended, or not allowed in allow-list mode).
    Blocked,
}

/// One immutable set of rules.
#[derive(Debug, Default)]
pub struct PolicySet {
    rules: HashMap<String, PolicyKind>,
    allowlist: bool,
}

impl PolicySet {
    /// Rules by normalised domain; `allowlist` as `STAMPEDE_FEDERATION_MODE`.
    pub fn new(rules: impl IntoIterator<Item = (String, PolicyKind)>, allowlist: bool) -> Self {
        Self {
            rules: rules.into_iter().collect(),
            allowlist,
        }
    }

    /// The most specific rule covering `domain` (normalised, no port): its
    /// own, else its parent's, and so on. An IP address has only its own.
    pub fn rule_for(&self, domain: &str) -> Option<(&str, PolicyKind)> {
        if self.rules.is_empty() {
            return None;
        }
        let literal = domain.starts_with('[') || domain.parse::<std::net::IpAddr>().is_ok();
        let mut rest = domain;
        loop {
            if let Some((d, k)) = self.rules.get_key_value(rest) {
                return Some((d.as_str(), *k));
            }
            if literal {
                return None;
            }
            match rest.split_once('.') {
                Some((_, parent)) if !parent.is_empty() => rest = parent,
                _ => return None,
            }
        }
    }

    /// The decision for `host` (any case, with a port, a trailing dot, or
    /// in Unicode).
    pub fn decide(&self, host: &str) -> Decision {
        if self.rules.is_empty() && !self.allowlist {
            return Decision::Federate;
        }
        let domain = normalize_domain(host);
        match self.rule_for(&domain).map(|(_, k)| k) {
            Some(PolicyKind::Suspend) => Decision::Blocked,
            Some(PolicyKind::Silence) => Decision::Silenced,
            Some(PolicyKind::Allow) => Decision::Federate,
            None if self.allowlist => Decision::Blocked,
            None => Decision::Federate,
        }
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there is no rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// The domain policies as this process sees them.
pub struct DomainPolicies {
    current: RwLock<Arc<PolicySet>>,
    seen: std::sync::Mutex<Option<Vec<u8>>>,
    allowlist: bool,
    rules: prometheus_client::metrics::gauge::Gauge,
}

impl DomainPolicies {
    /// Before the first load: `STAMPEDE_BLOCKED_DOMAINS` suspended, so a
    /// process never federates with them even for an instant.
    pub fn new(cfg: &Config) -> Self {
        let seeds = cfg
            .blocked_domains
            .iter()
            .map(|d| (d.clone(), PolicyKind::Suspend));
        Self {
            current: RwLock::new(Arc::new(PolicySet::new(seeds, cfg.allowlist))),
            seen: std::sync::Mutex::new(None),
            allowlist: cfg.allowlist,
            rules: Default::default(),
        }
    }

    /// Reports the number of rules held in `gauge`.
    pub fn counted(mut self, gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        self.rules = gauge;
        self
    }

    /// The rules now.
    pub fn snapshot(&self) -> Arc<PolicySet> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The decision for `host` now.
    pub fn decide(&self, host: &str) -> Decision {
        self.snapshot().decide(host)
    }

    /// Whether nothing goes to or comes from `host`.
    pub fn is_blocked(&self, host: &str) -> bool {
        self.decide(host) == Decision::Blocked
    }

    /// Whether the host of `url` is blocked (a URL without a host is not).
    pub fn is_blocked_url(&self, url: &str) -> bool {
        let set = self.snapshot();
        if set.is_empty() && !set.allowlist {
            return false;
        }
        url::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(|h| set.decide(h) == Decision::Blocked))
            .unwrap_or(false)
    }

    /// Seeds `STAMPEDE_BLOCKED_DOMAINS` (once per domain), then loads.
    pub async fn start(&self, cfg: &Config, b: &Backends) -> Result<()> {
        if !cfg.blocked_domains.is_empty() {
            let now = stampede_backends::clock::now_ms();
            let seeds: Vec<DomainPolicy> = cfg
                .blocked_domains
                .iter()
                .map(|d| DomainPolicy {
                    domain: d.clone(),
                    kind: PolicyKind::Suspend,
                    reason: "STAMPEDE_BLOCKED_DOMAINS".into(),
                    updated_unix_ms: now,
                })
                .collect();
            if b.store.seed_domain_policies(&seeds).await? > 0 {
                bump(b).await?;
            }
        }
        self.load(b).await
    }

    /// Reads every rule from the store.
    pub async fn load(&self, b: &Backends) -> Result<()> {
        let version = b.cache.get(VERSION_KEY).await?;
        let rules = b.store.domain_policies().await?;
        let set = PolicySet::new(
            rules.into_iter().map(|r| (r.domain, r.kind)),
            self.allowlist,
        );
        self.rules.set(set.len() as i64);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = version;
        Ok(())
    }

    /// Reloads when the version moved; true when it did.
    pub async fn refresh(&self, b: &Backends) -> Result<bool> {
        let version = b.cache.get(VERSION_KEY).await?;
        let same = *self.seen.lock().unwrap_or_else(|p| p.into_inner()) == version;
        if same {
            return Ok(false);
        }
        self.load(b).await?;
        Ok(true)
    }

    /// Follows changes until `shutdown`: the version every [`REFRESH`], a
    /// full reload every 30 s. A failure keeps the rules held and is
    /// logged once per run of failures.
    pub async fn follow(self: Arc<Self>, b: Backends, shutdown: CancellationToken) {
        let mut since_load = std::time::Instant::now();
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REFRESH) => {}
            }
            let r = if since_load.elapsed() >= RELOAD {
                since_load = std::time::Instant::now();
                self.load(&b).await.map(|_| true)
            } else {
                self.refresh(&b).await
            };
            match r {
                Ok(changed) => {
                    if changed {
                        since_load = std::time::Instant::now();
                    }
                    if failing {
                        tracing::info!("domain policies readable again");
                    }
                    failing = false;
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "reading domain policies failed; the ones held stay in force");
                }
                Err(_) => {}
            }
        }
    }
}

/// Moves the version: every process reloads within [`REFRESH`].
pub async fn bump(b: &Backends) -> Result<()> {
    b.cache.incr(VERSION_KEY, VERSION_TTL).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(rules: &[(&str, PolicyKind)], allowlist: bool) -> PolicySet {
        PolicySet::new(rules.iter().map(|(d, k)| (d.to_string(), *k)), allowlist)
    }

    #[test]
    fn the_most_specific_rule_wins() {
        let s = set(
            &[
                ("example", PolicyKind::Suspend),
                ("a.example", PolicyKind::Allow),
                ("b.a.example", PolicyKind::Silence),
            ],
            false,
        );
        assert_eq!(s.decide("x.example"), Decision::Blocked);
        assert_eq!(s.decide("example"), Decision::Blocked);
        assert_eq!(s.decide("a.example:443"), Decision::Federate);
        assert_eq!(s.decide("c.A.Example."), Decision::Federate);
        assert_eq!(s.decide("b.a.example"), Decision::Silenced);
        assert_eq!(s.decide("z.b.a.example"), Decision::Silenced);
        assert_eq!(s.decide("notexample"), Decision::Federate);
        assert_eq!(s.decide("other.org"), Decision::Federate);
    }

    #[test]
    fn an_ip_address_has_only_its_own_rule() {
        let s = set(
            &[
                ("0.0.1", PolicyKind::Suspend),
                ("127.0.0.9", PolicyKind::Suspend),
            ],
            false,
        );
        assert_eq!(s.decide("127.0.0.1:80"), Decision::Federate);
        assert_eq!(s.decide("127.0.0.9:8080"), Decision::Blocked);
    }

    #[test]
    fn allowlist_mode_federates_only_with_allowed_domains() {
        let s = set(
            &[
                ("friends.example", PolicyKind::Allow),
                ("loud.friends.example", PolicyKind::Silence),
                ("bad.friends.example", PolicyKind::Suspend),
            ],
            true,
        );
        assert_eq!(s.decide("friends.example"), Decision::Federate);
        assert_eq!(s.decide("a.friends.example"), Decision::Federate);
        assert_eq!(s.decide("loud.friends.example"), Decision::Silenced);
        assert_eq!(s.decide("bad.friends.example"), Decision::Blocked);
        assert_eq!(s.decide("stranger.example"), Decision::Blocked);
        assert_eq!(set(&[], true).decide("any.example"), Decision::Blocked);
    }

    #[test]
    fn unicode_and_case_match_the_stored_ascii_form() {
        let s = set(&[("xn--bcher-kva.example", PolicyKind::Suspend)], false);
        assert_eq!(s.decide("BÜCHER.example"), Decision::Blocked);
    }
}
