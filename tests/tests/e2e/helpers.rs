//! `spawn_app()`: every test gets its own backends (a
//! `stampede::scratch::Scratch`) and ports and cleans them up in `stop()`. On [`Backend::External`] the four services run as in
//! production, each with its own connections, on a PostgreSQL database, a
//! queue namespace and a Redis key prefix of the test's own; on
//! [`Backend::Embedded`] they run all in one as `stampede up` does, on the
//! embedded backends in a data directory of the test's own.
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stampede::scratch::{BackendSet, ExternalUrls, Purpose, Scratch};
use stampede_backends::queue::amqp::AmqpQueue;
use stampede_backends::queue::Queue;
use stampede_backends::store::{Follower, Store};
use stampede_proto::api::{
    actor_service_client::ActorServiceClient, admin_service_client::AdminServiceClient,
    publish_service_client::PublishServiceClient, CreateActorRequest, PublishRequest,
    PublishResponse,
};
use stampede_runtime::process::{Listeners, Process};
use stampede_runtime::Config;
use stampede_runtime::Role;
use stampede_sink::SinkActor;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

fn env(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

pub fn amqp_url() -> String {
    env(
        "STAMPEDE_TEST_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    )
}
pub fn redis_url() -> String {
    env("STAMPEDE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
}
pub fn admin_db_url() -> String {
    env(
        "STAMPEDE_TEST_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    )
}

/// Which backend set a test deployment runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// RabbitMQ, Redis, PostgreSQL; each service on its own.
    External,
    /// The embedded queue, cache and store; all services in one (`stampede up`).
    Embedded,
}

/// Runs an `async fn(Backend)` test once per backend set: for each name, a
/// module of that name holding the tests `external` and `embedded`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn external() {
                    super::$name($crate::helpers::Backend::External).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    super::$name($crate::helpers::Backend::Embedded).await
                }
            }
        )*
    };
}

/// Options of a test deployment.
pub struct AppOptions {
    pub allow_private_networks: bool,
    pub extra: Vec<(&'static str, String)>,
    /// External only: services not to start in the test process (a test
    /// runs them as child processes).
    pub skip: Vec<&'static str>,
    /// Changes the configuration after it is read from `extra`: for values
    /// the environment refuses (the demo's seconds where an operator is
    /// held to minutes).
    pub tune: Option<fn(&mut Config)>,
    /// External only: the Redis to run on instead of the shared one (a
    /// test's private server, `stampede_tests::private_backends`).
    pub redis_url: Option<String>,
    /// External only: the admin database of the PostgreSQL server to make
    /// the test's database on instead of the shared one.
    pub admin_database_url: Option<String>,
    /// External only: services started as child processes of the stampede
    /// binary rather than in the test process, their standard error kept
    /// ([`TestApp::logs`]), at `RUST_LOG=info` unless `extra` says.
    pub processes: Vec<&'static str>,
    /// External only: how many child processes of a service in
    /// `processes` to run (1 unless named here); the first ingest serves
    /// the public URL and the gRPC API, the others HTTP on ports of their
    /// own ([`TestApp::ingest_bases`]).
    pub copies: Vec<(&'static str, usize)>,
    /// External only: the broker to run on instead of the shared one, as
    /// `STAMPEDE_AMQP_URL` takes it (the nodes of a cluster,
    /// comma-separated); the namespace is the test's own.
    pub amqp_url: Option<String>,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            allow_private_networks: true,
            extra: Vec::new(),
            skip: Vec::new(),
            tune: None,
            redis_url: None,
            admin_database_url: None,
            processes: Vec::new(),
            copies: Vec::new(),
            amqp_url: None,
        }
    }
}

pub struct TestApp {
    pub namespace: String,
    pub http_base: String,
    pub grpc: Channel,
    /// ingest's gRPC address (`host:port`), as the CLI's `--server` takes it.
    pub grpc_addr: std::net::SocketAddr,
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn Queue>,
    /// The configuration the services run with, as environment variables.
    pub env: HashMap<&'static str, String>,
    /// The test's namespace and its database (external) or data directory
    /// (embedded).
    scratch: Scratch,
    shutdown: CancellationToken,
    services: Vec<(&'static str, JoinHandle<Result<(), String>>)>,
    /// The services run as child processes ([`AppOptions::processes`]).
    children: Vec<ChildService>,
    metrics: HashMap<&'static str, std::net::SocketAddr>,
    /// The admin console's base URL, when ingest runs in the test process.
    pub console: Option<String>,
}

/// A service run as a child process, its standard error in a file. Dropped,
/// it is killed; its log is removed unless the test is failing (panicking,
/// or [`TestApp::keep_logs`]), its path printed then.
struct ChildService {
    name: &'static str,
    child: tokio::process::Child,
    log: std::path::PathBuf,
    keep: bool,
    metrics: std::net::SocketAddr,
    http: Option<u16>,
}

impl Drop for ChildService {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if self.keep || std::thread::panicking() {
            eprintln!("{} log kept: {}", self.name, self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// `stampede serve {name}` as a child process with `vars`, its gRPC and
/// metrics (and for ingest, HTTP) on the given ports.
fn child_service(
    name: &'static str,
    copy: usize,
    vars: &HashMap<&'static str, String>,
    namespace: &str,
    grpc: u16,
    metrics: u16,
    http: Option<u16>,
) -> ChildService {
    let file_name = if copy == 0 {
        format!("stampede-test-{namespace}-{name}.log")
    } else {
        format!("stampede-test-{namespace}-{name}{copy}.log")
    };
    let log = std::env::temp_dir().join(file_name);
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_stampede-e2e"));
    cmd.args(["serve", name])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("STAMPEDE_ADMIN_ADDR", "off")
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .env("STAMPEDE_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("STAMPEDE_METRICS_ADDR", format!("127.0.0.1:{metrics}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .kill_on_drop(true);
    if let Some(http) = http {
        cmd.env("STAMPEDE_HTTP_ADDR", format!("127.0.0.1:{http}"));
    }
    ChildService {
        name,
        child: cmd.spawn().unwrap(),
        log,
        keep: false,
        metrics: std::net::SocketAddr::from(([127, 0, 0, 1], metrics)),
        http,
    }
}

/// A port free on 127.0.0.1 right now (for child processes to bind).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// Starts ingest, inbox, fanout and delivery on `backend`.
pub async fn spawn_app(backend: Backend, opts: AppOptions) -> TestApp {
    let scratch = scratch(backend, &opts).await;
    spawn_app_on(scratch, None, opts).await
}

/// A test's own backends on `backend` (the servers `opts` names), empty:
/// for a test that fills them before [`spawn_app_on`].
pub async fn scratch(backend: Backend, opts: &AppOptions) -> Scratch {
    let set = match backend {
        Backend::Embedded => BackendSet::Embedded,
        Backend::External => BackendSet::External(ExternalUrls {
            amqp: opts.amqp_url.clone().unwrap_or_else(amqp_url),
            redis: opts.redis_url.clone().unwrap_or_else(redis_url),
            admin_database: opts.admin_database_url.clone().unwrap_or_else(admin_db_url),
        }),
    };
    Scratch::create(Purpose::Test, set)
        .await
        .expect("PostgreSQL must run (scripts/test starts it)")
}

/// Starts ingest, inbox, fanout and delivery on `scratch` (made by
/// [`scratch`]), ingest's HTTP on `http` when given (a test that had to
/// know the public URL before).
pub async fn spawn_app_on(
    scratch: Scratch,
    http: Option<TcpListener>,
    opts: AppOptions,
) -> TestApp {
    if scratch.data_dir().is_some() {
        return spawn_all_in_one(scratch, http, opts).await;
    }
    let namespace = scratch.namespace().to_string();
    let db_url = scratch.database_url().unwrap().to_string();
    let ingest_child = opts.processes.contains(&"ingest");
    let (mut ingest_http, http_base) = if ingest_child {
        (None, format!("http://127.0.0.1:{}", free_port()))
    } else {
        let l = match http {
            Some(l) => l,
            None => listener().await,
        };
        let base = format!("http://{}", l.local_addr().unwrap());
        (Some(l), base)
    };
    let (vars, cfg) = config(&scratch, &http_base, &opts);
    let shutdown = CancellationToken::new();
    let mut services = Vec::new();
    let mut children = Vec::new();
    let mut ingest_grpc_addr = None;
    let mut console = None;
    let mut metrics = HashMap::new();
    for name in ["ingest", "inbox", "fanout", "delivery"] {
        if opts.skip.contains(&name) {
            continue;
        }
        if opts.processes.contains(&name) {
            let copies = opts
                .copies
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(1, |(_, k)| *k);
            for copy in 0..copies {
                let (grpc, metrics_port) = (free_port(), free_port());
                let http = (name == "ingest").then(|| {
                    if copy == 0 {
                        url::Url::parse(&http_base).unwrap().port().unwrap()
                    } else {
                        free_port()
                    }
                });
                if name == "ingest" && copy == 0 {
                    ingest_grpc_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], grpc)));
                }
                if copy == 0 {
                    metrics.insert(
                        name,
                        std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port)),
                    );
                }
                children.push(child_service(
                    name,
                    copy,
                    &vars,
                    &namespace,
                    grpc,
                    metrics_port,
                    http,
                ));
            }
            continue;
        }
        let grpc = listener().await;
        if name == "ingest" {
            ingest_grpc_addr = Some(grpc.local_addr().unwrap());
        }
        let l = Listeners {
            http: None,
            grpc,
            metrics: listener().await,
            admin: None,
        };
        metrics.insert(name, l.metrics.local_addr().unwrap());
        let role = Role::Service(stampede_runtime::ServiceKind::from_name(name).unwrap());
        let p = Process::connect(cfg.clone(), role, shutdown.child_token())
            .await
            .unwrap();
        let h: JoinHandle<Result<(), String>> =
            match name {
                "ingest" => {
                    let admin = listener().await;
                    console = Some(format!("http://{}", admin.local_addr().unwrap()));
                    let l = Listeners {
                        http: ingest_http.take(),
                        admin: Some(admin),
                        ..l
                    };
                    tokio::spawn(async move {
                        stampede_ingest::serve(p, l)
                            .await
                            .map_err(|e| e.to_string())
                    })
                }
                "inbox" => tokio::spawn(async move {
                    stampede_inbox::serve(p, l).await.map_err(|e| e.to_string())
                }),
                "fanout" => tokio::spawn(async move {
                    stampede_fanout::serve(p, l)
                        .await
                        .map_err(|e| e.to_string())
                }),
                _ => tokio::spawn(async move {
                    stampede_delivery::serve(p, l)
                        .await
                        .map_err(|e| e.to_string())
                }),
            };
        services.push((name, h));
    }
    let endpoint = Channel::from_shared(format!("http://{}", ingest_grpc_addr.unwrap())).unwrap();
    // A child process listens once it has connected to its backends.
    let started = Instant::now();
    let grpc = loop {
        match endpoint.connect().await {
            Ok(c) => break c,
            Err(_) if ingest_child && started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("ingest's gRPC: {e}"),
        }
    };
    for c in &children {
        let (name, addr) = (c.name, c.metrics);
        let url = format!("http://{addr}/healthz");
        wait_for(
            &format!("{name} to serve"),
            Duration::from_secs(30),
            || async { reqwest::get(&url).await.is_ok() },
        )
        .await;
    }
    let store = stampede_backends::store::postgres::PgStore::connect(&db_url, 4).unwrap();
    let queue = AmqpQueue::connect(
        &opts.amqp_url.clone().unwrap_or_else(amqp_url),
        &namespace,
        "stampede-test",
    )
    .await
    .unwrap();
    TestApp {
        namespace,
        http_base,
        grpc,
        grpc_addr: ingest_grpc_addr.unwrap(),
        store: Arc::new(store),
        queue: Arc::new(queue),
        scratch,
        env: vars,
        shutdown,
        services,
        children,
        metrics,
        console,
    }
}

/// A test's configuration, as variables and as read from them: its
/// backends, its public URL, the options' variables, then the options' tune.
fn config(
    scratch: &Scratch,
    http_base: &str,
    opts: &AppOptions,
) -> (HashMap<&'static str, String>, Config) {
    let mut vars = scratch.vars();
    vars.extend([
        ("STAMPEDE_PUBLIC_URL", http_base.to_string()),
        (
            "STAMPEDE_ALLOW_PRIVATE_NETWORKS",
            opts.allow_private_networks.to_string(),
        ),
        ("STAMPEDE_DELIVERY_TIMEOUT_SECS", "10".to_string()),
    ]);
    vars.extend(opts.extra.iter().cloned());
    let mut cfg = Config::from_lookup(|k| vars.get(k).cloned()).unwrap();
    if let Some(tune) = opts.tune {
        tune(&mut cfg);
    }
    (vars, cfg)
}

/// `stampede up` on the embedded backends, in the scratch's data directory.
async fn spawn_all_in_one(
    scratch: Scratch,
    http: Option<TcpListener>,
    opts: AppOptions,
) -> TestApp {
    let http = match http {
        Some(l) => l,
        None => listener().await,
    };
    let http_base = format!("http://{}", http.local_addr().unwrap());
    let (vars, cfg) = config(&scratch, &http_base, &opts);
    let shutdown = CancellationToken::new();
    let admin = listener().await;
    let console = Some(format!("http://{}", admin.local_addr().unwrap()));
    let l = Listeners {
        http: Some(http),
        grpc: listener().await,
        metrics: listener().await,
        admin: Some(admin),
    };
    let grpc_addr = l.grpc.local_addr().unwrap();
    let metrics_addr = l.metrics.local_addr().unwrap();
    let p = Process::connect(cfg, Role::AllInOne, shutdown.child_token())
        .await
        .unwrap();
    let (store, queue) = (p.backends.store.clone(), p.backends.queue.clone());
    let h: JoinHandle<Result<(), String>> =
        tokio::spawn(async move { stampede::up::run(p, l).await.map_err(|e| e.to_string()) });
    let grpc = Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    TestApp {
        namespace: scratch.namespace().to_string(),
        http_base,
        grpc,
        grpc_addr,
        store,
        queue,
        scratch,
        env: vars,
        shutdown,
        services: vec![("up", h)],
        children: Vec::new(),
        metrics: ["ingest", "inbox", "fanout", "delivery"]
            .into_iter()
            .map(|n| (n, metrics_addr))
            .collect(),
        console,
    }
}

impl TestApp {
    pub fn actors(&self) -> ActorServiceClient<Channel> {
        ActorServiceClient::new(self.grpc.clone())
    }
    pub fn publisher(&self) -> PublishServiceClient<Channel> {
        PublishServiceClient::new(self.grpc.clone())
    }
    pub fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.grpc.clone())
    }

    /// The value of a counter on `service`'s `/metrics` (0 when absent),
    /// e.g. `metric("inbox", "stampede_inbound_activities_total", "stage=\"verify\",result=\"accepted\"")`.
    pub async fn metric(&self, service: &str, name: &str, labels: &str) -> u64 {
        let text = reqwest::get(format!("http://{}/metrics", self.metrics[service]))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let want = if labels.is_empty() {
            name.to_string()
        } else {
            format!("{name}{{{labels}}}")
        };
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&want)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
    }

    /// The whole `/metrics` text of `service`.
    pub async fn metrics_text(&self, service: &str) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics[service]))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// What `service`, run as a child process, logged so far.
    pub fn logs(&self, service: &str) -> String {
        self.children
            .iter()
            .find(|c| c.name == service)
            .map(|c| std::fs::read_to_string(&c.log).unwrap_or_default())
            .unwrap_or_else(|| panic!("{service} is not a child process"))
    }

    /// The services run as child processes, in the order started: each
    /// one's name and copy number (0 for the first of its service).
    pub fn children(&self) -> Vec<(&'static str, usize)> {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        self.children
            .iter()
            .map(|c| {
                let k = seen.entry(c.name).or_insert(0);
                *k += 1;
                (c.name, *k - 1)
            })
            .collect()
    }

    fn child(&self, service: &str, copy: usize) -> &ChildService {
        self.children
            .iter()
            .filter(|c| c.name == service)
            .nth(copy)
            .unwrap_or_else(|| panic!("no copy {copy} of {service} as a child process"))
    }

    /// What copy `copy` of `service`, run as child processes, logged so far.
    pub fn logs_of(&self, service: &str, copy: usize) -> String {
        std::fs::read_to_string(&self.child(service, copy).log).unwrap_or_default()
    }

    /// The status `/readyz` of copy `copy` of `service` answers (0 when it
    /// does not answer).
    pub async fn readyz_of(&self, service: &str, copy: usize) -> u16 {
        let addr = self.child(service, copy).metrics;
        reqwest::get(format!("http://{addr}/readyz"))
            .await
            .map_or(0, |r| r.status().as_u16())
    }

    /// The base URL of each ingest process's HTTP (the first is
    /// `http_base`, the public one).
    pub fn ingest_bases(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .children
            .iter()
            .filter_map(|c| c.http.map(|p| format!("http://127.0.0.1:{p}")))
            .collect();
        if v.is_empty() {
            v.push(self.http_base.clone());
        }
        v
    }

    /// Kills copy `copy` of `service` with SIGKILL (a crash) and waits for
    /// it to exit; its log stays readable.
    pub async fn kill_child(&mut self, service: &str, copy: usize) {
        let c = self
            .children
            .iter_mut()
            .filter(|c| c.name == service)
            .nth(copy)
            .unwrap_or_else(|| panic!("no copy {copy} of {service} as a child process"));
        c.child.start_kill().unwrap();
        c.child.wait().await.unwrap();
    }

    /// Keeps the logs of the services run as child processes (the test is
    /// about to fail): their paths are printed when they stop.
    pub fn keep_logs(&mut self) {
        for c in &mut self.children {
            c.keep = true;
        }
    }

    /// Whether each service run as a child process is still running (its
    /// name and exit status when one is not).
    pub fn exited(&mut self) -> Vec<(&'static str, std::process::ExitStatus)> {
        self.children
            .iter_mut()
            .filter_map(|c| c.child.try_wait().ok().flatten().map(|s| (c.name, s)))
            .collect()
    }

    /// The status and body `/readyz` of `service` answers (0 and the error
    /// when it does not answer).
    pub async fn readyz_text(&self, service: &str) -> (u16, String) {
        match reqwest::get(format!("http://{}/readyz", self.metrics[service])).await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// The status `/readyz` of `service` answers.
    pub async fn readyz(&self, service: &str) -> u16 {
        reqwest::get(format!("http://{}/readyz", self.metrics[service]))
            .await
            .map_or(0, |r| r.status().as_u16())
    }

    /// Messages waiting in the application's queue.
    pub async fn app_queue_depth(&self) -> u64 {
        self.queue
            .depths()
            .await
            .unwrap()
            .into_iter()
            .find(|d| d.queue.ends_with(".app"))
            .map_or(0, |d| d.messages)
    }

    /// Creates a local actor and returns its store id.
    pub async fn create_actor(&self, name: &str) -> i64 {
        self.actors()
            .create_actor(CreateActorRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        self.store.actor_by_name(name).await.unwrap().unwrap().id
    }

    pub async fn publish(
        &self,
        actor: &str,
        json: &serde_json::Value,
        key: &str,
    ) -> Result<PublishResponse, tonic::Status> {
        self.publisher()
            .publish(PublishRequest {
                actor: actor.into(),
                activity_json: json.to_string(),
                idempotency_key: key.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Seeds followers through the store (the inbound issue adds real Follows).
    pub async fn seed_followers(&self, actor_id: i64, followers: &[SinkActor]) {
        use futures::StreamExt;
        futures::stream::iter(followers)
            .for_each_concurrent(16, |f| async move {
                self.store
                    .add_follower(
                        actor_id,
                        &Follower {
                            actor: f.id.clone(),
                            inbox: f.inbox.clone(),
                            shared_inbox: f.shared_inbox.clone(),
                            host: f.host.clone(),
                            follow_id: None,
                        },
                    )
                    .await
                    .unwrap();
            })
            .await;
    }

    /// Stops the services and removes the database, queues and keys, or the
    /// data directory.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for c in &mut self.children {
            // One killed by the test has exited already.
            let _ = c.child.start_kill();
            c.child.wait().await.unwrap();
        }
        for (name, h) in self.services {
            match tokio::time::timeout(Duration::from_secs(30), h).await {
                Ok(Ok(Ok(()))) => {}
                other => panic!("{name} did not stop cleanly: {other:?}"),
            }
        }
        drop(self.store);
        drop(self.queue);
        // The scratch deletes the queues of one shard per delivery class:
        // the others go here.
        let shards: u16 = self
            .env
            .get("STAMPEDE_DELIVERY_SHARDS")
            .map_or(1, |k| k.parse().unwrap());
        if shards > 1 {
            let q = AmqpQueue::connect_with(
                &self.env["STAMPEDE_AMQP_URL"],
                &self.namespace,
                "stampede-test-cleanup",
                stampede_backends::queue::amqp::AmqpOptions {
                    delivery_shards: shards,
                },
            )
            .await
            .unwrap();
            q.delete_all().await.unwrap();
        }
        // On a cluster just restarted, quorum queues may refuse to go for
        // a moment (INTERNAL_ERROR while their leaders are elected).
        if let Some(urls) = self
            .scratch
            .external()
            .map(|u| u.amqp.clone())
            .filter(|u| u.contains(','))
        {
            let ns = self.namespace.clone();
            let started = Instant::now();
            loop {
                let r = async {
                    AmqpQueue::connect(&urls, &ns, "stampede-test-cleanup")
                        .await?
                        .delete_all()
                        .await
                }
                .await;
                match r {
                    Ok(()) => break,
                    Err(e) if started.elapsed() < Duration::from_secs(60) => {
                        eprintln!("deleting the queues of {ns}: {e}; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => panic!("deleting the queues of {ns}: {e}"),
                }
            }
        }
        self.scratch.remove().await.unwrap();
    }
}

/// Polls `cond` until it holds or `limit` passes.
/// The standard output of a finished child that had to succeed; when it did
/// not, the assertion shows both of its outputs.
pub fn succeeded(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP proxy the test controls, between the services and a backend: it
/// can cut every connection and refuse new ones for a while.
pub struct Proxy {
    pub port: u16,
    cut: std::sync::Mutex<CancellationToken>,
    blocked: Arc<std::sync::atomic::AtomicBool>,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(upstream: std::net::SocketAddr) -> Arc<Self> {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = Arc::new(Self {
            port: l.local_addr().unwrap().port(),
            cut: std::sync::Mutex::new(CancellationToken::new()),
            blocked: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            stop: CancellationToken::new(),
        });
        let me = p.clone();
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    _ = me.stop.cancelled() => return,
                    a = l.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                if me.blocked.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let cut = me.cut.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        p
    }

    /// Drops every open connection and refuses new ones until [`Proxy::unblock`].
    pub fn cut_and_block(&self) {
        self.blocked
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut c = self.cut.lock().unwrap();
        c.cancel();
        *c = CancellationToken::new();
    }

    pub fn unblock(&self) {
        self.blocked
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut.lock().unwrap().cancel();
    }
}
