//! What delivery is waiting for: deliveries parked in the broker's delay
//! queues (a paused host, an open circuit, a full lane, a retry), counted per
//! reason in the shared cache, so `stampede status` and the demo see them
//! whichever delivery worker parked them.
//!
//! A parked job sits in a delay queue that neither backend can count by
//! reason (RabbitMQ holds it in a delay-tier queue, the embedded queue in a
//! row), and the worker that parked it may be gone when it comes back. So
//! nothing is decremented: each park adds one to a counter named by its
//! reason and the time it is due back (`{reason}:{due_ms}`, one hash in the
//! cache), and a reader sums the counters not yet due. A job that comes back
//! drops out of the count at its due time by itself, a crash cannot leave a
//! count behind, and a job parked again is counted again under its new due
//! time. Due times are rounded down to a step of 1/64 to 1/32 of the delay
//! (a power of two milliseconds, at least 128 ms), so one hash holds a few
//! hundred counters per reason at most, whatever the load. A job leaves the
//! count at most that step before it is due: down, not up, so one parked
//! again as it comes back (behind a circuit still open) is not counted
//! twice meanwhile.
use std::collections::BTreeMap;
use std::time::Duration;

use stampede_backends::cache::Cache;
use stampede_runtime::Result;

/// The hash of parked-delivery counters.
const KEY: &str = crate::cache_keys::PARKED;
/// Kept this long past the latest due time it holds.
const SLACK: Duration = Duration::from_secs(60);

/// Why a delivery waits in a delay queue instead of being tried now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Its host is paused by an operator (`stampede host pause`).
    Paused,
    /// Its host's circuit is open (or another worker is probing it).
    CircuitOpen,
    /// Its host's lane in the worker was full.
    Saturated,
    /// The worker ran out of descriptors, ports or memory to try it.
    LocalExhausted,
    /// Its last attempt failed; the next is scheduled.
    Retry,
    /// A copy of it (redelivered while its first holder still ran) was
    /// being sent by another worker: looked at again once that settled.
    InFlight,
}

impl Reason {
    /// Every reason, in the order status lists them.
    pub const ALL: [Reason; 6] = [
        Reason::CircuitOpen,
        Reason::Retry,
        Reason::Saturated,
        Reason::Paused,
        Reason::LocalExhausted,
        Reason::InFlight,
    ];

    /// Its name in status and in the cache.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Paused => "paused",
            Reason::CircuitOpen => "circuit_open",
            Reason::Saturated => "saturated",
            Reason::LocalExhausted => "local_exhausted",
            Reason::Retry => "retry",
            Reason::InFlight => "in_flight",
        }
    }

    /// The reason named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Deliveries parked for one reason, as counted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parked {
    /// Why they wait.
    pub reason: Reason,
    /// How many.
    pub deliveries: u64,
    /// When the first of them is due back (unix ms, rounded down).
    pub next_due_ms: i64,
}

/// The rounding step of a due time `delay` ahead.
fn step_ms(delay: Duration) -> i64 {
    let ms = (delay.as_millis() as u64 / 64).max(128);
    ms.next_power_of_two() as i64
}

/// Counts one delivery parked for `reason`, due back after `delay`.
pub async fn record(cache: &dyn Cache, reason: Reason, delay: Duration) -> Result<()> {
    record_at(cache, reason, delay, stampede_backends::clock::now_ms()).await
}

/// The deliveries parked now, per reason (only reasons with any), in
/// [`Reason::ALL`] order.
pub async fn parked(cache: &dyn Cache) -> Result<Vec<Parked>> {
    parked_at(cache, stampede_backends::clock::now_ms()).await
}

/// Sets the gauge `stampede_delivery_parked{reason}` from the cache every
/// `every` until `shutdown`. The delivery service runs it: the parked
/// deliveries are its own.
pub async fn sample(
    metrics: std::sync::Arc<stampede_runtime::metrics::Metrics>,
    cache: std::sync::Arc<dyn Cache>,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(now) = parked(&*cache).await else {
            continue;
        };
        for r in Reason::ALL {
            let n = now
                .iter()
                .find(|p| p.reason == r)
                .map_or(0, |p| p.deliveries);
            metrics
                .delivery_parked
                .get_or_create(&[("reason", r.as_str())])
                .set(n as i64);
        }
    }
}

async fn record_at(cache: &dyn Cache, reason: Reason, delay: Duration, now_ms: i64) -> Result<()> {
    let step = step_ms(delay);
    let due = now_ms.saturating_add(delay.as_millis() as i64);
    let due = due.div_euclid(step).saturating_mul(step);
    let field = format!("{}:{due}", reason.as_str());
    cache.hash_incr(KEY, &field, 1, delay + SLACK).await?;
    Ok(())
}

/// The deliveries parked at `now_ms`; counters already due are removed on
/// the way.
async fn parked_at(cache: &dyn Cache, now_ms: i64) -> Result<Vec<Parked>> {
    let mut by: BTreeMap<usize, Parked> = BTreeMap::new();
    let mut past = Vec::new();
    for (field, n) in cache.hash_get_all(KEY).await? {
        let parsed = field
            .split_once(':')
            .and_then(|(r, due)| Some((Reason::parse(r)?, due.parse::<i64>().ok()?)));
        let Some((reason, due)) = parsed else {
            past.push(field);
            continue;
        };
        if due <= now_ms {
            past.push(field);
            continue;
        }
        if n <= 0 {
            continue;
        }
        let order = Reason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        let p = by.entry(order).or_insert(Parked {
            reason,
            deliveries: 0,
            next_due_ms: due,
        });
        p.deliveries += n as u64;
        p.next_due_ms = p.next_due_ms.min(due);
    }
    cache.hash_del(KEY, &past).await?;
    Ok(by.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stampede_backends::cache::memory::MemoryCache;

    #[tokio::test]
    async fn parked_deliveries_count_until_due_per_reason() {
        let c = MemoryCache::new();
        let t0 = 1_000_000_000;
        for _ in 0..3 {
            record_at(&c, Reason::CircuitOpen, Duration::from_secs(12), t0)
                .await
                .unwrap();
        }
        record_at(&c, Reason::Retry, Duration::from_secs(1), t0)
            .await
            .unwrap();
        record_at(&c, Reason::Retry, Duration::from_secs(4), t0 + 500)
            .await
            .unwrap();
        record_at(&c, Reason::Paused, Duration::from_secs(5), t0)
            .await
            .unwrap();
        let now = parked_at(&c, t0).await.unwrap();
        assert_eq!(
            now.iter()
                .map(|p| (p.reason, p.deliveries))
                .collect::<Vec<_>>(),
            [
                (Reason::CircuitOpen, 3),
                (Reason::Retry, 2),
                (Reason::Paused, 1)
            ]
        );
        // Due times are rounded down, by less than 1/32 of the delay (128 ms at least).
        let retry = now[1];
        assert!(retry.next_due_ms > t0 + 1000 - 128 && retry.next_due_ms <= t0 + 1000);
        let open = now[0].next_due_ms - t0;
        assert!((12_000 - 12_000 / 32..=12_000).contains(&open), "{open}");
        // The retry due after a second is back in the queue two seconds on:
        // no longer counted, and its counter is gone.
        let later = parked_at(&c, t0 + 2000).await.unwrap();
        assert_eq!(
            later
                .iter()
                .map(|p| (p.reason, p.deliveries))
                .collect::<Vec<_>>(),
            [
                (Reason::CircuitOpen, 3),
                (Reason::Retry, 1),
                (Reason::Paused, 1)
            ]
        );
        assert_eq!(c.hash_get_all(KEY).await.unwrap().len(), 3);
        assert!(parked_at(&c, t0 + 60_000).await.unwrap().is_empty());
        assert!(c.hash_get_all(KEY).await.unwrap().is_empty());
    }

    #[test]
    fn steps_are_small_against_the_delay_and_few_per_hash() {
        assert_eq!(step_ms(Duration::from_secs(1)), 128);
        assert_eq!(step_ms(Duration::from_secs(60)), 1024);
        let six_hours = step_ms(Duration::from_secs(6 * 3600));
        assert!(six_hours <= 6 * 3600 * 1000 / 32, "{six_hours}");
    }
}
