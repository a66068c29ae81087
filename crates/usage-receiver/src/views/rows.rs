//! One install as every installations view shows it: usage, money and budget, sortable
//! by any column ([`crate::views::query::Sort`]).

use crate::billing::money::Cents;
use crate::billing::pricing::{Bill, Plan};
use crate::budgets::rules::used_pct;
use crate::store::Budget;

/// One installation with its bill: a row of the API answer and of the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallRow {
    pub install_id: String,
    pub label: Option<String>,
    pub plan: Plan,
    pub last_seen_ms: Option<i64>,
    /// Events and tokens over the counted days: the last 30 days in the view without a
    /// period, the period in a period's view.
    pub events: u64,
    pub tokens: u64,
    /// Over the priced days: month to date in the view without a period, the period in a
    /// period's view. `bill.tokens` counts the tokens of those days.
    pub bill: Bill,
    /// The budget in force: its own, else `DEFAULT_MONTHLY_BUDGET`.
    pub budget: Option<Budget>,
    /// Thresholds alerted in the calendar month of the last day reported (this month in
    /// the view without a period and in a month-to-date view), ascending.
    pub alerted_in_month: Vec<u32>,
    /// The cost of the previous period of the same length, where a view asked for it (the
    /// dashboard's change column).
    pub previous_cost: Option<Cents>,
}

/// How an install's cost moved against the previous period of the same length, in the
/// order the change column sorts: unknown, no cost in either, a percentage, new cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CostChange {
    Unknown,
    /// No cost in either period.
    Idle,
    /// In tenths of a percent: `-1000` is a cost gone to 0, `125` is 12.5 % more.
    Tenths(i64),
    /// Cost now, none before.
    New,
}

impl InstallRow {
    /// The budget in force, in currency units rounded to cents.
    pub fn budget_monthly(&self) -> Option<f64> {
        self.budget
            .as_ref()
            .map(|budget| budget.monthly.to_cents().as_units())
    }

    /// The change of cost against the previous period.
    pub fn cost_change(&self) -> CostChange {
        let Some(before) = self.previous_cost else {
            return CostChange::Unknown;
        };
        let now = self.bill.cost;
        match (before.0, now.0) {
            (0, 0) => CostChange::Idle,
            (0, _) => CostChange::New,
            (before, now) => {
                let tenths = (i128::from(now) - i128::from(before)) * 1000;
                // Half away from zero, in integers.
                let before = i128::from(before);
                let rounded = (2 * tenths + tenths.signum() * before) / (2 * before);
                CostChange::Tenths(i64::try_from(rounded).unwrap_or(i64::MAX))
            }
        }
    }

    /// The cost over the budget in force, in percent to one decimal.
    pub fn budget_used_pct(&self) -> Option<f64> {
        self.budget
            .as_ref()
            .map(|budget| used_pct(self.bill.cost, budget))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_changes_round_half_away_from_zero() {
        let change = |before: Option<i64>, now: i64| {
            let row = InstallRow {
                install_id: "a".into(),
                label: None,
                plan: Plan::Free,
                last_seen_ms: None,
                events: 0,
                tokens: 0,
                bill: Bill {
                    cost: Cents(now),
                    ..Bill::default()
                },
                budget: None,
                alerted_in_month: Vec::new(),
                previous_cost: before.map(Cents),
            };
            row.cost_change()
        };
        assert_eq!(change(None, 5), CostChange::Unknown);
        assert_eq!(change(Some(0), 0), CostChange::Idle);
        assert_eq!(change(Some(0), 5), CostChange::New);
        assert_eq!(change(Some(800), 900), CostChange::Tenths(125));
        assert_eq!(change(Some(300), 0), CostChange::Tenths(-1000));
        // 1/3 more: 33.33 % → 33.3; 2/3 less: -66.67 % → -66.7.
        assert_eq!(change(Some(300), 400), CostChange::Tenths(333));
        assert_eq!(change(Some(300), 100), CostChange::Tenths(-667));
    }
}
