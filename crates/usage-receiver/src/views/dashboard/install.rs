//! One install's page, `GET /dashboard/installations/{install_id}`: its period figures,
//! budget and alerts, plan history, a cost chart per day by model, cost and tokens by
//! model and by source (dearest first), and its 100 costliest users with a count of the
//! rest. Pure: the handler ([`crate::views::dashboard`]) reads, this renders.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use maud::{Markup, html};

use crate::billing::money::Micros;
use crate::billing::pricing::{ModelDayTokens, Pricing, TokenCounts};
use crate::days::{day_of_ms, day_text};
use crate::store::{Alert, SourceModelDay, UserModelDay};
use crate::views::dashboard::chart::cost_chart;
use crate::views::dashboard::fleet::{DashboardView, delivered, period_links};
use crate::views::dashboard::format::{
    amount, change_text, cost_cell, cost_text, count, install_path, minute_text, money, percent,
};
use crate::views::dashboard::page::layout;
use crate::views::query::{Filter, Period, Sort};
use crate::views::rows::InstallRow;

/// How many users an install's page lists; the rest are counted.
pub const USERS_LISTED: usize = 100;

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

/// Dearest first; equal costs by most tokens, then name.
fn by_cost(mut lines: Vec<CostLine>) -> Vec<CostLine> {
    lines.sort_by(|a, b| {
        b.cost
            .cmp(&a.cost)
            .then(b.tokens.total().cmp(&a.tokens.total()))
            .then(a.name.cmp(&b.name))
    });
    lines
}

/// Per model over the period, from the rollup: each model's days priced and rounded as
/// the bill does, so the lines add up to the install's cost; dearest first.
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
    by_cost(lines.into_values().collect())
}

/// Per source, from raw events grouped by source, model and day, each group priced and
/// rounded on its own (so the sources may differ from the model lines by rounding);
/// dearest first.
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
    by_cost(lines.into_values().collect())
}

/// An install's users: the costliest, and what the others add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Users {
    /// At most [`USERS_LISTED`], dearest first.
    pub listed: Vec<CostLine>,
    /// Users not listed, and their events, tokens and cost together.
    pub others: usize,
    pub others_total: CostLine,
}

/// Per user hash, from raw events grouped by user, model and day (each group priced and
/// rounded on its own): the [`USERS_LISTED`] dearest, the rest counted.
pub fn users(pricing: &Pricing, usage: &[UserModelDay]) -> Users {
    let mut lines: HashMap<&str, CostLine> = HashMap::new();
    for group in usage {
        let line = lines
            .entry(group.user_hash.as_str())
            .or_insert_with(|| CostLine {
                name: group.user_hash.clone(),
                events: Some(0),
                ..CostLine::default()
            });
        line.events = line.events.map(|n| n + group.events);
        line.add(pricing, &group.usage);
    }
    let mut all = by_cost(lines.into_values().collect());
    let rest = all.split_off(all.len().min(USERS_LISTED));
    let mut others_total = CostLine {
        events: Some(0),
        ..CostLine::default()
    };
    for line in &rest {
        let t = &mut others_total.tokens;
        t.prompt += line.tokens.prompt;
        t.completion += line.tokens.completion;
        t.cached += line.tokens.cached;
        t.cache_write += line.tokens.cache_write;
        t.reasoning += line.tokens.reasoning;
        others_total.events = others_total.events.map(|n| n + line.events.unwrap_or(0));
        others_total.cost = Micros(others_total.cost.0.saturating_add(line.cost.0));
        others_total.unpriced |= line.unpriced;
    }
    Users {
        listed: all,
        others: rest.len(),
        others_total,
    }
}

/// One span of an install's plan history: the plan in force from a day on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanSpan {
    pub plan: String,
    /// `YYYY-MM-DD`.
    pub from: String,
}

/// What one install's page shows.
pub struct InstallDetail<'a> {
    pub row: &'a InstallRow,
    pub period: Period,
    /// The install's tokens per model and day over the period (chart and by model).
    pub usage: &'a [ModelDayTokens],
    pub by_source: Vec<CostLine>,
    pub users: Users,
    /// The install's alerts, oldest first.
    pub alerts: &'a [Alert],
    /// Its plans, oldest first (`None`: it was erased while the page was read).
    pub plans: Option<Vec<PlanSpan>>,
    pub webhook: bool,
    pub pricing: &'a Pricing,
}

/// A breakdown's table; the events column only when its lines know them.
fn cost_table(
    id: &str,
    heading: &str,
    lines: &[CostLine],
    others: Option<(usize, &CostLine)>,
) -> Markup {
    let events = lines.iter().any(|line| line.events.is_some());
    html! {
        div.scroll {
            table id=(id) {
                tr {
                    th { (heading) }
                    th.n { "Cost" }
                    th.n { "Tokens" }
                    @if events { th.n { "Events" } }
                    th.n { "Prompt" }
                    th.n { "Cached" }
                    th.n { "Cache write" }
                    th.n { "Completion" }
                    th.n { "Reasoning" }
                }
                @for line in lines {
                    tr { (line_cells(line, events, html! { code { (line.name) } })) }
                }
                @if let Some((others, total)) = others {
                    @if others > 0 {
                        tr.others {
                            (line_cells(total, events, html! {
                                "and " (count(others as u64)) " more users"
                            }))
                        }
                    }
                }
            }
        }
    }
}

fn line_cells(line: &CostLine, events: bool, name: Markup) -> Markup {
    html! {
        td { (name) }
        (cost_cell(line.cost.to_cents(), line.unpriced, &[]))
        td.n { (count(line.tokens.total())) }
        @if events { td.n { (line.events.map(count).unwrap_or_default()) } }
        td.n { (count(line.tokens.prompt)) }
        td.n { (count(line.tokens.cached)) }
        td.n { (count(line.tokens.cache_write)) }
        td.n { (count(line.tokens.completion)) }
        td.n { (count(line.tokens.reasoning)) }
    }
}

/// An install's budget and its alerts, newest first.
fn alerts_section(detail: &InstallDetail<'_>) -> Markup {
    let row = detail.row;
    let currency = detail.pricing.currency();
    html! {
        section #alerts {
            h2 { "Budget and alerts" }
            @match &row.budget {
                Some(budget) => p {
                    "Monthly budget " (money(budget.monthly.to_cents(), currency)) ", alerts at "
                    (budget.thresholds.iter().map(|t| format!("{t}%")).collect::<Vec<_>>().join(", "))
                    "."
                    @if let Some(pct) = row.budget_used_pct().filter(|_| detail.period.is_monthly()) {
                        " Used: " (percent(pct)) "."
                    }
                },
                None => p.muted { "No budget." },
            }
            @if detail.alerts.is_empty() {
                p.muted { "No alerts." }
            } @else {
                div.scroll {
                    table #alerts-table {
                        tr {
                            th { "At (UTC)" } th { "Month" } th.n { "Threshold" } th.n { "Cost" }
                            th.n { "Budget" } th { "Delivered" }
                        }
                        @for alert in detail.alerts.iter().rev() {
                            tr {
                                td.nowrap { (minute_text(alert.at_ms)) }
                                td.nowrap { (alert.month) }
                                td.n { (alert.threshold) "%" }
                                td.n { (money(alert.cost.to_cents(), &alert.currency)) }
                                td.n { (money(alert.budget.to_cents(), &alert.currency)) }
                                td.nowrap { (delivered(alert, detail.webhook)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn plans_section(detail: &InstallDetail<'_>) -> Markup {
    html! {
        section #plans {
            h2 { "Plan history" }
            @match &detail.plans {
                Some(plans) if !plans.is_empty() => {
                    div.scroll {
                        table #plans-table {
                            tr { th { "Plan" } th { "From (UTC)" } th { "Until" } }
                            @for (index, span) in plans.iter().enumerate().rev() {
                                tr {
                                    td { (span.plan) }
                                    td.nowrap { (span.from) }
                                    td.nowrap {
                                        @match plans.get(index + 1) {
                                            Some(next) => { "before " (next.from) },
                                            None => "today",
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                _ => p.muted { "Plan now: " (detail.row.plan.as_str()) "." },
            }
        }
    }
}

/// One install's page.
pub fn render_detail(detail: &InstallDetail<'_>, now: DateTime<Utc>) -> Markup {
    let row = detail.row;
    let period = detail.period;
    let pricing = detail.pricing;
    let currency = pricing.currency();
    let today = day_of_ms(now.timestamp_millis());
    // By source and by user read raw events, kept 90 days (docs/dashboard.md): older days
    // are only in the rollup.
    let raw_from = today - 89;
    let back = format!("/dashboard?{}", period.query());
    let unpriced = !row.bill.unpriced_models.is_empty();
    let view = DashboardView {
        period,
        sort: Sort::DASHBOARD,
        page: 1,
        filter: Filter::default(),
    };
    let by_model = by_model(pricing, detail.usage);
    let body = html! {
        p { a href=(back) { "\u{2190} All installations" } }
        h1 {
            @if let Some(label) = &row.label { (label) " " }
            code { (row.install_id) }
        }
        (period_links(&view, &install_path(&row.install_id)))
        p { b { (period.title()) } " \u{b7} plan " b { (row.plan.as_str()) } " \u{b7} amounts in " (currency) }
        dl.totals #totals {
            div #total-cost {
                dt { "Cost" @if unpriced { " (at least)" } }
                dd { (cost_text(row.bill.cost, unpriced)) }
            }
            div #total-change { dt { "Change" } dd { (change_text(row.cost_change())) } }
            div #total-revenue { dt { "Revenue" } dd { (amount(row.bill.revenue)) } }
            div #total-profit {
                dt { "Profit" @if unpriced { " (at most)" } }
                dd.neg[row.bill.profit.0 < 0] { @if unpriced { "\u{2264} " } (amount(row.bill.profit)) }
            }
            div #total-tokens { dt { "Tokens" } dd { (count(row.bill.tokens)) } }
            div #total-events { dt { "Events" } dd { (count(row.events)) } }
        }
        @if unpriced {
            p.note #lower-bound {
                "Lower bound: no price on some days for " (row.bill.unpriced_models.join(", "))
                ", counted as 0 there."
            }
        }
        (alerts_section(detail))
        (plans_section(detail))
        h2 { "Cost per day" }
        (cost_chart(detail.usage, pricing, period.days, today, currency))
        h2 { "By model" }
        @if by_model.is_empty() { p.muted { "No usage in this period." } }
        @else { (cost_table("by-model", "Model", &by_model, None)) }
        h2 { "By source" }
        @if detail.by_source.is_empty() { p.muted { "No raw events in this period." } }
        @else { (cost_table("by-source", "Source", &detail.by_source, None)) }
        h2 { "By user (" (count((detail.users.listed.len() + detail.users.others) as u64)) ")" }
        @if detail.users.listed.is_empty() {
            p.muted { "No raw events in this period." }
        } @else {
            @if detail.users.others > 0 {
                p.muted { "The " (detail.users.listed.len()) " costliest users; the others together on the last line." }
            }
            (cost_table("by-user", "User hash", &detail.users.listed,
                Some((detail.users.others, &detail.users.others_total))))
        }
        @if period.days.first < raw_from {
            p.muted {
                "By source and by user come from raw events, kept 90 days: days before "
                (day_text(raw_from)) " are not in them. Each source's and user's days are "
                "priced and rounded on their own."
            }
        } @else {
            p.muted { "Each source's and user's days are priced and rounded on their own, so "
                "they may differ from the models' total by a cent." }
        }
    };
    layout("Installation", now, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::money::Cents;
    use crate::billing::pricing::{Bill, Plan, PriceSettings};
    use chrono::TimeZone;
    use usage_protocol::event::Source;

    const HOSTILE: &str = r#"<script>alert("x")</script>&'"#;

    fn pricing() -> Pricing {
        Pricing::new(PriceSettings {
            model_cost_overrides: [("dear".to_owned(), 0.01), ("cheap".to_owned(), 0.001)]
                .into_iter()
                .collect(),
            ..PriceSettings::default()
        })
    }

    fn usage(model: &str, day: i64, prompt: u64) -> ModelDayTokens {
        ModelDayTokens {
            model: model.into(),
            day,
            tokens: TokenCounts {
                prompt,
                completion: 5,
                ..TokenCounts::default()
            },
        }
    }

    #[test]
    fn lines_are_dearest_first_and_unpriced_lines_say_so() {
        let lines = by_model(
            &pricing(),
            &[
                usage("cheap", 1, 1000),
                usage("dear", 1, 1000),
                usage("none", 2, 9000),
            ],
        );
        let names: Vec<_> = lines.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["dear", "cheap", "none"]);
        assert!(lines[2].unpriced && lines[2].cost == Micros(0));
        let sources = by_source_costs(
            &pricing(),
            &[SourceModelDay {
                source: Source::Bulk,
                events: 4,
                usage: usage("dear", 1, 10),
            }],
        );
        assert_eq!(sources[0].name, "bulk");
        assert_eq!(sources[0].events, Some(4));
    }

    #[test]
    fn a_hundred_users_are_listed_and_the_rest_counted() {
        let groups: Vec<_> = (0..250u64)
            .map(|n| UserModelDay {
                user_hash: format!("{n:064x}"),
                events: 1,
                usage: usage("dear", 1, 1000 * (n + 1)),
            })
            .collect();
        let users = users(&pricing(), &groups);
        assert_eq!(users.listed.len(), USERS_LISTED);
        assert_eq!(users.listed[0].name, format!("{:064x}", 249));
        assert_eq!(users.others, 150);
        assert_eq!(users.others_total.events, Some(150));
        let expected: u64 = (1..=150).map(|n| 1000 * n + 5).sum();
        assert_eq!(users.others_total.tokens.total(), expected);
    }

    #[test]
    fn hostile_values_render_inert() {
        let now = Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap();
        let row = InstallRow {
            install_id: HOSTILE.into(),
            label: Some(HOSTILE.into()),
            plan: Plan::Pro,
            last_seen_ms: None,
            events: 1,
            tokens: 1,
            bill: Bill {
                tokens: 1,
                cost: Cents(0),
                revenue: Cents(0),
                profit: Cents(0),
                unpriced_models: vec![HOSTILE.into()],
            },
            budget: None,
            alerted_in_month: Vec::new(),
            previous_cost: None,
        };
        let pricing = pricing();
        let detail = InstallDetail {
            row: &row,
            period: Period::mtd(now),
            usage: &[usage(
                HOSTILE,
                crate::days::day_of_ms(now.timestamp_millis()),
                10,
            )],
            by_source: Vec::new(),
            users: users(
                &pricing,
                &[UserModelDay {
                    user_hash: HOSTILE.into(),
                    events: 1,
                    usage: usage("dear", 1, 1000),
                }],
            ),
            alerts: &[],
            plans: Some(vec![PlanSpan {
                plan: "pro".into(),
                from: "2026-11-02".into(),
            }]),
            webhook: false,
            pricing: &pricing,
        };
        let page = render_detail(&detail, now).into_string();
        assert!(!page.contains("<script"), "{page}");
        assert!(page.contains("&lt;script&gt;"));
        assert!(page.contains("<td class=\"nowrap\">2026-11-02</td>"));
        // Unpriced everywhere it is: the total and the model line, never 0.00.
        assert!(page.contains("<dd>unpriced</dd>"), "{page}");
        assert!(!page.contains("<td class=\"n cost\">0.00</td>"));
    }
}
