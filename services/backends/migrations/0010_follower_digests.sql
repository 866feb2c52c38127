-- FEP-8fcf: the digest of each local actor's partial followers collection
-- per remote `scheme://authority` (the XOR of the SHA-256 of the follower
-- ids there), for the `Collection-Synchronization` header. Computed for an
-- actor the first time it is needed (`follower_digests` in
-- store/postgres.rs), which stores the row with authority '' as the mark
-- that the actor's digests are kept; from then on the triggers below update
-- them in the transaction of every follow inserted or deleted, whichever
-- statement does it (a cascade, a suspension, an older process during a
-- rolling upgrade). Nothing is backfilled here: the followers table is not
-- read, and is locked only for the moment the triggers are created.
CREATE TABLE follower_digests (
    actor_id  BIGINT NOT NULL REFERENCES actors(id) ON DELETE CASCADE,
    authority TEXT NOT NULL,
    digest    BIT(256) NOT NULL,
    followers BIGINT NOT NULL,
    PRIMARY KEY (actor_id, authority)
);

CREATE FUNCTION stampede_follower_digests() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    sign BIGINT := CASE TG_OP WHEN 'INSERT' THEN 1 ELSE -1 END;
BEGIN
    -- Shared by every change to these actors' follows; the first
    -- computation of an actor's digests takes it exclusively, so it sees
    -- every follow committed before it and every later one sees its mark.
    PERFORM pg_advisory_xact_lock_shared(1718903910, b)
       FROM (SELECT DISTINCT (actor_id % 64)::int AS b FROM changed) l;
    INSERT INTO follower_digests AS d (actor_id, authority, digest, followers)
    SELECT c.actor_id, c.authority,
           bit_xor(('x' || encode(sha256(convert_to(c.follower, 'UTF8')), 'hex'))::bit(256)),
           sign * count(*)
      FROM (SELECT actor_id, follower,
                   substring(follower from '^(https?://[^/?#]+)/') AS authority
              FROM changed) c
     WHERE c.authority IS NOT NULL
       AND EXISTS (SELECT 1 FROM follower_digests m
                    WHERE m.actor_id = c.actor_id AND m.authority = '')
       AND EXISTS (SELECT 1 FROM actors a WHERE a.id = c.actor_id)
     GROUP BY c.actor_id, c.authority
     -- One order for every statement's row locks: two statements touching
     -- the same digests never wait for each other in a cycle.
     ORDER BY c.actor_id, c.authority
    ON CONFLICT (actor_id, authority) DO UPDATE
       SET digest = d.digest # EXCLUDED.digest, followers = d.followers + EXCLUDED.followers;
    RETURN NULL;
END $$;

CREATE TRIGGER followers_digests_insert AFTER INSERT ON followers
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION stampede_follower_digests();
CREATE TRIGGER followers_digests_delete AFTER DELETE ON followers
    REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION stampede_follower_digests();
