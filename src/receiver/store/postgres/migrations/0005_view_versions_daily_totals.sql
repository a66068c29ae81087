-- What lets the provider views over a whole fleet answer without reading every rollup row
-- (SPEC 6, 11 at 100,000 installs).
--
-- `usage_version` counts the batches that stored something for an install, bumped in the
-- ingest statement under the install's row lock. A node that keeps an install's figures
-- keeps the version they were read at, in the same snapshot: while the version is the
-- same, nothing of that install's usage changed, on any node.
ALTER TABLE installs ADD COLUMN usage_version bigint NOT NULL DEFAULT 0;

-- Events and tokens (prompt + completion) per day over all installs, for the dashboard's
-- chart, kept in the ingest transaction. Each connection adds to its own shard row
-- (`pg_backend_pid() % 64`), so batches of different connections never wait on each
-- other's row lock; a day's figure is the sum over its shards. An erasure subtracts the
-- install's days.
CREATE TABLE daily_totals (
    day    bigint NOT NULL,
    shard  smallint NOT NULL,
    events bigint NOT NULL,
    tokens bigint NOT NULL,
    PRIMARY KEY (day, shard)
);

INSERT INTO daily_totals (day, shard, events, tokens)
SELECT day, 0, sum(events)::bigint, sum(prompt_tokens + completion_tokens)::bigint
FROM daily_usage GROUP BY day;
