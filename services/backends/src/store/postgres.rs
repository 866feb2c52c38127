//! The PostgreSQL store: a deadpool pool, versioned migrations applied under
//! an advisory lock (so several replicas starting at once apply them once).
//!
//! Long on purpose: one implementation of the whole [`Store`] trait (about
//! 40 methods), its queries beside the row mappers they share; split, one
//! schema's SQL would be spread over files.
//!
//! Every parameterised statement goes through [`Conn`], which states each
//! parameter's type once and sends it as [`StatementMode`] says: prepared
//! and cached per connection, or as the unnamed statement (for PgBouncer in
//! transaction mode).
use std::str::FromStr;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{NoTls, Row, Statement};

use crate::store::{
    like_containing, ActivityDelivery, ActorProfile, ActorRef, DeadLetter, DomainFootprint,
    DomainPolicy, Follower, HostCounts, HostHealth, Inserted, LocalActor, NewActivity, NewActor,
    NewDeadLetter, PolicyKind, PrivateKey, RemoteActor, RemoteKey, Skip, Store, StoredActivity,
    Totals, FOOTPRINT_KEYS,
};
use crate::{Error, Result};

/// Versioned migrations, applied in order; never edit one that has shipped.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../migrations/0001_initial.sql"),
    ),
    (
        2,
        "inbound",
        include_str!("../../migrations/0002_inbound.sql"),
    ),
    (3, "hosts", include_str!("../../migrations/0003_hosts.sql")),
    (
        4,
        "host_health",
        include_str!("../../migrations/0004_host_health.sql"),
    ),
    (
        5,
        "forget_unbound_documents",
        include_str!("../../migrations/0005_forget_unbound_documents.sql"),
    ),
    (
        6,
        "domain_policies",
        include_str!("../../migrations/0006_domain_policies.sql"),
    ),
    (
        7,
        "retention_indexes",
        include_str!("../../migrations/0007_retention_indexes.sql"),
    ),
    (
        8,
        "repair_activity_status",
        include_str!("../../migrations/0008_repair_activity_status.sql"),
    ),
    (
        9,
        "activity_status_indexes",
        include_str!("../../migrations/0009_activity_status_indexes.sql"),
    ),
    (
        10,
        "follower_digests",
        include_str!("../../migrations/0010_follower_digests.sql"),
    ),
];

/// Migrations run outside a transaction, each statement on its own
/// (`CREATE INDEX CONCURRENTLY` cannot run in one): while a transaction on
/// another connection holds the migration lock, so that still only one
/// process migrates. The rule for a new migration (README, "Upgrades"):
/// additive first, and never a long lock on a big table.
const CONCURRENT: &[i32] = &[7, 9];

/// How long a concurrent build may wait for a lock (for the transactions
/// older than it to end) before it fails, leaving the lock for another try:
/// a process of an older version waiting for the migration lock in a
/// statement would otherwise never let the build finish.
const CONCURRENT_LOCK_TIMEOUT: &str = "60s";

/// How often a process waiting for another's migrations asks for the lock.
const MIGRATION_LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// Rows a prune or purge deletes in one statement (one short transaction).
pub const PRUNE_BATCH: u32 = 1000;

/// The first key of the advisory locks that order a first computation of
/// an actor's follower digests after the follows in flight (the second is
/// the actor id modulo [`DIGEST_LOCKS`]); the same constants as the
/// trigger of migration 10.
const DIGEST_LOCK: i32 = 1_718_903_910;
/// How many advisory locks the actors' follower digests are spread over.
const DIGEST_LOCKS: i64 = 64;

/// A digest as PostgreSQL's `bit(256)` text (`0101…`).
fn digest_bits(d: &stampede_core::followers_sync::Digest) -> String {
    d.0.iter().map(|b| format!("{b:08b}")).collect()
}

/// A digest from PostgreSQL's `bit(256)` text.
fn digest_from_bits(bits: &str) -> Result<stampede_core::followers_sync::Digest> {
    let bad = || Error::Db(format!("stored follower digest is corrupt: {bits:?}"));
    if bits.len() != 256 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, chunk) in bits.as_bytes().chunks(8).enumerate() {
        let s = std::str::from_utf8(chunk).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(s, 2).map_err(|_| bad())?;
    }
    Ok(stampede_core::followers_sync::Digest(out))
}

/// Arbitrary constant naming stampede's migration advisory lock.
const MIGRATION_LOCK: i64 = 0x5354_414d_5045_4445;

/// How statements are sent to PostgreSQL (`STAMPEDE_DATABASE_STATEMENTS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StatementMode {
    /// `prepared` (the default): each statement prepared once per
    /// connection (named, cached), then only bound and executed. Fastest,
    /// but needs a session of its own: not behind PgBouncer in transaction
    /// mode before 1.21.
    #[default]
    Prepared,
    /// `unnamed`: each statement parsed, bound and executed as the unnamed
    /// statement in one round trip, its parameter types sent along. Works
    /// behind any PgBouncer (nothing is kept across transactions).
    Unnamed,
}

impl StatementMode {
    /// The setting's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            StatementMode::Prepared => "prepared",
            StatementMode::Unnamed => "unnamed",
        }
    }
}

impl FromStr for StatementMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "prepared" => Ok(StatementMode::Prepared),
            "unnamed" => Ok(StatementMode::Unnamed),
            other => Err(format!("`{other}`: want `prepared` or `unnamed`")),
        }
    }
}

/// A statement parameter and its PostgreSQL type.
type Param<'a> = (&'a (dyn ToSql + Sync), Type);

/// What a statement runs on: a pooled connection or a transaction on one.
#[derive(Clone, Copy)]
enum On<'a> {
    Client(&'a deadpool_postgres::Client),
    Tx(&'a deadpool_postgres::Transaction<'a>),
}

/// A connection (or transaction) and how to send statements on it.
#[derive(Clone, Copy)]
struct Conn<'a> {
    on: On<'a>,
    mode: StatementMode,
}

fn values<'p>(params: &'p [Param<'p>]) -> Vec<&'p (dyn ToSql + Sync)> {
    params.iter().map(|(v, _)| *v).collect()
}

impl Conn<'_> {
    /// `sql` prepared with `params`' types, from the connection's cache.
    async fn prepared(&self, sql: &str, params: &[Param<'_>]) -> Result<Statement> {
        let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
        Ok(match self.on {
            On::Client(c) => c.prepare_typed_cached(sql, &types).await?,
            On::Tx(t) => t.prepare_typed_cached(sql, &types).await?,
        })
    }

    /// Runs `sql`, returning the rows it affected.
    async fn execute(&self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        Ok(match self.mode {
            StatementMode::Prepared => {
                let stmt = self.prepared(sql, params).await?;
                match self.on {
                    On::Client(c) => c.execute(&stmt, &values(params)).await?,
                    On::Tx(t) => t.execute(&stmt, &values(params)).await?,
                }
            }
            StatementMode::Unnamed => match self.on {
                On::Client(c) => c.execute_typed(sql, params).await?,
                On::Tx(t) => t.execute_typed(sql, params).await?,
            },
        })
    }

    /// Runs `sql`, returning its rows.
    async fn query(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>> {
        Ok(match self.mode {
            StatementMode::Prepared => {
                let stmt = self.prepared(sql, params).await?;
                match self.on {
                    On::Client(c) => c.query(&stmt, &values(params)).await?,
                    On::Tx(t) => t.query(&stmt, &values(params)).await?,
                }
            }
            StatementMode::Unnamed => match self.on {
                On::Client(c) => c.query_typed(sql, params).await?,
                On::Tx(t) => t.query_typed(sql, params).await?,
            },
        })
    }

    /// Runs `sql`, returning its one row (an error if there are more or none).
    async fn query_one(&self, sql: &str, params: &[Param<'_>]) -> Result<Row> {
        let mut rows = self.query(sql, params).await?;
        match (rows.len(), rows.pop()) {
            (1, Some(row)) => Ok(row),
            (n, _) => Err(Error::Db(format!("expected one row, got {n} ({sql})"))),
        }
    }

    /// Runs `sql`, returning its row if any (an error if there are more).
    async fn query_opt(&self, sql: &str, params: &[Param<'_>]) -> Result<Option<Row>> {
        let mut rows = self.query(sql, params).await?;
        if rows.len() > 1 {
            return Err(Error::Db(format!(
                "expected at most one row, got {} ({sql})",
                rows.len()
            )));
        }
        Ok(rows.pop())
    }
}

/// The PostgreSQL implementation of [`Store`].
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    statements: StatementMode,
    /// Where the pool connects: migrations run outside a transaction open
    /// a connection of their own, beside the pooled one holding the lock.
    pg: tokio_postgres::Config,
}

impl PgStore {
    /// Builds a pool for `url` (connections are opened lazily), statements
    /// prepared.
    pub fn connect(url: &str, max_size: usize) -> Result<Self> {
        Self::connect_with(url, max_size, StatementMode::Prepared)
    }

    /// Builds a pool for `url` (connections are opened lazily), statements
    /// sent as `statements` says.
    pub fn connect_with(url: &str, max_size: usize, statements: StatementMode) -> Result<Self> {
        let pg = tokio_postgres::Config::from_str(url).map_err(|e| Error::Config {
            var: "STAMPEDE_DATABASE_URL",
            reason: e.to_string(),
        })?;
        let mgr = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(max_size)
            .build()
            .map_err(|e| Error::Db(e.to_string()))?;
        Ok(Self {
            pool,
            statements,
            pg,
        })
    }

    /// How this store sends statements.
    pub fn statement_mode(&self) -> StatementMode {
        self.statements
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        Ok(self.pool.get().await?)
    }

    /// Statements on the pooled connection `c`.
    fn on<'a>(&self, c: &'a deadpool_postgres::Client) -> Conn<'a> {
        Conn {
            on: On::Client(c),
            mode: self.statements,
        }
    }

    /// Statements in the transaction `t`.
    fn in_tx<'a>(&self, t: &'a deadpool_postgres::Transaction<'a>) -> Conn<'a> {
        Conn {
            on: On::Tx(t),
            mode: self.statements,
        }
    }

    /// Runs a [`CONCURRENT`] migration's statements one by one, each in
    /// its own implicit transaction, on a connection of their own (not the
    /// pool's: a pool of one holds the lock's).
    async fn run_outside_transaction(&self, sql: &str) -> Result<()> {
        let (client, conn) = self.pg.connect(NoTls).await?;
        let conn = tokio::spawn(conn);
        // Behind PgBouncer in transaction mode (`unnamed`) a session setting
        // would stay on a server connection another client gets next.
        let result = async {
            if self.statements == StatementMode::Prepared {
                client
                    .batch_execute(&format!("SET lock_timeout = '{CONCURRENT_LOCK_TIMEOUT}'"))
                    .await?;
            }
            for statement in statements(sql) {
                client.batch_execute(statement).await?;
            }
            Ok(())
        }
        .await;
        drop(client);
        let _ = conn.await;
        result
    }
}

/// The first column of each row of a simple query's answer, as text.
fn first_column(messages: &[tokio_postgres::SimpleQueryMessage]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect()
}

/// The statements of a migration file: split at each `;` that ends a line,
/// comment lines dropped.
fn statements(sql: &str) -> impl Iterator<Item = &str> {
    sql.split(";\n").map(str::trim).filter(|s| {
        s.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
    })
}

fn actor_from_row(r: &tokio_postgres::Row) -> LocalActor {
    LocalActor {
        id: r.get("id"),
        name: r.get("name"),
        display_name: r.get("display_name"),
        summary: r.get("summary"),
        manually_approves_followers: r.get("manually_approves"),
        private_key: PrivateKey(r.get("private_key")),
        public_key_pem: r.get("public_key_pem"),
    }
}

const DEAD_LETTER_SELECT: &str =
    "SELECT d.id, a.ap_id, d.activity_key, d.inbox, d.host, d.reason, d.last_status, d.attempts,
            (extract(epoch FROM d.first_attempt_at) * 1000)::int8,
            (extract(epoch FROM d.last_attempt_at) * 1000)::int8
     FROM dead_letters d JOIN activities a ON a.key = d.activity_key";

fn dead_letter_from_row(r: &tokio_postgres::Row) -> DeadLetter {
    DeadLetter {
        id: r.get(0),
        activity_id: r.get(1),
        activity_key: r.get(2),
        inbox: r.get(3),
        host: r.get(4),
        reason: r.get(5),
        last_status: r.get::<_, Option<i32>>(6).map(|s| s as u16),
        attempts: r.get::<_, i32>(7) as u32,
        first_attempt_unix_ms: r.get(8),
        last_attempt_unix_ms: r.get(9),
    }
}

const ACTOR_COLUMNS: &str =
    "id, name, display_name, summary, manually_approves, private_key, public_key_pem";

#[async_trait]
impl Store for PgStore {
    async fn migrate(&self) -> Result<()> {
        // The lock is polled for, a short transaction each time, never
        // waited for in a statement: a `CREATE INDEX CONCURRENTLY` run by
        // the holder waits for every transaction with an older snapshot to
        // end, a waiting statement's included, which would wait for ever.
        //
        // The lock holder's own transaction must hold no snapshot either:
        // it reads through the simple query protocol only (an extended
        // query's portal stays open until the next one, its snapshot with
        // it).
        loop {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let c = self.in_tx(&tx);
            let held = first_column(
                &tx.simple_query(&format!(
                    "SELECT pg_try_advisory_xact_lock({MIGRATION_LOCK})"
                ))
                .await?,
            );
            if held.first().map(String::as_str) != Some("t") {
                tx.rollback().await?;
                tokio::time::sleep(MIGRATION_LOCK_POLL).await;
                continue;
            }
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS stampede_migrations (
                    version INTEGER PRIMARY KEY,
                    name TEXT NOT NULL,
                    applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            )
            .await?;
            let applied: Vec<i32> = first_column(
                &tx.simple_query("SELECT version FROM stampede_migrations")
                    .await?,
            )
            .iter()
            .filter_map(|v| v.parse().ok())
            .collect();
            let pending: Vec<&(i32, &str, &str)> = MIGRATIONS
                .iter()
                .filter(|m| !applied.contains(&m.0))
                .collect();
            let Some(&&(version, name, sql)) = pending.first() else {
                tx.commit().await?;
                return Ok(());
            };
            if CONCURRENT.contains(&version) {
                tracing::info!(version, name, "applying migration outside a transaction");
                self.run_outside_transaction(sql).await?;
                c.execute(
                    "INSERT INTO stampede_migrations (version, name) VALUES ($1, $2)",
                    &[(&version, Type::INT4), (&name, Type::TEXT)],
                )
                .await?;
            } else {
                // Every transactional migration up to the next concurrent
                // one, in this transaction; committed before a concurrent
                // one starts (it could not see their tables otherwise).
                for &&(version, name, sql) in
                    pending.iter().take_while(|m| !CONCURRENT.contains(&m.0))
                {
                    tracing::info!(version, name, "applying migration");
                    tx.batch_execute(sql).await?;
                    c.execute(
                        "INSERT INTO stampede_migrations (version, name) VALUES ($1, $2)",
                        &[(&version, Type::INT4), (&name, Type::TEXT)],
                    )
                    .await?;
                }
            }
            tx.commit().await?;
        }
    }

    async fn ping(&self) -> Result<()> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    async fn create_actor(&self, a: NewActor) -> Result<LocalActor> {
        let c = self.client().await?;
        let c = self.on(&c);
        let row = c
            .query_one(
                &format!(
                    "INSERT INTO actors (name, display_name, summary, manually_approves, private_key, public_key_pem)
                     VALUES ($1, $2, $3, $4, $5, $6) RETURNING {ACTOR_COLUMNS}"
                ),
                &[
                    (&a.name, Type::TEXT),
                    (&a.display_name, Type::TEXT),
                    (&a.summary, Type::TEXT),
                    (&a.manually_approves_followers, Type::BOOL),
                    (&a.private_key.0, Type::BYTEA),
                    (&a.public_key_pem, Type::TEXT),
                ],
            )
            .await
            .map_err(|e| match e {
                Error::Conflict(_) => Error::Conflict(format!("actor `{}` exists already", a.name)),
                e => e,
            })?;
        Ok(actor_from_row(&row))
    }

    async fn ensure_actor(&self, a: NewActor) -> Result<LocalActor> {
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "INSERT INTO actors (name, display_name, summary, manually_approves, private_key, public_key_pem)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
            &[
                (&a.name, Type::TEXT),
                (&a.display_name, Type::TEXT),
                (&a.summary, Type::TEXT),
                (&a.manually_approves_followers, Type::BOOL),
                (&a.private_key.0, Type::BYTEA),
                (&a.public_key_pem, Type::TEXT),
            ],
        )
        .await?;
        let row = c
            .query_one(
                &format!("SELECT {ACTOR_COLUMNS} FROM actors WHERE name = $1"),
                &[(&a.name, Type::TEXT)],
            )
            .await?;
        Ok(actor_from_row(&row))
    }

    async fn actor_count(&self) -> Result<u64> {
        let c = self.client().await?;
        let c = self.on(&c);
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM actors WHERE name NOT LIKE '\\_%'",
                &[],
            )
            .await?
            .get(0);
        Ok(n as u64)
    }

    async fn actor_by_name(&self, name: &str) -> Result<Option<LocalActor>> {
        let c = self.client().await?;
        let c = self.on(&c);
        Ok(c.query_opt(
            &format!("SELECT {ACTOR_COLUMNS} FROM actors WHERE name = $1"),
            &[(&name, Type::TEXT)],
        )
        .await?
        .as_ref()
        .map(actor_from_row))
    }

    async fn actor_by_id(&self, id: i64) -> Result<Option<LocalActor>> {
        let c = self.client().await?;
        let c = self.on(&c);
        Ok(c.query_opt(
            &format!("SELECT {ACTOR_COLUMNS} FROM actors WHERE id = $1"),
            &[(&id, Type::INT8)],
        )
        .await?
        .as_ref()
        .map(actor_from_row))
    }

    async fn actor_ref_by_name(&self, name: &str) -> Result<Option<ActorRef>> {
        let c = self.client().await?;
        let c = self.on(&c);
        Ok(c.query_opt(
            "SELECT id, manually_approves FROM actors WHERE name = $1",
            &[(&name, Type::TEXT)],
        )
        .await?
        .map(|r| ActorRef {
            id: r.get(0),
            name: name.to_string(),
            manually_approves_followers: r.get(1),
        }))
    }

    async fn actor_profile_by_name(&self, name: &str) -> Result<Option<ActorProfile>> {
        let c = self.client().await?;
        let c = self.on(&c);
        Ok(c.query_opt(
            "SELECT id, display_name, summary, manually_approves, public_key_pem
             FROM actors WHERE name = $1",
            &[(&name, Type::TEXT)],
        )
        .await?
        .map(|r| ActorProfile {
            id: r.get(0),
            name: name.to_string(),
            display_name: r.get(1),
            summary: r.get(2),
            manually_approves_followers: r.get(3),
            public_key_pem: r.get(4),
        }))
    }

    async fn delete_actor(&self, name: &str) -> Result<bool> {
        let c = self.client().await?;
        let c = self.on(&c);
        // Followers, follow requests, activities and their records go with
        // it (ON DELETE CASCADE).
        let n = c
            .execute("DELETE FROM actors WHERE name = $1", &[(&name, Type::TEXT)])
            .await?;
        Ok(n > 0)
    }

    async fn add_follower(&self, actor_id: i64, f: &Follower) -> Result<()> {
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "INSERT INTO followers (actor_id, follower, inbox, shared_inbox, host, follow_id)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (actor_id, follower) DO UPDATE
             SET inbox = EXCLUDED.inbox, shared_inbox = EXCLUDED.shared_inbox, host = EXCLUDED.host,
                 follow_id = COALESCE(EXCLUDED.follow_id, followers.follow_id)",
            &[
                (&actor_id, Type::INT8),
                (&f.actor, Type::TEXT),
                (&f.inbox, Type::TEXT),
                (&f.shared_inbox, Type::TEXT),
                (&f.host, Type::TEXT),
                (&f.follow_id, Type::TEXT),
            ],
        )
        .await?;
        Ok(())
    }

    async fn add_followers(&self, actor_id: i64, followers: &[Follower]) -> Result<()> {
        let c = self.client().await?;
        let c = self.on(&c);
        for chunk in followers.chunks(5000) {
            let actors: Vec<&str> = chunk.iter().map(|f| f.actor.as_str()).collect();
            let inboxes: Vec<&str> = chunk.iter().map(|f| f.inbox.as_str()).collect();
            let shared: Vec<Option<&str>> =
                chunk.iter().map(|f| f.shared_inbox.as_deref()).collect();
            let hosts: Vec<&str> = chunk.iter().map(|f| f.host.as_str()).collect();
            let follow_ids: Vec<Option<&str>> =
                chunk.iter().map(|f| f.follow_id.as_deref()).collect();
            c.execute(
                "INSERT INTO followers (actor_id, follower, inbox, shared_inbox, host, follow_id)
                 SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
                 ON CONFLICT (actor_id, follower) DO NOTHING",
                &[
                    (&actor_id, Type::INT8),
                    (&actors, Type::TEXT_ARRAY),
                    (&inboxes, Type::TEXT_ARRAY),
                    (&shared, Type::TEXT_ARRAY),
                    (&hosts, Type::TEXT_ARRAY),
                    (&follow_ids, Type::TEXT_ARRAY),
                ],
            )
            .await?;
        }
        Ok(())
    }

    async fn remove_follower(&self, actor_id: i64, follower: &str) -> Result<bool> {
        let c = self.client().await?;
        let c = self.on(&c);
        let n = c
            .execute(
                "DELETE FROM followers WHERE actor_id = $1 AND follower = $2",
                &[(&actor_id, Type::INT8), (&follower, Type::TEXT)],
            )
            .await?;
        Ok(n > 0)
    }

    async fn remove_follow_by_id(&self, follower: &str, follow_id: &str) -> Result<u64> {
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "DELETE FROM followers WHERE follower = $1 AND follow_id = $2",
            &[(&follower, Type::TEXT), (&follow_id, Type::TEXT)],
        )
        .await
    }

    async fn remove_followers_by_inbox(&self, inbox: &str) -> Result<u64> {
        let c = self.client().await?;
        let c = self.on(&c);
        let n = c
            .execute(
                "DELETE FROM followers WHERE inbox = $1 OR shared_inbox = $1",
                &[(&inbox, Type::TEXT)],
            )
            .await?;
        c.execute(
            "DELETE FROM remote_actors WHERE inbox = $1",
            &[(&inbox, Type::TEXT)],
        )
        .await?;
        Ok(n)
    }

    async fn remove_follower_everywhere(&self, follower: &str) -> Result<u64> {
        let c = self.client().await?;
        let c = self.on(&c);
        let n = c
            .execute(
                "DELETE FROM followers WHERE follower = $1",
                &[(&follower, Type::TEXT)],
            )
            .await?;
        c.execute(
            "DELETE FROM follow_requests WHERE follower = $1",
            &[(&follower, Type::TEXT)],
        )
        .await?;
        Ok(n)
    }

    async fn update_follower_inboxes(
        &self,
        follower: &str,
        inbox: &str,
        shared_inbox: Option<&str>,
        host: &str,
    ) -> Result<u64> {
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "UPDATE followers SET inbox = $2, shared_inbox = $3, host = $4 WHERE follower = $1",
            &[
                (&follower, Type::TEXT),
                (&inbox, Type::TEXT),
                (&shared_inbox, Type::TEXT),
                (&host, Type::TEXT),
            ],
        )
        .await
    }

    async fn add_follow_request(
        &self,
        actor_id: i64,
        f: &Follower,
        follow: &serde_json::Value,
    ) -> Result<()> {
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "INSERT INTO follow_requests (actor_id, follower, inbox, shared_inbox, host, follow)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (actor_id, follower) DO UPDATE SET follow = EXCLUDED.follow,
               inbox = EXCLUDED.inbox, shared_inbox = EXCLUDED.shared_inbox, host = EXCLUDED.host",
            &[
                (&actor_id, Type::INT8),
                (&f.actor, Type::TEXT),
                (&f.inbox, Type::TEXT),
                (&f.shared_inbox, Type::TEXT),
                (&f.host, Type::TEXT),
                (follow, Type::JSONB),
            ],
        )
        .await?;
        Ok(())
    }

    async fn take_follow_request(
        &self,
        actor_id: i64,
        follower: &str,
    ) -> Result<Option<(Follower, serde_json::Value)>> {
        let c = self.client().await?;
        let c = self.on(&c);
        let row = c
            .query_opt(
                "DELETE FROM follow_requests WHERE actor_id = $1 AND follower = $2
                 RETURNING follower, inbox, shared_inbox, host, follow",
                &[(&actor_id, Type::INT8), (&follower, Type::TEXT)],
            )
            .await?;
        Ok(row.map(|r| {
            let follow: serde_json::Value = r.get(4);
            (
                Follower {
                    actor: r.get(0),
                    inbox: r.get(1),
                    shared_inbox: r.get(2),
                    host: r.get(3),
                    follow_id: follow
                        .get("id")
                        .and_then(|v| v.as_str())
                        .map(str::to_string),
                },
                follow,
            )
        }))
    }

    async fn follower_count(&self, actor_id: i64) -> Result<u64> {
        let c = self.client().await?;
        let c = self.on(&c);
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM followers WHERE actor_id = $1",
                &[(&actor_id, Type::INT8)],
            )
            .await?
            .get(0);
        Ok(n as u64)
    }

    async fn follower_targets(
        &self,
        actor_id: i64,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>> {
        let c = self.client().await?;
        let c = self.on(&c);
        let rows = c
            .query(
                "SELECT DISTINCT target FROM followers
                 WHERE actor_id = $1 AND target > $2
                 ORDER BY target LIMIT $3",
                &[
                    (&actor_id, Type::INT8),
                    (&after.unwrap_or(""), Type::TEXT),
                    (&i64::from(limit), Type::INT8),
                ],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn follower_ids(
        &self,
        actor_id: i64,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>> {
        let c = self.client().await?;
        let c = self.on(&c);
        // The primary key (actor_id, follower) orders and bounds the scan;
        // the prefix only filters it.
        let rows = c
            .query(
                "SELECT follower FROM followers
                 WHERE actor_id = $1 AND follower > $2 AND starts_with(follower, $3)
                 ORDER BY follower LIMIT $4",
                &[
                    (&actor_id, Type::INT8),
                    (&after.unwrap_or(""), Type::TEXT),
                    (&prefix, Type::TEXT),
                    (&i64::from(limit), Type::INT8),
                ],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn follower_digests(
        &self,
        actor_id: i64,
        authorities: &[String],
    ) -> Result<Vec<stampede_core::followers_sync::Digest>> {
        use stampede_core::followers_sync::{authority_of, Digest};
        // '' is the mark that the actor's digests are kept.
        let mut wanted: Vec<&str> = authorities.iter().map(String::as_str).collect();
        wanted.push("");
        let read = |rows: Vec<Row>| -> Result<Option<std::collections::HashMap<String, Digest>>> {
            let mut found = std::collections::HashMap::new();
            let mut marked = false;
            for r in rows {
                let authority: String = r.get(0);
                if authority.is_empty() {
                    marked = true;
                } else {
                    found.insert(authority, digest_from_bits(r.get::<_, &str>(1))?);
                }
            }
            Ok(marked.then_some(found))
        };
        let select = "SELECT authority, digest::text FROM follower_digests
                      WHERE actor_id = $1 AND authority = ANY($2)";
        let found = {
            let client = self.client().await?;
            let c = self.on(&client);
            let rows = c
                .query(
                    select,
                    &[(&actor_id, Type::INT8), (&wanted, Type::TEXT_ARRAY)],
                )
                .await?;
            read(rows)?
        };
        let found = match found {
            Some(f) => f,
            None => {
                // First use: every follow of the actor in flight ends before
                // the read (their triggers hold the lock shared), and every
                // later one finds the mark and updates what is stored here.
                let mut client = self.client().await?;
                let tx = client.transaction().await?;
                let c = self.in_tx(&tx);
                c.execute(
                    "SELECT pg_advisory_xact_lock($1, ($2 % $3)::int)",
                    &[
                        (&DIGEST_LOCK, Type::INT4),
                        (&actor_id, Type::INT8),
                        (&DIGEST_LOCKS, Type::INT8),
                    ],
                )
                .await?;
                let marked = c
                    .query_opt(
                        "SELECT 1 FROM follower_digests WHERE actor_id = $1 AND authority = ''",
                        &[(&actor_id, Type::INT8)],
                    )
                    .await?
                    .is_some();
                if !marked {
                    let rows = c
                        .query(
                            "SELECT follower FROM followers WHERE actor_id = $1",
                            &[(&actor_id, Type::INT8)],
                        )
                        .await?;
                    let mut all: std::collections::HashMap<String, (Digest, i64)> =
                        std::collections::HashMap::new();
                    for r in &rows {
                        let id: &str = r.get(0);
                        if let Some(a) = authority_of(id) {
                            let e = all.entry(a.to_string()).or_default();
                            e.0.toggle(id);
                            e.1 += 1;
                        }
                    }
                    all.insert(String::new(), (Digest::default(), 0));
                    let (names, rest): (Vec<String>, Vec<(Digest, i64)>) = all.into_iter().unzip();
                    let bits: Vec<String> = rest.iter().map(|(d, _)| digest_bits(d)).collect();
                    let counts: Vec<i64> = rest.iter().map(|(_, n)| *n).collect();
                    c.execute(
                        "INSERT INTO follower_digests (actor_id, authority, digest, followers)
                         SELECT $1, a, d::bit(256), n FROM UNNEST($2::text[], $3::text[], $4::int8[]) AS t(a, d, n)",
                        &[
                            (&actor_id, Type::INT8),
                            (&names, Type::TEXT_ARRAY),
                            (&bits, Type::TEXT_ARRAY),
                            (&counts, Type::INT8_ARRAY),
                        ],
                    )
                    .await?;
                }
                let rows = c
                    .query(
                        select,
                        &[(&actor_id, Type::INT8), (&wanted, Type::TEXT_ARRAY)],
                    )
                    .await?;
                let found = read(rows)?;
                tx.commit().await?;
                found.ok_or_else(|| {
                    Error::Db(format!("follower digests of actor {actor_id} not stored"))
                })?
            }
        };
        Ok(authorities
            .iter()
            .map(|a| found.get(a).copied().unwrap_or_default())
            .collect())
    }

    async fn remote_actor(&self, id: &str) -> Result<Option<RemoteActor>> {
        let c = self.client().await?;
        let c = self.on(&c);
        Ok(c
            .query_opt(
                "SELECT id, inbox, shared_inbox, key_id, public_key_pem FROM remote_actors WHERE id = $1",
                &[(&id, Type::TEXT)],
            )
            .await?
            .map(|r| RemoteActor {
                id: r.get(0),
                inbox: r.get(1),
                shared_inbox: r.get(2),
                key_id: r.get(3),
                public_key_pem: r.get(4),
            }))
    }

    async fn put_remote_actor(&self, a: &RemoteActor) -> Result<()> {
        let host = stampede_core::targets::inbox_host(&a.inbox).unwrap_or_default();
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "INSERT INTO remote_actors (id, inbox, shared_inbox, key_id, public_key_pem, host)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET inbox = EXCLUDED.inbox,
               shared_inbox = EXCLUDED.shared_inbox, key_id = EXCLUDED.key_id,
               public_key_pem = EXCLUDED.public_key_pem, host = EXCLUDED.host, fetched_at = now()",
            &[
                (&a.id, Type::TEXT),
                (&a.inbox, Type::TEXT),
                (&a.shared_inbox, Type::TEXT),
                (&a.key_id, Type::TEXT),
                (&a.public_key_pem, Type::TEXT),
                (&host, Type::TEXT),
            ],
        )
        .await?;
        Ok(())
    }

    async fn delete_remote_actor(&self, id: &str) -> Result<()> {
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "DELETE FROM remote_actors WHERE id = $1",
            &[(&id, Type::TEXT)],
        )
        .await?;
        Ok(())
    }

    async fn remote_key(&self, key_id: &str) -> Result<Option<RemoteKey>> {
        let c = self.client().await?;
        let c = self.on(&c);
        Ok(c.query_opt(
            "SELECT key_id, owner, public_key_pem FROM remote_keys WHERE key_id = $1",
            &[(&key_id, Type::TEXT)],
        )
        .await?
        .map(|r| RemoteKey {
            key_id: r.get(0),
            owner: r.get(1),
            public_key_pem: r.get(2),
        }))
    }

    async fn put_remote_key(&self, k: &RemoteKey) -> Result<()> {
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "INSERT INTO remote_keys (key_id, owner, public_key_pem) VALUES ($1, $2, $3)
             ON CONFLICT (key_id) DO UPDATE SET owner = EXCLUDED.owner,
               public_key_pem = EXCLUDED.public_key_pem, fetched_at = now()",
            &[
                (&k.key_id, Type::TEXT),
                (&k.owner, Type::TEXT),
                (&k.public_key_pem, Type::TEXT),
            ],
        )
        .await?;
        Ok(())
    }

    async fn delete_remote_keys_of(&self, owner: &str) -> Result<()> {
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "DELETE FROM remote_keys WHERE owner = $1",
            &[(&owner, Type::TEXT)],
        )
        .await?;
        Ok(())
    }

    async fn insert_activity(&self, a: NewActivity) -> Result<Inserted> {
        let c = self.client().await?;
        let c = self.on(&c);
        let row = c
            .query_opt(
                "INSERT INTO activities (key, ap_id, actor_id, kind, object_id, idempotency_key, body, delivered_body)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (actor_id, idempotency_key) DO NOTHING
                 RETURNING key",
                &[
                    (&a.key, Type::TEXT),
                    (&a.ap_id, Type::TEXT),
                    (&a.actor_id, Type::INT8),
                    (&a.kind, Type::TEXT),
                    (&a.object_id, Type::TEXT),
                    (&a.idempotency_key, Type::TEXT),
                    (&a.body, Type::JSONB),
                    (&a.delivered_body, Type::BYTEA),
                ],
            )
            .await?;
        if row.is_some() {
            return Ok(Inserted {
                key: a.key,
                ap_id: a.ap_id,
                created: true,
                enqueued: false,
            });
        }
        let r = c
            .query_one(
                "SELECT key, ap_id, enqueued_at IS NOT NULL FROM activities
                 WHERE actor_id = $1 AND idempotency_key = $2",
                &[(&a.actor_id, Type::INT8), (&a.idempotency_key, Type::TEXT)],
            )
            .await?;
        Ok(Inserted {
            key: r.get(0),
            ap_id: r.get(1),
            created: false,
            enqueued: r.get(2),
        })
    }

    async fn mark_enqueued(&self, key: &str) -> Result<()> {
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "UPDATE activities SET enqueued_at = now() WHERE key = $1 AND enqueued_at IS NULL",
            &[(&key, Type::TEXT)],
        )
        .await?;
        Ok(())
    }

    async fn mark_fanned_out(&self, key: &str, targets: u64) -> Result<()> {
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "UPDATE activities SET fanned_out_at = now(), targets = $2 WHERE key = $1",
            &[(&key, Type::TEXT), (&(targets as i64), Type::INT8)],
        )
        .await?;
        Ok(())
    }

    async fn activity_count(&self, actor_id: i64) -> Result<u64> {
        let c = self.client().await?;
        let c = self.on(&c);
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM activities WHERE actor_id = $1",
                &[(&actor_id, Type::INT8)],
            )
            .await?
            .get(0);
        Ok(n as u64)
    }

    async fn activity(&self, key: &str) -> Result<Option<StoredActivity>> {
        let c = self.client().await?;
        let c = self.on(&c);
        Ok(c.query_opt(
            "SELECT a.key, a.ap_id, a.kind, a.actor_id, u.name, a.body, a.delivered_body
                 FROM activities a JOIN actors u ON u.id = a.actor_id WHERE a.key = $1",
            &[(&key, Type::TEXT)],
        )
        .await?
        .map(|r| StoredActivity {
            key: r.get(0),
            ap_id: r.get(1),
            kind: r.get(2),
            actor_id: r.get(3),
            actor_name: r.get(4),
            body: r.get(5),
            delivered_body: r.get(6),
        }))
    }

    async fn delivered(&self, activity_key: &str, inbox: &str) -> Result<bool> {
        let c = self.client().await?;
        let c = self.on(&c);
        Ok(c.query_opt(
            "SELECT 1 FROM deliveries WHERE activity_key = $1 AND inbox = $2",
            &[(&activity_key, Type::TEXT), (&inbox, Type::TEXT)],
        )
        .await?
        .is_some())
    }

    async fn record_delivered(
        &self,
        activity_key: &str,
        inbox: &str,
        host: &str,
        status: u16,
        attempts: u32,
    ) -> Result<()> {
        let c = self.client().await?;
        let c = self.on(&c);
        // Committed without waiting for the WAL flush (synchronous_commit
        // off for this statement's transaction only), as the embedded store
        // does: a PostgreSQL crash can lose only the newest records, whose
        // messages are then handed out again and re-sent at worst; our own
        // process dying loses nothing. One round trip, no fsync wait.
        c.execute(
            "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true))
             INSERT INTO deliveries (activity_key, inbox, host, status, attempts)
             SELECT $1, $2, $3, $4, $5 FROM relaxed ON CONFLICT DO NOTHING",
            &[
                (&activity_key, Type::TEXT),
                (&inbox, Type::TEXT),
                (&host, Type::TEXT),
                (&i32::from(status), Type::INT4),
                (&(attempts as i32), Type::INT4),
            ],
        )
        .await?;
        if attempts > 1 {
            c.execute(
                "DELETE FROM delivery_retries WHERE activity_key = $1 AND inbox = $2",
                &[(&activity_key, Type::TEXT), (&inbox, Type::TEXT)],
            )
            .await?;
        }
        Ok(())
    }

    async fn add_dead_letter(&self, d: NewDeadLetter) -> Result<()> {
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "DELETE FROM delivery_retries WHERE activity_key = $1 AND inbox = $2",
            &[(&d.activity_key, Type::TEXT), (&d.inbox, Type::TEXT)],
        )
        .await?;
        c.execute(
            "INSERT INTO dead_letters (activity_key, inbox, host, reason, last_status, attempts, first_attempt_at)
             VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7::float8 / 1000))",
            &[
                (&d.activity_key, Type::TEXT),
                (&d.inbox, Type::TEXT),
                (&d.host, Type::TEXT),
                (&d.reason, Type::TEXT),
                (&d.last_status.map(i32::from), Type::INT4),
                (&(d.attempts as i32), Type::INT4),
                (&(d.first_attempt_unix_ms as f64), Type::FLOAT8),
            ],
        )
        .await?;
        Ok(())
    }

    async fn dead_letters_to_replay(
        &self,
        id: Option<i64>,
        host: Option<&str>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>> {
        let c = self.client().await?;
        let c = self.on(&c);
        let rows = c
            .query(
                &format!(
                    "{DEAD_LETTER_SELECT}
                     WHERE d.replayed_at IS NULL AND ($1::int8 IS NULL OR d.id = $1)
                       AND ($2::text IS NULL OR d.host = $2)
                     ORDER BY d.id LIMIT $3"
                ),
                &[
                    (&id, Type::INT8),
                    (&host, Type::TEXT),
                    (&i64::from(limit), Type::INT8),
                ],
            )
            .await?;
        Ok(rows.iter().map(dead_letter_from_row).collect())
    }

    async fn mark_replayed(&self, ids: &[i64]) -> Result<()> {
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "UPDATE dead_letters SET replayed_at = now() WHERE id = ANY($1)",
            &[(&ids, Type::INT8_ARRAY)],
        )
        .await?;
        Ok(())
    }

    async fn dead_letters(&self, limit: u32, host: Option<&str>) -> Result<Vec<DeadLetter>> {
        let c = self.client().await?;
        let c = self.on(&c);
        let rows = c
            .query(
                &format!(
                    "{DEAD_LETTER_SELECT}
                     WHERE d.replayed_at IS NULL AND ($2::text IS NULL OR d.host = $2)
                     ORDER BY d.id DESC LIMIT $1"
                ),
                &[(&i64::from(limit), Type::INT8), (&host, Type::TEXT)],
            )
            .await?;
        Ok(rows.iter().map(dead_letter_from_row).collect())
    }

    async fn set_host_paused(&self, host: &str, paused: bool) -> Result<()> {
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "INSERT INTO hosts (host, paused) VALUES ($1, $2)
             ON CONFLICT (host) DO UPDATE SET paused = EXCLUDED.paused, updated_at = now()",
            &[(&host, Type::TEXT), (&paused, Type::BOOL)],
        )
        .await?;
        Ok(())
    }

    async fn paused_hosts(&self) -> Result<Vec<String>> {
        let c = self.client().await?;
        let c = self.on(&c);
        let rows = c
            .query("SELECT host FROM hosts WHERE paused ORDER BY host", &[])
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn set_host_health(&self, host: &str, h: Option<&HostHealth>) -> Result<()> {
        let c = self.client().await?;
        let c = self.on(&c);
        match h {
            Some(h) => {
                c.execute(
                    "INSERT INTO hosts (host, failing_since_ms, failures, open_until_ms, unavailable)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (host) DO UPDATE SET failing_since_ms = EXCLUDED.failing_since_ms,
                       failures = EXCLUDED.failures, open_until_ms = EXCLUDED.open_until_ms,
                       unavailable = EXCLUDED.unavailable, updated_at = now()",
                    &[
                        (&host, Type::TEXT),
                        (&h.failing_since_unix_ms, Type::INT8),
                        (&(h.failures as i64), Type::INT8),
                        (&h.open_until_unix_ms, Type::INT8),
                        (&h.unavailable, Type::BOOL),
                    ],
                )
                .await?;
            }
            None => {
                c.execute(
                    "UPDATE hosts SET failing_since_ms = NULL, failures = 0, open_until_ms = NULL,
                       unavailable = FALSE, updated_at = now()
                     WHERE host = $1 AND failing_since_ms IS NOT NULL",
                    &[(&host, Type::TEXT)],
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn failing_hosts(&self, limit: u32) -> Result<Vec<HostHealth>> {
        let c = self.client().await?;
        let c = self.on(&c);
        let rows = c
            .query(
                "SELECT host, failing_since_ms, failures, COALESCE(open_until_ms, 0), unavailable
                 FROM hosts WHERE failing_since_ms IS NOT NULL
                 ORDER BY failing_since_ms LIMIT $1",
                &[(&i64::from(limit), Type::INT8)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| HostHealth {
                host: r.get(0),
                failing_since_unix_ms: r.get(1),
                failures: r.get::<_, i64>(2) as u64,
                open_until_unix_ms: r.get(3),
                unavailable: r.get(4),
            })
            .collect())
    }

    async fn object_deleted(&self, actor_id: i64, object_id: &str) -> Result<bool> {
        let c = self.client().await?;
        let c = self.on(&c);
        Ok(c
            .query_opt(
                "SELECT 1 FROM activities WHERE actor_id = $1 AND object_id = $2 AND kind = 'Delete' LIMIT 1",
                &[(&actor_id, Type::INT8), (&object_id, Type::TEXT)],
            )
            .await?
            .is_some())
    }

    async fn totals(&self) -> Result<Totals> {
        let c = self.client().await?;
        let c = self.on(&c);
        let r = c
            .query_one(
                "SELECT (SELECT count(*) FROM activities),
                        (SELECT count(*) FROM deliveries),
                        (SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL)",
                &[],
            )
            .await?;
        Ok(Totals {
            activities: r.get::<_, i64>(0) as u64,
            delivered: r.get::<_, i64>(1) as u64,
            dead_letters: r.get::<_, i64>(2) as u64,
        })
    }

    async fn domain_policies(&self) -> Result<Vec<DomainPolicy>> {
        let c = self.client().await?;
        let c = self.on(&c);
        let rows = c
            .query(
                "SELECT domain, policy, reason, updated_ms FROM domain_policies ORDER BY domain",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let policy: String = r.get(1);
                Ok(DomainPolicy {
                    domain: r.get(0),
                    kind: PolicyKind::parse(&policy).ok_or_else(|| {
                        Error::Db(format!("unknown domain policy `{policy}` stored"))
                    })?,
                    reason: r.get(2),
                    updated_unix_ms: r.get(3),
                })
            })
            .collect()
    }

    async fn set_domain_policy(&self, p: &DomainPolicy) -> Result<()> {
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "INSERT INTO domain_policies (domain, policy, reason, updated_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (domain) DO UPDATE SET policy = EXCLUDED.policy,
                 reason = EXCLUDED.reason, updated_ms = EXCLUDED.updated_ms",
            &[
                (&p.domain, Type::TEXT),
                (&p.kind.as_str(), Type::TEXT),
                (&p.reason, Type::TEXT),
                (&p.updated_unix_ms, Type::INT8),
            ],
        )
        .await?;
        Ok(())
    }

    async fn remove_domain_policy(&self, domain: &str) -> Result<bool> {
        let c = self.client().await?;
        let c = self.on(&c);
        let n = c
            .execute(
                "DELETE FROM domain_policies WHERE domain = $1",
                &[(&domain, Type::TEXT)],
            )
            .await?;
        Ok(n > 0)
    }

    async fn seed_domain_policies(&self, seeds: &[DomainPolicy]) -> Result<u64> {
        if seeds.is_empty() {
            return Ok(0);
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let c = self.in_tx(&tx);
        let mut added = 0;
        for p in seeds {
            let new = c
                .execute(
                    "INSERT INTO domain_policy_seeds (domain) VALUES ($1) ON CONFLICT DO NOTHING",
                    &[(&p.domain, Type::TEXT)],
                )
                .await?;
            if new == 0 {
                continue;
            }
            added += c
                .execute(
                    "INSERT INTO domain_policies (domain, policy, reason, updated_ms)
                     VALUES ($1, $2, $3, $4) ON CONFLICT (domain) DO NOTHING",
                    &[
                        (&p.domain, Type::TEXT),
                        (&p.kind.as_str(), Type::TEXT),
                        (&p.reason, Type::TEXT),
                        (&p.updated_unix_ms, Type::INT8),
                    ],
                )
                .await?;
        }
        tx.commit().await?;
        Ok(added)
    }

    async fn record_fanout_page(
        &self,
        activity_key: &str,
        page: &str,
        per_host: &[(String, u64)],
        skips: &[Skip],
    ) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let c = self.in_tx(&tx);
        c.execute(
            "DELETE FROM activity_targets WHERE activity_key = $1 AND page = $2",
            &[(&activity_key, Type::TEXT), (&page, Type::TEXT)],
        )
        .await?;
        let hosts: Vec<&str> = per_host.iter().map(|(h, _)| h.as_str()).collect();
        let counts: Vec<i64> = per_host.iter().map(|(_, n)| *n as i64).collect();
        c.execute(
            "INSERT INTO activity_targets (activity_key, page, host, targets, at_ms)
             SELECT $1, $2, h, n, $5 FROM unnest($3::text[], $4::int8[]) AS t(h, n)",
            &[
                (&activity_key, Type::TEXT),
                (&page, Type::TEXT),
                (&hosts, Type::TEXT_ARRAY),
                (&counts, Type::INT8_ARRAY),
                (&crate::clock::now_ms(), Type::INT8),
            ],
        )
        .await?;
        if !skips.is_empty() {
            let inboxes: Vec<&str> = skips.iter().map(|k| k.inbox.as_str()).collect();
            let hosts: Vec<&str> = skips.iter().map(|k| k.host.as_str()).collect();
            let reasons: Vec<&str> = skips.iter().map(|k| k.reason).collect();
            let now = crate::clock::now_ms();
            c.execute(
                "INSERT INTO delivery_skips (activity_key, inbox, host, reason, at_ms)
                 SELECT $1, i, h, r, $5 FROM unnest($2::text[], $3::text[], $4::text[]) AS t(i, h, r)
                 ON CONFLICT DO NOTHING",
                &[
                    (&activity_key, Type::TEXT),
                    (&inboxes, Type::TEXT_ARRAY),
                    (&hosts, Type::TEXT_ARRAY),
                    (&reasons, Type::TEXT_ARRAY),
                    (&now, Type::INT8),
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn record_skip(&self, activity_key: &str, skip: &Skip) -> Result<()> {
        let c = self.client().await?;
        let c = self.on(&c);
        let now = crate::clock::now_ms();
        c.execute(
            "INSERT INTO delivery_skips (activity_key, inbox, host, reason, at_ms)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[
                (&activity_key, Type::TEXT),
                (&skip.inbox, Type::TEXT),
                (&skip.host, Type::TEXT),
                (&skip.reason, Type::TEXT),
                (&now, Type::INT8),
            ],
        )
        .await?;
        c.execute(
            "DELETE FROM delivery_retries WHERE activity_key = $1 AND inbox = $2",
            &[(&activity_key, Type::TEXT), (&skip.inbox, Type::TEXT)],
        )
        .await?;
        Ok(())
    }

    async fn record_retry(
        &self,
        activity_key: &str,
        inbox: &str,
        host: &str,
        attempts: u32,
        last_status: Option<u16>,
        next_unix_ms: i64,
    ) -> Result<()> {
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "INSERT INTO delivery_retries (activity_key, inbox, host, attempts, last_status, next_ms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (activity_key, inbox) DO UPDATE SET attempts = EXCLUDED.attempts,
                 last_status = EXCLUDED.last_status, next_ms = EXCLUDED.next_ms",
            &[
                (&activity_key, Type::TEXT),
                (&inbox, Type::TEXT),
                (&host, Type::TEXT),
                (&(attempts as i32), Type::INT4),
                (&last_status.map(i32::from), Type::INT4),
                (&next_unix_ms, Type::INT8),
            ],
        )
        .await?;
        Ok(())
    }

    async fn activity_delivery(&self, id: &str) -> Result<Option<ActivityDelivery>> {
        let c = self.client().await?;
        let c = self.on(&c);
        let Some(row) = c
            .query_opt(
                "SELECT key, ap_id, fanned_out_at IS NOT NULL FROM activities
                 WHERE ap_id = $1 OR key = $1 LIMIT 1",
                &[(&id, Type::TEXT)],
            )
            .await?
        else {
            return Ok(None);
        };
        let key: String = row.get(0);
        let k = [(&key as &(dyn ToSql + Sync), Type::TEXT)];
        let mut hosts = HostCounts::default();
        // (host, count) rows of one of the activity's tables.
        let k = &k;
        let counts = |sql: &'static str| async move {
            Ok::<_, crate::Error>(
                c.query(sql, k)
                    .await?
                    .iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
                    .collect::<Vec<_>>(),
            )
        };
        for (h, n) in counts(
            "SELECT host, SUM(targets)::int8 FROM activity_targets WHERE activity_key = $1 GROUP BY host",
        )
        .await?
        {
            hosts.get(h).targets = n;
        }
        for (h, n) in
            counts("SELECT host, count(*) FROM deliveries WHERE activity_key = $1 GROUP BY host")
                .await?
        {
            hosts.get(h).delivered = n;
        }
        for (h, n) in counts(
            "SELECT host, count(DISTINCT inbox) FROM dead_letters d
             WHERE activity_key = $1 AND replayed_at IS NULL
               AND NOT EXISTS (SELECT 1 FROM deliveries x WHERE x.activity_key = $1 AND x.inbox = d.inbox)
             GROUP BY host",
        )
        .await?
        {
            hosts.get(h).dead_lettered = n;
        }
        for (h, n) in counts(
            "SELECT host, count(*) FROM delivery_retries r
             WHERE activity_key = $1
               AND NOT EXISTS (SELECT 1 FROM deliveries x WHERE x.activity_key = $1 AND x.inbox = r.inbox)
               AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.activity_key = $1 AND d.inbox = r.inbox AND d.replayed_at IS NULL)
             GROUP BY host",
        )
        .await?
        {
            hosts.get(h).retrying = n;
        }
        for r in c
            .query(
                "SELECT host, reason, count(*) FROM delivery_skips WHERE activity_key = $1 GROUP BY host, reason",
                k,
            )
            .await?
        {
            hosts
                .get(r.get(0))
                .skipped
                .push((r.get(1), r.get::<_, i64>(2) as u64));
        }
        Ok(Some(ActivityDelivery {
            key,
            ap_id: row.get(1),
            fanned_out: row.get(2),
            hosts: hosts.done(),
        }))
    }

    async fn domain_footprint(&self, domain: &str) -> Result<DomainFootprint> {
        let c = self.client().await?;
        let c = self.on(&c);
        let like = like_containing(domain);
        let hosts = c
            .query(
                "SELECT host FROM followers WHERE host LIKE $1 ESCAPE '\\'
                 UNION SELECT host FROM follow_requests WHERE host LIKE $1 ESCAPE '\\'
                 UNION SELECT host FROM remote_actors WHERE host LIKE $1 ESCAPE '\\'",
                &[(&like, Type::TEXT)],
            )
            .await?;
        let limit = i64::from(FOOTPRINT_KEYS);
        let keys = c
            .query(
                "SELECT key_id FROM remote_keys WHERE key_id LIKE $1 ESCAPE '\\' LIMIT $2",
                &[(&like, Type::TEXT), (&limit, Type::INT8)],
            )
            .await?;
        Ok(DomainFootprint {
            hosts: hosts.iter().map(|r| r.get(0)).collect(),
            key_ids: keys.iter().map(|r| r.get(0)).collect(),
        })
    }

    async fn unavailable_hosts(&self, limit: u32) -> Result<Vec<String>> {
        let c = self.client().await?;
        let c = self.on(&c);
        let limit = i64::from(limit);
        let rows = c
            .query(
                "SELECT host FROM hosts WHERE unavailable ORDER BY failing_since_ms, host LIMIT $1",
                &[(&limit, Type::INT8)],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn mark_host_available(&self, host: &str) -> Result<bool> {
        let c = self.client().await?;
        let c = self.on(&c);
        let n = c
            .execute(
                "UPDATE hosts SET unavailable = FALSE, updated_at = now() WHERE host = $1 AND unavailable",
                &[(&host, Type::TEXT)],
            )
            .await?;
        Ok(n > 0)
    }

    async fn forget_hosts(&self, hosts: &[String], key_ids: &[String]) -> Result<u64> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let c = self.in_tx(&tx);
        let hosts = hosts.to_vec();
        let key_ids = key_ids.to_vec();
        let removed = c
            .execute(
                "DELETE FROM followers WHERE host = ANY($1)",
                &[(&hosts, Type::TEXT_ARRAY)],
            )
            .await?;
        for sql in [
            "DELETE FROM follow_requests WHERE host = ANY($1)",
            "DELETE FROM remote_actors WHERE host = ANY($1)",
        ] {
            c.execute(sql, &[(&hosts, Type::TEXT_ARRAY)]).await?;
        }
        c.execute(
            "DELETE FROM remote_keys WHERE key_id = ANY($1)",
            &[(&key_ids, Type::TEXT_ARRAY)],
        )
        .await?;
        tx.commit().await?;
        Ok(removed)
    }

    async fn prune_status_records(&self, before_unix_ms: i64, limit: u32) -> Result<u64> {
        let c = self.client().await?;
        let c = self.on(&c);
        let limit = i64::from(limit);
        let mut n = 0;
        for sql in [
            "DELETE FROM activity_targets WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM activity_targets WHERE at_ms < $1 LIMIT $2 FOR UPDATE SKIP LOCKED))",
            "DELETE FROM delivery_skips WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM delivery_skips WHERE at_ms < $1 LIMIT $2 FOR UPDATE SKIP LOCKED))",
            "DELETE FROM delivery_retries WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM delivery_retries WHERE next_ms < $1 LIMIT $2 FOR UPDATE SKIP LOCKED))",
        ] {
            n += c
                .execute(sql, &[(&before_unix_ms, Type::INT8), (&limit, Type::INT8)])
                .await?;
        }
        Ok(n)
    }

    async fn prune_delivery_records(&self, before_unix_ms: i64, limit: u32) -> Result<u64> {
        let c = self.client().await?;
        let c = self.on(&c);
        // A batch found by the `delivered_at` index, rows another pruner
        // holds skipped, deleted by their tuple ids: one short statement,
        // no lock held past it.
        c.execute(
            "DELETE FROM deliveries WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM deliveries
                 WHERE delivered_at < 'epoch'::timestamptz + $1 * interval '1 millisecond'
                 LIMIT $2 FOR UPDATE SKIP LOCKED))",
            &[
                (&before_unix_ms, Type::INT8),
                (&i64::from(limit), Type::INT8),
            ],
        )
        .await
    }

    async fn prune_dead_letters(
        &self,
        replayed_before_unix_ms: i64,
        attempted_before_unix_ms: i64,
        limit: u32,
    ) -> Result<u64> {
        let c = self.client().await?;
        let c = self.on(&c);
        c.execute(
            "DELETE FROM dead_letters WHERE id = ANY(ARRAY(
                 SELECT id FROM dead_letters
                 WHERE replayed_at < 'epoch'::timestamptz + $1 * interval '1 millisecond'
                    OR last_attempt_at < 'epoch'::timestamptz + $2 * interval '1 millisecond'
                 LIMIT $3 FOR UPDATE SKIP LOCKED))",
            &[
                (&replayed_before_unix_ms, Type::INT8),
                (&attempted_before_unix_ms, Type::INT8),
                (&i64::from(limit), Type::INT8),
            ],
        )
        .await
    }

    async fn purge_dead_letters(&self, host: Option<&str>, limit: u32) -> Result<u64> {
        let c = self.client().await?;
        let c = self.on(&c);
        let limit = i64::from(limit);
        // Two statements, not `$1 IS NULL OR host = $1`: a generic plan of
        // that could not use the host's index.
        match host {
            Some(host) => {
                c.execute(
                    "DELETE FROM dead_letters WHERE id = ANY(ARRAY(
                         SELECT id FROM dead_letters WHERE host = $1
                         ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED))",
                    &[(&host, Type::TEXT), (&limit, Type::INT8)],
                )
                .await
            }
            None => {
                c.execute(
                    "DELETE FROM dead_letters WHERE id = ANY(ARRAY(
                         SELECT id FROM dead_letters
                         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED))",
                    &[(&limit, Type::INT8)],
                )
                .await
            }
        }
    }
}
