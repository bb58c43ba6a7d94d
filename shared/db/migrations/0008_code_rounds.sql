-- A user may ask for a new verification code (`POST /v1/users/{id}/code`). Each code is a
-- round: 0 went with the sign-up, each request adds one. A new code replaces the one before.
ALTER TABLE users ADD COLUMN code_round BIGINT NOT NULL DEFAULT 0;
-- When the latest round was asked for (NULL: only the sign-up's code so far).
ALTER TABLE users ADD COLUMN code_requested_at_ms BIGINT;
-- Whether `mediaflow.user.code-requested` of the latest round was acknowledged by the broker.
ALTER TABLE users ADD COLUMN code_requested_announced BIGINT NOT NULL DEFAULT 1;

-- One row per (user, kind of mail, round): each round's mail goes out once. Welcome mails
-- have round 0 only.
CREATE TABLE mail_outbox_rounds (
    user_id        TEXT NOT NULL,
    kind           TEXT NOT NULL,
    round          BIGINT NOT NULL,
    message_id     TEXT NOT NULL,
    state          TEXT NOT NULL,
    owner          TEXT,
    lease_until_ms BIGINT,
    attempts       BIGINT NOT NULL,
    error          TEXT,
    updated_at_ms  BIGINT NOT NULL,
    sent_at_ms     BIGINT,
    PRIMARY KEY (user_id, kind, round)
);
INSERT INTO mail_outbox_rounds (user_id, kind, round, message_id, state, owner, lease_until_ms,
    attempts, error, updated_at_ms, sent_at_ms)
SELECT user_id, kind, 0, message_id, state, owner, lease_until_ms, attempts, error,
    updated_at_ms, sent_at_ms
FROM mail_outbox;
DROP TABLE mail_outbox;
ALTER TABLE mail_outbox_rounds RENAME TO mail_outbox;
