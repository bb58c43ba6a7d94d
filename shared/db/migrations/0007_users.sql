-- The sign-up flow (ch. 11): users, the keys that make a retried sign-up return the same user,
-- the outbox that makes each of a user's mails go out once, and notification registrations.
-- Queries live in `mediaflow-users`; the schema is one for the whole database.
CREATE TABLE users (
    id                  TEXT PRIMARY KEY,
    email               TEXT NOT NULL UNIQUE,
    phone               TEXT,
    zone                TEXT NOT NULL,
    notify_email        BIGINT NOT NULL,
    notify_sms          BIGINT NOT NULL,
    -- pending until the code of the verification mail is entered, then verified.
    state               TEXT NOT NULL,
    -- Whether `users.signed-up` / `users.verified` were acknowledged by the broker; a retried
    -- request publishes again while they are not.
    signed_up_announced BIGINT NOT NULL,
    verified_announced  BIGINT NOT NULL,
    -- HMAC-SHA256 of the code the verification mail carried (never the code), set in the same
    -- transaction that commits the mail as sent.
    code_hmac           TEXT,
    code_expires_at_ms  BIGINT,
    code_attempts       BIGINT NOT NULL,
    created_at_ms       BIGINT NOT NULL,
    verified_at_ms      BIGINT
);

CREATE TABLE idempotency_keys (
    key            TEXT PRIMARY KEY,
    request_sha256 TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL
);

-- One row per (user, kind of mail). pending -> sending (claimed by `owner` until
-- `lease_until_ms`) -> unconfirmed (committed as sent just before the message's final dot went
-- to the relay) -> sent (the relay answered 250); failed when the relay refused it for good.
CREATE TABLE mail_outbox (
    user_id        TEXT NOT NULL,
    kind           TEXT NOT NULL,
    message_id     TEXT NOT NULL,
    state          TEXT NOT NULL,
    owner          TEXT,
    lease_until_ms BIGINT,
    attempts       BIGINT NOT NULL,
    error          TEXT,
    updated_at_ms  BIGINT NOT NULL,
    sent_at_ms     BIGINT,
    PRIMARY KEY (user_id, kind)
);

CREATE TABLE notification_registrations (
    user_id          TEXT NOT NULL,
    channel          TEXT NOT NULL,
    address          TEXT NOT NULL,
    registered_at_ms BIGINT NOT NULL,
    PRIMARY KEY (user_id, channel)
);
