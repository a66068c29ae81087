//! The receiver's storage contract: one trait, with the bundled SQLite store ([`sqlite`])
//! and the PostgreSQL store of a fleet ([`postgres`]) side by side behind it, so the HTTP
//! side never knows which one it talks to. [`conformance`] is one suite of tests that
//! runs against both.
//!
//! This module defines types only; it holds no SQL and does no I/O. Every method is
//! blocking: the HTTP handlers call them inside `spawn_blocking`.

use std::error::Error;
use std::path::PathBuf;
use std::time::Duration;

use uuid::Uuid;

use super::price_book::Rates;
use super::pricing::{ModelDayTokens, Plan, PricedUsage};
use super::rate_limit::Rate;
use crate::event::Source;
use crate::protocol::signing::Secret;

/// The store's own key for an install (stored once; events refer to it).
pub type InstallKey = i64;

#[cfg(test)]
mod conformance;
pub mod postgres;
pub mod sqlite;

/// Storage for enrolled installs and the events they send.
///
/// **Invariant:** an implementation keeps nothing in memory that another receiver node
/// sharing its database would need (SPEC 9): every answer comes from the database.
pub trait ReceiverStore: Send + Sync + 'static {
    /// Which database this is, as `GET /health` names it.
    fn kind(&self) -> StoreKind;

    /// Succeeds when the database answers.
    fn ping(&self) -> Result<(), ReceiverStoreError>;

    /// Records an install and its secret. Enrolling the same secret again is a no-op
    /// ([`EnrollOutcome::AlreadyEnrolled`]); a different secret never replaces a stored one
    /// ([`EnrollOutcome::Conflict`]).
    fn enroll(&self, install: &NewInstall) -> Result<EnrollOutcome, ReceiverStoreError>;

    /// Finds an install by its id, with the secret to verify its batches.
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

    /// Token totals over a time range, optionally grouped.
    fn summary(&self, query: &SummaryQuery) -> Result<Summary, ReceiverStoreError>;

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
    /// however many installs there are.
    fn installations(
        &self,
        install_id: Option<&str>,
        window: UsageWindow,
    ) -> Result<InstallationsReport, ReceiverStoreError>;

    /// [`ReceiverStore::installations`] with each install's priced days (`month_start..=
    /// today`) already costed: every (model, day) row at `rates(model, day)`, rounded half
    /// up once (SPEC 11), summed; models without rates listed as unpriced. Exactly
    /// [`CostedReport::price`] of [`ReceiverStore::installations`], which is what this
    /// default does; a store may do it in its database instead, so the rows never leave it.
    fn costed_installations(
        &self,
        install_id: Option<&str>,
        window: UsageWindow,
        rates: RatesOf<'_>,
    ) -> Result<CostedReport, ReceiverStoreError> {
        Ok(CostedReport::price(
            self.installations(install_id, window)?,
            rates,
        ))
    }

    /// Sets an install's plan; `false` when the install is unknown.
    fn set_plan(&self, install_id: &str, plan: Plan) -> Result<bool, ReceiverStoreError>;

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

    /// Erases an install: its events, its rollups and its enrollment, in one transaction.
    /// Returns how many events were deleted, or `None` when the install is unknown.
    fn erase_install(&self, install_id: &str) -> Result<Option<u64>, ReceiverStoreError>;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub plan: Plan,
    /// When its last batch was stored.
    pub last_seen_ms: Option<i64>,
    pub events_30d: u64,
    pub tokens_30d: u64,
    /// Tokens of every kind per model and UTC day since the first of the month (prices
    /// change by day, and costs round once per model and day), sorted by model, then day;
    /// days without events left out.
    pub usage_mtd: Vec<ModelDayTokens>,
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

/// The rates of a model on a day (the receiver's [`Pricing::rates`](super::pricing::Pricing::rates)),
/// or `None` when nothing prices it.
pub type RatesOf<'a> = &'a (dyn Fn(&str, i64) -> Option<Rates> + Sync);

/// One install's usage with its priced days costed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostedInstall {
    pub install_id: String,
    pub label: Option<String>,
    pub plan: Plan,
    pub last_seen_ms: Option<i64>,
    /// Over the counted days.
    pub events_30d: u64,
    pub tokens_30d: u64,
    /// Over the priced days.
    pub priced: PricedUsage,
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
                    plan: usage.plan,
                    last_seen_ms: usage.last_seen_ms,
                    events_30d: usage.events_30d,
                    tokens_30d: usage.tokens_30d,
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
}

impl SummaryGroupBy {
    pub fn any(&self) -> bool {
        self.day || self.user || self.source || self.model
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
