//! The SQLite schema: migrations applied in order, counted by `PRAGMA user_version`.

use rusqlite::{Connection, TransactionBehavior};

use crate::store::ReceiverStoreError;

/// Migrations, applied in order; `PRAGMA user_version` counts those applied.
/// Append only: never edit one that has shipped.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
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
"#,
    // Daily rollups per install and model, kept in the ingest transaction, so the
    // installations view never scans raw events. Filled once from the events already stored.
    r#"
CREATE TABLE daily_usage (
    install           INTEGER NOT NULL,
    day               INTEGER NOT NULL,
    model             TEXT NOT NULL,
    events            INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (install, day, model)
) WITHOUT ROWID;
CREATE INDEX daily_usage_by_day
    ON daily_usage (day, install, model, events, prompt_tokens, completion_tokens);
INSERT INTO daily_usage (install, day, model, events, prompt_tokens, completion_tokens)
    SELECT install, created_at / 86400000, model, count(*), sum(prompt_tokens),
           sum(completion_tokens)
    FROM events GROUP BY 1, 2, 3;
"#,
    // Events move from a table clustered on the random (install, event_id) key to a rowid
    // table that grows at its end, with the dedupe key in a unique index. An insert then
    // dirties the table's last page (shared by the batch) and one small index leaf,
    // instead of a random, nearly full table leaf that often splits: about a third fewer
    // bytes written per event, and fewer checkpoint pages.
    r#"
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
"#,
    // The rollup keeps every token kind, as prices differ by kind (SPEC 11). Days whose raw
    // events are still kept get their cached, cache-write and reasoning tokens recomputed
    // from them; days already purged can only keep 0 for those kinds. The covering index
    // grows the new columns so the installations view still reads only the index.
    r#"
ALTER TABLE daily_usage ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE daily_usage ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE daily_usage ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
UPDATE daily_usage AS d
    SET cached_tokens = s.cached, cache_write_tokens = s.cache_write,
        reasoning_tokens = s.reasoning
    FROM (SELECT install, created_at / 86400000 AS day, model,
                 sum(cached_tokens) AS cached, sum(cache_write_tokens) AS cache_write,
                 sum(reasoning_tokens) AS reasoning
          FROM events GROUP BY 1, 2, 3) AS s
    WHERE s.install = d.install AND s.day = d.day AND s.model = d.model;
DROP INDEX daily_usage_by_day;
CREATE INDEX daily_usage_by_day
    ON daily_usage (day, install, model, events, prompt_tokens, completion_tokens,
                    cached_tokens, cache_write_tokens, reasoning_tokens);
"#,
    // The provider's label of an install (SPEC 11), shown on the dashboard; NULL when none.
    r#"
ALTER TABLE installs ADD COLUMN label TEXT;
"#,
    // Budgets and their alerts (SPEC 11); the alerts table is also the outbox of their
    // delivery. The unique key makes an alert fire once per install, threshold and month.
    // (Foreign keys are off in SQLite: erasure deletes both explicitly.)
    r#"
CREATE TABLE budgets (
    install        INTEGER PRIMARY KEY,
    monthly_micros INTEGER NOT NULL CHECK (monthly_micros > 0),
    thresholds     TEXT NOT NULL
);
CREATE TABLE alerts (
    alert_id        BLOB PRIMARY KEY,
    install         INTEGER NOT NULL,
    threshold       INTEGER NOT NULL,
    month           TEXT NOT NULL,
    cost_micros     INTEGER NOT NULL,
    budget_micros   INTEGER NOT NULL,
    currency        TEXT NOT NULL,
    at              INTEGER NOT NULL,
    delivered_at    INTEGER,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    UNIQUE (install, threshold, month)
);
CREATE INDEX alerts_by_time ON alerts (at, alert_id);
CREATE INDEX alerts_undelivered ON alerts (next_attempt_at) WHERE delivered_at IS NULL;
"#,
];

/// Applies the migrations not applied yet; refuses a schema newer than this build knows.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), ReceiverStoreError> {
    let applied: usize = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if applied > MIGRATIONS.len() {
        return Err(ReceiverStoreError::SchemaTooNew {
            found: applied as i64,
            known: MIGRATIONS.len() as i64,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index + 1)?;
        tx.commit()?;
    }
    Ok(())
}
