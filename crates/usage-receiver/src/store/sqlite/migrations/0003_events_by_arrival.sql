-- Events move from a table clustered on the random (install, event_id) key to a rowid
-- table that grows at its end, with the dedupe key in a unique index. An insert then
-- dirties the table's last page (shared by the batch) and one small index leaf,
-- instead of a random, nearly full table leaf that often splits: about a third fewer
-- bytes written per event, and fewer checkpoint pages.
CREATE TABLE events_by_arrival (
    install            INTEGER NOT NULL,
    event_id           BLOB NOT NULL,
    user_hash          BLOB NOT NULL,
    source             INTEGER NOT NULL,
    model              TEXT NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    cached_tokens      INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    reasoning_tokens   INTEGER NOT NULL,
    context            TEXT,
    created_at         INTEGER NOT NULL,
    received_at        INTEGER NOT NULL
);
INSERT INTO events_by_arrival
    SELECT install, event_id, user_hash, source, model, prompt_tokens, completion_tokens,
           cached_tokens, cache_write_tokens, reasoning_tokens, context, created_at,
           received_at
    FROM events ORDER BY received_at, created_at;
DROP TABLE events;
ALTER TABLE events_by_arrival RENAME TO events;
CREATE UNIQUE INDEX events_dedupe ON events (install, event_id);
CREATE INDEX events_by_time ON events (created_at, install, event_id);
