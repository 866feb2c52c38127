//! The retention pruner (README, "Retention"): deletes success records and
//! dead letters past their retention, a batch at a time with a pause
//! between, run by one delivery process of the cluster at a time (the one
//! holding a lease in the cache).
//!
//! Success records are the guard against sending a job twice; what keeps
//! that guard for every job still queued is [`Config::job_expiry`]: a job is
//! sent only while younger than three quarters of the records' retention.
use std::time::Duration;

use stampede_backends::clock::now_ms;
use stampede_backends::store::postgres::PRUNE_BATCH;
use stampede_federation::cache_keys;
use stampede_runtime::process::Process;
use stampede_runtime::{Config, Result};

/// Pause between two batches, so that pruning a large backlog leaves the
/// store to the deliveries.
const BATCH_PAUSE: Duration = Duration::from_millis(50);
/// The longest time between two rounds.
const MAX_INTERVAL: Duration = Duration::from_secs(300);

/// How often a round runs: a tenth of the shorter retention (a row
/// outlives its retention by at most that much), between 1 s and 5 min;
/// `None` when nothing is pruned.
pub fn interval(cfg: &Config) -> Option<Duration> {
    [cfg.delivery_record_retention, cfg.dead_letter_retention]
        .into_iter()
        .flatten()
        .min()
        .map(|r| (r / 10).clamp(Duration::from_secs(1), MAX_INTERVAL))
}

/// Prunes every [`interval`] until shutdown. Failures are logged and the
/// round is tried again at the next tick.
pub async fn run(p: Process) {
    let Some(every) = interval(&p.cfg) else {
        tracing::info!("retention off: success records and dead letters are kept");
        return;
    };
    let token = format!("{}:{:016x}", std::process::id(), rand::random::<u64>());
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = p.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = round(&p, &token, every).await {
            tracing::warn!(error = %e, "retention pruning failed; trying again next round");
        }
    }
}

/// One round, if this process wins the lease: each table pruned to its
/// cutoff. The lease is kept (renewed between batches) while the round
/// runs and left to expire after it, so the cluster prunes once an interval.
async fn round(p: &Process, token: &str, lease: Duration) -> Result<()> {
    let b = &p.backends;
    let key = cache_keys::retention_lease();
    if !b.cache.set_nx(&key, token.as_bytes(), lease).await? {
        tracing::debug!("another process is pruning");
        return Ok(());
    }
    let now = now_ms();
    let ms = |d: Duration| now - i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    if let Some(kept) = p.cfg.delivery_record_retention {
        let cutoff = ms(kept);
        prune(p, token, lease, "deliveries", cutoff, || {
            b.store.prune_delivery_records(cutoff, PRUNE_BATCH)
        })
        .await?;
        prune(p, token, lease, "delivery_status", cutoff, || {
            b.store.prune_status_records(cutoff, PRUNE_BATCH)
        })
        .await?;
    }
    if let Some(kept) = p.cfg.dead_letter_retention {
        let cutoff = ms(kept);
        prune(p, token, lease, "dead_letters", cutoff, || {
            b.store.prune_dead_letters(cutoff, cutoff, PRUNE_BATCH)
        })
        .await?;
    }
    Ok(())
}

/// Runs `batch` until it deletes less than a whole batch, the lease is
/// lost, or the process stops; counts and logs what it deleted.
async fn prune<F, Fut>(
    p: &Process,
    token: &str,
    lease: Duration,
    table: &'static str,
    cutoff_unix_ms: i64,
    batch: F,
) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = stampede_backends::Result<u64>>,
{
    let counter = p
        .metrics
        .retention_pruned
        .get_or_create(&[("table", table)])
        .clone();
    let key = cache_keys::retention_lease();
    let mut pruned = 0;
    let outcome = loop {
        let n = match batch().await {
            Ok(n) => n,
            Err(e) => break Err(e.into()),
        };
        pruned += n;
        counter.inc_by(n);
        if n < u64::from(PRUNE_BATCH) || p.shutdown.is_cancelled() {
            break Ok(());
        }
        tokio::time::sleep(BATCH_PAUSE).await;
        let (token, value) = (Some(token.as_bytes()), token.as_bytes());
        match p.backends.cache.set_if(&key, token, value, lease).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(table, "retention lease lost; another process prunes");
                break Ok(());
            }
            Err(e) => break Err(e.into()),
        }
    };
    if pruned > 0 {
        tracing::info!(
            table,
            pruned,
            cutoff_unix_ms,
            "pruned rows past their retention"
        );
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Config {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| m.get(k).cloned()).expect("valid configuration")
    }

    #[test]
    fn rounds_run_a_tenth_of_the_shorter_retention_apart() {
        assert_eq!(interval(&cfg(&[])), Some(MAX_INTERVAL));
        let short = cfg(&[
            ("STAMPEDE_RETRY_SCHEDULE_SECS", "1"),
            ("STAMPEDE_DELIVERY_RECORD_RETENTION", "40s"),
            ("STAMPEDE_DEAD_LETTER_RETENTION", "off"),
        ]);
        assert_eq!(interval(&short), Some(Duration::from_secs(4)));
        let off = cfg(&[
            ("STAMPEDE_DELIVERY_RECORD_RETENTION", "off"),
            ("STAMPEDE_DEAD_LETTER_RETENTION", "0"),
        ]);
        assert_eq!(interval(&off), None);
    }
}
