//! A group of fresh batches of different installs, stored in one transaction with `COPY`.
//!
//! A statement's fixed cost (its start and end, the commit) is about half of what one
//! batch of 50 costs the database, and an `INSERT` of rows costs more per row than `COPY`,
//! which writes a page of rows at a time; with a few hundred rows per transaction, the
//! round trips `COPY` needs are paid once for many batches (BENCHMARKS.md, "The fleet
//! receiver on PostgreSQL").
//! In one transaction:
//! 1. [`GROUP_HEAD`]: every install's row locked, in key order (two nodes' groups wait for
//!    each other instead of deadlocking, and an erasure locks in the same order), and
//!    each batch's rate-limit request taken. It answers which installs are still
//!    accepting and whose requests fit: the batches that *go*.
//! 2. `COPY` of the going batches' keys into `event_ids`, then of their events into
//!    `events`. A key stored already (a batch sent again) or being stored by another node
//!    fails the `COPY`, and with it the whole transaction: nothing of the group stays, and
//!    the caller stores each batch alone ([`super::ingest`]).
//! 3. [`GROUP_TAIL`]: the sums of exactly the rows copied (every row of a going batch, or
//!    the `COPY` failed) added to `daily_usage` and the chart's `daily_totals`, and each
//!    going install's `last_seen` and `usage_version` updated.
//!
//! Then one commit, so the rollup always holds exactly the events stored.

use std::collections::BTreeMap;

use deadpool_postgres::Object;
use deadpool_postgres::tokio_postgres::binary_copy::BinaryCopyInWriter;
use deadpool_postgres::tokio_postgres::types::{ToSql, Type};
use deadpool_postgres::tokio_postgres::{self, Transaction};
use futures_util::pin_mut;

use super::ingest::{Columns, Outcome};
use crate::days::day_of_ms;
use crate::store::InstallKey;

/// One batch of a group: its install (another than the other batches'), its events
/// (unique, in key order) and when it was received.
pub(super) struct GroupedBatch<'a> {
    pub(super) install: InstallKey,
    pub(super) columns: &'a Columns,
    pub(super) received_at_ms: i64,
}

/// Stores the batches of `group`, each taking its request of one rate (`interval_ms`,
/// `burst_ms`; none for no limit), in one transaction. Answers one [`Outcome`] per batch,
/// in the group's order; fails whole, storing nothing, if any key is stored already or
/// being stored by another node ([`super::ingest::some_key_stored_already`] tells).
pub(super) async fn store(
    client: &mut Object,
    group: &[GroupedBatch<'_>],
    interval_ms: Option<i64>,
    burst_ms: Option<i64>,
) -> Result<Vec<Outcome>, tokio_postgres::Error> {
    let installs: Vec<InstallKey> = group.iter().map(|batch| batch.install).collect();
    let head = client.prepare_cached(GROUP_HEAD).await?;
    let tail = client.prepare_cached(GROUP_TAIL).await?;
    let tx = client.transaction().await?;
    let turns: Vec<(bool, bool)> = tx
        .query(&head, &[&installs, &interval_ms, &burst_ms])
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let going: Vec<&GroupedBatch> = group
        .iter()
        .zip(&turns)
        .filter(|(_, (_, goes))| *goes)
        .map(|(batch, _)| batch)
        .collect();
    if !going.is_empty() {
        copy_keys(&tx, &going).await?;
        copy_events(&tx, &going).await?;
        let sums = Sums::of(&going);
        tx.execute(&tail, &sums.params()).await?;
    }
    tx.commit().await?;
    Ok(group
        .iter()
        .zip(turns)
        .map(|(batch, (accepting, goes))| Outcome {
            accepting,
            stored: if goes { batch.columns.len() as i64 } else { 0 },
            allowed: goes,
        })
        .collect())
}

async fn copy_keys(
    tx: &Transaction<'_>,
    going: &[&GroupedBatch<'_>],
) -> Result<(), tokio_postgres::Error> {
    let sink = tx
        .copy_in("COPY event_ids (install, event_id, created_at) FROM STDIN BINARY")
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::UUID, Type::INT8]);
    pin_mut!(writer);
    for batch in going {
        let c = batch.columns;
        for (event_id, created_at) in c.event_id.iter().zip(&c.created_at) {
            writer
                .as_mut()
                .write(&[&batch.install, event_id, created_at])
                .await?;
        }
    }
    writer.finish().await?;
    Ok(())
}

async fn copy_events(
    tx: &Transaction<'_>,
    going: &[&GroupedBatch<'_>],
) -> Result<(), tokio_postgres::Error> {
    let sink = tx
        .copy_in(
            "COPY events (install, event_id, user_hash, source, model, prompt_tokens,
                          completion_tokens, cached_tokens, cache_write_tokens,
                          reasoning_tokens, context, created_at, received_at, origin)
             FROM STDIN BINARY",
        )
        .await?;
    let types = [
        Type::INT8,
        Type::UUID,
        Type::BYTEA,
        Type::INT2,
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::TEXT,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    for batch in going {
        let c = batch.columns;
        for n in 0..c.len() {
            let row: [&(dyn ToSql + Sync); 14] = [
                &batch.install,
                &c.event_id[n],
                &c.user_hash[n],
                &c.source[n],
                &c.model[n],
                &c.prompt[n],
                &c.completion[n],
                &c.cached[n],
                &c.cache_write[n],
                &c.reasoning[n],
                &c.context[n],
                &c.created_at[n],
                &batch.received_at_ms,
                &c.origin[n],
            ];
            writer.as_mut().write(&row).await?;
        }
    }
    writer.finish().await?;
    Ok(())
}

/// What the going batches add: the rollup's rows (install, day, model), the chart's days,
/// and each install's `last_seen`, as column arrays for [`GROUP_TAIL`].
#[derive(Default)]
struct Sums {
    install: Vec<i64>,
    day: Vec<i64>,
    model: Vec<String>,
    /// Events, then prompt, completion, cached, cache-write and reasoning tokens.
    counts: [Vec<i64>; 6],
    chart_day: Vec<i64>,
    chart_events: Vec<i64>,
    chart_tokens: Vec<i64>,
    seen_install: Vec<i64>,
    seen_at: Vec<i64>,
    seen_stored: Vec<bool>,
}

impl Sums {
    fn of(going: &[&GroupedBatch<'_>]) -> Sums {
        let mut rollup: BTreeMap<(i64, i64, &str), [i64; 6]> = BTreeMap::new();
        let mut chart: BTreeMap<i64, [i64; 2]> = BTreeMap::new();
        let mut sums = Sums::default();
        for batch in going {
            let c = batch.columns;
            for n in 0..c.len() {
                let day = day_of_ms(c.created_at[n]);
                let row = rollup
                    .entry((batch.install, day, c.model[n].as_str()))
                    .or_default();
                let added = [
                    1,
                    c.prompt[n],
                    c.completion[n],
                    c.cached[n],
                    c.cache_write[n],
                    c.reasoning[n],
                ];
                for (sum, value) in row.iter_mut().zip(added) {
                    *sum += value;
                }
                let day_totals = chart.entry(day).or_default();
                day_totals[0] += 1;
                day_totals[1] += c.prompt[n] + c.completion[n];
            }
            sums.seen_install.push(batch.install);
            sums.seen_at.push(batch.received_at_ms);
            sums.seen_stored.push(c.len() > 0);
        }
        for ((install, day, model), counts) in rollup {
            sums.install.push(install);
            sums.day.push(day);
            sums.model.push(model.to_owned());
            for (column, count) in sums.counts.iter_mut().zip(counts) {
                column.push(count);
            }
        }
        for (day, [events, tokens]) in chart {
            sums.chart_day.push(day);
            sums.chart_events.push(events);
            sums.chart_tokens.push(tokens);
        }
        sums
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 15] {
        let [events, prompt, completion, cached, cache_write, reasoning] = &self.counts;
        [
            &self.install,
            &self.day,
            &self.model,
            events,
            prompt,
            completion,
            cached,
            cache_write,
            reasoning,
            &self.chart_day,
            &self.chart_events,
            &self.chart_tokens,
            &self.seen_install,
            &self.seen_at,
            &self.seen_stored,
        ]
    }
}

/// Locks the installs' rows (`$1`, in key order) and takes each one's request of the rate
/// (`$2` the interval and `$3` the burst, in ms; both null for none), as
/// [`super::ingest`]'s statements do for one. Answers a row per install of `$1`, in its
/// order: (install still accepting, batch goes).
const GROUP_HEAD: &str = concat!(
    "
WITH batch AS (
    SELECT * FROM unnest($1::int8[]) WITH ORDINALITY AS b(install, n)
), install AS (
    SELECT id FROM installs WHERE id = ANY($1::int8[]) AND NOT disabled
    ORDER BY id FOR NO KEY UPDATE
), allowed AS (
    INSERT INTO request_schedule AS s (install, next_at_ms)
    SELECT id, (extract(epoch FROM statement_timestamp()) * 1000)::bigint + $2
    FROM install WHERE $2::bigint IS NOT NULL ORDER BY id",
    take_request_on_conflict!(2, 3),
    "
    RETURNING install
), go AS (
    SELECT id FROM install WHERE $2::bigint IS NULL OR id IN (SELECT install FROM allowed)
)
SELECT b.install IN (SELECT id FROM install), b.install IN (SELECT id FROM go)
FROM batch b ORDER BY b.n"
);

/// Adds [`Sums`] to the rollup (rows of installs locked by [`GROUP_HEAD`], so no other
/// statement waits on them) and to the chart's shard row of this connection, day by day
/// in order, and marks the installs seen, their `usage_version` up where events were
/// stored.
const GROUP_TAIL: &str = concat!(
    "
WITH rolled AS (
    ",
    rollup_into!(),
    "    SELECT * FROM unnest($1::int8[], $2::int8[], $3::text[], $4::int8[], $5::int8[],
                         $6::int8[], $7::int8[], $8::int8[], $9::int8[])",
    rollup_add!(),
    "
), totals AS (
    INSERT INTO daily_totals AS t (day, shard, events, tokens)
    SELECT day, pg_backend_pid() % 64, events, tokens
    FROM unnest($10::int8[], $11::int8[], $12::int8[]) AS x(day, events, tokens)
    ORDER BY day",
    chart_add!(),
    "
)
UPDATE installs i SET last_seen = s.received_at,
    usage_version = usage_version + s.stored::int
FROM unnest($13::int8[], $14::int8[], $15::bool[]) AS s(install, received_at, stored)
WHERE i.id = s.install"
);
