//! What each remote host is waiting for, for the hosts view
//! (`AdminService.ListHosts`): deliveries pending per host and their mean
//! age, counted in the cache (fanout adds a page's jobs, delivery takes
//! away each job that ends, batched per worker), and each host's last
//! answer. Counters, not records: a crash can skew a host's count until its
//! backlog empties (a count at or below zero is dropped), so the view is an
//! operator's gauge; an activity's exact status is
//! [`stampede_backends::store::Store::activity_delivery`].
use std::collections::HashMap;
use std::time::Duration;

use stampede_runtime::{Backends, Result};

use crate::cache_keys::{HOSTS_LAST, PENDING_BY_HOST};

/// How long the hashes live without a write.
const KEEP: Duration = Duration::from_secs(30 * 86400);

fn age_field(host: &str) -> String {
    format!("{host} t")
}

/// Jobs queued now for each host (`per_host`), at `now_secs`.
pub async fn queued(b: &Backends, per_host: &[(String, u64)], now_secs: i64) -> Result<()> {
    let by: Vec<(String, i64)> = per_host
        .iter()
        .flat_map(|(h, n)| {
            let n = *n as i64;
            [(h.clone(), n), (age_field(h), n * now_secs)]
        })
        .collect();
    b.cache.hash_incr_many(PENDING_BY_HOST, &by, KEEP).await?;
    Ok(())
}

/// Jobs that ended, per host: how many and the sum of their queueing times
/// (unix seconds).
pub async fn ended(b: &Backends, per_host: &[(String, u64, i64)]) -> Result<()> {
    let by: Vec<(String, i64)> = per_host
        .iter()
        .flat_map(|(h, n, t)| [(h.clone(), -(*n as i64)), (age_field(h), -t)])
        .collect();
    b.cache.hash_incr_many(PENDING_BY_HOST, &by, KEEP).await?;
    Ok(())
}

/// A host's last answer, as one worker saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LastAnswer {
    /// HTTP status; 0 for no answer (timeout, connection refused).
    pub status: u16,
    /// When, unix ms.
    pub at_ms: i64,
    /// The last 2xx, unix ms (0: none seen).
    pub ok_ms: i64,
}

/// Records hosts' last answers.
pub async fn answered(b: &Backends, answers: &[(String, LastAnswer)]) -> Result<()> {
    let values: Vec<(String, i64)> = answers
        .iter()
        .flat_map(|(h, a)| {
            let mut v = vec![
                (format!("{h} status"), i64::from(a.status)),
                (format!("{h} at"), a.at_ms),
            ];
            if a.ok_ms > 0 {
                v.push((format!("{h} ok"), a.ok_ms));
            }
            v
        })
        .collect();
    b.cache.hash_set_many(HOSTS_LAST, &values, KEEP).await?;
    Ok(())
}

/// A host's backlog.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending {
    /// Deliveries queued and not ended.
    pub count: u64,
    /// Their mean time in the queue so far, seconds.
    pub mean_age_secs: u64,
}

/// Every host with a backlog, and each host's last answer.
pub async fn read(
    b: &Backends,
    now_secs: i64,
) -> Result<(HashMap<String, Pending>, HashMap<String, LastAnswer>)> {
    let mut counts: HashMap<String, (i64, i64)> = HashMap::new();
    for (field, v) in b.cache.hash_get_all(PENDING_BY_HOST).await? {
        match field.strip_suffix(" t") {
            Some(host) => counts.entry(host.to_string()).or_default().1 = v,
            None => counts.entry(field).or_default().0 = v,
        }
    }
    let pending = counts
        .into_iter()
        .filter(|(_, (n, _))| *n > 0)
        .map(|(h, (n, t))| {
            let mean_at = t / n;
            let age = (now_secs - mean_at).max(0) as u64;
            (
                h,
                Pending {
                    count: n as u64,
                    mean_age_secs: age,
                },
            )
        })
        .collect();
    let mut last: HashMap<String, LastAnswer> = HashMap::new();
    for (field, v) in b.cache.hash_get_all(HOSTS_LAST).await? {
        let Some((host, what)) = field.rsplit_once(' ') else {
            continue;
        };
        let a = last.entry(host.to_string()).or_default();
        match what {
            "status" => a.status = u16::try_from(v).unwrap_or(0),
            "at" => a.at_ms = v,
            "ok" => a.ok_ms = v,
            _ => {}
        }
    }
    Ok((pending, last))
}

/// Drops the hosts whose count fell to zero or below (their backlog ended,
/// or a crash skewed it): the next job starts them again from zero.
pub async fn tidy(b: &Backends) -> Result<()> {
    let all = b.cache.hash_get_all(PENDING_BY_HOST).await?;
    let done: Vec<String> = all
        .iter()
        .filter(|(f, n)| !f.ends_with(" t") && *n <= 0)
        .flat_map(|(h, _)| [h.clone(), age_field(h)])
        .collect();
    b.cache.hash_del(PENDING_BY_HOST, &done).await?;
    Ok(())
}

/// How the hosts view is sorted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    /// Most deliveries pending first.
    Pending,
    /// Oldest backlog (mean age) first.
    Oldest,
    /// Most consecutive failures first.
    Failures,
}

/// One row of the hosts view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostRow {
    /// The host (`name[:port]`).
    pub host: String,
    /// Its backlog.
    pub pending: Pending,
    /// Deliveries in progress, every process together.
    pub in_flight: u32,
    /// Its concurrency limit now.
    pub limit: u32,
    /// `closed`, `open`, `half-open`, `unavailable` or `paused`.
    pub circuit: &'static str,
    /// Consecutive failures.
    pub failures: u64,
    /// Its last answer.
    pub last: LastAnswer,
    /// The domain policy covering it, empty when none.
    pub policy: &'static str,
}

/// The hosts we are behind on or that fail, sorted, at most `limit`: the
/// hosts with a backlog, failing or paused, and those answered lately.
pub async fn hosts_view(
    b: &Backends,
    cfg: &stampede_runtime::Config,
    policy: &stampede_runtime::policy::DomainPolicies,
    sort: SortBy,
    limit: usize,
) -> Result<Vec<HostRow>> {
    let now_ms = stampede_backends::clock::now_ms();
    let (pending, last) = read(b, now_ms / 1000).await?;
    let failing: HashMap<String, stampede_backends::store::HostHealth> = b
        .store
        .failing_hosts(10_000)
        .await?
        .into_iter()
        .map(|h| (h.host.clone(), h))
        .collect();
    let paused = b.store.paused_hosts().await?;
    let mut hosts: Vec<String> = pending
        .keys()
        .chain(failing.keys())
        .chain(paused.iter())
        .chain(last.keys())
        .cloned()
        .collect();
    hosts.sort();
    hosts.dedup();
    let key = |h: &String| -> (u64, u64) {
        let p = pending.get(h).copied().unwrap_or_default();
        let f = failing.get(h).map_or(0, |x| x.failures);
        match sort {
            SortBy::Pending => (p.count, p.mean_age_secs),
            SortBy::Oldest => (p.mean_age_secs * u64::from(p.count > 0), p.count),
            SortBy::Failures => (f, p.count),
        }
    };
    hosts.sort_by(|a, b| key(b).cmp(&key(a)).then_with(|| a.cmp(b)));
    hosts.truncate(limit);
    let slots: Vec<String> = hosts
        .iter()
        .map(|h| crate::cache_keys::host::slots(h))
        .collect();
    let in_flight = b.cache.lease_counts(&slots).await?;
    let rules = policy.snapshot();
    let mut rows = Vec::with_capacity(hosts.len());
    for (i, host) in hosts.into_iter().enumerate() {
        let s = crate::hosts::state(b, &host).await?;
        let health = failing.get(&host);
        let circuit = if s.paused {
            "paused"
        } else if health.is_some_and(|h| h.unavailable) {
            "unavailable"
        } else if s.open_until_ms.is_some_and(|u| u > now_ms) {
            "open"
        } else if s.failures >= cfg.circuit_failures {
            "half-open"
        } else {
            "closed"
        };
        let domain = stampede_core::targets::normalize_domain(&host);
        rows.push(HostRow {
            pending: pending.get(&host).copied().unwrap_or_default(),
            in_flight: in_flight.get(i).copied().unwrap_or(0),
            limit: s.limit(cfg, now_ms) as u32,
            circuit,
            failures: s.failures.max(health.map_or(0, |h| h.failures)),
            last: last.get(&host).copied().unwrap_or_default(),
            policy: rules.rule_for(&domain).map_or("", |(_, k)| k.as_str()),
            host,
        });
    }
    Ok(rows)
}
