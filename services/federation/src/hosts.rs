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
//!   a host: requests it sends us touch none of this;
//! - the host's delivery slots: a semaphore of leases, one per request in
//!   flight from any worker, so the host's limit holds for the cluster
//!   (a killed worker's leases expire within [`SLOT_LEASE`]);
//! - its adaptive limit ([`Adaptive`]), between 1 and
//!   `STAMPEDE_HOST_CONCURRENCY`: halved on 429, 5xx and timeouts (once per
//!   round of requests), grown by one per round of fast successes.
//!
//! [`read`] takes a slot and reads all of the state in one round trip.
//! Transitions (open, probe failed, recovered) are also written to the store
//! so `stampede status` can list failing hosts.
use crate::cache_keys::host;
use std::time::Duration;

use stampede_backends::cache::{LeaseTake, Leased};
use stampede_backends::store::HostHealth;
use stampede_runtime::{Backends, Config, Result};

const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long one probe may be in progress before another worker may try.
const PROBE_LEASE: Duration = Duration::from_secs(30);
/// How long the probe lease outlives a recovery (see [`record_success`]).
const RECOVERED_LEASE: Duration = Duration::from_secs(5);
/// A delivery slot's lease: renewed while its request runs (every
/// [`SLOT_RENEW`]), so a killed worker's slots come back within this.
pub const SLOT_LEASE: Duration = Duration::from_secs(8);
/// How often a worker renews the slots it holds.
pub const SLOT_RENEW: Duration = Duration::from_secs(2);
/// An adaptive limit not written for this long is forgotten: the host is
/// back at the maximum.
const ADAPTIVE_KEEP: Duration = Duration::from_secs(3600);
/// After a host answered 429 at some concurrency, the limit stays below it
/// for this long before trying it again.
const CEILING_HOLD_MS: i64 = 60_000;

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
    /// The adaptive limit, when below the maximum, and its value as read
    /// (what a compare-and-set expects).
    pub adaptive: Option<(Adaptive, Vec<u8>)>,
}

/// A host's adaptive concurrency limit, shared by every replica:
/// `{limit in thousandths}:{ceiling}:{cut_ms}` in the cache (the leading
/// number is what the slot semaphore reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adaptive {
    /// The limit, in thousandths (grows by fractions of a slot).
    pub milli: u64,
    /// The concurrency at which the host last answered 429: the limit stays
    /// below it for [`CEILING_HOLD_MS`] after the cut (0: none).
    pub ceiling: u32,
    /// When the limit was last cut (unix ms): a failure of a request sent
    /// before then was already answered by that cut.
    pub cut_ms: i64,
}

impl Adaptive {
    /// Parses the cache's value.
    pub fn parse(v: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(v).ok()?;
        let mut parts = s.split(':');
        Some(Self {
            milli: parts.next()?.parse().ok()?,
            ceiling: parts.next()?.parse().ok()?,
            cut_ms: parts.next()?.parse().ok()?,
        })
    }

    /// The cache's value.
    pub fn render(&self) -> String {
        format!("{}:{}:{}", self.milli, self.ceiling, self.cut_ms)
    }

    /// Whole slots.
    pub fn limit(&self) -> usize {
        (self.milli / 1000).max(1) as usize
    }

    /// Halved (at least 1) after a failure of a request sent at `sent_ms`,
    /// unless a cut since then already answered it; `told` (a 429) marks
    /// the level the host refused as a ceiling.
    pub fn cut(
        current: Option<Self>,
        max: usize,
        told: bool,
        sent_ms: i64,
        now: i64,
    ) -> Option<Self> {
        let cur = current.unwrap_or(Self {
            milli: max as u64 * 1000,
            ceiling: 0,
            cut_ms: 0,
        });
        if cur.cut_ms >= sent_ms {
            return None;
        }
        Some(Self {
            milli: (cur.milli / 2).max(1000),
            ceiling: if told {
                cur.limit() as u32
            } else {
                cur.ceiling
            },
            cut_ms: now,
        })
    }

    /// One slot more after a round of fast successes, up to `cap` (the
    /// maximum, or the ramp's) and below a held ceiling. `None`: no change
    /// (at the cap, or no adaptive limit: already the maximum).
    pub fn grow(current: Option<Self>, cap: usize, now: i64) -> Option<Self> {
        let cur = current?;
        let mut cap = cap.max(1) as u64;
        if cur.ceiling > 0 && now - cur.cut_ms < CEILING_HOLD_MS {
            cap = cap.min(u64::from(cur.ceiling.saturating_sub(1)).max(1));
        }
        let next = (cur.milli + 1000).min(cap * 1000);
        (next > cur.milli).then_some(Self { milli: next, ..cur })
    }
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
    Ok(read(b, host, None, &[]).await?.0)
}

/// A slot to take with [`read`]: its holder's name and the limit (the
/// configured maximum; the adaptive limit lowers it in the same call).
#[derive(Debug, Clone, Copy)]
pub struct Take<'a> {
    /// Unique per lease.
    pub holder: &'a str,
    /// `STAMPEDE_HOST_CONCURRENCY`.
    pub max: usize,
    /// Slots of the host's limit this take leaves for interactive
    /// deliveries (an `Accept`, a DM), which reserve none.
    pub reserve: u32,
}

/// In one round trip: releases `release` (slot semaphore, holder), reads
/// the host's state, and takes a slot when `take` is given and one is
/// free. The slot semaphore's key is [`host::slots`].
pub async fn read(
    b: &Backends,
    host: &str,
    take: Option<Take<'_>>,
    release: &[(String, String)],
) -> Result<(HostState, Leased)> {
    let keys = [
        host::paused(host),
        host::open(host),
        host::fails(host),
        host::since(host),
        host::ramp(host),
        host::limit(host),
    ];
    let (sem, limit_key) = (host::slots(host), keys[5].clone());
    let lease = take.map(|t| LeaseTake {
        key: &sem,
        holder: t.holder,
        limit: t.max.min(u32::MAX as usize) as u32,
        limit_key: Some(&limit_key),
        reserve: t.reserve,
        ttl: SLOT_LEASE,
    });
    let mut leased = b.cache.lease(release, &keys, lease).await?;
    let v = std::mem::take(&mut leased.values);
    let get = |i: usize| v.get(i).cloned().flatten();
    let adaptive = get(5).and_then(|raw| Adaptive::parse(&raw).map(|a| (a, raw)));
    Ok((
        HostState {
            paused: get(0).is_some(),
            open_until_ms: number(&get(1)),
            failures: number(&get(2)).unwrap_or(0).max(0) as u64,
            failing_since_ms: number(&get(3)),
            ramp_since_ms: number(&get(4)),
            adaptive,
        },
        leased,
    ))
}

impl HostState {
    /// The concurrency limit now: the adaptive one, capped by the ramp.
    pub fn limit(&self, cfg: &Config, now_ms: i64) -> usize {
        let ramp = self.ramp_limit(cfg, now_ms);
        self.adaptive
            .as_ref()
            .map_or(ramp, |(a, _)| a.limit().min(ramp))
    }

    /// The configured limit, or during the ramp after a recovery, 1 growing
    /// linearly to it.
    pub fn ramp_limit(&self, cfg: &Config, now_ms: i64) -> usize {
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

/// A host delivered to recently, as `stampede status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusyHost {
    /// The host.
    pub host: String,
    /// Deliveries answered in the current and the previous minute.
    pub deliveries: u64,
    /// Their average latency (ms).
    pub latency_ms: u64,
    /// Requests in flight now, from every worker.
    pub in_flight: u32,
    /// The limit now.
    pub limit: u32,
}

/// The `n` hosts with the most deliveries answered in the current and the
/// previous minute (every worker adds its counts every few seconds), with
/// their limit and requests in flight: four round trips.
pub async fn busy(b: &Backends, cfg: &Config, n: usize) -> Result<Vec<BusyHost>> {
    let minute = (now_ms() / 60_000) as u64;
    let mut sums: std::collections::HashMap<String, (u64, u64)> = Default::default();
    for m in [minute.saturating_sub(1), minute] {
        for (field, v) in b
            .cache
            .hash_get_all(&crate::cache_keys::busy_hosts(m))
            .await?
        {
            let v = v.max(0) as u64;
            match field.strip_suffix(" ms") {
                Some(h) => sums.entry(h.to_string()).or_default().1 += v,
                None => sums.entry(field).or_default().0 += v,
            }
        }
    }
    let mut top: Vec<(String, (u64, u64))> =
        sums.into_iter().filter(|(_, (c, _))| *c > 0).collect();
    top.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then_with(|| a.0.cmp(&b.0)));
    top.truncate(n);
    let slots: Vec<String> = top.iter().map(|(h, _)| host::slots(h)).collect();
    let limits: Vec<String> = top.iter().map(|(h, _)| host::limit(h)).collect();
    let in_flight = b.cache.lease_counts(&slots).await?;
    let limits = b.cache.get_many(&limits).await?;
    Ok(top
        .into_iter()
        .enumerate()
        .map(|(i, (h, (count, ms)))| BusyHost {
            host: h,
            deliveries: count,
            latency_ms: ms / count.max(1),
            in_flight: in_flight.get(i).copied().unwrap_or(0),
            limit: limits
                .get(i)
                .cloned()
                .flatten()
                .and_then(|v| Adaptive::parse(&v))
                .map_or(cfg.host_concurrency, |a| {
                    a.limit().min(cfg.host_concurrency)
                }) as u32,
        })
        .collect())
}

/// Decides what a delivery to `host` does. Takes the probe lease when the
/// circuit is half-open and nobody holds it.
pub async fn gate(b: &Backends, cfg: &Config, host: &str) -> Result<(Gate, HostState)> {
    let s = state(b, host).await?;
    Ok((decide(b, cfg, host, &s).await?, s))
}

/// [`gate`] over a state already read. `Gate::Go`'s limit is the
/// cluster-wide one now: the ramp's and the adaptive limit's lower.
pub async fn decide(b: &Backends, cfg: &Config, host: &str, s: &HostState) -> Result<Gate> {
    let now = now_ms();
    if s.paused {
        return Ok(Gate::Paused);
    }
    if let Some(until) = s.open_until_ms.filter(|u| *u > now) {
        if let Some(since_ms) = s.unavailable(cfg, now) {
            return Ok(Gate::Unavailable { since_ms });
        }
        return Ok(Gate::Open(parked_for(cfg, s.failing_since_ms, until, now)));
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
                return Ok(Gate::Unavailable { since_ms });
            }
            return Ok(Gate::Probe);
        }
        if b.cache
            .set_nx(&host::probe(host), b"1", PROBE_LEASE)
            .await?
        {
            return Ok(Gate::Probe);
        }
        return Ok(Gate::Probing);
    }
    let limit = s.limit(cfg, now);
    Ok(Gate::Go { limit })
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
        host::marked_unavailable(host),
    ] {
        b.cache.del(&k).await?;
    }
    // The probe lease is kept a few seconds, not deleted: a worker that read
    // the open state just before would otherwise take it again and probe a
    // host that has just recovered.
    b.cache
        .set(&host::probe(host), b"recovered", RECOVERED_LEASE)
        .await?;
    if was_open && !cfg.host_ramp.is_zero() {
        let now = now_ms();
        b.cache
            .set(&host::ramp(host), now.to_string().as_bytes(), cfg.host_ramp)
            .await?;
        // The ramp starts every replica at one slot; fast successes grow
        // it, never faster than the ramp allows.
        let one = Adaptive {
            milli: 1000,
            ceiling: 0,
            cut_ms: now,
        };
        b.cache
            .set(&host::limit(host), one.render().as_bytes(), ADAPTIVE_KEEP)
            .await?;
    }
    b.store.set_host_health(host, None).await?;
    if was_open {
        tracing::info!(inbox_host = %host, "host recovered; circuit closed, ramping up");
    }
    Ok(())
}

/// A request sent at `sent_ms` was answered 429 (`told`), 5xx or timed
/// out: the host's limit is halved, once for all the requests in flight
/// then. Returns the new limit when cut.
pub async fn cut_limit(
    b: &Backends,
    cfg: &Config,
    host: &str,
    told: bool,
    sent_ms: i64,
) -> Result<Option<usize>> {
    let key = host::limit(host);
    for _ in 0..3 {
        let raw = b.cache.get(&key).await?;
        let cur = raw.as_deref().and_then(Adaptive::parse);
        let Some(next) = Adaptive::cut(cur, cfg.host_concurrency, told, sent_ms, now_ms()) else {
            return Ok(None);
        };
        if b.cache
            .set_if(
                &key,
                raw.as_deref(),
                next.render().as_bytes(),
                ADAPTIVE_KEEP,
            )
            .await?
        {
            tracing::info!(inbox_host = %host, limit = next.limit(), told, "host limit cut");
            return Ok(Some(next.limit()));
        }
    }
    Ok(None)
}

/// A round of fast successes (as many as the limit): one slot more, unless
/// another replica changed the limit since `s` was read (its change
/// stands). Returns the new limit when grown.
pub async fn grow_limit(
    b: &Backends,
    cfg: &Config,
    host: &str,
    s: &HostState,
) -> Result<Option<usize>> {
    let Some((cur, raw)) = &s.adaptive else {
        return Ok(None);
    };
    let now = now_ms();
    let Some(next) = Adaptive::grow(Some(*cur), s.ramp_limit(cfg, now), now) else {
        return Ok(None);
    };
    let key = host::limit(host);
    let grown = if next.limit() >= cfg.host_concurrency && next.ceiling == 0 {
        // Back at the maximum: no adaptive limit to keep.
        b.cache.get(&key).await?.as_deref() == Some(raw.as_slice()) && {
            b.cache.del(&key).await?;
            true
        }
    } else {
        b.cache
            .set_if(&key, Some(raw), next.render().as_bytes(), ADAPTIVE_KEEP)
            .await?
    };
    Ok(grown.then_some(next.limit()))
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

/// How often a process rereads the unavailable hosts.
pub const UNAVAILABLE_REFRESH: Duration = Duration::from_secs(5);

/// The most unavailable hosts a process holds (and a probe round probes).
pub const UNAVAILABLE_MAX: u32 = 100_000;

/// The hosts marked unavailable in the store, as fanout and inbox see them:
/// reread every [`UNAVAILABLE_REFRESH`].
#[derive(Default)]
pub struct UnavailableHosts(std::sync::RwLock<std::sync::Arc<std::collections::HashSet<String>>>);

impl UnavailableHosts {
    /// Whether no host is unavailable (nothing to look up).
    pub fn is_empty(&self) -> bool {
        self.0.read().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Whether `host` (`name[:port]`, as in inbox URLs) is unavailable.
    pub fn contains(&self, host: &str) -> bool {
        let set = self.0.read().unwrap_or_else(|p| p.into_inner()).clone();
        !set.is_empty() && set.contains(host)
    }

    /// Rereads the set.
    pub async fn load(&self, b: &Backends) -> Result<()> {
        let hosts = b.store.unavailable_hosts(UNAVAILABLE_MAX).await?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) =
            std::sync::Arc::new(hosts.into_iter().collect());
        Ok(())
    }

    /// Drops `host` from the set held (it was just marked available).
    pub fn forget(&self, host: &str) {
        let mut w = self.0.write().unwrap_or_else(|p| p.into_inner());
        if w.contains(host) {
            let mut next = (**w).clone();
            next.remove(host);
            *w = std::sync::Arc::new(next);
        }
    }

    /// Rereads the set every [`UNAVAILABLE_REFRESH`] until `shutdown`; a
    /// failure keeps the set held.
    pub async fn follow(
        self: std::sync::Arc<Self>,
        b: Backends,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            if let Err(e) = self.load(&b).await {
                tracing::warn!(error = %e, "reading the unavailable hosts failed; the ones held stay");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(UNAVAILABLE_REFRESH) => {}
            }
        }
    }
}

/// A delivery found `host` unavailable: the store says so too (fanout skips
/// it from then on), written at most once a minute per host.
pub async fn mark_unavailable(b: &Backends, host: &str, s: &HostState) -> Result<()> {
    if !b
        .cache
        .set_nx(
            &host::marked_unavailable(host),
            b"1",
            Duration::from_secs(60),
        )
        .await?
    {
        return Ok(());
    }
    let now = now_ms();
    b.store
        .set_host_health(
            host,
            Some(&HostHealth {
                host: host.to_string(),
                failing_since_unix_ms: s.failing_since_ms.unwrap_or(now),
                failures: s.failures,
                open_until_unix_ms: s.open_until_ms.unwrap_or(0),
                unavailable: true,
            }),
        )
        .await?;
    tracing::warn!(inbox_host = %host, "host unavailable: fanout skips it until it is found back");
    Ok(())
}

/// A request verified as signed by a key of `host` proves the server is
/// up: fanout makes its deliveries again, and its circuit goes half-open,
/// so the next delivery probes it before anything is sent. True when the
/// host was marked unavailable.
pub async fn revived_by_inbound(b: &Backends, host: &str) -> Result<bool> {
    if !b.store.mark_host_available(host).await? {
        return Ok(false);
    }
    b.cache.del(&host::open(host)).await?;
    tracing::info!(inbox_host = %host, "unavailable host sent a verified request: fanout resumes, deliveries probe it first");
    Ok(true)
}

/// A periodic probe found an unavailable `host` back: its failing state goes
/// (in the cache and the store), its circuit closes and it ramps up.
pub async fn probed_back(b: &Backends, cfg: &Config, host: &str) -> Result<()> {
    let s = state(b, host).await?;
    record_success(b, cfg, host, &s).await?;
    // The cache's failing state may have expired long before.
    b.store.set_host_health(host, None).await?;
    tracing::info!(inbox_host = %host, "unavailable host answered its probe; available again");
    Ok(())
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

    /// Halved once per round (a failure of a request sent before the last
    /// cut is answered already), never below 1; a 429 marks a ceiling the
    /// limit stays under while it holds; grown one at a time to the cap.
    #[test]
    fn the_adaptive_limit_halves_once_per_round_and_grows_under_a_ceiling() {
        let first = Adaptive::cut(None, 8, true, 1_000, 2_000).unwrap();
        assert_eq!((first.limit(), first.ceiling, first.cut_ms), (4, 8, 2_000));
        // Requests sent before the cut: no second cut.
        assert_eq!(Adaptive::cut(Some(first), 8, true, 1_500, 2_100), None);
        let second = Adaptive::cut(Some(first), 8, true, 2_050, 2_200).unwrap();
        assert_eq!((second.limit(), second.ceiling), (2, 4));
        let floor = Adaptive::cut(
            Some(Adaptive {
                milli: 1_500,
                ..second
            }),
            8,
            false,
            3_000,
            3_000,
        );
        assert_eq!(
            floor.map(|a| (a.limit(), a.ceiling)),
            Some((1, 4)),
            "5xx keeps the ceiling"
        );
        // Grows to 3, not to the ceiling of 4 while it holds.
        let mut a = second;
        for _ in 0..5 {
            a = Adaptive::grow(Some(a), 8, 2_300).unwrap_or(a);
        }
        assert_eq!(a.limit(), 3);
        // Then on to the cap.
        for _ in 0..10 {
            a = Adaptive::grow(Some(a), 8, 2_200 + CEILING_HOLD_MS).unwrap_or(a);
        }
        assert_eq!(a.limit(), 8);
        assert_eq!(Adaptive::grow(Some(a), 8, 999_999), None, "at the cap");
        assert_eq!(Adaptive::grow(None, 8, 0), None, "already the maximum");
        assert_eq!(Adaptive::parse(a.render().as_bytes()), Some(a));
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
