-- The embedded store: the PostgreSQL schema (migrations 0001-0003) in
-- SQLite. Times are unix milliseconds; JSON is text.
CREATE TABLE actors (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    name              TEXT NOT NULL UNIQUE,
    display_name      TEXT NOT NULL DEFAULT '',
    summary           TEXT NOT NULL DEFAULT '',
    manually_approves INTEGER NOT NULL DEFAULT 0,
    private_key       BLOB NOT NULL,
    public_key_pem    TEXT NOT NULL
);

CREATE TABLE followers (
    actor_id     INTEGER NOT NULL REFERENCES actors(id) ON DELETE CASCADE,
    follower     TEXT NOT NULL,
    inbox        TEXT NOT NULL,
    shared_inbox TEXT,
    host         TEXT NOT NULL,
    follow_id    TEXT,
    target       TEXT GENERATED ALWAYS AS (COALESCE(NULLIF(shared_inbox, ''), inbox)) STORED,
    PRIMARY KEY (actor_id, follower)
) WITHOUT ROWID;
CREATE INDEX followers_target ON followers (actor_id, target);
CREATE INDEX followers_follower ON followers (follower);
CREATE INDEX followers_follow_id ON followers (follow_id);
CREATE INDEX followers_inbox ON followers (inbox);
CREATE INDEX followers_shared_inbox ON followers (shared_inbox);

CREATE TABLE remote_actors (
    id             TEXT PRIMARY KEY,
    inbox          TEXT NOT NULL,
    shared_inbox   TEXT,
    key_id         TEXT,
    public_key_pem TEXT,
    host           TEXT NOT NULL,
    fetched_at     INTEGER NOT NULL
);
CREATE INDEX remote_actors_inbox ON remote_actors (inbox);

CREATE TABLE activities (
    key             TEXT PRIMARY KEY,
    ap_id           TEXT NOT NULL UNIQUE,
    actor_id        INTEGER NOT NULL REFERENCES actors(id) ON DELETE CASCADE,
    kind            TEXT NOT NULL,
    object_id       TEXT,
    idempotency_key TEXT,
    body            TEXT NOT NULL,
    delivered_body  BLOB NOT NULL,
    created_at      INTEGER NOT NULL,
    enqueued_at     INTEGER,
    fanned_out_at   INTEGER,
    targets         INTEGER,
    UNIQUE (actor_id, idempotency_key)
);
CREATE INDEX activities_deletes ON activities (actor_id, object_id) WHERE kind = 'Delete';

CREATE TABLE deliveries (
    activity_key TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
    inbox        TEXT NOT NULL,
    host         TEXT NOT NULL,
    status       INTEGER NOT NULL,
    attempts     INTEGER NOT NULL,
    delivered_at INTEGER NOT NULL,
    PRIMARY KEY (activity_key, inbox)
) WITHOUT ROWID;

CREATE TABLE dead_letters (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    activity_key     TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
    inbox            TEXT NOT NULL,
    host             TEXT NOT NULL,
    reason           TEXT NOT NULL,
    last_status      INTEGER,
    attempts         INTEGER NOT NULL,
    first_attempt_at INTEGER NOT NULL,
    last_attempt_at  INTEGER NOT NULL,
    replayed_at      INTEGER
);
CREATE INDEX dead_letters_open ON dead_letters (host, id) WHERE replayed_at IS NULL;

CREATE TABLE remote_keys (
    key_id         TEXT PRIMARY KEY,
    owner          TEXT NOT NULL,
    public_key_pem TEXT NOT NULL,
    fetched_at     INTEGER NOT NULL
);
CREATE INDEX remote_keys_owner ON remote_keys (owner);

CREATE TABLE follow_requests (
    actor_id     INTEGER NOT NULL REFERENCES actors(id) ON DELETE CASCADE,
    follower     TEXT NOT NULL,
    inbox        TEXT NOT NULL,
    shared_inbox TEXT,
    host         TEXT NOT NULL,
    follow       TEXT NOT NULL,
    PRIMARY KEY (actor_id, follower)
);

CREATE TABLE hosts (
    host       TEXT PRIMARY KEY,
    paused     INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL
);
