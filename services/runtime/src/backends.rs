//! The set of backends a process runs on, chosen by configuration.
use std::sync::Arc;
use std::time::Duration;

use crate::{Config, Error, Result};
use stampede_backends::cache::{memory::MemoryCache, redis::RedisCache, Cache};
use stampede_backends::queue::{
    amqp::{AmqpOptions, AmqpQueue},
    embedded::EmbeddedQueue,
    Queue,
};
use stampede_backends::sqlite::DataDirLock;
use stampede_backends::store::{embedded::EmbeddedStore, postgres::PgStore, Store};

/// Queue, cache and store, behind the traits the services use.
#[derive(Clone)]
pub struct Backends {
    /// The durable store.
    pub store: Arc<dyn Store>,
    /// The broker.
    pub queue: Arc<dyn Queue>,
    /// The shared hot state.
    pub cache: Arc<dyn Cache>,
    /// Which implementations these are, for the start-up line and status.
    pub summary: Arc<str>,
}

impl Backends {
    /// Opens the backends of the all-in-one layout: each of RabbitMQ, Redis
    /// and PostgreSQL whose URL is set, and the embedded queue, cache and
    /// store (in the locked `STAMPEDE_DATA_DIR`) for those that are not.
    pub async fn open(cfg: &Config, process: &str) -> Result<Self> {
        let mut lock: Option<DataDirLock> = None;
        let mut locked = || -> Result<DataDirLock> {
            if let Some(l) = &lock {
                return Ok(l.clone());
            }
            let l = DataDirLock::acquire(&cfg.data_dir)?;
            lock = Some(l.clone());
            Ok(l)
        };
        let dir = cfg.data_dir.display();
        let (store, store_kind): (Arc<dyn Store>, String) = match &cfg.database_url {
            Some(url) => {
                let store = PgStore::connect_with(
                    url.expose(),
                    cfg.database_pool_size,
                    cfg.database_statements,
                )?;
                store.migrate().await?;
                (Arc::new(store), "PostgreSQL".into())
            }
            None => (
                Arc::new(EmbeddedStore::open(&locked()?)?),
                format!("embedded ({dir}/store.db)"),
            ),
        };
        let (queue, queue_kind): (Arc<dyn Queue>, String) = match &cfg.amqp_url {
            Some(url) => (
                Arc::new(
                    AmqpQueue::connect_with(
                        url.expose(),
                        &cfg.namespace,
                        process,
                        AmqpOptions {
                            delivery_shards: cfg.delivery_shards,
                        },
                    )
                    .await?,
                ),
                "RabbitMQ".into(),
            ),
            None => (
                Arc::new(EmbeddedQueue::open(&locked()?, &cfg.namespace).await?),
                format!("embedded ({dir}/queue.db)"),
            ),
        };
        let (cache, cache_kind): (Arc<dyn Cache>, &str) = match &cfg.redis_url {
            Some(url) => (
                Arc::new(
                    RedisCache::connect_pooled(url.expose(), &cfg.namespace, cfg.redis_pool_size)
                        .await?,
                ),
                "Redis",
            ),
            None => (Arc::new(MemoryCache::new()), "in-memory"),
        };
        Ok(Self {
            store,
            queue,
            cache,
            summary: format!("queue {queue_kind}, store {store_kind}, cache {cache_kind}").into(),
        })
    }

    /// Connects to RabbitMQ, Redis and PostgreSQL as configured and applies
    /// migrations. Separate service processes need all three.
    pub async fn connect(cfg: &Config, process: &str) -> Result<Self> {
        let need = |v: &Option<crate::config::Secret>, var: &'static str| {
            match v {
            Some(_) => Ok(()),
            None => Err(Error::Config {
                var,
                reason: "not set: a service run on its own needs RabbitMQ, Redis and PostgreSQL (the embedded backends serve `stampede up`)".into(),
            }),
        }
        };
        need(&cfg.amqp_url, "STAMPEDE_AMQP_URL")?;
        need(&cfg.redis_url, "STAMPEDE_REDIS_URL")?;
        need(&cfg.database_url, "STAMPEDE_DATABASE_URL")?;
        // All three set: `open` picks no embedded backend.
        Self::open(cfg, process).await
    }

    /// Whether every backend answers; the reason when one does not.
    pub async fn ready(&self) -> std::result::Result<(), String> {
        // The store first: its reason is the more telling where both fail
        // alike (the embedded files on a full disk).
        let limit = Duration::from_secs(2);
        match tokio::time::timeout(limit, self.store.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("store: {e}")),
            Err(_) => return Err("store: timed out".into()),
        }
        if !self.queue.is_connected() {
            return Err(
                "queue: broker disconnected, or the embedded queue's writes failing".into(),
            );
        }
        match tokio::time::timeout(limit, self.cache.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("cache: {e}")),
            Err(_) => Err("cache: timed out".into()),
        }
    }
}
