-- Batches (ch. 12): media that complete together. A batch expects a count of items or a
-- manifest of names; uploads into it take one of its items (`batch_items.media_id`).
CREATE TABLE batches (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    -- The number of items it waits for (a manifest's length, for a manifest batch).
    expected_items BIGINT NOT NULL,
    -- 1: items are the manifest's names, listed in batch_items from the start; 0: any names.
    manifest       BIGINT NOT NULL,
    -- Items taken so far (uploads accepted into the batch).
    uploaded       BIGINT NOT NULL,
    failure_policy TEXT NOT NULL,
    timeout_secs   BIGINT,
    -- open (taking uploads), then complete, partial or failed once its join releases it.
    state          TEXT NOT NULL,
    -- The batch's report (JSON) once reduced.
    report         TEXT,
    created_at_ms  BIGINT NOT NULL,
    completed_at_ms BIGINT
);

CREATE TABLE batch_items (
    batch_id    TEXT NOT NULL,
    name        TEXT NOT NULL,
    -- The upload that took this item; NULL while a manifest item waits for its upload.
    media_id    TEXT,
    added_at_ms BIGINT,
    PRIMARY KEY (batch_id, name)
);
CREATE INDEX batch_items_media ON batch_items (media_id);
