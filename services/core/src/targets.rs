//! Delivery targets: one POST per shared inbox, a personal inbox only where
//! the recipient has no shared inbox, and never the same inbox twice.
use std::collections::HashSet;

/// A recipient's inboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipient<'a> {
    /// The actor's personal inbox.
    pub inbox: &'a str,
    /// `endpoints.sharedInbox`, when the server has one.
    pub shared_inbox: Option<&'a str>,
}

impl<'a> Recipient<'a> {
    /// The inbox to POST to: the shared inbox where there is one.
    pub fn target(&self) -> &'a str {
        match self.shared_inbox {
            Some(s) if !s.is_empty() => s,
            _ => self.inbox,
        }
    }
}

/// Groups recipients by shared inbox: the distinct target inboxes, in first-
/// seen order.
pub fn group_by_shared_inbox<'a>(
    recipients: impl IntoIterator<Item = Recipient<'a>>,
) -> Vec<&'a str> {
    let mut seen = HashSet::new();
    recipients
        .into_iter()
        .map(|r| r.target())
        .filter(|t| seen.insert(*t))
        .collect()
}

/// The host (with a non-default port) of an inbox URL, as used for per-host
/// accounting; `None` when the URL has no host.
pub fn inbox_host(inbox: &str) -> Option<String> {
    let u = url::Url::parse(inbox).ok()?;
    let host = u.host_str()?;
    Some(match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    })
}

/// A domain as policy compares it: the port dropped, lower-case, trailing
/// dots removed and internationalised names in their ASCII (IDNA) form, so
/// `Bücher.Example.` and `xn--bcher-kva.example:443` are one domain. A bracketed
/// IPv6 literal keeps its brackets; what cannot be read as a host is returned
/// lower-cased as given.
pub fn normalize_domain(host: &str) -> String {
    let host = host.trim();
    let bare = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return match rest.split_once(']') {
            Some((v6, _)) => format!("[{}]", v6.to_ascii_lowercase()),
            None => host.to_ascii_lowercase(),
        };
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    let bare = bare.trim_end_matches('.');
    match url::Host::parse(bare) {
        Ok(url::Host::Domain(d)) => d.trim_end_matches('.').to_string(),
        Ok(other) => other.to_string(),
        Err(_) => bare.to_ascii_lowercase(),
    }
}

/// Whether `domain` (normalised) is `parent` or one of its subdomains.
pub fn domain_within(domain: &str, parent: &str) -> bool {
    domain.len() >= parent.len()
        && domain.ends_with(parent)
        && (domain.len() == parent.len()
            || domain.as_bytes()[domain.len() - parent.len() - 1] == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_normalise_before_matching() {
        assert_eq!(normalize_domain("Bad.Example."), "bad.example");
        assert_eq!(normalize_domain("bad.example:8443"), "bad.example");
        assert_eq!(normalize_domain("BÜCHER.example"), "xn--bcher-kva.example");
        assert_eq!(normalize_domain("[::1]:80"), "[::1]");
        assert_eq!(normalize_domain("127.0.0.1:9"), "127.0.0.1");
        assert!(domain_within("a.bad.example", "bad.example"));
        assert!(domain_within("bad.example", "bad.example"));
        assert!(!domain_within("notbad.example", "bad.example"));
        assert!(!domain_within("example", "bad.example"));
    }

    #[test]
    fn one_post_per_shared_inbox() {
        let rs = [
            Recipient {
                inbox: "https://a/u/1/inbox",
                shared_inbox: Some("https://a/inbox"),
            },
            Recipient {
                inbox: "https://a/u/2/inbox",
                shared_inbox: Some("https://a/inbox"),
            },
            Recipient {
                inbox: "https://b/u/1/inbox",
                shared_inbox: None,
            },
            Recipient {
                inbox: "https://b/u/2/inbox",
                shared_inbox: Some(""),
            },
            Recipient {
                inbox: "https://b/u/1/inbox",
                shared_inbox: None,
            },
        ];
        assert_eq!(
            group_by_shared_inbox(rs),
            [
                "https://a/inbox",
                "https://b/u/1/inbox",
                "https://b/u/2/inbox"
            ]
        );
    }

    #[test]
    fn host_keeps_port() {
        assert_eq!(
            inbox_host("http://127.0.0.1:9000/inbox").as_deref(),
            Some("127.0.0.1:9000")
        );
        assert_eq!(
            inbox_host("https://m.example/inbox").as_deref(),
            Some("m.example")
        );
        assert_eq!(inbox_host("nope"), None);
    }
}
