-- See migrations/0004_host_health.sql.
ALTER TABLE hosts ADD COLUMN failing_since_ms INTEGER;
ALTER TABLE hosts ADD COLUMN open_until_ms INTEGER;
ALTER TABLE hosts ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN unavailable INTEGER NOT NULL DEFAULT 0;
CREATE INDEX hosts_failing ON hosts (failing_since_ms) WHERE failing_since_ms IS NOT NULL;
