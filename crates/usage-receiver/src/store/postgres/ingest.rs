//! The statements that store one batch, deduped across every node sharing the database.
//!
//! A batch is stored by one statement and one commit, in one of two forms:
//! - [`INGEST_FRESH`], tried first: plain inserts of every key, event and sum. Almost
//!   every batch is new, and plain inserts cost the database a fifth less than inserts
//!   that check each key for a conflict (BENCHMARKS.md, "The fleet receiver on
//!   PostgreSQL").
//! - [`INGEST_ANY`], when any key of the batch is stored already (a batch sent again
//!   after a lost answer) or is being stored by another node at that moment: then the
//!   fresh form fails whole with a unique violation (the other node's insert is waited
//!   for first), nothing of it stays, not even its rate-limit request, and this form
//!   stores only the keys not stored yet (`ON CONFLICT DO NOTHING`).
//!
//! Batches that reach a node while its writers are busy ([`super::writers`]) are stored
//! together, as fresh, by [`super::group`]; if any key of a group is stored already, each
//! of its batches is then stored alone, as above.
//!
//! PostgreSQL logs the fresh form's unique violation as an `ERROR` line; the receiver does
//! not (docs/install.md says so).

use deadpool_postgres::tokio_postgres::error::SqlState;
use deadpool_postgres::tokio_postgres::types::ToSql;
use deadpool_postgres::tokio_postgres::{self, Row};
use deadpool_postgres::{GenericClient, Object};
use uuid::Uuid;

use super::{source_code, tokens};
use crate::store::{InstallKey, NewEvent, ReceiverStoreError};

/// Stores the batch in `columns` for `install` (keys unique within the batch, in key
/// order), taking its request of the rate (`interval_ms`, `burst_ms`; none for no limit).
/// Answers one row: (install still accepting, events stored, request allowed).
pub(super) async fn store_batch(
    client: &Object,
    install: InstallKey,
    columns: &Columns,
    received_at_ms: i64,
    interval_ms: Option<i64>,
    burst_ms: Option<i64>,
) -> Result<Row, ReceiverStoreError> {
    let c = columns;
    let params: [&(dyn ToSql + Sync); 16] = [
        &install,
        &received_at_ms,
        &c.event_id,
        &c.user_hash,
        &c.source,
        &c.model,
        &c.prompt,
        &c.completion,
        &c.cached,
        &c.cache_write,
        &c.reasoning,
        &c.context,
        &c.created_at,
        &interval_ms,
        &burst_ms,
        &c.origin,
    ];
    let fresh = client.prepare_cached(INGEST_FRESH).await?;
    match client.query_one(&fresh, &params).await {
        Ok(row) => Ok(row),
        Err(error) if some_key_stored_already(&error) => {
            let any = client.prepare_cached(INGEST_ANY).await?;
            Ok(client.query_one(&any, &params).await?)
        }
        Err(error) => Err(error.into()),
    }
}

/// What the statement answered for one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Outcome {
    /// The install exists and is not disabled.
    pub(super) accepting: bool,
    /// Events stored.
    pub(super) stored: i64,
    /// The batch's request fitted in the install's rate.
    pub(super) allowed: bool,
}

impl Outcome {
    /// The answer row of [`store_batch`]: the three counts as `bigint`s.
    pub(super) fn from_row(row: &Row) -> Outcome {
        Outcome {
            accepting: row.get::<_, i64>(0) != 0,
            stored: row.get(1),
            allowed: row.get::<_, i64>(2) != 0,
        }
    }
}

/// The fresh form met a key stored already, or waited for another node's and then
/// deadlocked on it: the batch goes through [`INGEST_ANY`].
pub(super) fn some_key_stored_already(error: &tokio_postgres::Error) -> bool {
    matches!(
        error.code(),
        Some(&SqlState::UNIQUE_VIOLATION) | Some(&SqlState::T_R_DEADLOCK_DETECTED)
    )
}

/// One batch as column arrays, for `unnest`: one statement stores the whole batch.
#[derive(Default)]
pub(super) struct Columns {
    pub(super) event_id: Vec<Uuid>,
    pub(super) user_hash: Vec<Vec<u8>>,
    pub(super) source: Vec<i16>,
    pub(super) model: Vec<String>,
    pub(super) prompt: Vec<i64>,
    pub(super) completion: Vec<i64>,
    pub(super) cached: Vec<i64>,
    pub(super) cache_write: Vec<i64>,
    pub(super) reasoning: Vec<i64>,
    pub(super) context: Vec<Option<String>>,
    pub(super) created_at: Vec<i64>,
    pub(super) origin: Vec<Option<String>>,
}

impl Columns {
    pub(super) fn push(&mut self, event: NewEvent) {
        self.event_id.push(event.event_id);
        self.user_hash.push(event.user_hash.to_vec());
        self.source.push(source_code(event.source));
        self.model.push(event.model);
        self.prompt.push(tokens(event.prompt_tokens));
        self.completion.push(tokens(event.completion_tokens));
        self.cached.push(tokens(event.cached_tokens));
        self.cache_write.push(tokens(event.cache_write_tokens));
        self.reasoning.push(tokens(event.reasoning_tokens));
        self.context.push(event.context);
        self.created_at.push(event.created_at_ms);
        self.origin.push(event.origin);
    }

    /// Events in the batch.
    pub(super) fn len(&self) -> usize {
        self.event_id.len()
    }
}

/// The start of both forms: the install's row locked (it must exist and not be
/// disabled), the batch's rate-limit request taken (`go` is empty if it does not fit), and
/// the batch's columns as rows (`input`).
macro_rules! ingest_head {
    () => {
        concat!(
            "
WITH install AS (
    SELECT id FROM installs WHERE id = $1 AND NOT disabled FOR NO KEY UPDATE
), allowed AS (
    INSERT INTO request_schedule AS s (install, next_at_ms)
    SELECT id, (extract(epoch FROM statement_timestamp()) * 1000)::bigint + $14
    FROM install WHERE $14::bigint IS NOT NULL",
            take_request_on_conflict!(14, 15),
            "
    RETURNING install
), go AS (
    SELECT id FROM install WHERE $14::bigint IS NULL OR EXISTS (SELECT FROM allowed)
), input AS (
    SELECT * FROM unnest($3::uuid[], $4::bytea[], $5::int2[], $6::text[], $7::int8[],
                         $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::text[],
                         $13::int8[], $16::text[])
        AS t(event_id, user_hash, source, model, prompt_tokens, completion_tokens,
             cached_tokens, cache_write_tokens, reasoning_tokens, context, created_at,
             origin)"
        )
    };
}

/// The end of both forms, from `stored` (the events stored): their sums added to
/// `daily_usage` and the chart's `daily_totals`, the install seen (its `usage_version` up
/// if anything was stored), and the answer (install still accepting, events stored,
/// request allowed).
macro_rules! ingest_tail {
    () => {
        concat!(
            "
), rolled AS (
    ",
            rollup_into!(),
            "    SELECT $1, created_at / 86400000, model, count(*), sum(prompt_tokens),
           sum(completion_tokens), sum(cached_tokens), sum(cache_write_tokens),
           sum(reasoning_tokens)
    FROM stored GROUP BY 2, 3 ORDER BY 2, 3",
            rollup_add!(),
            "
), totals AS (
    INSERT INTO daily_totals AS t (day, shard, events, tokens)
    SELECT created_at / 86400000, pg_backend_pid() % 64, count(*),
           sum(prompt_tokens + completion_tokens)
    FROM stored GROUP BY 1 ORDER BY 1",
            chart_add!(),
            "
), seen AS (
    UPDATE installs SET last_seen = $2,
        usage_version = usage_version + (EXISTS (SELECT FROM stored))::int
    WHERE id = (SELECT id FROM go)
)
SELECT (SELECT count(*) FROM install), (SELECT count(*) FROM stored),
       (SELECT count(*) FROM go)"
        )
    };
}

/// Stores one batch: the keys not stored yet go into `event_ids`, exactly those events into
/// `events`, their sums into `daily_usage` and the chart's `daily_totals`, and the
/// install's `usage_version` goes up if anything was stored, under a lock on the install's
/// row, which must exist and not be disabled. Answers (install still accepting, events
/// stored, request allowed).
///
/// With a rate (`$14` the interval and `$15` the burst, in ms; both null for none), the
/// same statement first takes the request from the install's schedule, as
/// [`TAKE_REQUEST`](super::TAKE_REQUEST) does, and stores nothing if it does not fit: one
/// round trip and one commit for the whole batch. The install's row is locked before the
/// schedule's, in the order an erasure locks them.
const INGEST_ANY: &str = concat!(
    ingest_head!(),
    "
), fresh AS (
    INSERT INTO event_ids (install, event_id, created_at)
    SELECT go.id, input.event_id, input.created_at FROM input, go
    ORDER BY input.event_id
    ON CONFLICT DO NOTHING
    RETURNING event_id
), stored AS (
    INSERT INTO events (install, event_id, user_hash, source, model, prompt_tokens,
                        completion_tokens, cached_tokens, cache_write_tokens,
                        reasoning_tokens, context, created_at, received_at, origin)
    SELECT $1, i.event_id, i.user_hash, i.source, i.model, i.prompt_tokens,
           i.completion_tokens, i.cached_tokens, i.cache_write_tokens, i.reasoning_tokens,
           i.context, i.created_at, $2, i.origin
    FROM input i JOIN fresh USING (event_id)
    RETURNING created_at, model, prompt_tokens, completion_tokens, cached_tokens,
              cache_write_tokens, reasoning_tokens",
    ingest_tail!()
);

/// [`INGEST_ANY`] for a batch none of whose keys is stored: every key, event and sum
/// inserted as it is. A key stored already fails the whole statement.
const INGEST_FRESH: &str = concat!(
    ingest_head!(),
    "
), stored AS (
    SELECT input.* FROM input, go
), keys AS (
    INSERT INTO event_ids (install, event_id, created_at)
    SELECT $1, event_id, created_at FROM stored
), rows AS (
    INSERT INTO events (install, event_id, user_hash, source, model, prompt_tokens,
                        completion_tokens, cached_tokens, cache_write_tokens,
                        reasoning_tokens, context, created_at, received_at, origin)
    SELECT $1, event_id, user_hash, source, model, prompt_tokens, completion_tokens,
           cached_tokens, cache_write_tokens, reasoning_tokens, context, created_at, $2,
           origin
    FROM stored",
    ingest_tail!()
);
