-- Coordinated stages (ch. 12): the joins' barriers, the reducers' contributions and groups,
-- their reports, and the events both emit exactly once (the emission ledger).
--
-- Every change a join or reducer makes for an input is idempotent (keyed by what the input is
-- about), and made in one transaction with the emissions it releases; the input's offset is
-- stored only after that transaction commits. A crash redelivers inputs whose changes may be
-- in: applying them again changes nothing, so state and offsets never disagree.

-- One key's join (a media's branches, a batch's items).
CREATE TABLE join_state (
    stage         TEXT NOT NULL,
    join_key      TEXT NOT NULL,
    -- JSON: mediaflow_coordination::Barrier.
    barrier       TEXT NOT NULL,
    -- JSON: what the released event carries besides the barrier's outcome (a media's batch).
    context       TEXT,
    -- Wall-clock ms after which what has not arrived counts as timed out; NULL: never.
    deadline_ms   BIGINT,
    released      BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (stage, join_key)
);
CREATE INDEX join_state_deadline ON join_state (stage, released, deadline_ms);

-- One reducer group (a batch, or a tumbling window): what closes it and whether it reported.
CREATE TABLE reduce_groups (
    stage         TEXT NOT NULL,
    grp           TEXT NOT NULL,
    -- JSON: what closed it (a batch's completion: outcome, items, failures); NULL while open.
    closing       TEXT,
    -- For a window: its end (ms); it closes once the watermark passes it.
    window_end_ms BIGINT,
    reported      BIGINT NOT NULL,
    PRIMARY KEY (stage, grp)
);
CREATE INDEX reduce_groups_open ON reduce_groups (stage, reported, window_end_ms);

-- One input's contribution to a group, kept until the group reports (so a report merges
-- exactly the inputs its closing names, each once).
CREATE TABLE reduce_inputs (
    stage    TEXT NOT NULL,
    grp      TEXT NOT NULL,
    input    TEXT NOT NULL,
    -- JSON: aggregate name -> mediaflow_coordination::Partial.
    partials TEXT NOT NULL,
    PRIMARY KEY (stage, grp, input)
);

-- A windowed reducer's event-time watermark: the latest event time seen.
CREATE TABLE reduce_watermarks (
    stage       TEXT PRIMARY KEY,
    max_time_ms BIGINT NOT NULL
);

-- Reports, upserted by (stage, group).
CREATE TABLE reports (
    stage          TEXT NOT NULL,
    grp            TEXT NOT NULL,
    batch_id       TEXT,
    report         TEXT NOT NULL,
    reported_at_ms BIGINT NOT NULL,
    PRIMARY KEY (stage, grp)
);
CREATE INDEX reports_batch ON reports (batch_id);

-- Events a coordinated stage emits exactly once. Recorded in the transaction that decided
-- them; a relay publishes each on a partition chosen up front, after noting that partition's end
-- offset, and marks it published once acknowledged. A relay that finds one noted but not marked
-- (its publisher crashed) reads the partition from the noted offset: the event is there (mark
-- it) or it is not (send it).
CREATE TABLE emissions (
    id               TEXT PRIMARY KEY,
    stage            TEXT NOT NULL,
    topic            TEXT NOT NULL,
    msg_key          TEXT NOT NULL,
    -- The CloudEvent, structured JSON.
    event            TEXT NOT NULL,
    created_at_ms    BIGINT NOT NULL,
    partition_no     BIGINT,
    from_offset      BIGINT,
    lease_until_ms   BIGINT,
    published_offset BIGINT,
    published_at_ms  BIGINT
);
CREATE INDEX emissions_pending ON emissions (stage, published_at_ms, created_at_ms);
