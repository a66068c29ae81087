//! Tokens used per day and per month, for the site and for each user: the counters the
//! quotas are answered from. Days and months are local to the agent's time zone and
//! keyed by the event's own day, so a back-dated event counts where it happened.

use std::collections::HashMap;

use chrono::{Datelike, NaiveDate};

/// Tokens of one day or month: the site's and each user's.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub site: u64,
    pub users: HashMap<u64, u64>,
}

impl Bucket {
    fn add(&mut self, user_id: u64, tokens: u64) {
        self.site = self.site.saturating_add(tokens);
        let user = self.users.entry(user_id).or_default();
        *user = user.saturating_add(tokens);
    }

    pub fn user(&self, user_id: u64) -> u64 {
        self.users.get(&user_id).copied().unwrap_or(0)
    }

    /// Takes a user's tokens out of the bucket (erasure).
    fn remove_user(&mut self, user_id: u64) {
        if let Some(tokens) = self.users.remove(&user_id) {
            self.site = self.site.saturating_sub(tokens);
        }
    }
}

/// The first day of `day`'s month: the key of a month.
pub fn month_of(day: NaiveDate) -> NaiveDate {
    day.with_day(1).expect("every month has a first day")
}

/// The counters from the current day and month on. Older days and months are dropped as
/// time moves on ([`Ledger::move_to`]): nothing asks about them. Tomorrow is kept, since
/// an event may be created up to a few minutes ahead.
#[derive(Debug, Default)]
pub struct Ledger {
    today: Option<NaiveDate>,
    days: HashMap<NaiveDate, Bucket>,
    months: HashMap<NaiveDate, Bucket>,
}

impl Ledger {
    /// Counts `tokens` of `user_id` in `day` and its month, unless both are past.
    pub fn add(&mut self, day: NaiveDate, user_id: u64, tokens: u64) {
        let today = self.today.unwrap_or(day);
        if day >= today {
            self.days.entry(day).or_default().add(user_id, tokens);
        }
        let month = month_of(day);
        if month >= month_of(today) {
            self.months.entry(month).or_default().add(user_id, tokens);
        }
    }

    /// Makes `today` the current day, dropping the days and months before it. Returns
    /// whether the day changed.
    pub fn move_to(&mut self, today: NaiveDate) -> bool {
        if self.today == Some(today) {
            return false;
        }
        self.today = Some(today);
        let month = month_of(today);
        self.days.retain(|day, _| *day >= today);
        self.months.retain(|first, _| *first >= month);
        true
    }

    /// The bucket of `day`, empty when nothing counted in it.
    pub fn day(&self, day: NaiveDate) -> Option<&Bucket> {
        self.days.get(&day)
    }

    /// The bucket of the month of `day`.
    pub fn month(&self, day: NaiveDate) -> Option<&Bucket> {
        self.months.get(&month_of(day))
    }

    /// Takes a user out of every counter (erasure).
    pub fn remove_user(&mut self, user_id: u64) {
        for bucket in self.days.values_mut().chain(self.months.values_mut()) {
            bucket.remove_user(user_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(text: &str) -> NaiveDate {
        text.parse().unwrap()
    }

    #[test]
    fn an_event_counts_in_its_own_day_and_month() {
        let mut ledger = Ledger::default();
        ledger.move_to(date("2026-12-07"));
        ledger.add(date("2026-12-07"), 1, 100);
        ledger.add(date("2026-12-06"), 1, 10);
        ledger.add(date("2026-11-30"), 1, 1);
        assert_eq!(ledger.day(date("2026-12-07")).unwrap().user(1), 100);
        assert!(
            ledger.day(date("2026-12-06")).is_none(),
            "a past day is not kept"
        );
        let month = ledger.month(date("2026-12-07")).unwrap();
        assert_eq!((month.user(1), month.site), (110, 110));
        assert!(ledger.month(date("2026-11-30")).is_none());
    }

    #[test]
    fn moving_on_drops_the_past_and_keeps_what_was_counted_ahead() {
        let mut ledger = Ledger::default();
        ledger.move_to(date("2026-12-31"));
        ledger.add(date("2026-12-31"), 1, 100);
        ledger.add(date("2027-01-01"), 1, 7);
        assert!(ledger.move_to(date("2027-01-01")));
        assert!(!ledger.move_to(date("2027-01-01")));
        assert!(ledger.day(date("2026-12-31")).is_none());
        assert_eq!(ledger.day(date("2027-01-01")).unwrap().site, 7);
        assert_eq!(ledger.month(date("2027-01-01")).unwrap().site, 7);
        assert!(ledger.month(date("2026-12-31")).is_none());
    }

    #[test]
    fn an_erased_user_leaves_every_counter() {
        let mut ledger = Ledger::default();
        ledger.move_to(date("2026-12-07"));
        ledger.add(date("2026-12-07"), 1, 100);
        ledger.add(date("2026-12-07"), 2, 5);
        ledger.remove_user(1);
        let day = ledger.day(date("2026-12-07")).unwrap();
        assert_eq!((day.user(1), day.user(2), day.site), (0, 5, 5));
        assert_eq!(ledger.month(date("2026-12-07")).unwrap().site, 5);
    }
}
