//! Service: fanout. Expands one outbound activity into delivery jobs: the
//! author's followers streamed from the store a page at a time (keyset
//! paging, never the whole set in memory) and the explicit remote recipients
//! of `to`/`cc`/`audience`/`bto`/`bcc`, grouped by shared inbox so each
//! shared inbox gets one POST. Jobs reference the stored activity; the body
//! is stored once.
//!
//! Each activity's jobs get a delivery class ([`classify`]): `interactive`,
//! `normal` or `bulk`, the queue they go to. A bulk fanout queues its next
//! page of followers only while the bulk queue holds fewer ready jobs than
//! `STAMPEDE_BULK_QUEUE_BOUND`; above it, the fanout job goes back to the
//! fanout queue for [`BACKPRESSURE_WAIT`] with its place (the last target
//! queued) and is acknowledged: nothing waits in memory, however many
//! followers.
#![deny(missing_docs)]

use std::collections::HashSet;
use std::time::Duration;

use prost::Message;
use stampede_backends::queue::{
    class_name, ready_messages, route_of, Incoming, OutMessage, QueueName,
};
use stampede_backends::store::{Skip, StoredActivity};
use stampede_core::activity::{addressing, PUBLIC};
use stampede_core::followers_sync::{authority_of, header_value};
use stampede_core::targets::Recipient;
use stampede_proto::queue::{DeliveryClass, DeliveryJob, FanoutJob};
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
/// How long a bulk fanout waits, put back in the fanout queue, when the
/// bulk queue is over its bound (RabbitMQ rounds it up to its 5 s tier).
pub const BACKPRESSURE_WAIT: Duration = Duration::from_secs(2);

/// What a followers-only activity's deliveries synchronize (FEP-8fcf).
struct SyncFor {
    /// The author's followers collection.
    collection: String,
    /// Its partial collections' URL.
    url: String,
}

/// `Collection-Synchronization` header values by receiving authority.
type SyncHeaders = std::collections::HashMap<String, String>;

/// Activity types a user waits on: a follow pending until its Accept, an
/// unfollow, a refusal.
const INTERACTIVE_TYPES: [&str; 4] = ["Accept", "Reject", "Follow", "Undo"];

/// The delivery class of an activity of type `kind` with `explicit` explicit
/// remote target inboxes, to the author's `followers` when `Some` (how many
/// they are): `interactive` for Accept, Reject, Follow and Undo, and for a
/// few explicit recipients with no followers audience (a DM, a mention);
/// `bulk` for an audience larger than `STAMPEDE_BULK_AUDIENCE`; `normal`
/// otherwise.
pub fn classify(
    cfg: &stampede_runtime::Config,
    kind: &str,
    explicit: usize,
    followers: Option<u64>,
) -> DeliveryClass {
    if INTERACTIVE_TYPES.contains(&kind) {
        return DeliveryClass::Interactive;
    }
    let audience = explicit as u64 + followers.unwrap_or(0);
    if audience > cfg.bulk_audience {
        DeliveryClass::Bulk
    } else if followers.is_none() && explicit <= cfg.interactive_max_recipients {
        DeliveryClass::Interactive
    } else {
        DeliveryClass::Normal
    }
}

/// What one run of a fanout job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expanded {
    /// Every target queued: this many delivery jobs in all (with those
    /// queued before a pause).
    Done(u64),
    /// The bulk queue was over its bound: the job was put back with its
    /// place after queuing this many.
    Paused(u64),
}

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
    unavailable: std::sync::Arc<stampede_federation::hosts::UnavailableHosts>,
}

impl Fanout {
    /// Fanout over a process's backends.
    pub fn new(p: Process) -> Self {
        let resolver = Resolver::new(p.clone());
        Self {
            p,
            resolver,
            unavailable: std::sync::Arc::default(),
        }
    }

    /// Consumes the fanout queue until shutdown.
    pub async fn run(self) -> Result<(), FanoutError> {
        let (p, prefetch) = (self.p.clone(), self.p.cfg.prefetch.clamp(1, 16));
        tokio::spawn(
            self.unavailable
                .clone()
                .follow(p.backends.clone(), p.shutdown.clone()),
        );
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
        // A job that ran before (redelivered, retried) may have queued some
        // of its jobs already; so may a fanout resumed after a pause (its
        // first run may be redelivered after it put this one back).
        let ran_before = msg.redelivered || job.attempt > 0 || job.followers_after.is_some();
        // A run that may have queued some of its jobs before adds nothing
        // to the hosts' backlogs (what it queued again is not counted twice).
        let first_run = !msg.redelivered && job.attempt == 0;
        match self.expand(&job, ran_before, first_run).await {
            Ok(done) => {
                if let Err(e) = msg.acker.ack().await {
                    tracing::warn!(activity_key = %job.activity_key, error = %e, "ack failed");
                }
                match done {
                    Expanded::Done(n) => {
                        tracing::info!(activity_key = %job.activity_key, targets = n, "fanned out")
                    }
                    Expanded::Paused(n) => {
                        tracing::info!(activity_key = %job.activity_key, queued = n, "fanout paused: the bulk queue is over its bound")
                    }
                }
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
                    route: None,
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
    /// Queues one delivery job per target inbox (from the job's place, when
    /// it was put back by backpressure); returns how many, or that it was
    /// put back again.
    pub async fn expand(
        &self,
        job: &FanoutJob,
        ran_before: bool,
        first_run: bool,
    ) -> Result<Expanded, FanoutError> {
        let b = &self.p.backends;
        let cfg = &self.p.cfg;
        let activity = b.store.activity(&job.activity_key).await?.ok_or_else(|| {
            FanoutError::Permanent(format!("activity {} not found", job.activity_key))
        })?;
        let (explicit, to_followers) = self.explicit_targets(&activity).await?;
        // Only a bulk fanout is ever put back: a resumed one is bulk.
        let resumed = job.followers_after.as_deref();
        let followers = match (resumed, to_followers) {
            (None, true) => Some(b.store.follower_count(activity.actor_id).await?),
            _ => None,
        };
        let class = match resumed {
            Some(_) => DeliveryClass::Bulk,
            None => classify(cfg, &activity.kind, explicit.len(), followers),
        };
        let queue = QueueName::delivery(class);
        let sync = self
            .synchronized(&activity, to_followers, followers)
            .await?;
        let now_ms = unix_ms();
        let make = |inbox: &str, headers: &SyncHeaders| OutMessage {
            kind: DELIVERY_JOB,
            payload: DeliveryJob {
                activity_key: activity.key.clone(),
                inbox: inbox.to_string(),
                attempt: 0,
                first_attempt_unix_ms: now_ms,
                trace: job.trace.clone(),
                may_be_delivered: ran_before,
                class: class.into(),
                collection_synchronization: authority_of(inbox)
                    .and_then(|a| headers.get(a))
                    .cloned()
                    .unwrap_or_default(),
            }
            .encode_to_vec(),
            // A host's jobs share a shard of the class's queue.
            route: Some(route_of(target_host(inbox))),
        };
        let mut total = job.queued_before;
        if resumed.is_none() && !explicit.is_empty() {
            total += explicit.len() as u64;
            let hosts = per_host(explicit.iter().map(String::as_str));
            b.store
                .record_fanout_page(&activity.key, "explicit", &hosts, &[])
                .await?;
            let headers = self
                .sync_headers(
                    sync.as_ref(),
                    &activity,
                    explicit.iter().map(String::as_str),
                )
                .await?;
            b.queue
                .publish_batch(queue, explicit.iter().map(|i| make(i, &headers)).collect())
                .await?;
            self.queued(&hosts, first_run, now_ms).await;
        }
        // Backpressure holds bulk fanouts only, in pages no larger than
        // the bound, so the bulk queue stays under twice the bound.
        let bound = match class {
            DeliveryClass::Bulk if cfg.bulk_queue_bound > 0 => Some(cfg.bulk_queue_bound),
            _ => None,
        };
        let page_size = bound.map_or(PAGE, |n| n.min(u64::from(PAGE)) as u32);
        if to_followers {
            let mut after: Option<String> = resumed.filter(|a| !a.is_empty()).map(str::to_string);
            loop {
                if let Some(bound) = bound {
                    if ready_messages(&*b.queue, QueueName::DeliveryBulk).await? >= bound {
                        self.put_back(job, after.unwrap_or_default(), total).await?;
                        return Ok(Expanded::Paused(total));
                    }
                }
                let page = b
                    .store
                    .follower_targets(activity.actor_id, after.as_deref(), page_size)
                    .await?;
                let Some(last) = page.last().cloned() else {
                    break;
                };
                let mut skips = Vec::new();
                let targets: Vec<&str> = interleave_by_host(&page)
                    .filter(|t| !explicit.contains(*t))
                    .filter(|t| match self.skip_reason(t) {
                        None => true,
                        Some(reason) => {
                            skips.push(Skip {
                                inbox: t.to_string(),
                                host: target_host(t).to_string(),
                                reason,
                            });
                            false
                        }
                    })
                    .collect();
                // Recorded before the jobs exist, under the page's place: a
                // page run again rewrites its own counts.
                let hosts = per_host(targets.iter().copied());
                b.store
                    .record_fanout_page(
                        &activity.key,
                        after.as_deref().unwrap_or(""),
                        &hosts,
                        &skips,
                    )
                    .await?;
                let headers = self
                    .sync_headers(sync.as_ref(), &activity, targets.iter().copied())
                    .await?;
                let batch: Vec<OutMessage> =
                    targets.into_iter().map(|t| make(t, &headers)).collect();
                total += batch.len() as u64;
                b.queue.publish_batch(queue, batch).await?;
                self.queued(&hosts, first_run, now_ms).await;
                if page.len() < page_size as usize {
                    break;
                }
                after = Some(last);
            }
        }
        b.store.mark_fanned_out(&activity.key, total).await?;
        self.p.metrics.fanout_targets.observe(total as f64);
        self.p
            .metrics
            .fanout_classes
            .get_or_create(&[("class", class_name(class))])
            .inc();
        Ok(Expanded::Done(total))
    }

    /// FEP-8fcf: the followers collection and its synchronization URL when
    /// `activity` is followers-only (to its author's followers, not public)
    /// and its author has fewer followers than `STAMPEDE_FOLLOWERS_SYNC_MAX`
    /// (`followers`, when counted already).
    async fn synchronized(
        &self,
        activity: &StoredActivity,
        to_followers: bool,
        followers: Option<u64>,
    ) -> Result<Option<SyncFor>, FanoutError> {
        let max = self.p.cfg.followers_sync_max;
        let public = activity
            .body
            .as_object()
            .is_none_or(|o| addressing(o).public);
        if max == 0 || !to_followers || public {
            return Ok(None);
        }
        let followers = match followers {
            Some(n) => n,
            None => {
                self.p
                    .backends
                    .store
                    .follower_count(activity.actor_id)
                    .await?
            }
        };
        if followers >= max {
            return Ok(None);
        }
        let actor = self.p.cfg.actor_id(&activity.actor_name);
        Ok(Some(SyncFor {
            collection: format!("{actor}/followers"),
            url: format!("{actor}/followers_synchronization"),
        }))
    }

    /// The `Collection-Synchronization` header of each receiving authority
    /// among `targets` (none without `sync`): one read of the stored
    /// digests per page of targets.
    async fn sync_headers<'t>(
        &self,
        sync: Option<&SyncFor>,
        activity: &StoredActivity,
        targets: impl Iterator<Item = &'t str>,
    ) -> Result<SyncHeaders, FanoutError> {
        let Some(sync) = sync else {
            return Ok(SyncHeaders::new());
        };
        let authorities: Vec<String> = targets
            .filter_map(authority_of)
            .collect::<HashSet<&str>>()
            .into_iter()
            .map(str::to_string)
            .collect();
        if authorities.is_empty() {
            return Ok(SyncHeaders::new());
        }
        let digests = self
            .p
            .backends
            .store
            .follower_digests(activity.actor_id, &authorities)
            .await?;
        Ok(authorities
            .into_iter()
            .zip(digests)
            .map(|(a, d)| {
                let h = header_value(&sync.collection, &sync.url, &d);
                (a, h)
            })
            .collect())
    }

    /// Puts a bulk fanout back in the fanout queue for
    /// [`BACKPRESSURE_WAIT`], to resume after `after` (the last target it
    /// queued), `queued` jobs queued so far. Not an attempt.
    async fn put_back(
        &self,
        job: &FanoutJob,
        after: String,
        queued: u64,
    ) -> Result<(), FanoutError> {
        let next = FanoutJob {
            attempt: 0,
            followers_after: Some(after),
            queued_before: queued,
            ..job.clone()
        };
        let out = OutMessage {
            kind: FANOUT_JOB,
            payload: next.encode_to_vec(),
            route: None,
        };
        self.p
            .backends
            .queue
            .publish_delayed(QueueName::Fanout, out, BACKPRESSURE_WAIT)
            .await?;
        self.p.metrics.fanout_paused.inc();
        Ok(())
    }

    /// Why an inbox is not to be queued, if it is not: on a blocked domain (a follower
    /// on a domain blocked since it followed), not on this server (a loop),
    /// not on a host marked unavailable (its jobs would only be
    /// dead-lettered). Counted when not.
    fn skip_reason(&self, inbox: &str) -> Option<&'static str> {
        let cfg = &self.p.cfg;
        let host = target_host(inbox);
        let why = if cfg.is_own_authority(host) {
            "own_host"
        } else if self.p.policy.is_blocked(host) {
            "blocked"
        } else if self.unavailable.contains(host) {
            "unavailable"
        } else {
            return None;
        };
        self.skipped(why, inbox);
        Some(why)
    }

    /// Adds a page's jobs to their hosts' backlogs (the hosts view), on a
    /// first run only; best effort: the count is a gauge.
    async fn queued(&self, per_host: &[(String, u64)], first_run: bool, now_ms: i64) {
        if !first_run || per_host.is_empty() {
            return;
        }
        let b = &self.p.backends;
        if let Err(e) = stampede_federation::backlog::queued(b, per_host, now_ms / 1000).await {
            tracing::debug!(error = %e, "counting the hosts' backlogs failed");
        }
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
            if self.p.policy.is_blocked_url(id) {
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
                    if self.skip_reason(&target).is_none() {
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

/// Targets counted by host.
fn per_host<'a>(targets: impl Iterator<Item = &'a str>) -> Vec<(String, u64)> {
    let mut m: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for t in targets {
        *m.entry(target_host(t)).or_default() += 1;
    }
    m.into_iter().map(|(h, n)| (h.to_string(), n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activities_are_classed_by_type_and_audience() {
        let cfg = stampede_runtime::Config::from_lookup(|_| None).unwrap();
        use DeliveryClass::{Bulk, Interactive, Normal};
        for kind in ["Accept", "Reject", "Follow", "Undo"] {
            assert_eq!(classify(&cfg, kind, 1, None), Interactive, "{kind}");
            // Whatever its audience: an Undo of a Like to 50,000 followers
            // is still what someone waits on.
            assert_eq!(classify(&cfg, kind, 0, Some(50_000)), Interactive);
        }
        // A DM, a mention to a few: interactive.
        assert_eq!(classify(&cfg, "Create", 1, None), Interactive);
        assert_eq!(classify(&cfg, "Create", 5, None), Interactive);
        // Too many recipients, or the followers addressed: normal.
        assert_eq!(classify(&cfg, "Create", 6, None), Normal);
        assert_eq!(classify(&cfg, "Create", 1, Some(3)), Normal);
        assert_eq!(classify(&cfg, "Create", 0, Some(1000)), Normal);
        // A large audience: bulk.
        assert_eq!(classify(&cfg, "Create", 0, Some(1001)), Bulk);
        assert_eq!(classify(&cfg, "Update", 2000, None), Bulk);
        assert_eq!(classify(&cfg, "Announce", 1, Some(20_000)), Bulk);
        let vars = [
            ("STAMPEDE_INTERACTIVE_MAX_RECIPIENTS", "0"),
            ("STAMPEDE_BULK_AUDIENCE", "10"),
        ];
        let cfg = stampede_runtime::Config::from_lookup(|k| {
            vars.iter()
                .find(|(v, _)| *v == k)
                .map(|(_, x)| x.to_string())
        })
        .unwrap();
        assert_eq!(classify(&cfg, "Create", 1, None), Normal);
        assert_eq!(classify(&cfg, "Create", 0, Some(11)), Bulk);
        assert_eq!(classify(&cfg, "Follow", 1, None), Interactive);
    }

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
