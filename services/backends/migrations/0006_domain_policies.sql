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
