//! FEP-8fcf, followers collection synchronization: the partial followers
//! collection of one receiving server (the followers whose id shares its URI
//! scheme and authority), its digest (the XOR of the SHA-256 of each
//! follower id) and the `Collection-Synchronization` header that carries it.
//!
//! The authority is read literally, as Mastodon does (the id's
//! `scheme://authority` prefix, up to the `/` that starts its path), so the
//! store can find a partial collection by prefix and both ends agree on the
//! bytes hashed.
use aws_lc_rs::digest::{digest, SHA256};

/// The header's name.
pub const HEADER: &str = "collection-synchronization";

/// The `scheme://authority` of an `http(s)` URL with a path (`https://a.example`
/// for `https://a.example/users/1`), or `None` for anything else (no path,
/// another scheme, an empty authority). Followers whose id has none belong to
/// no partial collection.
pub fn authority_of(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let end = rest.find(['/', '?', '#'])?;
    if end == 0 || rest.as_bytes()[end] != b'/' {
        return None;
    }
    Some(&url[..url.len() - rest.len() + end])
}

/// A partial followers collection digest: XOR of the SHA-256 of each id.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The SHA-256 of one follower id.
    pub fn of_id(id: &str) -> Self {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest(&SHA256, id.as_bytes()).as_ref());
        Digest(out)
    }

    /// The digest of a set of ids.
    pub fn of_ids<'a>(ids: impl IntoIterator<Item = &'a str>) -> Self {
        let mut d = Digest::default();
        for id in ids {
            d.toggle(id);
        }
        d
    }

    /// Adds an id to the set, or removes it (XOR is its own inverse).
    pub fn toggle(&mut self, id: &str) {
        self.xor(&Digest::of_id(id));
    }

    /// XORs `other` in.
    pub fn xor(&mut self, other: &Digest) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a ^= b;
        }
    }

    /// Lower-case hex, as the header carries it.
    pub fn hex(&self) -> String {
        use std::fmt::Write;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// A digest from 32 bytes (a stored one); `None` for another length.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        Some(Digest(b.try_into().ok()?))
    }
}

/// The `Collection-Synchronization` header value for `followers` (the
/// collection's id), served partially at `url`, with `digest`.
pub fn header_value(followers: &str, url: &str, digest: &Digest) -> String {
    format!(
        "collectionId=\"{followers}\", url=\"{url}\", digest=\"{}\"",
        digest.hex()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_of_the_feps_example() {
        // FEP-8fcf, "Partial follower collection digest": the partial
        // collection of https://example.org/users/1 for the server of
        // https://testing.example.org/users/1.
        let followers = [
            "https://example.org/users/2",
            "https://testing.example.org/users/1",
            "https://next.example.org/users/foo",
            "https://testing.example.org/users/2",
        ];
        let ours = followers
            .iter()
            .copied()
            .filter(|f| authority_of(f) == authority_of("https://testing.example.org/inbox"));
        let d = Digest::of_ids(ours);
        assert_eq!(
            Digest::of_id("https://testing.example.org/users/1").hex(),
            "3a06e99569547f444c352ab7f52e4bab207abec5ca6f07b0045cfdc9723f8fa9"
        );
        assert_eq!(
            d.hex(),
            "c33f48cd341ef046a206b8a72ec97af65079f9a3a9b90eef79c5920dce45c61f"
        );
        assert_eq!(
            header_value(
                "https://example.org/users/1/followers",
                "https://example.org/users/1/followers_synchronization",
                &d
            ),
            "collectionId=\"https://example.org/users/1/followers\", url=\"https://example.org/users/1/followers_synchronization\", digest=\"c33f48cd341ef046a206b8a72ec97af65079f9a3a9b90eef79c5920dce45c61f\""
        );
    }

    #[test]
    fn toggling_adds_and_removes_in_any_order() {
        let mut d = Digest::default();
        d.toggle("https://a.example/u/1");
        d.toggle("https://a.example/u/2");
        d.toggle("https://a.example/u/1");
        assert_eq!(d, Digest::of_ids(["https://a.example/u/2"]));
        d.toggle("https://a.example/u/2");
        assert_eq!(d, Digest::default());
        assert_eq!(Digest::default().hex(), "0".repeat(64));
        assert_eq!(Digest::from_bytes(&d.0), Some(d));
        assert_eq!(Digest::from_bytes(&[1, 2]), None);
    }

    #[test]
    fn authorities_are_read_literally() {
        for (url, want) in [
            ("https://a.example/users/1", Some("https://a.example")),
            (
                "https://a.example:8443/inbox",
                Some("https://a.example:8443"),
            ),
            (
                "http://127.0.0.1:9000/users/x",
                Some("http://127.0.0.1:9000"),
            ),
            ("https://a.example/", Some("https://a.example")),
            ("https://a.example", None),
            ("https://a.example?x=/y", None),
            ("https:///users/1", None),
            ("ftp://a.example/x", None),
            ("a.example/users/1", None),
            ("", None),
        ] {
            assert_eq!(authority_of(url), want, "{url}");
        }
        // Another port, or a sub-domain, is another partial collection.
        assert_ne!(
            authority_of("https://a.example:444/u"),
            authority_of("https://a.example/u")
        );
    }
}
