//! The Redis implementation of [`Cache`]: one multiplexed connection manager
//! (reconnects on its own), every key under the namespace prefix.
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::AsyncCommands;
use async_trait::async_trait;

use crate::cache::{Cache, LeaseTake, Leased};
use crate::{Error, Result};

/// [`Cache::set_if`]: KEYS[1]; ARGV: has-expected (`0`/`1`), expected,
/// value, ttl ms.
const SET_IF: &str = r"
local v = redis.call('GET', KEYS[1])
if (ARGV[1] == '1' and v == ARGV[2]) or (ARGV[1] == '0' and not v) then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  return 1
end
return 0";

/// [`Cache::lease`]. KEYS: the release semaphores, the keys read, then the
/// semaphore to take from and its limit key, when given. ARGV: how many
/// releases, how many reads, the release holders, then holder, limit, ttl
/// ms, whether a limit key follows, and the reserve. A semaphore is a sorted set of
/// holders scored by expiry (the server's clock, the same for every
/// process). Returns taken (2: the holder already holds one), held, limit,
/// then the values read.
const LEASE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nrel, nread = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, nrel do redis.call('ZREM', KEYS[i], ARGV[2 + i]) end
local out = {0, 0, 0}
for i = 1, nread do out[3 + i] = redis.call('GET', KEYS[nrel + i]) end
local sem = KEYS[nrel + nread + 1]
if sem then
  local a = 2 + nrel
  local holder, limit, ttl = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if ARGV[a + 4] == '1' then
    local v = redis.call('GET', KEYS[nrel + nread + 2])
    local n = v and tonumber(string.match(v, '^%d+'))
    if n then
      n = math.max(1, math.floor(n / 1000))
      if n < limit then limit = n end
    end
  end
  limit = math.max(1, limit - tonumber(ARGV[a + 5]))
  redis.call('ZREMRANGEBYSCORE', sem, '-inf', now)
  local held = redis.call('ZCARD', sem)
  if redis.call('ZSCORE', sem, holder) then
    out[1] = 2
  elseif held < limit then
    redis.call('ZADD', sem, now + ttl, holder)
    held = held + 1
    out[1] = 1
    if redis.call('PTTL', sem) < ttl then redis.call('PEXPIRE', sem, ttl) end
  end
  out[2], out[3] = held, limit
end
return out";

/// [`Cache::lease_renew`]: KEYS the semaphores, ARGV ttl ms then the
/// holders.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, n = tonumber(ARGV[1]), 0
for i = 1, #KEYS do
  local s = redis.call('ZSCORE', KEYS[i], ARGV[1 + i])
  if s and tonumber(s) > now then
    redis.call('ZADD', KEYS[i], now + ttl, ARGV[1 + i])
    if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
    n = n + 1
  end
end
return n";

/// [`Cache::lease_counts`]: KEYS the semaphores.
const COUNT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do out[i] = redis.call('ZCOUNT', KEYS[i], '(' .. now, '+inf') end
return out";

/// The scripts, loaded once per process (sent by hash, the body only when
/// the server does not have it).
struct Scripts {
    set_if: ::redis::Script,
    lease: ::redis::Script,
    renew: ::redis::Script,
    count: ::redis::Script,
}

fn scripts() -> &'static Scripts {
    static S: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    S.get_or_init(|| Scripts {
        set_if: ::redis::Script::new(SET_IF),
        lease: ::redis::Script::new(LEASE),
        renew: ::redis::Script::new(RENEW),
        count: ::redis::Script::new(COUNT),
    })
}

fn int(v: Option<&::redis::Value>) -> Result<i64> {
    match v {
        Some(::redis::Value::Int(n)) => Ok(*n),
        other => Err(Error::Cache(format!(
            "lease script: expected an integer, got {other:?}"
        ))),
    }
}

/// The Redis cache.
#[derive(Clone)]
pub struct RedisCache {
    /// Multiplexed connections, taken in turn.
    conns: std::sync::Arc<[ConnectionManager]>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    prefix: String,
}

impl RedisCache {
    /// Connects to `url`; keys are prefixed `{namespace}:`.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self> {
        Self::connect_pooled(url, namespace, 1).await
    }

    /// [`RedisCache::connect`] with `connections` multiplexed connections,
    /// used in turn. Each reconnects by itself; a request waits at most 5 s
    /// for its answer, so a Redis that stops answering fails requests
    /// instead of hanging them.
    pub async fn connect_pooled(url: &str, namespace: &str, connections: usize) -> Result<Self> {
        let client = ::redis::Client::open(url)?;
        // One reconnection try per failed request: while Redis is away a
        // request fails within about a second (the edge then lets requests
        // through, the workers hold their messages) instead of waiting out
        // a series of retries.
        let config = ::redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(1)))
            .set_response_timeout(Some(std::time::Duration::from_secs(5)))
            .set_number_of_retries(1)
            .set_max_delay(std::time::Duration::from_secs(1));
        let mut conns = Vec::with_capacity(connections.max(1));
        for _ in 0..connections.max(1) {
            conns.push(ConnectionManager::new_with_config(client.clone(), config.clone()).await?);
        }
        Ok(Self {
            conns: conns.into(),
            next: Default::default(),
            prefix: format!("{namespace}:"),
        })
    }

    /// The next connection in turn.
    fn conn(&self) -> ConnectionManager {
        let n = self.conns.len();
        let i = if n == 1 {
            0
        } else {
            self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n
        };
        self.conns[i].clone()
    }

    fn key(&self, k: &str) -> String {
        let mut s = String::with_capacity(self.prefix.len() + k.len());
        s.push_str(&self.prefix);
        s.push_str(k);
        s
    }

    /// Deletes every key of this namespace (tests clean up with it).
    pub async fn delete_all(&self) -> Result<()> {
        let mut c = self.conn();
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

/// Adds to `pipe` what makes `key` live at least `ttl` from now: NX gives a
/// new key its expiry, GT only ever extends it.
fn at_least<'a>(
    pipe: &'a mut ::redis::Pipeline,
    key: &str,
    ttl: Duration,
) -> &'a mut ::redis::Pipeline {
    pipe.cmd("PEXPIRE")
        .arg(key)
        .arg(ttl_ms(ttl))
        .arg("NX")
        .ignore()
        .cmd("PEXPIRE")
        .arg(key)
        .arg(ttl_ms(ttl))
        .arg("GT")
        .ignore()
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let mut c = self.conn();
        Ok(c.get(self.key(key)).await?)
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn();
        let mut cmd = ::redis::cmd("MGET");
        for k in keys {
            cmd.arg(self.key(k));
        }
        Ok(cmd.query_async(&mut c).await?)
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        let mut c = self.conn();
        let _: () = c.pset_ex(self.key(key), value, ttl_ms(ttl)).await?;
        Ok(())
    }

    async fn set_nx(&self, key: &str, value: &[u8], ttl: Duration) -> Result<bool> {
        let mut c = self.conn();
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
        let mut c = self.conn();
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
        let mut c = self.conn();
        let k = self.key(key);
        let mut pipe = ::redis::pipe();
        pipe.atomic().hincr(&k, field, by);
        let (n,): (i64,) = at_least(&mut pipe, &k, ttl).query_async(&mut c).await?;
        Ok(n)
    }

    async fn hash_incr_many(&self, key: &str, by: &[(String, i64)], ttl: Duration) -> Result<()> {
        if by.is_empty() {
            return Ok(());
        }
        let mut c = self.conn();
        let k = self.key(key);
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        for (field, n) in by {
            pipe.hincr(&k, field, *n).ignore();
        }
        let () = at_least(&mut pipe, &k, ttl).query_async(&mut c).await?;
        Ok(())
    }

    async fn hash_set_many(
        &self,
        key: &str,
        values: &[(String, i64)],
        ttl: Duration,
    ) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut c = self.conn();
        let k = self.key(key);
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        pipe.hset_multiple(&k, values).ignore();
        let () = at_least(&mut pipe, &k, ttl).query_async(&mut c).await?;
        Ok(())
    }

    async fn hash_get_all(&self, key: &str) -> Result<Vec<(String, i64)>> {
        let mut c = self.conn();
        Ok(c.hgetall(self.key(key)).await?)
    }

    async fn hash_del(&self, key: &str, fields: &[String]) -> Result<()> {
        if fields.is_empty() {
            return Ok(());
        }
        let mut c = self.conn();
        let _: () = c.hdel(self.key(key), fields).await?;
        Ok(())
    }

    async fn set_if(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool> {
        let mut c = self.conn();
        let set: i64 = scripts()
            .set_if
            .key(self.key(key))
            .arg(if expected.is_some() { "1" } else { "0" })
            .arg(expected.unwrap_or_default())
            .arg(value)
            .arg(ttl_ms(ttl))
            .invoke_async(&mut c)
            .await?;
        Ok(set == 1)
    }

    async fn lease(
        &self,
        release: &[(String, String)],
        read: &[String],
        take: Option<LeaseTake<'_>>,
    ) -> Result<Leased> {
        let mut c = self.conn();
        let mut inv = scripts().lease.prepare_invoke();
        inv.arg(release.len()).arg(read.len());
        for (sem, holder) in release {
            inv.key(self.key(sem)).arg(holder);
        }
        for k in read {
            inv.key(self.key(k));
        }
        if let Some(t) = take {
            inv.key(self.key(t.key))
                .arg(t.holder)
                .arg(t.limit)
                .arg(ttl_ms(t.ttl));
            match t.limit_key {
                Some(lk) => inv.key(self.key(lk)).arg("1"),
                None => inv.arg("0"),
            };
            inv.arg(t.reserve);
        }
        let out: Vec<::redis::Value> = inv.invoke_async(&mut c).await?;
        let mut values = Vec::with_capacity(read.len());
        for v in out.iter().skip(3).take(read.len()) {
            values.push(match v {
                ::redis::Value::BulkString(b) => Some(b.clone()),
                _ => None,
            });
        }
        // Lua drops trailing nils of a table: absent values at the end.
        values.resize(read.len(), None);
        Ok(Leased {
            taken: int(out.first())? == 1,
            already_held: int(out.first())? == 2,
            held: int(out.get(1))?.max(0) as u32,
            limit: int(out.get(2))?.max(0) as u32,
            values,
        })
    }

    async fn lease_renew(&self, leases: &[(String, String)], ttl: Duration) -> Result<u32> {
        if leases.is_empty() {
            return Ok(0);
        }
        let mut c = self.conn();
        let mut inv = scripts().renew.prepare_invoke();
        inv.arg(ttl_ms(ttl));
        for (sem, holder) in leases {
            inv.key(self.key(sem)).arg(holder);
        }
        let n: i64 = inv.invoke_async(&mut c).await?;
        Ok(n.max(0) as u32)
    }

    async fn lease_counts(&self, keys: &[String]) -> Result<Vec<u32>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn();
        let mut inv = scripts().count.prepare_invoke();
        for k in keys {
            inv.key(self.key(k));
        }
        let n: Vec<i64> = inv.invoke_async(&mut c).await?;
        Ok(n.into_iter().map(|n| n.max(0) as u32).collect())
    }

    async fn del(&self, key: &str) -> Result<()> {
        let mut c = self.conn();
        let _: () = c.del(self.key(key)).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        let mut c = self.conn();
        let _: String = ::redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }
}
