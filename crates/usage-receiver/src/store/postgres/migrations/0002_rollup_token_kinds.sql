-- The rollup keeps every token kind, as prices differ by kind. Days whose raw
-- events are still kept get their cached, cache-write and reasoning tokens recomputed from
-- them; days already dropped can only keep 0 for those kinds. The covering index grows the
-- new columns so the installations view still reads only the index.
ALTER TABLE daily_usage
    ADD COLUMN cached_tokens      bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_write_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN reasoning_tokens   bigint NOT NULL DEFAULT 0;

UPDATE daily_usage AS d
    SET cached_tokens = s.cached, cache_write_tokens = s.cache_write,
        reasoning_tokens = s.reasoning
    FROM (SELECT install, created_at / 86400000 AS day, model,
                 sum(cached_tokens)::bigint AS cached,
                 sum(cache_write_tokens)::bigint AS cache_write,
                 sum(reasoning_tokens)::bigint AS reasoning
          FROM events GROUP BY 1, 2, 3) AS s
    WHERE s.install = d.install AND s.day = d.day AND s.model = d.model;

DROP INDEX daily_usage_by_day;
CREATE INDEX daily_usage_by_day
    ON daily_usage (day) INCLUDE (install, model, events, prompt_tokens, completion_tokens,
                                  cached_tokens, cache_write_tokens, reasoning_tokens);
