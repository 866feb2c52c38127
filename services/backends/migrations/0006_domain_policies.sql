-- Domain policies set at runtime (`stampede domain`): allow, silence or
-- suspend a remote domain and its subdomains. New tables only.
CREATE TABLE domain_policies (
    domain     TEXT PRIMARY KEY,
    policy     TEXT NOT NULL CHECK (policy IN ('allow', 'silence', 'suspend')),
    reason     TEXT NOT NULL DEFAULT '',
    updated_ms BIGINT NOT NULL
);
-- Domains STAMPEDE_BLOCKED_DOMAINS has seeded: each is seeded once, so a
-- rule an operator removed is not put back at the next start.
CREATE TABLE domain_policy_seeds (
    domain TEXT PRIMARY KEY
);

-- What each activity's fanout queued, per page and host (a page run again
-- rewrites its own rows), and the targets not sent for a reason: skipped by
-- fanout (policy, unavailable) or dropped at send time (suspended,
-- superseded). With the success records and dead letters, the delivery
-- status of an activity is exact after any crash.
CREATE TABLE activity_targets (
    activity_key TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
    page         TEXT NOT NULL,
    host         TEXT NOT NULL,
    targets      BIGINT NOT NULL,
    at_ms        BIGINT NOT NULL,
    PRIMARY KEY (activity_key, page, host)
);
CREATE TABLE delivery_skips (
    activity_key TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
    inbox        TEXT NOT NULL,
    host         TEXT NOT NULL,
    reason       TEXT NOT NULL,
    at_ms        BIGINT NOT NULL,
    PRIMARY KEY (activity_key, inbox)
);
-- Deliveries waiting for a retry (a failed attempt behind them); removed
-- when they succeed or stop.
CREATE TABLE delivery_retries (
    activity_key TEXT NOT NULL REFERENCES activities(key) ON DELETE CASCADE,
    inbox        TEXT NOT NULL,
    host         TEXT NOT NULL,
    attempts     INTEGER NOT NULL,
    last_status  INTEGER,
    next_ms      BIGINT NOT NULL,
    PRIMARY KEY (activity_key, inbox)
);
-- Pruned with the success records (STAMPEDE_DELIVERY_RECORD_RETENTION).
CREATE INDEX activity_targets_at ON activity_targets (at_ms);
CREATE INDEX delivery_skips_at ON delivery_skips (at_ms);
CREATE INDEX delivery_retries_next ON delivery_retries (next_ms);
