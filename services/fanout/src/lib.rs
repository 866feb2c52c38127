//! Service: fanout. Expands one outbound activity into delivery jobs: the
//! author's followers streamed from the store a page at a time (keyset
//! paging, never the whole set in memory) and the explicit remote recipients
//! of `to`/`cc`/`audience`/`bto`/`bcc`, grouped by shared inbox so each
//! shared inbox gets one POST. Jobs reference the stored activity; the body
//! is stored once.
#![deny(missing_docs)]

use std::collections::HashSet;
use std::time::Duration;

use prost::Message;
use stampede_backends::queue::{Incoming, OutMessage, QueueName};
use stampede_backends::store::StoredActivity;
use stampede_core::activity::{addressing, PUBLIC};
use stampede_core::targets::Recipient;
use stampede_proto::queue::{DeliveryJob, FanoutJob};
use stampede_runtime::process::{Listeners, Process};
use stampede_runtime::worker;
use thiserror::Error;

use stampede_federation::remote_actors::Resolver;

use stampede_proto::kinds::DELIVERY_JOB;
use stampede_proto::kinds::FANOUT_JOB;
/// Followers read per page.
pub const PAGE: u32 = 1000;
/// Fanout attempts before a job is dead-lettered.
const MAX_ATTEMPTS: u32 = 8;

/// What fanout fails at.
#[derive(Debug, Error)]
pub enum FanoutError {
    /// A backend failed; the job is retried.
    #[error(transparent)]
    Runtime(#[from] stampede_runtime::Error),
    /// The job can never succeed; it is dead-lettered.
    #[error("{0}")]
    Permanent(String),
}

impl From<stampede_backends::Error> for FanoutError {
    fn from(e: stampede_backends::Error) -> Self {
        FanoutError::Runtime(e.into())
    }
}

/// The fanout worker.
#[derive(Clone)]
pub struct Fanout {
    p: Process,
    resolver: Resolver,
}

impl Fanout {
    /// Fanout over a process's backends.
    pub fn new(p: Process) -> Self {
        let resolver = Resolver::new(p.clone());
        Self { p, resolver }
    }

    /// Consumes the fanout queue until shutdown.
    pub async fn run(self) -> Result<(), FanoutError> {
        let (p, prefetch) = (self.p.clone(), self.p.cfg.prefetch.clamp(1, 16));
        worker::consume(&p, QueueName::Fanout, prefetch, self).await?;
        Ok(())
    }
}

impl worker::Handler for Fanout {
    async fn handle(&self, msg: Incoming) {
        let q = &*self.p.backends.queue;
        let job: FanoutJob = match worker::decode(&msg, FANOUT_JOB) {
            Ok(j) => j,
            Err(reason) => {
                return worker::poison(q, &self.p.metrics, QueueName::Fanout, msg, &reason).await
            }
        };
        match self.expand(&job, msg.redelivered || job.attempt > 0).await {
            Ok(n) => {
                if let Err(e) = msg.acker.ack().await {
                    tracing::warn!(activity_key = %job.activity_key, error = %e, "ack failed");
                }
                tracing::info!(activity_key = %job.activity_key, targets = n, "fanned out");
            }
            Err(FanoutError::Permanent(reason)) => {
                worker::poison(q, &self.p.metrics, QueueName::Fanout, msg, &reason).await
            }
            Err(FanoutError::Runtime(e)) if job.attempt + 1 < MAX_ATTEMPTS => {
                tracing::warn!(activity_key = %job.activity_key, attempt = job.attempt, error = %e, "fanout failed; retrying");
                let retry = FanoutJob {
                    attempt: job.attempt + 1,
                    ..job
                };
                let delay = Duration::from_secs(5u64 << retry.attempt.min(6));
                let out = OutMessage {
                    kind: FANOUT_JOB,
                    payload: retry.encode_to_vec(),
                };
                match q.publish_delayed(QueueName::Fanout, out, delay).await {
                    Ok(_) => {
                        let _ = msg.acker.ack().await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot schedule fanout retry; returning message");
                        let _ = msg.acker.requeue().await;
                    }
                }
            }
            Err(FanoutError::Runtime(e)) => {
                let reason = format!("fanout gave up after {MAX_ATTEMPTS} attempts: {e}");
                worker::poison(q, &self.p.metrics, QueueName::Fanout, msg, &reason).await
            }
        }
    }
}

impl Fanout {
    /// Queues one delivery job per target inbox; returns how many.
    pub async fn expand(&self, job: &FanoutJob, ran_before: bool) -> Result<u64, FanoutError> {
        let b = &self.p.backends;
        let activity = b.store.activity(&job.activity_key).await?.ok_or_else(|| {
            FanoutError::Permanent(format!("activity {} not found", job.activity_key))
        })?;
        let (explicit, to_followers) = self.explicit_targets(&activity).await?;
        let now_ms = unix_ms();
        let make = |inbox: &str| OutMessage {
            kind: DELIVERY_JOB,
            payload: DeliveryJob {
                activity_key: activity.key.clone(),
                inbox: inbox.to_string(),
                attempt: 0,
                first_attempt_unix_ms: now_ms,
                trace: job.trace.clone(),
                may_be_delivered: ran_before,
                ..DeliveryJob::default()
            }
            .encode_to_vec(),
        };
        let mut total = explicit.len() as u64;
        if !explicit.is_empty() {
            b.queue
                .publish_batch(
                    QueueName::Delivery,
                    explicit.iter().map(|i| make(i)).collect(),
                )
                .await?;
        }
        if to_followers {
            let mut after: Option<String> = None;
            loop {
                let page = b
                    .store
                    .follower_targets(activity.actor_id, after.as_deref(), PAGE)
                    .await?;
                let Some(last) = page.last().cloned() else {
                    break;
                };
                let batch: Vec<OutMessage> = interleave_by_host(&page)
                    .filter(|t| !explicit.contains(*t) && self.allowed(t))
                    .map(make)
                    .collect();
                total += batch.len() as u64;
                b.queue.publish_batch(QueueName::Delivery, batch).await?;
                if page.len() < PAGE as usize {
                    break;
                }
                after = Some(last);
            }
        }
        b.store.mark_fanned_out(&activity.key, total).await?;
        self.p.metrics.fanout_targets.observe(total as f64);
        Ok(total)
    }

    /// Whether an inbox may be queued: not on a blocked domain (a follower
    /// on a domain blocked since it followed), not on this server (a loop).
    /// Counted when not.
    fn allowed(&self, inbox: &str) -> bool {
        let cfg = &self.p.cfg;
        let host = target_host(inbox);
        let why = if cfg.is_own_authority(host) {
            "own_host"
        } else if cfg.is_blocked(host) {
            "blocked"
        } else {
            return true;
        };
        self.skipped(why, inbox);
        false
    }

    fn skipped(&self, why: &'static str, target: &str) {
        self.p
            .metrics
            .fanout_skipped
            .get_or_create(&[("reason", why)])
            .inc();
        tracing::debug!(target, reason = why, "target skipped");
    }

    /// The explicit remote recipients' target inboxes, and whether the
    /// author's followers are addressed. `bto`/`bcc` recipients get their
    /// personal inbox: the body delivered has no `bto`/`bcc`, so a shared
    /// inbox could not tell who the copy is for.
    async fn explicit_targets(
        &self,
        activity: &StoredActivity,
    ) -> Result<(HashSet<String>, bool), FanoutError> {
        let Some(obj) = activity.body.as_object() else {
            return Err(FanoutError::Permanent(
                "stored activity is not an object".into(),
            ));
        };
        let a = addressing(obj);
        let actor_id = self.p.cfg.actor_id(&activity.actor_name);
        let followers = format!("{actor_id}/followers");
        let local_prefix = format!("{}/", self.p.cfg.base());
        let mut to_followers = false;
        let mut targets = HashSet::new();
        let mut author = None;
        let open = a.open.iter().map(|id| (id, false));
        let blind = a.blind.iter().map(|id| (id, true));
        for (id, is_blind) in open.chain(blind) {
            if *id == followers {
                to_followers = true;
                continue;
            }
            if id.starts_with(&local_prefix) || id == PUBLIC {
                // Local actors and collections are the application's to deliver.
                continue;
            }
            if author.is_none() {
                author = self.p.backends.store.actor_by_id(activity.actor_id).await?;
            }
            let Some(signer) = &author else {
                return Err(FanoutError::Permanent(format!(
                    "author of {} not found",
                    activity.key
                )));
            };
            // A recipient on a blocked domain is not even looked up.
            if self.p.cfg.is_blocked_url(id) {
                self.skipped("blocked", id);
                continue;
            }
            match self.resolver.resolve(id, signer).await {
                Ok(Some(r)) => {
                    let target = if is_blind {
                        r.inbox.clone()
                    } else {
                        Recipient {
                            inbox: &r.inbox,
                            shared_inbox: r.shared_inbox.as_deref(),
                        }
                        .target()
                        .to_string()
                    };
                    if self.allowed(&target) {
                        targets.insert(target);
                    }
                }
                Ok(None) => {
                    tracing::info!(recipient = %id, "recipient is not an actor with an inbox; skipped");
                }
                Err(e) => {
                    tracing::warn!(recipient = %id, error = %e, "recipient unresolvable; skipped");
                }
            }
        }
        Ok((targets, to_followers))
    }
}

/// The authority (`host[:port]`) of an inbox URL, sliced rather than parsed
/// (`inbox_host` parses and allocates, once per follower of a
/// million-follower fanout). It can differ from the `url` crate's reading of
/// an odd URL (backslashes, tabs, percent-encoding); delivery checks policy
/// again on the parsed host at send time, so this is a first filter only.
fn target_host(t: &str) -> &str {
    let rest = t.split_once("://").map_or(t, |(_, r)| r);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    // Userinfo is not part of the host.
    authority.rsplit_once('@').map_or(authority, |(_, h)| h)
}

/// A page of targets (sorted, so one host's inboxes sit together) in
/// round-robin order over their hosts: a host with many followers gets its
/// POSTs spread over the page instead of in one burst, which keeps its
/// connections few and reused and its lane from filling at once.
fn interleave_by_host(page: &[String]) -> impl Iterator<Item = &str> {
    use target_host as host;
    // Runs of one host, in page order.
    let mut runs: Vec<std::collections::VecDeque<&str>> = Vec::new();
    let mut last: Option<&str> = None;
    for t in page {
        let h = host(t);
        if last != Some(h) {
            runs.push(std::collections::VecDeque::new());
            last = Some(h);
        }
        if let Some(run) = runs.last_mut() {
            run.push_back(t.as_str());
        }
    }
    let mut out = Vec::with_capacity(page.len());
    while !runs.is_empty() {
        runs.retain_mut(|run| match run.pop_front() {
            Some(t) => {
                out.push(t);
                true
            }
            None => false,
        });
    }
    out.into_iter()
}

use stampede_backends::clock::now_ms as unix_ms;

/// Runs fanout as its own process: the worker, gRPC health and reflection,
/// metrics, until shutdown.
pub async fn serve(p: Process, l: Listeners) -> Result<(), FanoutError> {
    let work = Fanout::new(p.clone()).run();
    stampede_runtime::process::serve_worker(p, l, stampede_runtime::ServiceKind::Fanout, work).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_spread_round_robin_over_its_hosts() {
        let page: Vec<String> = [
            "https://a.example/u/1/inbox",
            "https://a.example/u/2/inbox",
            "https://a.example/u/3/inbox",
            "https://b.example/inbox",
            "https://c.example/u/1/inbox",
            "https://c.example/u/2/inbox",
        ]
        .map(String::from)
        .to_vec();
        let order: Vec<&str> = interleave_by_host(&page).collect();
        assert_eq!(
            order,
            [
                "https://a.example/u/1/inbox",
                "https://b.example/inbox",
                "https://c.example/u/1/inbox",
                "https://a.example/u/2/inbox",
                "https://c.example/u/2/inbox",
                "https://a.example/u/3/inbox",
            ]
        );
    }
}
