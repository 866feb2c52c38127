-- Remote actors and keys learnt before fetched documents were bound to the
-- URL fetched are not to be trusted; both are caches, refetched on demand.
DELETE FROM remote_actors;
DELETE FROM remote_keys;
