//! Every key stampede keeps in the shared cache, named in one place
//! (docs/ARCHITECTURE.md, "Cache"). Each kind has its own prefix, and a
//! change in what a value means changes its prefix (`key2:`, `actor2:`: the
//! entries from before documents were bound to the URL fetched are never
//! read). The backends add the namespace.
//!
//! Keys built from what a remote server sends are either bounded by the
//! caller (a host, a key id already limited in size) or hashed.
use stampede_core::digest::tuple_hash;

/// A remote public key (`{owner, pem}`), or a remembered failure to get it.
pub fn remote_key(key_id: &str) -> String {
    format!("key2:{key_id}")
}

/// The mark of a key's last refetch: the next refetch waits until it
/// expires.
pub fn key_refetched(key_id: &str) -> String {
    format!("keyrefetched:{key_id}")
}

/// A remote actor's `assertionMethod` key (Object Integrity Proofs,
/// `{owner, pem}`), or a remembered failure to get it: apart from the keys
/// that sign requests, so that one is never taken for the other.
pub fn assertion_key(key_id: &str) -> String {
    format!("akey:{key_id}")
}

/// The mark of an `assertionMethod` key's last refetch.
pub fn assertion_key_refetched(key_id: &str) -> String {
    format!("akeyrefetched:{key_id}")
}

/// Key fetches asked for by one client for one (normalised) domain in one
/// minute.
pub fn key_fetches(domain: &str, client: &str, minute: u64) -> String {
    format!("kf:{}:{minute}", tuple_hash(&[domain, client]))
}

/// The signature style a remote host took (`cavage`, or `rfc9421` and the
/// `Accept-Signature` it asked with), 30 days. Held by each process's
/// memory (`stampede_runtime::signature_styles`), which names it.
pub use stampede_runtime::signature_styles::cache_key as signature_style;

/// A remote actor's inboxes, or a remembered "gone".
pub fn remote_actor(id: &str) -> String {
    format!("actor2:{id}")
}

/// Requests one client address made to the edge in one minute.
pub fn edge_requests(client: &str, minute: u64) -> String {
    format!("rl:{client}:{minute}")
}

/// Activities verified as signed by a key of `host` in one minute.
pub fn inbox_activities(host: &str, minute: u64) -> String {
    format!("rlk:{host}:{minute}")
}

/// The dedup mark of an inbound activity: a hash of (inbox, actor, id), so
/// one server cannot mark another's ids as seen and the key's size is ours.
pub fn seen(inbox: &str, actor: &str, id: &str) -> String {
    format!("seen:{}", tuple_hash(&[inbox, actor, id]))
}

/// The deliveries parked in delay queues: a hash of `{reason}:{due_ms}`
/// counters.
pub const PARKED: &str = "delivery:parked";

/// When the message a delivery worker last started from a delivery queue
/// (named by its suffix) became ready, unix ms: its head's age for status.
pub fn queue_head(queue: &str) -> String {
    format!("queuehead:{queue}")
}

/// Per-host delivery state: an operator's pause, and the circuit breaker's
/// parts.
/// The lease of one round of probes of the unavailable hosts: one delivery
/// process probes at a time.
pub const UNAVAILABLE_PROBE: &str = "unavailable-probe";

/// Moved by every creation and deletion of a local actor: each ingest
/// process forgets the actors it holds in memory when it sees it move
/// (`ingest/src/local_actors.rs`).
pub const LOCAL_ACTORS_VERSION: &str = "actors:version";

/// Deliveries pending per host (field `{host}`) and the sum of their
/// queueing times (field `{host} t`): the hosts view (`backlog`).
pub const PENDING_BY_HOST: &str = "pending:hosts";

/// Each host's last answer: fields `{host} status`, `{host} at`, `{host} ok`.
pub const HOSTS_LAST: &str = "hosts:last";

pub mod host {
    /// Deliveries to the host are paused by an operator.
    pub fn paused(host: &str) -> String {
        format!("paused:{host}")
    }
    /// The store was told the host is unavailable (in the last minute).
    pub fn marked_unavailable(host: &str) -> String {
        format!("health:unavailable:{host}")
    }
    /// The circuit is open until this time (unix ms).
    pub fn open(host: &str) -> String {
        format!("health:open:{host}")
    }
    /// Consecutive failures.
    pub fn fails(host: &str) -> String {
        format!("health:fails:{host}")
    }
    /// The first failure of the run (unix ms).
    pub fn since(host: &str) -> String {
        format!("health:since:{host}")
    }
    /// How many times the circuit opened in this run.
    pub fn opens(host: &str) -> String {
        format!("health:opens:{host}")
    }
    /// The start of the ramp after a recovery (unix ms).
    pub fn ramp(host: &str) -> String {
        format!("health:ramp:{host}")
    }
    /// The lease of the worker probing an open circuit.
    pub fn probe(host: &str) -> String {
        format!("health:probe:{host}")
    }
    /// The adaptive concurrency limit (`hosts::Adaptive`), when it is below
    /// the configured maximum.
    pub fn limit(host: &str) -> String {
        format!("health:limit:{host}")
    }
    /// The delivery slots in use: a semaphore of leases, one per request in
    /// flight from any delivery worker.
    pub fn slots(host: &str) -> String {
        format!("slots:{host}")
    }
}

/// Deliveries and their total latency per host in one minute: a hash of
/// `{host}` (count) and `{host} ms` (milliseconds) counters, which
/// `stampede status` reads for the busy hosts.
pub fn busy_hosts(minute: u64) -> String {
    format!("delivery:hosts:{minute}")
}

/// The retention pruner's lease: the process holding it prunes, one in the
/// cluster at a time.
pub fn retention_lease() -> String {
    "retention:lease".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No kind's key can be another kind's: the fixed part of each (what
    /// two keys of the kind share whatever their arguments) is not a prefix
    /// of another's.
    #[test]
    fn no_key_of_one_kind_is_a_key_of_another() {
        let kinds: [fn(&str) -> String; 18] = [
            remote_key,
            key_refetched,
            |a| key_fetches(a, "client", 1),
            remote_actor,
            |a| edge_requests(a, 1),
            |a| inbox_activities(a, 1),
            |a| seen(a, a, a),
            |_| PARKED.to_string(),
            host::paused,
            host::open,
            host::fails,
            host::since,
            host::opens,
            host::ramp,
            host::probe,
            host::limit,
            host::slots,
            |_| busy_hosts(1),
        ];
        let fixed: Vec<String> = kinds
            .iter()
            .map(|k| {
                let (a, b) = (k("a.example"), k("b.example"));
                let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
                a[..n].to_string()
            })
            .collect();
        for (i, a) in fixed.iter().enumerate() {
            assert!(a.len() >= 3, "{a}");
            for (j, b) in fixed.iter().enumerate() {
                assert!(i == j || !b.starts_with(a.as_str()), "{a} / {b}");
            }
        }
    }
}
