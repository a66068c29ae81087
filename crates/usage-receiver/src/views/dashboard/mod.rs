//! The provider dashboard (docs/dashboard.md): `GET /dashboard` and
//! `GET /dashboard/installations/{install_id}`, server-rendered HTML behind basic auth.
//! This module reads what a page asks for and what it shows; [`fleet`] and [`install`]
//! render the two pages, [`chart`] the cost chart, [`format`] figures and names, and
//! [`page`] what every page shares (layout, headers, error pages). Reads only, like every
//! view.
//!
//! A period (month to date unless asked), a search, an order and a page of 100 installs,
//! as [`crate::views::query`] reads them; the rows are [`crate::views::installations`]'s,
//! so the CSV link answers the same view from the API. Rendered with `maud`, which escapes
//! every interpolated value, so install ids, labels, models and user hashes (which come
//! from agents) can never become markup. No JavaScript and no external assets: the chart
//! is inline SVG, sorting is a link and the search a plain `GET` form, both answered on
//! the server. The answers carry a `Content-Security-Policy` that forbids scripts, frames
//! and every fetch, and lets forms go only to the receiver. Errors are HTML pages with a
//! link back, keeping the status and headers of the API's error answer.
//!
//! **Invariant:** a page costs a fixed number of store queries however many installs
//! there are: the installations view of the period and of the previous period of the same
//! length, the fleet's model days and this month's alerts; an install's page, its own
//! figures of both periods, alerts, usage by source and by user, and plan history.

pub mod chart;
pub mod fleet;
pub mod format;
pub mod install;
pub mod page;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::billing::money::Cents;
use crate::days::{MS_PER_DAY, day_of_ms, day_text, month_of, month_text};
use crate::http::auth::authorize;
use crate::http::error::{ReceiverError, blocking, query_rejection, unknown_install};
use crate::state::ReceiverState;
use crate::store::{CostedReport, PriceList, TimeRange};
use crate::views::dashboard::fleet::{DashboardView, FleetPage, render_dashboard, unpriced_models};
use crate::views::dashboard::install::{
    InstallDetail, PlanSpan, by_source_costs, render_detail, users,
};
use crate::views::dashboard::page::{error_page, html_response};
use crate::views::installations::install_rows;
use crate::views::query::{Filter, Period, Sort, parse_page};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    period: Option<String>,
    from: Option<String>,
    to: Option<String>,
    sort: Option<String>,
    page: Option<String>,
    q: Option<String>,
    plan: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetailParams {
    period: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// `GET /dashboard[?period=mtd|last_month|30d | from=&to=][&sort=[-]column][&page=N]
/// [&q=][&plan=]`.
pub async fn page(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<PageParams>, QueryRejection>,
) -> Response {
    let now = app.provider_now();
    match fleet_page(&app, peer, &headers, params, now).await {
        Ok(page) => page,
        Err(error) => error_page(error, now),
    }
}

/// The month (UTC) of `today` as a time range, for its alerts.
fn month_range(today: i64) -> TimeRange {
    let (first, _) = month_of(today);
    TimeRange {
        from_ms: Some(first.saturating_mul(MS_PER_DAY)),
        to_ms: Some(today.saturating_add(1).saturating_mul(MS_PER_DAY)),
    }
}

/// The period a page asks for (`period`, or `from` and `to`); month to date when none.
fn asked_period(
    period: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Period, ReceiverError> {
    Ok(Period::parse(period, from, to, now)?.unwrap_or_else(|| Period::mtd(now)))
}

async fn fleet_page(
    app: &Arc<ReceiverState>,
    peer: SocketAddr,
    headers: &HeaderMap,
    params: Result<Query<PageParams>, QueryRejection>,
    now: DateTime<Utc>,
) -> Result<Response, ReceiverError> {
    authorize(app, headers, peer.ip())?;
    let Query(params) = params.map_err(query_rejection)?;
    let period = asked_period(
        params.period.as_deref(),
        params.from.as_deref(),
        params.to.as_deref(),
        now,
    )?;
    let view = DashboardView {
        period,
        sort: Sort::parse_or(params.sort.as_deref(), Sort::DASHBOARD)?,
        page: parse_page(params.page.as_deref())?,
        filter: Filter::parse(params.q.as_deref(), params.plan.as_deref())?,
    };
    let today = day_of_ms(now.timestamp_millis());
    let previous = period.previous();
    // The period's rows and chart, the previous period's costs, and this month's alerts,
    // read at once (on PostgreSQL each on a connection of its own).
    let prices_of = |app: Arc<ReceiverState>, days: crate::store::DayRange, chart: bool| {
        let store = app.store.clone();
        blocking(move || {
            let rates = |model: &str, day: i64| app.pricing.rates(model, day);
            let prices = PriceList {
                id: app.pricing.fingerprint(),
                rates: &rates,
            };
            if chart {
                store.costed_with_model_days(days, prices)
            } else {
                Ok((
                    store.costed_installations(None, days.as_window(), prices)?,
                    Vec::new(),
                ))
            }
        })
    };
    let store = app.store.clone();
    let alerts = blocking(move || store.alerts(month_range(today)));
    let (current, before, alerts) = tokio::join!(
        prices_of(app.clone(), period.days, true),
        prices_of(app.clone(), previous.days, false),
        alerts
    );
    let ((current, model_days), (before, _), mut month_alerts) = (current?, before?, alerts?);
    let mut rows = install_rows(app, current.installs, Some(period));
    let before: HashMap<&str, Cents> = before
        .installs
        .iter()
        .map(|install| (install.install_id.as_str(), install.priced.cost.to_cents()))
        .collect();
    for row in &mut rows {
        row.previous_cost = Some(
            before
                .get(row.install_id.as_str())
                .copied()
                .unwrap_or_default(),
        );
    }
    let unpriced = unpriced_models(&model_days, &rows, &app.pricing);
    let all_installs = rows.len();
    view.filter.apply(&mut rows);
    view.sort.apply(&mut rows);
    // A late event's alert is recorded now but belongs to its own, earlier month.
    let this_month = month_text(today);
    month_alerts.retain(|alert| alert.month == this_month);
    month_alerts.reverse();
    let page = FleetPage {
        view: &view,
        rows: &rows,
        all_installs,
        model_days: &model_days,
        unpriced: &unpriced,
        month_alerts: &month_alerts,
        webhook: app.settings.alert_webhook.is_some(),
        pricing: &app.pricing,
    };
    Ok(html_response(render_dashboard(&page, now)))
}

/// `GET /dashboard/installations/{install_id}[?period=... | from=&to=]`: one install over
/// the period (month to date unless asked).
pub async fn detail(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(install_id): Path<String>,
    params: Result<Query<DetailParams>, QueryRejection>,
) -> Response {
    let now = app.provider_now();
    match install_page(&app, peer, &headers, install_id, params, now).await {
        Ok(page) => page,
        Err(error) => error_page(error, now),
    }
}

async fn install_page(
    app: &Arc<ReceiverState>,
    peer: SocketAddr,
    headers: &HeaderMap,
    install_id: String,
    params: Result<Query<DetailParams>, QueryRejection>,
    now: DateTime<Utc>,
) -> Result<Response, ReceiverError> {
    authorize(app, headers, peer.ip())?;
    let Query(params) = params.map_err(query_rejection)?;
    let period = asked_period(
        params.period.as_deref(),
        params.from.as_deref(),
        params.to.as_deref(),
        now,
    )?;
    let previous = period.previous();
    let store = app.store.clone();
    let read = blocking(move || {
        let report = store.installations(Some(&install_id), period.days.as_window())?;
        if report.installs.is_empty() {
            return Ok(None);
        }
        let before = store.installations(Some(&install_id), previous.days.as_window())?;
        let alerts = store.install_alerts(&install_id)?;
        let by_source = store.source_usage(&install_id, period.days)?;
        let by_user = store.user_usage(&install_id, period.days)?;
        let plans = store.plan_history(&install_id)?;
        Ok(Some((report, before, alerts, by_source, by_user, plans)))
    })
    .await?;
    let Some((report, before, alerts, by_source, by_user, plans)) = read else {
        return Err(unknown_install());
    };
    let plans = plans.map(|history| {
        history
            .periods()
            .iter()
            .map(|span| PlanSpan {
                plan: span.plan.as_str().to_owned(),
                from: day_text(span.from_day),
            })
            .collect()
    });
    let usage = report.installs[0].usage_mtd.clone();
    let rates = |model: &str, day: i64| app.pricing.rates(model, day);
    let before_cost = CostedReport::price(before, &rates)
        .installs
        .first()
        .map(|install| install.priced.cost.to_cents())
        .unwrap_or_default();
    let costed = CostedReport::price(report, &rates);
    let mut row = install_rows(app, costed.installs, Some(period))
        .into_iter()
        .next()
        .ok_or_else(unknown_install)?;
    row.previous_cost = Some(before_cost);
    let detail = InstallDetail {
        row: &row,
        period,
        usage: &usage,
        by_source: by_source_costs(&app.pricing, &by_source),
        users: users(&app.pricing, &by_user),
        alerts: &alerts,
        plans,
        webhook: app.settings.alert_webhook.is_some(),
        pricing: &app.pricing,
    };
    Ok(html_response(render_detail(&detail, now)))
}
