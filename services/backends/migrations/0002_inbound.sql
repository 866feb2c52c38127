-- Remote public keys by key id, with their owner. Negative answers (gone)
-- are kept so a flood of requests for a dead key costs nothing.
CREATE TABLE remote_keys (
    key_id         TEXT PRIMARY KEY,
    owner          TEXT NOT NULL,
    public_key_pem TEXT NOT NULL,
    fetched_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX remote_keys_owner ON remote_keys (owner);

-- The Follow activity behind each follower (Undo may name only its id).
ALTER TABLE followers ADD COLUMN follow_id TEXT;
CREATE INDEX followers_follow_id ON followers (follow_id);

-- Follows of actors that approve followers manually, waiting for the application.
CREATE TABLE follow_requests (
    actor_id     BIGINT NOT NULL REFERENCES actors(id) ON DELETE CASCADE,
    follower     TEXT NOT NULL,
    inbox        TEXT NOT NULL,
    shared_inbox TEXT,
    host         TEXT NOT NULL,
    follow       JSONB NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (actor_id, follower)
);
