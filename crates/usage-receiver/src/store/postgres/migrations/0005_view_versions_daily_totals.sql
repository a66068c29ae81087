-- What lets the provider views over a whole fleet answer without reading every rollup row
-- (at 100,000 installs: BENCHMARKS.md, "Provider views at 100,000 installs").
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

-- Every node that stores usage must keep both of the above, or the views of the nodes that
-- rely on them would miss its batches. A node of an older release knows neither, and keeps
-- serving after a newer node migrated (a rolling upgrade), so its ingest is refused here:
-- the error aborts its whole statement (nothing stored) and it answers 503, so the
-- balancer or the agent sends the batch again to an upgraded node. Nodes of this release
-- or later name the schema they keep up with on every connection (`usage_agent.writer`).
CREATE FUNCTION refuse_older_writers() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(nullif(current_setting('usage_agent.writer', true), ''), '0')::int < 5 THEN
        RAISE EXCEPTION 'this receiver node is older than the database schema (5): upgrade it'
            USING ERRCODE = 'UA001';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER usage_writers_keep_view_figures BEFORE UPDATE OF last_seen ON installs
    FOR EACH ROW EXECUTE FUNCTION refuse_older_writers();
