//! What the provider asks of the installations views: the period
//! (`period=mtd|last_month|30d`, or `from=&to=` as inclusive UTC dates), the order
//! (`sort=<column>` ascending, `sort=-<column>` descending) and the dashboard's page
//! (`page=N`, 100 installs a page). Shared by `GET /api/usage/installations` (JSON and CSV)
//! and the dashboard, so the CSV link of a dashboard view answers the same rows.
//!
//! Also the `from=&to=` dates of the other views ([`parse_range`]). Parsing only, and the
//! query strings of links: every rejection names the parameter and its rule. No I/O.

use std::cmp::Ordering;

use chrono::{DateTime, Utc};

use crate::billing::pricing::Plan;
use crate::days::day_text;
use crate::days::month_of;
use crate::http::error::ReceiverError;
use crate::http::error::bad_param;
use crate::store::DayRange;
use crate::views::rows::InstallRow;

use crate::days::MS_PER_DAY;
use crate::days::{day_of_ms, parse_day};
use crate::store::TimeRange;
/// Installs on one dashboard page.
pub const PAGE_SIZE: usize = 100;
/// The longest `from=&to=` period: the daily rollups are kept 730 days.
pub const MAX_PERIOD_DAYS: i64 = 731;

/// Which days a view covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeriodKind {
    /// The current UTC month up to today.
    Mtd,
    /// The whole previous UTC month.
    LastMonth,
    /// The last 30 UTC days, today included.
    Last30d,
    /// `from=&to=`, both included.
    Range,
}

/// The days of a view, and how they were asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub kind: PeriodKind,
    pub days: DayRange,
}

impl Period {
    /// Month to date as of `now`.
    pub fn mtd(now: DateTime<Utc>) -> Period {
        let today = today(now);
        Period {
            kind: PeriodKind::Mtd,
            days: DayRange {
                first: month_of(today).0,
                last: today,
            },
        }
    }

    /// Reads `period`, or `from` and `to`; `None` when none is given.
    pub fn parse(
        period: Option<&str>,
        from: Option<&str>,
        to: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Option<Period>, ReceiverError> {
        let today = today(now);
        let (period, from, to) = (non_empty(period), non_empty(from), non_empty(to));
        if let Some(name) = period {
            if from.is_some() || to.is_some() {
                return Err(bad_param("period", "must not be given with from and to"));
            }
            let (kind, days) = match name {
                "mtd" => return Ok(Some(Period::mtd(now))),
                "last_month" => {
                    let (first, last) = month_of(month_of(today).0 - 1);
                    (PeriodKind::LastMonth, DayRange { first, last })
                }
                "30d" => (
                    PeriodKind::Last30d,
                    DayRange {
                        first: today - 29,
                        last: today,
                    },
                ),
                _ => return Err(bad_param("period", "must be mtd, last_month or 30d")),
            };
            return Ok(Some(Period { kind, days }));
        }
        let (first, last) = match (from, to) {
            (None, None) => return Ok(None),
            (Some(from), Some(to)) => (date("from", from)?, date("to", to)?),
            (Some(_), None) => return Err(bad_param("to", "must be given with from")),
            (None, Some(_)) => return Err(bad_param("from", "must be given with to")),
        };
        if first > last {
            return Err(bad_param("from", "must not be after to"));
        }
        if last - first + 1 > MAX_PERIOD_DAYS {
            return Err(bad_param(
                "to",
                "must be at most 731 days after from, both included",
            ));
        }
        Ok(Some(Period {
            kind: PeriodKind::Range,
            days: DayRange { first, last },
        }))
    }

    /// The period of the same length that ends the day before this one begins (what the
    /// dashboard's change column compares with).
    pub fn previous(&self) -> Period {
        let length = self.days.last - self.days.first + 1;
        Period {
            kind: PeriodKind::Range,
            days: DayRange {
                first: self.days.first - length,
                last: self.days.first - 1,
            },
        }
    }

    /// The name the JSON answer gives it.
    pub fn name(&self) -> &'static str {
        match self.kind {
            PeriodKind::Mtd => "mtd",
            PeriodKind::LastMonth => "last_month",
            PeriodKind::Last30d => "30d",
            PeriodKind::Range => "range",
        }
    }

    /// Whether the period's revenue is one whole monthly price (month to date and last
    /// month), rather than prorated by day.
    pub fn is_monthly(&self) -> bool {
        matches!(self.kind, PeriodKind::Mtd | PeriodKind::LastMonth)
    }

    /// `Month to date`, `2026-10-01 to 2026-10-31`.
    pub fn title(&self) -> String {
        let range = format!(
            "{} to {}",
            day_text(self.days.first),
            day_text(self.days.last)
        );
        match self.kind {
            PeriodKind::Mtd => format!("Month to date ({range})"),
            PeriodKind::LastMonth => format!("Last month ({range})"),
            PeriodKind::Last30d => format!("Last 30 days ({range})"),
            PeriodKind::Range => range,
        }
    }

    /// The query string that asks for this period again: `period=30d` or
    /// `from=2026-10-01&to=2026-10-31`.
    pub fn query(&self) -> String {
        match self.kind {
            PeriodKind::Range => format!(
                "from={}&to={}",
                day_text(self.days.first),
                day_text(self.days.last)
            ),
            _ => format!("period={}", self.name()),
        }
    }
}

fn today(now: DateTime<Utc>) -> i64 {
    day_of_ms(now.timestamp_millis())
}

fn non_empty(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|v| !v.is_empty())
}

fn date(name: &str, text: &str) -> Result<i64, ReceiverError> {
    parse_day(text).ok_or_else(|| bad_param(name, "must be a UTC date such as 2026-11-27"))
}

/// A column the installations can be sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    InstallId,
    Label,
    Plan,
    LastSeen,
    Events,
    Tokens,
    Cost,
    Revenue,
    Profit,
    /// The period's cost over the monthly budget in force.
    BudgetUsed,
    /// The change of cost against the previous period of the same length (dashboard
    /// rows only: elsewhere no row knows it, and every row ties).
    Change,
}

impl Column {
    pub const ALL: [Column; 11] = [
        Column::InstallId,
        Column::Label,
        Column::Plan,
        Column::LastSeen,
        Column::Events,
        Column::Tokens,
        Column::Cost,
        Column::Revenue,
        Column::Profit,
        Column::BudgetUsed,
        Column::Change,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Column::InstallId => "install_id",
            Column::Label => "label",
            Column::Plan => "plan",
            Column::LastSeen => "last_seen",
            Column::Events => "events",
            Column::Tokens => "tokens",
            Column::Cost => "cost",
            Column::Revenue => "revenue",
            Column::Profit => "profit",
            Column::BudgetUsed => "budget_used",
            Column::Change => "change",
        }
    }

    /// Whether a click on its heading first sorts it largest (or latest) first.
    pub fn descending_first(self) -> bool {
        !matches!(self, Column::InstallId | Column::Label | Column::Plan)
    }

    fn compare(self, a: &InstallRow, b: &InstallRow) -> Ordering {
        match self {
            Column::InstallId => Ordering::Equal,
            Column::Label => a.label.cmp(&b.label),
            Column::Plan => a.plan.cmp(&b.plan),
            Column::LastSeen => a.last_seen_ms.cmp(&b.last_seen_ms),
            Column::Events => a.events.cmp(&b.events),
            Column::Tokens => a.bill.tokens.cmp(&b.bill.tokens),
            Column::Cost => a.bill.cost.cmp(&b.bill.cost),
            Column::Revenue => a.bill.revenue.cmp(&b.bill.revenue),
            Column::Profit => a.bill.profit.cmp(&b.bill.profit),
            Column::BudgetUsed => a.budget_used_pct().total_cmp_opt(b.budget_used_pct()),
            Column::Change => a.cost_change().cmp(&b.cost_change()),
        }
    }
}

/// The order of a view: `sort=cost` ascending, `sort=-cost` descending; ties (and a
/// missing `sort`) in install id order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sort {
    pub column: Column,
    pub descending: bool,
}

impl Default for Sort {
    fn default() -> Sort {
        Sort {
            column: Column::InstallId,
            descending: false,
        }
    }
}

impl Sort {
    const RULE: &str = "must be a column (install_id, label, plan, last_seen, events, tokens, \
                        cost, revenue, profit, budget_used, change), with a leading - for \
                        descending";

    /// The dashboard's order when none is asked: dearest first.
    pub const DASHBOARD: Sort = Sort {
        column: Column::Cost,
        descending: true,
    };

    /// Reads `sort`, else `default`.
    pub fn parse_or(text: Option<&str>, default: Sort) -> Result<Sort, ReceiverError> {
        match non_empty(text) {
            None => Ok(default),
            some => Sort::parse(some),
        }
    }

    pub fn parse(text: Option<&str>) -> Result<Sort, ReceiverError> {
        let Some(text) = non_empty(text) else {
            return Ok(Sort::default());
        };
        let (descending, name) = match text.strip_prefix('-') {
            Some(name) => (true, name),
            None => (false, text),
        };
        let column = Column::ALL
            .into_iter()
            .find(|column| column.as_str() == name)
            .ok_or_else(|| bad_param("sort", Sort::RULE))?;
        Ok(Sort { column, descending })
    }

    /// `cost` or `-cost`.
    pub fn as_query(self) -> String {
        let sign = if self.descending { "-" } else { "" };
        format!("{sign}{}", self.column.as_str())
    }

    /// Orders `rows`; equal values keep install id order, whichever the direction.
    pub fn apply(self, rows: &mut [InstallRow]) {
        rows.sort_by(|a, b| {
            let order = self.column.compare(a, b);
            let order = if self.descending {
                order.reverse()
            } else {
                order
            };
            let ids = a.install_id.cmp(&b.install_id);
            let ids = if self.descending && self.column == Column::InstallId {
                ids.reverse()
            } else {
                ids
            };
            order.then(ids)
        });
    }
}

/// Which installs a view lists: `q=` (the label or install id contains it, ignoring case)
/// and `plan=`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Lowercased; `None` when not asked (or blank).
    pub q: Option<String>,
    pub plan: Option<Plan>,
}

impl Filter {
    /// The longest `q` taken: a label is at most 100 characters, an install id 128 bytes.
    const MAX_Q_CHARS: usize = 200;

    pub fn parse(q: Option<&str>, plan: Option<&str>) -> Result<Filter, ReceiverError> {
        let q = match non_empty(q) {
            Some(text) if text.chars().count() > Filter::MAX_Q_CHARS => {
                return Err(bad_param("q", "must be at most 200 characters"));
            }
            Some(text) if text.chars().any(char::is_control) => {
                return Err(bad_param("q", "must not contain control characters"));
            }
            other => other.map(str::to_lowercase),
        };
        let plan = match non_empty(plan) {
            Some(text) => Some(
                text.parse::<Plan>()
                    .map_err(|_| bad_param("plan", "must be free, pro or agency"))?,
            ),
            None => None,
        };
        Ok(Filter { q, plan })
    }

    /// Whether the filter asks for anything.
    pub fn is_any(&self) -> bool {
        self.q.is_some() || self.plan.is_some()
    }

    /// Whether `row` is in the view.
    pub fn matches(&self, row: &InstallRow) -> bool {
        if self.plan.is_some_and(|plan| plan != row.plan) {
            return false;
        }
        let Some(q) = &self.q else {
            return true;
        };
        contains_ignoring_case(&row.install_id, q)
            || row
                .label
                .as_deref()
                .is_some_and(|label| contains_ignoring_case(label, q))
    }

    /// Keeps the rows in the view.
    pub fn apply(&self, rows: &mut Vec<InstallRow>) {
        if self.is_any() {
            rows.retain(|row| self.matches(row));
        }
    }

    /// `&q=...&plan=...`, percent-encoded, or empty.
    pub fn query(&self) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        if let Some(q) = &self.q {
            query.append_pair("q", q);
        }
        if let Some(plan) = self.plan {
            query.append_pair("plan", plan.as_str());
        }
        let query = query.finish();
        if query.is_empty() {
            query
        } else {
            format!("&{query}")
        }
    }
}

/// Whether `text` contains `lowercase` (already lowercased), ignoring case.
fn contains_ignoring_case(text: &str, lowercase: &str) -> bool {
    if text.is_ascii() && lowercase.is_ascii() {
        // No allocation for the common case: ids and most labels are ASCII.
        let (text, needle) = (text.as_bytes(), lowercase.as_bytes());
        return needle.is_empty()
            || text
                .windows(needle.len())
                .any(|window| window.eq_ignore_ascii_case(needle));
    }
    text.to_lowercase().contains(lowercase)
}

/// A comparison of optional figures, `None` lowest.
trait TotalCmpOpt {
    fn total_cmp_opt(self, other: Self) -> Ordering;
}

impl TotalCmpOpt for Option<f64> {
    fn total_cmp_opt(self, other: Option<f64>) -> Ordering {
        match (self, other) {
            (Some(a), Some(b)) => a.total_cmp(&b),
            (a, b) => a.is_some().cmp(&b.is_some()),
        }
    }
}

/// A dashboard page number, from 1.
pub fn parse_page(text: Option<&str>) -> Result<usize, ReceiverError> {
    let Some(text) = non_empty(text) else {
        return Ok(1);
    };
    text.parse::<usize>()
        .ok()
        .filter(|page| (1..=1_000_000).contains(page))
        .ok_or_else(|| bad_param("page", "must be a whole number from 1 to 1000000"))
}

/// How many pages `count` installs fill (at least one, even empty).
pub fn page_count(count: usize) -> usize {
    count.div_ceil(PAGE_SIZE).max(1)
}

/// Turns inclusive `YYYY-MM-DD` dates into a half-open millisecond range.
pub fn parse_range(from: &Option<String>, to: &Option<String>) -> Result<TimeRange, ReceiverError> {
    let day = |name: &str, value: &Option<String>| -> Result<Option<i64>, ReceiverError> {
        let Some(text) = non_empty(value.as_deref()) else {
            return Ok(None);
        };
        let day =
            parse_day(text).ok_or_else(|| bad_param(name, "must be a date such as 2026-11-27"))?;
        Ok(Some(day * MS_PER_DAY))
    };
    let from_ms = day("from", from)?;
    let to_ms = day("to", to)?.map(|start| start + MS_PER_DAY);
    if let (Some(from_ms), Some(to_ms)) = (from_ms, to_ms)
        && from_ms >= to_ms
    {
        return Err(bad_param("from", "must not be after to"));
    }
    Ok(TimeRange { from_ms, to_ms })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::money::Cents;
    use crate::billing::pricing::{Bill, Plan};
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 15, 12, 0, 0).unwrap()
    }

    fn days(period: Option<Period>) -> (String, String) {
        let period = period.unwrap();
        (day_text(period.days.first), day_text(period.days.last))
    }

    #[test]
    fn periods_are_utc_days() {
        let parse = |p, f, t| Period::parse(p, f, t, now()).unwrap();
        assert_eq!(parse(None, None, None), None);
        let mtd = parse(Some("mtd"), None, None);
        assert_eq!(days(mtd), ("2026-03-01".into(), "2026-03-15".into()));
        assert_eq!(mtd.unwrap().query(), "period=mtd");
        let last = parse(Some("last_month"), None, None);
        assert_eq!(days(last), ("2026-02-01".into(), "2026-02-28".into()));
        let d30 = parse(Some("30d"), None, None);
        assert_eq!(days(d30), ("2026-02-14".into(), "2026-03-15".into()));
        let range = parse(None, Some("2025-12-30"), Some("2026-01-02"));
        assert_eq!(days(range), ("2025-12-30".into(), "2026-01-02".into()));
        assert_eq!(range.unwrap().query(), "from=2025-12-30&to=2026-01-02");
        // January: last month is December of the year before.
        let january = Utc.with_ymd_and_hms(2027, 1, 3, 0, 0, 0).unwrap();
        let last = Period::parse(Some("last_month"), None, None, january).unwrap();
        assert_eq!(days(last), ("2026-12-01".into(), "2026-12-31".into()));
    }

    #[test]
    fn bad_periods_name_the_parameter() {
        let cases = [
            (Some("week"), None, None, "period"),
            (
                Some("mtd"),
                Some("2026-01-01"),
                Some("2026-01-02"),
                "period",
            ),
            (None, Some("2026-01-01"), None, "to"),
            (None, None, Some("2026-01-01"), "from"),
            (None, Some("2026-1-1x"), Some("2026-01-02"), "from"),
            (None, Some("2026-01-01"), Some("yesterday"), "to"),
            (None, Some("2026-01-03"), Some("2026-01-02"), "from"),
            (None, Some("2024-01-01"), Some("2026-01-02"), "to"),
        ];
        for (period, from, to, field) in cases {
            let error = Period::parse(period, from, to, now()).unwrap_err();
            assert_eq!(error.status.as_u16(), 400);
            assert_eq!(
                error.details[0]["field"], field,
                "{period:?} {from:?} {to:?}"
            );
            assert!(error.message.starts_with(field), "{}", error.message);
        }
    }

    fn row(id: &str, label: Option<&str>, profit: i64) -> InstallRow {
        InstallRow {
            install_id: id.into(),
            label: label.map(Into::into),
            plan: Plan::Pro,
            last_seen_ms: None,
            events: 1,
            tokens: 1,
            bill: Bill {
                tokens: 1,
                cost: Cents(0),
                revenue: Cents(profit),
                profit: Cents(profit),
                unpriced_models: Vec::new(),
            },
            budget: None,
            alerted_in_month: Vec::new(),
            previous_cost: None,
        }
    }

    #[test]
    fn sorting_is_by_any_column_either_way_ties_by_install_id() {
        let mut rows = vec![
            row("b", Some("zeta"), 5),
            row("a", None, -3),
            row("c", Some("alpha"), 10),
            row("d", None, 5),
        ];
        let ids = |rows: &[InstallRow]| -> Vec<String> {
            rows.iter().map(|r| r.install_id.clone()).collect()
        };
        Sort::parse(Some("-profit")).unwrap().apply(&mut rows);
        assert_eq!(ids(&rows), ["c", "b", "d", "a"]);
        Sort::parse(Some("profit")).unwrap().apply(&mut rows);
        assert_eq!(ids(&rows), ["a", "b", "d", "c"]);
        Sort::parse(Some("label")).unwrap().apply(&mut rows);
        assert_eq!(ids(&rows), ["a", "d", "c", "b"]);
        Sort::parse(Some("-install_id")).unwrap().apply(&mut rows);
        assert_eq!(ids(&rows), ["d", "c", "b", "a"]);
        Sort::parse(None).unwrap().apply(&mut rows);
        assert_eq!(ids(&rows), ["a", "b", "c", "d"]);
        for column in Column::ALL {
            for text in [column.as_str().to_owned(), format!("-{}", column.as_str())] {
                assert_eq!(Sort::parse(Some(&text)).unwrap().as_query(), text);
            }
        }
        for bad in ["cost_asc", "--cost", "+cost", "Cost", "profit_asc"] {
            assert!(Sort::parse(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn searches_match_label_or_id_ignoring_case_and_plans_exactly() {
        let mut rows = vec![
            row("0192-acme", None, 1),
            row("b", Some("Ünïcode Shop"), 1),
            row("c", Some("Bakery"), 1),
        ];
        rows[2].plan = Plan::Free;
        let kept = |q: Option<&str>, plan: Option<&str>| -> Vec<String> {
            let mut rows = rows.clone();
            Filter::parse(q, plan).unwrap().apply(&mut rows);
            rows.into_iter().map(|r| r.install_id).collect()
        };
        assert_eq!(kept(Some("ACME"), None), ["0192-acme"]);
        assert_eq!(kept(Some("ünÏ"), None), ["b"]);
        assert_eq!(kept(Some("  "), Some("free")), ["c"]);
        assert_eq!(kept(None, None).len(), 3);
        assert_eq!(kept(Some("shop"), Some("free")), Vec::<String>::new());
        let filter = Filter::parse(Some("A&B c"), Some("pro")).unwrap();
        assert_eq!(filter.query(), "&q=a%26b+c&plan=pro");
        assert_eq!(Filter::default().query(), "");
        for (q, plan, field) in [
            (Some("x".repeat(201)), None, "q"),
            (Some("a\u{7}".to_owned()), None, "q"),
            (None, Some("gold"), "plan"),
        ] {
            let error = Filter::parse(q.as_deref(), plan).unwrap_err();
            assert_eq!(error.details[0]["field"], field);
        }
    }

    #[test]
    fn budget_used_and_change_sort_like_the_other_columns() {
        let mut rows = vec![row("a", None, 1), row("b", None, 1), row("c", None, 1)];
        rows[0].bill.cost = Cents(200);
        rows[0].previous_cost = Some(Cents(100));
        rows[1].bill.cost = Cents(50);
        rows[1].previous_cost = Some(Cents(0));
        rows[2].bill.cost = Cents(100);
        rows[2].previous_cost = Some(Cents(400));
        rows[2].budget = Some(crate::store::Budget {
            monthly: crate::billing::money::Micros(1_000_000),
            thresholds: vec![100],
        });
        let ids = |rows: &[InstallRow]| -> Vec<String> {
            rows.iter().map(|r| r.install_id.clone()).collect()
        };
        Sort::parse(Some("-change")).unwrap().apply(&mut rows);
        assert_eq!(ids(&rows), ["b", "a", "c"]);
        Sort::parse(Some("-budget_used")).unwrap().apply(&mut rows);
        assert_eq!(ids(&rows), ["c", "a", "b"]);
        assert_eq!(
            Sort::parse_or(None, Sort::DASHBOARD).unwrap(),
            Sort::DASHBOARD
        );
    }

    #[test]
    fn the_previous_period_has_the_same_length() {
        let d30 = Period::parse(Some("30d"), None, None, now())
            .unwrap()
            .unwrap();
        assert_eq!(
            days(Some(d30.previous())),
            ("2026-01-15".into(), "2026-02-13".into())
        );
        let mtd = Period::mtd(now());
        assert_eq!(
            days(Some(mtd.previous())),
            ("2026-02-14".into(), "2026-02-28".into())
        );
    }

    #[test]
    fn pages_count_from_one() {
        assert_eq!(parse_page(None).unwrap(), 1);
        assert_eq!(parse_page(Some("7")).unwrap(), 7);
        for bad in ["0", "-1", "x", "1.5", "1000001"] {
            assert!(parse_page(Some(bad)).is_err(), "{bad}");
        }
        assert_eq!(page_count(0), 1);
        assert_eq!(page_count(100), 1);
        assert_eq!(page_count(101), 2);
    }

    #[test]
    fn date_ranges_are_inclusive_utc_days() {
        let range = parse_range(&Some("2026-11-27".into()), &Some("2026-11-27".into())).unwrap();
        let from = range.from_ms.unwrap();
        assert_eq!(
            usage_protocol::event::format_millis(from),
            "2026-11-27T00:00:00.000Z"
        );
        assert_eq!(range.to_ms, Some(from + MS_PER_DAY));
        assert!(parse_range(&Some("2026-11-28".into()), &Some("2026-11-27".into())).is_err());
        assert!(parse_range(&Some("27/11/2026".into()), &None).is_err());
        assert_eq!(
            parse_range(&None, &Some(String::new())).unwrap(),
            crate::store::TimeRange::default()
        );
    }
}
