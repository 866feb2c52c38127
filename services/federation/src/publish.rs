//! Publishing an outbound activity: validate and complete it, store it once,
//! put a reference on the fanout queue. `Publish` (ingest) and the inbox's
//! own answers (`Accept`, `Reject`) go through here.
use prost::Message;
use stampede_core::activity::prepare_outbound;
use stampede_proto::queue::FanoutJob;

use stampede_backends::queue::{OutMessage, QueueName};
use stampede_backends::store::{ActorRef, Inserted, NewActivity};
use stampede_runtime::{Backends, Config, Error, Result};

use stampede_proto::kinds::FANOUT_JOB;

/// How a local actor answers a `Follow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FollowAnswer {
    /// `Accept`: the follower was added.
    Accept,
    /// `Reject`.
    Reject,
}

/// Publishes `actor`'s `Accept` or `Reject` of the `Follow` activity
/// `follow` (sent by `follower`, with id `follow_id` when it had one) to the
/// follower. The idempotency key is the answer and the `Follow`'s id, so
/// a `Follow` delivered twice, or decided twice, is answered once.
pub async fn answer_follow(
    cfg: &Config,
    b: &Backends,
    actor: &ActorRef,
    follow: &serde_json::Value,
    follower: &str,
    follow_id: Option<&str>,
    answer: FollowAnswer,
) -> Result<Published> {
    let kind = match answer {
        FollowAnswer::Accept => "Accept",
        FollowAnswer::Reject => "Reject",
    };
    let body =
        stampede_core::activity::follow_answer(kind, &cfg.actor_id(&actor.name), follow, follower);
    let key = follow_id.map(|id| format!("{}:{id}", kind.to_ascii_lowercase()));
    publish(cfg, b, actor, body.to_string().as_bytes(), key).await
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
/// `idempotency_key`) and queues it for fanout. Only the actor's id and
/// name are used: its key is read by delivery, which signs. [`Error::Invalid`] for a body
/// that is not a valid activity of this actor; [`Error::Queue`] when the
/// queue cannot take it (the caller retries with the same key).
pub async fn publish(
    cfg: &Config,
    b: &Backends,
    actor: &ActorRef,
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
            stampede_backends::Error::Conflict(_) => Error::Conflict(format!(
                "an activity with id {} exists already",
                prepared.id
            )),
            e => e.into(),
        })?;
    if !inserted.enqueued {
        let job = FanoutJob {
            activity_key: inserted.key.clone(),
            trace: None,
            attempt: 0,
            ..FanoutJob::default()
        };
        b.queue
            .publish(
                QueueName::Fanout,
                OutMessage {
                    kind: FANOUT_JOB,
                    payload: job.encode_to_vec(),
                    route: None,
                },
            )
            .await?;
        b.store.mark_enqueued(&inserted.key).await?;
    }
    Ok(Published { inserted, kind })
}
