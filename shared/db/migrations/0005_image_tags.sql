-- The image stage's tags of each image, for queries (near duplicates by perceptual hash, photos
-- by camera, time or place). The whole tag set is `tags_json`; the columns are copies of its
-- most queried fields. One row per (media, stage version).
CREATE TABLE image_tags (
    media_id      TEXT NOT NULL,
    stage_version TEXT NOT NULL,
    phash         TEXT NOT NULL,
    camera_make   TEXT,
    camera_model  TEXT,
    taken_at      TEXT,
    latitude      DOUBLE PRECISION,
    longitude     DOUBLE PRECISION,
    tags_json     TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (media_id, stage_version)
);

CREATE INDEX image_tags_phash ON image_tags (phash);
