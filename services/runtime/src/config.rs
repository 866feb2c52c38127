//! Configuration from the environment (README, "Configuration"), read in one place and
//! validated at start: a bad value stops start-up with one line naming the
//! variable. Reads go through a lookup function so tests never touch the
//! process environment.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use stampede_backends::store::postgres::StatementMode;
use stampede_core::targets::normalize_domain;
use url::Url;

use crate::{Error, Result};

/// Retry delays after each failed delivery attempt, in seconds: the first
/// within a minute for passing blips, then growing to six hours, about 47
/// hours in all before the delivery is dead-lettered.
pub const DEFAULT_RETRY_SCHEDULE_SECS: &[u64] = &[
    30, 300, 1800, 3600, 10800, 21600, 21600, 21600, 21600, 21600, 21600, 21600,
];

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value; only for comparing or sending, never for logging.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How outbound requests (deliveries, key and actor fetches) are signed:
/// `STAMPEDE_SIGNATURE_STYLE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureStyle {
    /// draft-cavage only, never another.
    Cavage,
    /// RFC 9421 only, never another.
    Rfc9421,
    /// The style remembered for the host, else draft-cavage; on a 400 or
    /// 401 the other style is tried once at once, and the one that worked
    /// is remembered.
    Auto,
}

/// The whole configuration of a stampede process.
#[derive(Debug, Clone)]
pub struct Config {
    /// `STAMPEDE_PUBLIC_URL`: base of local actor ids (`{base}/users/{name}`). No trailing slash.
    pub public_url: Url,
    /// `STAMPEDE_HTTP_ADDR`: ingest's HTTP listener.
    pub http_addr: SocketAddr,
    /// `STAMPEDE_GRPC_ADDR`: the gRPC listener.
    pub grpc_addr: SocketAddr,
    /// `STAMPEDE_METRICS_ADDR`: `/metrics`, `/healthz`, `/readyz`.
    pub metrics_addr: SocketAddr,
    /// `STAMPEDE_ADMIN_ADDR` (added, default `127.0.0.1:8081`, `off` for
    /// none): ingest's admin console, on a listener of its own so that it
    /// is never exposed with the public one.
    pub admin_addr: Option<SocketAddr>,
    /// Whether `STAMPEDE_ADMIN_ADDR` was given: a console asked for must
    /// start; the default's port being taken (a second stampede on one
    /// machine) only turns the console off, with a warning.
    pub admin_addr_given: bool,
    /// `STAMPEDE_AMQP_URL`: RabbitMQ, one URL or the nodes of a cluster
    /// comma-separated (a process connects to the first that answers and
    /// moves on to the next when its node goes); unset means the embedded
    /// queue.
    pub amqp_url: Option<Secret>,
    /// `STAMPEDE_DATABASE_POOL_SIZE` (added, default 16): the most
    /// PostgreSQL connections one process opens. Every replica of every
    /// service together must stay under the server's `max_connections`
    /// (or PgBouncer's pool).
    pub database_pool_size: usize,
    /// `STAMPEDE_DATABASE_STATEMENTS` (added, default `prepared`): how
    /// statements are sent to PostgreSQL. `prepared` prepares each once per
    /// connection (fastest); `unnamed` sends each as the unnamed statement
    /// in one round trip, for PgBouncer in transaction mode before 1.21
    /// (which does not carry prepared statements between its server
    /// connections).
    pub database_statements: StatementMode,
    /// `STAMPEDE_REDIS_POOL_SIZE` (added, default 1): multiplexed Redis
    /// connections per process (requests are pipelined on each; more help
    /// only a process that saturates one).
    pub redis_pool_size: usize,
    /// `STAMPEDE_DELIVERY_SHARDS` (added, default 1): quorum queues per
    /// delivery class, jobs spread over them by inbox host, so that on a
    /// broker cluster the classes' Raft leaders spread over the nodes.
    pub delivery_shards: u16,
    /// `STAMPEDE_REDIS_URL`: Redis; unset means the in-memory cache.
    pub redis_url: Option<Secret>,
    /// `STAMPEDE_DATABASE_URL`: PostgreSQL; unset means the embedded store.
    pub database_url: Option<Secret>,
    /// `STAMPEDE_DATA_DIR`: where embedded backends keep their files.
    pub data_dir: PathBuf,
    /// `STAMPEDE_API_TOKEN`: bearer token for the gRPC API; unset means the
    /// API answers loopback peers only.
    pub api_token: Option<Secret>,
    /// `STAMPEDE_ALLOW_PRIVATE_NETWORKS`: allow `http://` and loopback/private
    /// addresses for fetches and deliveries (tests, demos). Off in production:
    /// it is what stops a remote actor document from pointing us at internal services.
    pub allow_private_networks: bool,
    /// `STAMPEDE_NAMESPACE` (added): prefix of queue names and Redis keys, so
    /// several deployments (or tests) share one broker and one Redis.
    pub namespace: String,
    /// `STAMPEDE_PREFETCH` (added): unacknowledged messages per consumer;
    /// bounds a worker's concurrency.
    pub prefetch: u16,
    /// `STAMPEDE_DELIVERY_TIMEOUT_SECS` (added): total time limit of one
    /// outbound POST.
    pub delivery_timeout: Duration,
    /// `STAMPEDE_MAX_ACTIVITY_BYTES` (added): largest activity accepted by
    /// `Publish` or an inbox.
    pub max_activity_bytes: usize,
    /// `STAMPEDE_RETRY_SCHEDULE_SECS` (added): delays before each retry of a
    /// failed delivery, comma-separated seconds; after the last one the
    /// delivery is dead-lettered. Default [`DEFAULT_RETRY_SCHEDULE_SECS`].
    pub retry_schedule: Vec<u64>,
    /// `STAMPEDE_BLOCKED_DOMAINS` (added): comma-separated domains, each
    /// seeded once as a `suspend` domain policy (subdomains included); the
    /// policies then live in the store (`stampede domain`).
    pub blocked_domains: Vec<String>,
    /// `STAMPEDE_FEDERATION_MODE` (added, default `blocklist`): with
    /// `allowlist`, only domains with an `allow` (or `silence`) policy
    /// federate, both ways.
    pub allowlist: bool,
    /// `STAMPEDE_SIGNATURE_STYLE` (added, default `auto`): how outbound
    /// requests are signed (README, "Outbound contract").
    pub signature_style: SignatureStyle,
    /// `STAMPEDE_INBOUND_MAX_AGE_SECS` (added, default 3600): how old an
    /// inbound request's `Date` may be.
    pub inbound_max_age_secs: i64,
    /// `STAMPEDE_INBOUND_MAX_FUTURE_SECS` (added, default 300): how far in
    /// the future an inbound `Date` may be (clock skew).
    pub inbound_max_future_secs: i64,
    /// `STAMPEDE_INBOUND_RATE_LIMIT` (added, default 6000): inbound requests
    /// per remote host per minute; 0 turns the limit off.
    pub inbound_rate_limit: u64,
    /// `STAMPEDE_HOST_CONCURRENCY` (added, default 8): the most deliveries
    /// in flight to one remote host from all delivery workers together (slots
    /// leased in the cache); each host's adaptive limit moves between 1 and
    /// this.
    pub host_concurrency: usize,
    /// `STAMPEDE_HOST_FAST_MS` (added, default 1000): a successful delivery
    /// answered within this is fast (grows the host's limit); a host whose
    /// answers take longer on average is slow, and its jobs share half of a
    /// worker's prefetch.
    pub host_fast: Duration,
    /// `STAMPEDE_CIRCUIT_FAILURES` (added, default 10): consecutive failed
    /// deliveries (5xx, timeouts, connection errors) that open a host's circuit.
    pub circuit_failures: u64,
    /// `STAMPEDE_CIRCUIT_OPEN_SECS` (added, default 60): how long a circuit
    /// first stays open; it doubles each time a probe fails (up to 64x).
    pub circuit_open: Duration,
    /// `STAMPEDE_HOST_RAMP_SECS` (added, default 120): after a host recovers,
    /// its concurrency grows from 1 to `STAMPEDE_HOST_CONCURRENCY` over this long.
    pub host_ramp: Duration,
    /// `STAMPEDE_HOST_UNAVAILABLE_SECS` (added, default 172800, two days): a
    /// host failing this long is unavailable: fanout makes no delivery for
    /// it, and deliveries already queued are dead-lettered, until a probe
    /// finds it back (or a request verified as its own marks it up for
    /// fanout; deliveries then probe it first).
    pub host_unavailable_after: Duration,
    /// `STAMPEDE_UNAVAILABLE_PROBE_SECS` (added, default 300): how often
    /// the unavailable hosts are probed (their NodeInfo), one delivery
    /// process at a time.
    pub unavailable_probe_every: Duration,
    /// `STAMPEDE_UP_SERVICES` (added, default all four): which services
    /// `stampede up` runs, comma-separated (`ingest` alone: just the edge).
    pub up_services: Vec<crate::ServiceKind>,
    /// `STAMPEDE_RUNTIME_THREADS` (added, default 0: chosen per service): the
    /// async runtime's worker threads. See [`Config::runtime_threads_for`].
    pub runtime_threads: usize,
    /// `STAMPEDE_PUBLIC_HOST_ALIASES` (added): other `host[:port]`s a signed
    /// request may be addressed to (its signed `host` / `@authority`) besides
    /// the public URL's; lower-cased.
    pub public_host_aliases: Vec<String>,
    /// `STAMPEDE_TRUSTED_PROXIES` (added): CIDRs of proxies (a Kubernetes
    /// ingress) whose `X-Forwarded-For` names the real client; from anyone
    /// else the header is ignored.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `STAMPEDE_KEY_REFETCH_SECS` (added, default 300): a cached key that
    /// fails to verify is fetched again (the remote may have rotated it) at
    /// most once in this long, so forged requests cannot make us hammer the
    /// key's server.
    pub key_refetch: Duration,
    /// `STAMPEDE_KEY_FETCH_RATE_LIMIT` (added, default 600): key and actor
    /// fetches triggered by inbound requests per remote host per minute; 0
    /// turns the limit off. Beyond it a fetch waits for the next minute.
    pub key_fetch_rate_limit: u64,
    /// `STAMPEDE_HTTP_HEADER_TIMEOUT_SECS` (added, default 10): the edge closes
    /// a connection that has not sent a whole request head in this long.
    pub http_header_timeout: Duration,
    /// `STAMPEDE_HTTP_BODY_TIMEOUT_SECS` (added, default 20): the edge answers
    /// 408 and closes when a request body takes longer than this to arrive.
    pub http_body_timeout: Duration,
    /// `STAMPEDE_HTTP_IDLE_TIMEOUT_SECS` (added, default 60): the edge closes a
    /// keep-alive connection idle between requests this long.
    pub http_idle_timeout: Duration,
    /// `STAMPEDE_HTTP_MAX_CONNECTIONS` (added, default 10000): connections
    /// the edge holds open at once; more wait in the kernel's backlog.
    pub http_max_connections: usize,
    /// `STAMPEDE_HTTP_MAX_CONNECTIONS_PER_CLIENT` (added, default 256):
    /// connections one client address (an IPv6 /64) may hold open at the
    /// edge; trusted proxies are exempt.
    pub http_max_connections_per_client: usize,
    /// `STAMPEDE_INTERACTIVE_MAX_RECIPIENTS` (added, default 5): an activity
    /// to at most this many explicit remote recipients and not to the
    /// author's followers (a DM, a mention) is delivered in the
    /// `interactive` class, as are Accept, Reject, Follow and Undo; 0 leaves
    /// only those four types interactive.
    pub interactive_max_recipients: usize,
    /// `STAMPEDE_BULK_AUDIENCE` (added, default 1000): an activity to the
    /// author's followers when they are more than this many is delivered in
    /// the `bulk` class (a large fanout must not hold up everyone else's
    /// posts), and its fanout is held to `STAMPEDE_BULK_QUEUE_BOUND`.
    pub bulk_audience: u64,
    /// `STAMPEDE_CLASS_WEIGHTS` (added, default `6,3,1`): the shares of a
    /// delivery worker's concurrency (`STAMPEDE_PREFETCH`) that the
    /// interactive, normal and bulk classes get while all three have work;
    /// an idle class's share goes to the others, so none starves and none
    /// waits for nothing.
    pub class_weights: [u32; 3],
    /// `STAMPEDE_BULK_QUEUE_BOUND` (added, default 50000): a bulk fanout
    /// queues its next page of followers only while the bulk delivery queue
    /// holds fewer ready jobs than this; above it, the fanout is put back in
    /// the fanout queue for a few seconds with its place, so the broker's
    /// depth (and the memory it takes) stays bounded however many followers
    /// an actor has. 0: no bound.
    pub bulk_queue_bound: u64,
    /// `STAMPEDE_AUTHORIZED_FETCH` (added, default false): GETs of actor
    /// documents (but the instance actor's) and of the followers,
    /// following, outbox and followers-synchronization collections need a
    /// valid HTTP signature (401 otherwise; 403 from a suspended domain),
    /// and the documents are served `Cache-Control: private`.
    pub authorized_fetch: bool,
    /// `STAMPEDE_FOLLOWERS_SYNC_MAX` (added, default 25000; 0: never):
    /// followers-only activities of actors with fewer followers than this
    /// carry a FEP-8fcf `Collection-Synchronization` header per receiving
    /// authority.
    pub followers_sync_max: u64,
    /// `STAMPEDE_DELIVERY_RECORD_RETENTION` (added, default `7d`; `0` or
    /// `off`: kept forever): how long a delivery's success record is kept.
    /// `None` when off. See [`Config::job_expiry`] for what keeps the rule
    /// "nothing that guards a pending redelivery is pruned".
    pub delivery_record_retention: Option<Duration>,
    /// `STAMPEDE_DEAD_LETTER_RETENTION` (added, default `30d`; `0` or `off`:
    /// kept forever): a dead letter replayed this long ago, or whose last
    /// attempt is this old, is deleted. `None` when off.
    pub dead_letter_retention: Option<Duration>,
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the configuration through `lookup` (the environment in
    /// production, a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        let public_url = {
            let var = "STAMPEDE_PUBLIC_URL";
            let raw = get(var).unwrap_or_else(|| "http://127.0.0.1:8080".into());
            let u = Url::parse(raw.trim_end_matches('/')).map_err(|e| cfg(var, e))?;
            if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                return Err(cfg(var, "must be an http(s) URL with a host"));
            }
            if u.query().is_some() || u.fragment().is_some() {
                return Err(cfg(var, "must not have a query or fragment"));
            }
            u
        };
        let addr = |var: &'static str, default: &str| -> Result<SocketAddr> {
            get(var)
                .unwrap_or_else(|| default.into())
                .parse()
                .map_err(|e| cfg(var, format!("{e} (expected host:port, e.g. {default})")))
        };
        let url = |var: &'static str, schemes: &[&str]| -> Result<Option<Secret>> {
            let Some(raw) = get(var) else { return Ok(None) };
            // `STAMPEDE_AMQP_URL` may list the nodes of a cluster, comma-separated.
            let many = var == "STAMPEDE_AMQP_URL";
            let parts: Vec<&str> = if many {
                raw.split(',').map(str::trim).collect()
            } else {
                vec![raw.as_str()]
            };
            for part in &parts {
                let u = Url::parse(part).map_err(|e| cfg(var, e))?;
                if !schemes.contains(&u.scheme()) {
                    return Err(cfg(
                        var,
                        format!("scheme must be one of {}", schemes.join(", ")),
                    ));
                }
            }
            Ok(Some(Secret(parts.join(","))))
        };
        let boolean = |var: &'static str| -> Result<bool> {
            match get(var).as_deref().map(str::to_ascii_lowercase).as_deref() {
                None | Some("false" | "0" | "no" | "off") => Ok(false),
                Some("true" | "1" | "yes" | "on") => Ok(true),
                Some(_) => Err(cfg(var, "must be true or false")),
            }
        };
        let number = |var: &'static str, default: u64, min: u64, max: u64| -> Result<u64> {
            let Some(raw) = get(var) else {
                return Ok(default);
            };
            let n: u64 = raw.trim().parse().map_err(|e| cfg(var, e))?;
            if n < min || n > max {
                return Err(cfg(var, format!("must be between {min} and {max}")));
            }
            Ok(n)
        };
        let namespace = get("STAMPEDE_NAMESPACE").unwrap_or_else(|| "stampede".into());
        if namespace.is_empty()
            || namespace.len() > 64
            || !namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(cfg(
                "STAMPEDE_NAMESPACE",
                "must be 1 to 64 of [A-Za-z0-9_-]",
            ));
        }
        let list = |var: &str| -> Vec<String> {
            get(var)
                .map(|v| {
                    v.split(',')
                        .map(|d| d.trim().to_string())
                        .filter(|d| !d.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        let secs = |var: &'static str, default: u64, min: u64, max: u64| -> Result<Duration> {
            number(var, default, min, max).map(Duration::from_secs)
        };
        let admin_addr = match get("STAMPEDE_ADMIN_ADDR").as_deref().map(str::trim) {
            Some("off") => None,
            _ => Some(addr("STAMPEDE_ADMIN_ADDR", "127.0.0.1:8081")?),
        };
        if admin_addr.is_some() && admin_addr == Some(addr("STAMPEDE_HTTP_ADDR", "127.0.0.1:8080")?)
        {
            return Err(cfg(
                "STAMPEDE_ADMIN_ADDR",
                "must differ from STAMPEDE_HTTP_ADDR: the console is never served on the public listener",
            ));
        }
        Config {
            public_url,
            http_addr: addr("STAMPEDE_HTTP_ADDR", "127.0.0.1:8080")?,
            grpc_addr: addr("STAMPEDE_GRPC_ADDR", "127.0.0.1:50051")?,
            metrics_addr: addr("STAMPEDE_METRICS_ADDR", "127.0.0.1:9464")?,
            admin_addr,
            admin_addr_given: get("STAMPEDE_ADMIN_ADDR").is_some(),
            amqp_url: url("STAMPEDE_AMQP_URL", &["amqp", "amqps"])?,
            redis_url: url(
                "STAMPEDE_REDIS_URL",
                &["redis", "rediss", "redis+unix", "unix"],
            )?,
            database_url: url("STAMPEDE_DATABASE_URL", &["postgres", "postgresql"])?,
            data_dir: get("STAMPEDE_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("./data")),
            api_token: match get("STAMPEDE_API_TOKEN") {
                Some(t) if t.len() < 16 => {
                    return Err(cfg("STAMPEDE_API_TOKEN", "must be at least 16 characters"))
                }
                t => t.map(Secret),
            },
            allow_private_networks: boolean("STAMPEDE_ALLOW_PRIVATE_NETWORKS")?,
            namespace,
            prefetch: number("STAMPEDE_PREFETCH", 128, 1, 10_000)? as u16,
            delivery_timeout: Duration::from_secs(number(
                "STAMPEDE_DELIVERY_TIMEOUT_SECS",
                30,
                1,
                600,
            )?),
            max_activity_bytes: number("STAMPEDE_MAX_ACTIVITY_BYTES", 1 << 20, 1024, 64 << 20)?
                as usize,
            retry_schedule: match get("STAMPEDE_RETRY_SCHEDULE_SECS") {
                None => DEFAULT_RETRY_SCHEDULE_SECS.to_vec(),
                Some(raw) => {
                    let var = "STAMPEDE_RETRY_SCHEDULE_SECS";
                    let v: Vec<u64> = raw
                        .split(',')
                        .map(|x| x.trim().parse::<u64>())
                        .collect::<std::result::Result<_, _>>()
                        .map_err(|e| cfg(var, e))?;
                    if v.is_empty() || v.len() > 50 || v.iter().any(|s| *s == 0 || *s > 7 * 86400) {
                        return Err(cfg(var, "1 to 50 delays, each 1 to 604800 seconds"));
                    }
                    v
                }
            },
            blocked_domains: list("STAMPEDE_BLOCKED_DOMAINS")
                .iter()
                .map(|d| normalize_domain(d.trim_start_matches('.')))
                .filter(|d| !d.is_empty())
                .collect(),
            allowlist: match get("STAMPEDE_FEDERATION_MODE").as_deref() {
                None | Some("blocklist") => false,
                Some("allowlist") => true,
                Some(other) => {
                    return Err(cfg(
                        "STAMPEDE_FEDERATION_MODE",
                        format!("`{other}`: expected `blocklist` or `allowlist`"),
                    ))
                }
            },
            signature_style: match get("STAMPEDE_SIGNATURE_STYLE").as_deref().map(str::trim) {
                None | Some("auto") => SignatureStyle::Auto,
                Some("cavage") => SignatureStyle::Cavage,
                Some("rfc9421") => SignatureStyle::Rfc9421,
                Some(other) => {
                    return Err(cfg(
                        "STAMPEDE_SIGNATURE_STYLE",
                        format!("`{other}`: expected `cavage`, `rfc9421` or `auto`"),
                    ))
                }
            },
            public_host_aliases: list("STAMPEDE_PUBLIC_HOST_ALIASES")
                .iter()
                .map(|a| {
                    // The host as a Host header carries it (IDNA, lower case).
                    let (host, port) = split_authority(a);
                    let host = normalize_domain(host);
                    match port {
                        Some(p) => format!("{host}:{p}"),
                        None => host,
                    }
                })
                .collect(),
            trusted_proxies: list("STAMPEDE_TRUSTED_PROXIES")
                .iter()
                .map(|c| {
                    c.parse::<ipnet::IpNet>()
                        .or_else(|_| c.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        .map_err(|e| {
                            cfg(
                                "STAMPEDE_TRUSTED_PROXIES",
                                format!("{c}: {e} (expected CIDRs such as 10.0.0.0/8)"),
                            )
                        })
                })
                .collect::<Result<_>>()?,
            key_refetch: secs("STAMPEDE_KEY_REFETCH_SECS", 300, 1, 86400)?,
            key_fetch_rate_limit: number("STAMPEDE_KEY_FETCH_RATE_LIMIT", 600, 0, 10_000_000)?,
            http_header_timeout: secs("STAMPEDE_HTTP_HEADER_TIMEOUT_SECS", 10, 1, 3600)?,
            http_body_timeout: secs("STAMPEDE_HTTP_BODY_TIMEOUT_SECS", 20, 1, 3600)?,
            http_idle_timeout: secs("STAMPEDE_HTTP_IDLE_TIMEOUT_SECS", 60, 1, 86400)?,
            http_max_connections: number("STAMPEDE_HTTP_MAX_CONNECTIONS", 10_000, 1, 1_000_000)?
                as usize,
            http_max_connections_per_client: number(
                "STAMPEDE_HTTP_MAX_CONNECTIONS_PER_CLIENT",
                256,
                1,
                1_000_000,
            )? as usize,
            interactive_max_recipients: number("STAMPEDE_INTERACTIVE_MAX_RECIPIENTS", 5, 0, 10_000)?
                as usize,
            bulk_audience: number("STAMPEDE_BULK_AUDIENCE", 1000, 1, 1_000_000_000)?,
            class_weights: match get("STAMPEDE_CLASS_WEIGHTS") {
                None => [6, 3, 1],
                Some(raw) => {
                    let var = "STAMPEDE_CLASS_WEIGHTS";
                    let v: Vec<u32> = raw
                        .split(',')
                        .map(|x| x.trim().parse::<u32>())
                        .collect::<std::result::Result<_, _>>()
                        .map_err(|e| cfg(var, format!("{e} (expected e.g. 6,3,1)")))?;
                    match v.as_slice() {
                        [i, n, b] if [i, n, b].iter().all(|w| (1..=1000).contains(*w)) => {
                            [*i, *n, *b]
                        }
                        _ => {
                            return Err(cfg(
                                var,
                                "three weights, interactive,normal,bulk, each 1 to 1000",
                            ))
                        }
                    }
                }
            },
            bulk_queue_bound: number("STAMPEDE_BULK_QUEUE_BOUND", 50_000, 0, 1_000_000_000)?,
            authorized_fetch: boolean("STAMPEDE_AUTHORIZED_FETCH")?,
            followers_sync_max: number("STAMPEDE_FOLLOWERS_SYNC_MAX", 25_000, 0, 1_000_000_000)?,
            inbound_max_age_secs: number("STAMPEDE_INBOUND_MAX_AGE_SECS", 3600, 60, 7 * 86400)?
                as i64,
            inbound_max_future_secs: number("STAMPEDE_INBOUND_MAX_FUTURE_SECS", 300, 0, 86400)?
                as i64,
            inbound_rate_limit: number("STAMPEDE_INBOUND_RATE_LIMIT", 6000, 0, 10_000_000)?,
            runtime_threads: number("STAMPEDE_RUNTIME_THREADS", 0, 0, 1024)? as usize,
            up_services: match get("STAMPEDE_UP_SERVICES") {
                None => crate::ServiceKind::ALL.to_vec(),
                Some(raw) => {
                    let v: Option<Vec<crate::ServiceKind>> = raw
                        .split(',')
                        .filter(|s| !s.trim().is_empty())
                        .map(crate::ServiceKind::from_name)
                        .collect();
                    match v {
                        Some(v) if !v.is_empty() => v,
                        _ => {
                            return Err(cfg(
                                "STAMPEDE_UP_SERVICES",
                                "a comma-separated list of ingest, inbox, fanout, delivery",
                            ))
                        }
                    }
                }
            },
            host_concurrency: number("STAMPEDE_HOST_CONCURRENCY", 8, 1, 1000)? as usize,
            database_pool_size: number("STAMPEDE_DATABASE_POOL_SIZE", 16, 1, 1000)? as usize,
            database_statements: match get("STAMPEDE_DATABASE_STATEMENTS") {
                None => StatementMode::default(),
                Some(raw) => raw
                    .parse()
                    .map_err(|e| cfg("STAMPEDE_DATABASE_STATEMENTS", e))?,
            },
            redis_pool_size: number("STAMPEDE_REDIS_POOL_SIZE", 1, 1, 64)? as usize,
            delivery_shards: number("STAMPEDE_DELIVERY_SHARDS", 1, 1, 64)? as u16,
            host_fast: Duration::from_millis(number("STAMPEDE_HOST_FAST_MS", 1000, 1, 600_000)?),
            circuit_failures: number("STAMPEDE_CIRCUIT_FAILURES", 10, 1, 1_000_000)?,
            circuit_open: Duration::from_secs(number("STAMPEDE_CIRCUIT_OPEN_SECS", 60, 1, 86400)?),
            host_ramp: Duration::from_secs(number("STAMPEDE_HOST_RAMP_SECS", 120, 0, 86400)?),
            host_unavailable_after: Duration::from_secs(number(
                "STAMPEDE_HOST_UNAVAILABLE_SECS",
                172_800,
                60,
                365 * 86400,
            )?),
            unavailable_probe_every: Duration::from_secs(number(
                "STAMPEDE_UNAVAILABLE_PROBE_SECS",
                300,
                10,
                86400,
            )?),
            delivery_record_retention: None,
            dead_letter_retention: None,
        }
        .with_retention(&get)
    }

    /// Reads the retention settings and refuses a success-record retention
    /// that could prune a record while a job it guards is still queued.
    fn with_retention(mut self, get: &impl Fn(&str) -> Option<String>) -> Result<Self> {
        let duration = |var: &'static str, default: Duration| -> Result<Option<Duration>> {
            match get(var) {
                None => Ok(Some(default)),
                Some(raw) => parse_retention(&raw).map_err(|reason| cfg(var, reason)),
            }
        };
        self.delivery_record_retention = duration(
            "STAMPEDE_DELIVERY_RECORD_RETENTION",
            Duration::from_secs(7 * 86400),
        )?;
        self.dead_letter_retention = duration(
            "STAMPEDE_DEAD_LETTER_RETENTION",
            Duration::from_secs(30 * 86400),
        )?;
        if let Some(kept) = self.delivery_record_retention {
            let queued = self.longest_retry_wait();
            let usable = kept - kept / 4;
            if usable < queued {
                let need = (queued.as_secs() * 4).div_ceil(3);
                return Err(cfg(
                    "STAMPEDE_DELIVERY_RECORD_RETENTION",
                    format!(
                        "{}s is too short: a job retried on STAMPEDE_RETRY_SCHEDULE_SECS can wait \
                         {}s in the queue, which must fit in three quarters of the retention \
                         (at least {}s); a record pruned while a copy of its job is queued would \
                         let that copy be sent twice",
                        kept.as_secs(),
                        queued.as_secs(),
                        need
                    ),
                ));
            }
        }
        Ok(self)
    }

    /// The longest a delivery job retried on `STAMPEDE_RETRY_SCHEDULE_SECS`
    /// can spend waiting in the broker: each delay at its +20 % jitter,
    /// rounded up to the delay tier that holds it (at most the 6 h tier).
    pub fn longest_retry_wait(&self) -> Duration {
        const TIERS: &[u64] = &[5, 10, 30, 60, 300, 1800, 3600, 10800, 21600];
        let secs: u64 = self
            .retry_schedule
            .iter()
            .map(|d| {
                let d = (d * 6).div_ceil(5);
                TIERS.iter().copied().find(|t| *t >= d).unwrap_or(21600)
            })
            .sum();
        Duration::from_secs(secs)
    }

    /// The age (from its `first_attempt_unix_ms`) past which a delivery job
    /// is not sent but dead-lettered as expired; `None` when success records
    /// are kept forever.
    ///
    /// The rule: nothing that guards a pending redelivery is pruned. A
    /// success record is the guard of every copy of its job (a redelivered
    /// or republished message, a second fanout's copy, a job parked behind
    /// a paused host or an open circuit, a retry, a copy parked `in_flight`
    /// while the first is being sent). A record is pruned once it is older
    /// than the retention `R`, and it is written after its job's first
    /// attempt was scheduled; so a job is sent only while it is younger
    /// than `3R/4`, and a copy made later than its original (a fanout that
    /// ran again) or clocks that disagree have the last quarter. Jobs past
    /// that (parked for weeks, or held by a `Retry-After` of days) are
    /// dead-lettered with the reason and can be replayed: a replay is a new
    /// job, checked against the records that remain. At start, a retention
    /// whose three quarters are shorter than [`Config::longest_retry_wait`]
    /// is refused, so a job retried on schedule never expires.
    pub fn job_expiry(&self) -> Option<Duration> {
        self.delivery_record_retention.map(|r| r - r / 4)
    }

    /// Worker threads of the async runtime of `service` (`up`, `ingest`,
    /// `inbox`, `fanout` or `delivery`): `STAMPEDE_RUNTIME_THREADS` when set,
    /// else one per core, except where the RSA signing pool (one thread per
    /// core) does most of the work, `delivery` and an `up` that runs
    /// delivery: there half the cores, at least one. The runtime's share of a
    /// delivery is about a third of the signature's, and a runtime worker for
    /// every core beside a busy signing thread for every core costs a futex
    /// wake-up and a context switch per job as the idle workers wake each
    /// other (BENCHMARKS.md). Without delivery the signing pool idles, and
    /// the edge and verification get every core.
    pub fn runtime_threads_for(&self, role: crate::Role) -> usize {
        if self.runtime_threads > 0 {
            return self.runtime_threads;
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let delivery = crate::ServiceKind::Delivery;
        let signs = match role {
            crate::Role::Service(k) => k == delivery,
            crate::Role::AllInOne => self.up_services.contains(&delivery),
        };
        if signs {
            (cores / 2).max(1)
        } else {
            cores
        }
    }

    /// The public base URL as a string without a trailing slash.
    pub fn base(&self) -> &str {
        self.public_url.as_str().trim_end_matches('/')
    }

    /// The host (and non-default port) of the public URL, as used in WebFinger `acct:`.
    pub fn public_host(&self) -> String {
        let host = self.public_url.host_str().unwrap_or("localhost");
        match self.public_url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        }
    }

    /// Whether `authority` (`host[:port]`, as a request's `Host` header
    /// carries it) is this server: the public URL's host and port, or an
    /// alias (`STAMPEDE_PUBLIC_HOST_ALIASES`). A missing port is the public
    /// URL's scheme's default. Allocates nothing: fanout asks it per target.
    pub fn is_own_authority(&self, authority: &str) -> bool {
        let default_port = self.public_url.port_or_known_default();
        let (host, port) = split_authority(authority);
        let port = port.or(default_port);
        let same = |h: &str, p: Option<u16>| {
            port == p.or(default_port) && host.eq_ignore_ascii_case(h.trim_end_matches('.'))
        };
        let own = self.public_url.host_str().unwrap_or_default();
        same(own, self.public_url.port())
            || self.public_host_aliases.iter().any(|alias| {
                let (h, p) = split_authority(alias);
                same(h, p)
            })
    }

    /// The ActivityPub id of the local actor `name`.
    pub fn actor_id(&self, name: &str) -> String {
        format!("{}/users/{name}", self.base())
    }

    /// The id of the local actor `name`'s key (`{actor}#main-key`).
    pub fn key_id(&self, name: &str) -> String {
        format!("{}/users/{name}#main-key", self.base())
    }

    /// The name of the local actor whose id is `id`, the reverse of
    /// [`Config::actor_id`]; `None` for any other id.
    pub fn local_actor_name<'a>(&self, id: &'a str) -> Option<&'a str> {
        let name = id.strip_prefix(self.base())?.strip_prefix("/users/")?;
        (!name.is_empty() && !name.contains(['/', '#', '?'])).then_some(name)
    }

    /// The prefix of every local actor id (`{base}/users/`).
    pub fn actors_prefix(&self) -> String {
        format!("{}/users/", self.base())
    }
}

/// A retention: `7d`, `36h`, `90m`, `600s` or plain seconds; `0` or `off`
/// (`None`) keeps everything.
fn parse_retention(raw: &str) -> std::result::Result<Option<Duration>, String> {
    let v = raw.trim().to_ascii_lowercase();
    if v == "off" {
        return Ok(None);
    }
    let (digits, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => v.split_at(i),
        None => (v.as_str(), "s"),
    };
    let scale = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "`{raw}`: want e.g. 7d, 36h, 90m, 600s, seconds, or off"
            ))
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{raw}`: want e.g. 7d, 36h, 90m, 600s, seconds, or off"))?;
    match n.checked_mul(scale) {
        Some(0) => Ok(None),
        Some(secs) if secs <= 10 * 365 * 86400 => Ok(Some(Duration::from_secs(secs))),
        _ => Err(format!("`{raw}`: at most ten years")),
    }
}

/// `host[:port]` split (an IPv6 literal keeps its brackets, as `Url::host_str`
/// gives it); the host without trailing dots. A port that is not a number
/// is kept as part of the host, so it matches nothing.
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    let a = authority.trim();
    let (host, port) = match a.rfind(':') {
        Some(i) if !a[i..].contains(']') => match a[i + 1..].parse::<u16>() {
            Ok(p) => (&a[..i], Some(p)),
            Err(_) => (a, None),
        },
        _ => (a, None),
    };
    (host.trim_end_matches('.'), port)
}

fn cfg(var: &'static str, reason: impl ToString) -> Error {
    Error::Config {
        var,
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Role, ServiceKind};
    use std::collections::HashMap;

    fn with(pairs: &[(&str, &str)]) -> Result<Config> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_design() {
        let c = with(&[]).unwrap();
        assert_eq!(c.base(), "http://127.0.0.1:8080");
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(
            c.admin_addr.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:8081")
        );
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:9464");
        assert!(c.amqp_url.is_none() && c.redis_url.is_none() && c.database_url.is_none());
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert!(!c.allow_private_networks);
        assert_eq!(c.actor_id("a"), "http://127.0.0.1:8080/users/a");
        assert!(!c.authorized_fetch);
        assert_eq!(c.followers_sync_max, 25_000);
    }

    #[test]
    fn authorized_fetch_and_followers_sync_are_read_and_checked() {
        let c = with(&[
            ("STAMPEDE_AUTHORIZED_FETCH", "true"),
            ("STAMPEDE_FOLLOWERS_SYNC_MAX", "0"),
        ])
        .unwrap();
        assert!(c.authorized_fetch);
        assert_eq!(c.followers_sync_max, 0);
        for (var, bad) in [
            ("STAMPEDE_AUTHORIZED_FETCH", "maybe"),
            ("STAMPEDE_FOLLOWERS_SYNC_MAX", "-1"),
            ("STAMPEDE_FOLLOWERS_SYNC_MAX", "lots"),
        ] {
            let e = with(&[(var, bad)]).unwrap_err().to_string();
            assert!(e.contains(var) && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn the_admin_console_address_is_an_address_or_off() {
        let c = with(&[("STAMPEDE_ADMIN_ADDR", "off")]).unwrap();
        assert!(c.admin_addr.is_none() && c.admin_addr_given);
        let c = with(&[("STAMPEDE_ADMIN_ADDR", "0.0.0.0:9000")]).unwrap();
        assert_eq!(c.admin_addr.map(|a| a.port()), Some(9000));
        assert!(!with(&[]).unwrap().admin_addr_given);
        let e = with(&[("STAMPEDE_ADMIN_ADDR", "nowhere")]).unwrap_err();
        assert!(e.to_string().contains("STAMPEDE_ADMIN_ADDR"), "{e}");
        let e = with(&[
            ("STAMPEDE_ADMIN_ADDR", "0.0.0.0:8080"),
            ("STAMPEDE_HTTP_ADDR", "0.0.0.0:8080"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("public listener"), "{e}");
    }

    #[test]
    fn local_actor_ids_and_key_ids_go_both_ways() {
        let c = with(&[("STAMPEDE_PUBLIC_URL", "https://social.example")]).unwrap();
        assert_eq!(
            c.key_id("alice"),
            "https://social.example/users/alice#main-key"
        );
        assert_eq!(c.local_actor_name(&c.actor_id("alice")), Some("alice"));
        for other in [
            "https://social.example/users/",
            "https://social.example/users/alice/followers",
            "https://social.example/users/alice#main-key",
            "https://social.example.evil/users/alice",
            "https://other.example/users/alice",
        ] {
            assert_eq!(c.local_actor_name(other), None, "{other}");
        }
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, val) in [
            ("STAMPEDE_PUBLIC_URL", "ftp://x"),
            ("STAMPEDE_HTTP_ADDR", "nope"),
            ("STAMPEDE_GRPC_ADDR", "1.2.3.4"),
            ("STAMPEDE_METRICS_ADDR", ":"),
            ("STAMPEDE_AMQP_URL", "http://x"),
            ("STAMPEDE_REDIS_URL", "::"),
            ("STAMPEDE_DATABASE_URL", "mysql://x"),
            ("STAMPEDE_ALLOW_PRIVATE_NETWORKS", "maybe"),
            ("STAMPEDE_API_TOKEN", "short"),
            ("STAMPEDE_PREFETCH", "0"),
            ("STAMPEDE_NAMESPACE", "a b"),
            ("STAMPEDE_RETRY_SCHEDULE_SECS", "30,x"),
            ("STAMPEDE_RETRY_SCHEDULE_SECS", "0"),
            ("STAMPEDE_HOST_CONCURRENCY", "0"),
            ("STAMPEDE_CIRCUIT_FAILURES", "ten"),
            ("STAMPEDE_CIRCUIT_OPEN_SECS", "0"),
            ("STAMPEDE_HOST_RAMP_SECS", "-1"),
            ("STAMPEDE_HOST_UNAVAILABLE_SECS", "5"),
            ("STAMPEDE_UP_SERVICES", "ingest,outbox"),
            ("STAMPEDE_UP_SERVICES", ","),
            ("STAMPEDE_TRUSTED_PROXIES", "10.0.0.0/33"),
            ("STAMPEDE_KEY_REFETCH_SECS", "0"),
            ("STAMPEDE_HTTP_HEADER_TIMEOUT_SECS", "x"),
            ("STAMPEDE_CLASS_WEIGHTS", "6,3"),
            ("STAMPEDE_CLASS_WEIGHTS", "6,0,1"),
            ("STAMPEDE_CLASS_WEIGHTS", "a,b,c"),
            ("STAMPEDE_BULK_AUDIENCE", "0"),
            ("STAMPEDE_INTERACTIVE_MAX_RECIPIENTS", "-1"),
            ("STAMPEDE_BULK_QUEUE_BOUND", "lots"),
            ("STAMPEDE_DATABASE_STATEMENTS", "named"),
            ("STAMPEDE_DATABASE_STATEMENTS", "Unnamed"),
            ("STAMPEDE_SIGNATURE_STYLE", "rfc9421,cavage"),
            ("STAMPEDE_SIGNATURE_STYLE", "RFC9421"),
        ] {
            let e = with(&[(var, val)]).unwrap_err().to_string();
            assert!(e.starts_with(var), "{var}={val} gave {e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn signature_style_is_auto_unless_fixed() {
        assert_eq!(with(&[]).unwrap().signature_style, SignatureStyle::Auto);
        for (val, want) in [
            ("auto", SignatureStyle::Auto),
            ("cavage", SignatureStyle::Cavage),
            (" rfc9421 ", SignatureStyle::Rfc9421),
        ] {
            let c = with(&[("STAMPEDE_SIGNATURE_STYLE", val)]).unwrap();
            assert_eq!(c.signature_style, want, "{val}");
        }
    }

    #[test]
    fn database_statements_are_prepared_unless_unnamed() {
        assert_eq!(
            with(&[]).unwrap().database_statements,
            StatementMode::Prepared
        );
        for (val, want) in [
            ("prepared", StatementMode::Prepared),
            ("unnamed", StatementMode::Unnamed),
            (" unnamed ", StatementMode::Unnamed),
        ] {
            let c = with(&[("STAMPEDE_DATABASE_STATEMENTS", val)]).unwrap();
            assert_eq!(c.database_statements, want, "{val}");
        }
    }

    #[test]
    fn priority_classes_have_defaults_and_take_settings() {
        let c = with(&[]).unwrap();
        assert_eq!(c.class_weights, [6, 3, 1]);
        assert_eq!(
            (
                c.interactive_max_recipients,
                c.bulk_audience,
                c.bulk_queue_bound
            ),
            (5, 1000, 50_000)
        );
        let c = with(&[
            ("STAMPEDE_CLASS_WEIGHTS", " 10, 5 ,1"),
            ("STAMPEDE_INTERACTIVE_MAX_RECIPIENTS", "0"),
            ("STAMPEDE_BULK_AUDIENCE", "20000"),
            ("STAMPEDE_BULK_QUEUE_BOUND", "0"),
        ])
        .unwrap();
        assert_eq!(c.class_weights, [10, 5, 1]);
        assert_eq!(
            (
                c.interactive_max_recipients,
                c.bulk_audience,
                c.bulk_queue_bound
            ),
            (0, 20_000, 0)
        );
    }

    #[test]
    fn up_services_default_to_all_and_take_a_subset() {
        assert_eq!(with(&[]).unwrap().up_services, ServiceKind::ALL);
        assert_eq!(
            with(&[("STAMPEDE_UP_SERVICES", " Ingest, inbox ")])
                .unwrap()
                .up_services,
            [ServiceKind::Ingest, ServiceKind::Inbox]
        );
        assert!(with(&[("STAMPEDE_UP_SERVICES", "ingest,up")]).is_err());
    }

    #[test]
    fn runtime_threads_leave_the_signing_pool_its_cores() {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let auto = with(&[]).unwrap();
        assert_eq!(
            auto.runtime_threads_for(Role::Service(ServiceKind::Inbox)),
            cores
        );
        assert_eq!(
            auto.runtime_threads_for(Role::Service(ServiceKind::Ingest)),
            cores
        );
        assert_eq!(
            auto.runtime_threads_for(Role::Service(ServiceKind::Delivery)),
            (cores / 2).max(1)
        );
        assert_eq!(auto.runtime_threads_for(Role::AllInOne), (cores / 2).max(1));
        let edge = with(&[("STAMPEDE_UP_SERVICES", "ingest,inbox")]).unwrap();
        assert_eq!(
            edge.runtime_threads_for(Role::AllInOne),
            cores,
            "no delivery, no signing pool to leave cores to"
        );
        let set = with(&[("STAMPEDE_RUNTIME_THREADS", "3")]).unwrap();
        assert_eq!(
            set.runtime_threads_for(Role::Service(ServiceKind::Delivery)),
            3
        );
        assert_eq!(
            set.runtime_threads_for(Role::Service(ServiceKind::Inbox)),
            3
        );
        let err = with(&[("STAMPEDE_RUNTIME_THREADS", "many")]).unwrap_err();
        assert!(
            err.to_string().contains("STAMPEDE_RUNTIME_THREADS"),
            "{err}"
        );
    }

    #[test]
    fn blocked_domains_cover_subdomains() {
        let c = crate::policy::DomainPolicies::new(
            &with(&[("STAMPEDE_BLOCKED_DOMAINS", "Bad.example, .worse.example")]).unwrap(),
        );
        assert!(c.is_blocked("bad.example"));
        assert!(c.is_blocked("a.bad.example:8443"));
        assert!(c.is_blocked("x.worse.example"));
        assert!(!c.is_blocked("notbad.example"));
        assert!(!c.is_blocked("good.example"));
        assert!(c.is_blocked("BAD.example."), "case and a trailing dot");
        assert!(c.is_blocked_url("https://x.Bad.Example./users/a"));
        assert!(!c.is_blocked_url("https://good.example/inbox"));
        let idn = crate::policy::DomainPolicies::new(
            &with(&[("STAMPEDE_BLOCKED_DOMAINS", "bücher.example")]).unwrap(),
        );
        assert!(idn.is_blocked("xn--bcher-kva.example"));
        assert!(idn.is_blocked("BÜCHER.example"));
    }

    #[test]
    fn own_authority_is_the_public_host_or_an_alias() {
        let c = with(&[
            ("STAMPEDE_PUBLIC_URL", "https://Social.example"),
            (
                "STAMPEDE_PUBLIC_HOST_ALIASES",
                "old.example, www.social.example:8443",
            ),
        ])
        .unwrap();
        assert!(c.is_own_authority("social.example"));
        assert!(c.is_own_authority("SOCIAL.example:443"));
        assert!(c.is_own_authority("old.example"));
        assert!(c.is_own_authority("www.social.example:8443"));
        assert!(!c.is_own_authority("social.example:8443"));
        assert!(!c.is_own_authority("evil.example"));
        let local = with(&[]).unwrap();
        assert!(local.is_own_authority("127.0.0.1:8080"));
        assert!(!local.is_own_authority("127.0.0.1:8081"));
    }

    #[test]
    fn trusted_proxies_take_cidrs_and_addresses() {
        let c = with(&[(
            "STAMPEDE_TRUSTED_PROXIES",
            "10.0.0.0/8, 192.168.1.7, fd00::/8",
        )])
        .unwrap();
        assert_eq!(c.trusted_proxies.len(), 3);
        assert!(c.trusted_proxies[1].contains(&"192.168.1.7".parse::<std::net::IpAddr>().unwrap()));
    }

    #[test]
    fn retentions_take_units_and_off() {
        let c = with(&[]).unwrap();
        assert_eq!(
            c.delivery_record_retention,
            Some(Duration::from_secs(7 * 86400))
        );
        assert_eq!(
            c.dead_letter_retention,
            Some(Duration::from_secs(30 * 86400))
        );
        for (val, want) in [
            ("8d", Some(8 * 86400)),
            ("96h", Some(96 * 3600)),
            ("6000m", Some(360_000)),
            ("400000s", Some(400_000)),
            ("400000", Some(400_000)),
            (" 5D ", Some(5 * 86400)),
            ("0", None),
            ("off", None),
            ("OFF", None),
        ] {
            let c = with(&[
                ("STAMPEDE_DELIVERY_RECORD_RETENTION", val),
                ("STAMPEDE_DEAD_LETTER_RETENTION", val),
            ])
            .unwrap();
            let want = want.map(Duration::from_secs);
            assert_eq!(c.delivery_record_retention, want, "{val}");
            assert_eq!(c.dead_letter_retention, want, "{val}");
        }
        for bad in ["7w", "d", "-1", "1.5d", "99999999999999999d"] {
            for var in [
                "STAMPEDE_DELIVERY_RECORD_RETENTION",
                "STAMPEDE_DEAD_LETTER_RETENTION",
            ] {
                let e = with(&[(var, bad)]).unwrap_err().to_string();
                assert!(e.starts_with(var), "{var}={bad} gave {e}");
            }
        }
    }

    #[test]
    fn a_record_retention_shorter_than_the_retry_schedule_is_refused() {
        // The default schedule waits at most 52.5 h (each delay +20 %, in
        // its tier): three quarters of 70 h is less.
        let c = with(&[]).unwrap();
        assert_eq!(c.longest_retry_wait(), Duration::from_secs(189_060));
        let e = with(&[("STAMPEDE_DELIVERY_RECORD_RETENTION", "70h")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("STAMPEDE_DELIVERY_RECORD_RETENTION: 252000s is too short")
                && e.contains("at least 252080s")
                && e.contains("sent twice"),
            "{e}"
        );
        assert!(with(&[("STAMPEDE_DELIVERY_RECORD_RETENTION", "252080")]).is_ok());
        // A compressed schedule (tests, benches) allows a short retention:
        // 1 s and 2 s wait in the 5 s tier.
        let short = [("STAMPEDE_RETRY_SCHEDULE_SECS", "1,2")];
        assert_eq!(
            with(&short).unwrap().longest_retry_wait(),
            Duration::from_secs(10)
        );
        let ok = with(&[short[0], ("STAMPEDE_DELIVERY_RECORD_RETENTION", "14s")]).unwrap();
        assert_eq!(ok.job_expiry(), Some(Duration::from_millis(10_500)));
        assert!(with(&[short[0], ("STAMPEDE_DELIVERY_RECORD_RETENTION", "13s")]).is_err());
        // Off keeps every record: nothing to refuse, nothing expires.
        let off = with(&[("STAMPEDE_DELIVERY_RECORD_RETENTION", "off")]).unwrap();
        assert_eq!(off.job_expiry(), None);
    }

    #[test]
    fn secrets_do_not_print() {
        let c = with(&[
            ("STAMPEDE_API_TOKEN", "0123456789abcdef-secret"),
            ("STAMPEDE_DATABASE_URL", "postgres://u:pw@h/db"),
        ])
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("secret") && !dbg.contains("pw@"));
    }
}
