//! Scratch backends, and stampede deployed on them in this process: what the
//! benches, the demo and the end-to-end tests run on and remove afterwards.
//!
//! A [`Scratch`] is a namespace of its own (queues `{namespace}.…`, Redis
//! keys under `{namespace}`) and either a data directory of its own under
//! the temporary directory (the embedded backends) or a PostgreSQL database
//! of its own, created next to an admin database (RabbitMQ, Redis and
//! PostgreSQL). [`Scratch::vars`] are the variables that point a process at
//! it; [`Scratch::remove`] deletes the namespace's queues and keys and drops
//! the database, or removes the directory. [`Deployment`] runs services all
//! in one on a scratch, on ports of its own on 127.0.0.1.
//!
//! The names come from the [`Purpose`]: a bench's namespace is `bench` and
//! 10 hex digits, a test's `t` and 12, and the database is
//! `stampede_{namespace}`. `scripts/test` drops the databases an interrupted
//! run left behind by these names (`^stampede_([tpc][0-9a-f]{12}|bench[0-9a-f]{10})$`):
//! change both together.
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use stampede_backends::cache::redis::RedisCache;
use stampede_backends::queue::amqp::AmqpQueue;
use stampede_runtime::process::{Listeners, Process};
use stampede_runtime::{Config, Role};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What stampede needs to talk to fake remote servers on this machine
/// (`stampede-sink`): private addresses allowed, and neither the edge's rate
/// limit per client nor the key-fetch ration per domain. The fake servers
/// are many servers but one address and one domain (127.0.0.1): rationed as
/// one, a thousand Follows would be refused and a cold run's thousand key
/// fetches would wait for the next minute.
pub const FAKE_SERVERS: [(&str, &str); 3] = [
    ("STAMPEDE_ALLOW_PRIVATE_NETWORKS", "true"),
    ("STAMPEDE_INBOUND_RATE_LIMIT", "0"),
    ("STAMPEDE_KEY_FETCH_RATE_LIMIT", "0"),
];

/// Whose scratch it is, which names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `stampede bench`: namespace `bench` and 10 hex digits, data directory
    /// `stampede-{namespace}`.
    Bench,
    /// The end-to-end tests: namespace `t` and 12 hex digits, data directory
    /// `stampede-test-{namespace}`.
    Test,
    /// `stampede demo`: the default namespace (`stampede`), in a data
    /// directory `stampede-demo-` and 32 hex digits. Embedded backends only:
    /// the namespace is not its own.
    Demo,
}

impl Purpose {
    /// A fresh namespace, and the data directory that goes with it.
    fn names(self) -> (String, PathBuf) {
        let hex = uuid::Uuid::new_v4().simple().to_string();
        let digits = |n: usize| hex.get(..n).unwrap_or(&hex).to_string();
        let (namespace, dir) = match self {
            Purpose::Bench => {
                let ns = format!("bench{}", digits(10));
                let dir = format!("stampede-{ns}");
                (ns, dir)
            }
            Purpose::Test => {
                let ns = format!("t{}", digits(12));
                let dir = format!("stampede-test-{ns}");
                (ns, dir)
            }
            Purpose::Demo => ("stampede".to_string(), format!("stampede-demo-{hex}")),
        };
        (namespace, std::env::temp_dir().join(dir))
    }

    /// The name of the RabbitMQ connection that deletes the queues.
    fn cleanup_connection(self) -> &'static str {
        match self {
            Purpose::Bench => "bench-cleanup",
            Purpose::Test => "stampede-test-cleanup",
            Purpose::Demo => "stampede-demo-cleanup",
        }
    }
}

/// Which backends a scratch is on.
#[derive(Debug, Clone)]
pub enum BackendSet {
    /// The embedded queue, store and cache, in a data directory of the
    /// scratch's own.
    Embedded,
    /// RabbitMQ, Redis and PostgreSQL, with a database of the scratch's own.
    External(ExternalUrls),
}

/// The servers of [`BackendSet::External`].
#[derive(Debug, Clone)]
pub struct ExternalUrls {
    /// RabbitMQ, with its virtual host (`amqp://…/vhost`).
    pub amqp: String,
    /// Redis.
    pub redis: String,
    /// A PostgreSQL database to connect to for creating and dropping the
    /// scratch database (`postgres://…/postgres`), which is made on the same
    /// server.
    pub admin_database: String,
}

/// Backends of a deployment's own; see the module's documentation. Dropping
/// one leaves its backends behind: [`Scratch::remove`] removes them.
#[derive(Debug)]
pub struct Scratch {
    purpose: Purpose,
    namespace: String,
    place: Place,
}

#[derive(Debug)]
enum Place {
    DataDir(PathBuf),
    Database {
        urls: ExternalUrls,
        /// `stampede_{namespace}`.
        name: String,
        /// Its URL: the admin URL with the database name replaced.
        url: String,
    },
}

impl Scratch {
    /// A fresh namespace and, on [`BackendSet::External`], its database,
    /// created here; an embedded data directory is made by the backends
    /// that open it.
    pub async fn create(purpose: Purpose, backends: BackendSet) -> anyhow::Result<Self> {
        let (namespace, dir) = purpose.names();
        let place = match backends {
            BackendSet::Embedded => Place::DataDir(dir),
            BackendSet::External(_) if purpose == Purpose::Demo => {
                bail!("the demo runs on the embedded backends only")
            }
            BackendSet::External(urls) => {
                let name = format!("stampede_{namespace}");
                let url = match urls.admin_database.rsplit_once('/') {
                    Some((head, _)) => format!("{head}/{name}"),
                    None => bail!("the admin database URL has no database name"),
                };
                admin(&urls.admin_database)
                    .await?
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .with_context(|| format!("creating the database {name}"))?;
                Place::Database { urls, name, url }
            }
        };
        Ok(Self {
            purpose,
            namespace,
            place,
        })
    }

    /// The namespace of its queues and cache keys (`STAMPEDE_NAMESPACE`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The embedded backends' data directory (`None` on the external ones).
    pub fn data_dir(&self) -> Option<&Path> {
        match &self.place {
            Place::DataDir(dir) => Some(dir),
            Place::Database { .. } => None,
        }
    }

    /// The external backends' servers (`None` on the embedded ones).
    pub fn external(&self) -> Option<&ExternalUrls> {
        match &self.place {
            Place::DataDir(_) => None,
            Place::Database { urls, .. } => Some(urls),
        }
    }

    /// The URL of the scratch database (`None` on the embedded backends).
    pub fn database_url(&self) -> Option<&str> {
        match &self.place {
            Place::DataDir(_) => None,
            Place::Database { url, .. } => Some(url),
        }
    }

    /// The variables that put a process on these backends:
    /// `STAMPEDE_NAMESPACE`, and `STAMPEDE_DATA_DIR` or `STAMPEDE_AMQP_URL`,
    /// `STAMPEDE_REDIS_URL` and `STAMPEDE_DATABASE_URL`.
    pub fn vars(&self) -> HashMap<&'static str, String> {
        let mut vars = HashMap::from([("STAMPEDE_NAMESPACE", self.namespace.clone())]);
        match &self.place {
            Place::DataDir(dir) => {
                vars.insert("STAMPEDE_DATA_DIR", dir.display().to_string());
            }
            Place::Database { urls, url, .. } => {
                vars.insert("STAMPEDE_AMQP_URL", urls.amqp.clone());
                vars.insert("STAMPEDE_REDIS_URL", urls.redis.clone());
                vars.insert("STAMPEDE_DATABASE_URL", url.clone());
            }
        }
        vars
    }

    /// Removes the backends: the data directory (one never made is no
    /// error), or the namespace's queues and Redis keys and the database
    /// (`DROP DATABASE … WITH (FORCE)`). What uses them should be stopped
    /// first.
    pub async fn remove(self) -> anyhow::Result<()> {
        match self.place {
            Place::DataDir(dir) => match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                r => r.with_context(|| format!("removing {}", dir.display())),
            },
            Place::Database { urls, name, .. } => {
                AmqpQueue::connect(
                    &urls.amqp,
                    &self.namespace,
                    self.purpose.cleanup_connection(),
                )
                .await?
                .delete_all()
                .await?;
                RedisCache::connect(&urls.redis, &self.namespace)
                    .await?
                    .delete_all()
                    .await?;
                admin(&urls.admin_database)
                    .await?
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .with_context(|| format!("dropping the database {name}"))?;
                Ok(())
            }
        }
    }
}

/// A connection to the admin database, driven on a task of its own.
async fn admin(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to the admin database")?;
    tokio::spawn(conn);
    Ok(client)
}

/// Services of stampede in this process (`Role::AllInOne`), on a
/// [`Scratch`] and on ports of their own on 127.0.0.1.
pub struct Deployment {
    /// The process they run in: its configuration, backends and metrics.
    pub process: Process,
    /// `http://127.0.0.1:{port}`: the HTTP listener, and the public URL.
    pub base: String,
    /// `http://127.0.0.1:{port}`: the gRPC listener.
    pub grpc: String,
    /// `http://127.0.0.1:{port}/`: the admin console (8081 when free).
    pub console: String,
    /// The backends they run on.
    pub scratch: Scratch,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Deployment {
    /// Binds the HTTP, gRPC and metrics listeners, connects a process
    /// configured by the scratch's [`Scratch::vars`], the listeners'
    /// addresses (`STAMPEDE_PUBLIC_URL` is the HTTP one) and `settings`
    /// (which win), then changed by `tune` (for values the environment
    /// refuses), and spawns `serve` on it: [`crate::up::run`] for `stampede
    /// up`'s services. When it cannot start, the scratch is removed.
    pub async fn start<S, F>(
        scratch: Scratch,
        settings: impl IntoIterator<Item = (&'static str, String)>,
        tune: impl FnOnce(&mut Config),
        serve: S,
    ) -> anyhow::Result<Self>
    where
        S: FnOnce(Process, Listeners) -> F,
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let mut vars = scratch.vars();
        vars.extend(settings);
        let connected = async {
            let http = TcpListener::bind("127.0.0.1:0").await?;
            let grpc = TcpListener::bind("127.0.0.1:0").await?;
            let metrics = TcpListener::bind("127.0.0.1:0").await?;
            // The console where a person expects it, else anywhere free.
            let admin = match TcpListener::bind("127.0.0.1:8081").await {
                Ok(l) => l,
                Err(_) => TcpListener::bind("127.0.0.1:0").await?,
            };
            let console = format!("http://{}/", admin.local_addr()?);
            let admin = Some(admin);
            let base = format!("http://{}", http.local_addr()?);
            let grpc_url = format!("http://{}", grpc.local_addr()?);
            for (k, v) in [
                ("STAMPEDE_PUBLIC_URL", base.clone()),
                ("STAMPEDE_HTTP_ADDR", http.local_addr()?.to_string()),
                ("STAMPEDE_GRPC_ADDR", grpc.local_addr()?.to_string()),
                ("STAMPEDE_METRICS_ADDR", metrics.local_addr()?.to_string()),
            ] {
                vars.entry(k).or_insert(v);
            }
            let mut cfg = Config::from_lookup(|k| vars.get(k).cloned())?;
            tune(&mut cfg);
            let process = Process::connect(cfg, Role::AllInOne, CancellationToken::new()).await?;
            let listeners = Listeners {
                http: Some(http),
                grpc,
                metrics,
                admin,
            };
            anyhow::Ok((process, listeners, base, grpc_url, console))
        }
        .await;
        let (process, listeners, base, grpc, console) = match connected {
            Ok(c) => c,
            Err(e) => {
                let _ = scratch.remove().await;
                return Err(e);
            }
        };
        let task = tokio::spawn(serve(process.clone(), listeners));
        Ok(Self {
            process,
            base,
            grpc,
            console,
            scratch,
            task,
        })
    }

    /// Stops the services, waiting for them at most `limit` (`None`: as
    /// long as they take), and hands back the scratch, to remove or keep,
    /// with how the services ended: an error when they stopped with one,
    /// panicked, or outlived `limit`.
    pub async fn stop(self, limit: Option<Duration>) -> (anyhow::Result<()>, Scratch) {
        self.process.shutdown.cancel();
        let ended = match limit {
            Some(limit) => tokio::time::timeout(limit, self.task)
                .await
                .map_err(|_| anyhow::anyhow!("stampede did not stop within {} s", limit.as_secs())),
            None => Ok(self.task.await),
        };
        let ended = match ended {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.context("stampede stopped with an error")),
            Ok(Err(e)) => Err(anyhow::anyhow!("stampede task failed: {e}")),
            Err(e) => Err(e),
        };
        drop(self.process);
        (ended, self.scratch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `stampede_` and what follows, as scripts/test matches leftovers:
    /// `^stampede_([tpc][0-9a-f]{12}|bench[0-9a-f]{10})$`.
    fn dropped_by_scripts_test(db: &str) -> bool {
        let hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        };
        match db.strip_prefix("stampede_") {
            Some(rest) => match rest.strip_prefix("bench") {
                Some(digits) => hex(digits, 10),
                None => rest.starts_with(['t', 'p', 'c']) && hex(&rest[1..], 12),
            },
            None => false,
        }
    }

    #[test]
    fn bench_and_test_databases_are_named_as_scripts_test_drops_them() {
        for purpose in [Purpose::Bench, Purpose::Test] {
            let (ns, dir) = purpose.names();
            assert!(dropped_by_scripts_test(&format!("stampede_{ns}")), "{ns}");
            let dir = dir.file_name().and_then(|d| d.to_str()).unwrap_or("");
            assert!(dir.starts_with("stampede-") && dir.ends_with(&ns), "{dir}");
            assert_ne!(purpose.names().0, ns, "a fresh namespace each time");
        }
        let (ns, dir) = Purpose::Demo.names();
        assert_eq!(ns, "stampede");
        let dir = dir.file_name().and_then(|d| d.to_str()).unwrap_or("");
        let digits = dir.strip_prefix("stampede-demo-").unwrap_or("");
        assert!(
            digits.len() == 32 && digits.bytes().all(|b| b.is_ascii_hexdigit()),
            "{dir}"
        );
    }

    #[tokio::test]
    async fn an_embedded_scratch_is_its_namespace_and_directory_and_removes_it() {
        let s = Scratch::create(Purpose::Bench, BackendSet::Embedded)
            .await
            .unwrap();
        let dir = s.data_dir().unwrap().to_path_buf();
        let vars = s.vars();
        assert_eq!(vars.len(), 2);
        assert_eq!(vars["STAMPEDE_NAMESPACE"], s.namespace());
        assert_eq!(vars["STAMPEDE_DATA_DIR"], dir.display().to_string());
        assert!(s.external().is_none() && s.database_url().is_none());
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        s.remove().await.unwrap();
        assert!(!dir.exists());
        // One that was never made is no error.
        let s = Scratch::create(Purpose::Test, BackendSet::Embedded)
            .await
            .unwrap();
        s.remove().await.unwrap();
        let urls = ExternalUrls {
            amqp: String::new(),
            redis: String::new(),
            admin_database: String::new(),
        };
        assert!(Scratch::create(Purpose::Demo, BackendSet::External(urls))
            .await
            .is_err());
    }
}
