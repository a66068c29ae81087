//! The rules of a budget: its default thresholds, the budget in force for an install (its
//! own, else `DEFAULT_MONTHLY_BUDGET`), how much of it a cost uses, and the check after
//! each batch that records an alert when an install's month-to-date cost has crossed a
//! threshold of its budget.
//!
//! A batch is checked against each month its events fall in, so an event dated last month
//! that takes last month past a threshold alerts in last month.
//!
//! An alert fires once per install, threshold and calendar month (UTC) whatever the nodes,
//! retries and restarts: the store's unique key on those three skips a second recording.
//! The check runs after every batch of an install with a budget, duplicates included, so
//! a node that died between storing a batch and recording its alert leaves the alert to
//! the agent's retry of that batch (or the install's next one) to record.
//!
//! No HTTP here: the provider sets budgets through [`crate::admin::budget`], reads alerts
//! through [`crate::views::alerts`], and [`crate::budgets::delivery`] posts them.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::billing::money::{Cents, Micros};
use std::collections::BTreeSet;

use crate::days::{day_of_ms, month_of, month_text};
use crate::http::clip::clip;
use crate::state::ReceiverState;
use crate::store::{Budget, DayRange, Install, NewAlert, NewEvent, ReceiverStoreError};

/// Thresholds of a budget that names none, in percent.
pub const DEFAULT_THRESHOLDS: [u32; 3] = [50, 80, 100];

/// The budget that applies to an install: its own, else `DEFAULT_MONTHLY_BUDGET` with the
/// default thresholds.
pub fn budget_in_force(app: &ReceiverState, own: Option<&Budget>) -> Option<Budget> {
    own.cloned().or_else(|| {
        app.settings
            .default_monthly_budget
            .map(|monthly| Budget {
                monthly: Micros::from_units(monthly),
                thresholds: DEFAULT_THRESHOLDS.to_vec(),
            })
            .filter(|budget| budget.monthly.0 > 0)
    })
}

/// How much of `budget` a month-to-date cost of `cost` cents uses, in percent to one
/// decimal, as the installations answer shows it.
pub fn used_pct(cost: Cents, budget: &Budget) -> f64 {
    let budget_cents = budget.monthly.to_cents().0;
    if budget_cents <= 0 {
        return 0.0;
    }
    (cost.0 as f64 * 1000.0 / budget_cents as f64).round() / 10.0
}

/// The months (UTC) a batch's events fall in, each as its first day: the months whose
/// budgets the batch may have taken past a threshold. An event dated last month counts
/// towards last month.
pub fn months_of(events: &[NewEvent]) -> Vec<i64> {
    let months: BTreeSet<i64> = events
        .iter()
        .map(|event| month_of(day_of_ms(event.created_at_ms)).0)
        .collect();
    months.into_iter().collect()
}

/// After a batch of `install` was stored (or found to be all duplicates): for each month
/// of `months` (first days, [`months_of`] the batch), records an alert for each threshold
/// of `budget` (the one [`budget_in_force`]) that the month's cost has reached and that has
/// no alert that month yet. The alert's month is the events' month, so a late event
/// alerts in its own month. Returns the ids of the alerts recorded now.
pub fn check_after_ingest(
    app: &ReceiverState,
    install: &Install,
    budget: &Budget,
    months: &[i64],
    now: DateTime<Utc>,
) -> Result<Vec<Uuid>, ReceiverStoreError> {
    let mut recorded = Vec::new();
    for &month_day in months {
        recorded.extend(check_month(app, install, budget, month_day, now)?);
    }
    if !recorded.is_empty() {
        app.alerts_recorded.notify_one();
    }
    Ok(recorded)
}

/// [`check_after_ingest`] of the month of `month_day`.
fn check_month(
    app: &ReceiverState,
    install: &Install,
    budget: &Budget,
    month_day: i64,
    now: DateTime<Utc>,
) -> Result<Vec<Uuid>, ReceiverStoreError> {
    let (first, last) = month_of(month_day);
    let month = month_text(first);
    let days = DayRange { first, last };
    let spend = app.store.month_spend(install.key, days, &month)?;
    let pending: Vec<u32> = budget
        .thresholds
        .iter()
        .copied()
        .filter(|threshold| !spend.alerted.contains(threshold))
        .collect();
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let cost = app.pricing.price(&spend.usage).cost;
    let reached = |threshold: u32| {
        i128::from(cost.0) * 100 >= i128::from(threshold) * i128::from(budget.monthly.0)
    };
    let alerts: Vec<NewAlert> = pending
        .into_iter()
        .filter(|&threshold| reached(threshold))
        .map(|threshold| NewAlert {
            alert_id: Uuid::now_v7(),
            install: install.key,
            threshold,
            month: month.clone(),
            cost,
            budget: budget.monthly,
            currency: app.pricing.currency().to_owned(),
            at_ms: now.timestamp_millis(),
        })
        .collect();
    if alerts.is_empty() {
        return Ok(Vec::new());
    }
    let recorded = app.store.record_alerts(&alerts)?;
    for alert in alerts.iter().filter(|a| recorded.contains(&a.alert_id)) {
        tracing::info!(
            install_id = %clip(&install.install_id),
            threshold = alert.threshold,
            month = %alert.month,
            cost = %cost.to_cents(),
            budget = %budget.monthly.to_cents(),
            "budget threshold crossed"
        );
    }
    Ok(recorded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_percent_is_of_the_shown_amounts_to_one_decimal() {
        let budget = Budget {
            monthly: Micros(30_000_000),
            thresholds: DEFAULT_THRESHOLDS.to_vec(),
        };
        assert_eq!(used_pct(Cents(1000), &budget), 33.3);
        assert_eq!(used_pct(Cents(4500), &budget), 150.0);
        assert_eq!(used_pct(Cents(0), &budget), 0.0);
    }
}
