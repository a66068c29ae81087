-- usage-agent local database.
--
-- Applied when the database is opened. Each migration is a block that starts with a
-- `-- migration N` line; the database records the last one applied in PRAGMA user_version.
-- Migrations are append-only: never edit a block that has shipped, add a new one below.

-- migration 1
-- Small facts about this database: the install id (stored once, not per event row),
-- sync bookkeeping (last_sync, last_attempt, consecutive_failures, last_error, ...).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- Model names, stored once; events refer to them by id to keep rows small.
CREATE TABLE models (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);

-- One row per AI call. `seq` (the rowid) is the arrival order, which is the sync order.
-- Times are milliseconds since the Unix epoch; `source` is 0 inline, 1 bulk, 2 queue, 3 manual.
-- `sync_state`: 0 pending, 1 synced, 2 failed (the reason is in sync_failures).
CREATE TABLE events (
    seq                INTEGER PRIMARY KEY,
    event_id           BLOB    NOT NULL,
    user_id            INTEGER NOT NULL,
    source             INTEGER NOT NULL,
    model_id           INTEGER NOT NULL REFERENCES models(id),
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    cached_tokens      INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens   INTEGER NOT NULL DEFAULT 0,
    context            TEXT,
    created_at         INTEGER NOT NULL,
    sync_state         INTEGER NOT NULL DEFAULT 0,
    synced_at          INTEGER
);

-- Idempotent event ids: a re-sent id is a duplicate, whatever its content.
CREATE UNIQUE INDEX events_event_id ON events(event_id);
-- The sync queue: only unsynced rows are indexed, so the index stays small once synced.
CREATE INDEX events_unsynced ON events(sync_state, seq) WHERE sync_state <> 1;
-- Date ranges: export, retention and local analytics.
CREATE INDEX events_created_at ON events(created_at);

-- Why an event was rejected by the backend; rows exist only for failed events.
CREATE TABLE sync_failures (
    seq       INTEGER PRIMARY KEY,
    reason    TEXT    NOT NULL,
    failed_at INTEGER NOT NULL
);

-- One row per failed sync attempt (a batch), for the 24-hour error_categories counts.
CREATE TABLE sync_errors (
    at       INTEGER NOT NULL,
    category TEXT    NOT NULL
);
CREATE INDEX sync_errors_at ON sync_errors(at);

-- migration 2
-- Daily summaries: one row per user, source, model and day, the day taken in the
-- agent's `timezone` (the install is implied: one database per install). The rollup
-- rebuilds a day from its raw events (delete, then insert the sums, in one transaction),
-- so a sum is never added twice; rows are kept `retention.daily_days`. `usage_date` is
-- `YYYY-MM-DD`, so text order is date order. The last event `seq` rolled up is in `meta`
-- (`rollup_seq`).
CREATE TABLE usage_daily (
    usage_date         TEXT    NOT NULL,
    user_id            INTEGER NOT NULL,
    source             INTEGER NOT NULL,
    model_id           INTEGER NOT NULL REFERENCES models(id),
    events             INTEGER NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    total_tokens       INTEGER NOT NULL,
    cached_tokens      INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    reasoning_tokens   INTEGER NOT NULL,
    PRIMARY KEY (usage_date, user_id, source, model_id)
) WITHOUT ROWID;
-- Erasure of one user (`forget`).
CREATE INDEX usage_daily_user ON usage_daily(user_id);

-- migration 3
-- What on the site made each call (`plugin:ai-alt-text`, `theme:acme`, `core`), stored
-- once like model names. `origin_id` 0 means the event named no origin: no row has id 0,
-- so the column carries no reference (and existing events read as 0, no origin).
CREATE TABLE origins (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
ALTER TABLE events ADD COLUMN origin_id INTEGER NOT NULL DEFAULT 0;

-- The daily summaries gain the origin as a key. A primary key cannot change in place, so
-- the table is rebuilt; existing rows keep their sums under origin 0.
CREATE TABLE usage_daily_v3 (
    usage_date         TEXT    NOT NULL,
    user_id            INTEGER NOT NULL,
    source             INTEGER NOT NULL,
    model_id           INTEGER NOT NULL REFERENCES models(id),
    origin_id          INTEGER NOT NULL DEFAULT 0,
    events             INTEGER NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    total_tokens       INTEGER NOT NULL,
    cached_tokens      INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    reasoning_tokens   INTEGER NOT NULL,
    PRIMARY KEY (usage_date, user_id, source, model_id, origin_id)
) WITHOUT ROWID;
INSERT INTO usage_daily_v3 (usage_date, user_id, source, model_id, origin_id, events,
    prompt_tokens, completion_tokens, total_tokens, cached_tokens, cache_write_tokens,
    reasoning_tokens)
SELECT usage_date, user_id, source, model_id, 0, events, prompt_tokens, completion_tokens,
    total_tokens, cached_tokens, cache_write_tokens, reasoning_tokens
FROM usage_daily;
DROP TABLE usage_daily;
ALTER TABLE usage_daily_v3 RENAME TO usage_daily;
CREATE INDEX usage_daily_user ON usage_daily(user_id);

-- migration 4
-- The sync queue becomes a log with a cursor (src/store/sync.rs explains it whole): events
-- no longer carry their own sync state, so recording one touches no queue index and
-- delivering it changes no event row.
--
-- `meta.synced_through` is the cursor: every event at or below it is resolved (synced,
-- or failed with its reason in sync_failures) except those listed in `sync_requeued`.
-- `synced_ranges` holds one row per run of consecutive events the backend acknowledged
-- in one commit (a batch, not an event), with the time it was recorded: what export
-- reads as `synced_at`, and what tells which events above the cursor were acknowledged
-- out of order by parallel lanes. Ranges never overlap.
CREATE TABLE synced_ranges (
    first_seq INTEGER PRIMARY KEY,
    last_seq  INTEGER NOT NULL,
    synced_at INTEGER
);

-- Failed events at or below the cursor that `retry-failed` put back in the queue.
CREATE TABLE sync_requeued (
    seq INTEGER PRIMARY KEY
);

-- Synced rows become ranges: each run of consecutive synced events (in `seq` order, over
-- the events that exist) sharing one `synced_at` is one range (gaps and islands).
INSERT INTO synced_ranges (first_seq, last_seq, synced_at)
SELECT min(seq), max(seq), synced_at FROM (
    SELECT seq, sync_state, synced_at,
           row_number() OVER (ORDER BY seq)
         - row_number() OVER (PARTITION BY sync_state, synced_at ORDER BY seq) AS island
    FROM events)
WHERE sync_state = 1
GROUP BY synced_at, island;

-- A failed event is one with a reason: keep exactly the reasons of failed rows, and give
-- a failed row that lost its reason one that says so.
DELETE FROM sync_failures WHERE seq NOT IN (SELECT seq FROM events WHERE sync_state = 2);
INSERT OR IGNORE INTO sync_failures (seq, reason, failed_at)
SELECT seq, 'rejected by the backend (the reason was not kept)', 0
FROM events WHERE sync_state = 2;

-- The cursor stops just below the first pending event (or at the newest event when none
-- is pending), so no pending event sits at or below it.
INSERT INTO meta (key, value) VALUES ('synced_through', CAST(coalesce(
    (SELECT min(seq) FROM events WHERE sync_state = 0) - 1,
    (SELECT max(seq) FROM events),
    0) AS TEXT))
ON CONFLICT(key) DO UPDATE SET value = excluded.value;

DROP INDEX events_unsynced;
ALTER TABLE events DROP COLUMN synced_at;
ALTER TABLE events DROP COLUMN sync_state;

-- migration 5
-- Event ids leave their unique index for a table filled in sorted batches
-- (src/store/event_ids.rs explains it whole): an index on random ids made every recorded
-- event rewrite an index leaf of its own.
--
-- `event_ids` holds the id of every event at or below `meta.event_ids_through`; the ids of
-- the events above it are read from the log into the writer's memory. Every id stored
-- so far goes into the table now, sorted, and the mark to the newest event.
CREATE TABLE event_ids (
    event_id BLOB PRIMARY KEY
) WITHOUT ROWID;
INSERT INTO event_ids (event_id) SELECT event_id FROM events ORDER BY event_id;
INSERT INTO meta (key, value)
VALUES ('event_ids_through', CAST((SELECT coalesce(max(seq), 0) FROM events) AS TEXT))
ON CONFLICT(key) DO UPDATE SET value = excluded.value;
DROP INDEX events_event_id;
