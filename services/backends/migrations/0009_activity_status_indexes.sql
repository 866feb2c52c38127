-- The indexes of the activity status tables (see migration 8), for a
-- database whose migration 6 did not make them. Run outside a transaction,
-- one statement at a time (`CONCURRENT` in store/postgres.rs): these tables
-- grow with every fanout. IF NOT EXISTS leaves a database that has them
-- alone; an invalid one, left by an interrupted build, is dropped first.
DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'activity_targets_at' AND pg_table_is_visible(c.oid) AND NOT i.indisvalid) THEN DROP INDEX activity_targets_at; END IF; END $$;
CREATE INDEX CONCURRENTLY IF NOT EXISTS activity_targets_at ON activity_targets (at_ms);
DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'delivery_skips_at' AND pg_table_is_visible(c.oid) AND NOT i.indisvalid) THEN DROP INDEX delivery_skips_at; END IF; END $$;
CREATE INDEX CONCURRENTLY IF NOT EXISTS delivery_skips_at ON delivery_skips (at_ms);
DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'delivery_retries_next' AND pg_table_is_visible(c.oid) AND NOT i.indisvalid) THEN DROP INDEX delivery_retries_next; END IF; END $$;
CREATE INDEX CONCURRENTLY IF NOT EXISTS delivery_retries_next ON delivery_retries (next_ms);
