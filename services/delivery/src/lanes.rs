//! Per-host lanes inside one delivery worker: at most `limit` deliveries in
//! flight to a host. A job for a saturated host is not waited for (the
//! consumer never blocks on one host): it is parked in the broker, for
//! longer the more often the host was found saturated, so a host with a
//! deep backlog costs a bounded number of re-queues while every other host's
//! deliveries go on.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Shortest park of a job for a saturated host.
const PARK_MIN: Duration = Duration::from_secs(5);
/// Longest park.
const PARK_MAX: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Lane {
    in_flight: usize,
    /// Jobs parked since the lane last ran empty.
    parked: u32,
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
        let mut map = self.lanes.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = map.get_mut(&self.host) {
            l.in_flight = l.in_flight.saturating_sub(1);
            if l.in_flight == 0 {
                map.remove(&self.host);
            }
        }
    }
}

impl Lanes {
    /// A slot for `host`, or how long to park the job when the host has
    /// `limit` deliveries in flight.
    pub fn try_acquire(&self, host: &str, limit: usize) -> Result<Slot, Duration> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let lane = map.entry(host.to_string()).or_default();
        if lane.in_flight >= limit.max(1) {
            lane.parked = lane.parked.saturating_add(1);
            // One more park period for every four times the limit parked.
            let periods = 1 + lane.parked / (4 * limit.max(1) as u32);
            return Err((PARK_MIN * periods).min(PARK_MAX));
        }
        lane.in_flight += 1;
        Ok(Slot {
            lanes: self.clone(),
            host: host.to_string(),
        })
    }

    /// Deliveries in flight to `host`.
    pub fn in_flight(&self, host: &str) -> usize {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.get(host).map_or(0, |l| l.in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saturated_host_parks_for_longer_and_frees_on_drop() {
        let lanes = Lanes::default();
        let a = lanes.try_acquire("a", 2).unwrap();
        let _b = lanes.try_acquire("a", 2).unwrap();
        assert_eq!(lanes.try_acquire("a", 2).err(), Some(PARK_MIN));
        // Other hosts are not affected.
        let _c = lanes.try_acquire("c", 2).unwrap();
        for _ in 0..8 {
            let _ = lanes.try_acquire("a", 2);
        }
        assert_eq!(lanes.try_acquire("a", 2).err(), Some(PARK_MIN * 2));
        drop(a);
        assert_eq!(lanes.in_flight("a"), 1);
        assert!(lanes.try_acquire("a", 2).is_ok());
    }
}
