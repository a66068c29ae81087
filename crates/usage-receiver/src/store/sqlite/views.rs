//! The installations views and the dashboard's chart on SQLite, from what the store keeps
//! of them (`store/view_cache.rs`): each install's costed figures per view while its
//! `usage_version` holds, and the fleet's figures per day while the day's version in
//! `day_versions` holds. Ingest and erasure move both in their transaction
//! (`migrations/0009_usage_versions.sql`), and a view reads the versions, the installs'
//! heads and the rollup rows of what changed in one snapshot of the store's viewer
//! connection (one view at a time), so a kept figure is only ever taken while it is
//! exactly what reading the rows would give. Retention deletes raw events only; the
//! rollup rows stay, so it moves no version.
//!
//! A page of the dashboard at 3,001 installs reads 360,000 rollup rows per period when
//! nothing is kept; with the views kept it reads the installs' heads and the rows of the
//! installs and days that changed (BENCHMARKS.md, "Provider views at 100,000 installs").

use std::collections::HashMap;

use rusqlite::{Connection, params};

use super::{Head, SqliteStore, add_usage, install_heads, optional_install, token_counts};
use crate::billing::pricing::{ModelDayTokens, PricedUsage, TokenCounts};
use crate::store::view_cache::{InstallFigures, ViewKey};
use crate::store::{
    CostedInstall, CostedReport, DailyTokens, DayRange, InstallUsage, InstallationsReport,
    PriceList, RatesOf, ReceiverStoreError, UsageWindow,
};

/// What the store keeps of one day over every install: the chart's events and tokens, and
/// the tokens per model (the cost chart), summed as the views sum them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct DayFigures {
    events: u64,
    tokens: u64,
    models: Vec<ModelDayTokens>,
}

impl DayFigures {
    /// Adds one rollup row of the day. A day's models are few, so a short list.
    pub(super) fn add(&mut self, day: i64, model: &str, events: u64, kinds: &TokenCounts) {
        self.events += events;
        self.tokens += kinds.total();
        let at = match self.models.iter().position(|m| m.model == model) {
            Some(at) => at,
            None => {
                self.models.push(ModelDayTokens {
                    model: model.to_owned(),
                    day,
                    tokens: TokenCounts::default(),
                });
                self.models.len() - 1
            }
        };
        let sum = &mut self.models[at].tokens;
        sum.prompt = sum.prompt.saturating_add(kinds.prompt);
        sum.completion = sum.completion.saturating_add(kinds.completion);
        sum.cached = sum.cached.saturating_add(kinds.cached);
        sum.cache_write = sum.cache_write.saturating_add(kinds.cache_write);
        sum.reasoning = sum.reasoning.saturating_add(kinds.reasoning);
    }
}

/// [`crate::store::ReceiverStore::installations`] in the snapshot `conn`: read whole,
/// never kept (the install page and the straightforward pricing read it).
pub(super) fn installations(
    conn: &Connection,
    install_id: Option<&str>,
    window: UsageWindow,
) -> Result<InstallationsReport, ReceiverStoreError> {
    // `Some(None)`: every install; `None`: the one asked for is unknown.
    let Some(only) = optional_install(conn, install_id)? else {
        return Ok(InstallationsReport::default());
    };
    let mut heads = install_heads(conn, only, window)?;
    let daily = add_usage(conn, only, window, &mut heads, None)?;
    let mut report = InstallationsReport {
        installs: heads.into_iter().map(|head| head.usage).collect(),
        daily: Vec::new(),
    };
    report.finish(daily);
    Ok(report)
}

/// [`crate::store::ReceiverStore::costed_installations`]: every install's head, then each
/// install's figures from the kept view where they still hold, else read again (only the
/// stale installs' rows, or, when there is no view yet or too much changed, everything),
/// and the chart from the kept days. One install alone is read whole.
pub(super) fn costed(
    store: &SqliteStore,
    install_id: Option<&str>,
    window: UsageWindow,
    prices: PriceList<'_>,
) -> Result<CostedReport, ReceiverStoreError> {
    let viewer = store.viewer();
    let snapshot = viewer.unchecked_transaction()?;
    let conn: &Connection = &snapshot;
    if install_id.is_some() {
        return Ok(CostedReport::price(
            installations(conn, install_id, window)?,
            prices.rates,
        ));
    }
    let mut heads = install_heads(conn, None, window)?;
    let view = ViewKey {
        window,
        prices: prices.id,
    };
    let kept = store.views.lookup(
        view,
        heads.iter().map(|head| (head.key, head.usage_version)),
    );
    let (figures, daily) = match kept {
        Some(kept) if kept.worth_taking(heads.len()) => {
            let mut figures = Vec::with_capacity(heads.len());
            let mut fresh = Vec::with_capacity(kept.stale.len());
            for (head, kept) in heads.iter_mut().zip(kept.figures) {
                match kept {
                    Some(kept) => figures.push(kept),
                    None => {
                        // Its own rows alone, through the primary key.
                        add_usage(
                            conn,
                            Some(head.key),
                            window,
                            std::slice::from_mut(head),
                            None,
                        )?;
                        let read = figures_of(&mut head.usage, prices.rates);
                        fresh.push((head.key, head.usage_version, read.clone()));
                        figures.push(read);
                    }
                }
            }
            store.views.keep(view, fresh, false);
            let daily = days_of(store, conn, window.from_30d, window.today)?
                .into_iter()
                .filter(|(_, day)| !day.models.is_empty())
                .map(|(at, day)| DailyTokens {
                    day: at,
                    events: day.events,
                    tokens: day.tokens,
                })
                .collect();
            (figures, daily)
        }
        _ => {
            let mut days = HashMap::new();
            let daily = add_usage(conn, None, window, &mut heads, Some(&mut days))?;
            let figures: Vec<InstallFigures> = heads
                .iter_mut()
                .map(|head| figures_of(&mut head.usage, prices.rates))
                .collect();
            store.views.keep(
                view,
                heads
                    .iter()
                    .zip(&figures)
                    .map(|(head, f)| (head.key, head.usage_version, f.clone())),
                true,
            );
            let first_day = window.from_30d.min(window.month_start);
            let versions = day_versions(conn, first_day, window.today)?;
            store.days.keep(
                versions
                    .into_iter()
                    .map(|(day, version)| (day, version, days.remove(&day).unwrap_or_default())),
            );
            (figures, daily.into_values().collect())
        }
    };
    drop(snapshot);
    let installs = heads
        .into_iter()
        .zip(figures)
        .map(|(head, figures)| costed_install(head, figures))
        .collect();
    Ok(CostedReport { installs, daily })
}

/// One install's figures from its usage as read, costed as [`CostedReport::price`] costs
/// them (its month in (model, day) order, as [`InstallationsReport::finish`] sorts it).
fn figures_of(usage: &mut InstallUsage, rates: RatesOf<'_>) -> InstallFigures {
    usage
        .usage_mtd
        .sort_by(|a, b| (&a.model, a.day).cmp(&(&b.model, b.day)));
    InstallFigures {
        events_30d: usage.events_30d,
        tokens_30d: usage.tokens_30d,
        priced: PricedUsage::of(&usage.usage_mtd, rates),
    }
}

fn costed_install(head: Head, figures: InstallFigures) -> CostedInstall {
    let usage = head.usage;
    CostedInstall {
        install_id: usage.install_id,
        label: usage.label,
        plans: usage.plans,
        last_seen_ms: usage.last_seen_ms,
        events_30d: figures.events_30d,
        tokens_30d: figures.tokens_30d,
        priced: figures.priced,
        budget: usage.budget,
        alerted_in_month: usage.alerted_in_month,
    }
}

/// [`crate::store::ReceiverStore::fleet_model_days`] in the snapshot `conn`, from the kept
/// days where they hold.
pub(super) fn fleet_model_days(
    store: &SqliteStore,
    conn: &Connection,
    days: DayRange,
) -> Result<Vec<ModelDayTokens>, ReceiverStoreError> {
    let mut out: Vec<ModelDayTokens> = days_of(store, conn, days.first, days.last)?
        .into_iter()
        .flat_map(|(_, day)| day.models)
        .collect();
    // Bytewise model order, as SQLite's and Rust's `String` order.
    out.sort_unstable_by(|a, b| (&a.model, a.day).cmp(&(&b.model, b.day)));
    Ok(out)
}

/// The version of each day of `first..=last` that has one (every day that ever had rollup
/// rows), in day order.
fn day_versions(
    conn: &Connection,
    first: i64,
    last: i64,
) -> Result<Vec<(i64, i64)>, ReceiverStoreError> {
    let mut statement = conn.prepare_cached(
        "SELECT day, version FROM day_versions WHERE day >= ?1 AND day <= ?2 ORDER BY day",
    )?;
    let rows = statement.query_map(params![first, last], |row| Ok((row.get(0)?, row.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The fleet's figures of each day of `first..=last` that ever had rollup rows, in day
/// order: kept ones whose version holds, the others read again (each day through the
/// rollup's by-day index, which covers every column read) and kept.
fn days_of(
    store: &SqliteStore,
    conn: &Connection,
    first: i64,
    last: i64,
) -> Result<Vec<(i64, DayFigures)>, ReceiverStoreError> {
    let versions = day_versions(conn, first, last)?;
    let kept = store
        .days
        .lookup(versions.iter().map(|(day, version)| (*day, version)));
    let mut out = Vec::with_capacity(versions.len());
    let mut fresh = Vec::new();
    let mut statement = conn.prepare_cached(
        "SELECT model, events, prompt_tokens, completion_tokens, cached_tokens,
                cache_write_tokens, reasoning_tokens
         FROM daily_usage WHERE day = ?1",
    )?;
    for ((day, version), kept) in versions.into_iter().zip(kept) {
        let figures = match kept {
            Some(figures) => figures,
            None => {
                let mut figures = DayFigures::default();
                let mut rows = statement.query(params![day])?;
                while let Some(row) = rows.next()? {
                    let model = row.get_ref(0)?.as_str().map_err(rusqlite::Error::from)?;
                    figures.add(day, model, row.get(1)?, &token_counts(row, 2)?);
                }
                fresh.push((day, version, figures.clone()));
                figures
            }
        };
        out.push((day, figures));
    }
    store.days.keep(fresh);
    Ok(out)
}
