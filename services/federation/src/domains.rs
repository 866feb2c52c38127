//! Domain policies changed at runtime (`stampede domain`, the
//! `AdminService` calls): stored, announced to every process through the
//! version in the cache (see [`stampede_runtime::policy`]), and for a
//! suspension, what the store knows of the domain forgotten.
use stampede_backends::store::{DomainPolicy, PolicyKind};
use stampede_core::targets::normalize_domain;
use stampede_runtime::policy::{self, Decision, DomainPolicies};
use stampede_runtime::{Backends, Config, Result};

use crate::cache_keys;

/// The domain as rules store it, or why it is not one.
pub fn parse_domain(cfg: &Config, raw: &str) -> std::result::Result<String, String> {
    let raw = raw.trim().trim_start_matches('.');
    let bad = || {
        format!("`{raw}` is not a domain: give a host name such as example.com (its subdomains are covered), without scheme, path or wildcard")
    };
    if raw.is_empty()
        || raw.len() > 253
        || raw
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '/' | '*' | '@' | '?' | '#'))
    {
        return Err(bad());
    }
    let domain = normalize_domain(raw);
    if domain.is_empty() || domain.contains(':') && !domain.starts_with('[') {
        return Err(bad());
    }
    // A rule for our own domain, or a parent of it, would cut us off.
    if cfg.is_own_authority(&domain)
        || stampede_core::targets::domain_within(&normalize_domain(&cfg.public_host()), &domain)
    {
        return Err(format!("`{domain}` covers this server's own host"));
    }
    Ok(domain)
}

/// What setting a policy did.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The rule as stored.
    pub policy: DomainPolicy,
    /// Follows of local actors removed (a suspension).
    pub follows_removed: u64,
    /// Stored remote keys forgotten (a suspension).
    pub keys_forgotten: u64,
}

/// Sets `domain`'s policy (already [`parse_domain`]d) and announces it;
/// this process applies it at once, the others within a few seconds. A
/// suspension also removes the follows of local actors by actors of the
/// hosts it now blocks, their pending follow requests, and their cached
/// actors and keys.
pub async fn set(
    b: &Backends,
    policies: &DomainPolicies,
    domain: String,
    kind: PolicyKind,
    reason: String,
) -> Result<Applied> {
    let policy = DomainPolicy {
        domain,
        kind,
        reason,
        updated_unix_ms: stampede_backends::clock::now_ms(),
    };
    b.store.set_domain_policy(&policy).await?;
    policy::bump(b).await?;
    policies.load(b).await?;
    let mut applied = Applied {
        policy,
        follows_removed: 0,
        keys_forgotten: 0,
    };
    if kind == PolicyKind::Suspend {
        let (follows, keys) = forget_blocked(b, policies, &applied.policy.domain).await?;
        applied.follows_removed = follows;
        applied.keys_forgotten = keys;
    }
    tracing::info!(
        domain = %applied.policy.domain,
        policy = kind.as_str(),
        reason = %applied.policy.reason,
        follows_removed = applied.follows_removed,
        keys_forgotten = applied.keys_forgotten,
        "domain policy set"
    );
    Ok(applied)
}

/// Removes `domain`'s rule; true when there was one.
pub async fn remove(b: &Backends, policies: &DomainPolicies, domain: &str) -> Result<bool> {
    let removed = b.store.remove_domain_policy(domain).await?;
    if removed {
        policy::bump(b).await?;
        policies.load(b).await?;
        tracing::info!(%domain, "domain policy removed");
    }
    Ok(removed)
}

/// Forgets what the store knows of the hosts under `domain` that the rules
/// now block (a more specific `allow` keeps its hosts).
async fn forget_blocked(
    b: &Backends,
    policies: &DomainPolicies,
    domain: &str,
) -> Result<(u64, u64)> {
    let rules = policies.snapshot();
    let footprint = b.store.domain_footprint(domain).await?;
    let hosts: Vec<String> = footprint
        .hosts
        .into_iter()
        .filter(|h| rules.decide(h) == Decision::Blocked)
        .collect();
    let key_ids: Vec<String> = footprint
        .key_ids
        .into_iter()
        .filter(|k| {
            url::Url::parse(k).is_ok_and(|u| {
                u.host_str()
                    .is_some_and(|h| rules.decide(h) == Decision::Blocked)
            })
        })
        .collect();
    if hosts.is_empty() && key_ids.is_empty() {
        return Ok((0, 0));
    }
    let follows = b.store.forget_hosts(&hosts, &key_ids).await?;
    for k in &key_ids {
        b.cache.del(&cache_keys::remote_key(k)).await?;
    }
    Ok((follows, key_ids.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::from_lookup(|k| {
            (k == "STAMPEDE_PUBLIC_URL").then(|| "https://social.example".into())
        })
        .unwrap()
    }

    #[test]
    fn domains_are_normalised_and_checked() {
        let c = cfg();
        assert_eq!(parse_domain(&c, " Bad.Example. ").unwrap(), "bad.example");
        assert_eq!(parse_domain(&c, ".bad.example").unwrap(), "bad.example");
        assert_eq!(parse_domain(&c, "bad.example:443").unwrap(), "bad.example");
        assert_eq!(
            parse_domain(&c, "BÜCHER.example").unwrap(),
            "xn--bcher-kva.example"
        );
        assert_eq!(parse_domain(&c, "127.0.0.9").unwrap(), "127.0.0.9");
        for bad in [
            "",
            "https://bad.example",
            "*.bad.example",
            "bad .example",
            "a/b",
        ] {
            assert!(parse_domain(&c, bad).is_err(), "{bad}");
        }
        for own in ["social.example", "example", "SOCIAL.example."] {
            assert!(
                parse_domain(&c, own).unwrap_err().contains("own host"),
                "{own}"
            );
        }
    }
}
