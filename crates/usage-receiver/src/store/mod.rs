//! The receiver's storage contract: one trait, with the bundled SQLite store ([`sqlite`])
//! and the PostgreSQL store of a fleet ([`postgres`]) side by side behind it, so the HTTP
//! side never knows which one it talks to; the request allowance of one node
//! ([`rate_limit`]); and what both stores keep of the views they were asked for
//! (`view_cache.rs`). The conformance suite (`crates/usage-receiver/tests/conformance.rs`)
//! is one suite of tests that runs against both stores.
//!
//! **Invariant:** only the store speaks SQL, and only [`sqlite`] and [`postgres`] within
//! it; they know nothing of HTTP. This module defines types only; it holds no SQL and does
//! no I/O. Every method is blocking (the HTTP handlers call them inside `spawn_blocking`)
//! but the four of the ingest path, which also come as futures
//! ([`ReceiverStore::find_install_async`], [`ReceiverStore::day_models_async`],
//! [`ReceiverStore::take_request_async`], [`ReceiverStore::ingest_async`]): **the ingest
//! path is async so a fleet node never hops threads per query**. PostgreSQL awaits its queries on the runtime that runs the handler;
//! SQLite keeps its blocking code, which the default implementations run on the blocking
//! pool.

use std::error::Error;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::billing::money::Micros;
use crate::billing::price_book::Rates;
use crate::billing::pricing::{ModelDayTokens, Plan, PlanHistory, PricedUsage, TokenCounts};
use crate::days::day_of_ms;
use crate::store::rate_limit::Rate;
use chrono::{DateTime, Datelike, Utc};
use usage_protocol::event::Source;
use usage_protocol::signing::Secret;

/// The store's own key for an install (stored once; events refer to it).
pub type InstallKey = i64;

#[cfg(test)]
pub(crate) mod fixtures;
pub mod model_cap;
pub mod postgres;
pub mod rate_limit;
pub mod sqlite;
mod view_cache;

/// How one connection pool of a node is used at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUse {
    /// Which pool: `main`, or `relaxed` (the request schedule's).
    pub pool: &'static str,
    /// Connections open.
    pub size: usize,
    /// Connections open and idle.
    pub available: usize,
    /// Tasks waiting for a connection.
    pub waiting: usize,
}

/// Storage for enrolled installs and the events they send.
///
/// **Invariant:** an implementation keeps nothing in memory that another receiver node
/// sharing its database would need: every answer comes from the database.
pub trait ReceiverStore: Send + Sync + 'static {
    /// Which database this is, as `GET /health` names it.
    fn kind(&self) -> StoreKind;

    /// Succeeds when the database answers.
    fn ping(&self) -> Result<(), ReceiverStoreError>;

    /// Records an install and its secret. Enrolling the same secret again is a no-op
    /// ([`EnrollOutcome::AlreadyEnrolled`]); a different secret never replaces a stored one
    /// ([`EnrollOutcome::Conflict`]).
    fn enroll(&self, install: &NewInstall) -> Result<EnrollOutcome, ReceiverStoreError>;

    /// Finds an install by its id, with the secret to verify its batches and its own
    /// budget (read in the same query, so a batch costs no extra one for it).
    fn find_install(&self, install_id: &str) -> Result<Option<Install>, ReceiverStoreError>;

    /// Stores the events of one batch in one transaction. An event whose
    /// `(install, event_id)` is already stored, or appears earlier in `events`, is counted
    /// as a duplicate and not stored again.
    fn ingest(
        &self,
        install: InstallKey,
        events: Vec<NewEvent>,
        received_at_ms: i64,
    ) -> Result<IngestCounts, ReceiverStoreError>;

    /// The models of `install` stored on each of `days` (UTC), as `(day, model)` pairs:
    /// what the cap on models per install and day counts ([`model_cap`]).
    fn day_models(
        &self,
        install: InstallKey,
        days: &[i64],
    ) -> Result<Vec<(i64, String)>, ReceiverStoreError>;

    /// Token totals over a time range, optionally grouped.
    fn summary(&self, query: &SummaryQuery) -> Result<Summary, ReceiverStoreError>;

    /// [`ReceiverStore::summary`], or `None` when it has more than `max_rows` rows: the
    /// rows past that are never read.
    fn summary_at_most(
        &self,
        query: &SummaryQuery,
        max_rows: usize,
    ) -> Result<Option<Summary>, ReceiverStoreError>;

    /// One page of raw events, oldest first.
    fn events_page(&self, query: &EventsQuery) -> Result<EventsPage, ReceiverStoreError>;

    /// Takes one request from an install's allowance of `rate`, or says how long until one
    /// is free. The allowance is the store's, so nodes sharing a database share it.
    fn take_request(
        &self,
        install: InstallKey,
        rate: Rate,
    ) -> Result<Result<(), Duration>, ReceiverStoreError>;

    /// Keeps raw events from `days.first_kept` on and deletes those of every earlier UTC
    /// day, without ingest waiting long (small transactions, or whole partitions dropped),
    /// and makes ready the days up to a little past `days.today`. Returns how many events
    /// were deleted. The daily rollups stay.
    fn maintain(&self, days: RetainedDays) -> Result<u64, ReceiverStoreError>;

    /// Every install (or only `install_id`) with its usage over `window`, sorted by install
    /// id, and the days of the last 30 summed over those installs. Answered from the daily
    /// rollups kept at ingest, never from raw events, with a fixed number of queries
    /// however many installs there are. Each install's plan history may leave out the
    /// periods that ended before the first day of the month of `window.month_start`.
    fn installations(
        &self,
        install_id: Option<&str>,
        window: UsageWindow,
    ) -> Result<InstallationsReport, ReceiverStoreError>;

    /// [`ReceiverStore::installations`] with each install's priced days (`month_start..=
    /// today`) already costed: every (model, day) row at `prices.rates(model, day)`,
    /// rounded half up once, summed; models without rates listed as unpriced. Exactly
    /// [`CostedReport::price`] of [`ReceiverStore::installations`], which is what this
    /// default does; a store may do it in its database instead, so the rows never leave it,
    /// and may keep figures it worked out under `prices.id` as long as it can tell they
    /// still hold.
    fn costed_installations(
        &self,
        install_id: Option<&str>,
        window: UsageWindow,
        prices: PriceList<'_>,
    ) -> Result<CostedReport, ReceiverStoreError> {
        Ok(CostedReport::price(
            self.installations(install_id, window)?,
            prices.rates,
        ))
    }

    /// Whether [`ReceiverStore::costed_installations`] keeps figures between calls, so
    /// that asking for a view ahead of the provider makes their next view fast.
    fn keeps_views(&self) -> bool {
        false
    }

    /// How this node's connection pools are used now; none on SQLite, which has no pool.
    fn pool_use(&self) -> Vec<PoolUse> {
        Vec::new()
    }

    /// Makes `plan` an install's plan from the UTC day `day` (today) on, keeping the plans
    /// before it as its history; `false` when the install is unknown. A plan is in force
    /// for whole days: a second change the same day replaces the first (and a change back
    /// to the plan of the day before continues that one). Setting the plan in force
    /// changes nothing.
    fn set_plan(&self, install_id: &str, plan: Plan, day: i64) -> Result<bool, ReceiverStoreError>;

    /// An install's whole plan history, from its enrollment day on; `None` when the install
    /// is unknown.
    fn plan_history(&self, install_id: &str) -> Result<Option<PlanHistory>, ReceiverStoreError>;

    /// Sets an install's label (already checked: 1 to 100 characters); `false` when the
    /// install is unknown.
    fn set_label(&self, install_id: &str, label: &str) -> Result<bool, ReceiverStoreError>;

    /// One install's events and tokens of every kind per source, model and UTC day over
    /// `days`, from its raw events (kept 90 days), sorted by source, model and day. Empty
    /// when the install is unknown.
    fn source_usage(
        &self,
        install_id: &str,
        days: DayRange,
    ) -> Result<Vec<SourceModelDay>, ReceiverStoreError>;

    /// Erases an install: its events, its rollups, its budget and alerts and its
    /// enrollment. In slices, so other installs' batches never wait for the whole of it:
    /// the install is first disabled (no batch of it is stored after that), its events go
    /// a slice at a time, then the rest in one transaction. Returns how many events were
    /// deleted, or `None` when the install is unknown.
    fn erase_install(&self, install_id: &str) -> Result<Option<u64>, ReceiverStoreError>;

    /// Sets (`Some`) or removes (`None`) an install's own budget; `false` when the install
    /// is unknown.
    fn set_budget(
        &self,
        install_id: &str,
        budget: Option<&Budget>,
    ) -> Result<bool, ReceiverStoreError>;

    /// What a budget check needs of one install's calendar month: its tokens per model and
    /// day over `days`, and the thresholds already alerted for `month` (`YYYY-MM`).
    fn month_spend(
        &self,
        install: InstallKey,
        days: DayRange,
        month: &str,
    ) -> Result<MonthSpend, ReceiverStoreError>;

    /// Records the alerts not recorded yet; one of an install, threshold and month already
    /// recorded (by any node) is skipped. Returns the ids of those recorded now.
    fn record_alerts(&self, alerts: &[NewAlert]) -> Result<Vec<Uuid>, ReceiverStoreError>;

    /// The alerts recorded in `range` (by their `at`), oldest first.
    fn alerts(&self, range: TimeRange) -> Result<Vec<Alert>, ReceiverStoreError>;

    /// The alerts of one install (by its id), oldest first; none when it is unknown. By
    /// default every alert read and the others left out; both stores read only its own.
    fn install_alerts(&self, install_id: &str) -> Result<Vec<Alert>, ReceiverStoreError> {
        let mut alerts = self.alerts(TimeRange::default())?;
        alerts.retain(|alert| alert.install_id == install_id);
        Ok(alerts)
    }

    /// At most `limit` of the alerts recorded in `range` (by their `at`), oldest first,
    /// from just after `after` (an alert's `at` and id) on.
    fn alerts_page(
        &self,
        range: TimeRange,
        after: Option<AlertCursor>,
        limit: usize,
    ) -> Result<Vec<Alert>, ReceiverStoreError>;

    /// Takes up to `limit` undelivered alerts whose next attempt is due at `now_ms`, and
    /// moves their next attempt to `now_ms + lease_ms`, so no other node takes them
    /// meanwhile; counts the attempt.
    fn claim_alerts(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Alert>, ReceiverStoreError>;

    /// Marks an alert delivered at `at_ms` (`Delivered`), or schedules its next attempt.
    fn finish_alert(
        &self,
        alert_id: Uuid,
        outcome: DeliveryOutcome,
    ) -> Result<(), ReceiverStoreError>;

    // The ingest path, awaited by the handler of every batch. Each answers exactly as its
    // blocking twin above; by default it runs that twin on the blocking pool, and a store
    // whose database client is async (PostgreSQL) awaits its queries on the runtime
    // instead, so a batch's queries cost no thread switch.

    /// [`ReceiverStore::find_install`] as a future.
    fn find_install_async(self: Arc<Self>, install_id: String) -> StoreFuture<Option<Install>> {
        on_blocking_pool(move || self.find_install(&install_id))
    }

    /// [`ReceiverStore::day_models`] as a future.
    fn day_models_async(
        self: Arc<Self>,
        install: InstallKey,
        days: Vec<i64>,
    ) -> StoreFuture<Vec<(i64, String)>> {
        on_blocking_pool(move || self.day_models(install, &days))
    }

    /// [`ReceiverStore::take_request`] as a future.
    fn take_request_async(
        self: Arc<Self>,
        install: InstallKey,
        rate: Rate,
    ) -> StoreFuture<Result<(), Duration>> {
        on_blocking_pool(move || self.take_request(install, rate))
    }

    /// [`ReceiverStore::take_request`] of `rate`, then, if the request fits,
    /// [`ReceiverStore::ingest`], as a future; nothing is stored for a request that does not
    /// fit. A store may do both in one round trip (PostgreSQL does).
    fn ingest_async(
        self: Arc<Self>,
        install: InstallKey,
        events: Vec<NewEvent>,
        received_at_ms: i64,
        rate: Rate,
    ) -> StoreFuture<Result<IngestCounts, Duration>> {
        on_blocking_pool(move || match self.take_request(install, rate)? {
            Ok(()) => Ok(Ok(self.ingest(install, events, received_at_ms)?)),
            Err(wait) => Ok(Err(wait)),
        })
    }

    // What the dashboard reads besides the installations view.

    /// Tokens of every kind per model and UTC day over `days`, summed over every install,
    /// from the daily rollups; sorted by model, then day, days without usage left out.
    /// The dashboard's cost chart and its unpriced models. A store may keep what it read
    /// for days it can tell are unchanged.
    fn fleet_model_days(&self, days: DayRange) -> Result<Vec<ModelDayTokens>, ReceiverStoreError>;

    /// One install's events and tokens of every kind per user hash, model and UTC day over
    /// `days`, from its raw events (kept 90 days); in no particular order. Empty when the
    /// install is unknown.
    fn user_usage(
        &self,
        install_id: &str,
        days: DayRange,
    ) -> Result<Vec<UserModelDay>, ReceiverStoreError>;

    /// [`ReceiverStore::costed_installations`] of every install over `days` and
    /// [`ReceiverStore::fleet_model_days`] of those days, together. A store that keeps
    /// views ([`ReceiverStore::keeps_views`]) answers each from what it keeps; otherwise
    /// both come from one reading of the rollup ([`ReceiverStore::installations`]: each
    /// install's model days, summed over the installs and costed).
    fn costed_with_model_days(
        &self,
        days: DayRange,
        prices: PriceList<'_>,
    ) -> Result<(CostedReport, Vec<ModelDayTokens>), ReceiverStoreError> {
        if self.keeps_views() {
            return Ok((
                self.costed_installations(None, days.as_window(), prices)?,
                self.fleet_model_days(days)?,
            ));
        }
        let report = self.installations(None, days.as_window())?;
        let model_days = sum_model_days(&report);
        Ok((CostedReport::price(report, prices.rates), model_days))
    }
}

/// Every install's model days summed per model and day, sorted by model, then day.
pub fn sum_model_days(report: &InstallationsReport) -> Vec<ModelDayTokens> {
    let mut sums: std::collections::HashMap<&str, std::collections::BTreeMap<i64, TokenCounts>> =
        std::collections::HashMap::new();
    for install in &report.installs {
        for usage in &install.usage_mtd {
            let sum = sums
                .entry(usage.model.as_str())
                .or_default()
                .entry(usage.day)
                .or_default();
            sum.prompt = sum.prompt.saturating_add(usage.tokens.prompt);
            sum.completion = sum.completion.saturating_add(usage.tokens.completion);
            sum.cached = sum.cached.saturating_add(usage.tokens.cached);
            sum.cache_write = sum.cache_write.saturating_add(usage.tokens.cache_write);
            sum.reasoning = sum.reasoning.saturating_add(usage.tokens.reasoning);
        }
    }
    let mut models: Vec<(&str, std::collections::BTreeMap<i64, TokenCounts>)> =
        sums.into_iter().collect();
    models.sort_unstable_by(|a, b| a.0.cmp(b.0));
    models
        .into_iter()
        .flat_map(|(model, days)| {
            days.into_iter().map(move |(day, tokens)| ModelDayTokens {
                model: model.to_owned(),
                day,
                tokens,
            })
        })
        .collect()
}

/// One user's usage of one model on one UTC day at one install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserModelDay {
    /// Lowercase hex.
    pub user_hash: String,
    pub events: u64,
    pub usage: ModelDayTokens,
}

/// What setting an install's plan does to its history: its plan `current`, in force
/// since the UTC day `current_from`, is asked to become `plan` on `day`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanChange {
    /// `plan` is the plan in force: nothing to record.
    Unchanged,
    /// `current` had days of its own: it goes into the history as in force from
    /// `current_from` until the day before `day`, and `plan` starts on `day`.
    Start,
    /// `current` took effect today (or the clock stands before its day): `plan` replaces
    /// it from `current_from` on, or, when the plan in force just before it was `plan`,
    /// that one goes on as if never left.
    Replace,
}

impl PlanChange {
    pub fn of(current: Plan, current_from: i64, plan: Plan, day: i64) -> PlanChange {
        if plan == current {
            PlanChange::Unchanged
        } else if day > current_from {
            PlanChange::Start
        } else {
            PlanChange::Replace
        }
    }
}

/// An install's monthly budget and the thresholds it alerts at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub monthly: Micros,
    /// Percentages of `monthly`, ascending and distinct.
    pub thresholds: Vec<u32>,
}

impl Budget {
    /// The thresholds as stored: `"50,80,100"`.
    pub fn thresholds_text(&self) -> String {
        let texts: Vec<String> = self.thresholds.iter().map(u32::to_string).collect();
        texts.join(",")
    }

    /// A budget from the columns of a `LEFT JOIN budgets`: `None` when the install has
    /// none.
    pub fn from_columns(
        monthly_micros: Option<i64>,
        thresholds: Option<&str>,
    ) -> Result<Option<Budget>, ReceiverStoreError> {
        match (monthly_micros, thresholds) {
            (Some(monthly), Some(thresholds)) => Budget::from_stored(monthly, thresholds).map(Some),
            _ => Ok(None),
        }
    }

    /// A budget as stored; an error when it is not one this code writes.
    pub fn from_stored(
        monthly_micros: i64,
        thresholds: &str,
    ) -> Result<Budget, ReceiverStoreError> {
        let parsed: Result<Vec<u32>, _> = thresholds.split(',').map(str::parse).collect();
        match parsed {
            Ok(thresholds) if monthly_micros > 0 && !thresholds.is_empty() => Ok(Budget {
                monthly: Micros(monthly_micros),
                thresholds,
            }),
            _ => Err(ReceiverStoreError::Corrupt(format!(
                "a stored budget is unreadable: {monthly_micros} with thresholds {thresholds:?}"
            ))),
        }
    }
}

/// One install's month as a budget check reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MonthSpend {
    pub usage: Vec<ModelDayTokens>,
    /// Thresholds already alerted this month, ascending.
    pub alerted: Vec<u32>,
}

/// An alert to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAlert {
    pub alert_id: Uuid,
    pub install: InstallKey,
    pub threshold: u32,
    /// `YYYY-MM` (UTC).
    pub month: String,
    /// The month-to-date cost that crossed the threshold.
    pub cost: Micros,
    pub budget: Micros,
    pub currency: String,
    pub at_ms: i64,
}

/// A recorded alert, with its delivery state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub alert_id: Uuid,
    pub install_id: String,
    pub label: Option<String>,
    pub threshold: u32,
    pub month: String,
    pub cost: Micros,
    pub budget: Micros,
    pub currency: String,
    pub at_ms: i64,
    pub delivered_at_ms: Option<i64>,
    /// Delivery attempts begun so far.
    pub attempts: u32,
}

/// Where a page of alerts starts: just after this alert in (`at`, id) order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertCursor {
    pub at_ms: i64,
    pub alert_id: Uuid,
}

/// How one delivery attempt of an alert ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Delivered { at_ms: i64 },
    RetryAt { at_ms: i64 },
}

/// What the async methods of the ingest path return: a future that owns what it needs, so
/// the handler may run it on a task of its own.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, ReceiverStoreError>> + Send>>;

/// Runs a blocking store call on the blocking pool, as a [`StoreFuture`].
fn on_blocking_pool<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ReceiverStoreError> + Send + 'static,
) -> StoreFuture<T> {
    Box::pin(async move {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|error| ReceiverStoreError::Backend(Box::new(error)))?
    })
}

/// Which database a store keeps its data in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
        }
    }
}

/// The UTC days (days since the Unix epoch) whose raw events a store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedDays {
    /// The first day kept; every earlier day's events are deleted.
    pub first_kept: i64,
    /// Today; the store makes ready for events up to a little past it.
    pub today: i64,
}

/// The days the installations view covers, as days since the Unix epoch (UTC); both
/// ranges end with `today` included. Events and tokens are counted (and charted) over
/// `from_30d..=today`, usage is priced over `month_start..=today`; a view of one period
/// sets both to it ([`DayRange::as_window`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UsageWindow {
    pub today: i64,
    /// First day of the last 30 days (`today - 29`).
    pub from_30d: i64,
    /// First day of the current month.
    pub month_start: i64,
}

/// UTC days `first..=last`, as days since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayRange {
    pub first: i64,
    pub last: i64,
}

impl DayRange {
    /// The window that reports exactly these days: counted and priced alike.
    pub fn as_window(self) -> UsageWindow {
        UsageWindow {
            today: self.last,
            from_30d: self.first,
            month_start: self.first,
        }
    }
}

/// One install's usage of one model from one source on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceModelDay {
    pub source: Source,
    pub events: u64,
    pub usage: ModelDayTokens,
}

/// One install's usage as the installations view needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallUsage {
    pub install_id: String,
    /// The provider's label, if one was set.
    pub label: Option<String>,
    /// Its enrollment day and plans (today's last), as [`ReceiverStore::installations`]
    /// says.
    pub plans: PlanHistory,
    /// When its last batch was stored.
    pub last_seen_ms: Option<i64>,
    pub events_30d: u64,
    pub tokens_30d: u64,
    /// Tokens of every kind per model and UTC day since the first of the month (prices
    /// change by day, and costs round once per model and day), sorted by model, then day;
    /// days without events left out.
    pub usage_mtd: Vec<ModelDayTokens>,
    /// Its own budget, if it has one.
    pub budget: Option<Budget>,
    /// Thresholds alerted in the calendar month of the last day reported (this month in
    /// the installations view without a period and in a month-to-date view), ascending.
    pub alerted_in_month: Vec<u32>,
}

/// The installations view: one entry per install, and the chart of the last 30 days.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallationsReport {
    pub installs: Vec<InstallUsage>,
    /// Events and tokens per day over `from_30d..=today`; days without events left out.
    pub daily: Vec<DailyTokens>,
}

impl InstallationsReport {
    /// Finishes a report both stores build the same way: each install's month in (model,
    /// day) order, and the chart's days in order.
    pub fn finish(&mut self, daily: std::collections::BTreeMap<i64, DailyTokens>) {
        for install in &mut self.installs {
            install
                .usage_mtd
                .sort_by(|a, b| (&a.model, a.day).cmp(&(&b.model, b.day)));
        }
        self.daily = daily.into_values().collect();
    }
}

/// The rates of a model on a day (the receiver's
/// [`Pricing::rates`](crate::billing::pricing::Pricing::rates)),
/// or `None` when nothing prices it.
pub type RatesOf<'a> = &'a (dyn Fn(&str, i64) -> Option<Rates> + Sync);

/// The prices a view is costed at: the rates, and an identity that is the same only for the
/// same rates ([`Pricing::fingerprint`](crate::billing::pricing::Pricing::fingerprint)),
/// under which a store may keep the costs it worked out.
#[derive(Clone, Copy)]
pub struct PriceList<'a> {
    pub id: u64,
    pub rates: RatesOf<'a>,
}

/// One install's usage with its priced days costed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostedInstall {
    pub install_id: String,
    pub label: Option<String>,
    /// As [`InstallUsage::plans`].
    pub plans: PlanHistory,
    pub last_seen_ms: Option<i64>,
    /// Over the counted days.
    pub events_30d: u64,
    pub tokens_30d: u64,
    /// Over the priced days.
    pub priced: PricedUsage,
    /// Its own budget, if it has one.
    pub budget: Option<Budget>,
    /// As [`InstallUsage::alerted_in_month`].
    pub alerted_in_month: Vec<u32>,
}

/// [`InstallationsReport`] with every install's priced days costed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CostedReport {
    pub installs: Vec<CostedInstall>,
    pub daily: Vec<DailyTokens>,
}

impl CostedReport {
    /// The straightforward computation: each install's model days priced one by one.
    pub fn price(report: InstallationsReport, rates: RatesOf<'_>) -> CostedReport {
        CostedReport {
            installs: report
                .installs
                .into_iter()
                .map(|usage| CostedInstall {
                    priced: PricedUsage::of(&usage.usage_mtd, rates),
                    install_id: usage.install_id,
                    label: usage.label,
                    plans: usage.plans,
                    last_seen_ms: usage.last_seen_ms,
                    events_30d: usage.events_30d,
                    tokens_30d: usage.tokens_30d,
                    budget: usage.budget,
                    alerted_in_month: usage.alerted_in_month,
                })
                .collect(),
            daily: report.daily,
        }
    }
}

/// One day of a usage chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailyTokens {
    /// Days since the Unix epoch (UTC).
    pub day: i64,
    pub events: u64,
    pub tokens: u64,
}

/// An install as enrolled.
#[derive(Debug, Clone)]
pub struct NewInstall {
    pub install_id: String,
    pub secret: Secret,
    pub site_hash: String,
    pub enrolled_at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollOutcome {
    Created,
    AlreadyEnrolled,
    Conflict,
}

/// A stored install.
#[derive(Debug, Clone)]
pub struct Install {
    pub key: InstallKey,
    pub install_id: String,
    pub secret: Secret,
    /// A disabled install's batches are refused with `403`.
    pub disabled: bool,
    /// Its own budget, if it has one.
    pub budget: Option<Budget>,
}

/// One validated event ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: Uuid,
    /// The SHA-256 user hash as raw bytes.
    pub user_hash: [u8; 32],
    pub source: Source,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub cache_write_tokens: u64,
    pub reasoning_tokens: u64,
    /// What on the site made the call, if the event said.
    pub origin: Option<String>,
    /// The `context` object serialized compactly.
    pub context: Option<String>,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestCounts {
    pub accepted: u64,
    pub duplicates: u64,
}

/// Which keys summary rows are grouped by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SummaryGroupBy {
    pub day: bool,
    pub user: bool,
    pub source: bool,
    pub model: bool,
    pub origin: bool,
}

impl SummaryGroupBy {
    pub fn any(&self) -> bool {
        self.day || self.user || self.source || self.model || self.origin
    }
}

/// A half-open time range `[from_ms, to_ms)`; `None` leaves that end open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeRange {
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct SummaryQuery {
    /// `None` means every install.
    pub install_id: Option<String>,
    pub range: TimeRange,
    pub group_by: SummaryGroupBy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub events: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Totals {
    /// The totals of `events` events with these prompt and completion tokens.
    pub fn of(events: u64, prompt_tokens: u64, completion_tokens: u64) -> Totals {
        Totals {
            events,
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }

    pub fn add(&mut self, other: &Totals) {
        self.events += other.events;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.total_tokens += other.total_tokens;
    }
}

/// One summary row; the keys not grouped by are `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryRow {
    /// Days since the Unix epoch (UTC).
    pub day: Option<i64>,
    /// Lowercase hex.
    pub user_hash: Option<String>,
    pub source: Option<Source>,
    pub model: Option<String>,
    /// `Some(None)`: grouped by origin, for the events that named none.
    pub origin: Option<Option<String>>,
    pub totals: Totals,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub totals: Totals,
    /// Empty when the query groups by nothing.
    pub rows: Vec<SummaryRow>,
}

impl Summary {
    /// Counts one group's row in the totals, and keeps it when the query groups by
    /// anything (`grouped`).
    pub fn add_row(&mut self, row: SummaryRow, grouped: bool) {
        self.totals.add(&row.totals);
        if grouped {
            self.rows.push(row);
        }
    }
}

/// Where a page of events starts: just after this event in (created_at, install, event_id)
/// order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventCursor {
    pub created_at_ms: i64,
    pub install: InstallKey,
    pub event_id: Uuid,
}

#[derive(Debug, Clone)]
pub struct EventsQuery {
    pub install_id: Option<String>,
    pub range: TimeRange,
    /// At least 1.
    pub limit: usize,
    pub after: Option<EventCursor>,
}

/// A stored event as the provider sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedEvent {
    pub install_id: String,
    pub event_id: Uuid,
    /// Lowercase hex.
    pub user_hash: String,
    pub source: Source,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub cache_write_tokens: u64,
    pub reasoning_tokens: u64,
    pub origin: Option<String>,
    pub context: Option<String>,
    pub created_at_ms: i64,
    pub received_at_ms: i64,
}

#[derive(Debug, Clone, Default)]
pub struct EventsPage {
    pub events: Vec<ReceivedEvent>,
    /// Set when more events may follow.
    pub next: Option<EventCursor>,
}

/// A storage failure. The HTTP side answers `503` with `Retry-After`, so the agent retries.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverStoreError {
    #[error("could not open the receiver database at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<dyn Error + Send + Sync>,
    },
    #[error("could not connect to the receiver database {target}: {source}")]
    Connect {
        /// The database URL, password hidden.
        target: String,
        #[source]
        source: Box<dyn Error + Send + Sync>,
    },
    /// The install was erased or disabled after its batch was checked: nothing stored.
    #[error("the install was erased or disabled while its batch was being stored")]
    InstallGone,
    #[error("receiver database error: {0}")]
    Backend(#[source] Box<dyn Error + Send + Sync>),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error(
        "the database schema is at version {found}, newer than this receiver knows ({known}); run a newer usage-agent"
    )]
    SchemaTooNew { found: i64, known: i64 },
}

/// How long raw events are kept: longer than any event the receiver accepts (91 days),
/// so a re-sent event is always recognised as a duplicate.
pub const EVENT_RETENTION: chrono::Duration = chrono::Duration::days(92);

/// The UTC days of the last 30 days (today included) and of the current month.
pub fn usage_window(now: DateTime<Utc>) -> UsageWindow {
    let today = day_of_ms(now.timestamp_millis());
    let day_of_month = i64::from(now.day0());
    UsageWindow {
        today,
        from_30d: today - 29,
        month_start: today - day_of_month,
    }
}
