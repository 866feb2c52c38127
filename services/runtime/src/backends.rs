//! The set of backends a process runs on, chosen by configuration.
use std::sync::Arc;
use std::time::Duration;

use crate::amqp::AmqpQueue;
use crate::cache::Cache;
use crate::postgres::PgStore;
use crate::queue::Queue;
use crate::redis_cache::RedisCache;
use crate::store::Store;
use crate::{Config, Error, Result};

/// Queue, cache and store, behind the traits the services use.
#[derive(Clone)]
pub struct Backends {
    /// The durable store.
    pub store: Arc<dyn Store>,
    /// The broker.
    pub queue: Arc<dyn Queue>,
    /// The shared hot state.
    pub cache: Arc<dyn Cache>,
}

impl Backends {
    /// Connects to RabbitMQ, Redis and PostgreSQL as configured and applies
    /// migrations. Separate service processes need all three.
    pub async fn connect(cfg: &Config, process: &str) -> Result<Self> {
        let need = |v: &Option<crate::config::Secret>, var: &'static str| {
            v.clone().ok_or(Error::Config {
                var,
                reason: "not set: a service run on its own needs RabbitMQ, Redis and PostgreSQL (the embedded backends serve `stampede up`)".into(),
            })
        };
        let amqp = need(&cfg.amqp_url, "STAMPEDE_AMQP_URL")?;
        let redis = need(&cfg.redis_url, "STAMPEDE_REDIS_URL")?;
        let db = need(&cfg.database_url, "STAMPEDE_DATABASE_URL")?;
        let store = PgStore::connect(db.expose(), 16)?;
        store.migrate().await?;
        let queue = AmqpQueue::connect(amqp.expose(), &cfg.namespace, process).await?;
        let cache = RedisCache::connect(redis.expose(), &cfg.namespace).await?;
        Ok(Self {
            store: Arc::new(store),
            queue: Arc::new(queue),
            cache: Arc::new(cache),
        })
    }

    /// Whether every backend answers; the reason when one does not.
    pub async fn ready(&self) -> std::result::Result<(), String> {
        if !self.queue.is_connected() {
            return Err("broker disconnected".into());
        }
        let limit = Duration::from_secs(2);
        match tokio::time::timeout(limit, self.store.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("store: {e}")),
            Err(_) => return Err("store: timed out".into()),
        }
        match tokio::time::timeout(limit, self.cache.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("cache: {e}")),
            Err(_) => Err("cache: timed out".into()),
        }
    }
}
