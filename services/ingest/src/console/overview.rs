//! The overview's series: the last 15 minutes in points of 5 s, kept by
//! the console's process so a page opened late sees them all. Rates come
//! from the cluster-wide buckets every process writes
//! (`stampede_runtime::rates`), queue depths and head ages from the same
//! calls `Status` makes.
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use stampede_backends::clock::now_ms;
use stampede_runtime::rates::{self, BUCKET_MS};
use stampede_runtime::Backends;
use tokio_util::sync::CancellationToken;

/// Points kept: 15 minutes.
const POINTS: usize = (15 * 60 * 1000 / BUCKET_MS) as usize;
/// A bucket is read this long after it ends (every writer has flushed it).
const SETTLE_MS: i64 = 1_000;

/// One point of the overview.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Point {
    /// The end of the bucket, unix ms.
    pub t: i64,
    /// Deliveries per second by outcome (those seen in the bucket).
    pub deliveries: BTreeMap<String, f64>,
    /// Inbound activities per second: `accepted` and `refused` at the
    /// edge, `verified` and `rejected` by the inbox service.
    pub inbound: BTreeMap<&'static str, f64>,
    /// Key cache hits over lookups in the bucket; none without lookups.
    pub key_cache_hit_ratio: Option<f64>,
    /// Per queue class (`interactive`, `normal`, `bulk`) and the other
    /// queues by name: ready messages, and the head's age in seconds for
    /// the delivery classes. Empty for points from before the console ran.
    pub queues: BTreeMap<String, QueuePoint>,
}

/// One queue (or class: its shards summed) at one point.
#[derive(Clone, Debug, Serialize, Default)]
pub(crate) struct QueuePoint {
    /// Ready messages.
    pub depth: u64,
    /// The head's wait, seconds (delivery classes only).
    pub head_age_secs: Option<f64>,
}

/// The points, oldest first.
#[derive(Default)]
pub(crate) struct Series {
    points: Mutex<VecDeque<Point>>,
}

impl Series {
    /// The points after `since` (unix ms).
    pub(crate) fn since(&self, since: i64) -> Vec<Point> {
        let points = self.points.lock().unwrap_or_else(|p| p.into_inner());
        points.iter().filter(|p| p.t > since).cloned().collect()
    }

    fn push(&self, p: Point) {
        let mut points = self.points.lock().unwrap_or_else(|p| p.into_inner());
        points.push_back(p);
        while points.len() > POINTS {
            points.pop_front();
        }
    }

    /// Adds a point for every bucket that has ended, until `shutdown`:
    /// first the last 15 minutes', then one every 5 s.
    pub(crate) async fn run(&self, backends: Backends, shutdown: CancellationToken) {
        let mut next = (now_ms() - SETTLE_MS) / BUCKET_MS - POINTS as i64;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let ended = (now_ms() - SETTLE_MS) / BUCKET_MS - 1;
            if next > ended {
                continue;
            }
            // Queue depths are of now: only the newest point gets them.
            let queues = queues(&backends).await;
            while next <= ended {
                let counts = match rates::read(&backends, next).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "overview: rates unread");
                        Default::default()
                    }
                };
                let mut p = point(next, &counts);
                if next == ended {
                    p.queues = queues.clone();
                }
                self.push(p);
                next += 1;
            }
        }
    }
}

/// The point of bucket `n` from its counts.
fn point(n: i64, counts: &std::collections::HashMap<String, i64>) -> Point {
    let per_s = |v: i64| v.max(0) as f64 * 1000.0 / BUCKET_MS as f64;
    let mut deliveries = BTreeMap::new();
    let mut inbound: BTreeMap<&'static str, f64> = ["accepted", "refused", "verified", "rejected"]
        .into_iter()
        .map(|k| (k, 0.0))
        .collect();
    let (mut hits, mut misses) = (0, 0);
    for (field, v) in counts {
        let mut parts = field.split(':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("delivery"), Some(outcome), None) => {
                *deliveries.entry(outcome.to_string()).or_insert(0.0) += per_s(*v);
            }
            (Some("inbound"), Some(stage), Some(result)) => {
                let k = match (stage, result == "accepted") {
                    ("edge", true) => "accepted",
                    ("edge", false) => "refused",
                    (_, true) => "verified",
                    (_, false) => "rejected",
                };
                *inbound.entry(k).or_insert(0.0) += per_s(*v);
            }
            (Some("key_cache"), Some("hit"), None) => hits += v.max(&0),
            (Some("key_cache"), Some(_), None) => misses += v.max(&0),
            _ => {}
        }
    }
    Point {
        t: (n + 1) * BUCKET_MS,
        deliveries,
        inbound,
        key_cache_hit_ratio: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
        queues: BTreeMap::new(),
    }
}

/// Depth and head age per delivery class (shards summed, the oldest head)
/// and depth of the other queues, as `Status` reads them; empty when the
/// queue does not answer.
async fn queues(b: &Backends) -> BTreeMap<String, QueuePoint> {
    let mut out: BTreeMap<String, QueuePoint> = BTreeMap::new();
    let Ok(depths) = b.queue.depths().await else {
        return out;
    };
    let ages = stampede_federation::queue_heads::head_ages(&*b.cache, &depths)
        .await
        .unwrap_or_default();
    for d in &depths {
        let class = d
            .name
            .delivery_class()
            .map(stampede_backends::queue::class_name);
        let q = out
            .entry(class.unwrap_or(d.name.suffix()).to_string())
            .or_default();
        q.depth += d.messages;
        if class.is_some() {
            let age = ages.get(&d.name).copied().unwrap_or(0) as f64 / 1000.0;
            q.head_age_secs = Some(q.head_age_secs.unwrap_or(0.0).max(age));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_becomes_rates_per_second() {
        let counts = [
            ("delivery:delivered", 50),
            ("delivery:retry", 5),
            ("inbound:edge:accepted", 10),
            ("inbound:edge:rate_limited", 5),
            ("inbound:verify:accepted", 10),
            ("inbound:verify:bad_signature", 1),
            ("key_cache:hit", 3),
            ("key_cache:miss", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let p = point(2, &counts);
        assert_eq!(p.t, 3 * BUCKET_MS);
        assert_eq!(p.deliveries["delivered"], 10.0);
        assert_eq!(p.deliveries["retry"], 1.0);
        assert_eq!(p.inbound["accepted"], 2.0);
        assert_eq!(p.inbound["refused"], 1.0);
        assert_eq!(p.inbound["verified"], 2.0);
        assert_eq!(p.inbound["rejected"], 0.2);
        assert_eq!(p.key_cache_hit_ratio, Some(0.75));
        assert_eq!(point(0, &Default::default()).key_cache_hit_ratio, None);
    }
}
