-- Budgets and their alerts; the alerts table is also the outbox of their
-- delivery. The unique key makes an alert fire once per install, threshold and month.
-- (Foreign keys are off in SQLite: erasure deletes both explicitly.)
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
