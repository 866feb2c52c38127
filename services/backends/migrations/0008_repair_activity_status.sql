-- Migration 6 changed after it had shipped, twice: as first released it made
-- only the domain policy tables; then it made the activity status tables
-- too (activity_targets without `at_ms`); then `at_ms` and the indexes
-- were added. A database migrated by either earlier form has version 6
-- recorded and would never get what came later. This brings every form to
-- the last one, and does nothing to a database that has it: tables made
-- if missing, the column added if missing (its default is evaluated once,
-- so no row is rewritten, then dropped: the code always sets it). The
-- indexes follow in migration 9, built CONCURRENTLY.
CREATE TABLE IF NOT EXISTS activity_targets (
    activity_key TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
    page         TEXT NOT NULL,
    host         TEXT NOT NULL,
    targets      BIGINT NOT NULL,
    at_ms        BIGINT NOT NULL,
    PRIMARY KEY (activity_key, page, host)
);
CREATE TABLE IF NOT EXISTS delivery_skips (
    activity_key TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
    inbox        TEXT NOT NULL,
    host         TEXT NOT NULL,
    reason       TEXT NOT NULL,
    at_ms        BIGINT NOT NULL,
    PRIMARY KEY (activity_key, inbox)
);
CREATE TABLE IF NOT EXISTS delivery_retries (
    activity_key TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
    inbox        TEXT NOT NULL,
    host         TEXT NOT NULL,
    attempts     INTEGER NOT NULL,
    last_status  INTEGER,
    next_ms      BIGINT NOT NULL,
    PRIMARY KEY (activity_key, inbox)
);
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM information_schema.columns
        WHERE table_schema = current_schema()
          AND table_name = 'activity_targets' AND column_name = 'at_ms'
    ) THEN
        ALTER TABLE activity_targets
            ADD COLUMN at_ms BIGINT NOT NULL DEFAULT (extract(epoch FROM now()) * 1000)::bigint;
        ALTER TABLE activity_targets ALTER COLUMN at_ms DROP DEFAULT;
    END IF;
END
$$;
