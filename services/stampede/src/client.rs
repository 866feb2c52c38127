//! The gRPC client of the CLI: one channel to ingest, the API token sent as a
//! bearer token when `STAMPEDE_API_TOKEN` is set. Every error it returns is
//! one line naming the server's address where the server is the matter.
use std::time::Duration;

use anyhow::Context;
use stampede_proto::api::{
    actor_service_client::ActorServiceClient, admin_service_client::AdminServiceClient,
    inbound_service_client::InboundServiceClient, publish_service_client::PublishServiceClient,
    Actor, CreateActorRequest, DeadLetter, DeleteActorRequest, GetActorRequest, HostRequest,
    InboundActivity, ListDeadLettersRequest, PublishRequest, PublishResponse,
    PurgeDeadLettersRequest, ReplayDeadLettersRequest, StatusRequest, StatusResponse,
    SubscribeRequest,
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

/// How long connecting to the server may take before the CLI says it cannot
/// reach it (an address that drops packets would otherwise hang).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to stampede's front door.
pub struct Client {
    /// The server's URL, for messages.
    url: String,
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
        let token = match std::env::var("STAMPEDE_API_TOKEN") {
            Ok(t) if !t.is_empty() => Some(
                format!("Bearer {t}")
                    .parse()
                    .context("STAMPEDE_API_TOKEN: not a valid header value")?,
            ),
            _ => None,
        };
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| anyhow::anyhow!("server address {server}: not an address ({e}; set --server or STAMPEDE_GRPC_ADDR)"))?
            .connect_timeout(CONNECT_TIMEOUT);
        let channel = endpoint.connect().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach stampede at {url}: {} (set --server or STAMPEDE_GRPC_ADDR)",
                transport_reason(&e)
            )
        })?;
        let t = Token(token);
        Ok(Self {
            url,
            actors: ActorServiceClient::with_interceptor(channel.clone(), t.clone()),
            publish: PublishServiceClient::with_interceptor(channel.clone(), t.clone()),
            admin: AdminServiceClient::with_interceptor(channel.clone(), t.clone()),
            inbound: InboundServiceClient::with_interceptor(channel, t),
        })
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// One line for a failed call: what the server said, or that it could
    /// not be reached, naming its address.
    fn err(&self) -> impl Fn(Status) -> anyhow::Error + '_ {
        move |s| call_error(&self.url, &s)
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
            .map_err(self.err())?
            .into_inner())
    }

    /// A local actor.
    pub async fn get_actor(&self, name: String) -> anyhow::Result<Actor> {
        Ok(self
            .actors
            .clone()
            .get_actor(GetActorRequest { name })
            .await
            .map_err(self.err())?
            .into_inner())
    }

    /// Deletes a local actor.
    pub async fn delete_actor(&self, name: String) -> anyhow::Result<()> {
        self.actors
            .clone()
            .delete_actor(DeleteActorRequest { name })
            .await
            .map_err(self.err())?;
        Ok(())
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
            .map_err(self.err())?
            .into_inner())
    }

    /// Status.
    pub async fn status(&self) -> anyhow::Result<StatusResponse> {
        Ok(self
            .admin
            .clone()
            .status(StatusRequest {})
            .await
            .map_err(self.err())?
            .into_inner())
    }

    /// Streams verified inbound activities to `each`, until the stream
    /// ends or fails; returns why: [`TailError::Lost`] when the connection
    /// was lost or the server ended the stream (the caller reconnects),
    /// another variant when `each` failed or the server refused the call.
    /// Acknowledged in batches once `each` returned: every
    /// [`TAIL_ACK_BATCH`] activities, or [`TAIL_ACK_EVERY`] after the first
    /// one not acknowledged, with one `ack_through` (activities are handled
    /// in order). An activity handled but not yet acknowledged when the
    /// stream ends comes back to the next subscriber: at least once.
    pub async fn tail(
        &self,
        each: &mut impl FnMut(&InboundActivity) -> anyhow::Result<()>,
    ) -> TailError {
        let (tx, rx) = tokio::sync::mpsc::channel::<SubscribeRequest>(64);
        tx.send(SubscribeRequest::default()).await.ok();
        let mut stream = match self
            .inbound
            .clone()
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return self.tail_error(s),
        };
        // The last id handled and how many are not acknowledged yet.
        let (mut handled, mut unacked) = (0u64, 0u32);
        let flush = tokio::time::sleep(TAIL_ACK_EVERY);
        tokio::pin!(flush);
        loop {
            tokio::select! {
                m = stream.message() => match m {
                    Ok(Some(a)) => {
                        if let Err(e) = each(&a) {
                            return TailError::Output(e);
                        }
                        handled = a.delivery_id;
                        unacked += 1;
                        if unacked == 1 {
                            flush.as_mut().reset(tokio::time::Instant::now() + TAIL_ACK_EVERY);
                        }
                        if unacked < TAIL_ACK_BATCH {
                            continue;
                        }
                    }
                    Ok(None) => return TailError::Lost("the server ended the stream".into()),
                    Err(s) => return self.tail_error(s),
                },
                _ = &mut flush, if unacked > 0 => {}
            }
            unacked = 0;
            let ack = SubscribeRequest {
                ack_through: handled,
                ..SubscribeRequest::default()
            };
            if tx.send(ack).await.is_err() {
                return TailError::Lost("the stream closed".into());
            }
        }
    }

    fn tail_error(&self, s: Status) -> TailError {
        // A server that answers but is not ready yet (restarting) is
        // waited for as one that does not answer.
        if lost(&s) || s.code() == tonic::Code::Unavailable {
            TailError::Lost(reason(&s))
        } else {
            TailError::Refused(call_error(&self.url, &s))
        }
    }

    /// Pauses (or resumes) deliveries to `host`.
    pub async fn set_host_paused(&self, host: String, paused: bool) -> anyhow::Result<()> {
        let mut a = self.admin.clone();
        let req = HostRequest { host };
        if paused {
            a.pause_host(req).await.map_err(self.err())?;
        } else {
            a.resume_host(req).await.map_err(self.err())?;
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
            .map_err(self.err())?
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
            .map_err(self.err())?
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
            .map_err(self.err())?
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
            .map_err(self.err())?
            .into_inner())
    }

    /// Removes a domain's policy; true when there was one.
    pub async fn remove_domain_policy(&self, domain: String) -> anyhow::Result<bool> {
        Ok(self
            .admin
            .clone()
            .remove_domain_policy(stampede_proto::api::RemoveDomainPolicyRequest { domain })
            .await
            .map_err(self.err())?
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
            .map_err(self.err())?
            .into_inner())
    }

    /// Replays dead letters; returns how many.
    pub async fn replay(&self, id: String, host: String, all: bool) -> anyhow::Result<u64> {
        Ok(self
            .admin
            .clone()
            .replay_dead_letters(ReplayDeadLettersRequest { id, host, all })
            .await
            .map_err(self.err())?
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
            .map_err(self.err())?
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
            .map_err(self.err())?
            .into_inner()
            .purged)
    }
}

/// Why `tail` stopped.
#[derive(Debug)]
pub enum TailError {
    /// The connection to the server was lost (it stopped, restarted, or the
    /// network failed): worth reconnecting.
    Lost(String),
    /// The server refused the call (a wrong token, say): not worth retrying.
    Refused(anyhow::Error),
    /// Writing an activity out failed (a closed pipe).
    Output(anyhow::Error),
}

/// Whether `s` says the connection went away rather than the server
/// answering: a transport failure comes as `Unknown` (an h2 protocol
/// error: "error reading a body from connection"), `Unavailable` or
/// `Cancelled`, with the transport's error as its source; an answer of the
/// server has none.
fn lost(s: &Status) -> bool {
    use std::error::Error as _;
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
    ) && s.source().is_some()
}

/// The deepest cause of a transport failure, in a few words
/// ("Connection refused (os error 111)", "connection reset").
fn reason(s: &Status) -> String {
    use std::error::Error as _;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = s.source();
    let mut last = None;
    while let Some(c) = cause {
        last = Some(c.to_string());
        cause = c.source();
    }
    last.unwrap_or_else(|| s.message().to_string())
}

fn transport_reason(e: &tonic::transport::Error) -> String {
    use std::error::Error as _;
    let mut last = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        last = c.to_string();
        cause = c.source();
    }
    last
}

/// One line for a failed call to the server at `url`.
fn call_error(url: &str, s: &Status) -> anyhow::Error {
    use tonic::Code;
    let msg = s.message();
    match s.code() {
        Code::Unauthenticated => anyhow::anyhow!(
            "stampede at {url} refused the API token: {msg} (set STAMPEDE_API_TOKEN to the server's)"
        ),
        Code::PermissionDenied => anyhow::anyhow!("stampede at {url} refused the call: {msg}"),
        _ if lost(s) => anyhow::anyhow!("lost the connection to stampede at {url}: {}", reason(s)),
        Code::Unavailable => anyhow::anyhow!("stampede at {url} is unavailable: {msg}"),
        Code::InvalidArgument => anyhow::anyhow!("invalid: {msg}"),
        Code::NotFound => anyhow::anyhow!("not found: {msg}"),
        Code::AlreadyExists => anyhow::anyhow!("already exists: {msg}"),
        Code::DeadlineExceeded => anyhow::anyhow!("stampede at {url} did not answer in time: {msg}"),
        code => anyhow::anyhow!("stampede at {url}: {code:?}: {msg}"),
    }
}
