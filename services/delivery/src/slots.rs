//! Delivery slots, cluster-wide: a delivery to a host holds one of the
//! host's slots, a lease in the cache taken in the same round trip as the
//! host's state is read (`hosts::read`), so the host's limit holds for
//! every delivery worker together. Leases held are renewed every
//! `SLOT_RENEW`; a killed worker's expire within `SLOT_LEASE`. A release is
//! sent with the next round trip this worker makes (or within a few
//! milliseconds when none comes), so a delivery costs one round trip.
//!
//! Bulk and normal jobs leave one of a host's slots (when its limit is 2 or
//! more) to interactive ones, which are never parked for a full or slow
//! host: an `Accept` or a DM goes out with the next request to a host
//! however much of a fanout is queued for it.
//!
//! A job whose host has no free slot waits here, woken when this worker
//! frees one of the host's slots or, for slots other workers free, by
//! polling: a burst to one host waits milliseconds, never a park. Waiting
//! is bounded so that slow hosts never hold what the others need: jobs of
//! a host answering slowly (or not answering its first request within
//! [`FIRST_ANSWER`]), and jobs expected to wait more than [`SHORT_WAIT`]
//! for a slot, hold at most half of the worker's prefetch; beyond that a
//! job is parked in the broker for about as long as the host takes to get
//! through what is ahead of it.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use stampede_federation::hosts::{self, Gate, HostState, Take, SLOT_LEASE, SLOT_RENEW};
use stampede_proto::queue::DeliveryJob;
use stampede_runtime::{Backends, Config};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Shortest park of a job for a saturated host (the broker's shortest delay).
const PARK_MIN: Duration = Duration::from_secs(5);
/// Longest park.
const PARK_MAX: Duration = Duration::from_secs(300);
/// Longest a job waits in the worker for a slot before it is parked.
const WAIT_MAX: Duration = Duration::from_secs(30);
/// A wait expected to be this short holds the job without counting it
/// against the share of slow hosts.
const SHORT_WAIT: Duration = Duration::from_secs(1);
/// A host that has not answered its first request within this counts as
/// slow until it does.
const FIRST_ANSWER: Duration = Duration::from_millis(250);
/// First and longest pause between looks for a slot another worker freed.
const POLL_MIN: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(200);
/// How long a release waits for a round trip to ride on.
const RELEASE_DELAY: Duration = Duration::from_millis(2);
/// Hosts remembered (latency) while idle; beyond, idle ones are forgotten.
const HOSTS_KEPT: usize = 4096;
/// Weight of the newest latency in a host's average.
const EWMA: f64 = 0.2;

#[derive(Default)]
struct Local {
    in_flight: usize,
    waiting: usize,
    freed: Arc<Notify>,
    /// Average latency of the host's answers (ms), 0 before the first.
    latency_ms: f64,
    /// Since when the host has not answered while requests to it are in
    /// flight: a host that has not answered yet is known slow only by this.
    silent_since: Option<std::time::Instant>,
    /// Fast successes since the limit last grew.
    fast: usize,
    /// Deliveries and their latency (ms) since the last report.
    done: u64,
    done_ms: u64,
    /// Jobs that ended since the last report, and the sum of their
    /// queueing times (unix seconds): the host's backlog shrinks by them.
    ended: u64,
    ended_t: i64,
    /// The host's last answer, when it is news for the report.
    answer: Option<stampede_federation::backlog::LastAnswer>,
    /// The last 2xx seen (unix ms).
    ok_ms: i64,
    /// The last answer put in a report, and when (unix ms).
    last_reported: Option<(u16, i64)>,
}

struct Inner {
    b: Backends,
    /// Releases not yet sent.
    pending: Mutex<Vec<(String, String)>>,
    flush_armed: AtomicBool,
    /// Leases held: holder -> semaphore.
    held: Mutex<HashMap<String, String>>,
    local: Mutex<HashMap<String, Local>>,
    /// Jobs of slow or full hosts held now, and at most.
    slow_held: AtomicUsize,
    slow_cap: usize,
    /// Jobs waiting for a share (at most a quarter of it).
    share_waiters: AtomicUsize,
    /// A success faster than this grows a host's limit.
    fast: Duration,
    /// The minute the backlogs were last tidied.
    tidied: std::sync::atomic::AtomicI64,
}

/// What a worker knows of a host's speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Speed {
    /// Answers within `STAMPEDE_HOST_FAST_MS` on average, and is not silent
    /// for longer now.
    Fast,
    /// Nothing sent to it yet (or nothing in flight and no answer): one job
    /// goes to learn.
    First,
    /// Its first answer is due, for less than [`FIRST_ANSWER`].
    Pending,
    /// Slow on average, silent for longer than a fast answer takes, or no
    /// first answer within [`FIRST_ANSWER`]: its jobs count against the
    /// share of slow hosts.
    Slow,
}

/// The slots of one delivery worker.
#[derive(Clone)]
pub struct Slots(Arc<Inner>);

/// What [`Slots::acquire`] found.
pub enum Acquired {
    /// A slot: deliver (`gate` is `Go` or `Probe`).
    Slot(Slot, HostState, Gate),
    /// No delivery now: the gate says why (paused, circuit open, probing,
    /// unavailable).
    Gate(Gate, HostState),
    /// The host is full and this worker cannot hold the job: park it.
    Park(Duration),
    /// The job itself is in flight from another worker (its lease is held
    /// under the job's name).
    InFlight,
}

/// A slot held; released when dropped.
pub struct Slot {
    slots: Slots,
    host: String,
    holder: Option<String>,
    slow: bool,
    /// The limit when taken.
    pub limit: usize,
    /// Whether the job waited here for it.
    pub waited: bool,
}

impl Local {
    /// What the host's latency looks like now (ms): its average, or how
    /// long it has been silent with requests in flight, if longer.
    fn latency_now_ms(&self) -> f64 {
        let silent = self
            .silent_since
            .filter(|_| self.in_flight > 0)
            .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1000.0);
        self.latency_ms.max(silent)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let inner = &self.slots.0;
        if self.slow {
            inner.slow_held.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(holder) = self.holder.take() {
            let sem = lock(&inner.held).remove(&holder);
            if let Some(sem) = sem {
                lock(&inner.pending).push((sem, holder));
                self.slots.arm_flush();
            }
        }
        let mut local = lock(&inner.local);
        if let Some(l) = local.get_mut(&self.host) {
            l.in_flight = l.in_flight.saturating_sub(1);
            l.freed.notify_one();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Slots {
    /// The slots of a worker holding up to `prefetch` jobs; renews its
    /// leases and reports busy hosts until `shutdown`.
    pub fn new(b: Backends, prefetch: usize, fast: Duration, shutdown: CancellationToken) -> Self {
        let s = Self(Arc::new(Inner {
            b,
            pending: Mutex::default(),
            flush_armed: AtomicBool::new(false),
            held: Mutex::default(),
            local: Mutex::default(),
            slow_held: AtomicUsize::new(0),
            tidied: std::sync::atomic::AtomicI64::new(0),
            share_waiters: AtomicUsize::new(0),
            slow_cap: (prefetch / 2).max(1),
            fast,
        }));
        tokio::spawn(s.clone().keep(shutdown));
        s
    }

    /// Renews the leases held and reports the busy hosts, every
    /// `SLOT_RENEW`.
    async fn keep(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SLOT_RENEW);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let held: Vec<(String, String)> = lock(&self.0.held)
                .iter()
                .map(|(h, s)| (s.clone(), h.clone()))
                .collect();
            if !held.is_empty() {
                if let Err(e) = self.0.b.cache.lease_renew(&held, SLOT_LEASE).await {
                    tracing::warn!(error = %e, leases = held.len(), "renewing delivery slots failed");
                }
            }
            self.report().await;
        }
        self.flush().await;
    }

    /// Adds this worker's deliveries and latency per host since the last
    /// report to the minute's busy-hosts counters (what status shows).
    async fn report(&self) {
        let mut ended = Vec::new();
        let mut answers = Vec::new();
        let counts: Vec<(String, i64)> = {
            let mut local = lock(&self.0.local);
            let mut out = Vec::new();
            for (host, l) in local.iter_mut() {
                if l.done > 0 {
                    out.push((host.clone(), l.done as i64));
                    out.push((format!("{host} ms"), l.done_ms as i64));
                    (l.done, l.done_ms) = (0, 0);
                }
                if l.ended > 0 {
                    ended.push((host.clone(), l.ended, l.ended_t));
                    (l.ended, l.ended_t) = (0, 0);
                }
                if let Some(a) = l.answer.take() {
                    answers.push((host.clone(), a));
                }
            }
            if local.len() > HOSTS_KEPT {
                local.retain(|_, l| l.in_flight > 0 || l.waiting > 0);
            }
            out
        };
        self.report_backlog(&ended, &answers).await;
        if counts.is_empty() {
            return;
        }
        let minute = (stampede_backends::clock::now_secs() / 60) as u64;
        let key = stampede_federation::cache_keys::busy_hosts(minute);
        if let Err(e) = self
            .0
            .b
            .cache
            .hash_incr_many(&key, &counts, Duration::from_secs(180))
            .await
        {
            tracing::debug!(error = %e, "reporting busy hosts failed");
        }
    }

    /// The hosts view's share of the report: backlogs shrunk by the jobs
    /// that ended, last answers; and, once a minute, the ended backlogs
    /// dropped.
    async fn report_backlog(
        &self,
        ended: &[(String, u64, i64)],
        answers: &[(String, stampede_federation::backlog::LastAnswer)],
    ) {
        use stampede_federation::backlog;
        let b = &self.0.b;
        if !ended.is_empty() {
            if let Err(e) = backlog::ended(b, ended).await {
                tracing::debug!(error = %e, "reporting ended deliveries failed");
            }
        }
        if !answers.is_empty() {
            if let Err(e) = backlog::answered(b, answers).await {
                tracing::debug!(error = %e, "reporting hosts' answers failed");
            }
        }
        let minute = stampede_backends::clock::now_secs() / 60;
        if self.0.tidied.swap(minute, Ordering::Relaxed) != minute {
            if let Err(e) = backlog::tidy(b).await {
                tracing::debug!(error = %e, "tidying the backlogs failed");
            }
        }
    }

    /// A job for `host`, queued by fanout at `queued_ms`, ended (delivered,
    /// dead-lettered, dropped): the host's backlog is one shorter.
    pub fn ended(&self, host: &str, queued_ms: i64) {
        let mut local = lock(&self.0.local);
        let l = local.entry(host.to_string()).or_default();
        l.ended += 1;
        l.ended_t += queued_ms / 1000;
    }

    /// `host` answered `status` (None: no answer): news for the hosts view
    /// when it differs from the last reported, or every 10 s.
    pub fn answered(&self, host: &str, status: Option<u16>) {
        let now = stampede_backends::clock::now_ms();
        let status = status.unwrap_or(0);
        let mut local = lock(&self.0.local);
        let l = local.entry(host.to_string()).or_default();
        if (200..300).contains(&status) {
            l.ok_ms = now;
        }
        let news = match (&l.answer, l.last_reported) {
            (Some(_), _) => true,
            (None, Some((s, at))) => s != status || now - at >= 10_000,
            (None, None) => true,
        };
        if news {
            l.answer = Some(stampede_federation::backlog::LastAnswer {
                status,
                at_ms: now,
                ok_ms: l.ok_ms,
            });
            l.last_reported = Some((status, now));
        }
    }

    fn take_pending(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *lock(&self.0.pending))
    }

    /// Sends the releases waiting for a round trip, soon, unless one takes
    /// them first.
    fn arm_flush(&self) {
        if self.0.flush_armed.swap(true, Ordering::AcqRel) {
            return;
        }
        // A slot dropped while the runtime shuts down: its lease expires.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let s = self.clone();
        rt.spawn(async move {
            tokio::time::sleep(RELEASE_DELAY).await;
            s.0.flush_armed.store(false, Ordering::Release);
            s.flush().await;
        });
    }

    async fn flush(&self) {
        let release = self.take_pending();
        if release.is_empty() {
            return;
        }
        if let Err(e) = self.0.b.cache.lease(&release, &[], None).await {
            // They expire within the lease.
            tracing::warn!(error = %e, slots = release.len(), "releasing delivery slots failed");
        }
    }

    /// A slot for `host` with its state, read in one round trip: now, or
    /// after waiting for one while the worker can hold the job; the gate
    /// when the host takes no delivery now; otherwise how long to park.
    pub async fn acquire(
        &self,
        cfg: &Config,
        host: &str,
        job: &DeliveryJob,
        interactive: bool,
    ) -> stampede_runtime::Result<Acquired> {
        let inner = &self.0;
        // The lease is named after the job, the same in every process: a
        // copy of a job in flight elsewhere finds its lease held.
        let holder = job_holder(job);
        let deadline = tokio::time::Instant::now() + WAIT_MAX;
        let mut poll = POLL_MIN;
        // Whether this job counts against the share of slow or full hosts,
        // and whether it is registered as waiting.
        let mut slow = false;
        let mut pause = POLL_MIN;
        let mut queued = false;
        let until = tokio::time::Instant::now() + SHORT_WAIT;
        loop {
            match self.speed(host) {
                Speed::Fast | Speed::First => break,
                // An interactive job (an `Accept`, a DM) is never parked for
                // a slow host: it waits for the slot kept for it.
                Speed::Slow | Speed::Pending if interactive => break,
                // Its first answer is due: it shows the host fast within
                // milliseconds, or slow within `FIRST_ANSWER`.
                Speed::Pending => {}
                Speed::Slow => {
                    slow = self.take_slow();
                    if slow {
                        break;
                    }
                    // No share left: wait a moment for one, but only a few
                    // jobs at once; the rest are parked.
                    if !queued {
                        queued = inner
                            .share_waiters
                            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                                (n < (inner.slow_cap / 4).max(1)).then_some(n + 1)
                            })
                            .is_ok();
                    }
                    if !queued || tokio::time::Instant::now() >= until {
                        if queued {
                            inner.share_waiters.fetch_sub(1, Ordering::AcqRel);
                        }
                        let expected = self.expected_wait(host, cfg.host_concurrency);
                        return Ok(Acquired::Park(expected.clamp(PARK_MIN, PARK_MAX)));
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX);
        }
        if queued {
            inner.share_waiters.fetch_sub(1, Ordering::AcqRel);
        }
        let mut waiting = false;
        let give_back = |slow: bool, waiting: bool| {
            if slow {
                inner.slow_held.fetch_sub(1, Ordering::Relaxed);
            }
            if waiting {
                if let Some(l) = lock(&inner.local).get_mut(host) {
                    l.waiting = l.waiting.saturating_sub(1);
                }
            }
        };
        loop {
            let release = self.take_pending();
            let take = Take {
                holder: &holder,
                max: cfg.host_concurrency,
                reserve: u32::from(!interactive),
            };
            let read = hosts::read(&inner.b, host, Some(take), &release).await;
            let (state, leased) = match read {
                Ok(r) => r,
                Err(e) => {
                    lock(&inner.pending).extend(release);
                    give_back(slow, waiting);
                    return Err(e);
                }
            };
            if leased.already_held {
                give_back(slow, waiting);
                return Ok(Acquired::InFlight);
            }
            if leased.taken {
                lock(&inner.held).insert(
                    holder.clone(),
                    stampede_federation::cache_keys::host::slots(host),
                );
            }
            let gate = match hosts::decide(&inner.b, cfg, host, &state).await {
                Ok(g) => g,
                Err(e) => {
                    give_back(slow, waiting);
                    self.release(&holder);
                    return Err(e);
                }
            };
            match gate {
                Gate::Go { .. } | Gate::Probe if leased.taken => {
                    let mut local = lock(&inner.local);
                    let l = local.entry(host.to_string()).or_default();
                    if l.in_flight == 0 {
                        l.silent_since = Some(std::time::Instant::now());
                    }
                    l.in_flight += 1;
                    if waiting {
                        l.waiting = l.waiting.saturating_sub(1);
                    }
                    drop(local);
                    let slot = Slot {
                        slots: self.clone(),
                        host: host.to_string(),
                        holder: Some(holder),
                        slow,
                        limit: leased.limit.max(1) as usize,
                        waited: waiting,
                    };
                    return Ok(Acquired::Slot(slot, state, gate));
                }
                Gate::Go { .. } => {}
                // Probing needs no slot: nothing else is in flight to a
                // host whose circuit is half-open.
                Gate::Probe => {
                    let slot = Slot {
                        slots: self.clone(),
                        host: host.to_string(),
                        holder: None,
                        slow,
                        limit: 1,
                        waited: waiting,
                    };
                    if waiting {
                        give_back(false, true);
                    }
                    lock(&inner.local)
                        .entry(host.to_string())
                        .or_default()
                        .in_flight += 1;
                    return Ok(Acquired::Slot(slot, state, gate));
                }
                other => {
                    if leased.taken {
                        self.release(&holder);
                    }
                    give_back(slow, waiting);
                    return Ok(Acquired::Gate(other, state));
                }
            }
            // Full: wait here if the worker can hold the job. A short wait
            // (the host gets through what is ahead within `SHORT_WAIT`) is
            // free; a longer one counts against the share of slow hosts.
            let limit = leased.limit.max(1) as usize;
            if !waiting {
                let expected = self.expected_wait(host, limit);
                if expected > SHORT_WAIT && !slow && !interactive {
                    slow = self.take_slow();
                    if !slow {
                        return Ok(Acquired::Park(expected.clamp(PARK_MIN, PARK_MAX)));
                    }
                }
                lock(&inner.local)
                    .entry(host.to_string())
                    .or_default()
                    .waiting += 1;
                waiting = true;
            }
            if tokio::time::Instant::now() >= deadline {
                give_back(slow, waiting);
                let expected = self.expected_wait(host, limit);
                return Ok(Acquired::Park(expected.clamp(PARK_MIN, PARK_MAX)));
            }
            let freed = lock(&inner.local)
                .entry(host.to_string())
                .or_default()
                .freed
                .clone();
            let _ = tokio::time::timeout(
                poll.min(deadline - tokio::time::Instant::now()),
                freed.notified(),
            )
            .await;
            poll = (poll * 2).min(POLL_MAX);
        }
    }

    fn release(&self, holder: &str) {
        if let Some(sem) = lock(&self.0.held).remove(holder) {
            lock(&self.0.pending).push((sem, holder.to_string()));
            self.arm_flush();
        }
    }

    fn take_slow(&self) -> bool {
        let inner = &self.0;
        inner
            .slow_held
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < inner.slow_cap).then_some(n + 1)
            })
            .is_ok()
    }

    /// What this worker knows of the host's speed.
    fn speed(&self, host: &str) -> Speed {
        let fast_ms = self.0.fast.as_secs_f64() * 1000.0;
        let local = lock(&self.0.local);
        let Some(l) = local.get(host) else {
            return Speed::First;
        };
        if l.latency_ms == 0.0 {
            return match l.silent_since.filter(|_| l.in_flight > 0) {
                None => Speed::First,
                Some(t) if t.elapsed() < FIRST_ANSWER => Speed::Pending,
                Some(_) => Speed::Slow,
            };
        }
        if l.latency_now_ms() > fast_ms {
            Speed::Slow
        } else {
            Speed::Fast
        }
    }

    /// About how long one more job of `host` would wait here: the host
    /// gets through the jobs this worker holds for it `limit` at a time, at
    /// its average latency (none known yet: no wait).
    fn expected_wait(&self, host: &str, limit: usize) -> Duration {
        let local = lock(&self.0.local);
        let Some(l) = local.get(host) else {
            return Duration::ZERO;
        };
        let rounds = (l.waiting + 1) as f64 / limit.max(1) as f64;
        Duration::from_secs_f64(rounds.ceil() * l.latency_now_ms() / 1000.0)
    }

    /// Records a finished request to `host`; true when it completes a round
    /// of fast successes (as many as the limit): time to grow the limit.
    pub fn finished(&self, slot: &Slot, latency: Duration, success: bool) -> bool {
        let ms = latency.as_secs_f64() * 1000.0;
        let mut local = lock(&self.0.local);
        let l = local.entry(slot.host.clone()).or_default();
        l.latency_ms = if l.latency_ms == 0.0 {
            ms
        } else {
            l.latency_ms * (1.0 - EWMA) + ms * EWMA
        };
        l.silent_since = Some(std::time::Instant::now());
        l.done += 1;
        l.done_ms += ms as u64;
        if !(success && latency <= self.0.fast) {
            l.fast = 0;
            return false;
        }
        l.fast += 1;
        if l.fast >= slot.limit {
            l.fast = 0;
            return true;
        }
        false
    }
}

/// The name of a job's lease: a hash of its activity and inbox (FNV-1a,
/// the same in every process and version).
fn job_holder(job: &DeliveryJob) -> String {
    let h = [job.activity_key.as_bytes(), b"\n", job.inbox.as_bytes()]
        .iter()
        .flat_map(|p| p.iter())
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    format!("j{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &std::path::Path, limit: &str) -> Config {
        let m: HashMap<String, String> = [
            ("STAMPEDE_DATA_DIR", dir.display().to_string()),
            ("STAMPEDE_HOST_CONCURRENCY", limit.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Config::from_lookup(|k| m.get(k).cloned()).unwrap()
    }

    fn slot(a: Acquired) -> Slot {
        match a {
            Acquired::Slot(s, _, _) => s,
            Acquired::Gate(g, _) => panic!("gate {g:?}"),
            Acquired::Park(d) => panic!("parked {d:?}"),
            Acquired::InFlight => panic!("in flight"),
        }
    }

    /// A job of its own.
    fn job() -> DeliveryJob {
        DeliveryJob {
            activity_key: uuid::Uuid::new_v4().to_string(),
            inbox: "https://h/inbox".into(),
            ..DeliveryJob::default()
        }
    }

    /// A copy of a job in flight, in this worker or another, takes no slot
    /// and is told so; once the first settles, the copy gets one.
    #[tokio::test]
    async fn a_copy_of_a_job_in_flight_is_told_so() {
        let dir = std::env::temp_dir().join(format!("stampede-slots-{}", uuid::Uuid::new_v4()));
        let c = cfg(&dir, "8");
        let b = Backends::open(&c, "test").await.unwrap();
        let stop = CancellationToken::new();
        let one = Slots::new(b.clone(), 64, Duration::from_secs(1), stop.clone());
        let two = Slots::new(b.clone(), 64, Duration::from_secs(1), stop.clone());
        let j = job();
        let first = slot(one.acquire(&c, "h", &j, false).await.unwrap());
        assert!(matches!(
            two.acquire(&c, "h", &j, false).await.unwrap(),
            Acquired::InFlight
        ));
        assert!(matches!(
            one.acquire(&c, "h", &j, false).await.unwrap(),
            Acquired::InFlight
        ));
        // Another job of the same activity is not a copy.
        let other = DeliveryJob {
            inbox: "https://h/other".into(),
            ..j.clone()
        };
        let _o = slot(two.acquire(&c, "h", &other, false).await.unwrap());
        drop(first);
        let _again = slot(two.acquire(&c, "h", &j, false).await.unwrap());
        stop.cancel();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Two workers over one cache share a host's limit; a freed slot goes
    /// to a waiter in milliseconds, not after a park.
    #[tokio::test]
    async fn two_workers_share_a_hosts_limit_and_a_waiter_gets_a_freed_slot() {
        let dir = std::env::temp_dir().join(format!("stampede-slots-{}", uuid::Uuid::new_v4()));
        // A limit of 3: 2 for these, 1 kept for interactive deliveries.
        let c = cfg(&dir, "3");
        let b = Backends::open(&c, "test").await.unwrap();
        let stop = CancellationToken::new();
        let one = Slots::new(b.clone(), 64, Duration::from_secs(1), stop.clone());
        let two = Slots::new(b.clone(), 64, Duration::from_secs(1), stop.clone());
        let a = slot(one.acquire(&c, "h", &job(), false).await.unwrap());
        let _b = slot(two.acquire(&c, "h", &job(), false).await.unwrap());
        // Full for both: a waiter on worker two gets worker one's slot.
        let waiter = {
            let (two, c) = (two.clone(), c.clone());
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let s = slot(two.acquire(&c, "h", &job(), false).await.unwrap());
                (started.elapsed(), s)
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let counts = b
            .cache
            .lease_counts(&[stampede_federation::cache_keys::host::slots("h")])
            .await
            .unwrap();
        assert_eq!(counts, [2]);
        // An interactive delivery takes the slot kept for it at once.
        let dm = slot(one.acquire(&c, "h", &job(), true).await.unwrap());
        assert!(!dm.waited);
        drop(dm);
        drop(a);
        let (waited, _s) = waiter.await.unwrap();
        assert!(waited < Duration::from_millis(600), "{waited:?}");
        // Other hosts are not affected.
        let _other = slot(one.acquire(&c, "other", &job(), false).await.unwrap());
        stop.cancel();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Jobs of a slow host hold at most half of the worker's prefetch;
    /// beyond, they are parked, and other hosts' jobs go on.
    #[tokio::test]
    async fn a_slow_host_holds_only_its_share_then_jobs_park() {
        let dir = std::env::temp_dir().join(format!("stampede-slots-{}", uuid::Uuid::new_v4()));
        let c = cfg(&dir, "1");
        let b = Backends::open(&c, "test").await.unwrap();
        let stop = CancellationToken::new();
        // A prefetch of 4: slow hosts hold at most 2.
        let s = Slots::new(b.clone(), 4, Duration::from_secs(1), stop.clone());
        let first = slot(s.acquire(&c, "h", &job(), false).await.unwrap());
        assert!(!s.finished(&first, Duration::from_secs(2), true), "slow");
        drop(first);
        let fast = slot(s.acquire(&c, "g", &job(), false).await.unwrap());
        s.finished(&fast, Duration::from_millis(10), true);
        drop(fast);
        // A first request goes out to learn the host's speed; one that
        // stays unanswered makes the host slow.
        let unknown = slot(s.acquire(&c, "u", &job(), false).await.unwrap());
        assert_eq!(s.0.slow_held.load(Ordering::Relaxed), 0);
        assert_eq!(s.speed("u"), Speed::Pending);
        tokio::time::sleep(FIRST_ANSWER).await;
        assert_eq!(s.speed("u"), Speed::Slow);
        let held = slot(s.acquire(&c, "h", &job(), false).await.unwrap());
        let waiter = {
            let (s, c) = (s.clone(), c.clone());
            tokio::spawn(async move {
                matches!(
                    s.acquire(&c, "h", &job(), false).await,
                    Ok(Acquired::Slot(..))
                )
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(s.0.slow_held.load(Ordering::Relaxed), 2);
        match s.acquire(&c, "h", &job(), false).await.unwrap() {
            Acquired::Park(d) => assert!(d >= PARK_MIN, "{d:?}"),
            _ => panic!("not parked"),
        }
        // The unanswered host's next job finds no share left.
        assert!(matches!(
            s.acquire(&c, "u", &job(), false).await.unwrap(),
            Acquired::Park(_)
        ));
        drop(unknown);
        // A fast host is not affected, and a burst to it waits, not parks.
        let g = slot(s.acquire(&c, "g", &job(), false).await.unwrap());
        let g_waiter = {
            let (s, c) = (s.clone(), c.clone());
            tokio::spawn(async move {
                matches!(
                    s.acquire(&c, "g", &job(), false).await,
                    Ok(Acquired::Slot(..))
                )
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(g);
        assert!(g_waiter.await.unwrap());
        drop(held);
        assert!(waiter.await.unwrap());
        assert_eq!(s.0.slow_held.load(Ordering::Relaxed), 0);
        stop.cancel();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
