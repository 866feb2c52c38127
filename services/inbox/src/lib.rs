//! Service: inbox. Consumes what the edge queued, verifies it (HTTP
//! Signatures draft-cavage and RFC 9421, digests, the date window, that the
//! key is the actor's; keys cached and refetched on rotation), drops
//! duplicates, applies the federation side effects stampede owns (Follow,
//! Undo of a Follow, Delete and Update of actors) and hands verified
//! activities to the application through the verified-events exchange.
#![deny(missing_docs)]

use std::time::Duration;

use prost::Message;
use serde_json::Value;
use stampede_core::activity::{follow_answer, parse_json};
use stampede_core::targets::inbox_host;
use stampede_core::verify::HttpRequest;
use stampede_proto::queue::{InboundJob, VerifiedActivity};
use stampede_runtime::inbound::{activity_info, ActivityInfo, Verdict, Verifier};
use stampede_runtime::outbound;
use stampede_runtime::process::{Listeners, Process};
use stampede_runtime::queue::{Incoming, OutMessage, QueueName};
use stampede_runtime::remote::{remote_actor, Resolver};
use stampede_runtime::store::{Follower, LocalActor};
use stampede_runtime::worker;

/// Protobuf name of the inbound job.
pub const INBOUND_JOB: &str = "stampede.queue.v1.InboundJob";
/// Protobuf name of the verified activity event.
pub const VERIFIED_ACTIVITY: &str = "stampede.queue.v1.VerifiedActivity";
/// How long an activity id is remembered per inbox to drop replays.
const DEDUP_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Attempts for an activity whose key's server could not be reached.
const MAX_ATTEMPTS: u32 = 4;

/// What inbox fails at.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// A backend failed.
    #[error(transparent)]
    Runtime(#[from] stampede_runtime::Error),
}

/// The inbox worker (one reference count to clone: it is cloned per message).
#[derive(Clone)]
pub struct Inbox(std::sync::Arc<Parts>);

impl std::ops::Deref for Inbox {
    type Target = Parts;
    fn deref(&self) -> &Parts {
        &self.0
    }
}

#[doc(hidden)]
pub struct Parts {
    p: Process,
    verifier: Verifier,
    resolver: Resolver,
}

impl Inbox {
    /// Inbox over a process's backends.
    pub fn new(p: Process) -> Self {
        Self(std::sync::Arc::new(Parts {
            verifier: Verifier::new(p.clone()),
            resolver: Resolver::new(p.clone()),
            p,
        }))
    }

    /// Consumes the inbound queue until shutdown.
    pub async fn run(self) -> Result<(), InboxError> {
        let (p, prefetch) = (self.p.clone(), self.p.cfg.prefetch);
        worker::serve(&p, QueueName::Inbound, prefetch, self).await?;
        Ok(())
    }
}

impl worker::Handler for Inbox {
    async fn handle(&self, msg: Incoming) {
        let q = &*self.p.backends.queue;
        let m = &self.p.metrics;
        let job: InboundJob = match worker::decode(&msg, INBOUND_JOB) {
            Ok(j) => j,
            Err(reason) => return worker::poison(q, m, QueueName::Inbound, msg, &reason).await,
        };
        let settle = match self.process(&job).await {
            Ok(None) => msg.acker.ack().await,
            Ok(Some(accepted)) => {
                // Publishing the event is the whole effect: one step with the ack.
                let done = msg
                    .acker
                    .ack_with_event(q, "accepted", accepted.event)
                    .await;
                match done {
                    Ok(()) => {
                        m.inbound_verify("accepted");
                        // Per activity, like "delivered": debug (metrics count it).
                        tracing::debug!(activity_id = ?accepted.info.id, kind = %accepted.info.kind, actor = %accepted.info.actor, recipient = %job.recipient_inbox, "inbound accepted");
                        Ok(())
                    }
                    Err(e) => {
                        // Not published: forget the dedup mark so the
                        // message, handed out again, is not taken for a copy.
                        if let Some(key) = &accepted.seen {
                            let _ = self.p.backends.cache.del(key).await;
                        }
                        tracing::warn!(error = %e, "publishing a verified activity failed; retrying");
                        msg.acker.requeue().await
                    }
                }
            }
            Err(Later::RateLimited { wait }) => match self.later(&job, wait).await {
                // Not an attempt: the activity is verified, only early.
                Ok(()) => {
                    m.inbound_verify("rate_limited");
                    msg.acker.ack().await
                }
                Err(_) => msg.acker.requeue().await,
            },
            Err(later) => {
                let wait = match later {
                    Later::Failed(e, wait) => {
                        tracing::warn!(error = %e, recipient = %job.recipient_inbox, "inbound processing failed; retrying later");
                        wait
                    }
                    // Per message, and what a flood of forged requests
                    // produces: counted, logged at debug.
                    Later::Deferred { reason, wait } => {
                        tracing::debug!(%reason, recipient = %job.recipient_inbox, attempt = job.attempt, "inbound verification deferred");
                        wait
                    }
                    Later::RateLimited { wait } => Some(wait),
                };
                // process() decides a verdict on the last attempt itself;
                // only a failing backend runs out here.
                match self.retry(&job, wait).await {
                    Ok(true) => {
                        m.inbound_verify("deferred");
                        msg.acker.ack().await
                    }
                    Ok(false) => {
                        m.inbound_verify("failed");
                        msg.acker.ack().await
                    }
                    Err(_) => msg.acker.requeue().await,
                }
            }
        };
        if let Err(e) = settle {
            tracing::warn!(error = %e, "settling the message failed; the broker will redeliver it");
        }
    }
}

/// Why an inbound job is tried again later.
enum Later {
    /// Processing failed (a backend, or the key's server) and may succeed
    /// later, best after the wait when one is known.
    Failed(InboxError, Option<Duration>),
    /// Verification could not decide yet (the key's server unreachable, a
    /// key fetch rationed), best tried again after the wait when known.
    Deferred {
        reason: String,
        wait: Option<Duration>,
    },
    /// Its verified sender's host is over `STAMPEDE_INBOUND_RATE_LIMIT`
    /// this minute: it waits for the next, not counted as an attempt.
    RateLimited { wait: Duration },
}

impl From<InboxError> for Later {
    fn from(e: InboxError) -> Self {
        Later::Failed(e, None)
    }
}

impl From<stampede_runtime::Error> for Later {
    fn from(e: stampede_runtime::Error) -> Self {
        Later::Failed(e.into(), None)
    }
}

/// A verified activity's event for the application, and what to log or undo.
struct Accepted {
    event: OutMessage,
    info: ActivityInfo,
    /// The dedup mark set for it, removed again if publishing fails.
    seen: Option<String>,
}

impl Inbox {
    /// Schedules another attempt, after `wait` when it is longer than the
    /// usual delay; false when attempts are exhausted.
    async fn retry(
        &self,
        job: &InboundJob,
        wait: Option<Duration>,
    ) -> Result<bool, stampede_runtime::Error> {
        if job.attempt + 1 >= MAX_ATTEMPTS {
            return Ok(false);
        }
        let next = InboundJob {
            attempt: job.attempt + 1,
            ..job.clone()
        };
        let delay = Duration::from_secs(30u64 << job.attempt.min(4)).max(wait.unwrap_or_default());
        self.later(&next, delay).await?;
        Ok(true)
    }

    /// Puts `job` back on the inbound queue for `delay`.
    async fn later(
        &self,
        job: &InboundJob,
        delay: Duration,
    ) -> Result<(), stampede_runtime::Error> {
        self.p
            .backends
            .queue
            .publish_delayed(
                QueueName::Inbound,
                OutMessage {
                    kind: INBOUND_JOB,
                    payload: job.encode_to_vec(),
                },
                delay,
            )
            .await?;
        Ok(())
    }

    /// Verifies and applies one inbound activity; an accepted one comes back
    /// with the event for the application, to be published with the ack. An
    /// error leaves nothing done that a retry would repeat.
    async fn process(&self, job: &InboundJob) -> Result<Option<Accepted>, Later> {
        let m = &self.p.metrics;
        let json = match parse_json(&job.body) {
            Ok(j) => j,
            Err(e) => {
                m.inbound_verify("malformed");
                tracing::info!(reason = %e, "inbound dropped: malformed");
                return Ok(None);
            }
        };
        let info = match activity_info(&json) {
            Ok(i) => i,
            Err(e) => {
                m.inbound_verify("malformed");
                tracing::info!(reason = %e, "inbound dropped: not an activity");
                return Ok(None);
            }
        };
        // The edge queues header names lower-case (InboundJob's contract): borrow them.
        let headers: Vec<(&str, &str)> = job
            .headers
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_str()))
            .collect();
        let req = HttpRequest {
            method: &job.method,
            scheme: self.p.cfg.public_url.scheme(),
            path_and_query: &job.path,
            headers: &headers,
            body: &job.body,
        };
        let v = self.verifier.verify(&req, Some(&info), &job.client).await;
        if v.verdict != Verdict::Accepted {
            if v.transient && job.attempt + 1 < MAX_ATTEMPTS {
                return Err(Later::Deferred {
                    reason: v.reason,
                    wait: v.retry_after,
                });
            }
            m.inbound_verify(v.verdict.as_str());
            tracing::info!(
                verdict = v.verdict.as_str(),
                reason = %v.reason,
                actor = %info.actor,
                activity_id = ?info.id,
                "inbound rejected"
            );
            return Ok(None);
        }
        let cache = &self.p.backends.cache;
        if let Some(wait) = self.over_rate(v.key_id.as_deref()).await {
            // Verified and answered 202 long ago: it waits, it is not lost
            // (the edge's limit per client bounds what can pile up).
            return Err(Later::RateLimited { wait });
        }
        // Keyed on a hash of (inbox, actor, id): the id alone would let one
        // server mark another's ids as seen, and its size is the sender's.
        let seen = info.id.as_ref().map(|id| {
            format!(
                "seen:{}",
                stampede_core::digest::tuple_hash(&[&job.recipient_inbox, &info.actor, id])
            )
        });
        if let Some(key) = &seen {
            if !cache.set_nx(key, b"1", DEDUP_TTL).await? {
                m.inbound_verify("duplicate");
                tracing::info!(activity_id = ?info.id, recipient = %job.recipient_inbox, "inbound duplicate dropped");
                return Ok(None);
            }
        }
        let done = async {
            if has_side_effects(&info.kind) {
                // Boxed: most activities have none, and inline these paths
                // would size every message's future for them.
                Box::pin(self.side_effects(&json, &info, v.key_id.as_deref())).await?;
            }
            let event = VerifiedActivity {
                activity_json: String::from_utf8_lossy(&job.body).into_owned(),
                verdict: "accepted".into(),
                recipient_inbox: job.recipient_inbox.clone(),
                actor: info.actor.clone(),
                activity_id: info.id.clone().unwrap_or_default(),
                activity_type: info.kind.clone(),
                key_id: v.key_id.clone().unwrap_or_default(),
                received_unix_ms: job.received_unix_ms,
                trace: stampede_runtime::telemetry::current_trace_context()
                    .or_else(|| job.trace.clone()),
            };
            Ok::<OutMessage, InboxError>(OutMessage {
                kind: VERIFIED_ACTIVITY,
                payload: event.encode_to_vec(),
            })
        }
        .await;
        match done {
            Ok(event) => Ok(Some(Accepted { event, info, seen })),
            Err(e) => {
                if let Some(key) = &seen {
                    let _ = cache.del(key).await;
                }
                Err(e.into())
            }
        }
    }

    /// Counts one verified activity against its key's host's window
    /// (`STAMPEDE_INBOUND_RATE_LIMIT` a minute): the wait until the window
    /// ends when the host is over it. A failing cache lets it through.
    async fn over_rate(&self, key_id: Option<&str>) -> Option<Duration> {
        let limit = self.p.cfg.inbound_rate_limit;
        if limit == 0 {
            return None;
        }
        let host = key_id.and_then(inbox_host)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let n = self
            .p
            .backends
            .cache
            .incr(&format!("rlk:{host}:{}", now / 60), Duration::from_secs(61))
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "rate limit unavailable; letting the activity through"))
            .ok()?;
        (n > limit).then(|| Duration::from_secs(60 - now % 60 + 1))
    }

    async fn local_actor(&self, id: Option<&str>) -> Result<Option<LocalActor>, InboxError> {
        let prefix = format!("{}/users/", self.p.cfg.base());
        let Some(name) = id.and_then(|i| i.strip_prefix(&prefix)) else {
            return Ok(None);
        };
        Ok(self.p.backends.store.actor_by_name(name).await?)
    }

    async fn side_effects(
        &self,
        json: &Value,
        info: &ActivityInfo,
        key_id: Option<&str>,
    ) -> Result<(), InboxError> {
        let store = &self.p.backends.store;
        // Only called for the kinds `has_side_effects` names: keep the two in step.
        match info.kind.as_str() {
            "Follow" => {
                let Some(actor) = self.local_actor(info.object_id.as_deref()).await? else {
                    return Ok(());
                };
                let instance = self.p.instance_actor().await?;
                let Some(remote) = self.resolver.resolve(&info.actor, &instance).await? else {
                    tracing::warn!(actor = %info.actor, "follower has no inbox; follow ignored");
                    return Ok(());
                };
                let follower = Follower {
                    host: inbox_host(&remote.inbox).unwrap_or_default(),
                    actor: info.actor.clone(),
                    inbox: remote.inbox,
                    shared_inbox: remote.shared_inbox,
                    follow_id: info.id.clone(),
                };
                if actor.manually_approves_followers {
                    store.add_follow_request(actor.id, &follower, json).await?;
                    tracing::info!(actor = %actor.name, follower = %info.actor, "follow awaits approval");
                    return Ok(());
                }
                store.add_follower(actor.id, &follower).await?;
                let accept = follow_answer(
                    "Accept",
                    &self.p.cfg.actor_id(&actor.name),
                    json,
                    &info.actor,
                );
                let key = info.id.as_ref().map(|id| format!("accept:{id}"));
                outbound::publish(
                    &self.p.cfg,
                    &self.p.backends,
                    &actor,
                    accept.to_string().as_bytes(),
                    key,
                )
                .await?;
                tracing::info!(actor = %actor.name, follower = %info.actor, "follow accepted");
            }
            "Undo" => {
                let object = json.get("object");
                let inner_kind = object
                    .and_then(Value::as_object)
                    .map(stampede_core::activity::types)
                    .and_then(|t| t.first().map(|s| s.to_string()));
                match inner_kind.as_deref() {
                    Some("Follow") => {
                        let target = object
                            .and_then(|o| o.get("object"))
                            .and_then(stampede_core::activity::id_of);
                        if let Some(actor) = self.local_actor(target).await? {
                            store.remove_follower(actor.id, &info.actor).await?;
                            store.take_follow_request(actor.id, &info.actor).await?;
                        }
                    }
                    None => {
                        if let Some(follow_id) = info.object_id.as_deref() {
                            store.remove_follow_by_id(&info.actor, follow_id).await?;
                        }
                    }
                    Some(_) => {}
                }
            }
            "Delete" if info.object_id.as_deref().is_none_or(|o| o == info.actor) => {
                let removed = store.remove_follower_everywhere(&info.actor).await?;
                self.resolver.forget(&info.actor).await?;
                let keys: Vec<String> = key_id.map(str::to_string).into_iter().collect();
                self.verifier
                    .keys()
                    .forget_owner(&info.actor, &keys)
                    .await?;
                tracing::info!(actor = %info.actor, follows_removed = removed, "remote actor deleted");
            }
            "Update" => {
                let Some(object) = json
                    .get("object")
                    .filter(|o| o.get("id").and_then(Value::as_str) == Some(info.actor.as_str()))
                else {
                    return Ok(());
                };
                if let Some(remote) = remote_actor(&self.p.cfg, &info.actor, object) {
                    self.resolver.remember(&remote).await?;
                    let host = inbox_host(&remote.inbox).unwrap_or_default();
                    store
                        .update_follower_inboxes(
                            &info.actor,
                            &remote.inbox,
                            remote.shared_inbox.as_deref(),
                            &host,
                        )
                        .await?;
                    // `remote_actor` keeps only a key of the actor's origin
                    // that names the actor as its owner.
                    if let (Some(kid), Some(pem)) = (&remote.key_id, &remote.public_key_pem) {
                        self.verifier.keys().update(kid, &info.actor, pem).await?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Whether stampede itself acts on activities of this type (see `side_effects`).
fn has_side_effects(kind: &str) -> bool {
    matches!(kind, "Follow" | "Undo" | "Delete" | "Update")
}

/// Runs inbox as its own process until shutdown.
pub async fn serve(p: Process, l: Listeners) -> Result<(), InboxError> {
    let work = Inbox::new(p.clone()).run();
    stampede_runtime::process::serve_worker(p, l, "inbox", work).await
}
