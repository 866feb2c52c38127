//! Per-host lanes inside one delivery worker: at most `limit` deliveries in
//! flight to a host, and at most `limit` more waiting (briefly) for a slot.
//! Any further job for that host is not waited for (the consumer never
//! blocks on one host): it is parked in the broker, for longer the more
//! often the host was found saturated. So a host with a deep backlog holds
//! at most 2 x `limit` of the worker's prefetch and costs a bounded number
//! of re-queues, while every other host's deliveries go on; a short burst
//! to one host (ten followers on one server) waits milliseconds, not a park.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// Shortest park of a job for a saturated host.
const PARK_MIN: Duration = Duration::from_secs(5);
/// Longest park.
const PARK_MAX: Duration = Duration::from_secs(300);
/// Longest a job waits in the worker for a slot before it is parked.
const WAIT_MAX: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Lane {
    in_flight: usize,
    waiting: usize,
    /// Jobs parked since the lane last ran empty.
    parked: u32,
    freed: Arc<Notify>,
}

/// The lanes of one worker.
#[derive(Default, Clone)]
pub struct Lanes {
    inner: Arc<Mutex<HashMap<String, Lane>>>,
}

/// A delivery slot; frees itself when dropped.
pub struct Slot {
    lanes: Lanes,
    host: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.lanes.lock();
        if let Some(l) = map.get_mut(&self.host) {
            l.in_flight = l.in_flight.saturating_sub(1);
            l.freed.notify_one();
            if l.in_flight == 0 && l.waiting == 0 {
                map.remove(&self.host);
            }
        }
    }
}

impl Lanes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lane>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for `host` now, or after a short wait when fewer than `limit`
    /// jobs already wait for one; otherwise how long to park the job.
    pub async fn acquire(&self, host: &str, limit: usize) -> Result<Slot, Duration> {
        let limit = limit.max(1);
        let deadline = tokio::time::Instant::now() + WAIT_MAX;
        let mut waited = false;
        loop {
            let freed = {
                let mut map = self.lock();
                let lane = map.entry(host.to_string()).or_default();
                if waited {
                    lane.waiting -= 1;
                }
                if lane.in_flight < limit {
                    lane.in_flight += 1;
                    return Ok(Slot {
                        lanes: self.clone(),
                        host: host.to_string(),
                    });
                }
                if lane.waiting >= limit || tokio::time::Instant::now() >= deadline {
                    lane.parked = lane.parked.saturating_add(1);
                    // One more park period for every four times the limit parked.
                    let periods = 1 + lane.parked / (4 * limit as u32);
                    return Err((PARK_MIN * periods).min(PARK_MAX));
                }
                lane.waiting += 1;
                lane.freed.clone()
            };
            waited = true;
            let _ = tokio::time::timeout_at(deadline, freed.notified()).await;
        }
    }

    /// Deliveries in flight to `host`.
    #[cfg(test)]
    pub fn in_flight(&self, host: &str) -> usize {
        self.lock().get(host).map_or(0, |l| l.in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_busy_host_waits_briefly_then_parks_and_others_go_on() {
        let lanes = Lanes::default();
        let a = lanes.acquire("a", 1).await.unwrap();
        // One waiter is allowed; it gets the slot as soon as it is freed.
        let waiter = {
            let lanes = lanes.clone();
            tokio::spawn(async move { lanes.acquire("a", 1).await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A second waiter would exceed the limit: parked at once.
        assert_eq!(lanes.acquire("a", 1).await.err(), Some(PARK_MIN));
        // Other hosts are not affected.
        let _c = lanes.acquire("c", 1).await.unwrap();
        drop(a);
        assert!(waiter.await.unwrap());
        for _ in 0..4 {
            let _ = lanes.acquire("a", 1).await;
        }
        assert_eq!(lanes.in_flight("a"), 0);
        let held = lanes.acquire("a", 1).await.unwrap();
        let _w = {
            let lanes = lanes.clone();
            tokio::spawn(async move { lanes.acquire("a", 1).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(lanes.acquire("a", 1).await, Err(d) if d >= PARK_MIN));
        drop(held);
    }
}
