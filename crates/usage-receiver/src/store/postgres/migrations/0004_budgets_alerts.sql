-- Budgets and their alerts. A budget is an install's own; installs without one
-- use DEFAULT_MONTHLY_BUDGET, which lives in the environment, not here.
CREATE TABLE budgets (
    install        bigint PRIMARY KEY REFERENCES installs (id) ON DELETE CASCADE,
    monthly_micros bigint NOT NULL CHECK (monthly_micros > 0),
    -- Percentages, ascending and distinct, as "50,80,100".
    thresholds     text NOT NULL
);

-- One row per alert, and the outbox of its delivery. The unique key is what makes an
-- alert fire once per install, threshold and month whatever the nodes: a second node that
-- sees the same crossing inserts nothing (ON CONFLICT DO NOTHING).
CREATE TABLE alerts (
    alert_id        uuid PRIMARY KEY,
    install         bigint NOT NULL REFERENCES installs (id) ON DELETE CASCADE,
    threshold       integer NOT NULL,
    month           text NOT NULL,
    cost_micros     bigint NOT NULL,
    budget_micros   bigint NOT NULL,
    currency        text NOT NULL,
    at              bigint NOT NULL,
    delivered_at    bigint,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at bigint NOT NULL,
    UNIQUE (install, threshold, month)
);
CREATE INDEX alerts_by_time ON alerts (at, alert_id);
CREATE INDEX alerts_undelivered ON alerts (next_attempt_at) WHERE delivered_at IS NULL;
