//! The Redis implementation of [`Cache`]: one multiplexed connection manager
//! (reconnects on its own), every key under the namespace prefix.
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::AsyncCommands;
use async_trait::async_trait;

use crate::cache::Cache;
use crate::Result;

/// The Redis cache.
#[derive(Clone)]
pub struct RedisCache {
    conn: ConnectionManager,
    prefix: String,
}

impl RedisCache {
    /// Connects to `url`; keys are prefixed `{namespace}:`.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        let client = ::redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Self {
            conn,
            prefix: format!("{namespace}:"),
        })
    }

    fn key(&self, k: &str) -> String {
        let mut s = String::with_capacity(self.prefix.len() + k.len());
        s.push_str(&self.prefix);
        s.push_str(k);
        s
    }

    /// Deletes every key of this namespace (tests clean up with it).
    pub async fn delete_all(&self) -> Result<()> {
        let mut c = self.conn.clone();
        let keys: Vec<String> = c.keys(format!("{}*", self.prefix)).await?;
        for chunk in keys.chunks(500) {
            let _: () = c.del(chunk).await?;
        }
        Ok(())
    }
}

fn ttl_ms(ttl: Duration) -> u64 {
    (ttl.as_millis() as u64).max(1)
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let mut c = self.conn.clone();
        Ok(c.get(self.key(key)).await?)
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn.clone();
        let mut cmd = ::redis::cmd("MGET");
        for k in keys {
            cmd.arg(self.key(k));
        }
        Ok(cmd.query_async(&mut c).await?)
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = c.pset_ex(self.key(key), value, ttl_ms(ttl)).await?;
        Ok(())
    }

    async fn set_nx(&self, key: &str, value: &[u8], ttl: Duration) -> Result<bool> {
        let mut c = self.conn.clone();
        let set: Option<String> = ::redis::cmd("SET")
            .arg(self.key(key))
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms(ttl))
            .query_async(&mut c)
            .await?;
        Ok(set.is_some())
    }

    async fn incr(&self, key: &str, ttl: Duration) -> Result<u64> {
        let mut c = self.conn.clone();
        let k = self.key(key);
        let (n,): (u64,) = ::redis::pipe()
            .atomic()
            .incr(&k, 1u64)
            .cmd("PEXPIRE")
            .arg(&k)
            .arg(ttl_ms(ttl))
            .arg("NX")
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(n)
    }

    async fn hash_incr(&self, key: &str, field: &str, by: i64, ttl: Duration) -> Result<i64> {
        let mut c = self.conn.clone();
        let k = self.key(key);
        // NX gives a new hash its expiry, GT only ever extends it.
        let (n,): (i64,) = ::redis::pipe()
            .atomic()
            .hincr(&k, field, by)
            .cmd("PEXPIRE")
            .arg(&k)
            .arg(ttl_ms(ttl))
            .arg("NX")
            .ignore()
            .cmd("PEXPIRE")
            .arg(&k)
            .arg(ttl_ms(ttl))
            .arg("GT")
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(n)
    }

    async fn hash_get_all(&self, key: &str) -> Result<Vec<(String, i64)>> {
        let mut c = self.conn.clone();
        Ok(c.hgetall(self.key(key)).await?)
    }

    async fn hash_del(&self, key: &str, fields: &[String]) -> Result<()> {
        if fields.is_empty() {
            return Ok(());
        }
        let mut c = self.conn.clone();
        let _: () = c.hdel(self.key(key), fields).await?;
        Ok(())
    }

    async fn del(&self, key: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = c.del(self.key(key)).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        let mut c = self.conn.clone();
        let _: String = ::redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }
}
