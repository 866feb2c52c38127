-- Local actors with the RSA-2048 keys stampede generated for them.
CREATE TABLE actors (
    id                BIGSERIAL PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    display_name      TEXT NOT NULL DEFAULT '',
    summary           TEXT NOT NULL DEFAULT '',
    manually_approves BOOLEAN NOT NULL DEFAULT FALSE,
    private_key       BYTEA NOT NULL,
    public_key_pem    TEXT NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Remote actors following local ones. `target` is where a delivery goes:
-- the shared inbox where there is one, else the personal inbox.
CREATE TABLE followers (
    actor_id     BIGINT NOT NULL REFERENCES actors(id) ON DELETE CASCADE,
    follower     TEXT NOT NULL,
    inbox        TEXT NOT NULL,
    shared_inbox TEXT,
    host         TEXT NOT NULL,
    target       TEXT GENERATED ALWAYS AS (COALESCE(NULLIF(shared_inbox, ''), inbox)) STORED,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (actor_id, follower)
);
-- Keyset paging over distinct targets.
CREATE INDEX followers_target ON followers (actor_id, target);
CREATE INDEX followers_follower ON followers (follower);
CREATE INDEX followers_host ON followers (host);

-- Remote actors we addressed or that addressed us.
CREATE TABLE remote_actors (
    id             TEXT PRIMARY KEY,
    inbox          TEXT NOT NULL,
    shared_inbox   TEXT,
    key_id         TEXT,
    public_key_pem TEXT,
    host           TEXT NOT NULL,
    fetched_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Outbound activities. Queue messages carry `key`, never the body.
CREATE TABLE activities (
    key             TEXT PRIMARY KEY,
    ap_id           TEXT NOT NULL UNIQUE,
    actor_id        BIGINT NOT NULL REFERENCES actors(id) ON DELETE CASCADE,
    kind            TEXT NOT NULL,
    object_id       TEXT,
    idempotency_key TEXT,
    body            JSONB NOT NULL,
    delivered_body  BYTEA NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    enqueued_at     TIMESTAMPTZ,
    fanned_out_at   TIMESTAMPTZ,
    targets         BIGINT,
    UNIQUE (actor_id, idempotency_key)
);

-- Successful deliveries, recorded before the queue message is acknowledged:
-- a redelivered job whose row exists is not sent again.
CREATE TABLE deliveries (
    activity_key TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
    inbox        TEXT NOT NULL,
    host         TEXT NOT NULL,
    status       INTEGER NOT NULL,
    attempts     INTEGER NOT NULL,
    delivered_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (activity_key, inbox)
);

-- Deliveries that stopped for good, with why.
CREATE TABLE dead_letters (
    id               BIGSERIAL PRIMARY KEY,
    activity_key     TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
    inbox            TEXT NOT NULL,
    host             TEXT NOT NULL,
    reason           TEXT NOT NULL,
    last_status      INTEGER,
    attempts         INTEGER NOT NULL,
    first_attempt_at TIMESTAMPTZ NOT NULL,
    last_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    replayed_at      TIMESTAMPTZ
);
CREATE INDEX dead_letters_open ON dead_letters (host, id) WHERE replayed_at IS NULL;
