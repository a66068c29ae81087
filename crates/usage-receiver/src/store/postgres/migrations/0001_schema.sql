-- The receiver's PostgreSQL schema, shared by every node of a fleet. Times are Unix
-- milliseconds and days are days since the Unix epoch (UTC), as in the SQLite store, so
-- both answer alike.

CREATE TABLE installs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    install_id  text NOT NULL UNIQUE,
    secret      text NOT NULL,
    site_hash   text NOT NULL,
    plan        text NOT NULL DEFAULT 'free',
    disabled    boolean NOT NULL DEFAULT false,
    enrolled_at bigint NOT NULL,
    last_seen   bigint
);

-- The dedupe key of every raw event kept. Its own table because a unique index on the
-- partitioned `events` would have to include the partition key (`created_at`), and an
-- event sent again must be a duplicate whatever it says. Two nodes inserting the same key
-- at once: the second waits for the first to commit, then skips it (ON CONFLICT).
CREATE TABLE event_ids (
    install    bigint NOT NULL,
    event_id   uuid NOT NULL,
    created_at bigint NOT NULL,
    PRIMARY KEY (install, event_id)
);
CREATE INDEX event_ids_by_time ON event_ids (created_at);

-- Raw events, one partition per UTC day (made ahead by the receiver, named
-- events_YYYYMMDD); retention drops whole partitions. The default partition only catches
-- an event whose day has no partition yet, so none is ever refused.
CREATE TABLE events (
    install            bigint NOT NULL,
    event_id           uuid NOT NULL,
    user_hash          bytea NOT NULL,
    source             smallint NOT NULL,
    model              text NOT NULL,
    prompt_tokens      bigint NOT NULL,
    completion_tokens  bigint NOT NULL,
    cached_tokens      bigint NOT NULL,
    cache_write_tokens bigint NOT NULL,
    reasoning_tokens   bigint NOT NULL,
    context            text,
    created_at         bigint NOT NULL,
    received_at        bigint NOT NULL
) PARTITION BY RANGE (created_at);
CREATE INDEX events_by_time ON events (created_at, install, event_id);
CREATE INDEX events_by_install ON events (install, created_at);
CREATE TABLE events_default PARTITION OF events DEFAULT;

-- Daily rollups per install and model, kept in the ingest transaction from the rows
-- actually inserted, so they always equal a sum over every event ever stored.
CREATE TABLE daily_usage (
    install           bigint NOT NULL,
    day               bigint NOT NULL,
    model             text NOT NULL,
    events            bigint NOT NULL,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    PRIMARY KEY (install, day, model)
);
CREATE INDEX daily_usage_by_day
    ON daily_usage (day) INCLUDE (install, model, events, prompt_tokens, completion_tokens);

-- The rate limit of every node together: per install, when its next request is due
-- (the generic cell rate algorithm of `rate_limit.rs`, in database time).
CREATE TABLE request_schedule (
    install    bigint PRIMARY KEY,
    next_at_ms bigint NOT NULL
);
