//! The provider dashboard (docs/dashboard.md): `GET /dashboard` and
//! `GET /dashboard/installations/{install_id}`, server-rendered HTML behind basic auth.
//! A period (month to date unless asked), an order and a page of 100 installs, as
//! [`crate::views::query`] reads them; the rows are [`crate::views::installations`]'s, so
//! a CSV link answers the same view from the API. Reads only, like every view.
//!
//! Rendered with `maud`, which escapes every interpolated value, so install ids and user
//! hashes (which come from agents) can never become markup. No JavaScript and no external
//! assets: the chart is inline SVG, sorting is a link answered on the server. The answers
//! carry a `Content-Security-Policy` that forbids scripts, frames and every fetch.
//! The page costs a fixed number of store queries however many installs there are.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;

use crate::billing::money::{Cents, Micros};

use crate::billing::pricing::{ModelDayTokens, Pricing, TokenCounts};
use crate::days::day_text;
use crate::http::auth::authorize;
use crate::http::error::ReceiverError;
use crate::http::error::unknown_install;
use crate::http::error::{blocking, query_rejection};
use crate::state::ReceiverState;
use crate::store::{
    Alert, CostedReport, DailyTokens, SourceModelDay, Summary, SummaryGroupBy, SummaryQuery,
    TimeRange,
};
use crate::views::installations::{install_rows, load_rows};
use crate::views::query::{Column, PAGE_SIZE, Period, Sort, page_count, parse_page};
use crate::views::rows::InstallRow;
use usage_protocol::event::format_millis;

use crate::days::MS_PER_DAY;
use crate::days::day_of_ms;

/// No scripts, no fetches, no frames, no forms: only inline styles and the inline SVG.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; \
     img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:1em 0}th,td{padding:.3em .7em;border-bottom:1px solid #ddd}\
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}.neg{color:#b00}\
.totals td{font-weight:bold}td.n,.nowrap{white-space:nowrap}code{font-size:12px}svg{background:#fafafa}\
th a{color:inherit}.muted{color:#666;font-size:12px}.pages b{padding:0 .2em}\
.badge{display:inline-block;padding:0 .4em;border-radius:.6em;background:#f3c969;font-size:12px}\
.badge.over{background:#e06666;color:#fff}";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    period: Option<String>,
    from: Option<String>,
    to: Option<String>,
    sort: Option<String>,
    page: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetailParams {
    period: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// What one dashboard page shows: the period (month to date unless asked), the order and
/// the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DashboardView {
    pub period: Period,
    pub sort: Sort,
    /// From 1.
    pub page: usize,
}

impl DashboardView {
    /// The dashboard's query string for this period, `sort` and `page`.
    fn link(&self, sort: Sort, page: usize) -> String {
        let mut query = format!("?{}", self.period.query());
        if sort != Sort::default() {
            query.push_str(&format!("&sort={}", sort.as_query()));
        }
        if page > 1 {
            query.push_str(&format!("&page={page}"));
        }
        query
    }
}

/// `GET /dashboard[?period=mtd|last_month|30d | from=&to=][&sort=[-]column][&page=N]`.
pub async fn page(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<PageParams>, QueryRejection>,
) -> Result<Response, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let Query(params) = params.map_err(query_rejection)?;
    let now = app.provider_now();
    let period = Period::parse(
        params.period.as_deref(),
        params.from.as_deref(),
        params.to.as_deref(),
        now,
    )?
    .unwrap_or_else(|| Period::mtd(now));
    let view = DashboardView {
        period,
        sort: Sort::parse(params.sort.as_deref())?,
        page: parse_page(params.page.as_deref())?,
    };
    let (mut rows, chart) = load_rows(&app, None, now, Some(period)).await?;
    view.sort.apply(&mut rows);
    Ok(html_response(render_dashboard(&view, &rows, &chart, now)))
}

/// `GET /dashboard/installations/{install_id}[?period=... | from=&to=]`: one install over
/// the period (month to date unless asked): tokens and cost by model (from the rollup)
/// and by source (from raw events), per day, and by user hash.
pub async fn detail(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(install_id): Path<String>,
    params: Result<Query<DetailParams>, QueryRejection>,
) -> Result<Response, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let Query(params) = params.map_err(query_rejection)?;
    let now = app.provider_now();
    let period = Period::parse(
        params.period.as_deref(),
        params.from.as_deref(),
        params.to.as_deref(),
        now,
    )?
    .unwrap_or_else(|| Period::mtd(now));
    let store = app.store.clone();
    let (report, by_source, by_user, alerts) = blocking(move || {
        let report = store.installations(Some(&install_id), period.days.as_window())?;
        if report.installs.is_empty() {
            return Ok((report, Vec::new(), Summary::default(), Vec::new()));
        }
        let mut alerts = store.alerts(TimeRange::default())?;
        alerts.retain(|alert| alert.install_id == install_id);
        let by_source = store.source_usage(&install_id, period.days)?;
        let by_user = store.summary(&SummaryQuery {
            install_id: Some(install_id.clone()),
            range: TimeRange {
                from_ms: Some(period.days.first.saturating_mul(MS_PER_DAY)),
                to_ms: Some(
                    period
                        .days
                        .last
                        .saturating_add(1)
                        .saturating_mul(MS_PER_DAY),
                ),
            },
            group_by: SummaryGroupBy {
                user: true,
                ..SummaryGroupBy::default()
            },
        })?;
        Ok((report, by_source, by_user, alerts))
    })
    .await?;
    let Some(usage) = report.installs.first().map(|i| i.usage_mtd.clone()) else {
        return Err(unknown_install());
    };
    let chart = report.daily.clone();
    let rates = |model: &str, day: i64| app.pricing.rates(model, day);
    let costed = CostedReport::price(report, &rates);
    let row = install_rows(&app, costed.installs, Some(period))
        .into_iter()
        .next()
        .ok_or_else(unknown_install)?;
    let detail = InstallDetail {
        row: &row,
        period,
        by_model: by_model(&app.pricing, &usage),
        by_source: by_source_costs(&app.pricing, &by_source),
        by_user: &by_user,
        chart: &chart,
        alerts: &alerts,
    };
    Ok(html_response(render_detail(&detail, now)))
}

/// One line of an install's breakdown: tokens of every kind and their cost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CostLine {
    pub name: String,
    /// Events, where known (raw events are; the rollup's model days are not asked).
    pub events: Option<u64>,
    pub tokens: TokenCounts,
    pub cost: Micros,
    /// Some day of it had no price (counted as 0).
    pub unpriced: bool,
}

impl CostLine {
    fn add(&mut self, pricing: &Pricing, usage: &ModelDayTokens) {
        let t = &mut self.tokens;
        t.prompt += usage.tokens.prompt;
        t.completion += usage.tokens.completion;
        t.cached += usage.tokens.cached;
        t.cache_write += usage.tokens.cache_write;
        t.reasoning += usage.tokens.reasoning;
        match pricing.day_cost(usage) {
            Some(cost) => self.cost = Micros(self.cost.0.saturating_add(cost.0)),
            None => self.unpriced = true,
        }
    }
}

/// Per model over the period, from the rollup: each model's days priced and rounded as
/// the bill does, so the lines add up to the install's cost.
pub fn by_model(pricing: &Pricing, usage: &[ModelDayTokens]) -> Vec<CostLine> {
    let mut lines: BTreeMap<&str, CostLine> = BTreeMap::new();
    for day in usage {
        lines
            .entry(&day.model)
            .or_insert_with(|| CostLine {
                name: day.model.clone(),
                ..CostLine::default()
            })
            .add(pricing, day);
    }
    lines.into_values().collect()
}

/// Per source, from raw events grouped by source, model and day, each group priced and
/// rounded on its own (so the sources may differ from the model lines by rounding).
pub fn by_source_costs(pricing: &Pricing, usage: &[SourceModelDay]) -> Vec<CostLine> {
    let mut lines: BTreeMap<&str, CostLine> = BTreeMap::new();
    for group in usage {
        let line = lines
            .entry(group.source.as_str())
            .or_insert_with(|| CostLine {
                name: group.source.as_str().to_owned(),
                events: Some(0),
                ..CostLine::default()
            });
        line.events = line.events.map(|n| n + group.events);
        line.add(pricing, &group.usage);
    }
    lines.into_values().collect()
}

/// An HTML answer with the security headers.
fn html_response(markup: Markup) -> Response {
    let mut response = markup.into_string().into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn layout(title: &str, now: DateTime<Utc>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                (body)
                p { small { "As of " (format_millis(now.timestamp_millis())) " (UTC)." } }
            }
        }
    }
}

fn money(amount: Cents) -> Markup {
    html! {
        td.n.neg[amount.0 < 0] { (amount) }
    }
}

/// An install's budget alerts of the period's last month, as badges: `80%`, red from
/// 100 % on.
fn alert_badges(row: &InstallRow) -> Markup {
    html! {
        @for threshold in &row.alerted_in_month {
            span.badge.over[*threshold >= 100]
                title={ "Budget alert: " (threshold) "% of the monthly budget reached" } {
                (threshold) "%"
            }
            " "
        }
    }
}

/// An install's budget and its alerts, newest first.
fn alerts_section(row: &InstallRow, alerts: &[Alert]) -> Markup {
    html! {
        section #alerts {
            h2 { "Budget and alerts" }
            @match &row.budget {
                Some(budget) => p {
                    "Monthly budget " (budget.monthly.to_cents()) ", alerts at "
                    (budget.thresholds.iter().map(|t| format!("{t}%")).collect::<Vec<_>>().join(", "))
                    "."
                },
                None => p.muted { "No budget." },
            }
            @if alerts.is_empty() {
                p.muted { "No alerts." }
            } @else {
                table #alerts-table {
                    tr {
                        th { "At (UTC)" } th { "Month" } th.n { "Threshold" } th.n { "Cost" }
                        th.n { "Budget" } th { "Delivered" }
                    }
                    @for alert in alerts.iter().rev() {
                        tr {
                            td.nowrap { (format_millis(alert.at_ms)) }
                            td { (alert.month) }
                            td.n { (alert.threshold) "%" }
                            td.n { (alert.cost.to_cents()) " " (alert.currency) }
                            td.n { (alert.budget.to_cents()) " " (alert.currency) }
                            td.nowrap {
                                @match alert.delivered_at_ms {
                                    Some(at) => (format_millis(at)),
                                    None => span.muted { "not yet" },
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The install's label, else its id shortened; the full id in the title.
fn install_name(row: &InstallRow) -> Markup {
    match &row.label {
        Some(label) => html! { span title=(row.install_id) { (label) } },
        None => html! { code title=(row.install_id) { (short_id(&row.install_id)) } },
    }
}

/// The first 8 characters of a long id and an ellipsis.
fn short_id(id: &str) -> String {
    if id.chars().count() <= 12 {
        id.to_owned()
    } else {
        let head: String = id.chars().take(8).collect();
        format!("{head}\u{2026}")
    }
}

/// The links to the other periods, keeping the order.
fn period_links(view: &DashboardView) -> Markup {
    let choices = [
        ("mtd", "Month to date"),
        ("last_month", "Last month"),
        ("30d", "Last 30 days"),
    ];
    let sort = if view.sort == Sort::default() {
        String::new()
    } else {
        format!("&sort={}", view.sort.as_query())
    };
    html! {
        p.periods {
            "Period: "
            @for (name, text) in choices {
                @if view.period.name() == name {
                    b { (text) }
                } @else {
                    a href={ "?period=" (name) (sort) } { (text) }
                }
                " "
            }
            "or any dates as " code { "?from=YYYY-MM-DD&to=YYYY-MM-DD" } "."
        }
    }
}

/// A column heading that sorts by it; a second click turns the order round.
fn sort_heading(view: &DashboardView, column: Column, text: &str, numeric: bool) -> Markup {
    let current = view.sort.column == column;
    let next = Sort {
        column,
        descending: if current {
            !view.sort.descending
        } else {
            column.descending_first()
        },
    };
    let arrow = match (current, view.sort.descending) {
        (false, _) => "",
        (true, false) => " \u{25b2}",
        (true, true) => " \u{25bc}",
    };
    html! {
        th.n[numeric] { a href=(view.link(next, 1)) { (text) (arrow) } }
    }
}

/// Page links: first, previous, a few around this one, next, last.
fn page_links(view: &DashboardView, pages: usize) -> Markup {
    let around = view.page.saturating_sub(2).max(1)..=(view.page + 2).min(pages);
    html! {
        nav.pages {
            "Page " (view.page) " of " (pages) ": "
            @if view.page > 1 {
                a href=(view.link(view.sort, 1)) { "first" } " "
                a href=(view.link(view.sort, view.page - 1)) rel="prev" { "previous" } " "
            }
            @for n in around {
                @if n == view.page { b { (n) } } @else { a href=(view.link(view.sort, n)) { (n) } }
                " "
            }
            @if view.page < pages {
                a href=(view.link(view.sort, view.page + 1)) rel="next" { "next" } " "
                a href=(view.link(view.sort, pages)) { "last" }
            }
        }
    }
}

/// The installations page: the period's chart, totals over every install, and one page of
/// rows in the asked order (`rows` holds every install, already sorted).
pub fn render_dashboard(
    view: &DashboardView,
    rows: &[InstallRow],
    chart: &[DailyTokens],
    now: DateTime<Utc>,
) -> Markup {
    let total = |f: fn(&InstallRow) -> u64| rows.iter().map(f).sum::<u64>();
    let sum = |f: fn(&InstallRow) -> Cents| rows.iter().map(f).fold(Cents(0), |a, b| a + b);
    let pages = page_count(rows.len());
    let shown = rows
        .iter()
        .skip((view.page - 1).saturating_mul(PAGE_SIZE))
        .take(PAGE_SIZE);
    let csv = format!(
        "/api/usage/installations?format=csv&{}&sort={}",
        view.period.query(),
        view.sort.as_query()
    );
    let detail_query = format!("?{}", view.period.query());
    let body = html! {
        h1 { "Usage and profit" }
        (period_links(view))
        h2 { "Tokens per day, " (view.period.title()) }
        (chart_svg(chart, view.period.days.first, view.period.days.last))
        h2 { "Installations (" (rows.len()) ")" }
        p { a href=(csv) { "Download this view as CSV" } }
        (page_links(view, pages))
        table #installations {
            thead {
                tr {
                    (sort_heading(view, Column::Label, "Install", false))
                    (sort_heading(view, Column::Plan, "Plan", false))
                    (sort_heading(view, Column::LastSeen, "Last seen", false))
                    (sort_heading(view, Column::Events, "Events", true))
                    (sort_heading(view, Column::Tokens, "Tokens", true))
                    (sort_heading(view, Column::Cost, "Cost", true))
                    (sort_heading(view, Column::Revenue, "Revenue", true))
                    (sort_heading(view, Column::Profit, "Profit", true))
                    th { "Unpriced models" }
                    th.alerts { "Alerts" }
                }
            }
            tbody {
                @for row in shown {
                    tr.install {
                        td {
                            a href={ (install_path(&row.install_id)) (detail_query) } {
                                (install_name(row))
                            }
                        }
                        td { (row.plan.as_str()) }
                        td.nowrap { (row.last_seen_ms.map(minute_text).unwrap_or_default()) }
                        td.n { (row.events) }
                        td.n { (row.bill.tokens) }
                        (money(row.bill.cost))
                        (money(row.bill.revenue))
                        (money(row.bill.profit))
                        td { (row.bill.unpriced_models.join(", ")) }
                        td.alerts { (alert_badges(row)) }
                    }
                }
            }
            tfoot {
                tr.totals {
                    td { "Total, all pages" }
                    td {}
                    td {}
                    td.n { (total(|r| r.events)) }
                    td.n { (total(|r| r.bill.tokens)) }
                    (money(sum(|r| r.bill.cost)))
                    (money(sum(|r| r.bill.revenue)))
                    (money(sum(|r| r.bill.profit)))
                    td {}
                    td {}
                }
            }
        }
        (page_links(view, pages))
        p.muted {
            "Revenue: the plan's monthly price for month to date and last month; "
            "for other periods, prorated by day within each month. "
            "Sort by a heading; click it again to reverse."
        }
    };
    layout("Usage dashboard", now, body)
}

/// What one install's page shows.
pub struct InstallDetail<'a> {
    pub row: &'a InstallRow,
    pub period: Period,
    pub by_model: Vec<CostLine>,
    pub by_source: Vec<CostLine>,
    pub by_user: &'a Summary,
    pub chart: &'a [DailyTokens],
    /// The install's alerts, oldest first.
    pub alerts: &'a [Alert],
}

/// A breakdown's table; the events column only when its lines know them.
fn cost_table(id: &str, heading: &str, lines: &[CostLine]) -> Markup {
    let events = lines.iter().any(|line| line.events.is_some());
    html! {
        table id=(id) {
            tr {
                th { (heading) }
                @if events { th.n { "Events" } }
                th.n { "Prompt" }
                th.n { "Cached" }
                th.n { "Cache write" }
                th.n { "Completion" }
                th.n { "Reasoning" }
                th.n { "Tokens" }
                th.n { "Cost" }
            }
            @for line in lines {
                tr {
                    td { (line.name) @if line.unpriced { " (unpriced on some days)" } }
                    @if events {
                        td.n { (line.events.map(|n| n.to_string()).unwrap_or_default()) }
                    }
                    td.n { (line.tokens.prompt) }
                    td.n { (line.tokens.cached) }
                    td.n { (line.tokens.cache_write) }
                    td.n { (line.tokens.completion) }
                    td.n { (line.tokens.reasoning) }
                    td.n { (line.tokens.total()) }
                    (money(line.cost.to_cents()))
                }
            }
        }
    }
}

/// One install's page.
pub fn render_detail(detail: &InstallDetail<'_>, now: DateTime<Utc>) -> Markup {
    let row = detail.row;
    let period = detail.period;
    let today = day_of_ms(now.timestamp_millis());
    // The page reads raw events over the last 90 days (docs/dashboard.md): older days
    // are only in the rollup.
    let raw_from = today - 89;
    let back = format!("/dashboard?{}", period.query());
    let body = html! {
        p { a href=(back) { "All installations" } }
        h1 {
            "Installation "
            @if let Some(label) = &row.label { (label) " " }
            code { (row.install_id) }
        }
        (period_links(&DashboardView { period, sort: Sort::default(), page: 1 }))
        p {
            (period.title()) ": plan " b { (row.plan.as_str()) } ", "
            (row.events) " events, " (row.bill.tokens) " tokens, cost " (row.bill.cost)
            ", revenue " (row.bill.revenue) ", profit " (row.bill.profit) "."
        }
        @if !row.bill.unpriced_models.is_empty() {
            p { "No price on some days, counted as 0 there (unpriced): "
                (row.bill.unpriced_models.join(", ")) }
        }
        (alerts_section(row, detail.alerts))
        h2 { "Tokens per day" }
        (chart_svg(detail.chart, period.days.first, period.days.last))
        h2 { "By model" }
        (cost_table("by-model", "Model", &detail.by_model))
        h2 { "By source" }
        (cost_table("by-source", "Source", &detail.by_source))
        @if period.days.first < raw_from {
            p.muted {
                "By source and by user come from raw events, kept 90 days: days before "
                (day_text(raw_from)) " are not in them. Each source's days are priced and "
                "rounded on their own."
            }
        } @else {
            p.muted { "Each source's days are priced and rounded on their own, so the "
                "sources may differ from the models' total by a cent." }
        }
        h2 { "By user" }
        table #by-user {
            tr { th { "User hash" } th.n { "Events" } th.n { "Tokens" } }
            @for r in &detail.by_user.rows {
                tr {
                    td { code { (r.user_hash.as_deref().unwrap_or_default()) } }
                    td.n { (r.totals.events) }
                    td.n { (r.totals.total_tokens) }
                }
            }
        }
    };
    layout("Installation", now, body)
}

/// `2026-11-28 14:05`, UTC.
fn minute_text(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|at| at.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_default()
}

/// The dashboard path of one install, its id percent-encoded as a path segment.
fn install_path(install_id: &str) -> String {
    let mut url =
        url::Url::parse("http://receiver/dashboard/installations/").expect("a valid base address");
    url.path_segments_mut()
        .expect("an address with a path")
        .pop_if_empty()
        .push(install_id);
    url.path().to_owned()
}

/// A bar chart of tokens per day over `from_day..=to_day`, days without events as gaps.
fn chart_svg(days: &[DailyTokens], from_day: i64, to_day: i64) -> Markup {
    const WIDTH: i64 = 720;
    const HEIGHT: i64 = 160;
    const PLOT: i64 = 140;
    let count = (to_day - from_day + 1).max(1);
    // Tenths of a pixel, so two years of days still fit side by side.
    let slot = WIDTH * 10 / count;
    let gap = if slot >= 40 { 10 } else { 0 };
    let tenths = |n: i64| format!("{}.{}", n / 10, n % 10);
    let max = days.iter().map(|d| d.tokens).max().unwrap_or(0).max(1);
    let height_of = |tokens: u64| {
        i64::try_from(u128::from(tokens) * PLOT as u128 / u128::from(max)).unwrap_or(PLOT)
    };
    html! {
        svg #chart xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(HEIGHT + 20)
            viewBox={ "0 0 " (WIDTH) " " (HEIGHT + 20) } role="img"
            aria-label="Tokens per day" {
            @for d in days.iter().filter(|d| (from_day..=to_day).contains(&d.day)) {
                @let h = height_of(d.tokens);
                rect x=(tenths((d.day - from_day) * slot + gap)) y=(HEIGHT - h)
                    width=(tenths((slot - 2 * gap).max(1))) height=(h) fill="#4a7fb5" {
                    title { (day_text(d.day)) ": " (d.tokens) " tokens, " (d.events) " events" }
                }
            }
            line x1="0" y1=(HEIGHT) x2=(WIDTH) y2=(HEIGHT) stroke="#888" {}
            text x="0" y=(HEIGHT + 15) font-size="11" { (day_text(from_day)) }
            text x=(WIDTH) y=(HEIGHT + 15) font-size="11" text-anchor="end" { (day_text(to_day)) }
            text x="0" y="11" font-size="11" { "max " (max) " tokens" }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::pricing::{Bill, Plan};
    use crate::store::{SummaryRow, Totals};
    use chrono::TimeZone;
    use usage_protocol::event::Source;

    const HOSTILE: &str = r#"<script>alert("x")</script>&'"#;

    fn row(install_id: &str, profit: i64) -> InstallRow {
        InstallRow {
            install_id: install_id.into(),
            label: None,
            plan: Plan::Pro,
            last_seen_ms: Some(0),
            events: 3,
            tokens: 300,
            budget: None,
            alerted_in_month: Vec::new(),
            bill: Bill {
                tokens: 100,
                cost: Cents(5),
                revenue: Cents(profit + 5),
                profit: Cents(profit),
                unpriced_models: vec!["m".into()],
            },
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap()
    }

    fn view(page: usize) -> DashboardView {
        DashboardView {
            period: Period::mtd(now()),
            sort: Sort::parse(Some("-profit")).unwrap(),
            page,
        }
    }

    #[test]
    fn hostile_values_render_inert() {
        let chart = [DailyTokens {
            day: Period::mtd(now()).days.last,
            events: 1,
            tokens: 10,
        }];
        let mut labelled = row("id-2", 1);
        labelled.label = Some(HOSTILE.into());
        let page =
            render_dashboard(&view(1), &[row(HOSTILE, 1), labelled], &chart, now()).into_string();
        assert!(!page.contains("<script"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;'"));
        // The link target is percent-encoded, not just escaped.
        assert!(page.contains("/dashboard/installations/%3Cscript%3Ealert"));

        let by_user = Summary {
            totals: Totals::default(),
            rows: vec![SummaryRow {
                day: None,
                user_hash: Some(HOSTILE.into()),
                source: None,
                model: None,
                origin: None,
                totals: Totals::default(),
            }],
        };
        let line = |name: &str| CostLine {
            name: name.into(),
            ..CostLine::default()
        };
        let mut hostile = row(HOSTILE, 1);
        hostile.label = Some(HOSTILE.into());
        let detail = render_detail(
            &InstallDetail {
                row: &hostile,
                period: Period::mtd(now()),
                by_model: vec![line(HOSTILE)],
                by_source: vec![line(Source::Bulk.as_str())],
                by_user: &by_user,
                chart: &chart,
                alerts: &[],
            },
            now(),
        )
        .into_string();
        assert!(!detail.contains("<script"), "{detail}");
        // The label and id in the heading, the model row and the user row.
        assert_eq!(detail.matches("&lt;script&gt;").count(), 4, "{detail}");
    }

    #[test]
    fn alerts_show_as_badges_and_on_the_install_page_with_the_budget() {
        let mut alerted = row("install-a", 1);
        alerted.alerted_in_month = vec![80, 100];
        alerted.budget = Some(crate::store::Budget {
            monthly: Micros(50_000_000),
            thresholds: vec![50, 80, 100],
        });
        let page = render_dashboard(
            &view(1),
            &[alerted.clone(), row("install-b", 2)],
            &[],
            now(),
        )
        .into_string();
        assert_eq!(page.matches("class=\"badge\"").count(), 1, "{page}");
        assert_eq!(page.matches("class=\"badge over\"").count(), 1, "{page}");
        assert!(page.contains(">80%</span>") && page.contains(">100%</span>"));

        let alert = |threshold, delivered_at_ms| Alert {
            alert_id: uuid::Uuid::now_v7(),
            install_id: "install-a".into(),
            label: None,
            threshold,
            month: "2026-11".into(),
            cost: Micros(41_000_000),
            budget: Micros(50_000_000),
            currency: "USD".into(),
            at_ms: 0,
            delivered_at_ms,
            attempts: 1,
        };
        let alerts = [alert(80, Some(1000)), alert(100, None)];
        let by_user = Summary::default();
        let detail = render_detail(
            &InstallDetail {
                row: &alerted,
                period: Period::mtd(now()),
                by_model: Vec::new(),
                by_source: Vec::new(),
                by_user: &by_user,
                chart: &[],
                alerts: &alerts,
            },
            now(),
        )
        .into_string();
        assert!(
            detail.contains("Monthly budget 50.00, alerts at 50%, 80%, 100%."),
            "{detail}"
        );
        assert_eq!(detail.matches("<td class=\"n\">41.00 USD</td>").count(), 2);
        // Newest first: the undelivered 100 % alert above the delivered 80 % one.
        let hundred = detail.find("<td class=\"n\">100%</td>").unwrap();
        let eighty = detail.find("<td class=\"n\">80%</td>").unwrap();
        assert!(hundred < eighty);
        assert!(detail.contains("not yet"));
    }

    #[test]
    fn labels_are_shown_else_the_id_shortened_with_the_full_id_as_title() {
        let id = "0192f3a4-5b6c-7d8e-9f00-112233445566";
        let mut labelled = row("0192f3a4-0000-7d8e-9f00-112233445566", 1);
        labelled.label = Some("Acme shop".into());
        let page = render_dashboard(&view(1), &[row(id, 2), labelled], &[], now()).into_string();
        assert!(page.contains(&format!("<code title=\"{id}\">0192f3a4\u{2026}</code>")));
        assert!(
            page.contains("<span title=\"0192f3a4-0000-7d8e-9f00-112233445566\">Acme shop</span>")
        );
        assert!(page.contains("<th class=\"alerts\">Alerts</th>"));
    }

    #[test]
    fn a_page_shows_a_hundred_rows_and_totals_over_all() {
        let rows: Vec<_> = (0..250)
            .map(|n| row(&format!("install-{n:04}"), n))
            .collect();
        let page = render_dashboard(&view(3), &rows, &[], now()).into_string();
        assert_eq!(page.matches("<tr class=\"install\">").count(), 50);
        assert!(page.contains("install-0200") && !page.contains("install-0199"));
        assert!(page.contains("Page 3 of 3"));
        assert!(page.contains("href=\"?period=mtd&amp;sort=-profit&amp;page=2\""));
        assert!(page.contains(
            "href=\"/api/usage/installations?format=csv&amp;period=mtd&amp;sort=-profit\""
        ));
        // Totals over every page: 250 rows of 5 cents cost.
        assert!(page.contains("<td class=\"n\">12.50</td>"), "totals row");
    }

    #[test]
    fn headings_sort_and_a_second_click_reverses() {
        let page = render_dashboard(&view(1), &[], &[], now()).into_string();
        // Sorted by -profit now: its heading turns it round, cost starts descending.
        assert!(
            page.contains("href=\"?period=mtd&amp;sort=profit\""),
            "{page}"
        );
        assert!(page.contains("href=\"?period=mtd&amp;sort=-cost\""));
        assert!(page.contains("href=\"?period=mtd&amp;sort=label\""));
    }

    #[test]
    fn cost_lines_price_each_model_day() {
        let pricing = Pricing::default();
        let usage = |model: &str, day| ModelDayTokens {
            model: model.into(),
            day,
            tokens: TokenCounts {
                prompt: 10,
                completion: 5,
                ..TokenCounts::default()
            },
        };
        // No price at all: unpriced, cost 0.
        let lines = by_model(&pricing, &[usage("a", 1), usage("a", 2), usage("b", 1)]);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].tokens.total(), 30);
        assert!(lines[0].unpriced && lines[0].cost == Micros(0));
        let sources = by_source_costs(
            &pricing,
            &[SourceModelDay {
                source: Source::Bulk,
                events: 4,
                usage: usage("a", 1),
            }],
        );
        assert_eq!(sources[0].name, "bulk");
        assert_eq!(sources[0].events, Some(4));
    }

    #[test]
    fn helpers_format_times_and_paths() {
        assert_eq!(minute_text(1_800_000_000_000), "2027-01-15 08:00");
        assert_eq!(
            install_path("a b/<c>_-.~"),
            "/dashboard/installations/a%20b%2F%3Cc%3E_-.~"
        );
        assert_eq!(short_id("short"), "short");
    }

    #[test]
    fn a_long_period_still_fits_the_chart() {
        let chart: Vec<_> = (0..731)
            .map(|day| DailyTokens {
                day,
                events: 1,
                tokens: 5,
            })
            .collect();
        let svg = chart_svg(&chart, 0, 730).into_string();
        assert_eq!(svg.matches("<rect").count(), 731);
        assert!(!svg.contains("width=\"0.0\""));
    }
}
