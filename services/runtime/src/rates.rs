//! Cluster-wide rates for the admin console's overview (README, "Admin
//! console"): every process adds what its counters grew by (deliveries by
//! outcome, inbound activities by stage and result, key cache lookups) to
//! one hash in the cache per [`BUCKET_MS`]; the console reads the buckets.
//! So the overview shows every replica's work, not only the process that
//! serves the page, at the cost of one cache write per process every 2.5 s.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::Backends;

/// The span of one bucket of counts.
pub const BUCKET_MS: i64 = 5_000;

/// How long a bucket is kept: the overview's 15 minutes and some.
const TTL: Duration = Duration::from_secs(20 * 60);

/// The cache key of bucket `n` (the one starting at `n * BUCKET_MS`).
pub fn key(n: i64) -> String {
    format!("rates:{n}")
}

/// The counters published, by their name in the text exposition, and the
/// prefix of their fields in a bucket.
const COUNTERS: [(&str, &str); 3] = [
    ("stampede_deliveries_total{", "delivery"),
    ("stampede_inbound_activities_total{", "inbound"),
    ("stampede_key_cache_lookups_total{", "key_cache"),
];

/// The published counters' values now, by field: `delivery:delivered`,
/// `inbound:edge:accepted`, `key_cache:hit`.
pub fn counters(exposition: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for line in exposition.lines() {
        let Some((prefix, rest)) = COUNTERS
            .iter()
            .find_map(|(name, prefix)| line.strip_prefix(name).map(|r| (*prefix, r)))
        else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let mut field = prefix.to_string();
        for pair in labels.split(',') {
            if let Some((_, v)) = pair.split_once('=') {
                field.push(':');
                field.push_str(v.trim_matches('"'));
            }
        }
        out.insert(field, value as u64);
    }
    out
}

/// Adds what this process's counters grew by to the current bucket every
/// 2.5 s (so every bucket gets each process's counts), until `shutdown`.
/// A failed write is tried again with the next growth: nothing is lost
/// while the cache is away but the bucket it fell in.
pub async fn publish(metrics: Arc<Metrics>, backends: Backends, shutdown: CancellationToken) {
    let mut published: HashMap<String, u64> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(BUCKET_MS as u64 / 2));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = counters(&metrics.render());
        let grown: Vec<(String, i64)> = now
            .iter()
            .filter_map(|(k, v)| {
                let d = v.saturating_sub(published.get(k).copied().unwrap_or(0));
                (d > 0).then(|| (k.clone(), d as i64))
            })
            .collect();
        if grown.is_empty() {
            continue;
        }
        let bucket = stampede_backends::clock::now_ms() / BUCKET_MS;
        match backends
            .cache
            .hash_incr_many(&key(bucket), &grown, TTL)
            .await
        {
            Ok(()) => published = now,
            Err(e) => tracing::debug!(error = %e, "rates not published"),
        }
    }
}

/// The counts of bucket `n`, every process's summed.
pub async fn read(backends: &Backends, n: i64) -> crate::Result<HashMap<String, i64>> {
    Ok(backends
        .cache
        .hash_get_all(&key(n))
        .await?
        .into_iter()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_from_the_exposition_by_label() {
        let text = "# HELP x\n\
            stampede_deliveries_total{outcome=\"delivered\"} 12\n\
            stampede_deliveries_total{outcome=\"retry\"} 0\n\
            stampede_inbound_activities_total{stage=\"edge\",result=\"accepted\"} 3\n\
            stampede_key_cache_lookups_total{result=\"hit\"} 7\n\
            stampede_queue_messages{queue=\"fanout\"} 9\n";
        let c = counters(text);
        assert_eq!(c["delivery:delivered"], 12);
        assert_eq!(c["delivery:retry"], 0);
        assert_eq!(c["inbound:edge:accepted"], 3);
        assert_eq!(c["key_cache:hit"], 7);
        assert_eq!(c.len(), 4);
    }
}
