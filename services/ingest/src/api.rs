//! The gRPC API for the local application (README, "gRPC API").
use stampede_backends::store::{NewActor, PolicyKind, PrivateKey};
use stampede_core::keys::generate_rsa_2048;
use stampede_federation::publish;
use stampede_proto::api::{
    actor_service_server::ActorService, admin_service_server::AdminService,
    publish_service_server::PublishService, Actor, CreateActorRequest, DeadLetter,
    DeleteActorRequest, DeleteActorResponse, DomainPolicy, GetActorRequest, HostRequest,
    HostResponse, ListDeadLettersRequest, ListDeadLettersResponse, ListDomainPoliciesRequest,
    ListDomainPoliciesResponse, PublishRequest, PublishResponse, PurgeDeadLettersRequest,
    PurgeDeadLettersResponse, QueueDepth, RemoveDomainPolicyRequest, RemoveDomainPolicyResponse,
    ReplayDeadLettersRequest, ReplayDeadLettersResponse, SetDomainPolicyRequest, StatusRequest,
    StatusResponse,
};
use tonic::{Request, Response, Status};

use crate::documents::{actor_message, valid_name};
use crate::{Ingest, IngestError};

/// `stampede.v1.ActorService`.
#[derive(Clone)]
pub struct ActorApi(pub(crate) Ingest);
/// `stampede.v1.PublishService`.
#[derive(Clone)]
pub struct PublishApi(pub(crate) Ingest);
/// `stampede.v1.AdminService`.
#[derive(Clone)]
pub struct AdminApi(pub(crate) Ingest);

#[tonic::async_trait]
impl ActorService for ActorApi {
    async fn create_actor(
        &self,
        req: Request<CreateActorRequest>,
    ) -> Result<Response<Actor>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.0.create_actor(r).await?))
    }

    async fn get_actor(&self, req: Request<GetActorRequest>) -> Result<Response<Actor>, Status> {
        let name = req.into_inner().name;
        let s = &self.0;
        let a = s
            .backends
            .store
            .actor_profile_by_name(&name)
            .await
            .map_err(IngestError::from)?
            .ok_or_else(|| IngestError::NotFound(format!("no local actor named `{name}`")))?;
        let n = s
            .backends
            .store
            .follower_count(a.id)
            .await
            .map_err(IngestError::from)?;
        Ok(Response::new(actor_message(&s.cfg, &a, n)))
    }

    async fn delete_actor(
        &self,
        req: Request<DeleteActorRequest>,
    ) -> Result<Response<DeleteActorResponse>, Status> {
        let name = req.into_inner().name;
        let s = &self.0;
        // The instance actor (`_instance`) is not the application's to delete.
        if !valid_name(&name)
            || !s
                .backends
                .store
                .delete_actor(&name)
                .await
                .map_err(IngestError::from)?
        {
            return Err(IngestError::NotFound(format!("no local actor named `{name}`")).into());
        }
        s.actors.changed(&s.backends).await;
        tracing::info!(actor = %name, "actor deleted");
        Ok(Response::new(DeleteActorResponse {}))
    }
}

#[tonic::async_trait]
impl PublishService for PublishApi {
    async fn publish(
        &self,
        req: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let span = tracing::info_span!(
            "publish",
            actor = %req.get_ref().actor,
            activity_id = tracing::field::Empty,
            activity_type = tracing::field::Empty,
        );
        stampede_runtime::telemetry::set_parent(
            &span,
            req.metadata()
                .get("traceparent")
                .and_then(|v| v.to_str().ok()),
        );
        let r =
            tracing::Instrument::instrument(self.0.publish(req.into_inner()), span.clone()).await?;
        span.record("activity_id", r.activity_id.as_str());
        Ok(Response::new(r))
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let b = &self.0.backends;
        let depths = b.queue.depths().await.map_err(IngestError::from)?;
        let ages = stampede_federation::queue_heads::head_ages(&*b.cache, &depths)
            .await
            .map_err(IngestError::from)?;
        let t = b.store.totals().await.map_err(IngestError::from)?;
        Ok(Response::new(StatusResponse {
            queues: depths
                .into_iter()
                .map(|d| QueueDepth {
                    class: d
                        .name
                        .delivery_class()
                        .map(stampede_backends::queue::class_name)
                        .unwrap_or_default()
                        .to_string(),
                    head_age_ms: ages.get(&d.name).copied().unwrap_or(0),
                    queue: d.queue,
                    messages: d.messages,
                    consumers: d.consumers,
                })
                .collect(),
            activities: t.activities,
            delivered: t.delivered,
            failed: t.dead_letters,
            dead_letters: t.dead_letters,
            paused_hosts: b.store.paused_hosts().await.map_err(IngestError::from)?,
            failing_hosts: b
                .store
                .failing_hosts(100)
                .await
                .map_err(IngestError::from)?
                .into_iter()
                .map(failing_host)
                .collect(),
            parked: stampede_federation::parked::parked(&*b.cache)
                .await
                .map_err(IngestError::from)?
                .into_iter()
                .map(|p| stampede_proto::api::ParkedDeliveries {
                    reason: p.reason.as_str().to_string(),
                    deliveries: p.deliveries,
                    next_due_unix_ms: p.next_due_ms,
                })
                .collect(),
            busy_hosts: stampede_federation::hosts::busy(b, &self.0.cfg, 20)
                .await
                .map_err(IngestError::from)?
                .into_iter()
                .map(|h| stampede_proto::api::BusyHost {
                    host: h.host,
                    deliveries: h.deliveries,
                    latency_ms: h.latency_ms,
                    in_flight: h.in_flight,
                    limit: h.limit,
                })
                .collect(),
        }))
    }

    async fn pause_host(
        &self,
        req: Request<HostRequest>,
    ) -> Result<Response<HostResponse>, Status> {
        Ok(Response::new(
            self.set_paused(req.into_inner().host, true).await?,
        ))
    }

    async fn resume_host(
        &self,
        req: Request<HostRequest>,
    ) -> Result<Response<HostResponse>, Status> {
        Ok(Response::new(
            self.set_paused(req.into_inner().host, false).await?,
        ))
    }

    async fn set_domain_policy(
        &self,
        req: Request<SetDomainPolicyRequest>,
    ) -> Result<Response<DomainPolicy>, Status> {
        let r = req.into_inner();
        let ingest = &self.0;
        let domain = stampede_federation::domains::parse_domain(&ingest.cfg, &r.domain)
            .map_err(IngestError::Invalid)?;
        let kind = PolicyKind::parse(r.policy.trim()).ok_or_else(|| {
            IngestError::Invalid(format!(
                "policy `{}`: expected allow, silence or suspend",
                r.policy
            ))
        })?;
        if r.reason.len() > 1000 {
            return Err(IngestError::Invalid("reason: at most 1000 bytes".into()).into());
        }
        let applied = stampede_federation::domains::set(
            &ingest.backends,
            &ingest.policy,
            domain,
            kind,
            r.reason,
        )
        .await
        .map_err(IngestError::from)?;
        Ok(Response::new(DomainPolicy {
            follows_removed: applied.follows_removed,
            keys_forgotten: applied.keys_forgotten,
            ..policy_message(applied.policy)
        }))
    }

    async fn list_domain_policies(
        &self,
        _req: Request<ListDomainPoliciesRequest>,
    ) -> Result<Response<ListDomainPoliciesResponse>, Status> {
        let ingest = &self.0;
        let rules = ingest
            .backends
            .store
            .domain_policies()
            .await
            .map_err(IngestError::from)?;
        Ok(Response::new(ListDomainPoliciesResponse {
            policies: rules.into_iter().map(policy_message).collect(),
            mode: if ingest.cfg.allowlist {
                "allowlist"
            } else {
                "blocklist"
            }
            .into(),
        }))
    }

    async fn remove_domain_policy(
        &self,
        req: Request<RemoveDomainPolicyRequest>,
    ) -> Result<Response<RemoveDomainPolicyResponse>, Status> {
        let ingest = &self.0;
        let domain =
            stampede_federation::domains::parse_domain(&ingest.cfg, &req.into_inner().domain)
                .map_err(IngestError::Invalid)?;
        let removed =
            stampede_federation::domains::remove(&ingest.backends, &ingest.policy, &domain)
                .await
                .map_err(IngestError::from)?;
        Ok(Response::new(RemoveDomainPolicyResponse { removed }))
    }

    async fn get_activity_delivery(
        &self,
        req: Request<stampede_proto::api::GetActivityDeliveryRequest>,
    ) -> Result<Response<stampede_proto::api::ActivityDelivery>, Status> {
        let r = req.into_inner();
        if r.activity_id.is_empty() || r.activity_id.len() > 2048 {
            return Err(IngestError::Invalid("activity_id: the activity's id".into()).into());
        }
        let d = self
            .0
            .backends
            .store
            .activity_delivery(&r.activity_id)
            .await
            .map_err(IngestError::from)?
            .ok_or_else(|| {
                IngestError::NotFound(format!("no activity {} published here", r.activity_id))
            })?;
        let mut sum = stampede_proto::api::DeliveryCounts::default();
        let mut hosts = Vec::new();
        for h in &d.hosts {
            let c = delivery_counts(h);
            add_counts(&mut sum, &c);
            if r.per_host {
                hosts.push(stampede_proto::api::HostDelivery {
                    host: h.host.clone(),
                    counts: Some(c),
                });
            }
        }
        Ok(Response::new(stampede_proto::api::ActivityDelivery {
            activity_id: d.ap_id,
            fanned_out: d.fanned_out,
            counts: Some(sum),
            hosts,
        }))
    }

    async fn list_hosts(
        &self,
        req: Request<stampede_proto::api::ListHostsRequest>,
    ) -> Result<Response<stampede_proto::api::ListHostsResponse>, Status> {
        use stampede_federation::backlog::{hosts_view, SortBy};
        let r = req.into_inner();
        let sort = match r.sort.as_str() {
            "" | "pending" => SortBy::Pending,
            "oldest" => SortBy::Oldest,
            "failures" => SortBy::Failures,
            other => {
                return Err(IngestError::Invalid(format!(
                    "sort `{other}`: expected pending, oldest or failures"
                ))
                .into())
            }
        };
        let limit = if r.limit == 0 { 20 } else { r.limit.min(500) } as usize;
        let ingest = &self.0;
        let rows = hosts_view(&ingest.backends, &ingest.cfg, &ingest.policy, sort, limit)
            .await
            .map_err(IngestError::from)?;
        Ok(Response::new(stampede_proto::api::ListHostsResponse {
            hosts: rows
                .into_iter()
                .map(|h| stampede_proto::api::HostView {
                    host: h.host,
                    pending: h.pending.count,
                    pending_age_secs: h.pending.mean_age_secs,
                    in_flight: h.in_flight,
                    limit: h.limit,
                    circuit: h.circuit.into(),
                    failures: h.failures,
                    last_status: u32::from(h.last.status),
                    last_answer_unix_ms: h.last.at_ms,
                    last_success_unix_ms: h.last.ok_ms,
                    policy: h.policy.into(),
                })
                .collect(),
        }))
    }

    async fn list_failing_hosts(
        &self,
        req: Request<stampede_proto::api::ListFailingHostsRequest>,
    ) -> Result<Response<stampede_proto::api::ListFailingHostsResponse>, Status> {
        let r = req.into_inner();
        let limit = if r.limit == 0 {
            100
        } else {
            r.limit.min(10_000)
        };
        let store = &self.0.backends.store;
        let hosts = if r.unavailable_only {
            // Unavailable hosts are a subset of the failing ones: read as
            // many failing ones as it takes to find `limit` of them.
            let mut all = store
                .failing_hosts(crate::api::FAILING_SCAN)
                .await
                .map_err(IngestError::from)?;
            all.retain(|h| h.unavailable);
            all.truncate(limit as usize);
            all
        } else {
            store
                .failing_hosts(limit)
                .await
                .map_err(IngestError::from)?
        };
        Ok(Response::new(
            stampede_proto::api::ListFailingHostsResponse {
                hosts: hosts.into_iter().map(failing_host).collect(),
            },
        ))
    }

    async fn replay_dead_letters(
        &self,
        req: Request<ReplayDeadLettersRequest>,
    ) -> Result<Response<ReplayDeadLettersResponse>, Status> {
        Ok(Response::new(self.replay(req.into_inner()).await?))
    }

    async fn list_dead_letters(
        &self,
        req: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let r = req.into_inner();
        let limit = if r.limit == 0 { 100 } else { r.limit.min(1000) };
        let host = (!r.host.is_empty()).then_some(r.host.as_str());
        let rows = self
            .0
            .backends
            .store
            .dead_letters(limit, host)
            .await
            .map_err(IngestError::from)?;
        Ok(Response::new(ListDeadLettersResponse {
            dead_letters: rows
                .into_iter()
                .map(|d| DeadLetter {
                    id: d.id.to_string(),
                    activity_id: d.activity_id,
                    inbox: d.inbox,
                    host: d.host,
                    reason: d.reason,
                    last_status: d.last_status.map_or(0, u32::from),
                    attempts: d.attempts,
                    first_attempt_unix_ms: d.first_attempt_unix_ms,
                    last_attempt_unix_ms: d.last_attempt_unix_ms,
                })
                .collect(),
        }))
    }

    async fn purge_dead_letters(
        &self,
        req: Request<PurgeDeadLettersRequest>,
    ) -> Result<Response<PurgeDeadLettersResponse>, Status> {
        let r = req.into_inner();
        if r.host.trim().is_empty() != r.all {
            return Err(IngestError::Invalid(
                "give exactly one of host, all: a purge deletes dead letters for good".into(),
            )
            .into());
        }
        Ok(Response::new(self.purge(r.host).await?))
    }
}

impl AdminApi {
    async fn set_paused(&self, host: String, paused: bool) -> Result<HostResponse, IngestError> {
        let host = host.trim().to_ascii_lowercase();
        if host.is_empty() || host.contains('/') || host.len() > 255 {
            return Err(IngestError::Invalid(
                "host must be a host name, with a port if not the default".into(),
            ));
        }
        let b = &self.0.backends;
        if paused {
            stampede_federation::hosts::pause(b, &host).await?;
        } else {
            stampede_federation::hosts::resume(b, &host).await?;
        }
        tracing::info!(inbox_host = %host, paused, "host paused state changed");
        Ok(HostResponse { host, paused })
    }

    async fn replay(
        &self,
        r: ReplayDeadLettersRequest,
    ) -> Result<ReplayDeadLettersResponse, IngestError> {
        let chosen = [!r.id.is_empty(), !r.host.is_empty(), r.all];
        if chosen.iter().filter(|c| **c).count() != 1 {
            return Err(IngestError::Invalid(
                "give exactly one of id, host, all".into(),
            ));
        }
        let id = if r.id.is_empty() {
            None
        } else {
            Some(
                r.id.parse::<i64>()
                    .map_err(|_| IngestError::Invalid(format!("bad dead letter id {}", r.id)))?,
            )
        };
        let host = (!r.host.is_empty()).then_some(r.host.as_str());
        let replayed =
            stampede_federation::dead_letters::replay(&self.0.backends, id, host).await?;
        tracing::info!(replayed, ?id, ?host, "dead letters replayed");
        Ok(ReplayDeadLettersResponse { replayed })
    }

    /// Deletes the dead letters of `host` (every one when empty: `all` was
    /// asked for), a batch
    /// at a time: no statement holds its locks for long.
    async fn purge(&self, host: String) -> Result<PurgeDeadLettersResponse, IngestError> {
        let host = host.trim().to_ascii_lowercase();
        if host.contains('/') || host.len() > 255 {
            return Err(IngestError::Invalid(
                "host must be a host name, with a port if not the default".into(),
            ));
        }
        let only = (!host.is_empty()).then_some(host.as_str());
        let batch = stampede_backends::store::postgres::PRUNE_BATCH;
        let store = &self.0.backends.store;
        let mut purged = 0;
        loop {
            let n = store.purge_dead_letters(only, batch).await?;
            purged += n;
            if n < u64::from(batch) {
                break;
            }
            tokio::task::yield_now().await;
        }
        tracing::info!(purged, inbox_host = ?only, "dead letters purged");
        Ok(PurgeDeadLettersResponse { purged })
    }
}

impl Ingest {
    async fn create_actor(&self, r: CreateActorRequest) -> Result<Actor, IngestError> {
        if !valid_name(&r.name) {
            return Err(IngestError::Invalid(format!(
                "actor name `{}` must be 1 to 64 of [a-z0-9_]",
                r.name
            )));
        }
        if r.display_name.len() > 256 || r.summary.len() > 8192 {
            return Err(IngestError::Invalid(
                "display_name is limited to 256 bytes and summary to 8192".into(),
            ));
        }
        // RSA key generation takes tens of milliseconds: keep it off the executor.
        let key = tokio::task::spawn_blocking(generate_rsa_2048)
            .await
            .map_err(|e| {
                stampede_runtime::Error::Internal(format!("key generation failed: {e}"))
            })??;
        let a = self
            .backends
            .store
            .create_actor(NewActor {
                name: r.name.clone(),
                display_name: r.display_name,
                summary: r.summary,
                manually_approves_followers: r.manually_approves_followers,
                private_key: PrivateKey(key.private_pkcs8_der),
                public_key_pem: key.public_pem,
            })
            .await?;
        self.actors.changed(&self.backends).await;
        tracing::info!(actor = %a.name, "actor created");
        Ok(actor_message(&self.cfg, &a.profile(), 0))
    }

    async fn publish(&self, r: PublishRequest) -> Result<PublishResponse, IngestError> {
        if r.idempotency_key.len() > 256 {
            return Err(IngestError::Invalid(
                "idempotency_key is limited to 256 bytes".into(),
            ));
        }
        let actor = self
            .backends
            .store
            .actor_ref_by_name(&r.actor)
            .await?
            .ok_or_else(|| IngestError::NotFound(format!("no local actor named `{}`", r.actor)))?;
        let key = (!r.idempotency_key.is_empty()).then_some(r.idempotency_key);
        let published = publish::publish(
            &self.cfg,
            &self.backends,
            &actor,
            r.activity_json.as_bytes(),
            key,
        )
        .await?;
        let inserted = published.inserted;
        if inserted.created {
            self.metrics.published.inc();
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() >= crate::RECENT_PUBLISHES {
                recent.pop_front();
            }
            recent.push_back(crate::RecentPublish {
                activity_id: inserted.ap_id.clone(),
                actor: actor.name.clone(),
                kind: published.kind.to_string(),
                published_unix_ms: stampede_backends::clock::now_ms(),
            });
        }
        tracing::info!(
            activity_id = %inserted.ap_id,
            actor = %actor.name,
            kind = %published.kind,
            created = inserted.created,
            "activity published"
        );
        Ok(PublishResponse {
            activity_id: inserted.ap_id,
            created: inserted.created,
        })
    }
}

/// A stored rule as the API shows it.
fn policy_message(p: stampede_backends::store::DomainPolicy) -> DomainPolicy {
    DomainPolicy {
        domain: p.domain,
        policy: p.kind.as_str().into(),
        reason: p.reason,
        updated_unix_ms: p.updated_unix_ms,
        follows_removed: 0,
        keys_forgotten: 0,
    }
}

/// How many failing hosts `ListFailingHosts` reads to find the unavailable ones.
const FAILING_SCAN: u32 = 100_000;

/// A failing host as the API shows it.
fn failing_host(h: stampede_backends::store::HostHealth) -> stampede_proto::api::FailingHost {
    stampede_proto::api::FailingHost {
        host: h.host,
        failing_since_unix_ms: h.failing_since_unix_ms,
        failures: h.failures,
        circuit_open_until_unix_ms: h.open_until_unix_ms,
        unavailable: h.unavailable,
    }
}

/// One host's targets by state, from its records.
fn delivery_counts(
    h: &stampede_backends::store::HostDelivery,
) -> stampede_proto::api::DeliveryCounts {
    let by = |reason: &str| -> u64 {
        h.skipped
            .iter()
            .filter(|(r, _)| r == reason)
            .map(|(_, n)| n)
            .sum()
    };
    let (blocked, unavailable, own) = (by("blocked"), by("unavailable"), by("own_host"));
    let (suspended, superseded) = (by("suspended"), by("superseded"));
    // Fanout's skips made no job; the send-time drops are among its jobs.
    let settled = h.delivered + h.dead_lettered + h.retrying + suspended + superseded;
    stampede_proto::api::DeliveryCounts {
        total: h.targets + blocked + unavailable + own,
        pending: h.targets.saturating_sub(settled),
        delivered: h.delivered,
        retrying: h.retrying,
        dead_lettered: h.dead_lettered,
        skipped_policy: blocked + suspended,
        skipped_unavailable: unavailable,
        skipped_other: own,
        superseded,
    }
}

fn add_counts(
    sum: &mut stampede_proto::api::DeliveryCounts,
    c: &stampede_proto::api::DeliveryCounts,
) {
    sum.total += c.total;
    sum.pending += c.pending;
    sum.delivered += c.delivered;
    sum.retrying += c.retrying;
    sum.dead_lettered += c.dead_lettered;
    sum.skipped_policy += c.skipped_policy;
    sum.skipped_unavailable += c.skipped_unavailable;
    sum.skipped_other += c.skipped_other;
    sum.superseded += c.superseded;
}
