//! Dead letters replayed: queued again as delivery jobs, attempts starting
//! over (`stampede dlq replay`, `AdminService.ReplayDeadLetters`).
//!
//! One dead letter replayed by its id is an operator's targeted retry: the
//! `normal` class. A replay by host or of all of them can be the thousands
//! of deliveries a dead server gathered over two days: `bulk`, so it
//! drains behind fresh posts instead of in front of them.
use prost::Message;
use stampede_backends::queue::{OutMessage, QueueName};
use stampede_proto::kinds::DELIVERY_JOB;
use stampede_proto::queue::DeliveryClass;
use stampede_runtime::{Backends, Result};

/// Queues dead letters again (their attempts start over) and marks them
/// replayed: one of `id`, `host`, or all when both are `None`. Returns how
/// many. Marked only after the broker confirmed the jobs, so a failure
/// replays nothing twice and loses nothing.
pub async fn replay(b: &Backends, id: Option<i64>, host: Option<&str>) -> Result<u64> {
    let mut total = 0;
    let class = if id.is_some() {
        DeliveryClass::Normal
    } else {
        DeliveryClass::Bulk
    };
    loop {
        let rows = b.store.dead_letters_to_replay(id, host, 500).await?;
        if rows.is_empty() {
            return Ok(total);
        }
        let now = stampede_backends::clock::now_ms();
        let jobs = rows
            .iter()
            .map(|d| OutMessage {
                kind: DELIVERY_JOB,
                payload: stampede_proto::queue::DeliveryJob {
                    activity_key: d.activity_key.clone(),
                    inbox: d.inbox.clone(),
                    attempt: 0,
                    first_attempt_unix_ms: now,
                    trace: stampede_runtime::telemetry::current_trace_context(),
                    // Rare and operator-driven: check the record first.
                    may_be_delivered: true,
                    class: class.into(),
                    // A digest of then would be stale: none.
                    collection_synchronization: String::new(),
                }
                .encode_to_vec(),
                route: None,
            })
            .collect();
        b.queue
            .publish_batch(QueueName::delivery(class), jobs)
            .await?;
        let ids: Vec<i64> = rows.iter().map(|d| d.id).collect();
        b.store.mark_replayed(&ids).await?;
        total += ids.len() as u64;
        if id.is_some() {
            return Ok(total);
        }
    }
}
