//! The provider dashboard (SPEC section 6): `GET /dashboard` and
//! `GET /dashboard/installations/{install_id}`, server-rendered HTML behind basic auth.
//!
//! Rendered with `maud`, which escapes every interpolated value, so install ids and user
//! hashes (which come from agents) can never become markup. No JavaScript and no external
//! assets: the chart is inline SVG, sorting is a link answered on the server. The answers
//! carry a `Content-Security-Policy` that forbids scripts, frames and every fetch.
//! The page costs a fixed number of store queries however many installs there are.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;

use super::ReceiverState;
use super::error::ReceiverError;
use super::installations::{InstallRow, load_rows, unknown_install, usage_window};
use super::pricing::{Cents, Pricing};
use super::provider::{authorize, bad_param, blocking, day_text};
use super::store::{DailyTokens, Summary, SummaryGroupBy, SummaryQuery, TimeRange};
use crate::event::format_millis;

const MS_PER_DAY: i64 = 86_400_000;

/// No scripts, no fetches, no frames, no forms: only inline styles and the inline SVG.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; \
     img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:1em 0}th,td{padding:.3em .7em;border-bottom:1px solid #ddd}\
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}.neg{color:#b00}\
.totals td{font-weight:bold}td.n,.nowrap{white-space:nowrap}code{font-size:12px}svg{background:#fafafa}";

/// How the installations table is ordered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Sort {
    /// By install id.
    #[default]
    InstallId,
    /// Highest profit first.
    ProfitDesc,
    /// Lowest profit (largest loss) first.
    ProfitAsc,
}

impl Sort {
    fn parse(text: Option<&str>) -> Option<Sort> {
        match text.map(str::trim).unwrap_or("") {
            "" | "install_id" => Some(Sort::InstallId),
            "profit" => Some(Sort::ProfitDesc),
            "profit_asc" => Some(Sort::ProfitAsc),
            _ => None,
        }
    }

    /// Orders `rows`; ties keep install id order.
    pub fn apply(self, rows: &mut [InstallRow]) {
        match self {
            Sort::InstallId => rows.sort_by(|a, b| a.install_id.cmp(&b.install_id)),
            Sort::ProfitDesc => rows.sort_by(|a, b| {
                b.bill
                    .profit
                    .cmp(&a.bill.profit)
                    .then_with(|| a.install_id.cmp(&b.install_id))
            }),
            Sort::ProfitAsc => rows.sort_by(|a, b| {
                a.bill
                    .profit
                    .cmp(&b.bill.profit)
                    .then_with(|| a.install_id.cmp(&b.install_id))
            }),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    sort: Option<String>,
}

/// `GET /dashboard[?sort=profit|profit_asc|install_id]`.
pub async fn page(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<PageParams>, QueryRejection>,
) -> Result<Response, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let Query(params) = params
        .map_err(|rejection| ReceiverError::bad_request("invalid_query", rejection.body_text()))?;
    let sort = Sort::parse(params.sort.as_deref())
        .ok_or_else(|| bad_param("sort", "must be install_id, profit or profit_asc"))?;
    let now = app.provider_now();
    let (mut rows, chart) = load_rows(&app, None, now).await?;
    sort.apply(&mut rows);
    Ok(html_response(render_dashboard(&rows, &chart, sort, now)))
}

/// `GET /dashboard/installations/{install_id}`: one install over the last 30 days, by user
/// hash, source and model, with its month-to-date cost per model.
pub async fn detail(
    State(app): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(install_id): Path<String>,
) -> Result<Response, ReceiverError> {
    authorize(&app, &headers, peer.ip())?;
    let now = app.provider_now();
    let (rows, chart) = load_rows(&app, Some(install_id.clone()), now).await?;
    let Some(row) = rows.into_iter().next() else {
        return Err(unknown_install());
    };
    let window = usage_window(now);
    let range = TimeRange {
        from_ms: Some(window.from_30d * MS_PER_DAY),
        to_ms: Some((window.today + 1) * MS_PER_DAY),
    };
    let store = app.store.clone();
    let (by_user, by_source, by_model) = blocking(move || {
        let grouped = |group_by: SummaryGroupBy| {
            store.summary(&SummaryQuery {
                install_id: Some(install_id.clone()),
                range,
                group_by,
            })
        };
        Ok((
            grouped(SummaryGroupBy {
                user: true,
                ..SummaryGroupBy::default()
            })?,
            grouped(SummaryGroupBy {
                source: true,
                ..SummaryGroupBy::default()
            })?,
            grouped(SummaryGroupBy {
                model: true,
                ..SummaryGroupBy::default()
            })?,
        ))
    })
    .await?;
    let breakdown = Breakdown {
        by_user: &by_user,
        by_source: &by_source,
        by_model: &by_model,
    };
    Ok(html_response(render_detail(
        &row,
        &app.pricing,
        &chart,
        &breakdown,
        now,
    )))
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

/// The installations page: totals, the 30-day chart and one row per install.
pub fn render_dashboard(
    rows: &[InstallRow],
    chart: &[DailyTokens],
    sort: Sort,
    now: DateTime<Utc>,
) -> Markup {
    let window = usage_window(now);
    let total = |f: fn(&InstallRow) -> u64| rows.iter().map(f).sum::<u64>();
    let sum = |f: fn(&InstallRow) -> Cents| rows.iter().map(f).fold(Cents(0), |a, b| a + b);
    let profit_link = if sort == Sort::ProfitDesc {
        "?sort=profit_asc"
    } else {
        "?sort=profit"
    };
    let body = html! {
        h1 { "Usage and profit" }
        h2 { "Tokens per day, last 30 days" }
        (chart_svg(chart, window.from_30d, window.today))
        h2 { "Installations (" (rows.len()) ")" }
        table #installations {
            thead {
                tr {
                    th { a href="?sort=install_id" { "Install" } }
                    th { "Plan" }
                    th { "Last seen" }
                    th.n { "Events 30d" }
                    th.n { "Tokens 30d" }
                    th.n { "Tokens MTD" }
                    th.n { "Cost MTD" }
                    th.n { "Revenue MTD" }
                    th.n { a href=(profit_link) { "Profit MTD" } }
                    th { "Unpriced models" }
                }
            }
            tbody {
                @for row in rows {
                    tr.install {
                        td {
                            a href={ "/dashboard/installations/" (urlencoding(&row.install_id)) } {
                                code { (row.install_id) }
                            }
                        }
                        td { (row.plan.as_str()) }
                        td.nowrap { (row.last_seen_ms.map(minute_text).unwrap_or_default()) }
                        td.n { (row.events_30d) }
                        td.n { (row.tokens_30d) }
                        td.n { (row.bill.tokens) }
                        (money(row.bill.cost))
                        (money(row.bill.revenue))
                        (money(row.bill.profit))
                        td { (row.bill.unpriced_models.join(", ")) }
                    }
                }
            }
            tfoot {
                tr.totals {
                    td { "Total" }
                    td {}
                    td {}
                    td.n { (total(|r| r.events_30d)) }
                    td.n { (total(|r| r.tokens_30d)) }
                    td.n { (total(|r| r.bill.tokens)) }
                    (money(sum(|r| r.bill.cost)))
                    (money(sum(|r| r.bill.revenue)))
                    (money(sum(|r| r.bill.profit)))
                    td {}
                }
            }
        }
    };
    layout("Usage dashboard", now, body)
}

/// The grouped summaries shown on an install's page.
pub struct Breakdown<'a> {
    pub by_user: &'a Summary,
    pub by_source: &'a Summary,
    pub by_model: &'a Summary,
}

/// One install's page.
pub fn render_detail(
    row: &InstallRow,
    pricing: &Pricing,
    chart: &[DailyTokens],
    breakdown: &Breakdown<'_>,
    now: DateTime<Utc>,
) -> Markup {
    let window = usage_window(now);
    let body = html! {
        p { a href="/dashboard" { "All installations" } }
        h1 { "Installation " code { (row.install_id) } }
        p {
            "Plan " b { (row.plan.as_str()) } ". Month to date: "
            (row.bill.tokens) " tokens, cost " (row.bill.cost) ", revenue "
            (row.bill.revenue) ", profit " (row.bill.profit) "."
        }
        @if !row.bill.unpriced_models.is_empty() {
            p { "No price on some days, counted as 0 there (unpriced): "
                (row.bill.unpriced_models.join(", ")) }
        }
        h2 { "Tokens per day, last 30 days" }
        (chart_svg(chart, window.from_30d, window.today))
        h2 { "By model, last 30 days" }
        table #by-model {
            tr { th { "Model" } th.n { "Events" } th.n { "Tokens" } th.n { "Price per 1K" } }
            @for r in &breakdown.by_model.rows {
                @let model = r.model.as_deref().unwrap_or_default();
                tr {
                    td { (model) }
                    td.n { (r.totals.events) }
                    td.n { (r.totals.total_tokens) }
                    td.n { (micros_text(pricing.price_per_1k(model).0.0)) }
                }
            }
        }
        h2 { "By source, last 30 days" }
        table #by-source {
            tr { th { "Source" } th.n { "Events" } th.n { "Tokens" } }
            @for r in &breakdown.by_source.rows {
                tr {
                    td { (r.source.map(|s| s.as_str()).unwrap_or_default()) }
                    td.n { (r.totals.events) }
                    td.n { (r.totals.total_tokens) }
                }
            }
        }
        h2 { "By user, last 30 days" }
        table #by-user {
            tr { th { "User hash" } th.n { "Events" } th.n { "Tokens" } }
            @for r in &breakdown.by_user.rows {
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

/// A price in micro-units as currency units with six decimals.
fn micros_text(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    format!("{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000)
}

/// Percent-encodes a path segment (everything but unreserved characters).
fn urlencoding(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A bar chart of tokens per day over `from_day..=to_day`, days without events as gaps.
fn chart_svg(days: &[DailyTokens], from_day: i64, to_day: i64) -> Markup {
    const WIDTH: i64 = 720;
    const HEIGHT: i64 = 160;
    const PLOT: i64 = 140;
    let count = (to_day - from_day + 1).max(1);
    let slot = WIDTH / count;
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
                rect x=((d.day - from_day) * slot + 1) y=(HEIGHT - h) width=(slot - 2)
                    height=(h) fill="#4a7fb5" {
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
    use crate::event::Source;
    use crate::receiver::pricing::{Bill, Plan};
    use crate::receiver::store::{SummaryRow, Totals};
    use chrono::TimeZone;

    const HOSTILE: &str = r#"<script>alert("x")</script>&'"#;

    fn row(install_id: &str, profit: i64) -> InstallRow {
        InstallRow {
            install_id: install_id.into(),
            plan: Plan::Pro,
            last_seen_ms: Some(0),
            events_30d: 3,
            tokens_30d: 300,
            budget: None,
            alerted_mtd: Vec::new(),
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

    #[test]
    fn hostile_values_render_inert() {
        let chart = [DailyTokens {
            day: usage_window(now()).today,
            events: 1,
            tokens: 10,
        }];
        let page =
            render_dashboard(&[row(HOSTILE, 1)], &chart, Sort::InstallId, now()).into_string();
        assert!(!page.contains("<script"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;'"));
        // The link target is percent-encoded, not just escaped.
        assert!(page.contains("/dashboard/installations/%3Cscript%3Ealert"));

        let summary = |row: SummaryRow| Summary {
            totals: Totals::default(),
            rows: vec![row],
        };
        let blank = SummaryRow {
            day: None,
            user_hash: None,
            source: None,
            model: None,
            totals: Totals::default(),
        };
        let by_user = summary(SummaryRow {
            user_hash: Some(HOSTILE.into()),
            ..blank.clone()
        });
        let by_source = summary(SummaryRow {
            source: Some(Source::Bulk),
            ..blank.clone()
        });
        let by_model = summary(SummaryRow {
            model: Some(HOSTILE.into()),
            ..blank
        });
        let detail = render_detail(
            &row(HOSTILE, 1),
            &Pricing::default(),
            &chart,
            &Breakdown {
                by_user: &by_user,
                by_source: &by_source,
                by_model: &by_model,
            },
            now(),
        )
        .into_string();
        assert!(!detail.contains("<script"), "{detail}");
        // The heading, the model row and the user row.
        assert_eq!(detail.matches("&lt;script&gt;").count(), 3, "{detail}");
    }

    #[test]
    fn sorting_by_profit_is_on_the_server() {
        let mut rows = vec![row("b", 5), row("a", -3), row("c", 10), row("d", 5)];
        Sort::ProfitDesc.apply(&mut rows);
        let ids: Vec<_> = rows.iter().map(|r| r.install_id.as_str()).collect();
        assert_eq!(ids, ["c", "b", "d", "a"]);
        Sort::ProfitAsc.apply(&mut rows);
        let ids: Vec<_> = rows.iter().map(|r| r.install_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "d", "c"]);
        assert_eq!(Sort::parse(Some("profit")), Some(Sort::ProfitDesc));
        assert_eq!(Sort::parse(None), Some(Sort::InstallId));
        assert_eq!(Sort::parse(Some("cost")), None);
    }

    #[test]
    fn a_thousand_installs_render_quickly() {
        let rows: Vec<_> = (0..1000)
            .map(|n| row(&format!("install-{n:04}"), n))
            .collect();
        let started = std::time::Instant::now();
        let page = render_dashboard(&rows, &[], Sort::ProfitDesc, now()).into_string();
        assert_eq!(page.matches("<tr class=\"install\">").count(), 1000);
        assert!(started.elapsed() < std::time::Duration::from_millis(100));
        // Totals: 1000 rows of 5 cents cost.
        assert!(page.contains("<td class=\"n\">50.00</td>"), "totals row");
    }

    #[test]
    fn helpers_format_prices_and_paths() {
        assert_eq!(micros_text(2_000), "0.002000");
        assert_eq!(minute_text(1_800_000_000_000), "2027-01-15 08:00");
        assert_eq!(micros_text(19_000_000), "19.000000");
        assert_eq!(urlencoding("a b/<c>_-.~"), "a%20b%2F%3Cc%3E_-.~");
    }
}
