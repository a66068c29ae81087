CREATE TABLE installs (
    id          INTEGER PRIMARY KEY,
    install_id  TEXT NOT NULL UNIQUE,
    secret      TEXT NOT NULL,
    site_hash   TEXT NOT NULL,
    plan        TEXT NOT NULL DEFAULT 'free',
    disabled    INTEGER NOT NULL DEFAULT 0,
    enrolled_at INTEGER NOT NULL,
    last_seen   INTEGER
);
CREATE TABLE events (
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
    received_at        INTEGER NOT NULL,
    PRIMARY KEY (install, event_id)
) WITHOUT ROWID;
CREATE INDEX events_by_time ON events (created_at);
