-- Dead letters that `mediaflow dlq replay` has published again, so each is replayed once.
CREATE TABLE dead_letter_replays (
    dead_letter_id TEXT PRIMARY KEY,
    stage          TEXT NOT NULL,
    replayed_at_ms BIGINT NOT NULL
);
