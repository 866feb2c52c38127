-- Remote actors and keys learnt before fetched documents were bound to the
-- URL fetched (a key document could describe another server's actor) are
-- not to be trusted. Both tables are caches of remote documents, refetched
-- on demand: empty them. TRUNCATE takes its lock for an instant whatever
-- the tables' size.
TRUNCATE remote_actors, remote_keys;
