-- Daily rollups per install and model, kept in the ingest transaction, so the
-- installations view never scans raw events. Filled once from the events already stored.
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
