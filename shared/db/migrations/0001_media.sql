-- Media items and the results stages produced for them.
-- Portable between SQLite and PostgreSQL: times are Unix milliseconds, ids are text.

CREATE TABLE media (
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,
    content_type  TEXT NOT NULL,
    filename      TEXT,
    bucket        TEXT NOT NULL,
    object_key    TEXT NOT NULL,
    size_bytes    BIGINT NOT NULL,
    sha256        TEXT NOT NULL,
    status        TEXT NOT NULL,
    error         TEXT,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

CREATE INDEX media_status ON media (status);

-- One row per output, keyed by (entity, stage, stage version, output name): reprocessing the same
-- input with the same stage version upserts the same row.
CREATE TABLE results (
    media_id      TEXT NOT NULL REFERENCES media (id),
    stage         TEXT NOT NULL,
    stage_version TEXT NOT NULL,
    name          TEXT NOT NULL,
    bucket        TEXT NOT NULL,
    object_key    TEXT NOT NULL,
    content_type  TEXT NOT NULL,
    size_bytes    BIGINT NOT NULL,
    sha256        TEXT NOT NULL,
    width         BIGINT NOT NULL,
    height        BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (media_id, stage, stage_version, name)
);
