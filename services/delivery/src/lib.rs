//! Service: delivery. Signs and POSTs each delivery job's activity to its
//! inbox (draft-cavage `rsa-sha256` over `(request-target) host date digest`,
//! signed on the signing pool, never on the executor), over one pooled
//! keep-alive client behind the SSRF guard. A 2xx is recorded before the job
//! is acknowledged, so a redelivered job is not sent twice. Transient failures
//! are retried through the broker's delay tiers; permanent ones are recorded
//! as dead letters with the reason.
#![deny(missing_docs)]

mod attempt;
mod outcome;
mod prepared;
mod retention;
mod slots;

use prepared::{BodyCache, Prepared};

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use lru::LruCache;
use prost::Message;
use reqwest::header::{HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE, DATE};
use stampede_backends::queue::{Incoming, OutMessage, QueueName};
use stampede_backends::store::NewDeadLetter;
use stampede_core::digest::{content_digest_header, digest_header};
use stampede_core::keys::load_private_key;
use stampede_core::signature::{sign_request, POST_HEADERS};
use stampede_core::targets::inbox_host;
use stampede_federation::hosts::{self, Gate};
use stampede_federation::parked::{self, Reason};
use stampede_proto::queue::{DeliveryClass, DeliveryJob};
use stampede_runtime::metrics::DeliveryOutcome;
use stampede_runtime::process::{Listeners, Process};
use stampede_runtime::worker;
use thiserror::Error;
use tokio::sync::OnceCell;
use url::Url;

pub use outcome::{classify, retry_delay, Outcome};
pub use slots::{Acquired, Slots};

use stampede_proto::kinds::DELIVERY_JOB;
/// Activities whose prepared bodies a worker keeps in memory.
const BODY_CACHE: usize = 1024;
/// How long a delivery is parked before it is looked at again: to a paused
/// host, or one this process lacked the descriptors or memory to try.
const PARK_DELAY: std::time::Duration = std::time::Duration::from_secs(5);
/// How often (per activity, per worker) the store is asked whether a
/// `Create`/`Update` was superseded by a `Delete`.
const SUPERSESSION_RECHECK_MS: i64 = 1000;

use stampede_backends::clock::now_ms as unix_ms;

/// How long a job that failed before its attempt (a backend away) is held
/// before it goes back to the queue.
const REQUEUE_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);
/// Backoff between tries of recording an answered delivery's outcome.
const SETTLE_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(200);
const SETTLE_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Bytes read of an inbox's answer (only the status matters).
const MAX_REPLY_BYTES: usize = 16 * 1024;

/// What delivery fails at.
#[derive(Debug, Error)]
pub enum DeliveryError {
    /// A backend failed.
    #[error(transparent)]
    Runtime(#[from] stampede_runtime::Error),
    /// The job can never be delivered.
    #[error("{0}")]
    Permanent(String),
}

impl From<stampede_backends::Error> for DeliveryError {
    fn from(e: stampede_backends::Error) -> Self {
        DeliveryError::Runtime(e.into())
    }
}

/// The delivery worker.
#[derive(Clone)]
pub struct Delivery {
    p: Process,
    /// Prepared activities by key. A cell is filled once: the first job of
    /// an activity loads it while the others (a whole prefetch at the start
    /// of a fanout) wait for it instead of each loading and parsing the key.
    bodies: Arc<BodyCache>,
    slots: Slots,
    /// The `Date` header of the current second (unix seconds, value): it
    /// changes once a second, not once a POST.
    date: Arc<Mutex<(u64, HeaderValue)>>,
}

/// Counts a delivery outcome and records it on the current (deliver) span.
fn count_outcome(m: &stampede_runtime::metrics::Metrics, o: DeliveryOutcome) {
    m.delivery(o);
    tracing::Span::current().record("outcome", o.as_str());
}

/// The `stampede_deliveries_total` outcome of a park (named before parks
/// had reasons in status: kept).
fn park_outcome(why: Reason) -> DeliveryOutcome {
    match why {
        Reason::Paused => DeliveryOutcome::Parked,
        Reason::CircuitOpen => DeliveryOutcome::CircuitOpen,
        Reason::Saturated => DeliveryOutcome::Deferred,
        Reason::LocalExhausted => DeliveryOutcome::LocalExhausted,
        Reason::Retry => DeliveryOutcome::Retry,
        Reason::InFlight => DeliveryOutcome::Deferred,
    }
}

/// Whether a retryable outcome says the host is unwell (counts towards its
/// circuit): 5xx, timeouts and connection errors, not 408 or 429 (the host
/// answered, it is only busy).
fn unwell(status: Option<u16>) -> bool {
    status.is_none_or(|s| s >= 500)
}

impl Delivery {
    /// Delivery over a process's backends (spawns the slot keeper: call
    /// within the runtime).
    pub fn new(p: Process) -> Self {
        let cap = NonZeroUsize::new(BODY_CACHE).unwrap_or(NonZeroUsize::MIN);
        let slots = Slots::new(
            p.backends.clone(),
            usize::from(p.cfg.prefetch),
            p.cfg.host_fast,
            p.shutdown.clone(),
        );
        Self {
            p,
            bodies: Arc::new(Mutex::new(LruCache::new(cap))),
            slots,
            date: Arc::new(Mutex::new((0, HeaderValue::from_static("")))),
        }
    }

    /// Consumes the delivery queues of the three classes until shutdown.
    pub async fn run(self) -> Result<(), DeliveryError> {
        let (p, prefetch) = (self.p.clone(), self.p.cfg.prefetch);
        stampede_federation::hosts::restore_paused(&p.backends).await?;
        tokio::spawn(parked::sample(
            p.metrics.clone(),
            p.backends.cache.clone(),
            std::time::Duration::from_secs(10),
            p.shutdown.clone(),
        ));
        tokio::spawn(self.clone().probe_unavailable());
        tokio::spawn(stampede_federation::queue_heads::report(
            p.metrics.clone(),
            p.backends.cache.clone(),
            std::time::Duration::from_secs(2),
            p.shutdown.clone(),
        ));
        tokio::spawn(retention::run(p.clone()));
        // One budget of `prefetch` over the three class queues, by weight.
        let [interactive, normal, bulk] = p.cfg.class_weights;
        let classes = [
            (QueueName::DeliveryInteractive, interactive),
            (QueueName::Delivery, normal),
            (QueueName::DeliveryBulk, bulk),
        ];
        worker::consume_weighted(&p, &classes, prefetch, self).await?;
        Ok(())
    }
}

impl worker::Handler for Delivery {
    async fn handle(&self, msg: Incoming) {
        let q = &*self.p.backends.queue;
        let job: DeliveryJob = match worker::decode(&msg, DELIVERY_JOB) {
            Ok(j) => j,
            Err(reason) => {
                return worker::poison(q, &self.p.metrics, msg.queue, msg, &reason).await
            }
        };
        let host = inbox_host(&job.inbox).unwrap_or_default();
        let span = tracing::info_span!(
            "deliver",
            activity_key = %job.activity_key,
            inbox_host = %host,
            attempt = job.attempt,
            activity_id = tracing::field::Empty,
            activity_type = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        // A copy that is likely delivered already (the broker handed it out
        // before, or a fanout that ran again marked it) is checked before
        // it waits for a slot; every job is checked once its lease is held.
        let copy = msg.redelivered || job.may_be_delivered;
        let settled = tracing::Instrument::instrument(self.process(&job, &host, copy), span).await;
        let ok = match settled {
            Ok(()) => msg.acker.ack().await,
            Err(e) => {
                // Nothing was sent. A backend that is away fails every
                // message alike: hold this one a moment rather than spin
                // it through the broker.
                tracing::warn!(activity_key = %job.activity_key, inbox_host = %host, error = %e, "delivery bookkeeping failed; message returned");
                tokio::time::sleep(REQUEUE_PAUSE).await;
                msg.acker.requeue().await
            }
        };
        if let Err(e) = ok {
            tracing::warn!(error = %e, "settling the message failed; the broker will redeliver it");
        }
    }
}

impl Delivery {
    /// Attempts one delivery and makes its effect durable (a delivery record,
    /// a scheduled retry, or a dead letter). An error means nothing durable
    /// happened and the message must go back to the queue. `copy`: the job
    /// is likely delivered already, worth a look before waiting for a slot.
    async fn process(
        &self,
        job: &DeliveryJob,
        host: &str,
        copy: bool,
    ) -> Result<(), DeliveryError> {
        let store = &self.p.backends.store;
        let m = &self.p.metrics;
        // Policy at send time: a domain blocked after its jobs were queued
        // gets none of them, and this server never posts to itself (a
        // remote actor naming our inbox as its own would make a loop).
        // Not a dead letter: there is nothing to replay.
        let cfg = &self.p.cfg;
        if cfg.is_own_authority(host) {
            count_outcome(m, DeliveryOutcome::Skipped);
            tracing::info!(inbox_host = %host, "delivery skipped: the inbox is on our own host");
            return Ok(());
        }
        if self.p.policy.is_blocked(host) {
            self.record_skip(job, host, "suspended").await?;
            self.slots.ended(host, job.first_attempt_unix_ms);
            count_outcome(m, DeliveryOutcome::Suspended);
            tracing::info!(inbox_host = %host, "delivery dropped: the inbox's domain is suspended or not allowed");
            return Ok(());
        }
        // A redelivered job (a worker died holding it) or a marked copy from
        // a fanout that ran twice: looked up before it waits for a slot.
        let expired = cfg.job_expiry().and_then(|expiry| {
            let age_ms = unix_ms().saturating_sub(job.first_attempt_unix_ms);
            (job.first_attempt_unix_ms > 0 && age_ms > expiry.as_millis() as i64).then_some(age_ms)
        });
        if (copy || expired.is_some()) && store.delivered(&job.activity_key, &job.inbox).await? {
            self.slots.ended(host, job.first_attempt_unix_ms);
            count_outcome(m, DeliveryOutcome::Skipped);
            tracing::debug!("already delivered");
            return Ok(());
        }
        // Past the success records' guard (`Config::job_expiry`): a copy of
        // it delivered long ago may have lost its record to the pruner. Not
        // sent: a dead letter, which a replay sends as a new job.
        if let Some(age_ms) = expired {
            let reason = format!(
                "expired: first queued {}s ago, past three quarters of \
                 STAMPEDE_DELIVERY_RECORD_RETENTION (a success record may be pruned)",
                age_ms / 1000
            );
            self.dead(job, host, reason, None, job.attempt).await?;
            count_outcome(m, DeliveryOutcome::Failed);
            return Ok(());
        }
        let b = &self.p.backends;
        let prepared = self.prepared(&job.activity_key).await;
        if prepared.is_err() && store.activity(&job.activity_key).await?.is_none() {
            // Deleted with its author (DeleteActor): nothing to send, and
            // nothing to record (its records went with it).
            self.slots.ended(host, job.first_attempt_unix_ms);
            count_outcome(m, DeliveryOutcome::Skipped);
            tracing::info!(activity_key = %job.activity_key, "delivery dropped: the activity was deleted with its author");
            return Ok(());
        }
        if let Ok(prep) = prepared {
            if let Some((actor, object)) = &prep.supersedable {
                if self.superseded(&prep, *actor, object).await? {
                    self.record_skip(job, host, "superseded").await?;
                    self.slots.ended(host, job.first_attempt_unix_ms);
                    count_outcome(m, DeliveryOutcome::Superseded);
                    tracing::info!(activity_id = %prep.ap_id, "superseded by a Delete of its object; not sent");
                    return Ok(());
                }
            }
        }
        let asked = Instant::now();
        let interactive = job.class == DeliveryClass::Interactive as i32;
        let (slot, health, gate) = match self.slots.acquire(cfg, host, job, interactive).await? {
            Acquired::Slot(slot, health, gate) => (slot, health, gate),
            // Another worker is sending this very job: a copy the broker
            // handed out again while its first holder still runs (its
            // connection went with a broker node). Looked at again once
            // that one settled, then checked against the success records.
            Acquired::InFlight => {
                let copy = DeliveryJob {
                    may_be_delivered: true,
                    ..job.clone()
                };
                return self.park(&copy, PARK_DELAY, Reason::InFlight).await;
            }
            Acquired::Park(wait) => return self.park(job, wait, Reason::Saturated).await,
            Acquired::Gate(gate, state) => {
                if matches!(gate, Gate::Unavailable { .. }) {
                    hosts::mark_unavailable(&self.p.backends, host, &state).await?;
                }
                return self.not_now(job, host, gate).await;
            }
        };
        if slot.waited {
            m.slot_wait_seconds.observe(asked.elapsed().as_secs_f64());
        }
        // Checked with the job's lease held (it is named after the job; a
        // probe holds none, nothing else goes to its host): no other copy is
        // in flight now, and one that was recorded its success before it let
        // go. Checked only before the lease, a copy that then waited for a
        // slot while another copy was sent would send it again (seen under
        // a broker node's death: one post twice to one inbox).
        if store.delivered(&job.activity_key, &job.inbox).await? {
            drop(slot);
            self.slots.ended(host, job.first_attempt_unix_ms);
            count_outcome(m, DeliveryOutcome::Skipped);
            tracing::debug!("already delivered");
            return Ok(());
        }
        let mut class = "normal";
        if health.limit(cfg, unix_ms()) < cfg.host_concurrency {
            class = "ramping";
        }
        if gate == Gate::Probe {
            if self.probe(host, &job.inbox).await {
                hosts::record_success(b, cfg, host, &health).await?;
                class = "probe";
            } else {
                let wait = hosts::probe_failed(b, cfg, host, &health).await?;
                drop(slot);
                return self.park(job, wait, Reason::CircuitOpen).await;
            }
        }
        let started = Instant::now();
        let sent_ms = unix_ms();
        let in_flight = m
            .delivery_in_flight
            .get_or_create(&[("host_class", class)])
            .clone();
        in_flight.inc();
        let attempt = self.attempt(job, host).await;
        in_flight.dec();
        match &attempt {
            Ok(r) => self.slots.answered(host, Some(r.status)),
            Err(DeliveryError::Runtime(stampede_runtime::Error::Http(_))) => {
                self.slots.answered(host, None)
            }
            Err(_) => {}
        }
        let latency = started.elapsed();
        m.delivery_seconds.observe(latency.as_secs_f64());
        self.adapt(host, &slot, &health, &attempt, latency, sent_ms)
            .await;
        let outcome = match attempt {
            Ok(resp) => match classify(Some(resp.status), None) {
                Outcome::Retry { status, reason, .. } => Outcome::Retry {
                    status,
                    reason,
                    retry_after: resp.retry_after,
                },
                o => o,
            },
            Err(DeliveryError::Permanent(reason)) => Outcome::Permanent {
                status: None,
                reason,
            },
            Err(DeliveryError::Runtime(stampede_runtime::Error::Refused(reason))) => {
                Outcome::Refused { reason }
            }
            Err(DeliveryError::Runtime(stampede_runtime::Error::Http(reason))) => {
                classify(None, Some(reason))
            }
            Err(DeliveryError::Runtime(stampede_runtime::Error::Exhausted(reason))) => {
                // This side could not even try (out of descriptors, ports,
                // memory): not an attempt, and not the host's failure, or
                // running out would open the circuits of healthy hosts.
                tracing::warn!(inbox_host = %host, %reason, "out of local resources; delivery put back, not counted as an attempt");
                return self.park(job, PARK_DELAY, Reason::LocalExhausted).await;
            }
            Err(e) => return Err(e),
        };
        // The host's health is shared state, not the delivery's effect: a
        // cache that fails here costs a count, never a second POST.
        let health_update = match &outcome {
            Outcome::Delivered { .. } => hosts::record_success(b, cfg, host, &health).await,
            Outcome::Retry { status, .. } if unwell(*status) => {
                hosts::record_failure(b, cfg, host).await
            }
            _ => Ok(()),
        };
        if let Err(e) = health_update {
            tracing::warn!(inbox_host = %host, error = %e, "recording the host's health failed");
        }
        // The remote has answered: from here on nothing may send the job
        // again. Its effect (a success record, a retry, a dead letter) is
        // retried until durable while the message stays unacknowledged;
        // only a crash can hand it to another worker. The slot is kept
        // while the first try records (its lease marks the job in flight)
        // and given back if that fails, so an outage holds no host's slots.
        let mut slot = Some(slot);
        let mut backoff = SETTLE_BACKOFF_MIN;
        let mut tries = 0u32;
        loop {
            match self.settle(job, host, &outcome).await {
                Ok(ended) => {
                    if ended {
                        self.slots.ended(host, job.first_attempt_unix_ms);
                    }
                    break;
                }
                Err(e) => {
                    drop(slot.take());
                    // Deleted with its author meanwhile: its records went
                    // with it, and there is nothing left to record.
                    if let Ok(None) = self.p.backends.store.activity(&job.activity_key).await {
                        tracing::info!(activity_key = %job.activity_key, error = %e, "the activity was deleted with its author; its delivery is not recorded");
                        self.slots.ended(host, job.first_attempt_unix_ms);
                        count_outcome(&self.p.metrics, DeliveryOutcome::Skipped);
                        break;
                    }
                    tries += 1;
                    self.p.metrics.settle_retries.inc();
                    tracing::warn!(inbox_host = %host, activity_key = %job.activity_key, attempt = job.attempt, tries, error = %e, "recording the answered delivery failed; trying again (the message stays unacknowledged)");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(SETTLE_BACKOFF_MAX);
                }
            }
        }
        drop(slot);
        Ok(())
    }

    /// Makes the outcome of an answered attempt durable: a success record,
    /// a retry in the broker, or a dead letter. Repeatable: a failure
    /// midway leaves nothing that doing it again would double.
    async fn settle(
        &self,
        job: &DeliveryJob,
        host: &str,
        outcome: &Outcome,
    ) -> Result<bool, DeliveryError> {
        let store = &self.p.backends.store;
        let m = &self.p.metrics;
        let interactive = job.class == DeliveryClass::Interactive as i32;
        let mut ended = true;
        match outcome.clone() {
            Outcome::Delivered { status } => {
                store
                    .record_delivered(&job.activity_key, &job.inbox, host, status, job.attempt + 1)
                    .await?;
                count_outcome(m, DeliveryOutcome::Delivered);
                // One line per delivery would be most of a busy server's log
                // (and CPU on every message): successes are counted in metrics
                // and recorded on the trace span; the line is at debug.
                tracing::debug!(inbox_host = %host, status, attempt = job.attempt, "delivered");
            }
            Outcome::Retry {
                status,
                reason,
                retry_after,
            } => {
                let attempts = job.attempt + 1;
                let once = self
                    .prepared(&job.activity_key)
                    .await
                    .is_ok_and(|p| p.deletes_author);
                let delay = if once {
                    None
                } else {
                    retry_delay(
                        &self.p.cfg.retry_schedule,
                        job.attempt,
                        retry_after.as_deref(),
                    )
                };
                // An interactive delivery the host was only too busy for
                // (429: it may be the one slot kept for interactive ones)
                // comes back soon in its own class; other retries drop to
                // bulk: behind fresh work, never starved. Either way the
                // schedule's length bounds the attempts.
                let busy = interactive && status == Some(429);
                let (delay, class, queue) = match delay {
                    Some(_) if busy => (
                        Some(outcome::busy_delay(retry_after.as_deref())),
                        DeliveryClass::Interactive,
                        QueueName::DeliveryInteractive,
                    ),
                    d => (d, DeliveryClass::Bulk, QueueName::DeliveryBulk),
                };
                match delay {
                    Some(delay) => {
                        // For the activity's delivery status; before the
                        // retry exists, repeatable.
                        store
                            .record_retry(
                                &job.activity_key,
                                &job.inbox,
                                host,
                                attempts,
                                status,
                                stampede_backends::clock::now_ms() + delay.as_millis() as i64,
                            )
                            .await?;
                        let next = DeliveryJob {
                            attempt: attempts,
                            class: class.into(),
                            ..job.clone()
                        };
                        let applied = self
                            .p
                            .backends
                            .queue
                            .publish_delayed(
                                queue,
                                OutMessage {
                                    kind: DELIVERY_JOB,
                                    payload: next.encode_to_vec(),
                                    route: None,
                                },
                                delay,
                            )
                            .await?;
                        ended = false;
                        count_outcome(m, DeliveryOutcome::Retry);
                        self.count_parked(Reason::Retry, applied).await;
                        tracing::info!(inbox_host = %host, ?status, %reason, attempt = job.attempt, delay_secs = applied.as_secs(), "delivery failed; retry scheduled");
                    }
                    None => {
                        self.dead(
                            job,
                            host,
                            format!("gave up after {attempts} attempts: {reason}"),
                            status,
                            attempts,
                        )
                        .await?;
                        count_outcome(m, DeliveryOutcome::Failed);
                    }
                }
            }
            Outcome::Permanent {
                status: Some(410),
                reason,
            } => {
                // Gone: the actor (or its whole server, for a shared inbox) will
                // not come back; stop delivering to it.
                let removed = store.remove_followers_by_inbox(&job.inbox).await?;
                tracing::info!(inbox_host = %host, follows_removed = removed, "inbox gone; its follows removed");
                self.dead(
                    job,
                    host,
                    format!("gone: {reason}"),
                    Some(410),
                    job.attempt + 1,
                )
                .await?;
                count_outcome(m, DeliveryOutcome::Gone);
            }
            Outcome::Permanent { status, reason } => {
                self.dead(job, host, reason, status, job.attempt + 1)
                    .await?;
                count_outcome(m, DeliveryOutcome::Failed);
            }
            Outcome::Refused { reason } => {
                self.dead(
                    job,
                    host,
                    format!("refused: {reason}"),
                    None,
                    job.attempt + 1,
                )
                .await?;
                count_outcome(m, DeliveryOutcome::Refused);
            }
        }
        Ok(ended)
    }

    /// A job whose host takes no delivery now: parked behind a pause or an
    /// open circuit, or dead-lettered when the host is unavailable.
    async fn not_now(
        &self,
        job: &DeliveryJob,
        host: &str,
        gate: Gate,
    ) -> Result<(), DeliveryError> {
        let cfg = &self.p.cfg;
        match gate {
            Gate::Paused => self.park(job, PARK_DELAY, Reason::Paused).await,
            Gate::Open(wait) => self.park(job, wait, Reason::CircuitOpen).await,
            // Another worker is probing: look again once the probe has had
            // time, but no later than the circuit's own open time would.
            Gate::Probing => {
                let wait = PARK_DELAY.min(cfg.circuit_open);
                self.park(job, wait, Reason::CircuitOpen).await
            }
            Gate::Unavailable { since_ms } => {
                let since = httpdate::fmt_http_date(
                    std::time::UNIX_EPOCH
                        + std::time::Duration::from_millis(since_ms.max(0) as u64),
                );
                // Not tried this time: the attempts made are those before.
                self.dead(
                    job,
                    host,
                    format!("host unavailable: failing since {since}"),
                    None,
                    job.attempt,
                )
                .await?;
                count_outcome(&self.p.metrics, DeliveryOutcome::Unavailable);
                self.slots.ended(host, job.first_attempt_unix_ms);
                Ok(())
            }
            // Acquired only with a slot.
            Gate::Go { .. } | Gate::Probe => self.park(job, PARK_DELAY, Reason::Saturated).await,
        }
    }

    /// Moves the host's shared limit by what one request found: halved on
    /// 429, 5xx or a timeout (once for every request in flight then), one
    /// more after a round of fast successes. Best effort: the delivery's
    /// own effect does not wait on it.
    async fn adapt(
        &self,
        host: &str,
        slot: &slots::Slot,
        health: &hosts::HostState,
        attempt: &Result<stampede_runtime::http_client::Response, DeliveryError>,
        latency: std::time::Duration,
        sent_ms: i64,
    ) {
        let (b, cfg) = (&self.p.backends, &self.p.cfg);
        let status = match attempt {
            Ok(r) => Some(r.status),
            Err(DeliveryError::Runtime(stampede_runtime::Error::Http(reason)))
                if reason.starts_with("timed out") =>
            {
                None
            }
            Err(_) => return,
        };
        let ok = status.is_some_and(|s| (200..300).contains(&s));
        let changed = if ok {
            if !self.slots.finished(slot, latency, true) {
                return;
            }
            hosts::grow_limit(b, cfg, host, health).await
        } else {
            self.slots.finished(slot, latency, false);
            match status {
                Some(429) => hosts::cut_limit(b, cfg, host, true, sent_ms).await,
                Some(s) if s < 500 => return,
                _ => hosts::cut_limit(b, cfg, host, false, sent_ms).await,
            }
        };
        match changed {
            Ok(Some(_)) => {
                let direction = if ok { "grown" } else { "cut" };
                self.p
                    .metrics
                    .host_limit_changes
                    .get_or_create(&[("direction", direction)])
                    .inc();
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(inbox_host = %host, error = %e, "moving the host's limit failed")
            }
        }
    }

    /// Whether a `Delete` of the object has been published since: asked of
    /// the store at most once a second per activity per worker (one query
    /// per delivery would be one per inbox of a 50,000-inbox fanout).
    async fn superseded(
        &self,
        prep: &Prepared,
        actor: i64,
        object: &str,
    ) -> Result<bool, DeliveryError> {
        use std::sync::atomic::Ordering;
        let now = unix_ms();
        if prep.deleted.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let last = prep.checked_ms.load(Ordering::Relaxed);
        if now - last < SUPERSESSION_RECHECK_MS {
            return Ok(false);
        }
        prep.checked_ms.store(now, Ordering::Relaxed);
        let deleted = self.p.backends.store.object_deleted(actor, object).await?;
        if deleted {
            prep.deleted.store(true, Ordering::Relaxed);
        }
        Ok(deleted)
    }

    /// Puts a job back in the broker for `wait` without trying it (not an
    /// attempt), in its own class's queue.
    async fn park(
        &self,
        job: &DeliveryJob,
        wait: std::time::Duration,
        why: Reason,
    ) -> Result<(), DeliveryError> {
        let out = OutMessage {
            kind: DELIVERY_JOB,
            payload: job.encode_to_vec(),
            route: None,
        };
        let applied = self
            .p
            .backends
            .queue
            .publish_delayed(QueueName::delivery(job.class()), out, wait)
            .await?;
        count_outcome(&self.p.metrics, park_outcome(why));
        self.count_parked(why, applied).await;
        tracing::debug!(why = why.as_str(), wait_secs = applied.as_secs(), "parked");
        Ok(())
    }

    /// Counts a job just put in a delay queue, for status. Best effort: the
    /// job is parked already, and returning an error would hand it back to
    /// the queue as well (a second copy).
    async fn count_parked(&self, why: Reason, delay: std::time::Duration) {
        let cache = &*self.p.backends.cache;
        if let Err(e) = parked::record(cache, why, delay).await {
            tracing::warn!(error = %e, why = why.as_str(), "counting a parked delivery failed");
        }
    }

    /// The half-open probe: a cheap GET of the host's NodeInfo discovery
    /// document. Any answer but 5xx or 429 means the host is back.
    async fn probe(&self, host: &str, inbox: &str) -> bool {
        let Ok(mut url) = Url::parse(inbox) else {
            return false;
        };
        url.set_path("/.well-known/nodeinfo");
        url.set_query(None);
        let req = self.p.http.client().get(url.clone());
        let ok = match self.p.http.send(req, &url, MAX_REPLY_BYTES).await {
            Ok(r) => r.status < 500 && r.status != 429,
            Err(_) => false,
        };
        tracing::info!(inbox_host = %host, ok, "half-open probe");
        self.p.metrics.delivery(if ok {
            DeliveryOutcome::ProbeOk
        } else {
            DeliveryOutcome::ProbeFailed
        });
        ok
    }

    /// Records a job not sent, for the activity's delivery status.
    async fn record_skip(
        &self,
        job: &DeliveryJob,
        host: &str,
        reason: &'static str,
    ) -> Result<(), DeliveryError> {
        let skip = stampede_backends::store::Skip {
            inbox: job.inbox.clone(),
            host: host.to_string(),
            reason,
        };
        self.p
            .backends
            .store
            .record_skip(&job.activity_key, &skip)
            .await?;
        Ok(())
    }

    /// Probes the hosts marked unavailable every
    /// `STAMPEDE_UNAVAILABLE_PROBE_SECS`: fanout makes no delivery for them,
    /// so nothing else would notice one that came back.
    async fn probe_unavailable(self) {
        let every = self.p.cfg.unavailable_probe_every;
        loop {
            tokio::select! {
                _ = self.p.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.probe_round(every).await {
                tracing::warn!(error = %e, "probing the unavailable hosts failed");
            }
        }
    }

    /// One round of probes, unless another delivery process holds this
    /// round's lease. A host that answers is available again: its failing
    /// state goes and its circuit closes.
    async fn probe_round(&self, every: std::time::Duration) -> Result<(), DeliveryError> {
        use futures::StreamExt;
        let b = &self.p.backends;
        let lease = every.mul_f32(0.9);
        if !b
            .cache
            .set_nx(
                stampede_federation::cache_keys::UNAVAILABLE_PROBE,
                b"1",
                lease,
            )
            .await?
        {
            return Ok(());
        }
        let hosts = b
            .store
            .unavailable_hosts(stampede_federation::hosts::UNAVAILABLE_MAX)
            .await?;
        if hosts.is_empty() {
            return Ok(());
        }
        // Deliveries are https only, unless private networks are allowed
        // (tests, a lab): then a host may speak plain http.
        let schemes: &[&str] = if self.p.cfg.allow_private_networks {
            &["https", "http"]
        } else {
            &["https"]
        };
        let back = futures::stream::iter(hosts)
            .map(|host| async move {
                for scheme in schemes {
                    if self.probe(&host, &format!("{scheme}://{host}/")).await {
                        return Some(host);
                    }
                }
                None
            })
            .buffer_unordered(8)
            .filter_map(|h| async move { h })
            .collect::<Vec<String>>()
            .await;
        for host in back {
            stampede_federation::hosts::probed_back(b, &self.p.cfg, &host).await?;
        }
        Ok(())
    }

    /// Records a dead letter; `attempts` is how many POSTs were made.
    async fn dead(
        &self,
        job: &DeliveryJob,
        host: &str,
        reason: String,
        status: Option<u16>,
        attempts: u32,
    ) -> Result<(), DeliveryError> {
        tracing::warn!(inbox_host = %host, %reason, ?status, attempt = job.attempt, "delivery dead-lettered");
        self.p
            .backends
            .store
            .add_dead_letter(NewDeadLetter {
                activity_key: job.activity_key.clone(),
                inbox: job.inbox.clone(),
                host: host.to_string(),
                reason,
                last_status: status,
                attempts,
                first_attempt_unix_ms: job.first_attempt_unix_ms,
            })
            .await?;
        Ok(())
    }
}

/// Runs delivery as its own process: the worker, gRPC health and reflection,
/// metrics, until shutdown.
pub async fn serve(p: Process, l: Listeners) -> Result<(), DeliveryError> {
    let work = Delivery::new(p.clone()).run();
    stampede_runtime::process::serve_worker(p, l, stampede_runtime::ServiceKind::Delivery, work)
        .await
}
