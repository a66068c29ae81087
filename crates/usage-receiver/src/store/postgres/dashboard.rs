//! The PostgreSQL statements of what the dashboard reads besides the installations view:
//! the fleet's tokens per model and day (its cost chart) and one install's usage per user.
//!
//! The fleet's model days sum every install's rollup rows of a day: at 100,000 installs a
//! month is 3 million rows, far too many to read per page. So a node keeps each day's sums
//! with the day's figures in `daily_totals` (events and tokens over every install) they
//! were read with, in the same snapshot; ingest adds to those figures whenever it stores
//! anything for that day and an erasure subtracts the install's, so a day whose figures
//! are unchanged has unchanged sums, and only the other days are read again (usually
//! today alone).

use std::collections::HashMap;

use deadpool_postgres::tokio_postgres;

use super::{PostgresStore, count, token_counts};
use crate::billing::pricing::ModelDayTokens;
use crate::days::MS_PER_DAY;
use crate::store::{DayRange, ReceiverStoreError, UserModelDay};

/// [`crate::store::ReceiverStore::fleet_model_days`], in one read-only snapshot.
pub(super) async fn fleet_model_days(
    store: &PostgresStore,
    days: DayRange,
) -> Result<Vec<ModelDayTokens>, ReceiverStoreError> {
    let mut client = store.client().await?;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let figures = tx
        .query(
            "SELECT day, sum(events)::bigint, sum(tokens)::bigint FROM daily_totals
             WHERE day >= $1 AND day <= $2
             GROUP BY day HAVING sum(events) <> 0 ORDER BY day",
            &[&days.first, &days.last],
        )
        .await?;
    // Each day's totals are its stamp: while they are unchanged, so are its sums.
    let figures: Vec<(i64, (i64, i64))> = figures
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect();
    let kept = store
        .model_days
        .lookup(figures.iter().map(|(day, stamp)| (*day, stamp)));
    let mut out: Vec<ModelDayTokens> = Vec::new();
    let mut stale: Vec<i64> = Vec::new();
    for ((day, _), kept) in figures.iter().zip(kept) {
        match kept {
            Some(models) => out.extend(models),
            None => stale.push(*day),
        }
    }
    if !stale.is_empty() {
        let rows = tx
            .query(
                "SELECT model, day, sum(prompt_tokens)::bigint, sum(completion_tokens)::bigint,
                        sum(cached_tokens)::bigint, sum(cache_write_tokens)::bigint,
                        sum(reasoning_tokens)::bigint
                 FROM daily_usage WHERE day = ANY($1)
                 GROUP BY model, day",
                &[&stale],
            )
            .await?;
        let mut read: HashMap<i64, Vec<ModelDayTokens>> = HashMap::new();
        for row in rows {
            let usage = ModelDayTokens {
                model: row.get(0),
                day: row.get(1),
                tokens: token_counts(&row, 2)?,
            };
            read.entry(usage.day).or_default().push(usage);
        }
        let fresh: Vec<(i64, (i64, i64), Vec<ModelDayTokens>)> = figures
            .iter()
            .filter(|(day, _)| stale.contains(day))
            .map(|&(day, stamp)| (day, stamp, read.remove(&day).unwrap_or_default()))
            .collect();
        out.extend(
            fresh
                .iter()
                .flat_map(|(_, _, models)| models.iter().cloned()),
        );
        store.model_days.keep(fresh);
    }
    tx.commit().await?;
    // Bytewise model order, as SQLite's and Rust's `String` order.
    out.sort_unstable_by(|a, b| (&a.model, a.day).cmp(&(&b.model, b.day)));
    Ok(out)
}

/// [`crate::store::ReceiverStore::user_usage`]: the install's raw events of the days,
/// grouped per user, model and day.
pub(super) async fn user_usage(
    store: &PostgresStore,
    install_id: &str,
    days: DayRange,
) -> Result<Vec<UserModelDay>, ReceiverStoreError> {
    let client = store.client().await?;
    let from = days.first.saturating_mul(MS_PER_DAY);
    let to = days.last.saturating_add(1).saturating_mul(MS_PER_DAY);
    let rows = client
        .query(
            "SELECT encode(e.user_hash, 'hex'), e.model, e.created_at / 86400000 AS day,
                    count(*)::bigint, sum(e.prompt_tokens)::bigint,
                    sum(e.completion_tokens)::bigint, sum(e.cached_tokens)::bigint,
                    sum(e.cache_write_tokens)::bigint, sum(e.reasoning_tokens)::bigint
             FROM events e JOIN installs i ON i.id = e.install
             WHERE i.install_id = $1 AND e.created_at >= $2 AND e.created_at < $3
             GROUP BY e.user_hash, e.model, 3",
            &[&install_id, &from, &to],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(UserModelDay {
                user_hash: row.get(0),
                events: count(row.get(3))?,
                usage: ModelDayTokens {
                    model: row.get(1),
                    day: row.get(2),
                    tokens: token_counts(row, 4)?,
                },
            })
        })
        .collect()
}
