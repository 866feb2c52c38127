//! Factories for the implementations under test, each on state of its own,
//! and the runner that removes that state after the test, passed or failed.
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use stampede_backends::cache::memory::MemoryCache;
use stampede_backends::cache::redis::RedisCache;
use stampede_backends::cache::Cache;
use stampede_backends::queue::amqp::{AmqpOptions, AmqpQueue};
use stampede_backends::queue::embedded::EmbeddedQueue;
use stampede_backends::queue::Queue;
use stampede_backends::sqlite::DataDirLock;
use stampede_backends::store::embedded::EmbeddedStore;
use stampede_backends::store::postgres::{PgStore, StatementMode};
use stampede_backends::store::Store;

/// Longest a test may run before it fails (and is cleaned up).
const TEST_LIMIT: Duration = Duration::from_secs(90);

fn env(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

fn amqp_url() -> String {
    env(
        "STAMPEDE_TEST_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    )
}

fn redis_url() -> String {
    env("STAMPEDE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
}

fn admin_db_url() -> String {
    env(
        "STAMPEDE_TEST_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    )
}

/// 12 lowercase hex characters of a fresh UUID.
fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// A data directory of the test's own.
fn temp_dir() -> PathBuf {
    std::env::temp_dir().join(format!("stampede-contract-{}", uuid::Uuid::new_v4()))
}

/// An implementation under test (`cx`) and what removes its state.
pub struct Fixture<C> {
    cx: C,
    cleanup: Cleanup,
}

/// The state a test leaves behind.
enum Cleanup {
    /// A namespace of RabbitMQ queues and its exchange.
    Queues(AmqpQueue),
    /// A namespace of Redis keys.
    Keys(RedisCache),
    /// A PostgreSQL database.
    Database(String),
    /// A data directory.
    Dir(PathBuf),
    /// Process memory, gone with the test.
    Nothing,
}

impl Cleanup {
    async fn run(self) -> Result<(), String> {
        match self {
            Cleanup::Queues(q) => q.delete_all().await.map_err(|e| e.to_string()),
            Cleanup::Keys(c) => c.delete_all().await.map_err(|e| e.to_string()),
            Cleanup::Database(name) => drop_database(&name).await,
            Cleanup::Dir(dir) => std::fs::remove_dir_all(&dir)
                .map_err(|e| format!("removing {}: {e}", dir.display())),
            Cleanup::Nothing => Ok(()),
        }
    }
}

/// Runs `test` on the implementation `fixture` opens, then removes its state
/// whether the test passed, failed or hung; a failure is then resumed, and
/// a failed clean-up of a passing test fails it.
pub async fn run<C, T, Fut>(fixture: impl Future<Output = Fixture<C>>, test: T)
where
    T: FnOnce(C) -> Fut,
    Fut: Future<Output = ()>,
{
    let Fixture { cx, cleanup } = fixture.await;
    // The test (and every handle it holds) is dropped before the clean-up.
    let outcome = AssertUnwindSafe(tokio::time::timeout(TEST_LIMIT, test(cx)))
        .catch_unwind()
        .await;
    let cleaned = cleanup.run().await;
    match outcome {
        Ok(Ok(())) => {
            if let Err(e) = cleaned {
                panic!("the test passed but its clean-up failed: {e}");
            }
        }
        Ok(Err(_)) => {
            panic!("the test did not finish within {TEST_LIMIT:?} (clean-up: {cleaned:?})")
        }
        Err(panic) => {
            if let Err(e) = cleaned {
                eprintln!("clean-up after the failure failed too: {e}");
            }
            std::panic::resume_unwind(panic)
        }
    }
}

// ---------------------------------------------------------------- queue --

/// `AmqpQueue` on a namespace of its own in `STAMPEDE_TEST_AMQP_URL`.
pub async fn amqp_queue() -> Fixture<Arc<dyn Queue>> {
    let namespace = format!("c{}", unique());
    let q = AmqpQueue::connect(&amqp_url(), &namespace, "stampede-contract")
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ must run (STAMPEDE_TEST_AMQP_URL): {e}"));
    Fixture {
        cx: Arc::new(q.clone()),
        cleanup: Cleanup::Queues(q),
    }
}

/// `AmqpQueue` with every delivery class sharded over three quorum queues:
/// the contract holds whatever the shard count (messages without a route
/// spread over the shards, consumers take from all).
pub async fn amqp_sharded_queue() -> Fixture<Arc<dyn Queue>> {
    let namespace = format!("c{}", unique());
    let q = AmqpQueue::connect_with(
        &amqp_url(),
        &namespace,
        "stampede-contract",
        AmqpOptions { delivery_shards: 3 },
    )
    .await
    .unwrap_or_else(|e| panic!("RabbitMQ must run (STAMPEDE_TEST_AMQP_URL): {e}"));
    Fixture {
        cx: Arc::new(q.clone()),
        cleanup: Cleanup::Queues(q),
    }
}

/// `AmqpQueue` given a node list whose first node does not answer (nothing
/// listens on port 1): it connects to the next.
pub async fn amqp_queue_listed_after_a_dead_node() -> Fixture<Arc<dyn Queue>> {
    let namespace = format!("c{}", unique());
    let list = format!("amqp://guest:guest@127.0.0.1:1/%2f,{}", amqp_url());
    let q = AmqpQueue::connect(&list, &namespace, "stampede-contract")
        .await
        .unwrap_or_else(|e| panic!("the second node of the list must answer: {e}"));
    Fixture {
        cx: Arc::new(q.clone()),
        cleanup: Cleanup::Queues(q),
    }
}

/// `EmbeddedQueue` in a data directory of its own.
pub async fn embedded_queue() -> Fixture<Arc<dyn Queue>> {
    let dir = temp_dir();
    let lock = DataDirLock::acquire(&dir).unwrap();
    let q = match EmbeddedQueue::open(&lock, &format!("c{}", unique())).await {
        Ok(q) => q,
        Err(e) => {
            drop(lock);
            let _ = std::fs::remove_dir_all(&dir);
            panic!("opening the embedded queue: {e}");
        }
    };
    Fixture {
        cx: Arc::new(q),
        cleanup: Cleanup::Dir(dir),
    }
}

// ---------------------------------------------------------------- store --

/// A store under test, and where its data lives.
pub struct StoreCx {
    pub store: Arc<dyn Store>,
    files: StoreFiles,
}

enum StoreFiles {
    Postgres { url: String },
    Sqlite { path: PathBuf },
}

impl StoreCx {
    /// The PostgreSQL database under test, if it is one.
    pub fn postgres_url(&self) -> Option<&str> {
        match &self.files {
            StoreFiles::Postgres { url } => Some(url),
            StoreFiles::Sqlite { .. } => None,
        }
    }

    /// Closes the store and reads one row of integers with `sql` (a query
    /// both SQL dialects accept) straight from its database: for what the
    /// trait records but never reads back.
    pub async fn close_and_read(self, sql: &str) -> Vec<Option<i64>> {
        assert_eq!(
            Arc::strong_count(&self.store),
            1,
            "the test still holds the store"
        );
        drop(self.store);
        match self.files {
            StoreFiles::Postgres { url } => {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                let conn = tokio::spawn(conn);
                let row = client.query_one(sql, &[]).await.unwrap();
                let values = (0..row.len()).map(|i| row.get(i)).collect();
                drop(client);
                let _ = conn.await;
                values
            }
            // The last handle gone, the database thread has finished and
            // released the file.
            StoreFiles::Sqlite { path } => rusqlite::Connection::open(&path)
                .unwrap()
                .query_row(sql, [], |r| {
                    (0..r.as_ref().column_count()).map(|i| r.get(i)).collect()
                })
                .unwrap(),
        }
    }
}

async fn admin() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&admin_db_url(), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL must run (STAMPEDE_TEST_DATABASE_URL): {e}"));
    tokio::spawn(conn);
    client
}

async fn drop_database(name: &str) -> Result<(), String> {
    admin()
        .await
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .map_err(|e| format!("dropping database {name}: {e}"))
}

/// `PgStore` on a database of its own (`stampede_c` and 12 hex digits),
/// migrated, its statements prepared (the default).
pub async fn pg_store() -> Fixture<StoreCx> {
    pg_store_with(StatementMode::Prepared).await
}

/// `PgStore` as [`pg_store`], every statement sent as the unnamed one with
/// its parameter types (`STAMPEDE_DATABASE_STATEMENTS=unnamed`, for
/// PgBouncer in transaction mode).
pub async fn pg_store_unnamed() -> Fixture<StoreCx> {
    pg_store_with(StatementMode::Unnamed).await
}

async fn pg_store_with(statements: StatementMode) -> Fixture<StoreCx> {
    let name = format!("stampede_c{}", unique());
    admin()
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = {
        let base = admin_db_url();
        let (head, _) = base.rsplit_once('/').unwrap();
        format!("{head}/{name}")
    };
    let opened = async {
        let store = PgStore::connect_with(&url, 4, statements)?;
        store.migrate().await?;
        Ok::<_, stampede_backends::Error>(store)
    }
    .await;
    let store = match opened {
        Ok(s) => s,
        Err(e) => {
            let _ = drop_database(&name).await;
            panic!("opening the PostgreSQL store: {e}");
        }
    };
    Fixture {
        cx: StoreCx {
            store: Arc::new(store),
            files: StoreFiles::Postgres { url },
        },
        cleanup: Cleanup::Database(name),
    }
}

/// `EmbeddedStore` in a data directory of its own, migrated.
pub async fn embedded_store() -> Fixture<StoreCx> {
    let dir = temp_dir();
    let opened = async {
        let lock = DataDirLock::acquire(&dir)?;
        let store = EmbeddedStore::open(&lock)?;
        store.migrate().await?;
        Ok::<_, stampede_backends::Error>(store)
    }
    .await;
    let store = match opened {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            panic!("opening the embedded store: {e}");
        }
    };
    Fixture {
        cx: StoreCx {
            store: Arc::new(store),
            files: StoreFiles::Sqlite {
                path: dir.join("store.db"),
            },
        },
        cleanup: Cleanup::Dir(dir),
    }
}

// ---------------------------------------------------------------- cache --

/// `RedisCache` on a key prefix of its own in `STAMPEDE_TEST_REDIS_URL`.
pub async fn redis_cache() -> Fixture<Arc<dyn Cache>> {
    let c = RedisCache::connect(&redis_url(), &format!("c{}", unique()))
        .await
        .unwrap_or_else(|e| panic!("Redis must run (STAMPEDE_TEST_REDIS_URL): {e}"));
    Fixture {
        cx: Arc::new(c.clone()),
        cleanup: Cleanup::Keys(c),
    }
}

/// A fresh `MemoryCache`.
pub async fn memory_cache() -> Fixture<Arc<dyn Cache>> {
    Fixture {
        cx: Arc::new(MemoryCache::new()),
        cleanup: Cleanup::Nothing,
    }
}
