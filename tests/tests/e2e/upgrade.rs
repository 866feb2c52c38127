//! Upgrades with data: for every schema the PostgreSQL and the embedded
//! store have shipped (each state of the migrations on main), a database
//! made by that state's migrations, run as the code of the time ran them,
//! and filled with the rows that version wrote (actors, follows,
//! activities, success records, dead letters, host health, domain
//! policies; for the embedded store, a `queue.db` of its time holding a
//! fanout job queued just before the upgrade). Then this version's services
//! start on it, migrating at start as the Helm hook's `stampede migrate`
//! does, and must leave the schema of a fresh install and work on the old
//! rows: a post reaches the old followers, an old dead letter is replayed,
//! the queued post is delivered, status reads the old counts.
//!
//! The migrations that shipped are the files in
//! `services/backends/migrations/`, but for the forms migration 6 (and the
//! embedded 4) had before it was changed, kept in
//! `tests/fixtures/migrations/` as they shipped; a shipped migration's file
//! may not change (`shipped_migrations_are_never_edited`; README,
//! "Upgrades").
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use stampede::scratch::Scratch;
use stampede_core::activity::{prepare_outbound, public_note};
use stampede_core::keys::generate_rsa_2048;
use stampede_proto::api::{
    DomainPolicy, GetActivityDeliveryRequest, GetActorRequest, ListDeadLettersRequest,
    ListDomainPoliciesRequest, ReplayDeadLettersRequest, StatusRequest,
};
use stampede_sink::{Sink, SinkActor, SinkOptions};
use tokio::net::TcpListener;

use crate::helpers::{scratch, spawn_app_on, wait_for, AppOptions, Backend};

/// A migration: its version, name and SQL.
type Step = (i32, &'static str, &'static str);

macro_rules! pg {
    ($v:literal, $name:literal, $file:literal) => {
        (
            $v,
            $name,
            include_str!(concat!("../../../services/backends/migrations/", $file)),
        )
    };
}
macro_rules! embedded {
    ($v:literal, $file:literal) => {
        (
            $v,
            "",
            include_str!(concat!(
                "../../../services/backends/migrations/embedded/",
                $file
            )),
        )
    };
}

const PG1: Step = pg!(1, "initial", "0001_initial.sql");
const PG2: Step = pg!(2, "inbound", "0002_inbound.sql");
const PG3: Step = pg!(3, "hosts", "0003_hosts.sql");
const PG4: Step = pg!(4, "host_health", "0004_host_health.sql");
const PG5: Step = pg!(
    5,
    "forget_unbound_documents",
    "0005_forget_unbound_documents.sql"
);
/// Migration 6 as a1cfd9e shipped it: the domain policy tables only.
const PG6_A1CFD9E: Step = (
    6,
    "domain_policies",
    include_str!("../../fixtures/migrations/postgres/0006_domain_policies.a1cfd9e.sql"),
);
/// Migration 6 as 51d4f05 shipped it: the activity status tables, without
/// `activity_targets.at_ms` and their indexes.
const PG6_51D4F05: Step = (
    6,
    "domain_policies",
    include_str!("../../fixtures/migrations/postgres/0006_domain_policies.51d4f05.sql"),
);
const PG6: Step = pg!(6, "domain_policies", "0006_domain_policies.sql");
const PG7: Step = pg!(7, "retention_indexes", "0007_retention_indexes.sql");
/// Run outside a transaction, statement by statement (`CONCURRENT` in
/// store/postgres.rs).
const PG_CONCURRENT: &[i32] = &[7, 9];

const E1: Step = embedded!(1, "0001_store.sql");
const E2: Step = embedded!(2, "0002_host_health.sql");
const E3: Step = embedded!(3, "0003_forget_unbound_documents.sql");
const E4_A1CFD9E: Step = (
    4,
    "",
    include_str!("../../fixtures/migrations/embedded/0004_domain_policies.a1cfd9e.sql"),
);
const E4_51D4F05: Step = (
    4,
    "",
    include_str!("../../fixtures/migrations/embedded/0004_domain_policies.51d4f05.sql"),
);
const E4: Step = embedded!(4, "0004_domain_policies.sql");
const E5: Step = embedded!(5, "0005_retention.sql");

/// What the rows of a shipped schema can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    /// Actors, followers, remote actors, activities, success records, dead
    /// letters (PostgreSQL 1).
    Outbound,
    /// Follow ids, remote keys, follow requests (PostgreSQL 2).
    Inbound,
    /// Paused hosts (PostgreSQL 3, embedded 1).
    Hosts,
    /// Host health (PostgreSQL 4, embedded 2; 5 and 3 forget the remote
    /// caches).
    HostHealth,
    /// Domain policies (PostgreSQL 6 as a1cfd9e shipped it, embedded 4).
    Policies,
    /// Activity targets without `at_ms` (51d4f05).
    TargetsWithoutTime,
    /// Activity targets with `at_ms` (8a42625 on).
    Targets,
}

/// A schema as shipped: the commit on main that shipped it, its
/// migrations, what its rows can hold.
struct Shipped {
    commit: &'static str,
    steps: &'static [Step],
    level: Level,
    /// The embedded queue's schema (`queue.db`) it shipped with; 0 for
    /// PostgreSQL (RabbitMQ has none).
    queue: i32,
}

/// The embedded queue's schema, as `queue/embedded.rs` has it (version 2
/// since 4836ec9).
const QUEUE_SCHEMA: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE messages (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        queue   TEXT NOT NULL,
        kind    TEXT,
        payload BLOB NOT NULL,
        due_at  INTEGER NOT NULL,
        reason  TEXT,
        source  TEXT
    )",
    ),
    (
        2,
        "ALTER TABLE messages ADD COLUMN ready_at INTEGER;
     ALTER TABLE messages ADD COLUMN traceparent TEXT",
    ),
];

const PG_SHIPPED: &[Shipped] = &[
    Shipped {
        commit: "ffd1006",
        steps: &[PG1],
        queue: 0,
        level: Level::Outbound,
    },
    Shipped {
        commit: "b5e8209",
        steps: &[PG1, PG2],
        queue: 0,
        level: Level::Inbound,
    },
    Shipped {
        commit: "ca74dfa",
        steps: &[PG1, PG2, PG3],
        queue: 0,
        level: Level::Hosts,
    },
    Shipped {
        commit: "15072cc",
        steps: &[PG1, PG2, PG3, PG4],
        queue: 0,
        level: Level::HostHealth,
    },
    Shipped {
        commit: "4ad1765",
        steps: &[PG1, PG2, PG3, PG4, PG5],
        queue: 0,
        level: Level::HostHealth,
    },
    Shipped {
        commit: "a1cfd9e",
        steps: &[PG1, PG2, PG3, PG4, PG5, PG6_A1CFD9E],
        queue: 0,
        level: Level::Policies,
    },
    Shipped {
        commit: "51d4f05",
        steps: &[PG1, PG2, PG3, PG4, PG5, PG6_51D4F05],
        queue: 0,
        level: Level::TargetsWithoutTime,
    },
    Shipped {
        commit: "8a42625",
        steps: &[PG1, PG2, PG3, PG4, PG5, PG6, PG7],
        queue: 0,
        level: Level::Targets,
    },
];

const EMBEDDED_SHIPPED: &[Shipped] = &[
    Shipped {
        commit: "2851a05",
        steps: &[E1],
        queue: 1,
        level: Level::Hosts,
    },
    Shipped {
        commit: "15072cc",
        steps: &[E1, E2],
        queue: 1,
        level: Level::HostHealth,
    },
    Shipped {
        commit: "4ad1765",
        steps: &[E1, E2, E3],
        queue: 2,
        level: Level::HostHealth,
    },
    Shipped {
        commit: "a1cfd9e",
        steps: &[E1, E2, E3, E4_A1CFD9E],
        queue: 2,
        level: Level::Policies,
    },
    Shipped {
        commit: "51d4f05",
        steps: &[E1, E2, E3, E4_51D4F05],
        queue: 2,
        level: Level::TargetsWithoutTime,
    },
    Shipped {
        commit: "8a42625",
        steps: &[E1, E2, E3, E4, E5],
        queue: 2,
        level: Level::Targets,
    },
];

/// The migrations this version applies: PostgreSQL 1 to 10, embedded 1 to 7.
pub(crate) const PG_LATEST: i32 = 10;
const EMBEDDED_LATEST: i32 = 7;

/// FNV-1a of each migration file as it last shipped: a shipped migration is
/// never edited (a database that ran it would never run the edit), a new
/// one is added instead.
const SHIPPED_FILES: &[(&str, u64)] = &[
    ("0001_initial.sql", 0x85b3_eedc_f6df_fa03),
    ("0002_inbound.sql", 0x4937_3bd1_7430_f873),
    ("0003_hosts.sql", 0x952f_669a_e6dc_81df),
    ("0004_host_health.sql", 0xea09_e2c8_c67a_ad0d),
    ("0005_forget_unbound_documents.sql", 0xb9e1_f2a4_0b9d_ea14),
    ("0006_domain_policies.sql", 0x3bb8_21f3_f0e0_e1c0),
    ("0007_retention_indexes.sql", 0x9b21_a9db_ed85_dc0d),
    ("0008_repair_activity_status.sql", 0x60e7_3e72_f951_fd7a),
    ("0009_activity_status_indexes.sql", 0x6316_0add_620a_a822),
    ("0010_follower_digests.sql", 0x8790_cda9_7415_603e),
    ("embedded/0001_store.sql", 0x7f69_2ec1_4319_86c9),
    ("embedded/0002_host_health.sql", 0xea41_5252_7ad4_e006),
    (
        "embedded/0003_forget_unbound_documents.sql",
        0x4da6_59c6_5f33_fbfc,
    ),
    ("embedded/0004_domain_policies.sql", 0xbc03_04aa_5e50_d2da),
    ("embedded/0005_retention.sql", 0xf78c_765a_c02a_3d59),
    (
        "embedded/0006_repair_activity_status.sql",
        0x7635_ccc5_d30d_a79f,
    ),
    ("embedded/0007_follower_digests.sql", 0x1913_2752_6512_06d2),
];

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn shipped_migrations_are_never_edited() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../services/backends/migrations");
    let mut edited = Vec::new();
    for (file, want) in SHIPPED_FILES {
        let got = fnv1a(&std::fs::read(dir.join(file)).unwrap());
        if got != *want {
            edited.push(format!("{file}: {got:#x}"));
        }
    }
    assert!(
        edited.is_empty(),
        "shipped migrations changed (a database that ran them never runs the change: \
         add a migration instead, README \"Upgrades\"): {edited:?}"
    );
}

/// The statements of a migration run outside a transaction, as
/// store/postgres.rs splits them.
fn statements(sql: &str) -> impl Iterator<Item = &str> {
    sql.split(";\n").map(str::trim).filter(|s| {
        s.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"))
    })
}

/// What a fixture was filled with, to check against after the upgrade.
struct Fixture {
    followers: Vec<SinkActor>,
    /// Where alice's posts go: one per shared inbox, else per inbox.
    targets: BTreeSet<String>,
    /// A post delivered to every target (success records).
    delivered: String,
    /// A post dead-lettered at `dead_inbox`.
    dead: String,
    dead_inbox: String,
    /// A post published just before the upgrade, its fanout job still in
    /// the embedded queue.
    queued: Option<String>,
}

/// The followers of alice on the fake servers: two on each, servers 0 and
/// 1 with a shared inbox, server 2 without.
fn followers(sink: &Sink) -> Vec<SinkActor> {
    (0..6)
        .map(|j| sink.actor(j % 3, &format!("f{j}")).unwrap())
        .collect()
}

fn target(f: &SinkActor) -> String {
    f.shared_inbox.clone().unwrap_or_else(|| f.inbox.clone())
}

/// An activity of alice's, prepared as `Publish` stores it.
fn note(base: &str, text: &str) -> stampede_core::activity::PreparedActivity {
    let actor = format!("{base}/users/alice");
    prepare_outbound(
        public_note(&actor, text).to_string().as_bytes(),
        &actor,
        |kind| format!("{base}/{kind}/{}", uuid::Uuid::new_v4()),
    )
    .unwrap()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The PostgreSQL database at `shipped`, migrated as the code of the time
/// did (one transaction under the advisory lock; a concurrent migration
/// statement by statement), then filled.
async fn postgres_fixture(url: &str, shipped: &Shipped, base: &str, sink: &Sink) -> Fixture {
    let (mut c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let tx = c.transaction().await.unwrap();
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&0x5354_414d_5045_4445_i64],
    )
    .await
    .unwrap();
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS stampede_migrations (
            version INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await
    .unwrap();
    let mut concurrent = Vec::new();
    for &(version, name, sql) in shipped.steps {
        if PG_CONCURRENT.contains(&version) {
            concurrent.push((version, name, sql));
            continue;
        }
        tx.batch_execute(sql).await.unwrap();
        tx.execute(
            "INSERT INTO stampede_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    for (version, name, sql) in concurrent {
        for s in statements(sql) {
            c.batch_execute(s).await.unwrap();
        }
        c.execute(
            "INSERT INTO stampede_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await
        .unwrap();
    }

    let level = shipped.level;
    let key = generate_rsa_2048().unwrap();
    let alice: i64 = c
        .query_one(
            "INSERT INTO actors (name, display_name, private_key, public_key_pem, created_at)
             VALUES ('alice', 'Alice', $1, $2, now() - interval '30 days') RETURNING id",
            &[&key.private_pkcs8_der, &key.public_pem],
        )
        .await
        .unwrap()
        .get(0);
    let bob_key = generate_rsa_2048().unwrap();
    let bob: i64 = c
        .query_one(
            "INSERT INTO actors (name, private_key, public_key_pem, manually_approves)
             VALUES ('bob', $1, $2, TRUE) RETURNING id",
            &[&bob_key.private_pkcs8_der, &bob_key.public_pem],
        )
        .await
        .unwrap()
        .get(0);
    let followers = followers(sink);
    for (j, f) in followers.iter().enumerate() {
        if level >= Level::Inbound {
            c.execute(
                "INSERT INTO followers (actor_id, follower, inbox, shared_inbox, host, follow_id)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &alice,
                    &f.id,
                    &f.inbox,
                    &f.shared_inbox,
                    &f.host,
                    &format!("{}/follows/{j}", f.id),
                ],
            )
            .await
            .unwrap();
        } else {
            c.execute(
                "INSERT INTO followers (actor_id, follower, inbox, shared_inbox, host)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&alice, &f.id, &f.inbox, &f.shared_inbox, &f.host],
            )
            .await
            .unwrap();
        }
    }
    c.execute(
        "INSERT INTO remote_actors (id, inbox, shared_inbox, key_id, public_key_pem, host)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &followers[0].id,
            &followers[0].inbox,
            &followers[0].shared_inbox,
            &format!("{}#main-key", followers[0].id),
            &bob_key.public_pem,
            &followers[0].host,
        ],
    )
    .await
    .unwrap();
    let targets: BTreeSet<String> = followers.iter().map(target).collect();
    let mut keys = Vec::new();
    let mut ids = Vec::new();
    for text in [
        "delivered before the upgrade",
        "dead-lettered before the upgrade",
    ] {
        let a = note(base, text);
        let key = uuid::Uuid::new_v4().to_string();
        c.execute(
            "INSERT INTO activities (key, ap_id, actor_id, kind, object_id, body, delivered_body,
                                     created_at, enqueued_at, fanned_out_at, targets)
             VALUES ($1, $2, $3, $4, $5, $6, $7, now() - interval '2 days',
                     now() - interval '2 days', now() - interval '2 days', $8)",
            &[
                &key,
                &a.id,
                &alice,
                &a.kind,
                &a.object_id,
                &a.json,
                &a.delivered_body,
                &(targets.len() as i64),
            ],
        )
        .await
        .unwrap();
        keys.push(key);
        ids.push(a.id);
    }
    for t in &targets {
        let host = url::Url::parse(t).unwrap();
        let host = format!("{}:{}", host.host_str().unwrap(), host.port().unwrap());
        c.execute(
            "INSERT INTO deliveries (activity_key, inbox, host, status, attempts, delivered_at)
             VALUES ($1, $2, $3, 202, 1, now() - interval '2 days')",
            &[&keys[0], t, &host],
        )
        .await
        .unwrap();
    }
    let dead_inbox = target(&followers[0]);
    c.execute(
        "INSERT INTO dead_letters (activity_key, inbox, host, reason, last_status, attempts,
                                   first_attempt_at, last_attempt_at)
         VALUES ($1, $2, $3, 'failed: 503 after 8 attempts', 503, 8,
                 now() - interval '2 days', now() - interval '1 day')",
        &[&keys[1], &dead_inbox, &followers[0].host],
    )
    .await
    .unwrap();
    if level >= Level::Inbound {
        c.execute(
            "INSERT INTO remote_keys (key_id, owner, public_key_pem) VALUES ($1, $2, $3)",
            &[
                &format!("{}#main-key", followers[1].id),
                &followers[1].id,
                &bob_key.public_pem,
            ],
        )
        .await
        .unwrap();
        let follow = serde_json::json!({
            "type": "Follow", "id": format!("{}/follows/bob", followers[1].id),
            "actor": followers[1].id, "object": format!("{base}/users/bob"),
        });
        c.execute(
            "INSERT INTO follow_requests (actor_id, follower, inbox, shared_inbox, host, follow)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &bob,
                &followers[1].id,
                &followers[1].inbox,
                &followers[1].shared_inbox,
                &followers[1].host,
                &follow,
            ],
        )
        .await
        .unwrap();
    }
    if level >= Level::Hosts {
        c.execute(
            "INSERT INTO hosts (host, paused) VALUES ('paused.example', TRUE)",
            &[],
        )
        .await
        .unwrap();
    }
    if level >= Level::HostHealth {
        c.execute(
            "INSERT INTO hosts (host, failing_since_ms, open_until_ms, failures)
             VALUES ('down.example', $1, $2, 12)",
            &[&(now_ms() - 3_600_000), &(now_ms() + 600_000)],
        )
        .await
        .unwrap();
    }
    if level >= Level::Policies {
        c.execute(
            "INSERT INTO domain_policies (domain, policy, reason, updated_ms)
             VALUES ('spam.example', 'suspend', 'before the upgrade', $1)",
            &[&now_ms()],
        )
        .await
        .unwrap();
        c.execute(
            "INSERT INTO domain_policy_seeds (domain) VALUES ('spam.example')",
            &[],
        )
        .await
        .unwrap();
    }
    if level >= Level::TargetsWithoutTime {
        for t in &targets {
            let host = url::Url::parse(t).unwrap();
            let host = format!("{}:{}", host.host_str().unwrap(), host.port().unwrap());
            if level == Level::Targets {
                c.execute(
                    "INSERT INTO activity_targets (activity_key, page, host, targets, at_ms)
                     VALUES ($1, $2, $3, 1, $4)
                     ON CONFLICT (activity_key, page, host)
                     DO UPDATE SET targets = activity_targets.targets + 1",
                    &[&keys[0], &"", &host, &now_ms()],
                )
                .await
                .unwrap();
            } else {
                c.execute(
                    "INSERT INTO activity_targets (activity_key, page, host, targets)
                     VALUES ($1, $2, $3, 1)
                     ON CONFLICT (activity_key, page, host)
                     DO UPDATE SET targets = activity_targets.targets + 1",
                    &[&keys[0], &"", &host],
                )
                .await
                .unwrap();
            }
        }
    }
    Fixture {
        followers,
        targets,
        delivered: ids[0].clone(),
        dead: ids[1].clone(),
        dead_inbox,
        queued: None,
    }
}

/// The embedded store at `shipped` in `dir`, migrated as the code of the
/// time did (`BEGIN; …; PRAGMA user_version = N; COMMIT`), then filled.
fn embedded_fixture(dir: &Path, shipped: &Shipped, base: &str, sink: &Sink) -> Fixture {
    use rusqlite::params;
    std::fs::create_dir_all(dir).unwrap();
    let c = rusqlite::Connection::open(dir.join("store.db")).unwrap();
    c.pragma_update(None, "journal_mode", "WAL").unwrap();
    c.pragma_update(None, "foreign_keys", "ON").unwrap();
    for &(version, _, sql) in shipped.steps {
        c.execute_batch(&format!(
            "BEGIN; {sql}; PRAGMA user_version = {version}; COMMIT;"
        ))
        .unwrap();
    }
    let level = shipped.level;
    let now = now_ms();
    let day = 86_400_000;
    let key = generate_rsa_2048().unwrap();
    c.execute(
        "INSERT INTO actors (name, display_name, private_key, public_key_pem)
         VALUES ('alice', 'Alice', ?1, ?2)",
        params![key.private_pkcs8_der, key.public_pem],
    )
    .unwrap();
    let alice = c.last_insert_rowid();
    let bob_key = generate_rsa_2048().unwrap();
    c.execute(
        "INSERT INTO actors (name, private_key, public_key_pem, manually_approves)
         VALUES ('bob', ?1, ?2, 1)",
        params![bob_key.private_pkcs8_der, bob_key.public_pem],
    )
    .unwrap();
    let bob = c.last_insert_rowid();
    let followers = followers(sink);
    for (j, f) in followers.iter().enumerate() {
        c.execute(
            "INSERT INTO followers (actor_id, follower, inbox, shared_inbox, host, follow_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                alice,
                f.id,
                f.inbox,
                f.shared_inbox,
                f.host,
                format!("{}/follows/{j}", f.id)
            ],
        )
        .unwrap();
    }
    c.execute(
        "INSERT INTO remote_actors (id, inbox, shared_inbox, key_id, public_key_pem, host, fetched_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            followers[0].id,
            followers[0].inbox,
            followers[0].shared_inbox,
            format!("{}#main-key", followers[0].id),
            bob_key.public_pem,
            followers[0].host,
            now - day
        ],
    )
    .unwrap();
    let targets: BTreeSet<String> = followers.iter().map(target).collect();
    let mut keys = Vec::new();
    let mut ids = Vec::new();
    for text in [
        "delivered before the upgrade",
        "dead-lettered before the upgrade",
    ] {
        let a = note(base, text);
        let key = uuid::Uuid::new_v4().to_string();
        c.execute(
            "INSERT INTO activities (key, ap_id, actor_id, kind, object_id, body, delivered_body,
                                     created_at, enqueued_at, fanned_out_at, targets)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?8, ?9)",
            params![
                key,
                a.id,
                alice,
                a.kind,
                a.object_id,
                a.json.to_string(),
                a.delivered_body,
                now - 2 * day,
                targets.len() as i64
            ],
        )
        .unwrap();
        keys.push(key);
        ids.push(a.id);
    }
    let host_of = |t: &str| {
        let u = url::Url::parse(t).unwrap();
        format!("{}:{}", u.host_str().unwrap(), u.port().unwrap())
    };
    for t in &targets {
        c.execute(
            "INSERT INTO deliveries (activity_key, inbox, host, status, attempts, delivered_at)
             VALUES (?1, ?2, ?3, 202, 1, ?4)",
            params![keys[0], t, host_of(t), now - 2 * day],
        )
        .unwrap();
    }
    let dead_inbox = target(&followers[0]);
    c.execute(
        "INSERT INTO dead_letters (activity_key, inbox, host, reason, last_status, attempts,
                                   first_attempt_at, last_attempt_at)
         VALUES (?1, ?2, ?3, 'failed: 503 after 8 attempts', 503, 8, ?4, ?5)",
        params![
            keys[1],
            dead_inbox,
            followers[0].host,
            now - 2 * day,
            now - day
        ],
    )
    .unwrap();
    c.execute(
        "INSERT INTO remote_keys (key_id, owner, public_key_pem, fetched_at) VALUES (?1, ?2, ?3, ?4)",
        params![
            format!("{}#main-key", followers[1].id),
            followers[1].id,
            bob_key.public_pem,
            now - day
        ],
    )
    .unwrap();
    let follow = serde_json::json!({
        "type": "Follow", "id": format!("{}/follows/bob", followers[1].id),
        "actor": followers[1].id, "object": format!("{base}/users/bob"),
    });
    c.execute(
        "INSERT INTO follow_requests (actor_id, follower, inbox, shared_inbox, host, follow)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            bob,
            followers[1].id,
            followers[1].inbox,
            followers[1].shared_inbox,
            followers[1].host,
            follow.to_string()
        ],
    )
    .unwrap();
    c.execute(
        "INSERT INTO hosts (host, paused, updated_at) VALUES ('paused.example', 1, ?1)",
        params![now],
    )
    .unwrap();
    if level >= Level::HostHealth {
        c.execute(
            "INSERT INTO hosts (host, updated_at, failing_since_ms, open_until_ms, failures)
             VALUES ('down.example', ?1, ?2, ?3, 12)",
            params![now, now - 3_600_000, now + 600_000],
        )
        .unwrap();
    }
    if level >= Level::Policies {
        c.execute(
            "INSERT INTO domain_policies (domain, policy, reason, updated_ms)
             VALUES ('spam.example', 'suspend', 'before the upgrade', ?1)",
            params![now],
        )
        .unwrap();
        c.execute(
            "INSERT INTO domain_policy_seeds (domain) VALUES ('spam.example')",
            [],
        )
        .unwrap();
    }
    if level >= Level::TargetsWithoutTime {
        for t in &targets {
            if level == Level::Targets {
                c.execute(
                    "INSERT INTO activity_targets (activity_key, page, host, targets, at_ms)
                     VALUES (?1, '', ?2, 1, ?3)
                     ON CONFLICT (activity_key, page, host) DO UPDATE SET targets = targets + 1",
                    params![keys[0], host_of(t), now],
                )
                .unwrap();
            } else {
                c.execute(
                    "INSERT INTO activity_targets (activity_key, page, host, targets)
                     VALUES (?1, '', ?2, 1)
                     ON CONFLICT (activity_key, page, host) DO UPDATE SET targets = targets + 1",
                    params![keys[0], host_of(t)],
                )
                .unwrap();
            }
        }
    }
    // A post queued for fanout just before the upgrade: the activity
    // stored and its job in the queue of the time.
    let a = note(base, "queued before the upgrade");
    let key = uuid::Uuid::new_v4().to_string();
    c.execute(
        "INSERT INTO activities (key, ap_id, actor_id, kind, object_id, body, delivered_body,
                                 created_at, enqueued_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
        params![
            key,
            a.id,
            alice,
            a.kind,
            a.object_id,
            a.json.to_string(),
            a.delivered_body,
            now - 60_000
        ],
    )
    .unwrap();
    drop(c);
    let q = rusqlite::Connection::open(dir.join("queue.db")).unwrap();
    q.pragma_update(None, "journal_mode", "WAL").unwrap();
    for &(version, sql) in QUEUE_SCHEMA.iter().take(shipped.queue as usize) {
        q.execute_batch(&format!(
            "BEGIN; {sql}; PRAGMA user_version = {version}; COMMIT;"
        ))
        .unwrap();
    }
    let job = prost::Message::encode_to_vec(&stampede_proto::queue::FanoutJob {
        activity_key: key,
        ..Default::default()
    });
    let kind = stampede_proto::kinds::FANOUT_JOB;
    if shipped.queue >= 2 {
        q.execute(
            "INSERT INTO messages (queue, kind, payload, due_at, ready_at) VALUES ('fanout', ?1, ?2, ?3, ?3)",
            params![kind, job, now - 60_000],
        )
        .unwrap();
    } else {
        q.execute(
            "INSERT INTO messages (queue, kind, payload, due_at) VALUES ('fanout', ?1, ?2, ?3)",
            params![kind, job, now - 60_000],
        )
        .unwrap();
    }
    Fixture {
        followers,
        targets,
        delivered: ids[0].clone(),
        dead: ids[1].clone(),
        dead_inbox,
        queued: Some(a.id),
    }
}

/// A PostgreSQL schema as lines to compare: columns, indexes, constraints,
/// and any index left invalid.
async fn postgres_schema(url: &str) -> Vec<String> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.query(
        "SELECT format('column %s.%s %s nullable=%s default=%s generated=%s',
                       table_name, column_name, data_type, is_nullable,
                       coalesce(column_default, '-'), coalesce(generation_expression, '-'))
         FROM information_schema.columns WHERE table_schema = 'public'
         UNION ALL
         SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'public'
         UNION ALL
         SELECT format('constraint %s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
         FROM pg_constraint WHERE connamespace = 'public'::regnamespace
         UNION ALL
         SELECT 'INVALID index ' || indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid
         ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The migrations recorded as applied.
async fn postgres_versions(url: &str) -> Vec<i32> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.query("SELECT version FROM stampede_migrations ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The schema of a fresh install of this version.
async fn fresh_postgres_schema() -> Vec<String> {
    let s = scratch(Backend::External, &AppOptions::default()).await;
    let url = s.database_url().unwrap().to_string();
    let store = stampede_backends::store::postgres::PgStore::connect(&url, 2).unwrap();
    stampede_backends::store::Store::migrate(&store)
        .await
        .unwrap();
    drop(store);
    let schema = postgres_schema(&url).await;
    s.remove().await.unwrap();
    schema
}

/// An SQLite schema as lines to compare: each table's columns (type, not
/// null, default, key, hidden), rowid or not, foreign keys; each index's
/// table, columns, uniqueness and partiality.
fn sqlite_schema(file: &Path) -> (i32, Vec<String>) {
    let c = rusqlite::Connection::open(file).unwrap();
    let version: i32 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    let objects: Vec<(String, String, String, Option<String>)> = c
        .prepare(
            "SELECT type, name, tbl_name, sql FROM sqlite_master
             WHERE name NOT LIKE 'sqlite_%' ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let mut out = Vec::new();
    for (kind, name, table, sql) in objects {
        if kind == "table" {
            let rowid = !sql.unwrap_or_default().contains("WITHOUT ROWID");
            out.push(format!("table {name} rowid={rowid}"));
            let mut s = c
                .prepare(&format!("SELECT name, type, \"notnull\", dflt_value, pk, hidden FROM pragma_table_xinfo('{name}')"))
                .unwrap();
            let cols = s
                .query_map([], |r| {
                    Ok(format!(
                        "column {name}.{} {} notnull={} default={:?} pk={} hidden={}",
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, i64>(5)?
                    ))
                })
                .unwrap();
            out.extend(cols.map(Result::unwrap));
            let mut s = c
                .prepare(&format!("SELECT \"table\", \"from\", \"to\", on_delete FROM pragma_foreign_key_list('{name}')"))
                .unwrap();
            let fks = s
                .query_map([], |r| {
                    Ok(format!(
                        "foreign key {name}.{} -> {}({:?}) on delete {}",
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, String>(3)?
                    ))
                })
                .unwrap();
            out.extend(fks.map(Result::unwrap));
        } else if kind == "index" {
            let cols: Vec<String> = c
                .prepare(&format!(
                    "SELECT name FROM pragma_index_info('{name}') ORDER BY seqno"
                ))
                .unwrap()
                .query_map([], |r| r.get::<_, Option<String>>(0))
                .unwrap()
                .map(|n| n.unwrap().unwrap_or_default())
                .collect();
            let (unique, partial): (i64, i64) = c
                .query_row(
                    &format!("SELECT \"unique\", partial FROM pragma_index_list('{table}') WHERE name = ?1"),
                    [&name],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            out.push(format!(
                "index {name} on {table}({}) unique={unique} partial={partial}",
                cols.join(",")
            ));
        } else {
            out.push(format!("{kind} {name} on {table}"));
        }
    }
    out.sort();
    (version, out)
}

/// The embedded store of a fresh install of this version.
fn fresh_sqlite_schema() -> (i32, Vec<String>) {
    let dir =
        std::env::temp_dir().join(format!("stampede-fresh-{}", uuid::Uuid::new_v4().simple()));
    {
        let lock = stampede_backends::sqlite::DataDirLock::acquire(&dir).unwrap();
        let _store = stampede_backends::store::embedded::EmbeddedStore::open(&lock).unwrap();
    }
    let schema = sqlite_schema(&dir.join("store.db"));
    std::fs::remove_dir_all(&dir).unwrap();
    schema
}

/// Makes the fixture of `shipped` on `backend`, starts this version on it,
/// and checks the schema and the old rows at work.
async fn upgrade(backend: Backend, shipped: &Shipped) {
    let started = std::time::Instant::now();
    let sink = Sink::start(SinkOptions {
        servers: 3,
        shared_inbox: std::sync::Arc::new(|i| i != 2),
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", http.local_addr().unwrap());
    let scratch: Scratch = scratch(backend, &AppOptions::default()).await;
    let fixture = match backend {
        Backend::External => {
            postgres_fixture(scratch.database_url().unwrap(), shipped, &base, &sink).await
        }
        Backend::Embedded => embedded_fixture(scratch.data_dir().unwrap(), shipped, &base, &sink),
    };
    // The embedded store migrates as it opens: opened here first (as
    // `stampede up` opens it), its file is read before the process holds it.
    let embedded_schema = scratch.data_dir().map(|dir| {
        {
            let lock = stampede_backends::sqlite::DataDirLock::acquire(dir).unwrap();
            stampede_backends::store::embedded::EmbeddedStore::open(&lock).unwrap();
        }
        sqlite_schema(&dir.join("store.db"))
    });
    let db_url = scratch.database_url().map(str::to_string);
    let app = spawn_app_on(scratch, Some(http), AppOptions::default()).await;
    assert_eq!(app.http_base, base);

    // The schema is a fresh install's.
    if let Some(url) = db_url {
        assert_eq!(
            postgres_versions(&url).await,
            (1..=PG_LATEST).collect::<Vec<_>>()
        );
        let upgraded = postgres_schema(&url).await;
        assert_schema_eq(&upgraded, &fresh_postgres_schema().await, shipped);
    }
    if let Some((version, upgraded)) = embedded_schema {
        let (fresh_version, fresh) = fresh_sqlite_schema();
        assert_eq!((version, fresh_version), (EMBEDDED_LATEST, EMBEDDED_LATEST));
        assert_schema_eq(&upgraded, &fresh, shipped);
    }

    let received_post = |path_of: &str| {
        (0..3)
            .flat_map(|i| {
                sink.received(i)
                    .into_iter()
                    .map(move |rec| (i, rec))
                    .collect::<Vec<_>>()
            })
            .filter(|(_, rec)| rec.activity_id.as_deref() == Some(path_of))
            .map(|(i, rec)| {
                assert_eq!(rec.verified, Ok(()), "server {i}: {:?}", rec.verified);
                format!("{}{}", sink_base(&sink, i), rec.path)
            })
            .collect::<BTreeSet<String>>()
    };
    // The post whose fanout job waited in the old queue is delivered.
    if let Some(queued) = &fixture.queued {
        let all = 2 * fixture.targets.len() as u64;
        wait_for(
            "the post queued before the upgrade",
            Duration::from_secs(60),
            || async {
                received_post(queued) == fixture.targets
                    && app.store.totals().await.unwrap().delivered == all
            },
        )
        .await;
    }

    // Status reads the old rows.
    let mut admin = app.admin();
    let status = admin.status(StatusRequest {}).await.unwrap().into_inner();
    let activities = 2 + u64::from(fixture.queued.is_some());
    assert_eq!(status.activities, activities, "{status:?}");
    let delivered = fixture.targets.len() * if fixture.queued.is_some() { 2 } else { 1 };
    assert_eq!(status.delivered, delivered as u64, "{status:?}");
    assert_eq!(status.dead_letters, 1, "{status:?}");
    if shipped.level >= Level::Hosts {
        assert_eq!(status.paused_hosts, vec!["paused.example".to_string()]);
    }
    if shipped.level >= Level::HostHealth {
        let down = status
            .failing_hosts
            .iter()
            .find(|h| h.host == "down.example")
            .unwrap_or_else(|| panic!("down.example not failing: {status:?}"));
        assert_eq!(down.failures, 12);
    }
    let alice = app
        .actors()
        .get_actor(GetActorRequest {
            name: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alice.followers_count, fixture.followers.len() as u64);
    let bob = app
        .actors()
        .get_actor(GetActorRequest { name: "bob".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(bob.manually_approves_followers);
    if shipped.level >= Level::Policies {
        let policies = admin
            .list_domain_policies(ListDomainPoliciesRequest {})
            .await
            .unwrap()
            .into_inner()
            .policies;
        assert!(
            policies
                .iter()
                .any(|p: &DomainPolicy| p.domain == "spam.example" && p.policy == "suspend"),
            "{policies:?}"
        );
    }
    if shipped.level >= Level::TargetsWithoutTime {
        let d = admin
            .get_activity_delivery(GetActivityDeliveryRequest {
                activity_id: fixture.delivered.clone(),
                per_host: false,
            })
            .await
            .unwrap()
            .into_inner();
        let counts = d.counts.unwrap();
        assert_eq!(
            (counts.total, counts.delivered),
            (fixture.targets.len() as u64, fixture.targets.len() as u64),
            "{d:?}"
        );
    }

    // A new post reaches every old follower, signed with the old key.
    let actor_id = format!("{base}/users/alice");
    let r = app
        .publish("alice", &public_note(&actor_id, "after the upgrade"), "")
        .await
        .unwrap();
    wait_for(
        "the post at every target",
        Duration::from_secs(60),
        || async { received_post(&r.activity_id) == fixture.targets },
    )
    .await;

    // The old dead letter is replayed, and arrives.
    let dead = admin
        .list_dead_letters(ListDeadLettersRequest {
            limit: 10,
            host: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        (
            dead[0].activity_id.as_str(),
            dead[0].inbox.as_str(),
            dead[0].last_status
        ),
        (fixture.dead.as_str(), fixture.dead_inbox.as_str(), 503)
    );
    let replayed = admin
        .replay_dead_letters(ReplayDeadLettersRequest {
            id: dead[0].id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .replayed;
    assert_eq!(replayed, 1);
    wait_for(
        "the replayed dead letter",
        Duration::from_secs(60),
        || async { received_post(&fixture.dead) == BTreeSet::from([fixture.dead_inbox.clone()]) },
    )
    .await;
    // What was delivered before is not sent again.
    assert!(received_post(&fixture.delivered).is_empty());
    println!(
        "upgrade from {} ({backend:?}): {:?}",
        shipped.commit,
        started.elapsed()
    );
    app.stop().await;
}

fn sink_base(sink: &Sink, i: usize) -> String {
    format!("http://{}", sink.addr(i).unwrap())
}

fn assert_schema_eq(upgraded: &[String], fresh: &[String], shipped: &Shipped) {
    let up: BTreeSet<&String> = upgraded.iter().collect();
    let fr: BTreeSet<&String> = fresh.iter().collect();
    let missing: Vec<_> = fr.difference(&up).collect();
    let extra: Vec<_> = up.difference(&fr).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "upgraded from {}: not a fresh install's schema\nmissing: {missing:#?}\nextra: {extra:#?}",
        shipped.commit
    );
}

macro_rules! upgrades {
    ($($name:ident: $backend:ident $list:ident[$i:literal];)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                upgrade(Backend::$backend, &$list[$i]).await
            }
        )*
    };
}

upgrades! {
    postgres_from_1_ffd1006: External PG_SHIPPED[0];
    postgres_from_2_b5e8209: External PG_SHIPPED[1];
    postgres_from_3_ca74dfa: External PG_SHIPPED[2];
    postgres_from_4_15072cc: External PG_SHIPPED[3];
    postgres_from_5_4ad1765: External PG_SHIPPED[4];
    postgres_from_6_a1cfd9e: External PG_SHIPPED[5];
    postgres_from_6_51d4f05: External PG_SHIPPED[6];
    postgres_from_7_8a42625: External PG_SHIPPED[7];
    embedded_from_1_2851a05: Embedded EMBEDDED_SHIPPED[0];
    embedded_from_2_15072cc: Embedded EMBEDDED_SHIPPED[1];
    embedded_from_3_4ad1765: Embedded EMBEDDED_SHIPPED[2];
    embedded_from_4_a1cfd9e: Embedded EMBEDDED_SHIPPED[3];
    embedded_from_4_51d4f05: Embedded EMBEDDED_SHIPPED[4];
    embedded_from_5_8a42625: Embedded EMBEDDED_SHIPPED[5];
}

/// Three `stampede migrate` at once on a database of 4ad1765 (with rows):
/// each waits for the advisory lock, every one exits 0, every migration is
/// applied once, the schema is a fresh install's and the rows are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrate_commands_apply_each_migration_once() {
    let sink = Sink::start(SinkOptions {
        servers: 3,
        ..SinkOptions::default()
    })
    .await
    .unwrap();
    let s = scratch(Backend::External, &AppOptions::default()).await;
    let url = s.database_url().unwrap().to_string();
    let fixture = postgres_fixture(&url, &PG_SHIPPED[4], "http://127.0.0.1:1", &sink).await;
    let started = std::time::Instant::now();
    let runs = (0..3).map(|_| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_stampede-e2e"))
            .arg("migrate")
            .env_clear()
            .env("STAMPEDE_DATABASE_URL", &url)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .output()
    });
    let outs = futures::future::join_all(runs).await;
    let mut applied_by = 0;
    for out in outs {
        let out = out.unwrap();
        let stdout = crate::helpers::succeeded(&out);
        assert_eq!(stdout, "migrations applied\n");
        // Exactly one of them applied migration 9 (the others found it done).
        if String::from_utf8_lossy(&out.stderr).contains("activity_status_indexes") {
            applied_by += 1;
        }
    }
    assert_eq!(applied_by, 1, "migration 9 applied once");
    println!("three migrate at once: {:?}", started.elapsed());
    assert_eq!(
        postgres_versions(&url).await,
        (1..=PG_LATEST).collect::<Vec<_>>()
    );
    assert_schema_eq(
        &postgres_schema(&url).await,
        &fresh_postgres_schema().await,
        &PG_SHIPPED[4],
    );
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let n: i64 = c
        .query_one("SELECT count(*) FROM followers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, fixture.followers.len() as i64);
    drop(c);
    s.remove().await.unwrap();
}
