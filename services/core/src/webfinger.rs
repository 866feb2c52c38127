//! WebFinger (RFC 7033) as the edge answers it: which local account a
//! `resource` parameter names. The parameter is a remote server's bytes.

/// Why a `resource` names no local account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotLocal {
    /// Not `acct:name@host` or a local actor URL: 400.
    Malformed,
    /// A well-formed resource of another server, or not an account: 404.
    Elsewhere,
}

/// The local account name `resource` names: `acct:name@host` with `host`
/// our `public_host` (case-insensitive), or `{users_prefix}name` (the
/// actor's URL, `…/users/`). The name is returned as given; the caller
/// looks it up.
pub fn local_name<'a>(
    resource: &'a str,
    public_host: &str,
    users_prefix: &str,
) -> Result<&'a str, NotLocal> {
    if let Some(acct) = resource.strip_prefix("acct:") {
        let acct = acct.strip_prefix('@').unwrap_or(acct);
        return match acct.rsplit_once('@') {
            Some((name, host)) if host.eq_ignore_ascii_case(public_host) => {
                if name.is_empty() || name.contains(['/', '@']) {
                    Err(NotLocal::Malformed)
                } else {
                    Ok(name)
                }
            }
            Some(_) => Err(NotLocal::Elsewhere),
            None => Err(NotLocal::Malformed),
        };
    }
    match resource.strip_prefix(users_prefix) {
        Some(name) if !name.is_empty() && !name.contains(['/', '?', '#']) => Ok(name),
        _ => Err(NotLocal::Elsewhere),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_name_local_accounts() {
        let n = |r| local_name(r, "social.example", "https://social.example/users/");
        assert_eq!(n("acct:alice@social.example"), Ok("alice"));
        assert_eq!(n("acct:alice@SOCIAL.example"), Ok("alice"));
        assert_eq!(n("acct:@alice@social.example"), Ok("alice"));
        assert_eq!(n("https://social.example/users/alice"), Ok("alice"));
        assert_eq!(n("acct:alice@elsewhere.example"), Err(NotLocal::Elsewhere));
        assert_eq!(n("acct:alice"), Err(NotLocal::Malformed));
        assert_eq!(n("acct:@social.example"), Err(NotLocal::Malformed));
        assert_eq!(n("acct:a/b@social.example"), Err(NotLocal::Malformed));
        assert_eq!(
            n("https://social.example/users/alice/inbox"),
            Err(NotLocal::Elsewhere)
        );
        assert_eq!(n("mailto:alice@social.example"), Err(NotLocal::Elsewhere));
    }
}
