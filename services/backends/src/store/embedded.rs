//! The embedded store: the same [`Store`] as PostgreSQL, in a SQLite file
//! (`store.db`) in the data directory, for `stampede up` with nothing
//! installed.
//!
//! Long on purpose, as `postgres.rs`: one implementation of the whole
//! [`Store`] trait beside its row mappers.
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::clock::now_ms;
use crate::sqlite::{DataDirLock, Db, Repair};
use crate::store::{
    like_containing, ActivityDelivery, ActorProfile, ActorRef, DeadLetter, DomainFootprint,
    DomainPolicy, Follower, HostCounts, HostHealth, Inserted, LocalActor, NewActivity, NewActor,
    NewDeadLetter, PolicyKind, PrivateKey, RemoteActor, RemoteKey, Skip, Store, StoredActivity,
    Totals, FOOTPRINT_KEYS,
};
use crate::{Error, Result};

/// Versioned schema (`PRAGMA user_version`); never edit one that has shipped.
const SCHEMA: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/embedded/0001_store.sql")),
    (
        2,
        include_str!("../../migrations/embedded/0002_host_health.sql"),
    ),
    (
        3,
        include_str!("../../migrations/embedded/0003_forget_unbound_documents.sql"),
    ),
    (
        4,
        include_str!("../../migrations/embedded/0004_domain_policies.sql"),
    ),
    (
        5,
        include_str!("../../migrations/embedded/0005_retention.sql"),
    ),
    (
        6,
        include_str!("../../migrations/embedded/0006_repair_activity_status.sql"),
    ),
    (
        7,
        include_str!("../../migrations/embedded/0007_follower_digests.sql"),
    ),
];

/// Code run before a version's SQL, in its transaction, for what SQL
/// cannot say.
const REPAIRS: &[(i32, Repair)] = &[(6, repair_activity_targets)];

/// Migration 4 changed after it had shipped (see
/// `migrations/embedded/0006_repair_activity_status.sql`): an
/// `activity_targets` made by its second form has no `at_ms`. SQLite has no
/// `ADD COLUMN IF NOT EXISTS` (and a NOT NULL column added must keep a
/// default): the table is rebuilt as the last form makes it, its rows
/// stamped now, so they are pruned one retention from the upgrade. It
/// only ever held what that form's build wrote.
fn repair_activity_targets(c: &Connection) -> rusqlite::Result<()> {
    let columns: Vec<String> = c
        .prepare("SELECT name FROM pragma_table_info('activity_targets')")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    if columns.is_empty() || columns.iter().any(|n| n == "at_ms") {
        return Ok(());
    }
    c.execute_batch(
        "ALTER TABLE activity_targets RENAME TO activity_targets_before_at_ms;
         CREATE TABLE activity_targets (
             activity_key TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
             page         TEXT NOT NULL,
             host         TEXT NOT NULL,
             targets      INTEGER NOT NULL,
             at_ms        INTEGER NOT NULL,
             PRIMARY KEY (activity_key, page, host)
         ) WITHOUT ROWID;",
    )?;
    c.execute(
        "INSERT INTO activity_targets (activity_key, page, host, targets, at_ms)
         SELECT activity_key, page, host, targets, ?1 FROM activity_targets_before_at_ms",
        [now_ms()],
    )?;
    c.execute_batch("DROP TABLE activity_targets_before_at_ms")
}

/// The SQLite implementation of [`Store`].
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Db,
}

impl EmbeddedStore {
    /// Opens (creating) the store in the locked data directory.
    pub fn open(lock: &DataDirLock) -> Result<Self> {
        Ok(Self {
            db: Db::open_repairing(lock, "store.db", SCHEMA, REPAIRS)?,
        })
    }
}

const ACTOR_COLUMNS: &str =
    "id, name, display_name, summary, manually_approves, private_key, public_key_pem";

fn actor_from_row(r: &Row<'_>) -> rusqlite::Result<LocalActor> {
    Ok(LocalActor {
        id: r.get(0)?,
        name: r.get(1)?,
        display_name: r.get(2)?,
        summary: r.get(3)?,
        manually_approves_followers: r.get(4)?,
        private_key: PrivateKey(r.get(5)?),
        public_key_pem: r.get(6)?,
    })
}

fn actor_where(
    c: &Connection,
    clause: &str,
    p: impl rusqlite::Params,
) -> Result<Option<LocalActor>> {
    let mut s = c.prepare_cached(&format!(
        "SELECT {ACTOR_COLUMNS} FROM actors WHERE {clause}"
    ))?;
    Ok(s.query_row(p, actor_from_row).optional()?)
}

const DEAD_LETTER_SELECT: &str =
    "SELECT d.id, a.ap_id, d.activity_key, d.inbox, d.host, d.reason, d.last_status, d.attempts,
            d.first_attempt_at, d.last_attempt_at
     FROM dead_letters d JOIN activities a ON a.key = d.activity_key";

fn dead_letter_from_row(r: &Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.get(0)?,
        activity_id: r.get(1)?,
        activity_key: r.get(2)?,
        inbox: r.get(3)?,
        host: r.get(4)?,
        reason: r.get(5)?,
        last_status: r.get::<_, Option<i64>>(6)?.map(|s| s as u16),
        attempts: r.get::<_, i64>(7)? as u32,
        first_attempt_unix_ms: r.get(8)?,
        last_attempt_unix_ms: r.get(9)?,
    })
}

fn count(c: &Connection, sql: &str, p: impl rusqlite::Params) -> Result<u64> {
    let n: i64 = c.prepare_cached(sql)?.query_row(p, |r| r.get(0))?;
    Ok(n as u64)
}

fn json_text(v: &serde_json::Value) -> String {
    v.to_string()
}

fn json_parse(s: &str) -> Result<serde_json::Value> {
    serde_json::from_str(s).map_err(|e| Error::Db(format!("stored JSON is corrupt: {e}")))
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn migrate(&self) -> Result<()> {
        // Applied when the file is opened.
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        if let Some(e) = self.db.failing() {
            return Err(Error::Db(format!("writes failing: {e}")));
        }
        self.db
            .call(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }

    async fn create_actor(&self, a: NewActor) -> Result<LocalActor> {
        let name = a.name.clone();
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO actors (name, display_name, summary, manually_approves, private_key, public_key_pem)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![a.name, a.display_name, a.summary, a.manually_approves_followers, a.private_key.0, a.public_key_pem],
                )?;
                actor_where(c, "id = ?1", [c.last_insert_rowid()])?
                    .ok_or_else(|| Error::Db("inserted actor vanished".into()))
            })
            .await
            .map_err(|e| match e {
                Error::Conflict(_) => Error::Conflict(format!("actor `{name}` exists already")),
                e => e,
            })
    }

    async fn ensure_actor(&self, a: NewActor) -> Result<LocalActor> {
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO actors (name, display_name, summary, manually_approves, private_key, public_key_pem)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (name) DO NOTHING",
                    params![a.name, a.display_name, a.summary, a.manually_approves_followers, a.private_key.0, a.public_key_pem],
                )?;
                actor_where(c, "name = ?1", [&a.name])?
                    .ok_or_else(|| Error::Db("ensured actor vanished".into()))
            })
            .await
    }

    async fn actor_count(&self) -> Result<u64> {
        self.db
            .call(|c| {
                count(
                    c,
                    "SELECT count(*) FROM actors WHERE substr(name, 1, 1) <> '_'",
                    [],
                )
            })
            .await
    }

    async fn actor_by_name(&self, name: &str) -> Result<Option<LocalActor>> {
        let name = name.to_string();
        self.db
            .call(move |c| actor_where(c, "name = ?1", [name]))
            .await
    }

    async fn actor_by_id(&self, id: i64) -> Result<Option<LocalActor>> {
        self.db.call(move |c| actor_where(c, "id = ?1", [id])).await
    }

    async fn actor_ref_by_name(&self, name: &str) -> Result<Option<ActorRef>> {
        let name = name.to_string();
        self.db
            .call(move |c| {
                let mut s =
                    c.prepare_cached("SELECT id, manually_approves FROM actors WHERE name = ?1")?;
                Ok(s.query_row([&name], |r| {
                    Ok(ActorRef {
                        id: r.get(0)?,
                        name: name.clone(),
                        manually_approves_followers: r.get(1)?,
                    })
                })
                .optional()?)
            })
            .await
    }

    async fn actor_profile_by_name(&self, name: &str) -> Result<Option<ActorProfile>> {
        let name = name.to_string();
        self.db
            .call(move |c| {
                let mut s = c.prepare_cached(
                    "SELECT id, display_name, summary, manually_approves, public_key_pem
                     FROM actors WHERE name = ?1",
                )?;
                Ok(s.query_row([&name], |r| {
                    Ok(ActorProfile {
                        id: r.get(0)?,
                        name: name.clone(),
                        display_name: r.get(1)?,
                        summary: r.get(2)?,
                        manually_approves_followers: r.get(3)?,
                        public_key_pem: r.get(4)?,
                    })
                })
                .optional()?)
            })
            .await
    }

    async fn delete_actor(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.db
            .call(move |c| {
                // Followers, follow requests, activities and their records
                // go with it (ON DELETE CASCADE, foreign keys on).
                let n = c
                    .prepare_cached("DELETE FROM actors WHERE name = ?1")?
                    .execute([name])?;
                Ok(n > 0)
            })
            .await
    }

    async fn add_follower(&self, actor_id: i64, f: &Follower) -> Result<()> {
        let f = f.clone();
        self.db
            .call(move |c| {
                c.prepare_cached(
                    "INSERT INTO followers (actor_id, follower, inbox, shared_inbox, host, follow_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (actor_id, follower) DO UPDATE
                     SET inbox = excluded.inbox, shared_inbox = excluded.shared_inbox, host = excluded.host,
                         follow_id = COALESCE(excluded.follow_id, followers.follow_id)",
                )?
                .execute(params![actor_id, f.actor, f.inbox, f.shared_inbox, f.host, f.follow_id])?;
                Ok(())
            })
            .await
    }

    async fn add_followers(&self, actor_id: i64, followers: &[Follower]) -> Result<()> {
        for chunk in followers.chunks(10_000) {
            let chunk = chunk.to_vec();
            self.db
                .call(move |c| {
                    let mut s = c.prepare_cached(
                        "INSERT INTO followers (actor_id, follower, inbox, shared_inbox, host, follow_id)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (actor_id, follower) DO NOTHING",
                    )?;
                    for f in &chunk {
                        s.execute(params![
                            actor_id,
                            f.actor,
                            f.inbox,
                            f.shared_inbox,
                            f.host,
                            f.follow_id
                        ])?;
                    }
                    Ok(())
                })
                .await?;
        }
        Ok(())
    }

    async fn remove_follower(&self, actor_id: i64, follower: &str) -> Result<bool> {
        let follower = follower.to_string();
        self.db
            .call(move |c| {
                Ok(c.execute(
                    "DELETE FROM followers WHERE actor_id = ?1 AND follower = ?2",
                    params![actor_id, follower],
                )? > 0)
            })
            .await
    }

    async fn remove_follow_by_id(&self, follower: &str, follow_id: &str) -> Result<u64> {
        let (follower, follow_id) = (follower.to_string(), follow_id.to_string());
        self.db
            .call(move |c| {
                Ok(c.execute(
                    "DELETE FROM followers WHERE follower = ?1 AND follow_id = ?2",
                    params![follower, follow_id],
                )? as u64)
            })
            .await
    }

    async fn remove_followers_by_inbox(&self, inbox: &str) -> Result<u64> {
        let inbox = inbox.to_string();
        self.db
            .call(move |c| {
                let n = c.execute(
                    "DELETE FROM followers WHERE inbox = ?1 OR shared_inbox = ?1",
                    [&inbox],
                )?;
                c.execute("DELETE FROM remote_actors WHERE inbox = ?1", [&inbox])?;
                Ok(n as u64)
            })
            .await
    }

    async fn remove_follower_everywhere(&self, follower: &str) -> Result<u64> {
        let follower = follower.to_string();
        self.db
            .call(move |c| {
                let n = c.execute("DELETE FROM followers WHERE follower = ?1", [&follower])?;
                c.execute(
                    "DELETE FROM follow_requests WHERE follower = ?1",
                    [&follower],
                )?;
                Ok(n as u64)
            })
            .await
    }

    async fn update_follower_inboxes(
        &self,
        follower: &str,
        inbox: &str,
        shared_inbox: Option<&str>,
        host: &str,
    ) -> Result<u64> {
        let (follower, inbox, shared, host) = (
            follower.to_string(),
            inbox.to_string(),
            shared_inbox.map(str::to_string),
            host.to_string(),
        );
        self.db
            .call(move |c| {
                Ok(c.execute(
                    "UPDATE followers SET inbox = ?2, shared_inbox = ?3, host = ?4 WHERE follower = ?1",
                    params![follower, inbox, shared, host],
                )? as u64)
            })
            .await
    }

    async fn add_follow_request(
        &self,
        actor_id: i64,
        f: &Follower,
        follow: &serde_json::Value,
    ) -> Result<()> {
        let (f, follow) = (f.clone(), json_text(follow));
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO follow_requests (actor_id, follower, inbox, shared_inbox, host, follow)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (actor_id, follower) DO UPDATE SET follow = excluded.follow,
                       inbox = excluded.inbox, shared_inbox = excluded.shared_inbox, host = excluded.host",
                    params![actor_id, f.actor, f.inbox, f.shared_inbox, f.host, follow],
                )?;
                Ok(())
            })
            .await
    }

    async fn take_follow_request(
        &self,
        actor_id: i64,
        follower: &str,
    ) -> Result<Option<(Follower, serde_json::Value)>> {
        let follower = follower.to_string();
        let row = self
            .db
            .call(move |c| {
                Ok(c.query_row(
                    "DELETE FROM follow_requests WHERE actor_id = ?1 AND follower = ?2
                     RETURNING follower, inbox, shared_inbox, host, follow",
                    params![actor_id, follower],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, Option<String>>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, String>(4)?,
                        ))
                    },
                )
                .optional()?)
            })
            .await?;
        let Some((actor, inbox, shared_inbox, host, follow)) = row else {
            return Ok(None);
        };
        let follow = json_parse(&follow)?;
        Ok(Some((
            Follower {
                actor,
                inbox,
                shared_inbox,
                host,
                follow_id: follow
                    .get("id")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
            },
            follow,
        )))
    }

    async fn follower_count(&self, actor_id: i64) -> Result<u64> {
        self.db
            .call(move |c| {
                count(
                    c,
                    "SELECT count(*) FROM followers WHERE actor_id = ?1",
                    [actor_id],
                )
            })
            .await
    }

    async fn follower_targets(
        &self,
        actor_id: i64,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>> {
        let after = after.unwrap_or("").to_string();
        self.db
            .call(move |c| {
                let mut s = c.prepare_cached(
                    "SELECT DISTINCT target FROM followers
                     WHERE actor_id = ?1 AND target > ?2
                     ORDER BY target LIMIT ?3",
                )?;
                let rows = s
                    .query_map(params![actor_id, after, i64::from(limit)], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                Ok(rows)
            })
            .await
    }

    async fn follower_ids(
        &self,
        actor_id: i64,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>> {
        let (prefix, after) = (prefix.to_string(), after.unwrap_or("").to_string());
        self.db
            .call(move |c| {
                let mut s = c.prepare_cached(
                    "SELECT follower FROM followers
                     WHERE actor_id = ?1 AND follower > ?2
                       AND substr(follower, 1, length(?3)) = ?3
                     ORDER BY follower LIMIT ?4",
                )?;
                let rows = s
                    .query_map(params![actor_id, after, prefix, i64::from(limit)], |r| {
                        r.get(0)
                    })?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                Ok(rows)
            })
            .await
    }

    async fn follower_digests(
        &self,
        actor_id: i64,
        authorities: &[String],
    ) -> Result<Vec<stampede_core::followers_sync::Digest>> {
        use stampede_core::followers_sync::{authority_of, Digest};
        let authorities = authorities.to_vec();
        self.db
            .call(move |c| {
                // One connection: nothing runs between the check and the
                // first computation.
                let marked = c
                    .prepare_cached(
                        "SELECT 1 FROM follower_digests WHERE actor_id = ?1 AND authority = ''",
                    )?
                    .query_row([actor_id], |_| Ok(()))
                    .optional()?
                    .is_some();
                if !marked {
                    let mut all: std::collections::HashMap<String, (Digest, i64)> =
                        std::collections::HashMap::new();
                    let mut s =
                        c.prepare_cached("SELECT follower FROM followers WHERE actor_id = ?1")?;
                    let mut rows = s.query([actor_id])?;
                    while let Some(r) = rows.next()? {
                        let id: String = r.get(0)?;
                        if let Some(a) = authority_of(&id) {
                            let e = all.entry(a.to_string()).or_default();
                            e.0.toggle(&id);
                            e.1 += 1;
                        }
                    }
                    all.insert(String::new(), (Digest::default(), 0));
                    let mut put = c.prepare_cached(
                        "INSERT INTO follower_digests (actor_id, authority, digest, followers)
                         VALUES (?1, ?2, ?3, ?4)",
                    )?;
                    for (a, (d, n)) in &all {
                        put.execute(params![actor_id, a, d.0.to_vec(), n])?;
                    }
                }
                let mut get = c.prepare_cached(
                    "SELECT digest FROM follower_digests WHERE actor_id = ?1 AND authority = ?2",
                )?;
                authorities
                    .iter()
                    .map(|a| {
                        let stored: Option<Vec<u8>> = get
                            .query_row(params![actor_id, a], |r| r.get(0))
                            .optional()?;
                        Ok(stored
                            .and_then(|b| Digest::from_bytes(&b))
                            .unwrap_or_default())
                    })
                    .collect()
            })
            .await
    }

    async fn remote_actor(&self, id: &str) -> Result<Option<RemoteActor>> {
        let id = id.to_string();
        self.db
            .call(move |c| {
                Ok(c.prepare_cached(
                    "SELECT id, inbox, shared_inbox, key_id, public_key_pem FROM remote_actors WHERE id = ?1",
                )?
                .query_row([id], |r| {
                    Ok(RemoteActor {
                        id: r.get(0)?,
                        inbox: r.get(1)?,
                        shared_inbox: r.get(2)?,
                        key_id: r.get(3)?,
                        public_key_pem: r.get(4)?,
                    })
                })
                .optional()?)
            })
            .await
    }

    async fn put_remote_actor(&self, a: &RemoteActor) -> Result<()> {
        let host = stampede_core::targets::inbox_host(&a.inbox).unwrap_or_default();
        let a = a.clone();
        self.db
            .call(move |c| {
                c.prepare_cached(
                    "INSERT INTO remote_actors (id, inbox, shared_inbox, key_id, public_key_pem, host, fetched_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (id) DO UPDATE SET inbox = excluded.inbox,
                       shared_inbox = excluded.shared_inbox, key_id = excluded.key_id,
                       public_key_pem = excluded.public_key_pem, host = excluded.host,
                       fetched_at = excluded.fetched_at",
                )?
                .execute(params![a.id, a.inbox, a.shared_inbox, a.key_id, a.public_key_pem, host, now_ms()])?;
                Ok(())
            })
            .await
    }

    async fn delete_remote_actor(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.db
            .call(move |c| {
                c.execute("DELETE FROM remote_actors WHERE id = ?1", [id])?;
                Ok(())
            })
            .await
    }

    async fn remote_key(&self, key_id: &str) -> Result<Option<RemoteKey>> {
        let key_id = key_id.to_string();
        self.db
            .call(move |c| {
                Ok(c.prepare_cached(
                    "SELECT key_id, owner, public_key_pem FROM remote_keys WHERE key_id = ?1",
                )?
                .query_row([key_id], |r| {
                    Ok(RemoteKey {
                        key_id: r.get(0)?,
                        owner: r.get(1)?,
                        public_key_pem: r.get(2)?,
                    })
                })
                .optional()?)
            })
            .await
    }

    async fn put_remote_key(&self, k: &RemoteKey) -> Result<()> {
        let k = k.clone();
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO remote_keys (key_id, owner, public_key_pem, fetched_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (key_id) DO UPDATE SET owner = excluded.owner,
                       public_key_pem = excluded.public_key_pem, fetched_at = excluded.fetched_at",
                    params![k.key_id, k.owner, k.public_key_pem, now_ms()],
                )?;
                Ok(())
            })
            .await
    }

    async fn delete_remote_keys_of(&self, owner: &str) -> Result<()> {
        let owner = owner.to_string();
        self.db
            .call(move |c| {
                c.execute("DELETE FROM remote_keys WHERE owner = ?1", [owner])?;
                Ok(())
            })
            .await
    }

    async fn insert_activity(&self, a: NewActivity) -> Result<Inserted> {
        self.db
            .call(move |c| {
                let body = json_text(&a.body);
                let created = c.execute(
                    "INSERT INTO activities (key, ap_id, actor_id, kind, object_id, idempotency_key, body, delivered_body, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT (actor_id, idempotency_key) DO NOTHING",
                    params![a.key, a.ap_id, a.actor_id, a.kind, a.object_id, a.idempotency_key, body, a.delivered_body, now_ms()],
                )? > 0;
                if created {
                    return Ok(Inserted {
                        key: a.key,
                        ap_id: a.ap_id,
                        created: true,
                        enqueued: false,
                    });
                }
                Ok(c.query_row(
                    "SELECT key, ap_id, enqueued_at IS NOT NULL FROM activities
                     WHERE actor_id = ?1 AND idempotency_key = ?2",
                    params![a.actor_id, a.idempotency_key],
                    |r| {
                        Ok(Inserted {
                            key: r.get(0)?,
                            ap_id: r.get(1)?,
                            created: false,
                            enqueued: r.get(2)?,
                        })
                    },
                )?)
            })
            .await
    }

    async fn mark_enqueued(&self, key: &str) -> Result<()> {
        let key = key.to_string();
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE activities SET enqueued_at = ?2 WHERE key = ?1 AND enqueued_at IS NULL",
                    params![key, now_ms()],
                )?;
                Ok(())
            })
            .await
    }

    async fn mark_fanned_out(&self, key: &str, targets: u64) -> Result<()> {
        let key = key.to_string();
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE activities SET fanned_out_at = ?2, targets = ?3 WHERE key = ?1",
                    params![key, now_ms(), targets as i64],
                )?;
                Ok(())
            })
            .await
    }

    async fn activity_count(&self, actor_id: i64) -> Result<u64> {
        self.db
            .call(move |c| {
                count(
                    c,
                    "SELECT count(*) FROM activities WHERE actor_id = ?1",
                    [actor_id],
                )
            })
            .await
    }

    async fn activity(&self, key: &str) -> Result<Option<StoredActivity>> {
        let key = key.to_string();
        let row = self
            .db
            .call(move |c| {
                Ok(c.prepare_cached(
                    "SELECT a.key, a.ap_id, a.kind, a.actor_id, u.name, a.body, a.delivered_body
                     FROM activities a JOIN actors u ON u.id = a.actor_id WHERE a.key = ?1",
                )?
                .query_row([key], |r| {
                    Ok((
                        StoredActivity {
                            key: r.get(0)?,
                            ap_id: r.get(1)?,
                            kind: r.get(2)?,
                            actor_id: r.get(3)?,
                            actor_name: r.get(4)?,
                            body: serde_json::Value::Null,
                            delivered_body: r.get(6)?,
                        },
                        r.get::<_, String>(5)?,
                    ))
                })
                .optional()?)
            })
            .await?;
        row.map(|(mut a, body)| {
            a.body = json_parse(&body)?;
            Ok(a)
        })
        .transpose()
    }

    async fn delivered(&self, activity_key: &str, inbox: &str) -> Result<bool> {
        let (key, inbox) = (activity_key.to_string(), inbox.to_string());
        self.db
            .call_relaxed(move |c| {
                Ok(c.prepare_cached(
                    "SELECT 1 FROM deliveries WHERE activity_key = ?1 AND inbox = ?2",
                )?
                .exists(params![key, inbox])?)
            })
            .await
    }

    async fn record_delivered(
        &self,
        activity_key: &str,
        inbox: &str,
        host: &str,
        status: u16,
        attempts: u32,
    ) -> Result<()> {
        let (key, inbox, host) = (
            activity_key.to_string(),
            inbox.to_string(),
            host.to_string(),
        );
        self.db
            .call_relaxed(move |c| {
                c.prepare_cached(
                    "INSERT INTO deliveries (activity_key, inbox, host, status, attempts, delivered_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                )?
                .execute(params![key, inbox, host, status, attempts, now_ms()])?;
                if attempts > 1 {
                    c.prepare_cached(
                        "DELETE FROM delivery_retries WHERE activity_key = ?1 AND inbox = ?2",
                    )?
                    .execute(params![key, inbox])?;
                }
                Ok(())
            })
            .await
    }

    async fn add_dead_letter(&self, d: NewDeadLetter) -> Result<()> {
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO dead_letters (activity_key, inbox, host, reason, last_status, attempts, first_attempt_at, last_attempt_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![d.activity_key, d.inbox, d.host, d.reason, d.last_status, d.attempts, d.first_attempt_unix_ms, now_ms()],
                )?;
                c.execute(
                    "DELETE FROM delivery_retries WHERE activity_key = ?1 AND inbox = ?2",
                    params![d.activity_key, d.inbox],
                )?;
                Ok(())
            })
            .await
    }

    async fn dead_letters_to_replay(
        &self,
        id: Option<i64>,
        host: Option<&str>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>> {
        let host = host.map(str::to_string);
        self.db
            .call(move |c| {
                let mut s = c.prepare_cached(&format!(
                    "{DEAD_LETTER_SELECT}
                     WHERE d.replayed_at IS NULL AND (?1 IS NULL OR d.id = ?1)
                       AND (?2 IS NULL OR d.host = ?2)
                     ORDER BY d.id LIMIT ?3"
                ))?;
                let rows = s
                    .query_map(params![id, host, i64::from(limit)], dead_letter_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await
    }

    async fn mark_replayed(&self, ids: &[i64]) -> Result<()> {
        let ids = ids.to_vec();
        self.db
            .call(move |c| {
                let now = now_ms();
                let mut s =
                    c.prepare_cached("UPDATE dead_letters SET replayed_at = ?2 WHERE id = ?1")?;
                for id in ids {
                    s.execute(params![id, now])?;
                }
                Ok(())
            })
            .await
    }

    async fn dead_letters(&self, limit: u32, host: Option<&str>) -> Result<Vec<DeadLetter>> {
        let host = host.map(str::to_string);
        self.db
            .call(move |c| {
                let mut s = c.prepare_cached(&format!(
                    "{DEAD_LETTER_SELECT}
                     WHERE d.replayed_at IS NULL AND (?2 IS NULL OR d.host = ?2)
                     ORDER BY d.id DESC LIMIT ?1"
                ))?;
                let rows = s
                    .query_map(params![i64::from(limit), host], dead_letter_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await
    }

    async fn set_host_paused(&self, host: &str, paused: bool) -> Result<()> {
        let host = host.to_string();
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO hosts (host, paused, updated_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (host) DO UPDATE SET paused = excluded.paused, updated_at = excluded.updated_at",
                    params![host, paused, now_ms()],
                )?;
                Ok(())
            })
            .await
    }

    async fn paused_hosts(&self) -> Result<Vec<String>> {
        self.db
            .call(|c| {
                let mut s =
                    c.prepare_cached("SELECT host FROM hosts WHERE paused ORDER BY host")?;
                let rows = s
                    .query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                Ok(rows)
            })
            .await
    }

    async fn set_host_health(&self, host: &str, h: Option<&HostHealth>) -> Result<()> {
        let (host, h) = (host.to_string(), h.cloned());
        self.db
            .call(move |c| {
                match h {
                    Some(h) => c.execute(
                        "INSERT INTO hosts (host, failing_since_ms, failures, open_until_ms, unavailable, updated_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT (host) DO UPDATE SET failing_since_ms = excluded.failing_since_ms,
                           failures = excluded.failures, open_until_ms = excluded.open_until_ms,
                           unavailable = excluded.unavailable, updated_at = excluded.updated_at",
                        params![host, h.failing_since_unix_ms, h.failures as i64, h.open_until_unix_ms, h.unavailable, now_ms()],
                    )?,
                    None => c.execute(
                        "UPDATE hosts SET failing_since_ms = NULL, failures = 0, open_until_ms = NULL,
                           unavailable = 0, updated_at = ?2
                         WHERE host = ?1 AND failing_since_ms IS NOT NULL",
                        params![host, now_ms()],
                    )?,
                };
                Ok(())
            })
            .await
    }

    async fn failing_hosts(&self, limit: u32) -> Result<Vec<HostHealth>> {
        self.db
            .call(move |c| {
                let mut s = c.prepare_cached(
                    "SELECT host, failing_since_ms, failures, COALESCE(open_until_ms, 0), unavailable
                     FROM hosts WHERE failing_since_ms IS NOT NULL
                     ORDER BY failing_since_ms LIMIT ?1",
                )?;
                let rows = s
                    .query_map([i64::from(limit)], |r| {
                        Ok(HostHealth {
                            host: r.get(0)?,
                            failing_since_unix_ms: r.get(1)?,
                            failures: r.get::<_, i64>(2)? as u64,
                            open_until_unix_ms: r.get(3)?,
                            unavailable: r.get(4)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await
    }

    async fn object_deleted(&self, actor_id: i64, object_id: &str) -> Result<bool> {
        let object_id = object_id.to_string();
        self.db
            .call(move |c| {
                Ok(c.prepare_cached(
                    "SELECT 1 FROM activities WHERE actor_id = ?1 AND object_id = ?2 AND kind = 'Delete' LIMIT 1",
                )?
                .exists(params![actor_id, object_id])?)
            })
            .await
    }

    async fn totals(&self) -> Result<Totals> {
        self.db
            .call(|c| {
                Ok(c.query_row(
                    "SELECT (SELECT count(*) FROM activities),
                            (SELECT count(*) FROM deliveries),
                            (SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL)",
                    [],
                    |r| {
                        Ok(Totals {
                            activities: r.get::<_, i64>(0)? as u64,
                            delivered: r.get::<_, i64>(1)? as u64,
                            dead_letters: r.get::<_, i64>(2)? as u64,
                        })
                    },
                )?)
            })
            .await
    }
    async fn domain_policies(&self) -> Result<Vec<DomainPolicy>> {
        self.db
            .call(|c| {
                let mut s = c.prepare_cached(
                    "SELECT domain, policy, reason, updated_ms FROM domain_policies ORDER BY domain",
                )?;
                let rows = s
                    .query_map([], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get(3)?))
                    })?
                    .collect::<rusqlite::Result<Vec<(String, String, String, i64)>>>()?;
                rows.into_iter()
                    .map(|(domain, policy, reason, updated_unix_ms)| {
                        Ok(DomainPolicy {
                            domain,
                            kind: PolicyKind::parse(&policy).ok_or_else(|| {
                                Error::Db(format!("unknown domain policy `{policy}` stored"))
                            })?,
                            reason,
                            updated_unix_ms,
                        })
                    })
                    .collect()
            })
            .await
    }

    async fn set_domain_policy(&self, p: &DomainPolicy) -> Result<()> {
        let p = p.clone();
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO domain_policies (domain, policy, reason, updated_ms) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (domain) DO UPDATE SET policy = excluded.policy,
                         reason = excluded.reason, updated_ms = excluded.updated_ms",
                    params![p.domain, p.kind.as_str(), p.reason, p.updated_unix_ms],
                )?;
                Ok(())
            })
            .await
    }

    async fn remove_domain_policy(&self, domain: &str) -> Result<bool> {
        let domain = domain.to_string();
        self.db
            .call(move |c| {
                Ok(c.execute(
                    "DELETE FROM domain_policies WHERE domain = ?1",
                    params![domain],
                )? > 0)
            })
            .await
    }

    async fn seed_domain_policies(&self, seeds: &[DomainPolicy]) -> Result<u64> {
        let seeds = seeds.to_vec();
        self.db
            .call(move |c| {
                let mut added = 0;
                for p in &seeds {
                    let new = c.execute(
                        "INSERT INTO domain_policy_seeds (domain) VALUES (?1) ON CONFLICT DO NOTHING",
                        params![p.domain],
                    )?;
                    if new == 0 {
                        continue;
                    }
                    added += c.execute(
                        "INSERT INTO domain_policies (domain, policy, reason, updated_ms)
                         VALUES (?1, ?2, ?3, ?4) ON CONFLICT (domain) DO NOTHING",
                        params![p.domain, p.kind.as_str(), p.reason, p.updated_unix_ms],
                    )? as u64;
                }
                Ok(added)
            })
            .await
    }

    async fn record_fanout_page(
        &self,
        activity_key: &str,
        page: &str,
        per_host: &[(String, u64)],
        skips: &[Skip],
    ) -> Result<()> {
        let (key, page, per_host, skips) = (
            activity_key.to_string(),
            page.to_string(),
            per_host.to_vec(),
            skips.to_vec(),
        );
        self.db
            .call(move |c| {
                c.execute(
                    "DELETE FROM activity_targets WHERE activity_key = ?1 AND page = ?2",
                    params![key, page],
                )?;
                let mut s = c.prepare_cached(
                    "INSERT INTO activity_targets (activity_key, page, host, targets, at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                let now = now_ms();
                for (host, n) in &per_host {
                    s.execute(params![key, page, host, *n as i64, now])?;
                }
                let mut s = c.prepare_cached(
                    "INSERT INTO delivery_skips (activity_key, inbox, host, reason, at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                )?;
                for k in &skips {
                    s.execute(params![key, k.inbox, k.host, k.reason, now])?;
                }
                Ok(())
            })
            .await
    }

    async fn record_skip(&self, activity_key: &str, skip: &Skip) -> Result<()> {
        let (key, skip) = (activity_key.to_string(), skip.clone());
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO delivery_skips (activity_key, inbox, host, reason, at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                    params![key, skip.inbox, skip.host, skip.reason, now_ms()],
                )?;
                c.execute(
                    "DELETE FROM delivery_retries WHERE activity_key = ?1 AND inbox = ?2",
                    params![key, skip.inbox],
                )?;
                Ok(())
            })
            .await
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
        let (key, inbox, host) = (
            activity_key.to_string(),
            inbox.to_string(),
            host.to_string(),
        );
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO delivery_retries (activity_key, inbox, host, attempts, last_status, next_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (activity_key, inbox) DO UPDATE SET attempts = excluded.attempts,
                         last_status = excluded.last_status, next_ms = excluded.next_ms",
                    params![key, inbox, host, attempts, last_status, next_unix_ms],
                )?;
                Ok(())
            })
            .await
    }

    async fn activity_delivery(&self, id: &str) -> Result<Option<ActivityDelivery>> {
        let id = id.to_string();
        self.db
            .call(move |c| {
                let Some((key, ap_id, fanned_out)) = c
                    .query_row(
                        "SELECT key, ap_id, fanned_out_at IS NOT NULL FROM activities
                         WHERE ap_id = ?1 OR key = ?1 LIMIT 1",
                        params![id],
                        |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, bool>(2)?)),
                    )
                    .optional()?
                else {
                    return Ok(None);
                };
                let mut hosts = HostCounts::default();
                let counts = |sql: &str| -> Result<Vec<(String, i64)>> {
                    let mut s = c.prepare_cached(sql)?;
                    let rows = s
                        .query_map(params![key], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<rusqlite::Result<Vec<(String, i64)>>>()?;
                    Ok(rows)
                };
                for (h, n) in counts(
                    "SELECT host, SUM(targets) FROM activity_targets WHERE activity_key = ?1 GROUP BY host",
                )? {
                    hosts.get(h).targets = n as u64;
                }
                for (h, n) in counts(
                    "SELECT host, count(*) FROM deliveries WHERE activity_key = ?1 GROUP BY host",
                )? {
                    hosts.get(h).delivered = n as u64;
                }
                for (h, n) in counts(
                    "SELECT host, count(DISTINCT inbox) FROM dead_letters d
                     WHERE activity_key = ?1 AND replayed_at IS NULL
                       AND NOT EXISTS (SELECT 1 FROM deliveries x WHERE x.activity_key = ?1 AND x.inbox = d.inbox)
                     GROUP BY host",
                )? {
                    hosts.get(h).dead_lettered = n as u64;
                }
                for (h, n) in counts(
                    "SELECT host, count(*) FROM delivery_retries r
                     WHERE activity_key = ?1
                       AND NOT EXISTS (SELECT 1 FROM deliveries x WHERE x.activity_key = ?1 AND x.inbox = r.inbox)
                       AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.activity_key = ?1 AND d.inbox = r.inbox AND d.replayed_at IS NULL)
                     GROUP BY host",
                )? {
                    hosts.get(h).retrying = n as u64;
                }
                let mut s = c.prepare_cached(
                    "SELECT host, reason, count(*) FROM delivery_skips WHERE activity_key = ?1 GROUP BY host, reason",
                )?;
                let skips = s
                    .query_map(params![key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<rusqlite::Result<Vec<(String, String, i64)>>>()?;
                for (h, reason, n) in skips {
                    hosts.get(h).skipped.push((reason, n as u64));
                }
                Ok(Some(ActivityDelivery {
                    key,
                    ap_id,
                    fanned_out,
                    hosts: hosts.done(),
                }))
            })
            .await
    }

    async fn domain_footprint(&self, domain: &str) -> Result<DomainFootprint> {
        let like = like_containing(domain);
        self.db
            .call(move |c| {
                let mut s = c.prepare_cached(
                    "SELECT host FROM followers WHERE host LIKE ?1 ESCAPE '\\'
                     UNION SELECT host FROM follow_requests WHERE host LIKE ?1 ESCAPE '\\'
                     UNION SELECT host FROM remote_actors WHERE host LIKE ?1 ESCAPE '\\'",
                )?;
                let hosts = s
                    .query_map(params![like], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                let mut s = c.prepare_cached(
                    "SELECT key_id FROM remote_keys WHERE key_id LIKE ?1 ESCAPE '\\' LIMIT ?2",
                )?;
                let key_ids = s
                    .query_map(params![like, FOOTPRINT_KEYS], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                Ok(DomainFootprint { hosts, key_ids })
            })
            .await
    }

    async fn unavailable_hosts(&self, limit: u32) -> Result<Vec<String>> {
        self.db
            .call(move |c| {
                let mut s = c.prepare_cached(
                    "SELECT host FROM hosts WHERE unavailable ORDER BY failing_since_ms, host LIMIT ?1",
                )?;
                let rows = s
                    .query_map(params![limit], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                Ok(rows)
            })
            .await
    }

    async fn mark_host_available(&self, host: &str) -> Result<bool> {
        let host = host.to_string();
        self.db
            .call(move |c| {
                Ok(c.execute(
                    "UPDATE hosts SET unavailable = 0, updated_at = ?2 WHERE host = ?1 AND unavailable",
                    params![host, now_ms()],
                )? > 0)
            })
            .await
    }

    async fn forget_hosts(&self, hosts: &[String], key_ids: &[String]) -> Result<u64> {
        let (hosts, key_ids) = (hosts.to_vec(), key_ids.to_vec());
        self.db
            .call(move |c| {
                let mut removed = 0;
                for h in &hosts {
                    removed +=
                        c.execute("DELETE FROM followers WHERE host = ?1", params![h])? as u64;
                    c.execute("DELETE FROM follow_requests WHERE host = ?1", params![h])?;
                    c.execute("DELETE FROM remote_actors WHERE host = ?1", params![h])?;
                }
                for k in &key_ids {
                    c.execute("DELETE FROM remote_keys WHERE key_id = ?1", params![k])?;
                }
                Ok(removed)
            })
            .await
    }

    async fn prune_status_records(&self, before_unix_ms: i64, limit: u32) -> Result<u64> {
        self.db
            .call_relaxed(move |c| {
                let mut n = 0;
                for sql in [
                    "DELETE FROM activity_targets WHERE (activity_key, page, host) IN
                       (SELECT activity_key, page, host FROM activity_targets WHERE at_ms < ?1 LIMIT ?2)",
                    "DELETE FROM delivery_skips WHERE (activity_key, inbox) IN
                       (SELECT activity_key, inbox FROM delivery_skips WHERE at_ms < ?1 LIMIT ?2)",
                    "DELETE FROM delivery_retries WHERE (activity_key, inbox) IN
                       (SELECT activity_key, inbox FROM delivery_retries WHERE next_ms < ?1 LIMIT ?2)",
                ] {
                    n += c
                        .prepare_cached(sql)?
                        .execute(params![before_unix_ms, i64::from(limit)])?
                        as u64;
                }
                Ok(n)
            })
            .await
    }

    async fn prune_delivery_records(&self, before_unix_ms: i64, limit: u32) -> Result<u64> {
        // Not fsynced: a pruned record that comes back after a power cut is
        // pruned again.
        self.db
            .call_relaxed(move |c| {
                let n = c
                    .prepare_cached(
                        "DELETE FROM deliveries WHERE (activity_key, inbox) IN
                           (SELECT activity_key, inbox FROM deliveries
                            WHERE delivered_at < ?1 LIMIT ?2)",
                    )?
                    .execute(params![before_unix_ms, i64::from(limit)])?;
                Ok(n as u64)
            })
            .await
    }

    async fn prune_dead_letters(
        &self,
        replayed_before_unix_ms: i64,
        attempted_before_unix_ms: i64,
        limit: u32,
    ) -> Result<u64> {
        self.db
            .call_relaxed(move |c| {
                let n = c
                    .prepare_cached(
                        "DELETE FROM dead_letters WHERE id IN
                           (SELECT id FROM dead_letters WHERE replayed_at < ?1
                            UNION SELECT id FROM dead_letters WHERE last_attempt_at < ?2
                            LIMIT ?3)",
                    )?
                    .execute(params![
                        replayed_before_unix_ms,
                        attempted_before_unix_ms,
                        i64::from(limit)
                    ])?;
                Ok(n as u64)
            })
            .await
    }

    async fn purge_dead_letters(&self, host: Option<&str>, limit: u32) -> Result<u64> {
        let host = host.map(str::to_string);
        self.db
            .call(move |c| {
                let n = c
                    .prepare_cached(
                        "DELETE FROM dead_letters WHERE id IN
                           (SELECT id FROM dead_letters WHERE ?1 IS NULL OR host = ?1
                            ORDER BY id LIMIT ?2)",
                    )?
                    .execute(params![host, i64::from(limit)])?;
                Ok(n as u64)
            })
            .await
    }
}
