-- Plan history, so revenue counts each plan for the days it was in force and nothing
-- before an install enrolled. `installs.plan` stays today's plan; `plan_from` is the UTC
-- day (days since the Unix epoch) it took effect. Every install enrolled before this
-- migration has had its plan since its enrollment day, as far as anyone can tell.
ALTER TABLE installs ADD COLUMN plan_from INTEGER NOT NULL DEFAULT 0;
UPDATE installs SET plan_from = enrolled_at / 86400000;

-- The plans an install had before today's: each in force from `from_day` up to the day
-- before `until_day`. Views read only those that ended inside the months they report
-- (`until_day` after the first of them), so most installs, which never change plan, cost
-- them no row.
CREATE TABLE past_plans (
    install   INTEGER NOT NULL,
    from_day  INTEGER NOT NULL,
    until_day INTEGER NOT NULL,
    plan      TEXT NOT NULL,
    PRIMARY KEY (install, from_day)
) WITHOUT ROWID;
CREATE INDEX past_plans_by_end ON past_plans (until_day);
