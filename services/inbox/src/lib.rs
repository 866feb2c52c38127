//! Service: inbox. Consumes what the edge queued, verifies it (HTTP
//! Signatures draft-cavage and RFC 9421, digests, the date window, that the
//! key is the actor's; keys cached and refetched on rotation), drops
//! duplicates, applies the federation side effects stampede owns (Follow,
//! Undo of a Follow, Delete and Update of actors) and hands verified
//! activities to the application through the verified-events exchange.
#![deny(missing_docs)]

mod effects;

use std::time::Duration;

use prost::Message;
use stampede_backends::queue::{Incoming, OutMessage, QueueName};
use stampede_backends::store::ActorRef;
use stampede_core::activity::parse_json;
use stampede_core::targets::inbox_host;
use stampede_core::verify::HttpRequest;
use stampede_federation::cache_keys;
use stampede_federation::remote_actors::Resolver;
use stampede_federation::verify::{activity_info, ActivityInfo, Verdict, Verifier};
use stampede_proto::queue::{InboundJob, VerifiedActivity};
use stampede_runtime::process::{Listeners, Process};
use stampede_runtime::worker;

use stampede_proto::kinds::INBOUND_JOB;
use stampede_proto::kinds::VERIFIED_ACTIVITY;
/// How long an activity id is remembered per inbox to drop replays.
const DEDUP_TTL: Duration = stampede_federation::verify::REPLAY_WINDOW;
/// Attempts for an activity whose key's server could not be reached.
const MAX_ATTEMPTS: u32 = 4;

/// What inbox fails at.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// A backend failed.
    #[error(transparent)]
    Runtime(#[from] stampede_runtime::Error),
}

impl From<stampede_backends::Error> for InboxError {
    fn from(e: stampede_backends::Error) -> Self {
        InboxError::Runtime(e.into())
    }
}

/// The inbox worker (one reference count to clone: it is cloned per message).
#[derive(Clone)]
pub struct Inbox(std::sync::Arc<InboxParts>);

impl std::ops::Deref for Inbox {
    type Target = InboxParts;
    fn deref(&self) -> &InboxParts {
        &self.0
    }
}

#[doc(hidden)]
pub struct InboxParts {
    p: Process,
    verifier: Verifier,
    resolver: Resolver,
    unavailable: std::sync::Arc<stampede_federation::hosts::UnavailableHosts>,
}

impl Inbox {
    /// Inbox over a process's backends.
    pub fn new(p: Process) -> Self {
        Self(std::sync::Arc::new(InboxParts {
            verifier: Verifier::new(p.clone()),
            resolver: Resolver::new(p.clone()),
            unavailable: std::sync::Arc::default(),
            p,
        }))
    }

    /// A host marked unavailable that just sent a request verified as its
    /// own is up: fanout delivers to it again (best effort: a failure only
    /// leaves it to the periodic probe).
    async fn revive_signer_host(&self, key_id: Option<&str>) {
        // Nothing parsed per message while no host is unavailable.
        if self.unavailable.is_empty() {
            return;
        }
        let Some(host) = key_id.and_then(stampede_core::targets::inbox_host) else {
            return;
        };
        if !self.unavailable.contains(&host) {
            return;
        }
        match stampede_federation::hosts::revived_by_inbound(&self.p.backends, &host).await {
            Ok(_) => self.unavailable.forget(&host),
            Err(e) => {
                tracing::warn!(inbox_host = %host, error = %e, "marking a host available failed")
            }
        }
    }

    /// Consumes the inbound queue until shutdown.
    pub async fn run(self) -> Result<(), InboxError> {
        let (p, prefetch) = (self.p.clone(), self.p.cfg.prefetch);
        tokio::spawn(
            self.unavailable
                .clone()
                .follow(p.backends.clone(), p.shutdown.clone()),
        );
        worker::consume(&p, QueueName::Inbound, prefetch, self).await?;
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
        let settle = match self.process_holding(&job, msg.redelivered).await {
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
                    Later::Backend(reason) => {
                        tracing::warn!(%reason, recipient = %job.recipient_inbox, "a backend failed the inbound activity; retrying later");
                        None
                    }
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
    /// Verification could not decide because one of our own backends
    /// failed: tried again as soon as it is back.
    Backend(String),
}

impl Later {
    /// Why one of our own backends failed it, when that is why.
    fn backend(&self) -> Option<String> {
        match self {
            Later::Failed(InboxError::Runtime(stampede_runtime::Error::Backend(e)), None) => {
                Some(e.to_string())
            }
            Later::Backend(reason) => Some(reason.clone()),
            _ => None,
        }
    }
}

/// How long an activity that one of our own backends failed is held and
/// tried again in place before it is deferred through the broker's delays
/// (a store or cache back within this costs seconds, not a 30 s delay).
const BACKEND_HOLD: Duration = Duration::from_secs(60);
const BACKEND_BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKEND_BACKOFF_MAX: Duration = Duration::from_secs(2);

impl From<InboxError> for Later {
    fn from(e: InboxError) -> Self {
        Later::Failed(e, None)
    }
}

impl From<stampede_backends::Error> for Later {
    fn from(e: stampede_backends::Error) -> Self {
        Later::Failed(e.into(), None)
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
                    route: None,
                },
                delay,
            )
            .await?;
        Ok(())
    }

    /// [`Inbox::process`], tried again in place with backoff while one of
    /// our own backends fails it, for up to [`BACKEND_HOLD`].
    async fn process_holding(
        &self,
        job: &InboundJob,
        redelivered: bool,
    ) -> Result<Option<Accepted>, Later> {
        let until = tokio::time::Instant::now() + BACKEND_HOLD;
        let mut backoff = BACKEND_BACKOFF_MIN;
        let mut tries = 0u32;
        loop {
            let r = self.process(job, redelivered).await;
            let Some(reason) = r.as_ref().err().and_then(Later::backend) else {
                return r;
            };
            if tokio::time::Instant::now() + backoff > until || self.p.shutdown.is_cancelled() {
                return r;
            }
            tries += 1;
            // One line when it starts and one every ~30 s, not one a try.
            if tries == 1 || tries.is_multiple_of(16) {
                tracing::warn!(%reason, recipient = %job.recipient_inbox, tries, "a backend failed the inbound activity; holding it and trying again");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKEND_BACKOFF_MAX);
        }
    }

    /// Verifies and applies one inbound activity; an accepted one comes back
    /// with the event for the application, to be published with the ack. An
    /// error leaves nothing done that a retry would repeat.
    async fn process(
        &self,
        job: &InboundJob,
        redelivered: bool,
    ) -> Result<Option<Accepted>, Later> {
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
        let v = self
            .verifier
            .verify_activity(&req, Some((&info, &json)), &job.client)
            .await;
        if v.verdict != Verdict::Accepted {
            if v.transient && v.backend {
                return Err(Later::Backend(v.reason));
            }
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
        self.revive_signer_host(v.key_id.as_deref()).await;
        let cache = &self.p.backends.cache;
        if let Some(wait) = self.over_rate(v.key_id.as_deref()).await {
            // Verified and answered 202 long ago: it waits, it is not lost
            // (the edge's limit per client bounds what can pile up).
            return Err(Later::RateLimited { wait });
        }
        // Keyed on a hash of (inbox, actor, id): the id alone would let one
        // server mark another's ids as seen, and its size is the sender's.
        let seen = info
            .id
            .as_ref()
            .map(|id| cache_keys::seen(&job.recipient_inbox, &info.actor, id));
        // The mark names the POST that set it (when and from whom the edge
        // took it): a message handed out again after its worker died midway
        // finds its own mark and goes on (at least once), where a second
        // POST of the same activity finds another's and is a copy.
        let token = format!("{}|{}", job.received_unix_ms, job.client);
        if let Some(key) = &seen {
            let first = cache.set_nx(key, token.as_bytes(), DEDUP_TTL).await?;
            let ours =
                !first && redelivered && cache.get(key).await?.as_deref() == Some(token.as_bytes());
            if !first && !ours {
                m.inbound_verify("duplicate");
                tracing::info!(activity_id = ?info.id, recipient = %job.recipient_inbox, "inbound duplicate dropped");
                return Ok(None);
            }
        }
        let done = async {
            if let Some(effect) = effects::Effect::of(&info.kind) {
                let cx = effects::Context {
                    json: &json,
                    info: &info,
                    key_id: v.key_id.as_deref().filter(|_| !v.forwarded),
                    proof_key_id: v.proof_key_id.as_deref(),
                };
                // Boxed: most activities have none, and inline these paths
                // would size every message's future for them.
                Box::pin(self.apply(effect, &cx)).await?;
            }
            // Nothing parsed per message while there is no rule.
            let rules = self.p.policy.snapshot();
            let silenced = !rules.is_empty()
                && stampede_core::targets::inbox_host(&info.actor).is_some_and(|h| {
                    rules.decide(&h) == stampede_runtime::policy::Decision::Silenced
                });
            let event = VerifiedActivity {
                policy: if silenced {
                    "silenced".into()
                } else {
                    String::new()
                },
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
                route: None,
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
        let now = stampede_backends::clock::now_secs().max(0) as u64;
        let n = self
            .p
            .backends
            .cache
            .incr(&cache_keys::inbox_activities(&host, now / 60), Duration::from_secs(61))
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "rate limit unavailable; letting the activity through"))
            .ok()?;
        (n > limit).then(|| Duration::from_secs(60 - now % 60 + 1))
    }

    /// The local actor `id` names, without its keys: nothing inbound
    /// reads a private key (an `Accept` is signed by delivery).
    async fn local_actor(&self, id: Option<&str>) -> Result<Option<ActorRef>, InboxError> {
        let Some(name) = id.and_then(|i| self.p.cfg.local_actor_name(i)) else {
            return Ok(None);
        };
        Ok(self.p.backends.store.actor_ref_by_name(name).await?)
    }
}

/// Runs inbox as its own process until shutdown.
pub async fn serve(p: Process, l: Listeners) -> Result<(), InboxError> {
    let work = Inbox::new(p.clone()).run();
    stampede_runtime::process::serve_worker(p, l, stampede_runtime::ServiceKind::Inbox, work).await
}
