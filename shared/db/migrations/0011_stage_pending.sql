-- The events on their way to a stage about an entity: one row when an event about it is
-- published on a topic the stage reads, gone when the stage has finished with that event (done
-- or failed). A stage that finishes one event while another waits for it stays queued, so the
-- entity does not read done in between. Keyed by the event's id, which is the same each time a
-- stage makes the same output: a redelivered or republished event adds and removes nothing more.
CREATE TABLE stage_pending (
    entity_id TEXT NOT NULL,
    stage     TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    PRIMARY KEY (entity_id, stage, event_id)
);
