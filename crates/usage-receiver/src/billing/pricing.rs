//! Money for the provider views: model prices, plan prices, what an install's plan history
//! brings in over a period, and the bill of an installation over its priced days (how cost,
//! revenue and profit are counted: docs/dashboard.md).
//!
//! Every amount is an integer number of micro-units ([`Micros`], a millionth of a currency
//! unit); floats appear only where a configured price is read, once, at start. Prices come
//! from the price book ([`crate::billing::price_book`]) by token kind and day, else from
//! the environment (`MODEL_COST_OVERRIDES` by exact name, then
//! `DEFAULT_COST_PER_1K_TOKENS`, for every token). The cost of one model on one day is
//! computed exactly in 128-bit integers from the stored token counts and rounded half up to
//! a micro-unit once ([`cost_at`]); amounts are rounded to cents only for display. Costs
//! are never stored, so a corrected book reprices history. This module does no I/O and
//! knows nothing about HTTP.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use crate::billing::money::{Cents, Micros};
use crate::billing::price_book::{PriceBook, Rates};
use crate::days::month_of;

/// An installation's plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Plan {
    #[default]
    Free,
    Pro,
    Agency,
}

impl Plan {
    pub const ALL: [Plan; 3] = [Plan::Free, Plan::Pro, Plan::Agency];

    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Pro => "pro",
            Plan::Agency => "agency",
        }
    }
}

/// A plan name that is not `free`, `pro` or `agency`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plan must be one of free, pro, agency")]
pub struct UnknownPlan;

impl FromStr for Plan {
    type Err = UnknownPlan;
    fn from_str(text: &str) -> Result<Plan, UnknownPlan> {
        Plan::ALL
            .into_iter()
            .find(|plan| plan.as_str() == text)
            .ok_or(UnknownPlan)
    }
}

/// A plan in force from a UTC day on, until the next one of its install's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanPeriod {
    pub plan: Plan,
    /// Days since the Unix epoch (UTC).
    pub from_day: i64,
}

/// An install's plans over time: it enrolled on `enrolled_day` with the first one, and each
/// change took effect on the day it was made. The last is today's plan, in force for the
/// rest of time as far as anyone knows.
///
/// **Invariant:** at least one period; ascending by day, one a day, none before the
/// enrollment day, no two in a row with the same plan. A store may leave out periods that
/// ended before the days it was asked about; the first one kept then stands for every
/// earlier day too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanHistory {
    enrolled_day: i64,
    periods: Vec<PlanPeriod>,
}

impl PlanHistory {
    /// The history of an install enrolled on `enrolled_day` whose plan is `current` (in
    /// force from its `from_day`) after the `earlier` ones. A day before the enrollment
    /// counts as the enrollment day (a node of an older release enrolls without a plan
    /// day); of two periods on one day the later stands, as a change takes effect for the
    /// whole day it is made.
    pub fn new(
        enrolled_day: i64,
        current: PlanPeriod,
        earlier: impl IntoIterator<Item = PlanPeriod>,
    ) -> PlanHistory {
        let mut all: Vec<PlanPeriod> = earlier.into_iter().collect();
        all.push(current);
        for period in &mut all {
            period.from_day = period.from_day.max(enrolled_day);
        }
        // Stable: of periods on one day, their order (the current one last) decides.
        all.sort_by_key(|period| period.from_day);
        let mut periods: Vec<PlanPeriod> = Vec::with_capacity(all.len());
        for period in all {
            if let Some(last) = periods.last_mut()
                && last.from_day == period.from_day
            {
                *last = period;
            } else {
                periods.push(period);
            }
        }
        periods.dedup_by(|next, previous| next.plan == previous.plan);
        PlanHistory {
            enrolled_day,
            periods,
        }
    }

    /// The UTC day the install enrolled on.
    pub fn enrolled_day(&self) -> i64 {
        self.enrolled_day
    }

    /// The periods, oldest first.
    pub fn periods(&self) -> &[PlanPeriod] {
        &self.periods
    }

    /// Today's plan.
    pub fn current(&self) -> Plan {
        self.periods
            .last()
            .expect("a history has at least one period")
            .plan
    }

    /// The days of `first..=last` each plan was in force; a day before the first period
    /// counts under its plan.
    fn days_by_plan(&self, first: i64, last: i64) -> [(Plan, i64); 3] {
        let mut days = Plan::ALL.map(|plan| (plan, 0));
        for (index, period) in self.periods.iter().enumerate() {
            let start = if index == 0 { first } else { period.from_day };
            let end = self
                .periods
                .get(index + 1)
                .map_or(last, |next| next.from_day - 1);
            let overlap = end.min(last) - start.max(first) + 1;
            if overlap > 0 {
                let slot = Plan::ALL
                    .iter()
                    .position(|plan| *plan == period.plan)
                    .expect("every plan is in Plan::ALL");
                days[slot].1 += overlap;
            }
        }
        days
    }
}

/// The prices as the receiver's settings give them, in currency units.
#[derive(Debug, Clone, Default)]
pub struct PriceSettings {
    pub price_book: Option<PriceBook>,
    pub default_cost_per_1k_tokens: Option<f64>,
    pub model_cost_overrides: BTreeMap<String, f64>,
    pub plan_free_monthly: Option<f64>,
    pub plan_pro_monthly: Option<f64>,
    pub plan_agency_monthly: Option<f64>,
}

/// The prices, converted once from the settings.
#[derive(Debug, Clone, Default)]
pub struct Pricing {
    /// `PRICE_BOOK`: prices by token kind and day, tried first.
    book: Option<PriceBook>,
    /// `DEFAULT_COST_PER_1K_TOKENS`: the last fallback, for every token.
    default_per_1k: Option<Micros>,
    /// `MODEL_COST_OVERRIDES`, by exact model name, for every token.
    overrides: HashMap<String, Micros>,
    /// `PLAN_FREE_MONTHLY`, `PLAN_PRO_MONTHLY`, `PLAN_AGENCY_MONTHLY` (0 when unset).
    free: Micros,
    pro: Micros,
    agency: Micros,
}

/// Tokens of every kind, as events count them: cached and cache-write tokens are part of
/// the prompt, reasoning tokens part of the completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub cache_write: u64,
    pub reasoning: u64,
}

impl TokenCounts {
    /// Prompt plus completion tokens.
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// The tokens one install used of one model on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDayTokens {
    pub model: String,
    /// Days since the Unix epoch (UTC).
    pub day: i64,
    pub tokens: TokenCounts,
}

/// What an installation costs and brings in over a month, in displayed cents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bill {
    pub tokens: u64,
    pub cost: Cents,
    pub revenue: Cents,
    /// `revenue - cost` of the rounded amounts, so the shown numbers always add up.
    pub profit: Cents,
    /// Models with no price on at least one day of their usage (counted as 0 that day);
    /// sorted.
    pub unpriced_models: Vec<String>,
}

/// Usage costed in micro-units, before the bill rounds it to cents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PricedUsage {
    pub tokens: u64,
    /// Each model's day rounded half up to a micro-unit, summed (saturating).
    pub cost: Micros,
    /// Models with no rates on some day of their usage; sorted, each once.
    pub unpriced_models: Vec<String>,
}

impl PricedUsage {
    /// Costs `usage` (one entry per model and day) at `rates`.
    pub fn of(
        usage: &[ModelDayTokens],
        rates: &(dyn Fn(&str, i64) -> Option<Rates> + Sync),
    ) -> PricedUsage {
        let mut priced = PricedUsage::default();
        for usage in usage {
            priced.tokens = priced.tokens.saturating_add(usage.tokens.total());
            match rates(&usage.model, usage.day) {
                Some(rates) => {
                    let day_cost = cost_at(&rates, &usage.tokens);
                    priced.cost = Micros(priced.cost.0.saturating_add(day_cost.0));
                }
                None => priced.unpriced_models.push(usage.model.clone()),
            }
        }
        priced.unpriced_models.sort();
        priced.unpriced_models.dedup();
        priced
    }
}

/// The cost of `tokens` at `rates`, in micro-units, rounded half up once:
/// `((prompt - cached - cache_write) × input + cached × cached_input + cache_write ×
/// cache_write_price + (completion - reasoning) × output + reasoning × reasoning_price)
/// / 10^6`. Events may count cached and cache-write tokens that together exceed the
/// prompt (each alone cannot); the uncached input is then 0, never negative.
pub fn cost_at(rates: &Rates, tokens: &TokenCounts) -> Micros {
    let uncached = tokens
        .prompt
        .saturating_sub(tokens.cached)
        .saturating_sub(tokens.cache_write);
    let plain_output = tokens.completion.saturating_sub(tokens.reasoning);
    let term = |count: u64, price: Micros| i128::from(count) * i128::from(price.0);
    // Counts below 2^64 times prices below 2^63: each term and their sum fit in 128 bits.
    let exact = term(uncached, rates.input)
        + term(tokens.cached, rates.cached_input)
        + term(tokens.cache_write, rates.cache_write)
        + term(plain_output, rates.output)
        + term(tokens.reasoning, rates.reasoning);
    let rounded = (exact + 500_000) / 1_000_000;
    Micros(i64::try_from(rounded).unwrap_or(i64::MAX))
}

impl Pricing {
    pub fn new(prices: PriceSettings) -> Pricing {
        let money = |value: Option<f64>| value.map(Micros::from_units).unwrap_or_default();
        Pricing {
            book: prices.price_book,
            default_per_1k: prices.default_cost_per_1k_tokens.map(Micros::from_units),
            overrides: prices
                .model_cost_overrides
                .iter()
                .map(|(model, price)| (model.clone(), Micros::from_units(*price)))
                .collect(),
            free: money(prices.plan_free_monthly),
            pro: money(prices.plan_pro_monthly),
            agency: money(prices.plan_agency_monthly),
        }
    }

    /// An identity of the rates ([`Pricing::rates`]): equal for equal rates, and, but for
    /// a 64-bit hash collision, different otherwise. Figures costed under one fingerprint
    /// hold for as long as it stays the same.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut overrides: Vec<_> = self.overrides.iter().collect();
        overrides.sort();
        let mut hasher = std::hash::DefaultHasher::new();
        format!("{:?} {:?} {overrides:?}", self.book, self.default_per_1k).hash(&mut hasher);
        hasher.finish()
    }

    /// The price book in force, if `PRICE_BOOK` names one.
    pub fn book(&self) -> Option<&PriceBook> {
        self.book.as_ref()
    }

    /// The rates of `model` on `day`: the book's entry in force that day, else the
    /// model's override, else the default price, the last two for every token. `None`
    /// when none of them prices it.
    pub fn rates(&self, model: &str, day: i64) -> Option<Rates> {
        if let Some(rates) = self.book.as_ref().and_then(|book| book.rates(model, day)) {
            return Some(rates);
        }
        let per_1k = self.overrides.get(model).copied().or(self.default_per_1k)?;
        Some(Rates::flat(Micros(per_1k.0.saturating_mul(1000))))
    }

    /// The cost of one model's usage on one day, rounded half up to a micro-unit, or
    /// `None` when the model has no price that day.
    pub fn day_cost(&self, usage: &ModelDayTokens) -> Option<Micros> {
        let rates = self.rates(&usage.model, usage.day)?;
        Some(cost_at(&rates, &usage.tokens))
    }

    /// A plan's monthly price.
    pub fn monthly_price(&self, plan: Plan) -> Micros {
        match plan {
            Plan::Free => self.free,
            Plan::Pro => self.pro,
            Plan::Agency => self.agency,
        }
    }

    /// The month's bill of an installation on `plan` that used `usage` (one entry per
    /// model and day): each day's cost rounded to a micro-unit, their sum to cents.
    pub fn bill(&self, plan: Plan, usage: &[ModelDayTokens]) -> Bill {
        self.bill_with_revenue(self.monthly_price(plan), usage)
    }

    /// What an install with these `plans` brings in over the UTC days `first..=last`: for
    /// each calendar month from the one it enrolled in, the monthly price of each plan times
    /// the days it was in force over the days of the month, each part rounded half up to a
    /// micro-unit. With `whole_months` (month to date, last month) every month the days
    /// touch counts whole, the enrollment month too (its days before the enrollment under
    /// the first plan, as a subscription is paid at sign-up; the days after today under
    /// today's plan); otherwise only the days of the period from the enrollment day on
    /// count. A month of one plan counted whole brings in exactly its price.
    pub fn revenue_over(
        &self,
        plans: &PlanHistory,
        first: i64,
        last: i64,
        whole_months: bool,
    ) -> Micros {
        let mut total = 0i128;
        let mut day = first;
        while day <= last {
            let (month_first, month_last) = month_of(day);
            day = month_last + 1;
            if month_last < plans.enrolled_day() {
                continue;
            }
            let (from, to) = if whole_months {
                (month_first, month_last)
            } else {
                (
                    first.max(month_first).max(plans.enrolled_day()),
                    last.min(month_last),
                )
            };
            let month_days = i128::from(month_last - month_first + 1);
            for (plan, days) in plans.days_by_plan(from, to) {
                let monthly = i128::from(self.monthly_price(plan).0);
                // Half up: (2·a·d + m) / (2·m).
                total += (2 * monthly * i128::from(days) + month_days) / (2 * month_days);
            }
        }
        Micros(i64::try_from(total).unwrap_or(i64::MAX))
    }

    /// The currency of every amount: the price book's, else `USD`.
    pub fn currency(&self) -> &str {
        self.book
            .as_ref()
            .map_or("USD", |book| book.currency.as_str())
    }

    /// `usage` (one entry per model and day) costed at these prices.
    pub fn price(&self, usage: &[ModelDayTokens]) -> PricedUsage {
        PricedUsage::of(usage, &|model: &str, day| self.rates(model, day))
    }

    /// A bill whose revenue is `revenue` (a plan's monthly price, or a prorated one):
    /// each day's cost rounded to a micro-unit, their sum to cents.
    pub fn bill_with_revenue(&self, revenue: Micros, usage: &[ModelDayTokens]) -> Bill {
        Pricing::bill_of(revenue, &self.price(usage))
    }

    /// The bill of usage already costed: its cost to cents, `revenue` to cents, the
    /// difference.
    pub fn bill_of(revenue: Micros, priced: &PricedUsage) -> Bill {
        let cost = priced.cost.to_cents();
        let revenue = revenue.to_cents();
        Bill {
            tokens: priced.tokens,
            cost,
            revenue,
            profit: revenue - cost,
            unpriced_models: priced.unpriced_models.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::days::day_number;
    use chrono::NaiveDate;

    /// Per million tokens: gpt-4o-mini 0.15 in, 0.075 cached, 0.1875 cache write, 0.60 out
    /// (reasoning as out); "o-*" 2.00 / 0.50 / (write as in) / 8.00 / 10.00 reasoning from
    /// 2025-01-01, then 1.00 / 0.25 / 4.00 / 5.00 from 2025-01-16; the exact "o-mini" 1.10
    /// in, 4.40 out from 2025-01-01. The environment: "flat" 0.005 per 1K, else 0.002.
    const BOOK: &str = r#"
currency = "USD"
[[model]]
match = "gpt-4o-mini"
effective_from = "2024-07-18"
input_per_mtok = 0.15
cached_input_per_mtok = 0.075
cache_write_per_mtok = 0.1875
output_per_mtok = 0.60
[[model]]
match = "o-*"
effective_from = "2025-01-01"
input_per_mtok = 2.00
cached_input_per_mtok = 0.50
output_per_mtok = 8.00
reasoning_per_mtok = 10.00
[[model]]
match = "o-mini"
effective_from = "2025-01-01"
input_per_mtok = 1.10
output_per_mtok = 4.40
[[model]]
match = "o-*"
effective_from = "2025-01-16"
input_per_mtok = 1.00
cached_input_per_mtok = 0.25
output_per_mtok = 4.00
reasoning_per_mtok = 5.00
"#;

    fn settings(default_per_1k: Option<f64>) -> PriceSettings {
        PriceSettings {
            price_book: Some(PriceBook::parse(BOOK).unwrap()),
            default_cost_per_1k_tokens: default_per_1k,
            model_cost_overrides: [("flat".to_owned(), 0.005)].into_iter().collect(),
            plan_pro_monthly: Some(19.0),
            plan_agency_monthly: Some(99.99),
            ..PriceSettings::default()
        }
    }

    fn pricing() -> Pricing {
        Pricing::new(settings(Some(0.002)))
    }

    fn day(date: &str) -> i64 {
        day_number(NaiveDate::parse_from_str(date, "%Y-%m-%d").unwrap())
    }

    fn on(plan: Plan, from_day: i64) -> PlanPeriod {
        PlanPeriod { plan, from_day }
    }

    /// `[prompt, completion, cached, cache_write, reasoning]` of `model` on `date`.
    fn usage(model: &str, date: &str, kinds: [u64; 5]) -> ModelDayTokens {
        let [prompt, completion, cached, cache_write, reasoning] = kinds;
        ModelDayTokens {
            model: model.into(),
            day: day(date),
            tokens: TokenCounts {
                prompt,
                completion,
                cached,
                cache_write,
                reasoning,
            },
        }
    }

    #[test]
    fn revenue_over_a_period_is_prorated_by_day_within_each_month() {
        let pricing = Pricing::new(settings(None));
        let day = |y, m, d| day_number(NaiveDate::from_ymd_opt(y, m, d).unwrap());
        // Enrolled long before, on one plan all along.
        let prorated_revenue = |plan, first, last| {
            let plans = PlanHistory::new(day(2020, 1, 1), on(plan, day(2020, 1, 1)), []);
            pricing.revenue_over(&plans, first, last, false)
        };
        // A whole month, or two: exactly the monthly prices.
        let (first, last) = month_of(day(2026, 2, 10));
        assert_eq!((first, last), (day(2026, 2, 1), day(2026, 2, 28)));
        assert_eq!(prorated_revenue(Plan::Pro, first, last), Micros(19_000_000));
        assert_eq!(
            prorated_revenue(Plan::Agency, day(2026, 1, 1), day(2026, 2, 28)),
            Micros(2 * 99_990_000)
        );
        // 30 days from 2026-01-17: 15 of January's 31, 15 of February's 28.
        // 19 × 15/31 = 9.193548387 → 9.193548; 19 × 15/28 = 10.178571428 → 10.178571.
        assert_eq!(
            prorated_revenue(Plan::Pro, day(2026, 1, 17), day(2026, 2, 15)),
            Micros(9_193_548 + 10_178_571)
        );
        // One day of a 30-day month, half up: 99.99 / 30 = 3.333 exactly.
        assert_eq!(
            prorated_revenue(Plan::Agency, day(2026, 4, 2), day(2026, 4, 2)),
            Micros(3_333_000)
        );
        assert_eq!(
            prorated_revenue(Plan::Free, day(2026, 4, 2), day(2026, 4, 9)),
            Micros(0)
        );
        // December to January crosses the year.
        assert_eq!(
            month_of(day(2026, 12, 31)),
            (day(2026, 12, 1), day(2026, 12, 31))
        );
    }

    /// Plans at round prices per day of a 31-day month: free 3.10 (0.10 a day), pro 31.00
    /// (1.00 a day), agency 62.00 (2.00 a day).
    fn round_plans() -> Pricing {
        Pricing::new(PriceSettings {
            plan_free_monthly: Some(3.10),
            plan_pro_monthly: Some(31.0),
            plan_agency_monthly: Some(62.0),
            ..PriceSettings::default()
        })
    }

    /// Revenue over `first..=last` (dates), whole months or by day, in micro-units.
    fn revenue(plans: &PlanHistory, first: &str, last: &str, whole_months: bool) -> i64 {
        round_plans()
            .revenue_over(plans, day(first), day(last), whole_months)
            .0
    }

    #[test]
    fn an_install_earns_from_its_enrollment_month_and_nothing_before() {
        // Enrolled on 2026-03-10, on pro.
        let plans = PlanHistory::new(day("2026-03-10"), on(Plan::Pro, day("2026-03-10")), []);
        // Month to date on the 20th: the enrollment month counts whole, 31.00.
        assert_eq!(
            revenue(&plans, "2026-03-01", "2026-03-20", true),
            31_000_000
        );
        // Last month, February, is before it enrolled: 0.
        assert_eq!(revenue(&plans, "2026-02-01", "2026-02-28", true), 0);
        // Any later month: the monthly price.
        assert_eq!(
            revenue(&plans, "2026-04-01", "2026-04-30", true),
            31_000_000
        );
        // By day, the same dates count only the days from the 10th: 11 × 1.00 = 11.00.
        assert_eq!(
            revenue(&plans, "2026-03-01", "2026-03-20", false),
            11_000_000
        );
        // Across the enrollment day from February: February 0, 10 to 15 March 6 × 1.00.
        assert_eq!(
            revenue(&plans, "2026-02-20", "2026-03-15", false),
            6_000_000
        );
        // The last 30 days on the 31st (2 to 31 March): 10 to 31 March, 22 × 1.00.
        assert_eq!(
            revenue(&plans, "2026-03-02", "2026-03-31", false),
            22_000_000
        );
        // Entirely before the enrollment day, the day before included: 0.
        assert_eq!(revenue(&plans, "2026-01-01", "2026-03-09", false), 0);
        assert_eq!(revenue(&plans, "2026-03-09", "2026-03-09", false), 0);
        // From January 2025 to May 2026: only the days from the enrollment on.
        // March 10 to 31: 22.00; April, 30 days: 31.00; May 1 to 15 of 31: 15.00.
        assert_eq!(
            revenue(&plans, "2025-01-01", "2026-05-15", false),
            22_000_000 + 31_000_000 + 15_000_000
        );
    }

    #[test]
    fn a_month_with_several_plans_is_prorated_by_the_days_each_was_in_force() {
        // Enrolled on 2026-01-05 on free, pro from 11 March, agency from 21 March.
        let plans = PlanHistory::new(
            day("2026-01-05"),
            on(Plan::Agency, day("2026-03-21")),
            [
                on(Plan::Free, day("2026-01-05")),
                on(Plan::Pro, day("2026-03-11")),
            ],
        );
        // March whole: free 1 to 10 (10 × 0.10 = 1.00), pro 11 to 20 (10 × 1.00 = 10.00),
        // agency 21 to 31 (11 × 2.00 = 22.00): 33.00.
        assert_eq!(
            revenue(&plans, "2026-03-01", "2026-03-31", true),
            33_000_000
        );
        // The enrollment month counts whole, and every month before March is all free.
        assert_eq!(revenue(&plans, "2026-01-01", "2026-01-31", true), 3_100_000);
        assert_eq!(revenue(&plans, "2025-12-01", "2025-12-31", true), 0);
        // April: today's plan, agency, 62.00.
        assert_eq!(
            revenue(&plans, "2026-04-01", "2026-04-30", true),
            62_000_000
        );
        // By day, 5 to 25 March: free 5 to 10 (6 × 0.10 = 0.60), pro 10 days (10.00),
        // agency 21 to 25 (5 × 2.00 = 10.00): 20.60.
        assert_eq!(
            revenue(&plans, "2026-03-05", "2026-03-25", false),
            20_600_000
        );

        // Month to date on 15 March, pro since the 11th: free 10 days (1.00), and pro from
        // the 11th to the end of the month, today's plan for the rest (21 × 1.00): 22.00.
        let today = PlanHistory::new(
            day("2026-01-05"),
            on(Plan::Pro, day("2026-03-11")),
            [on(Plan::Free, day("2026-01-05"))],
        );
        assert_eq!(
            revenue(&today, "2026-03-01", "2026-03-15", true),
            22_000_000
        );

        // Enrolled on 10 March on free, pro from the 20th: March counted whole gives its
        // days before the enrollment to the first plan: free 1 to 19 (19 × 0.10 = 1.90),
        // pro 20 to 31 (12 × 1.00 = 12.00): 13.90. By day, 10 to 31 March: free 10 days
        // (1.00), pro 12 days (12.00): 13.00.
        let late = PlanHistory::new(
            day("2026-03-10"),
            on(Plan::Pro, day("2026-03-20")),
            [on(Plan::Free, day("2026-03-10"))],
        );
        assert_eq!(revenue(&late, "2026-03-01", "2026-03-31", true), 13_900_000);
        assert_eq!(
            revenue(&late, "2026-03-01", "2026-03-31", false),
            13_000_000
        );

        // Each (month, plan) part rounds half up to a micro-unit once: 1 to 3 February
        // (28 days) on free, 3.10 × 3 / 28 = 0.332142857 → 332,143; pro from the 4th to
        // the 5th, 31.00 × 2 / 28 = 2.214285714 → 2,214,286.
        let february = PlanHistory::new(
            day("2026-01-05"),
            on(Plan::Pro, day("2026-02-04")),
            [on(Plan::Free, day("2026-01-05"))],
        );
        assert_eq!(
            revenue(&february, "2026-02-01", "2026-02-05", false),
            332_143 + 2_214_286
        );
    }

    #[test]
    fn a_plan_history_is_one_plan_a_day_from_the_enrollment_day() {
        let pairs = |history: &PlanHistory| -> Vec<(Plan, i64)> {
            history
                .periods()
                .iter()
                .map(|period| (period.plan, period.from_day))
                .collect()
        };
        // A period dated before the enrollment day (a node that did not record it) counts
        // from the enrollment day; of two on one day the later stands; a plan followed by
        // itself is one period.
        let history = PlanHistory::new(
            100,
            on(Plan::Agency, 120),
            [
                on(Plan::Free, 0),
                on(Plan::Pro, 100),
                on(Plan::Pro, 110),
                on(Plan::Free, 115),
            ],
        );
        assert_eq!(
            pairs(&history),
            [(Plan::Pro, 100), (Plan::Free, 115), (Plan::Agency, 120)]
        );
        assert_eq!(history.enrolled_day(), 100);
        assert_eq!(history.current(), Plan::Agency);
        let only = PlanHistory::new(100, on(Plan::Pro, 0), []);
        assert_eq!(pairs(&only), [(Plan::Pro, 100)]);
    }

    #[test]
    fn prices_convert_once_to_micro_units() {
        assert_eq!(Micros::from_units(0.002), Micros(2_000));
        assert_eq!(Micros::from_units(0.00015), Micros(150));
        assert_eq!(Micros::from_units(99.99), Micros(99_990_000));
        // 0.1 + 0.2 != 0.3 in floats; in micro-units the sum is exact.
        assert_eq!(
            Micros::from_units(0.1).0 + Micros::from_units(0.2).0,
            Micros::from_units(0.3).0
        );
    }

    #[test]
    fn one_days_cost_follows_the_formula_by_token_kind() {
        let p = pricing();
        // Worked by hand: Σ tokens × price per Mtok in micro-units, / 10^6, half up.
        let cases: [(&str, &str, [u64; 5], Option<i64>); 14] = [
            // 1M in × 150,000 + 1M out × 600,000 = 7.5e11 / 1e6 = 750,000 (0.75).
            (
                "gpt-4o-mini",
                "2024-07-18",
                [1_000_000, 1_000_000, 0, 0, 0],
                Some(750_000),
            ),
            // Cached and cache write: 500K × 150,000 + 400K × 75,000 + 100K × 187,500
            // = 7.5e10 + 3e10 + 1.875e10 = 1.2375e11 → 123,750.
            (
                "gpt-4o-mini",
                "2024-08-01",
                [1_000_000, 0, 400_000, 100_000, 0],
                Some(123_750),
            ),
            // Reasoning, "o-*" before the 16th: 1000 × 2e6 + 1000 × 8e6 + 2000 × 10e6
            // = 3e10 → 30,000.
            (
                "o-large",
                "2025-01-15",
                [1_000, 3_000, 0, 0, 2_000],
                Some(30_000),
            ),
            // The same usage from the 16th, when the newer entry is in force:
            // 1000 × 1e6 + 1000 × 4e6 + 2000 × 5e6 = 1.5e10 → 15,000.
            (
                "o-large",
                "2025-01-16",
                [1_000, 3_000, 0, 0, 2_000],
                Some(15_000),
            ),
            // The exact "o-mini" beats the prefix, and its reasoning defaults to its output
            // price: 1000 × 1.1e6 + 500 × 4.4e6 + 500 × 4.4e6 = 5.5e9 → 5,500.
            (
                "o-mini",
                "2025-01-20",
                [1_000, 1_000, 0, 0, 500],
                Some(5_500),
            ),
            // Cached defaults to input on "o-mini": 600 × 1.1e6 + 400 × 1.1e6 = 1.1e9 → 1,100.
            ("o-mini", "2025-01-20", [1_000, 0, 400, 0, 0], Some(1_100)),
            // Rounding half up, once: 10 × 150,000 = 1.5e6 → 1.5 → 2; 3 × 150,000 → 0.45 → 0;
            // 7 × 150,000 → 1.05 → 1.
            ("gpt-4o-mini", "2024-07-18", [10, 0, 0, 0, 0], Some(2)),
            ("gpt-4o-mini", "2024-07-18", [3, 0, 0, 0, 0], Some(0)),
            ("gpt-4o-mini", "2024-07-18", [7, 0, 0, 0, 0], Some(1)),
            // Cached + cache write above the prompt: uncached input is 0, not negative:
            // 80 × 75,000 + 80 × 187,500 = 2.1e7 → 21.
            ("gpt-4o-mini", "2024-07-18", [100, 0, 80, 80, 0], Some(21)),
            // Before its book entry starts, a model falls back to the environment: the
            // default 0.002 per 1K (2e6 per Mtok) on every token: 1000 × 2e6 → 2,000.
            ("o-large", "2024-12-31", [1_000, 0, 0, 0, 0], Some(2_000)),
            // The override 0.005 per 1K (5e6 per Mtok), every kind alike:
            // 1234 × 5e6 = 6.17e9 → 6,170.
            (
                "flat",
                "2025-01-01",
                [1_000, 234, 500, 100, 100],
                Some(6_170),
            ),
            // Default price for a model nothing else prices: 2500 × 2e6 → 5,000.
            ("mystery", "2025-01-01", [2_000, 500, 0, 0, 0], Some(5_000)),
            // Saturates instead of wrapping.
            ("flat", "2025-01-01", [u64::MAX, 0, 0, 0, 0], Some(i64::MAX)),
        ];
        for (model, date, kinds, micros) in cases {
            let got = p.day_cost(&usage(model, date, kinds)).map(|m| m.0);
            assert_eq!(got, micros, "{model} on {date}: {kinds:?}");
        }
        // Without DEFAULT_COST_PER_1K_TOKENS a model nothing prices has no price.
        let no_default = Pricing::new(settings(None));
        let unpriced = usage("mystery", "2025-01-01", [2_000, 500, 0, 0, 0]);
        assert_eq!(no_default.day_cost(&unpriced), None);
        let before = usage("o-large", "2024-12-31", [1_000, 0, 0, 0, 0]);
        assert_eq!(no_default.day_cost(&before), None);
    }

    #[test]
    fn bills_round_each_day_then_the_month_to_cents_and_list_unpriced_models() {
        let p = Pricing::new(settings(None));
        let bill = p.bill(
            Plan::Pro,
            &[
                // 30,000 + 15,000: the price changed on the 16th.
                usage("o-large", "2025-01-15", [1_000, 3_000, 0, 0, 2_000]),
                usage("o-large", "2025-01-16", [1_000, 3_000, 0, 0, 2_000]),
                // 1.5 → 2 micro-units on each day: 4, not the 3 of one monthly rounding.
                usage("gpt-4o-mini", "2025-01-02", [10, 0, 0, 0, 0]),
                usage("gpt-4o-mini", "2025-01-03", [10, 0, 0, 0, 0]),
                // No price at all: adds 0, listed once.
                usage("mystery", "2025-01-02", [1_000_000, 0, 0, 0, 0]),
                usage("mystery", "2025-01-03", [1, 0, 0, 0, 0]),
            ],
        );
        // 45,004 micro-units = 0.045004 → 0.05 (cents round half up).
        assert_eq!(bill.cost, Cents(5));
        assert_eq!(bill.revenue, Cents(1900));
        assert_eq!(bill.profit, Cents(1895));
        assert_eq!(bill.tokens, 8_000 + 20 + 1_000_001);
        assert_eq!(bill.unpriced_models, ["mystery"]);

        // A model priced on some days and not on others is listed too.
        let partly = p.bill(
            Plan::Free,
            &[
                usage("o-large", "2024-12-31", [1_000, 0, 0, 0, 0]),
                usage("o-large", "2025-01-15", [1_000, 3_000, 0, 0, 2_000]),
            ],
        );
        assert_eq!(
            (partly.cost, partly.unpriced_models),
            (Cents(3), vec!["o-large".into()])
        );

        let agency = p.bill(Plan::Agency, &[]);
        assert_eq!((agency.cost, agency.revenue), (Cents(0), Cents(9999)));
    }

    #[test]
    fn the_environment_prices_every_token_alike_when_there_is_no_book() {
        let p = Pricing::new(PriceSettings {
            default_cost_per_1k_tokens: Some(0.002),
            model_cost_overrides: [("gpt-4o".to_owned(), 0.005)].into_iter().collect(),
            ..PriceSettings::default()
        });
        let bill = p.bill(
            Plan::Free,
            &[
                // 123,456 × 5e6 / 1e6 = 617,280 (0.61728).
                usage("gpt-4o", "2025-01-01", [100_000, 23_456, 50_000, 0, 3_000]),
                // Names match exactly: the default, 1000 × 2e6 → 2,000.
                usage("GPT-4O", "2025-01-01", [1_000, 0, 0, 0, 0]),
            ],
        );
        // 619,280 → 0.62.
        assert_eq!(bill.cost, Cents(62));
        assert!(bill.unpriced_models.is_empty());
    }

    #[test]
    fn missing_prices_are_zero() {
        let p = Pricing::new(PriceSettings::default());
        let bill = p.bill(
            Plan::Pro,
            &[usage("m", "2025-01-01", [1_000_000, 0, 0, 0, 0])],
        );
        assert_eq!(
            (bill.cost, bill.revenue, bill.profit),
            (Cents(0), Cents(0), Cents(0))
        );
        assert_eq!(bill.unpriced_models, ["m"]);
    }

    #[test]
    fn cents_display_and_json() {
        assert_eq!(Cents(1252).to_string(), "12.52");
        assert_eq!(Cents(-5).to_string(), "-0.05");
        assert_eq!(Cents(0).to_string(), "0.00");
        assert_eq!(Cents(1252).to_json(), serde_json::json!(12.52));
        assert_eq!(Micros(-5_000).to_cents(), Cents(-1));
        assert_eq!(Micros(4_999).to_cents(), Cents(0));
    }

    #[test]
    fn plans_parse_by_exact_name() {
        for plan in Plan::ALL {
            assert_eq!(plan.as_str().parse::<Plan>(), Ok(plan));
        }
        assert_eq!("Pro".parse::<Plan>(), Err(UnknownPlan));
        assert_eq!("".parse::<Plan>(), Err(UnknownPlan));
        assert_eq!(Plan::default(), Plan::Free);
    }
}
