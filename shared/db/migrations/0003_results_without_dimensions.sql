-- Outputs that are not images (an exec worker's JSON, text...) have no width or height.
-- Rebuilt rather than altered: SQLite cannot drop a NOT NULL constraint in place.
CREATE TABLE results_v3 (
    media_id      TEXT NOT NULL REFERENCES media (id),
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
    PRIMARY KEY (media_id, stage, stage_version, name)
);

INSERT INTO results_v3
SELECT media_id, stage, stage_version, name, bucket, object_key, content_type, size_bytes, sha256,
       width, height, created_at_ms
FROM results;

DROP TABLE results;

ALTER TABLE results_v3 RENAME TO results;
