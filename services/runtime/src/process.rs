//! One stampede process: configuration, backends, metrics, the signing pool,
//! the outbound client and the shutdown token, plus the listeners it serves
//! on. Services take a [`Process`] and [`Listeners`], so `stampede serve X`,
//! the thin per-service binaries and the tests all start them the same way.
use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::RoutesBuilder;
use tonic::transport::server::TcpIncoming;

use crate::http_client::OutboundClient;
use crate::metrics::Metrics;
use crate::signer::SignerPool;
use crate::{Backends, Config, Error, Result, Role, ServiceKind};

/// What a service runs with. Cloning is one reference count: handlers hold
/// it, and they are cloned per message and per request.
#[derive(Clone)]
pub struct Process(Arc<ProcessParts>);

impl std::ops::Deref for Process {
    type Target = ProcessParts;
    fn deref(&self) -> &ProcessParts {
        &self.0
    }
}

/// The parts of a [`Process`].
pub struct ProcessParts {
    /// Configuration.
    pub cfg: Arc<Config>,
    /// Queue, cache, store.
    pub backends: Backends,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// RSA signing threads.
    pub signer: SignerPool,
    /// Guarded outbound HTTP client.
    pub http: OutboundClient,
    /// Cancelled when the process must stop.
    pub shutdown: CancellationToken,
    /// Domain policies, kept current from the store.
    pub policy: Arc<crate::policy::DomainPolicies>,
    /// The signature style each remote host takes (`STAMPEDE_SIGNATURE_STYLE`).
    pub styles: crate::signature_styles::StyleMemory,
    instance: tokio::sync::OnceCell<stampede_backends::store::LocalActor>,
}

/// Name of the instance actor, which signs key fetches (servers in
/// authorized-fetch mode require a signed GET). Names starting with `_` are
/// reserved.
pub const INSTANCE_ACTOR: &str = "_instance";

/// The listeners a service serves on, bound by the caller.
pub struct Listeners {
    /// ingest's HTTP listener (only ingest uses it).
    pub http: Option<TcpListener>,
    /// gRPC.
    pub grpc: TcpListener,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics: TcpListener,
    /// ingest's admin console (`STAMPEDE_ADMIN_ADDR`); `None`: no console.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds the configured addresses.
    pub async fn bind(cfg: &Config, with_http: bool) -> Result<Self> {
        Ok(Self {
            http: if with_http {
                Some(bind("STAMPEDE_HTTP_ADDR", cfg.http_addr).await?)
            } else {
                None
            },
            grpc: bind("STAMPEDE_GRPC_ADDR", cfg.grpc_addr).await?,
            metrics: bind("STAMPEDE_METRICS_ADDR", cfg.metrics_addr).await?,
            admin: match cfg.admin_addr {
                Some(addr) if with_http => match bind("STAMPEDE_ADMIN_ADDR", addr).await {
                    Ok(l) => Some(l),
                    Err(e) if !cfg.admin_addr_given => {
                        tracing::warn!(error = %e, "admin console off: its default address is taken");
                        None
                    }
                    Err(e) => return Err(e),
                },
                _ => None,
            },
        })
    }
}

async fn bind(var: &'static str, addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| Error::Config {
        var,
        reason: format!("cannot listen on {addr}: {e}"),
    })
}

impl Process {
    /// Connects the backends named by `cfg`: RabbitMQ, Redis and PostgreSQL
    /// for a service run on its own; for [`Role::AllInOne`], the embedded
    /// ones where a URL is unset.
    pub async fn connect(cfg: Config, role: Role, shutdown: CancellationToken) -> Result<Self> {
        let connection = format!("stampede-{}", role.name());
        let backends = match role {
            Role::AllInOne => Backends::open(&cfg, &connection).await?,
            Role::Service(_) => Backends::connect(&cfg, &connection).await?,
        };
        let p = Self::with_backends(cfg, backends, shutdown)?;
        p.policy.start(&p.cfg, &p.backends).await?;
        tokio::spawn(
            p.policy
                .clone()
                .follow(p.backends.clone(), p.shutdown.clone()),
        );
        Ok(p)
    }

    /// A process over backends built elsewhere.
    pub fn with_backends(
        cfg: Config,
        backends: Backends,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        let metrics = Metrics::new();
        Ok(Self(Arc::new(ProcessParts {
            http: OutboundClient::new(&cfg)?,
            policy: Arc::new(
                crate::policy::DomainPolicies::new(&cfg).counted(metrics.domain_policies.clone()),
            ),
            styles: crate::signature_styles::StyleMemory::new(
                cfg.signature_style,
                backends.cache.clone(),
            ),
            cfg: Arc::new(cfg),
            backends,
            metrics,
            signer: SignerPool::per_core()?,
            shutdown,
            instance: tokio::sync::OnceCell::new(),
        })))
    }

    /// The instance actor, created (with its key) on first use.
    pub async fn instance_actor(&self) -> Result<stampede_backends::store::LocalActor> {
        self.instance
            .get_or_try_init(|| async {
                let store = &self.backends.store;
                if let Some(a) = store.actor_by_name(INSTANCE_ACTOR).await? {
                    return Ok::<_, Error>(a);
                }
                let key = tokio::task::spawn_blocking(stampede_core::keys::generate_rsa_2048)
                    .await
                    .map_err(|e| Error::Internal(format!("key generation failed: {e}")))??;
                Ok(store
                    .ensure_actor(stampede_backends::store::NewActor {
                        name: INSTANCE_ACTOR.into(),
                        display_name: "stampede".into(),
                        summary: String::new(),
                        manually_approves_followers: true,
                        private_key: stampede_backends::store::PrivateKey(key.private_pkcs8_der),
                        public_key_pem: key.public_pem,
                    })
                    .await?)
            })
            .await
            .cloned()
    }

    /// Serves `/metrics`, `/healthz`, `/readyz` in the background.
    pub fn spawn_metrics(
        &self,
        listener: TcpListener,
    ) -> tokio::task::JoinHandle<std::io::Result<()>> {
        tokio::spawn(self.metrics.clone().sample(
            self.backends.clone(),
            std::time::Duration::from_secs(10),
            self.shutdown.clone(),
        ));
        tokio::spawn(crate::rates::publish(
            self.metrics.clone(),
            self.backends.clone(),
            self.shutdown.clone(),
        ));
        tokio::spawn(crate::metrics::serve(
            listener,
            self.metrics.clone(),
            self.backends.clone(),
            self.shutdown.clone(),
        ))
    }

    /// A gRPC route set holding the health service (with `names` following
    /// readiness) and reflection; services add theirs.
    pub fn grpc_routes(&self, names: &[&str]) -> Result<RoutesBuilder> {
        let mut routes = RoutesBuilder::default();
        routes.add_service(crate::grpc::health(
            names.iter().map(|n| n.to_string()).collect(),
            self.backends.clone(),
            self.shutdown.clone(),
        ));
        routes.add_service(crate::grpc::reflection().map_err(|e| Error::Config {
            var: "STAMPEDE_GRPC_ADDR",
            reason: format!("reflection: {e}"),
        })?);
        Ok(routes)
    }

    /// The API token check for the gRPC API.
    pub fn auth(&self) -> crate::grpc::Auth {
        crate::grpc::Auth::new(self.cfg.api_token.clone())
    }
}

/// Serves gRPC `routes` on `listener` until `shutdown`.
pub async fn serve_grpc(
    routes: RoutesBuilder,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    tonic::transport::Server::builder()
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown.cancelled_owned())
        .await
        .map_err(|e| Error::Internal(format!("grpc server: {e}")))
}

/// Runs a queue-driven service as its own process: metrics, gRPC health
/// (`service` following readiness) and reflection around `work`, which runs
/// until the process's shutdown token is cancelled.
pub async fn serve_worker<E: From<Error>>(
    p: Process,
    l: Listeners,
    service: ServiceKind,
    work: impl Future<Output = std::result::Result<(), E>>,
) -> std::result::Result<(), E> {
    let metrics = p.spawn_metrics(l.metrics);
    let routes = p.grpc_routes(&[service.health_name()])?;
    let grpc = tokio::spawn(serve_grpc(routes, l.grpc, p.shutdown.clone()));
    tracing::info!(service = service.name(), "started");
    let result = work.await;
    p.shutdown.cancel();
    let _ = grpc.await;
    let _ = metrics.await;
    result
}

/// `main` of a service binary: logs, configuration from the environment
/// (a bad value exits with one line naming the variable), listeners, backends,
/// then `run` until SIGTERM.
pub fn run_main<F, Fut, E>(role: Role, run: F) -> ExitCode
where
    F: FnOnce(Process, Listeners) -> Fut,
    Fut: Future<Output = std::result::Result<(), E>>,
    E: Display,
{
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.runtime_threads_for(role))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async move {
        crate::telemetry::init_for(
            &format!("stampede-{}", role.name()),
            "info,tokio_postgres=warn",
        );
        let shutdown = crate::shutdown::on_signal();
        let listeners = match Listeners::bind(&cfg, role.serves_http()).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        let process = match Process::connect(cfg, role, shutdown).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        match run(process, listeners).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    });
    crate::telemetry::shutdown();
    code
}
