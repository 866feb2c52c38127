//! The inbound side of the gRPC API: the verified stream (`Subscribe`), the
//! verifier for other services (`Verify`), and decisions on Follows that wait
//! for approval.
use std::collections::BTreeMap;
use std::pin::Pin;

use futures::Stream;
use prost::Message;
use stampede_backends::queue::{Acker, Incoming, QueueName};
use stampede_core::activity::parse_json;
use stampede_core::verify::HttpRequest;
use stampede_federation::publish;
use stampede_federation::verify::{activity_info, Verdict};
use stampede_proto::api::{
    follow_service_server::FollowService, inbound_service_server::InboundService, FollowDecision,
    FollowDecisionResponse, InboundActivity, SubscribeRequest, VerifyRequest, VerifyResponse,
};
use stampede_proto::queue::VerifiedActivity;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::{Ingest, IngestError};

/// `stampede.v1.InboundService`.
#[derive(Clone)]
pub struct InboundApi(pub(crate) Ingest);
/// `stampede.v1.FollowService`.
#[derive(Clone)]
pub struct FollowApi(pub(crate) Ingest);

/// Activities sent to a subscriber before it must acknowledge some.
const SUBSCRIBE_WINDOW: u16 = 256;

type ActivityStream = Pin<Box<dyn Stream<Item = Result<InboundActivity, Status>> + Send>>;

/// Settles what one request of a subscriber acknowledges. The oldest
/// pending ids it covers in a row (`ack_through`, or listed in `ack`) are
/// acknowledged to the broker at once (`multiple`: every earlier message of
/// the consumer is among them, since ids are handed out in the broker's
/// order and all pending are in `pending`); ids acknowledged out of order
/// one by one. Unknown ids (settled already, or never sent) are ignored.
async fn acknowledge(
    pending: &mut BTreeMap<u64, Box<dyn Acker>>,
    r: SubscribeRequest,
) -> stampede_backends::Result<()> {
    let mut listed = r.ack;
    listed.sort_unstable();
    let covered = |id: u64| id <= r.ack_through || listed.binary_search(&id).is_ok();
    let run = pending
        .keys()
        .take_while(|&&id| covered(id))
        .last()
        .copied();
    if let Some(last) = run {
        let later = pending.split_off(&(last + 1));
        let mut run = std::mem::replace(pending, later);
        if let Some((_, acker)) = run.pop_last() {
            if run.is_empty() {
                acker.ack().await?;
            } else {
                acker.ack_multiple().await?;
            }
        }
    }
    for id in listed {
        if let Some(a) = pending.remove(&id) {
            a.ack().await?;
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl InboundService for InboundApi {
    type SubscribeStream = ActivityStream;

    async fn subscribe(
        &self,
        req: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut acks = req.into_inner();
        let mut consumer = self
            .0
            .backends
            .queue
            .consume(QueueName::App, SUBSCRIBE_WINDOW)
            .await
            .map_err(IngestError::from)?;
        let (tx, rx) =
            mpsc::channel::<Result<InboundActivity, Status>>(usize::from(SUBSCRIBE_WINDOW));
        tokio::spawn(async move {
            // Bounded by the consumer's prefetch (SUBSCRIBE_WINDOW).
            let mut pending: BTreeMap<u64, Box<dyn Acker>> = BTreeMap::new();
            let mut next_id = 0u64;
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    m = acks.message() => match m {
                        Ok(Some(r)) => {
                            if let Err(e) = acknowledge(&mut pending, r).await {
                                tracing::warn!(error = %e, "subscriber ack failed");
                            }
                        }
                        _ => break,
                    },
                    msg = consumer.next() => match msg {
                        Some(Ok(Incoming { payload, acker, traceparent, .. })) => {
                            let span = tracing::info_span!("subscribe.deliver");
                            stampede_runtime::telemetry::set_parent(&span, traceparent.as_deref());
                            let ev = match VerifiedActivity::decode(payload.as_ref()) {
                                Ok(ev) => ev,
                                Err(e) => {
                                    tracing::warn!(error = %e, "undecodable event on the application queue; dropped");
                                    let _ = acker.ack().await;
                                    continue;
                                }
                            };
                            next_id += 1;
                            pending.insert(next_id, acker);
                            let out = InboundActivity {
                                delivery_id: next_id,
                                activity_json: ev.activity_json,
                                verdict: ev.verdict,
                                recipient_inbox: ev.recipient_inbox,
                                actor: ev.actor,
                                activity_id: ev.activity_id,
                                activity_type: ev.activity_type,
                                received_unix_ms: ev.received_unix_ms,
                                policy: ev.policy,
                            };
                            if tracing::Instrument::instrument(tx.send(Ok(out)), span)
                                .await
                                .is_err()
                            {
                                break;
                            }
                        }
                        _ => break,
                    },
                }
            }
            // Closing the consumer's channel hands whatever was not
            // acknowledged back to the queue for the next subscriber.
            consumer.close().await;
            tracing::debug!(unacknowledged = pending.len(), "subscriber left");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn verify(
        &self,
        req: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let r = req.into_inner();
        let headers: Vec<(String, String)> = r
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
            .collect();
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        // A body that is an activity (an object with a `type`) must be one
        // that can be read: verifying only the key would vouch for an
        // actor the caller might then read out of the body unchecked.
        let (info, unreadable, json) = match parse_json(&r.body) {
            Ok(j) if j.get("type").is_some() => match activity_info(&j) {
                Ok(i) => (Some(i), None, j),
                Err(reason) => (None, Some(reason), j),
            },
            _ => (None, None, serde_json::Value::Null),
        };
        let http = HttpRequest {
            method: &r.method,
            scheme: self.0.cfg.public_url.scheme(),
            path_and_query: &r.path,
            headers: &headers,
            body: &r.body,
        };
        // Not through the edge: no client address, one ration for the caller.
        let mut v = self
            .0
            .verifier
            .verify_activity(&http, info.as_ref().map(|i| (i, &json)), "verify-rpc")
            .await;
        if let (Verdict::Accepted, Some(reason)) = (v.verdict, unreadable) {
            v.verdict = Verdict::Malformed;
            v.reason = format!("signed, but not a readable activity: {reason}");
            v.owner = None;
        }
        Ok(Response::new(VerifyResponse {
            verdict: v.verdict.as_str().into(),
            reason: v.reason,
            key_id: v.key_id.unwrap_or_default(),
            actor: v.owner.unwrap_or_default(),
        }))
    }
}

impl FollowApi {
    async fn decide(
        &self,
        d: FollowDecision,
        accept: bool,
    ) -> Result<FollowDecisionResponse, IngestError> {
        let s = &self.0;
        let store = &s.backends.store;
        let actor = store
            .actor_ref_by_name(&d.actor)
            .await?
            .ok_or_else(|| IngestError::NotFound(format!("no local actor named `{}`", d.actor)))?;
        let (follower, follow) = store
            .take_follow_request(actor.id, &d.follower)
            .await?
            .ok_or_else(|| {
                IngestError::NotFound(format!(
                    "no pending follow of {} by {}",
                    d.actor, d.follower
                ))
            })?;
        if accept {
            store.add_follower(actor.id, &follower).await?;
        }
        let answer = if accept {
            publish::FollowAnswer::Accept
        } else {
            publish::FollowAnswer::Reject
        };
        let published = publish::answer_follow(
            &s.cfg,
            &s.backends,
            &actor,
            &follow,
            &follower.actor,
            follower.follow_id.as_deref(),
            answer,
        )
        .await?;
        tracing::info!(actor = %actor.name, follower = %follower.actor, ?answer, "follow decided");
        Ok(FollowDecisionResponse {
            activity_id: published.inserted.ap_id,
        })
    }
}

#[tonic::async_trait]
impl FollowService for FollowApi {
    async fn accept_follow(
        &self,
        req: Request<FollowDecision>,
    ) -> Result<Response<FollowDecisionResponse>, Status> {
        Ok(Response::new(self.decide(req.into_inner(), true).await?))
    }

    async fn reject_follow(
        &self,
        req: Request<FollowDecision>,
    ) -> Result<Response<FollowDecisionResponse>, Status> {
        Ok(Response::new(self.decide(req.into_inner(), false).await?))
    }
}
