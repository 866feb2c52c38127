//! Per-host state shared by every delivery worker, in the cache (Redis in a
//! cluster), read in one round trip per delivery:
//!
//! - an operator's pause (also kept in the store, which is the truth; the
//!   cache copy is restored from it at start);
//! - outbound health: consecutive failures, the first failure of the run, a
//!   circuit that opens after `STAMPEDE_CIRCUIT_FAILURES` failures in a row
//!   (deliveries are parked, not tried), one half-open probe at a time when
//!   it expires, and a ramp after recovery during which the host's
//!   concurrency grows from 1. Only a successful delivery or probe revives
//!   a host: requests it sends us touch none of this.
//!
//! Transitions (open, probe failed, recovered) are also written to the store
//! so `stampede status` can list failing hosts.
use crate::cache_keys::host;
use std::time::Duration;

use stampede_backends::store::HostHealth;
use stampede_runtime::{Backends, Config, Result};

const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long one probe may be in progress before another worker may try.
const PROBE_LEASE: Duration = Duration::from_secs(30);

use stampede_backends::clock::now_ms;

fn number(v: &Option<Vec<u8>>) -> Option<i64> {
    v.as_deref()
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
}

/// Pauses deliveries to `host`: they are parked, not tried, until resumed.
pub async fn pause(b: &Backends, host: &str) -> Result<()> {
    b.store.set_host_paused(host, true).await?;
    Ok(b.cache.set(&host::paused(host), b"1", FOREVER).await?)
}

/// Resumes deliveries to `host`.
pub async fn resume(b: &Backends, host: &str) -> Result<()> {
    b.store.set_host_paused(host, false).await?;
    Ok(b.cache.del(&host::paused(host)).await?)
}

/// Copies the paused hosts from the store into the cache (an in-memory
/// cache starts empty).
pub async fn restore_paused(b: &Backends) -> Result<()> {
    for host in b.store.paused_hosts().await? {
        b.cache.set(&host::paused(&host), b"1", FOREVER).await?;
    }
    Ok(())
}

/// A host's shared state as one delivery sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostState {
    /// Paused by an operator.
    pub paused: bool,
    /// The circuit is open until then (unix ms).
    pub open_until_ms: Option<i64>,
    /// Consecutive failures.
    pub failures: u64,
    /// First failure of the current run (unix ms).
    pub failing_since_ms: Option<i64>,
    /// Recovered at (unix ms), while ramping up.
    pub ramp_since_ms: Option<i64>,
}

/// What to do with a delivery, from the host's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Deliver, with at most this many in flight to the host per worker.
    Go {
        /// Concurrency limit (lower while ramping up after a recovery).
        limit: usize,
    },
    /// Paused by an operator: park.
    Paused,
    /// Circuit open: park for this long, do not try.
    Open(Duration),
    /// Half-open and this worker holds the probe lease: probe, then decide.
    Probe,
    /// Half-open, another worker is probing: park briefly.
    Probing,
    /// Failing for longer than `STAMPEDE_HOST_UNAVAILABLE_SECS`: dead-letter.
    Unavailable {
        /// Since when (unix ms).
        since_ms: i64,
    },
}

/// Reads a host's state in one round trip.
pub async fn state(b: &Backends, host: &str) -> Result<HostState> {
    let keys = [
        host::paused(host),
        host::open(host),
        host::fails(host),
        host::since(host),
        host::ramp(host),
    ];
    let v = b.cache.get_many(&keys).await?;
    let get = |i: usize| v.get(i).cloned().flatten();
    Ok(HostState {
        paused: get(0).is_some(),
        open_until_ms: number(&get(1)),
        failures: number(&get(2)).unwrap_or(0).max(0) as u64,
        failing_since_ms: number(&get(3)),
        ramp_since_ms: number(&get(4)),
    })
}

impl HostState {
    /// The concurrency limit now: the configured one, or during the ramp
    /// after a recovery, 1 growing linearly to it.
    pub fn limit(&self, cfg: &Config, now_ms: i64) -> usize {
        let full = cfg.host_concurrency.max(1);
        let ramp = cfg.host_ramp.as_millis() as i64;
        match self.ramp_since_ms {
            Some(since) if ramp > 0 && now_ms - since < ramp => {
                let grown = (full - 1) as i64 * (now_ms - since).max(0) / ramp;
                1 + grown as usize
            }
            _ => full,
        }
    }

    fn unavailable(&self, cfg: &Config, now_ms: i64) -> Option<i64> {
        let since = self.failing_since_ms?;
        (now_ms - since >= cfg.host_unavailable_after.as_millis() as i64).then_some(since)
    }
}

/// How long a delivery waits behind a circuit open until `until`: until it
/// closes, or until the host turns unavailable if that comes first (its
/// deliveries are dead-lettered then, not at the next probe, up to 64 times
/// the circuit's open time later); a second at least.
fn parked_for(cfg: &Config, failing_since_ms: Option<i64>, until: i64, now: i64) -> Duration {
    let turns_unavailable =
        failing_since_ms.map(|since| since + cfg.host_unavailable_after.as_millis() as i64);
    let back = turns_unavailable.map_or(until, |t| t.min(until));
    Duration::from_millis((back - now).max(0) as u64).max(Duration::from_secs(1))
}

/// Decides what a delivery to `host` does. Takes the probe lease when the
/// circuit is half-open and nobody holds it.
pub async fn gate(b: &Backends, cfg: &Config, host: &str) -> Result<(Gate, HostState)> {
    let s = state(b, host).await?;
    let now = now_ms();
    if s.paused {
        return Ok((Gate::Paused, s));
    }
    if let Some(until) = s.open_until_ms.filter(|u| *u > now) {
        if let Some(since_ms) = s.unavailable(cfg, now) {
            return Ok((Gate::Unavailable { since_ms }, s));
        }
        return Ok((
            Gate::Open(parked_for(cfg, s.failing_since_ms, until, now)),
            s,
        ));
    }
    if s.failures >= cfg.circuit_failures {
        // The circuit was open and its time is up: half-open.
        if let Some(since_ms) = s.unavailable(cfg, now) {
            // Still probed, so a host that comes back is noticed.
            if !b
                .cache
                .set_nx(&host::probe(host), b"1", PROBE_LEASE)
                .await?
            {
                return Ok((Gate::Unavailable { since_ms }, s));
            }
            return Ok((Gate::Probe, s));
        }
        if b.cache
            .set_nx(&host::probe(host), b"1", PROBE_LEASE)
            .await?
        {
            return Ok((Gate::Probe, s));
        }
        return Ok((Gate::Probing, s));
    }
    let limit = s.limit(cfg, now);
    Ok((Gate::Go { limit }, s))
}

/// A delivery (or probe) to `host` succeeded: a failing host recovers, its
/// circuit closes, and its concurrency ramps up again.
pub async fn record_success(b: &Backends, cfg: &Config, host: &str, s: &HostState) -> Result<()> {
    if s.failures == 0 && s.failing_since_ms.is_none() {
        return Ok(());
    }
    let was_open = s.failures >= cfg.circuit_failures;
    for k in [
        host::fails(host),
        host::since(host),
        host::opens(host),
        host::open(host),
        host::probe(host),
    ] {
        b.cache.del(&k).await?;
    }
    if was_open && !cfg.host_ramp.is_zero() {
        b.cache
            .set(
                &host::ramp(host),
                now_ms().to_string().as_bytes(),
                cfg.host_ramp,
            )
            .await?;
    }
    b.store.set_host_health(host, None).await?;
    if was_open {
        tracing::info!(inbox_host = %host, "host recovered; circuit closed, ramping up");
    }
    Ok(())
}

/// A delivery to `host` failed in a way that says the host is unwell (5xx,
/// timeout, connection error). Opens the circuit at the threshold.
pub async fn record_failure(b: &Backends, cfg: &Config, host: &str) -> Result<()> {
    let keep = cfg.host_unavailable_after * 2;
    let n = b.cache.incr(&host::fails(host), keep).await?;
    let now = now_ms();
    b.cache
        .set_nx(&host::since(host), now.to_string().as_bytes(), keep)
        .await?;
    if n == cfg.circuit_failures {
        open(b, cfg, host, n).await?;
    }
    Ok(())
}

/// The half-open probe failed: the circuit opens again, for longer.
/// Returns how long the probing delivery is to wait, as any other behind the
/// circuit.
pub async fn probe_failed(
    b: &Backends,
    cfg: &Config,
    host: &str,
    s: &HostState,
) -> Result<Duration> {
    let (since, until) = open(b, cfg, host, s.failures).await?;
    b.cache.del(&host::probe(host)).await?;
    Ok(parked_for(cfg, Some(since), until, now_ms()))
}

/// Opens the circuit; returns since when the host fails and until when the
/// circuit is open (unix ms).
async fn open(b: &Backends, cfg: &Config, host: &str, failures: u64) -> Result<(i64, i64)> {
    let keep = cfg.host_unavailable_after * 2;
    let opens = b.cache.incr(&host::opens(host), keep).await?;
    let factor = 1u32 << (opens.saturating_sub(1).min(6) as u32);
    let open_for = cfg.circuit_open * factor;
    let now = now_ms();
    let until = now + open_for.as_millis() as i64;
    b.cache
        .set(&host::open(host), until.to_string().as_bytes(), open_for)
        .await?;
    let since = number(&b.cache.get(&host::since(host)).await?).unwrap_or(now);
    let unavailable = now - since >= cfg.host_unavailable_after.as_millis() as i64;
    // The failure state expires `keep` after the first failure unless
    // renewed: each opening (the first, and after every failed probe)
    // renews it, so a host that keeps failing is never forgotten and
    // treated as new (its circuit closed, its deliveries tried again, its
    // failing time started over); one no delivery has asked about for
    // `keep` is.
    for (key, value) in [
        (host::since(host), since),
        (host::fails(host), failures as i64),
        (host::opens(host), opens as i64),
    ] {
        b.cache
            .set(&key, value.to_string().as_bytes(), keep)
            .await?;
    }
    b.store
        .set_host_health(
            host,
            Some(&HostHealth {
                host: host.to_string(),
                failing_since_unix_ms: since,
                failures,
                open_until_unix_ms: until,
                unavailable,
            }),
        )
        .await?;
    tracing::warn!(inbox_host = %host, failures, open_secs = open_for.as_secs(), unavailable, "circuit opened");
    Ok((since, until))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> Config {
        let m: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| m.get(k).cloned()).unwrap()
    }

    /// A host failing longer than its failure state is kept is still
    /// failing, since its first failure, as long as probes keep failing.
    #[tokio::test]
    async fn a_host_that_keeps_failing_is_not_forgotten() {
        let dir = std::env::temp_dir().join(format!("stampede-hosts-{}", uuid::Uuid::new_v4()));
        let mut c = cfg(&[
            ("STAMPEDE_DATA_DIR", &dir.display().to_string()),
            ("STAMPEDE_CIRCUIT_FAILURES", "2"),
        ]);
        // The failure state is kept twice this: 400 ms from the first failure.
        c.host_unavailable_after = Duration::from_millis(200);
        let b = Backends::open(&c, "test").await.unwrap();
        record_failure(&b, &c, "h").await.unwrap();
        record_failure(&b, &c, "h").await.unwrap();
        let first = state(&b, "h").await.unwrap();
        assert!(first.open_until_ms.is_some() && first.failures == 2);
        // Probes keep failing, the last one after the state would have
        // expired had it not been renewed.
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let s = state(&b, "h").await.unwrap();
            probe_failed(&b, &c, "h", &s).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = state(&b, "h").await.unwrap();
        assert_eq!(s.failing_since_ms, first.failing_since_ms);
        assert!(s.failures >= 2, "{s:?}");
        let (g, _) = gate(&b, &c, "h").await.unwrap();
        assert!(matches!(g, Gate::Unavailable { .. }), "{g:?}");
        drop(b);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A delivery parked behind an open circuit comes back when the host
    /// turns unavailable, if that is before the circuit closes.
    #[tokio::test]
    async fn an_open_circuit_parks_no_longer_than_until_the_host_is_unavailable() {
        let dir = std::env::temp_dir().join(format!("stampede-hosts-{}", uuid::Uuid::new_v4()));
        let mut c = cfg(&[
            ("STAMPEDE_DATA_DIR", &dir.display().to_string()),
            ("STAMPEDE_CIRCUIT_FAILURES", "1"),
            ("STAMPEDE_CIRCUIT_OPEN_SECS", "60"),
        ]);
        c.host_unavailable_after = Duration::from_secs(5);
        let b = Backends::open(&c, "test").await.unwrap();
        record_failure(&b, &c, "h").await.unwrap();
        let (g, _) = gate(&b, &c, "h").await.unwrap();
        let Gate::Open(wait) = g else { panic!("{g:?}") };
        assert!(
            wait <= Duration::from_secs(5) && wait > Duration::from_secs(3),
            "{wait:?}"
        );
        // Without that, until the circuit closes.
        c.host_unavailable_after = Duration::from_secs(3600);
        let (g, _) = gate(&b, &c, "h").await.unwrap();
        assert!(
            matches!(g, Gate::Open(w) if w > Duration::from_secs(50)),
            "{g:?}"
        );
        drop(b);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn concurrency_ramps_from_one_after_a_recovery() {
        let c = cfg(&[
            ("STAMPEDE_HOST_CONCURRENCY", "9"),
            ("STAMPEDE_HOST_RAMP_SECS", "100"),
        ]);
        let s = HostState {
            ramp_since_ms: Some(1_000_000),
            ..HostState::default()
        };
        assert_eq!(s.limit(&c, 1_000_000), 1);
        assert_eq!(s.limit(&c, 1_050_000), 5);
        assert_eq!(s.limit(&c, 1_099_999), 8);
        assert_eq!(s.limit(&c, 1_100_000), 9);
        assert_eq!(HostState::default().limit(&c, 0), 9);
    }
}
