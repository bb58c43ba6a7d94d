-- Work items found by HTTP sources (the book's `/api/v1/items` contract). One row per
-- (source, name): a source enqueues an item only when it inserts its row.
CREATE TABLE items (
    id            TEXT PRIMARY KEY,
    source        TEXT NOT NULL,
    name          TEXT NOT NULL,
    status        TEXT NOT NULL,
    error         TEXT,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    UNIQUE (source, name)
);

-- Results now belong to an entity: a media item or a work item. Rebuilt rather than altered:
-- SQLite cannot drop a foreign key in place.
CREATE TABLE results_v4 (
    entity_id     TEXT NOT NULL,
    stage         TEXT NOT NULL,
    stage_version TEXT NOT NULL,
    name          TEXT NOT NULL,
    bucket        TEXT NOT NULL,
    object_key    TEXT NOT NULL,
    content_type  TEXT NOT NULL,
    size_bytes    BIGINT NOT NULL,
    sha256        TEXT NOT NULL,
    width         BIGINT,
    height        BIGINT,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (entity_id, stage, stage_version, name)
);

INSERT INTO results_v4
SELECT media_id, stage, stage_version, name, bucket, object_key, content_type, size_bytes, sha256,
       width, height, created_at_ms
FROM results;

DROP TABLE results;

ALTER TABLE results_v4 RENAME TO results;

CREATE INDEX results_stage ON results (stage);
