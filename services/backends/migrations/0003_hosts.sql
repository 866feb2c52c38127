-- Remote hosts an operator paused: deliveries to them are parked, not tried.
CREATE TABLE hosts (
    host       TEXT PRIMARY KEY,
    paused     BOOLEAN NOT NULL DEFAULT FALSE,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Supersession: is there a Delete of this object by this actor?
CREATE INDEX activities_deletes ON activities (actor_id, object_id) WHERE kind = 'Delete';
