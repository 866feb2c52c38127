//! The gRPC client of the CLI: one channel to ingest, the API token sent as a
//! bearer token when `STAMPEDE_API_TOKEN` is set.
use anyhow::Context;
use stampede_proto::api::{
    actor_service_client::ActorServiceClient, admin_service_client::AdminServiceClient,
    inbound_service_client::InboundServiceClient, publish_service_client::PublishServiceClient,
    Actor, CreateActorRequest, DeadLetter, GetActorRequest, HostRequest, InboundActivity,
    ListDeadLettersRequest, PublishRequest, PublishResponse, PurgeDeadLettersRequest,
    ReplayDeadLettersRequest, StatusRequest, StatusResponse, SubscribeRequest,
};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Token(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, Token>;

/// A connection to stampede's front door.
pub struct Client {
    actors: ActorServiceClient<Svc>,
    publish: PublishServiceClient<Svc>,
    admin: AdminServiceClient<Svc>,
    inbound: InboundServiceClient<Svc>,
}

/// Turns `host:port` or a URL into an endpoint URL.
pub fn endpoint_url(server: &str) -> String {
    if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    }
}

/// `stampede tail` acknowledges once this many activities are handled…
pub const TAIL_ACK_BATCH: u32 = 64;
/// …or this long after the first one it has not acknowledged.
pub const TAIL_ACK_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

impl Client {
    /// Connects to `server`.
    pub async fn connect(server: &str) -> anyhow::Result<Self> {
        let url = endpoint_url(server);
        let channel = Endpoint::from_shared(url.clone())
            .with_context(|| format!("bad server address {server}"))?
            .connect()
            .await
            .with_context(|| {
                format!("cannot reach stampede at {url} (set --server or STAMPEDE_GRPC_ADDR)")
            })?;
        let token = match std::env::var("STAMPEDE_API_TOKEN") {
            Ok(t) if !t.is_empty() => Some(
                format!("Bearer {t}")
                    .parse()
                    .context("STAMPEDE_API_TOKEN: not a valid header value")?,
            ),
            _ => None,
        };
        let t = Token(token);
        Ok(Self {
            actors: ActorServiceClient::with_interceptor(channel.clone(), t.clone()),
            publish: PublishServiceClient::with_interceptor(channel.clone(), t.clone()),
            admin: AdminServiceClient::with_interceptor(channel.clone(), t.clone()),
            inbound: InboundServiceClient::with_interceptor(channel, t),
        })
    }

    /// Creates a local actor.
    pub async fn create_actor(
        &self,
        name: String,
        display_name: String,
        manual: bool,
    ) -> anyhow::Result<Actor> {
        Ok(self
            .actors
            .clone()
            .create_actor(CreateActorRequest {
                name,
                display_name,
                summary: String::new(),
                manually_approves_followers: manual,
            })
            .await
            .map_err(status)?
            .into_inner())
    }

    /// A local actor.
    pub async fn get_actor(&self, name: String) -> anyhow::Result<Actor> {
        Ok(self
            .actors
            .clone()
            .get_actor(GetActorRequest { name })
            .await
            .map_err(status)?
            .into_inner())
    }

    /// Publishes.
    pub async fn publish(
        &self,
        actor: String,
        activity_json: String,
        idempotency_key: String,
    ) -> anyhow::Result<PublishResponse> {
        Ok(self
            .publish
            .clone()
            .publish(PublishRequest {
                actor,
                activity_json,
                idempotency_key,
            })
            .await
            .map_err(status)?
            .into_inner())
    }

    /// Status.
    pub async fn status(&self) -> anyhow::Result<StatusResponse> {
        Ok(self
            .admin
            .clone()
            .status(StatusRequest {})
            .await
            .map_err(status)?
            .into_inner())
    }

    /// Streams verified inbound activities to `each`, until the stream
    /// ends. Acknowledged in batches once `each` returned: every
    /// [`TAIL_ACK_BATCH`] activities, or [`TAIL_ACK_EVERY`] after the first
    /// one not acknowledged, with one `ack_through` (activities are handled
    /// in order). An activity handled but not yet acknowledged when the
    /// process dies comes back to the next subscriber: at least once.
    pub async fn tail(
        &self,
        mut each: impl FnMut(&InboundActivity) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let (tx, rx) = tokio::sync::mpsc::channel::<SubscribeRequest>(64);
        tx.send(SubscribeRequest::default()).await.ok();
        let mut stream = self
            .inbound
            .clone()
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(status)?
            .into_inner();
        // The last id handled and how many are not acknowledged yet.
        let (mut handled, mut unacked) = (0u64, 0u32);
        let flush = tokio::time::sleep(TAIL_ACK_EVERY);
        tokio::pin!(flush);
        loop {
            tokio::select! {
                m = stream.message() => {
                    let Some(a) = m.map_err(status)? else { break };
                    each(&a)?;
                    handled = a.delivery_id;
                    unacked += 1;
                    if unacked == 1 {
                        flush.as_mut().reset(tokio::time::Instant::now() + TAIL_ACK_EVERY);
                    }
                    if unacked < TAIL_ACK_BATCH {
                        continue;
                    }
                }
                _ = &mut flush, if unacked > 0 => {}
            }
            unacked = 0;
            tx.send(SubscribeRequest {
                ack_through: handled,
                ..SubscribeRequest::default()
            })
            .await
            .context("the stream closed")?;
        }
        Ok(())
    }

    /// Pauses (or resumes) deliveries to `host`.
    pub async fn set_host_paused(&self, host: String, paused: bool) -> anyhow::Result<()> {
        let mut a = self.admin.clone();
        let req = HostRequest { host };
        if paused {
            a.pause_host(req).await.map_err(status)?;
        } else {
            a.resume_host(req).await.map_err(status)?;
        }
        Ok(())
    }

    /// The hosts view.
    pub async fn hosts(
        &self,
        sort: String,
        limit: u32,
    ) -> anyhow::Result<Vec<stampede_proto::api::HostView>> {
        Ok(self
            .admin
            .clone()
            .list_hosts(stampede_proto::api::ListHostsRequest { sort, limit })
            .await
            .map_err(status)?
            .into_inner()
            .hosts)
    }

    /// Where an activity's deliveries are.
    pub async fn activity_delivery(
        &self,
        activity_id: String,
        per_host: bool,
    ) -> anyhow::Result<stampede_proto::api::ActivityDelivery> {
        Ok(self
            .admin
            .clone()
            .get_activity_delivery(stampede_proto::api::GetActivityDeliveryRequest {
                activity_id,
                per_host,
            })
            .await
            .map_err(status)?
            .into_inner())
    }

    /// Failing hosts (only the unavailable ones with `unavailable_only`).
    pub async fn failing_hosts(
        &self,
        unavailable_only: bool,
        limit: u32,
    ) -> anyhow::Result<Vec<stampede_proto::api::FailingHost>> {
        Ok(self
            .admin
            .clone()
            .list_failing_hosts(stampede_proto::api::ListFailingHostsRequest {
                unavailable_only,
                limit,
            })
            .await
            .map_err(status)?
            .into_inner()
            .hosts)
    }

    /// Sets a domain's policy.
    pub async fn set_domain_policy(
        &self,
        domain: String,
        policy: &str,
        reason: String,
    ) -> anyhow::Result<stampede_proto::api::DomainPolicy> {
        Ok(self
            .admin
            .clone()
            .set_domain_policy(stampede_proto::api::SetDomainPolicyRequest {
                domain,
                policy: policy.into(),
                reason,
            })
            .await
            .map_err(status)?
            .into_inner())
    }

    /// Removes a domain's policy; true when there was one.
    pub async fn remove_domain_policy(&self, domain: String) -> anyhow::Result<bool> {
        Ok(self
            .admin
            .clone()
            .remove_domain_policy(stampede_proto::api::RemoveDomainPolicyRequest { domain })
            .await
            .map_err(status)?
            .into_inner()
            .removed)
    }

    /// Every domain policy, and the federation mode.
    pub async fn domain_policies(
        &self,
    ) -> anyhow::Result<stampede_proto::api::ListDomainPoliciesResponse> {
        Ok(self
            .admin
            .clone()
            .list_domain_policies(stampede_proto::api::ListDomainPoliciesRequest {})
            .await
            .map_err(status)?
            .into_inner())
    }

    /// Replays dead letters; returns how many.
    pub async fn replay(&self, id: String, host: String, all: bool) -> anyhow::Result<u64> {
        Ok(self
            .admin
            .clone()
            .replay_dead_letters(ReplayDeadLettersRequest { id, host, all })
            .await
            .map_err(status)?
            .into_inner()
            .replayed)
    }

    /// Dead letters.
    pub async fn dead_letters(&self, host: String, limit: u32) -> anyhow::Result<Vec<DeadLetter>> {
        Ok(self
            .admin
            .clone()
            .list_dead_letters(ListDeadLettersRequest { limit, host })
            .await
            .map_err(status)?
            .into_inner()
            .dead_letters)
    }

    /// Deletes the dead letters of `host`, or every one with `all`; returns
    /// how many.
    pub async fn purge(&self, host: String, all: bool) -> anyhow::Result<u64> {
        Ok(self
            .admin
            .clone()
            .purge_dead_letters(PurgeDeadLettersRequest { host, all })
            .await
            .map_err(status)?
            .into_inner()
            .purged)
    }
}

fn status(s: Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}
