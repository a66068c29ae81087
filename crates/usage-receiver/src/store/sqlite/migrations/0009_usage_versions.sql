-- What lets the dashboard and the installations views answer without reading every
-- rollup row (`store/view_cache.rs`): the store keeps each install's figures per view
-- with the `usage_version` they were read at, and the fleet's figures per day with the
-- day's `version`; every write that changes rollup rows (ingest, erasure) moves both in
-- its transaction, so while they are unchanged, so are the rows.
--
-- Versions come from one counter, `usage_clock`, which only grows: an install enrolled
-- after another was erased may get the erased one's key (SQLite hands out the largest
-- rowid plus one again), and must never meet figures kept for that one. An install that
-- never stored anything keeps version 0 and has no rollup rows; the installs and days
-- stored before this migration start at version 1.
ALTER TABLE installs ADD COLUMN usage_version INTEGER NOT NULL DEFAULT 0;
UPDATE installs SET usage_version = 1;

CREATE TABLE usage_clock (
    only    INTEGER PRIMARY KEY CHECK (only = 0),
    version INTEGER NOT NULL
);
INSERT INTO usage_clock (only, version) VALUES (0, 1);

CREATE TABLE day_versions (
    day     INTEGER PRIMARY KEY,
    version INTEGER NOT NULL
);
INSERT INTO day_versions (day, version) SELECT DISTINCT day, 1 FROM daily_usage;
