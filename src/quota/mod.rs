//! Local quotas: "may this user spend T more tokens?", answered from memory before a site
//! makes an AI call. Limits per user and per site, per day and per month of the agent's
//! time zone (`[quota]`), and holds that count a call's tokens before it runs, so parallel
//! calls cannot overshoot together.
//!
//! The counters are rebuilt from the store at start ([`Quota::rebuild`]) and then follow
//! every committed event ([`Quota::spent`]); no request reads the disk. Holds live only in
//! memory: a restart releases them. Recording is never refused because of a quota (usage
//! that happened is recorded): the quotas only answer questions.
//!
//! **Invariant:** one lock guards the counters and the holds together, so a hold's check
//! and its counting are one step.

pub mod holds;
pub mod ledger;

use std::collections::HashSet;
use std::sync::Mutex;

use chrono::{DateTime, Months, NaiveDate, SecondsFormat, TimeZone, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::calendar::{Calendar, day_text, parse_day};
use crate::config::QuotaConfig;
use crate::store::{Store, StoreError};
use holds::{Hold, Holds};
use ledger::{Ledger, month_of};
use usage_protocol::event::Event;

/// What a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    UserDaily,
    UserMonthly,
    SiteDaily,
    SiteMonthly,
}

impl Scope {
    pub const ALL: [Scope; 4] = [
        Scope::UserDaily,
        Scope::UserMonthly,
        Scope::SiteDaily,
        Scope::SiteMonthly,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::UserDaily => "user_daily",
            Scope::UserMonthly => "user_monthly",
            Scope::SiteDaily => "site_daily",
            Scope::SiteMonthly => "site_monthly",
        }
    }

    fn is_daily(self) -> bool {
        matches!(self, Scope::UserDaily | Scope::SiteDaily)
    }

    fn is_user(self) -> bool {
        matches!(self, Scope::UserDaily | Scope::UserMonthly)
    }

    fn limit(self, config: &QuotaConfig) -> u64 {
        match self {
            Scope::UserDaily => config.user_daily_tokens,
            Scope::UserMonthly => config.user_monthly_tokens,
            Scope::SiteDaily => config.site_daily_tokens,
            Scope::SiteMonthly => config.site_monthly_tokens,
        }
    }
}

/// One set limit as it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitState {
    pub scope: Scope,
    pub limit: u64,
    /// Tokens of the events recorded in the current day or month.
    pub used: u64,
    /// Tokens of the open holds.
    pub held: u64,
    /// What is left once `used` and `held` are taken off (0 at or past the limit).
    pub remaining: u64,
    /// When the day or month starts over (RFC 3339, UTC).
    pub resets_at: String,
}

/// The answer to "may `user_id` spend `tokens` more?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub user_id: u64,
    pub allowed: bool,
    /// Every limit that is set (none when no limit is).
    pub limits: Vec<LimitState>,
    /// The scopes whose limit the tokens would pass.
    pub denied: Vec<Scope>,
}

/// What asking for a hold came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOutcome {
    /// The tokens are held until `expires_at`; `answer` counts them.
    Granted {
        hold_id: Uuid,
        expires_at: DateTime<Utc>,
        answer: Answer,
    },
    /// A limit would be passed; nothing is held.
    Refused(Answer),
    /// Too many holds are open (see [`holds::MAX_OPEN_HOLDS`]).
    Full,
}

/// What one committed (or duplicate) event means for the quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    pub user_id: u64,
    pub created_at_ms: i64,
    pub tokens: u64,
    /// The hold the event settles.
    pub hold_id: Option<Uuid>,
    /// Stored now (a duplicate counted when it was first stored, and only settles).
    pub new: bool,
}

/// The quotas of one agent.
pub struct Quota {
    config: QuotaConfig,
    calendar: Calendar,
    inner: Mutex<Inner>,
}

struct Inner {
    ledger: Ledger,
    holds: Holds,
    /// The day the reset times below were worked out for.
    resets_for: Option<NaiveDate>,
    day_resets_at: String,
    month_resets_at: String,
}

impl Quota {
    /// Quotas with nothing counted yet.
    pub fn new(config: QuotaConfig, calendar: Calendar) -> Quota {
        Quota {
            config,
            calendar,
            inner: Mutex::new(Inner {
                ledger: Ledger::default(),
                holds: Holds::default(),
                resets_for: None,
                day_resets_at: String::new(),
                month_resets_at: String::new(),
            }),
        }
    }

    /// Quotas counted from the store: this month's raw events, and the daily summaries of
    /// this month's days whose raw events retention has deleted. Without any limit set
    /// nothing is counted (nothing would be asked).
    pub fn rebuild(
        config: QuotaConfig,
        calendar: Calendar,
        store: &Store,
        now: DateTime<Utc>,
    ) -> Result<Quota, StoreError> {
        let quota = Quota::new(config, calendar);
        if !quota.counting() {
            return Ok(quota);
        }
        let today = calendar.date_of(now.timestamp_millis());
        let month = month_of(today);
        let mut inner = quota.lock();
        inner.ledger.move_to(today);
        let mut raw_days = HashSet::new();
        store.each_event_since(calendar.day_start(month), |user_id, created_at, tokens| {
            let day = calendar.date_of(created_at);
            raw_days.insert(day);
            inner.ledger.add(day, user_id, tokens);
        })?;
        for row in store.daily_tokens_since(&day_text(month))? {
            if let Some(day) = parse_day(&row.day).filter(|day| !raw_days.contains(day)) {
                inner.ledger.add(day, row.user_id, row.total_tokens);
            }
        }
        drop(inner);
        Ok(quota)
    }

    /// Whether any limit is set, so events are counted.
    fn counting(&self) -> bool {
        self.config.any_limit()
    }

    pub fn hold_ttl_secs(&self) -> u64 {
        self.config.hold_ttl_secs
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The counters stay consistent across a panic elsewhere: every change is one step.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May `user_id` spend `tokens` more at `now`?
    pub fn check(&self, user_id: u64, tokens: u64, now: DateTime<Utc>) -> Answer {
        let mut inner = self.lock();
        self.advance(&mut inner, now);
        self.answer(&inner, user_id, tokens, now)
    }

    /// Holds `tokens` for `user_id` if every limit allows them.
    pub fn hold(&self, user_id: u64, tokens: u64, now: DateTime<Utc>) -> HoldOutcome {
        let mut inner = self.lock();
        self.advance(&mut inner, now);
        let answer = self.answer(&inner, user_id, tokens, now);
        if !answer.allowed {
            return HoldOutcome::Refused(answer);
        }
        if inner.holds.is_full() {
            return HoldOutcome::Full;
        }
        let ttl = chrono::Duration::seconds(self.config.hold_ttl_secs as i64);
        let expires_at = now + ttl;
        let hold_id = Uuid::new_v4();
        inner.holds.insert(
            hold_id,
            Hold {
                user_id,
                tokens,
                expires_ms: expires_at.timestamp_millis(),
            },
        );
        // The limits with the hold counted; `allowed` answers the hold itself, which fit.
        let answer = Answer {
            allowed: true,
            denied: Vec::new(),
            ..self.answer(&inner, user_id, 0, now)
        };
        HoldOutcome::Granted {
            hold_id,
            expires_at,
            answer,
        }
    }

    /// Releases an open hold; false when it is not open (settled, released or expired).
    pub fn release(&self, hold_id: Uuid, now: DateTime<Utc>) -> bool {
        let mut inner = self.lock();
        self.advance(&mut inner, now);
        inner.holds.remove(hold_id).is_some()
    }

    /// What `events` mean for the quotas, each `new: false` until the store has answered;
    /// empty when the quotas need none of them (no limit set, no hold carried), so the
    /// events handler does no work for quotas a site does not use.
    pub fn to_follow(&self, events: &[Event]) -> Vec<Spent> {
        if !self.counting() && events.iter().all(|e| e.hold_id.is_none()) {
            return Vec::new();
        }
        events
            .iter()
            .map(|event| Spent {
                user_id: event.user_id,
                created_at_ms: event.created_at_ms,
                tokens: event.tokens.total(),
                hold_id: event.hold_id,
                new: false,
            })
            .collect()
    }

    /// Counts committed events, each in the day of its `created_at`, and settles the holds
    /// they carry (a duplicate only settles: it was counted when first stored).
    pub fn spent(&self, events: &[Spent], now: DateTime<Utc>) {
        let counting = self.counting();
        let mut inner = self.lock();
        self.advance(&mut inner, now);
        for event in events {
            if let Some(hold_id) = event.hold_id {
                inner.holds.remove(hold_id);
            }
            if counting && event.new {
                let day = self.calendar.date_of(event.created_at_ms);
                inner.ledger.add(day, event.user_id, event.tokens);
            }
        }
    }

    /// Takes an erased user's usage out of every counter.
    pub fn forget_user(&self, user_id: u64) {
        self.lock().ledger.remove_user(user_id);
    }

    /// Holds open at `now`.
    pub fn open_holds(&self, now: DateTime<Utc>) -> usize {
        let mut inner = self.lock();
        self.advance(&mut inner, now);
        inner.holds.len()
    }

    /// The site's limits as they stand, `None` when no limit is set at all.
    pub fn site_state(&self, now: DateTime<Utc>) -> Option<Vec<LimitState>> {
        if !self.counting() {
            return None;
        }
        let mut limits = self.check(0, 0, now).limits;
        limits.retain(|limit| !limit.scope.is_user());
        Some(limits)
    }

    /// Moves the counters to the day of `now` and lets expired holds go.
    fn advance(&self, inner: &mut Inner, now: DateTime<Utc>) {
        let now_ms = now.timestamp_millis();
        let today = self.calendar.date_of(now_ms);
        inner.ledger.move_to(today);
        inner.holds.expire(now_ms);
        if inner.resets_for != Some(today) {
            let tomorrow = today.succ_opt().unwrap_or(today);
            let next_month = month_of(today)
                .checked_add_months(Months::new(1))
                .unwrap_or(today);
            inner.day_resets_at = rfc3339(self.calendar.day_start(tomorrow));
            inner.month_resets_at = rfc3339(self.calendar.day_start(next_month));
            inner.resets_for = Some(today);
        }
    }

    fn answer(&self, inner: &Inner, user_id: u64, tokens: u64, now: DateTime<Utc>) -> Answer {
        let today = self.calendar.date_of(now.timestamp_millis());
        let day = inner.ledger.day(today);
        let month = inner.ledger.month(today);
        let mut limits = Vec::new();
        let mut denied = Vec::new();
        for scope in Scope::ALL {
            let limit = scope.limit(&self.config);
            if limit == 0 {
                continue;
            }
            let bucket = if scope.is_daily() { day } else { month };
            let (used, held) = if scope.is_user() {
                (
                    bucket.map_or(0, |b| b.user(user_id)),
                    inner.holds.user(user_id),
                )
            } else {
                (bucket.map_or(0, |b| b.site), inner.holds.site())
            };
            let taken = used.saturating_add(held);
            // A limit reached allows nothing more, not even 0 tokens; below it, a call may
            // take up to exactly the limit.
            if taken >= limit || taken.saturating_add(tokens) > limit {
                denied.push(scope);
            }
            let resets_at = if scope.is_daily() {
                &inner.day_resets_at
            } else {
                &inner.month_resets_at
            };
            limits.push(LimitState {
                scope,
                limit,
                used,
                held,
                remaining: limit.saturating_sub(taken),
                resets_at: resets_at.clone(),
            });
        }
        Answer {
            user_id,
            allowed: denied.is_empty(),
            limits,
            denied,
        }
    }
}

fn rfc3339(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests;
