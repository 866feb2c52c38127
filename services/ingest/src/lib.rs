//! Service: ingest, the edge of stampede. Its HTTP side serves what remote
//! servers need to verify us (actor documents with public keys, WebFinger,
//! followers collections); its gRPC side is the one front door for the local
//! application and the CLI: actors, `Publish`, status. It does only cheap
//! checks, stores, enqueues durably and answers.
#![deny(missing_docs)]

mod api;
mod api_inbound;
mod console;
mod documents;
mod error;
mod inbox_edge;
pub mod local_actors;
mod routes;
mod server;

use std::sync::Arc;

use stampede_runtime::metrics::Metrics;
use stampede_runtime::{Backends, Config};

pub use api::{ActorApi, AdminApi, PublishApi};
pub use api_inbound::{FollowApi, InboundApi};
pub use error::IngestError;
pub use routes::router;

/// What the ingest handlers share (one reference count to clone: the
/// HTTP router clones it per request).
#[derive(Clone)]
pub struct Ingest(Arc<IngestParts>);

impl std::ops::Deref for Ingest {
    type Target = IngestParts;
    fn deref(&self) -> &IngestParts {
        &self.0
    }
}

#[doc(hidden)]
pub struct IngestParts {
    cfg: Arc<Config>,
    backends: Backends,
    metrics: Arc<Metrics>,
    verifier: stampede_federation::verify::Verifier,
    policy: Arc<stampede_runtime::policy::DomainPolicies>,
    actors: Arc<local_actors::LocalActors>,
    /// The last activities published through this process, newest last,
    /// for the console's Activities page.
    recent: std::sync::Mutex<std::collections::VecDeque<RecentPublish>>,
}

/// One activity `Publish` accepted, as the console lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct RecentPublish {
    pub activity_id: String,
    pub actor: String,
    pub kind: String,
    pub published_unix_ms: i64,
}

/// How many publishes the console lists.
pub(crate) const RECENT_PUBLISHES: usize = 20;

impl Ingest {
    /// The gRPC services ingest serves.
    pub fn grpc(&self) -> (ActorApi, PublishApi, AdminApi) {
        (
            ActorApi(self.clone()),
            PublishApi(self.clone()),
            AdminApi(self.clone()),
        )
    }
}

impl Ingest {
    /// Ingest over a process's backends.
    /// Must run on a Tokio runtime: it starts following the local actors'
    /// version in the cache (until the process's shutdown).
    pub fn from_process(p: &stampede_runtime::process::Process) -> Self {
        let actors = Arc::new(local_actors::LocalActors::new(&p.metrics));
        tokio::spawn(
            actors
                .clone()
                .follow(p.backends.clone(), p.shutdown.clone()),
        );
        Self(Arc::new(IngestParts {
            actors,
            cfg: p.cfg.clone(),
            backends: p.backends.clone(),
            metrics: p.metrics.clone(),
            verifier: stampede_federation::verify::Verifier::new(p.clone()),
            policy: p.policy.clone(),
            recent: Default::default(),
        }))
    }

    /// Adds ingest's gRPC API, behind the token check, to `routes`.
    pub fn add_grpc(
        &self,
        routes: &mut tonic::service::RoutesBuilder,
        auth: stampede_runtime::grpc::Auth,
    ) {
        use stampede_proto::api::{
            actor_service_server::ActorServiceServer, admin_service_server::AdminServiceServer,
            follow_service_server::FollowServiceServer,
            inbound_service_server::InboundServiceServer,
            publish_service_server::PublishServiceServer,
        };
        let (actors, publish, admin) = self.grpc();
        routes
            .add_service(ActorServiceServer::with_interceptor(actors, auth.clone()))
            .add_service(PublishServiceServer::with_interceptor(
                publish,
                auth.clone(),
            ))
            .add_service(AdminServiceServer::with_interceptor(admin, auth.clone()))
            .add_service(InboundServiceServer::with_interceptor(
                InboundApi(self.clone()),
                auth.clone(),
            ))
            .add_service(FollowServiceServer::with_interceptor(
                FollowApi(self.clone()),
                auth,
            ));
    }

    /// Serves ingest's HTTP routes on `listener` until shutdown, with the
    /// connection limits of the configuration.
    pub fn spawn_http(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<std::io::Result<()>> {
        let app = router(self.clone());
        let cfg = &self.cfg;
        let limits = server::Limits {
            header: cfg.http_header_timeout,
            idle: cfg.http_idle_timeout,
            connections: cfg.http_max_connections,
            per_client: cfg.http_max_connections_per_client,
            trusted: cfg.trusted_proxies.clone(),
        };
        tokio::spawn(server::serve(listener, app, limits, shutdown))
    }
}

impl Ingest {
    /// Serves the admin console (README, "Admin console") on `listener`
    /// until shutdown.
    pub fn spawn_console(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<Result<(), IngestError>> {
        tokio::spawn(console::serve(self.clone(), listener, shutdown))
    }
}

/// Runs ingest as its own process: HTTP, gRPC (the API, health, reflection)
/// and metrics, until the process's shutdown token is cancelled.
pub async fn serve(
    p: stampede_runtime::process::Process,
    l: stampede_runtime::process::Listeners,
) -> Result<(), IngestError> {
    let ingest = Ingest::from_process(&p);
    let metrics = p.spawn_metrics(l.metrics);
    let mut routes = p.grpc_routes(&["stampede.ingest"])?;
    ingest.add_grpc(&mut routes, p.auth());
    let http = l
        .http
        .map(|listener| ingest.spawn_http(listener, p.shutdown.clone()));
    let console = l
        .admin
        .map(|listener| ingest.spawn_console(listener, p.shutdown.clone()));
    tracing::info!(service = "ingest", "started");
    stampede_runtime::process::serve_grpc(routes, l.grpc, p.shutdown.clone()).await?;
    if let Some(h) = http {
        let _ = h.await;
    }
    if let Some(h) = console {
        let _ = h.await;
    }
    let _ = metrics.await;
    Ok(())
}
