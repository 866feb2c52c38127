-- See migrations/0006_domain_policies.sql.
CREATE TABLE domain_policies (
    domain     TEXT PRIMARY KEY,
    policy     TEXT NOT NULL CHECK (policy IN ('allow', 'silence', 'suspend')),
    reason     TEXT NOT NULL DEFAULT '',
    updated_ms INTEGER NOT NULL
);
CREATE TABLE domain_policy_seeds (
    domain TEXT PRIMARY KEY
);

-- See migrations/0006_domain_policies.sql.
CREATE TABLE activity_targets (
    activity_key TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
    page         TEXT NOT NULL,
    host         TEXT NOT NULL,
    targets      INTEGER NOT NULL,
    at_ms        INTEGER NOT NULL,
    PRIMARY KEY (activity_key, page, host)
) WITHOUT ROWID;
CREATE TABLE delivery_skips (
    activity_key TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
    inbox        TEXT NOT NULL,
    host         TEXT NOT NULL,
    reason       TEXT NOT NULL,
    at_ms        INTEGER NOT NULL,
    PRIMARY KEY (activity_key, inbox)
) WITHOUT ROWID;
CREATE TABLE delivery_retries (
    activity_key TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
    inbox        TEXT NOT NULL,
    host         TEXT NOT NULL,
    attempts     INTEGER NOT NULL,
    last_status  INTEGER,
    next_ms      INTEGER NOT NULL,
    PRIMARY KEY (activity_key, inbox)
) WITHOUT ROWID;
-- Pruned with the success records (STAMPEDE_DELIVERY_RECORD_RETENTION).
CREATE INDEX activity_targets_at ON activity_targets (at_ms);
CREATE INDEX delivery_skips_at ON delivery_skips (at_ms);
CREATE INDEX delivery_retries_next ON delivery_retries (next_ms);
