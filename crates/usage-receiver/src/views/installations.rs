//! `GET /api/usage/installations` (basic auth): usage, cost, revenue and profit per
//! install, as JSON or CSV, without a period (the last 30 days counted, month to date
//! priced) or over one, sorted as [`crate::views::query`] reads it. Also what the dashboard
//! reads its rows with ([`load_rows`], [`install_rows`]), and the task that keeps a node's
//! first views ready ([`keep_views_warm`]).
//!
//! Reads only: plans, labels, budgets and erasure are changed by [`crate::admin`]. The
//! numbers come from the store's daily rollups and the money from
//! [`crate::billing::pricing`]; this module only picks the days, parses requests and shapes
//! answers. "Now" is [`ReceiverState::provider_now`], so tests can stand on a month
//! boundary.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::billing::pricing::Pricing;
use crate::budgets::rules::budget_in_force;
use crate::days::day_text;
use crate::http::auth::authorize;
use crate::http::error::ReceiverError;
use crate::http::error::{bad_param, blocking, query_rejection};
use crate::state::ReceiverState;
use crate::store::{CostedInstall, DailyTokens, PriceList};
use crate::views::query::{Filter, Period, Sort};
use usage_protocol::event::format_millis;

use crate::http::csv::{csv_answer, with_file_name};
use crate::store::usage_window;
use crate::views::rows::InstallRow;

/// Bills every install's costed usage. Revenue is over `period` (month to date when
/// `None`) from each install's enrollment and plan history: whole months for month to
/// date and last month, else by day ([`Pricing::revenue_over`]).
pub fn install_rows(
    app: &ReceiverState,
    installs: Vec<CostedInstall>,
    period: Option<Period>,
) -> Vec<InstallRow> {
    let pricing = &app.pricing;
    let period = period.unwrap_or_else(|| Period::mtd(app.provider_now()));
    installs
        .into_iter()
        .map(|install| {
            let revenue = pricing.revenue_over(
                &install.plans,
                period.days.first,
                period.days.last,
                period.is_monthly(),
            );
            InstallRow {
                bill: Pricing::bill_of(revenue, &install.priced),
                install_id: install.install_id,
                label: install.label,
                plan: install.plans.current(),
                last_seen_ms: install.last_seen_ms,
                events: install.events_30d,
                tokens: install.tokens_30d,
                budget: budget_in_force(app, install.budget.as_ref()),
                alerted_in_month: install.alerted_in_month,
                previous_cost: None,
            }
        })
        .collect()
}

/// Every install (or only `install_id`) priced as of `now` over the default days (`period`
/// `None`: the last 30 days counted, month to date priced) or over a period, and the
/// tokens per day of the counted days summed over them.
pub async fn load_rows(
    app: &Arc<ReceiverState>,
    install_id: Option<String>,
    now: DateTime<Utc>,
    period: Option<Period>,
) -> Result<(Vec<InstallRow>, Vec<DailyTokens>), ReceiverError> {
    let window = match period {
        Some(period) => period.days.as_window(),
        None => usage_window(now),
    };
    let (store, app2) = (app.store.clone(), app.clone());
    let report = blocking(move || {
        let rates = |model: &str, day: i64| app2.pricing.rates(model, day);
        let prices = PriceList {
            id: app2.pricing.fingerprint(),
            rates: &rates,
        };
        store.costed_installations(install_id.as_deref(), window, prices)
    })
    .await?;
    let priced = period.unwrap_or_else(|| Period::mtd(now));
    Ok((
        install_rows(app, report.installs, Some(priced)),
        report.daily,
    ))
}

/// How often a node asks for the views a provider opens first, when its store keeps
/// views ([`ReceiverStore::keeps_views`](crate::store::ReceiverStore::keeps_views)).
const VIEWS_WARM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Keeps the view without a period, the dashboard's three periods and the previous period
/// of each (its change column) ready, and the fleet's model days of the three (its chart):
/// asked for at start and every minute, so the first view of a new day (new windows), or
/// after a node starts, does not read every rollup row while a provider waits, and later
/// views read again only the installs (and days) that changed since the last minute.
pub async fn keep_views_warm(app: Arc<ReceiverState>) {
    let mut ticks = tokio::time::interval(VIEWS_WARM_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = app.provider_now();
        let mut periods = vec![None];
        let mut dashboard = Vec::new();
        for name in ["mtd", "last_month", "30d"] {
            if let Ok(Some(period)) = Period::parse(Some(name), None, None, now) {
                periods.extend([Some(period), Some(period.previous())]);
                dashboard.push(period);
            }
        }
        for period in periods {
            if let Err(error) = load_rows(&app, None, now, period).await {
                tracing::warn!(?error, "could not prepare the provider's views");
            }
        }
        let store = app.store.clone();
        let charts = blocking(move || {
            for period in dashboard {
                store.fleet_model_days(period.days)?;
            }
            Ok(())
        });
        if let Err(error) = charts.await {
            tracing::warn!(?error, "could not prepare the dashboard's charts");
        }
    }
}

/// A row of the view without a period: the last 30 days and month to date. Serialized
/// straight from the row (no `Value` per row: 100,000 rows are a 23 MB answer).
#[derive(Debug, Serialize)]
struct DefaultPeriodRow<'a> {
    install_id: &'a str,
    label: Option<&'a str>,
    plan: &'static str,
    last_seen: Option<String>,
    events_30d: u64,
    tokens_30d: u64,
    tokens_mtd: u64,
    cost_mtd: f64,
    revenue_mtd: f64,
    profit_mtd: f64,
    unpriced_models: &'a [String],
    budget_monthly: Option<f64>,
    budget_used_pct: Option<f64>,
}

impl<'a> DefaultPeriodRow<'a> {
    fn of(row: &'a InstallRow) -> DefaultPeriodRow<'a> {
        DefaultPeriodRow {
            install_id: &row.install_id,
            label: row.label.as_deref(),
            plan: row.plan.as_str(),
            last_seen: row.last_seen_ms.map(format_millis),
            events_30d: row.events,
            tokens_30d: row.tokens,
            tokens_mtd: row.bill.tokens,
            cost_mtd: row.bill.cost.as_units(),
            revenue_mtd: row.bill.revenue.as_units(),
            profit_mtd: row.bill.profit.as_units(),
            unpriced_models: &row.bill.unpriced_models,
            budget_monthly: row.budget_monthly(),
            budget_used_pct: row.budget_used_pct(),
        }
    }
}

/// A period's row: every figure over the period.
#[derive(Debug, Serialize)]
struct PeriodRow<'a> {
    install_id: &'a str,
    label: Option<&'a str>,
    plan: &'static str,
    last_seen: Option<String>,
    events: u64,
    tokens: u64,
    cost: f64,
    revenue: f64,
    profit: f64,
    unpriced_models: &'a [String],
    budget_monthly: Option<f64>,
    /// The period's cost over the monthly budget, for a calendar month's period only.
    budget_used_pct: Option<f64>,
}

impl<'a> PeriodRow<'a> {
    fn of(row: &'a InstallRow, period: &Period) -> PeriodRow<'a> {
        PeriodRow {
            install_id: &row.install_id,
            label: row.label.as_deref(),
            plan: row.plan.as_str(),
            last_seen: row.last_seen_ms.map(format_millis),
            events: row.events,
            tokens: row.bill.tokens,
            cost: row.bill.cost.as_units(),
            revenue: row.bill.revenue.as_units(),
            profit: row.bill.profit.as_units(),
            unpriced_models: &row.bill.unpriced_models,
            budget_monthly: row.budget_monthly(),
            budget_used_pct: row.budget_used_pct().filter(|_| period.is_monthly()),
        }
    }
}

/// The answer: the rows, and the period when one was asked.
#[derive(Debug, Serialize)]
struct ListAnswer<T> {
    installations: Vec<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    period: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    format: Option<String>,
    period: Option<String>,
    from: Option<String>,
    to: Option<String>,
    sort: Option<String>,
    q: Option<String>,
    plan: Option<String>,
}

/// `GET /api/usage/installations[?format=json|csv][&period=mtd|last_month|30d |
/// &from=&to=][&sort=[-]column][&q=][&plan=]`. Without a period the figures are over the
/// last 30 days and the month to date; with one, every figure is over that period and the
/// answer names it. `q` and `plan` keep the installs the dashboard's search keeps. CSV has
/// the same columns as the JSON rows, money with two decimals, then the currency and the
/// priced days (`from`, `to`), and a file name that names them.
pub async fn list(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let Query(params) = params.map_err(query_rejection)?;
    let csv = match params.format.as_deref().map(str::trim) {
        None | Some("") | Some("json") => false,
        Some("csv") => true,
        Some(_) => return Err(bad_param("format", "must be json or csv")),
    };
    let now = app.provider_now();
    let period = Period::parse(
        params.period.as_deref(),
        params.from.as_deref(),
        params.to.as_deref(),
        now,
    )?;
    let sort = Sort::parse(params.sort.as_deref())?;
    let filter = Filter::parse(params.q.as_deref(), params.plan.as_deref())?;
    let (mut rows, _) = load_rows(&app, None, now, period).await?;
    filter.apply(&mut rows);
    sort.apply(&mut rows);
    let period_json = period.map(|period| {
        json!({
            "name": period.name(),
            "from": day_text(period.days.first),
            "to": day_text(period.days.last),
        })
    });
    match (period, csv) {
        (None, false) => Ok(Json(ListAnswer {
            installations: rows.iter().map(DefaultPeriodRow::of).collect(),
            period: period_json,
        })
        .into_response()),
        (Some(period), false) => Ok(Json(ListAnswer {
            installations: rows.iter().map(|row| PeriodRow::of(row, &period)).collect(),
            period: period_json,
        })
        .into_response()),
        (None, true) => {
            let window = usage_window(now);
            let days = CsvDays {
                name: None,
                first: window.month_start,
                last: window.today,
                currency: app.pricing.currency(),
            };
            Ok(rows_csv(
                &COLUMNS,
                &days,
                rows.iter().map(DefaultPeriodRow::of),
            ))
        }
        (Some(period), true) => {
            let days = CsvDays {
                name: Some(period.name()),
                first: period.days.first,
                last: period.days.last,
                currency: app.pricing.currency(),
            };
            Ok(rows_csv(
                &PERIOD_COLUMNS,
                &days,
                rows.iter().map(|row| PeriodRow::of(row, &period)),
            ))
        }
    }
}

/// What every CSV record adds to its JSON row: the currency and the priced days; and
/// what the file is named after.
struct CsvDays<'a> {
    /// The period's name; `None` for the view without a period.
    name: Option<&'static str>,
    first: i64,
    last: i64,
    currency: &'a str,
}

impl CsvDays<'_> {
    /// `installations-mtd-2026-12-01-to-2026-12-07.csv`; without a period,
    /// `installations-2026-12-01-to-2026-12-07.csv` (the priced days).
    fn file_name(&self) -> String {
        let days = format!("{}-to-{}", day_text(self.first), day_text(self.last));
        match self.name {
            Some(name) => format!("installations-{name}-{days}.csv"),
            None => format!("installations-{days}.csv"),
        }
    }
}

/// The columns written as money: two decimals.
const MONEY_COLUMNS: [&str; 7] = [
    "cost_mtd",
    "revenue_mtd",
    "profit_mtd",
    "cost",
    "revenue",
    "profit",
    "budget_monthly",
];

/// The columns every CSV ends with.
const CSV_EXTRA_COLUMNS: [&str; 3] = ["currency", "from", "to"];

/// The keys of the rows without a period, in order: the CSV header without a period.
const COLUMNS: [&str; 13] = [
    "install_id",
    "label",
    "plan",
    "last_seen",
    "events_30d",
    "tokens_30d",
    "tokens_mtd",
    "cost_mtd",
    "revenue_mtd",
    "profit_mtd",
    "unpriced_models",
    "budget_monthly",
    "budget_used_pct",
];

/// The keys of a period's rows, in order: the CSV header with a period.
const PERIOD_COLUMNS: [&str; 12] = [
    "install_id",
    "label",
    "plan",
    "last_seen",
    "events",
    "tokens",
    "cost",
    "revenue",
    "profit",
    "unpriced_models",
    "budget_monthly",
    "budget_used_pct",
];

/// The JSON rows as CSV with `columns` then the currency and the days as the header: a
/// list as its items joined by `;`, `null` as an empty cell, money with two decimals.
fn rows_csv<T: Serialize>(
    columns: &[&str],
    days: &CsvDays<'_>,
    rows: impl Iterator<Item = T>,
) -> Response {
    let cell = |key: &str, value: &Value| match value {
        Value::Null => String::new(),
        Value::Number(number) if MONEY_COLUMNS.contains(&key) => {
            format!("{:.2}", number.as_f64().unwrap_or_default())
        }
        Value::String(text) => text.clone(),
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(";"),
        other => other.to_string(),
    };
    let (first, last) = (day_text(days.first), day_text(days.last));
    let records = rows.map(|row| {
        let row = serde_json::to_value(row).unwrap_or_default();
        let mut record: Vec<String> = columns.iter().map(|key| cell(key, &row[*key])).collect();
        record.extend([days.currency.to_owned(), first.clone(), last.clone()]);
        record
    });
    let header: Vec<&str> = columns.iter().chain(&CSV_EXTRA_COLUMNS).copied().collect();
    with_file_name(csv_answer(&header, records), &days.file_name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::days::day_text;
    use chrono::TimeZone;

    #[test]
    fn windows_are_utc_days() {
        let now = Utc.with_ymd_and_hms(2026, 11, 1, 0, 30, 0).unwrap();
        let window = usage_window(now);
        assert_eq!(window.month_start, window.today);
        assert_eq!(window.from_30d, window.today - 29);
        assert_eq!(day_text(window.today), "2026-11-01");

        let late = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 59).unwrap();
        let window = usage_window(late);
        assert_eq!(day_text(window.month_start), "2026-12-01");
        assert_eq!(day_text(window.from_30d), "2026-12-02");
    }
}
