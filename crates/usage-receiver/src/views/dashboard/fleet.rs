//! The installations page, `GET /dashboard`: the month's alerts, the view's totals, the
//! cost chart, the fleet's unpriced models, then one page of installs in the asked order,
//! with the search form, the period links and the CSV link of the same view. Pure: the
//! handler ([`crate::views::dashboard`]) reads, this renders.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use maud::{Markup, html};

use crate::billing::money::Cents;
use crate::billing::pricing::{ModelDayTokens, Plan, Pricing};
use crate::days::day_of_ms;
use crate::store::Alert;
use crate::views::dashboard::chart::cost_chart;
use crate::views::dashboard::format::{
    change_text, cost_cell, count, install_name, install_path, minute_text, money, money_cell,
    percent,
};
use crate::views::dashboard::page::layout;
use crate::views::query::{Column, Filter, PAGE_SIZE, Period, Sort, page_count};
use crate::views::rows::InstallRow;
use usage_protocol::event::format_millis;

/// What one dashboard page shows: the period (month to date unless asked), the order, the
/// page and the search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardView {
    pub period: Period,
    pub sort: Sort,
    /// From 1.
    pub page: usize,
    pub filter: Filter,
}

impl DashboardView {
    /// The dashboard's query string for this period and search, `sort` and `page`.
    pub fn link(&self, sort: Sort, page: usize) -> String {
        let mut query = format!("?{}", self.period.query());
        if sort != Sort::DASHBOARD {
            query.push_str(&format!("&sort={}", sort.as_query()));
        }
        query.push_str(&self.filter.query());
        if page > 1 {
            query.push_str(&format!("&page={page}"));
        }
        query
    }
}

/// A model that had no price on some day of the period, over the whole fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpricedModel {
    pub model: String,
    /// Tokens of the days it had no price.
    pub tokens: u64,
    /// Installs that used it unpriced.
    pub installs: usize,
}

/// The fleet's unpriced models over the period, most tokens first: tokens from the fleet's
/// model days, installs from every install's row.
pub fn unpriced_models(
    model_days: &[ModelDayTokens],
    all_rows: &[InstallRow],
    pricing: &Pricing,
) -> Vec<UnpricedModel> {
    let mut models: Vec<UnpricedModel> = Vec::new();
    for day in model_days {
        if pricing.rates(&day.model, day.day).is_some() {
            continue;
        }
        match models.iter_mut().find(|m| m.model == day.model) {
            Some(model) => model.tokens = model.tokens.saturating_add(day.tokens.total()),
            None => models.push(UnpricedModel {
                model: day.model.clone(),
                tokens: day.tokens.total(),
                installs: 0,
            }),
        }
    }
    for row in all_rows {
        for name in &row.bill.unpriced_models {
            if let Some(model) = models.iter_mut().find(|m| &m.model == name) {
                model.installs += 1;
            }
        }
    }
    models.sort_by(|a, b| b.tokens.cmp(&a.tokens).then(a.model.cmp(&b.model)));
    models
}

/// Everything the installations page shows.
pub struct FleetPage<'a> {
    pub view: &'a DashboardView,
    /// Every install of the view (searched, then sorted); the page shows 100 of them.
    pub rows: &'a [InstallRow],
    /// How many installs there are, searched or not.
    pub all_installs: usize,
    /// The fleet's tokens per model and day over the period (the chart).
    pub model_days: &'a [ModelDayTokens],
    pub unpriced: &'a [UnpricedModel],
    /// This month's alerts of every install, newest first.
    pub month_alerts: &'a [Alert],
    /// Whether alerts are sent anywhere (`ALERT_WEBHOOK_URL`).
    pub webhook: bool,
    pub pricing: &'a Pricing,
}

/// How many of the month's alerts the page lists.
const ALERTS_LISTED: usize = 20;

/// The view's totals: over every install of the view, all pages.
struct Totals {
    cost: Cents,
    revenue: Cents,
    profit: Cents,
    at_a_loss: usize,
    /// Installs whose cost leaves unpriced usage out.
    partly_unpriced: usize,
    alerts: usize,
    unpriced_tokens: u64,
}

fn totals(page: &FleetPage<'_>) -> Totals {
    let sum = |f: fn(&InstallRow) -> Cents| page.rows.iter().map(f).fold(Cents(0), |a, b| a + b);
    let alerts = if page.view.filter.is_any() {
        let ids: HashSet<&str> = page.rows.iter().map(|r| r.install_id.as_str()).collect();
        page.month_alerts
            .iter()
            .filter(|a| ids.contains(a.install_id.as_str()))
            .count()
    } else {
        page.month_alerts.len()
    };
    Totals {
        cost: sum(|r| r.bill.cost),
        revenue: sum(|r| r.bill.revenue),
        profit: sum(|r| r.bill.profit),
        at_a_loss: page.rows.iter().filter(|r| r.bill.profit.0 < 0).count(),
        partly_unpriced: page
            .rows
            .iter()
            .filter(|r| !r.bill.unpriced_models.is_empty())
            .count(),
        alerts,
        unpriced_tokens: page.unpriced.iter().map(|m| m.tokens).sum(),
    }
}

/// Profit over revenue, to one decimal; none without revenue.
fn margin(profit: Cents, revenue: Cents) -> Option<f64> {
    (revenue.0 > 0).then(|| (profit.0 as f64 * 1000.0 / revenue.0 as f64).round() / 10.0)
}

fn totals_strip(page: &FleetPage<'_>) -> Markup {
    let t = totals(page);
    let currency = page.pricing.currency();
    let lower = t.partly_unpriced > 0;
    html! {
        dl.totals #totals {
            div #total-cost {
                dt { "Cost" @if lower { " (at least)" } }
                dd { @if lower { "\u{2265} " } (money(t.cost, currency)) }
            }
            div #total-revenue { dt { "Revenue" } dd { (money(t.revenue, currency)) } }
            div #total-profit {
                dt { "Profit" @if lower { " (at most)" } }
                dd.neg[t.profit.0 < 0] { @if lower { "\u{2264} " } (money(t.profit, currency)) }
            }
            div #total-margin {
                dt { "Margin" }
                dd {
                    @match margin(t.profit, t.revenue) {
                        Some(m) => { @if lower { "\u{2264} " } (percent(m)) },
                        None => "\u{2013}",
                    }
                }
            }
            div #total-at-a-loss { dt { "Installs at a loss" } dd { (count(t.at_a_loss as u64)) } }
            div #total-alerts { dt { "Alerts this month" } dd { (count(t.alerts as u64)) } }
            div #total-unpriced-tokens {
                dt {
                    "Tokens of unpriced models"
                    @if page.view.filter.is_any() { " (all installs)" }
                }
                dd { (count(t.unpriced_tokens)) }
            }
        }
        @if lower {
            p.note #lower-bound {
                "Lower bound: " (count(t.partly_unpriced as u64)) " of these installs used models "
                "with no price, counted as 0, so cost is at least, and profit at most, what "
                "is shown."
            }
        }
    }
}

/// This month's alerts, newest first; what "Delivered" says without a webhook.
fn month_alerts(page: &FleetPage<'_>) -> Markup {
    let alerts = page.month_alerts;
    html! {
        section #month-alerts {
            h2 { "Budget alerts this month (" (count(alerts.len() as u64)) ")" }
            @if alerts.is_empty() {
                p.muted { "No budget alerts this month." }
            } @else {
                div.scroll {
                    table #alerts-table {
                        tr {
                            th { "At (UTC)" } th { "Install" } th.n { "Threshold" }
                            th.n { "Cost" } th.n { "Budget" } th { "Delivered" }
                        }
                        @for alert in alerts.iter().take(ALERTS_LISTED) {
                            tr {
                                td.nowrap { (minute_text(alert.at_ms)) }
                                td {
                                    a href=(install_path(&alert.install_id)) {
                                        (install_name(&alert.install_id, alert.label.as_deref()))
                                    }
                                }
                                td.n { span.badge.over[alert.threshold >= 100] { (alert.threshold) "%" } }
                                td.n { (money(alert.cost.to_cents(), &alert.currency)) }
                                td.n { (money(alert.budget.to_cents(), &alert.currency)) }
                                td.nowrap { (delivered(alert, page.webhook)) }
                            }
                        }
                    }
                }
                @if alerts.len() > ALERTS_LISTED {
                    p.muted {
                        "And " (count((alerts.len() - ALERTS_LISTED) as u64))
                        " older alerts this month; every alert is at "
                        code { "GET /api/alerts" } "."
                    }
                }
            }
        }
    }
}

/// What an alert's "Delivered" cell says.
pub fn delivered(alert: &Alert, webhook: bool) -> Markup {
    html! {
        @match (alert.delivered_at_ms, webhook) {
            (Some(at), _) => (format_millis(at)),
            (None, false) => span.muted { "no webhook configured" },
            (None, true) => span.muted { "not yet (" (alert.attempts) " attempts)" },
        }
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

/// The links to the other periods, keeping the order and the search.
pub fn period_links(view: &DashboardView, base: &str) -> Markup {
    let choices = [
        ("mtd", "Month to date"),
        ("last_month", "Last month"),
        ("30d", "Last 30 days"),
    ];
    let mut keep = String::new();
    if view.sort != Sort::DASHBOARD {
        keep.push_str(&format!("&sort={}", view.sort.as_query()));
    }
    keep.push_str(&view.filter.query());
    html! {
        p.periods {
            "Period: "
            @for (name, text) in choices {
                @if view.period.name() == name {
                    b { (text) }
                } @else {
                    a href={ (base) "?period=" (name) (keep) } { (text) }
                }
                " \u{b7} "
            }
            span.muted { "or any dates: " code { "?from=YYYY-MM-DD&to=YYYY-MM-DD" } }
        }
    }
}

/// The search: label or install id, plan; the period and order kept as hidden fields.
fn search_form(view: &DashboardView) -> Markup {
    let (period, from, to) = match view.period.name() {
        "range" => (
            None,
            Some(crate::days::day_text(view.period.days.first)),
            Some(crate::days::day_text(view.period.days.last)),
        ),
        name => (Some(name), None, None),
    };
    html! {
        form.search method="get" action="/dashboard" role="search" {
            @if let Some(period) = period { input type="hidden" name="period" value=(period); }
            @if let Some(from) = from { input type="hidden" name="from" value=(from); }
            @if let Some(to) = to { input type="hidden" name="to" value=(to); }
            @if view.sort != Sort::DASHBOARD {
                input type="hidden" name="sort" value=(view.sort.as_query());
            }
            label for="q" { "Search" }
            input #q type="search" name="q" placeholder="label or install id"
                value=(view.filter.q.as_deref().unwrap_or_default());
            label for="plan" { "Plan" }
            select #plan name="plan" {
                option value="" selected[view.filter.plan.is_none()] { "any" }
                @for plan in Plan::ALL {
                    option value=(plan.as_str()) selected[view.filter.plan == Some(plan)] {
                        (plan.as_str())
                    }
                }
            }
            button type="submit" { "Search" }
            @if view.filter.is_any() {
                a href={ "/dashboard?" (view.period.query()) } { "Clear" }
            }
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

/// The unpriced models panel.
fn unpriced_panel(page: &FleetPage<'_>) -> Markup {
    html! {
        @if !page.unpriced.is_empty() {
            section #unpriced-models {
                h2 { "Models without a price (" (page.unpriced.len()) ")" }
                p.muted {
                    "Their tokens count as 0 cost: add them to the price book. Over every "
                    "install, this period."
                }
                div.scroll {
                    table #unpriced-table {
                        tr { th { "Model" } th.n { "Tokens" } th.n { "Installs" } th.n { "Cost" } }
                        @for model in page.unpriced {
                            tr {
                                td { code { (model.model) } }
                                td.n { (count(model.tokens)) }
                                td.n { (count(model.installs as u64)) }
                                td.n.unpriced { "unpriced" }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The installations page (`rows` holds every install of the view, already sorted).
pub fn render_dashboard(page: &FleetPage<'_>, now: DateTime<Utc>) -> Markup {
    let view = page.view;
    let rows = page.rows;
    let currency = page.pricing.currency();
    let pages = page_count(rows.len());
    let shown = rows
        .iter()
        .skip((view.page - 1).saturating_mul(PAGE_SIZE))
        .take(PAGE_SIZE);
    let csv = format!(
        "/api/usage/installations?format=csv&{}&sort={}{}",
        view.period.query(),
        view.sort.as_query(),
        view.filter.query()
    );
    let detail_query = format!("?{}", view.period.query());
    let today = day_of_ms(now.timestamp_millis());
    let monthly = view.period.is_monthly();
    let body = html! {
        h1 { "Usage and profit" }
        (period_links(view, "/dashboard"))
        (search_form(view))
        p { b { (view.period.title()) } " \u{b7} "
            @if view.filter.is_any() {
                (count(rows.len() as u64)) " of " (count(page.all_installs as u64)) " installs match"
            } @else {
                (count(rows.len() as u64)) " installs"
            }
            " \u{b7} amounts in " (currency)
        }
        (totals_strip(page))
        (month_alerts(page))
        h2 { "Cost per day, all installs" }
        (cost_chart(page.model_days, page.pricing, view.period.days, today, currency))
        (unpriced_panel(page))
        h2 #installations-heading { "Installations" }
        p { a #csv href=(csv) { "Download this view as CSV" } }
        (page_links(view, pages))
        div.scroll #installations-box {
            table #installations {
                thead {
                    tr {
                        (sort_heading(view, Column::Label, "Install", false))
                        (sort_heading(view, Column::Plan, "Plan", false))
                        (sort_heading(view, Column::Cost, &format!("Cost ({currency})"), true))
                        (sort_heading(view, Column::Change, "Change", true))
                        (sort_heading(view, Column::Revenue, "Revenue", true))
                        (sort_heading(view, Column::Profit, "Profit", true))
                        @if monthly {
                            (sort_heading(view, Column::BudgetUsed, "Budget used", true))
                        } @else {
                            th.n title="For month to date and last month" { "Budget used" }
                        }
                        th.alerts { "Alerts" }
                        (sort_heading(view, Column::Tokens, "Tokens", true))
                        (sort_heading(view, Column::Events, "Events", true))
                        (sort_heading(view, Column::LastSeen, "Last seen", false))
                    }
                }
                tbody {
                    @for row in shown {
                        @let unpriced = !row.bill.unpriced_models.is_empty();
                        tr.install {
                            td {
                                a href={ (install_path(&row.install_id)) (detail_query) } {
                                    (install_name(&row.install_id, row.label.as_deref()))
                                }
                            }
                            td { (row.plan.as_str()) }
                            (cost_cell(row.bill.cost, unpriced, &row.bill.unpriced_models))
                            td.n.change { (change_text(row.cost_change())) }
                            (money_cell(row.bill.revenue, false))
                            (money_cell(row.bill.profit, unpriced))
                            td.n {
                                @match row.budget_used_pct().filter(|_| monthly) {
                                    Some(pct) => span.neg[pct >= 100.0] { (percent(pct)) },
                                    None => span.muted { "\u{2013}" },
                                }
                            }
                            td.alerts { (alert_badges(row)) }
                            td.n { (count(row.bill.tokens)) }
                            td.n { (count(row.events)) }
                            td.nowrap { (row.last_seen_ms.map(minute_text).unwrap_or_default()) }
                        }
                    }
                }
            }
        }
        @if rows.is_empty() {
            p #no-installs {
                @if view.filter.is_any() { "No install matches this search." }
                @else { "No installs yet." }
            }
        }
        (page_links(view, pages))
        p.muted {
            "Change: cost against the previous " (view.period.days.last - view.period.days.first + 1)
            " days. Budget used: the period's cost over the monthly budget, for month to date "
            "and last month. Revenue: from the month an install enrolled in (that month "
            "whole), each month's plan price, prorated between plans by the days each was in "
            "force; other periods count each plan's days from the enrollment day. Sort by a "
            "heading; click it again to reverse."
        }
    };
    layout("Usage dashboard", now, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::money::Micros;
    use crate::billing::pricing::{Bill, PriceSettings, TokenCounts};
    use chrono::TimeZone;

    const HOSTILE: &str = r#"<script>alert("x")</script>&'"#;

    fn row(install_id: &str, cost: i64) -> InstallRow {
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
                tokens: 1_234_567,
                cost: Cents(cost),
                revenue: Cents(1900),
                profit: Cents(1900 - cost),
                unpriced_models: Vec::new(),
            },
            previous_cost: Some(Cents(50_000)),
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap()
    }

    fn view(page: usize, q: Option<&str>) -> DashboardView {
        DashboardView {
            period: Period::mtd(now()),
            sort: Sort::DASHBOARD,
            page,
            filter: Filter::parse(q, None).unwrap(),
        }
    }

    fn pricing() -> Pricing {
        Pricing::new(PriceSettings {
            model_cost_overrides: [("priced".to_owned(), 0.01)].into_iter().collect(),
            ..PriceSettings::default()
        })
    }

    fn alert(install_id: &str, delivered_at_ms: Option<i64>) -> Alert {
        Alert {
            alert_id: uuid::Uuid::now_v7(),
            install_id: install_id.into(),
            label: Some(HOSTILE.into()),
            threshold: 100,
            month: "2026-11".into(),
            cost: Micros(51_000_000),
            budget: Micros(50_000_000),
            currency: "USD".into(),
            at_ms: 0,
            delivered_at_ms,
            attempts: 2,
        }
    }

    fn render(
        view: &DashboardView,
        rows: &[InstallRow],
        alerts: &[Alert],
        webhook: bool,
    ) -> String {
        let pricing = pricing();
        let page = FleetPage {
            view,
            rows,
            all_installs: rows.len(),
            model_days: &[],
            unpriced: &[],
            month_alerts: alerts,
            webhook,
            pricing: &pricing,
        };
        render_dashboard(&page, now()).into_string()
    }

    #[test]
    fn hostile_values_render_inert() {
        let mut labelled = row("id-2", 1);
        labelled.label = Some(HOSTILE.into());
        let page = render(
            &view(1, Some(HOSTILE)),
            &[row(HOSTILE, 1), labelled],
            &[alert(HOSTILE, None)],
            false,
        );
        assert!(!page.contains("<script"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;'"));
        // Link targets are percent-encoded, not just escaped.
        assert!(page.contains("/dashboard/installations/%3Cscript%3Ealert"));
        assert!(page.contains("q=%3Cscript%3Ealert"));
    }

    #[test]
    fn a_page_shows_a_hundred_rows_and_totals_over_all() {
        let rows: Vec<_> = (0..250)
            .map(|n| row(&format!("install-{n:04}"), 100_000 + n))
            .collect();
        let page = render(&view(3, None), &rows, &[], false);
        assert_eq!(page.matches("<tr class=\"install\">").count(), 50);
        assert!(page.contains("install-0200") && !page.contains("install-0199"));
        assert!(page.contains("Page 3 of 3"));
        assert!(page.contains("href=\"?period=mtd&amp;page=2\""));
        assert!(page.contains(
            "href=\"/api/usage/installations?format=csv&amp;period=mtd&amp;sort=-cost\""
        ));
        // Totals over every page: 250 rows from 1,000.00 up, with separators and currency.
        let cost: i64 = (0..250).map(|n| 100_000 + n).sum();
        assert!(
            page.contains(&format!(
                "<dd>{} USD</dd>",
                crate::views::dashboard::format::amount(Cents(cost))
            )),
            "{page}"
        );
        assert!(page.contains("1,234,567"), "tokens with separators");
        // 500.00 before, 1,002.00 now.
        assert!(page.contains("+100.4%"));
    }

    #[test]
    fn headings_sort_dearest_first_and_a_second_click_reverses() {
        let page = render(&view(1, None), &[], &[], false);
        assert!(
            page.contains("href=\"?period=mtd&amp;sort=cost\""),
            "{page}"
        );
        assert!(page.contains("href=\"?period=mtd&amp;sort=-budget_used\""));
        assert!(page.contains("href=\"?period=mtd&amp;sort=-change\""));
        assert!(page.contains("href=\"?period=mtd&amp;sort=label\""));
        assert!(page.contains("No installs yet."));
        assert!(page.contains("No budget alerts this month."));
    }

    #[test]
    fn unpriced_costs_are_a_lower_bound() {
        let mut partly = row("partly", 500);
        partly.bill.unpriced_models = vec!["free-model".into()];
        let mut wholly = row("wholly", 0);
        wholly.bill.unpriced_models = vec!["free-model".into()];
        let page = render(&view(1, None), &[partly, wholly], &[], false);
        assert!(page.contains(">\u{2265} 5.00</td>"), "{page}");
        assert!(page.contains(">unpriced</td>"));
        assert!(!page.contains("<td class=\"n cost\">0.00</td>"));
        assert!(page.contains("Cost (at least)"));
        assert!(page.contains("id=\"lower-bound\""));
    }

    #[test]
    fn undelivered_alerts_say_why() {
        let alerts = [alert("a", None), alert("b", Some(1_000))];
        let page = render(&view(1, None), &[], &alerts, false);
        assert!(page.contains("no webhook configured"));
        assert!(page.contains("1970-01-01T00:00:01.000Z"));
        let page = render(&view(1, None), &[], &alerts, true);
        assert!(page.contains("not yet (2 attempts)"));
        assert!(page.contains("51.00 USD"));
    }

    #[test]
    fn the_unpriced_panel_counts_tokens_and_installs() {
        let day = |model: &str, prompt| ModelDayTokens {
            model: model.into(),
            day: 1,
            tokens: TokenCounts {
                prompt,
                ..TokenCounts::default()
            },
        };
        let mut a = row("a", 0);
        a.bill.unpriced_models = vec!["x".into(), "y".into()];
        let mut b = row("b", 0);
        b.bill.unpriced_models = vec!["x".into()];
        let models = unpriced_models(
            &[day("priced", 5), day("x", 10), day("y", 30), day("x", 5)],
            &[a, b, row("c", 1)],
            &pricing(),
        );
        let summary: Vec<_> = models
            .iter()
            .map(|m| (m.model.as_str(), m.tokens, m.installs))
            .collect();
        assert_eq!(summary, [("y", 30, 1), ("x", 15, 2)]);
    }
}
