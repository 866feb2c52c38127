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
