-- Outbound host health as operators see it in status (the live state is in
-- Redis): failing since, circuit open until, unavailable.
ALTER TABLE hosts ADD COLUMN failing_since_ms BIGINT;
ALTER TABLE hosts ADD COLUMN open_until_ms BIGINT;
ALTER TABLE hosts ADD COLUMN failures BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN unavailable BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX hosts_failing ON hosts (failing_since_ms) WHERE failing_since_ms IS NOT NULL;
