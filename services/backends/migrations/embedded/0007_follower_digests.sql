-- FEP-8fcf (see migrations/0010_follower_digests.sql): each local actor's
-- partial followers collection digests per remote `scheme://authority`,
-- computed for an actor when first needed (the row with authority '' marks
-- an actor whose digests are kept) and updated by these triggers with every
-- follow inserted or deleted. The functions they call are the store's own
-- (registered on the connection, `store/embedded.rs`).
CREATE TABLE follower_digests (
    actor_id  INTEGER NOT NULL REFERENCES actors(id) ON DELETE CASCADE,
    authority TEXT NOT NULL,
    digest    BLOB NOT NULL,
    followers INTEGER NOT NULL,
    PRIMARY KEY (actor_id, authority)
) WITHOUT ROWID;

CREATE TRIGGER followers_digests_insert AFTER INSERT ON followers
WHEN stampede_authority(NEW.follower) IS NOT NULL
 AND EXISTS (SELECT 1 FROM follower_digests WHERE actor_id = NEW.actor_id AND authority = '')
BEGIN
    INSERT OR IGNORE INTO follower_digests (actor_id, authority, digest, followers)
        VALUES (NEW.actor_id, stampede_authority(NEW.follower), zeroblob(32), 0);
    UPDATE follower_digests
       SET digest = stampede_digest_toggle(digest, NEW.follower), followers = followers + 1
     WHERE actor_id = NEW.actor_id AND authority = stampede_authority(NEW.follower);
END;

CREATE TRIGGER followers_digests_delete AFTER DELETE ON followers
WHEN stampede_authority(OLD.follower) IS NOT NULL
 AND EXISTS (SELECT 1 FROM follower_digests WHERE actor_id = OLD.actor_id AND authority = '')
 AND EXISTS (SELECT 1 FROM actors WHERE id = OLD.actor_id)
BEGIN
    INSERT OR IGNORE INTO follower_digests (actor_id, authority, digest, followers)
        VALUES (OLD.actor_id, stampede_authority(OLD.follower), zeroblob(32), 0);
    UPDATE follower_digests
       SET digest = stampede_digest_toggle(digest, OLD.follower), followers = followers - 1
     WHERE actor_id = OLD.actor_id AND authority = stampede_authority(OLD.follower);
END;
