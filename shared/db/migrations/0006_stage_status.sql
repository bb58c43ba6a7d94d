-- Each stage's own state for each media item or work item the pipeline sends it: queued when an
-- event about the entity is published on a topic the stage reads, then running, done or failed.
-- The entity's own status is derived from these rows (failed if one stage failed, queued while
-- one is queued or running, done when all are done), never from whichever stage wrote last.
CREATE TABLE stage_status (
    entity_id     TEXT NOT NULL,
    stage         TEXT NOT NULL,
    state         TEXT NOT NULL,
    error         TEXT,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (entity_id, stage)
);
