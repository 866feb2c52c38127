//! Publishing an outbound activity: validate and complete it, store it once,
//! put a reference on the fanout queue. `Publish` (ingest) and the inbox's
//! own answers (`Accept`, `Reject`) go through here.
use prost::Message;
use stampede_core::activity::prepare_outbound;
use stampede_proto::queue::FanoutJob;

use crate::queue::{OutMessage, QueueName};
use crate::store::{Inserted, LocalActor, NewActivity};
use crate::{Backends, Config, Error, Result};

/// Protobuf name of the fanout job, carried as the AMQP `type`.
pub const FANOUT_JOB: &str = "stampede.queue.v1.FanoutJob";
/// Protobuf name of the delivery job.
pub const DELIVERY_JOB: &str = "stampede.queue.v1.DeliveryJob";

/// Queues dead letters again (their attempts start over) and marks them
/// replayed: one of `id`, `host`, or all when both are `None`. Returns how
/// many. Marked only after the broker confirmed the jobs, so a failure
/// replays nothing twice and loses nothing.
pub async fn replay_dead_letters(b: &Backends, id: Option<i64>, host: Option<&str>) -> Result<u64> {
    let mut total = 0;
    loop {
        let rows = b.store.dead_letters_to_replay(id, host, 500).await?;
        if rows.is_empty() {
            return Ok(total);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let jobs = rows
            .iter()
            .map(|d| OutMessage {
                kind: DELIVERY_JOB,
                payload: stampede_proto::queue::DeliveryJob {
                    activity_key: d.activity_key.clone(),
                    inbox: d.inbox.clone(),
                    attempt: 0,
                    first_attempt_unix_ms: now,
                    trace: crate::telemetry::current_trace_context(),
                    // Rare and operator-driven: check the record first.
                    may_be_delivered: true,
                }
                .encode_to_vec(),
            })
            .collect();
        b.queue.publish_batch(QueueName::Delivery, jobs).await?;
        let ids: Vec<i64> = rows.iter().map(|d| d.id).collect();
        b.store.mark_replayed(&ids).await?;
        total += ids.len() as u64;
        if id.is_some() {
            return Ok(total);
        }
    }
}

/// What publishing produced.
#[derive(Debug, Clone)]
pub struct Published {
    /// The stored activity (the earlier one when the idempotency key was used).
    pub inserted: Inserted,
    /// Activity type.
    pub kind: String,
}

/// Validates `body` as an activity of `actor`, stores it (idempotent on
/// `idempotency_key`) and queues it for fanout. [`Error::Invalid`] for a body
/// that is not a valid activity of this actor; [`Error::Queue`] when the
/// queue cannot take it (the caller retries with the same key).
pub async fn publish(
    cfg: &Config,
    b: &Backends,
    actor: &LocalActor,
    body: &[u8],
    idempotency_key: Option<String>,
) -> Result<Published> {
    let max = cfg.max_activity_bytes;
    if body.len() > max {
        return Err(Error::Invalid(format!(
            "activity is {} bytes; the limit is {max}",
            body.len()
        )));
    }
    let actor_id = cfg.actor_id(&actor.name);
    let base = cfg.base();
    let prepared = prepare_outbound(body, &actor_id, |kind| {
        format!("{base}/{kind}/{}", uuid::Uuid::now_v7())
    })
    .map_err(|e| Error::Invalid(e.to_string()))?;
    let under_base = prepared
        .id
        .strip_prefix(base)
        .is_some_and(|rest| rest.starts_with('/'));
    if !under_base {
        return Err(Error::Invalid(format!(
            "activity id {} is not under {base}",
            prepared.id
        )));
    }
    let kind = prepared.kind.clone();
    let inserted = b
        .store
        .insert_activity(NewActivity {
            key: uuid::Uuid::now_v7().to_string(),
            ap_id: prepared.id.clone(),
            actor_id: actor.id,
            kind: prepared.kind,
            object_id: prepared.object_id,
            idempotency_key,
            body: prepared.json,
            delivered_body: prepared.delivered_body,
        })
        .await
        .map_err(|e| match e {
            Error::Conflict(_) => Error::Conflict(format!(
                "an activity with id {} exists already",
                prepared.id
            )),
            e => e,
        })?;
    if !inserted.enqueued {
        let job = FanoutJob {
            activity_key: inserted.key.clone(),
            trace: None,
            attempt: 0,
        };
        b.queue
            .publish(
                QueueName::Fanout,
                OutMessage {
                    kind: FANOUT_JOB,
                    payload: job.encode_to_vec(),
                },
            )
            .await?;
        b.store.mark_enqueued(&inserted.key).await?;
    }
    Ok(Published { inserted, kind })
}
