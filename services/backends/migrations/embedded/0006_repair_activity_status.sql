-- See migrations/0008_repair_activity_status.sql: migration 4 changed after
-- it had shipped. The tables are made if missing; an `activity_targets`
-- without `at_ms` is rebuilt before this runs (`repair_activity_targets` in
-- store/embedded.rs: SQLite has no ADD COLUMN IF NOT EXISTS).
CREATE TABLE IF NOT EXISTS activity_targets (
    activity_key TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
    page         TEXT NOT NULL,
    host         TEXT NOT NULL,
    targets      INTEGER NOT NULL,
    at_ms        INTEGER NOT NULL,
    PRIMARY KEY (activity_key, page, host)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS delivery_skips (
    activity_key TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
    inbox        TEXT NOT NULL,
    host         TEXT NOT NULL,
    reason       TEXT NOT NULL,
    at_ms        INTEGER NOT NULL,
    PRIMARY KEY (activity_key, inbox)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS delivery_retries (
    activity_key TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
    inbox        TEXT NOT NULL,
    host         TEXT NOT NULL,
    attempts     INTEGER NOT NULL,
    last_status  INTEGER,
    next_ms      INTEGER NOT NULL,
    PRIMARY KEY (activity_key, inbox)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS activity_targets_at ON activity_targets (at_ms);
CREATE INDEX IF NOT EXISTS delivery_skips_at ON delivery_skips (at_ms);
CREATE INDEX IF NOT EXISTS delivery_retries_next ON delivery_retries (next_ms);
