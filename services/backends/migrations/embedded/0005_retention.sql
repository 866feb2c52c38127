-- Bounded retention: the pruner finds old success records and dead letters
-- by time, and an operator's purge finds a host's dead letters, replayed or
-- not, without scanning the tables.
CREATE INDEX IF NOT EXISTS deliveries_delivered_at ON deliveries (delivered_at);
CREATE INDEX IF NOT EXISTS dead_letters_last_attempt ON dead_letters (last_attempt_at);
CREATE INDEX IF NOT EXISTS dead_letters_replayed ON dead_letters (replayed_at)
    WHERE replayed_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS dead_letters_host ON dead_letters (host, id);
