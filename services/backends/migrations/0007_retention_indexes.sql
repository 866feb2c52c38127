-- Bounded retention: the pruner finds old success records and dead letters
-- by time, and an operator's purge finds a host's dead letters, replayed or
-- not, without scanning the tables.
--
-- Run outside a transaction, one statement at a time (see `CONCURRENT` in
-- store/postgres.rs): a plain CREATE INDEX on a big `deliveries` blocks
-- every delivery's record for the whole build, CONCURRENTLY does not. Each
-- index is dropped first in case a build was interrupted, which leaves an
-- invalid index behind.
DROP INDEX CONCURRENTLY IF EXISTS deliveries_delivered_at;
CREATE INDEX CONCURRENTLY deliveries_delivered_at ON deliveries (delivered_at);
DROP INDEX CONCURRENTLY IF EXISTS dead_letters_last_attempt;
CREATE INDEX CONCURRENTLY dead_letters_last_attempt ON dead_letters (last_attempt_at);
DROP INDEX CONCURRENTLY IF EXISTS dead_letters_replayed;
CREATE INDEX CONCURRENTLY dead_letters_replayed ON dead_letters (replayed_at)
    WHERE replayed_at IS NOT NULL;
DROP INDEX CONCURRENTLY IF EXISTS dead_letters_host;
CREATE INDEX CONCURRENTLY dead_letters_host ON dead_letters (host, id);
