//! Days in the agent's `timezone` (IANA, via chrono-tz): which day an event belongs to,
//! the millisecond range a day covers, and the retention cut-offs. Pure: no clock, no I/O.
//!
//! A day is `[start(D), start(D + 1))`, where `start(D)` is the first instant whose local
//! time is at or after `D 00:00` (the earlier one when midnight repeats, the end of the gap
//! when a DST jump skips midnight). So days are 23, 24 or 25 hours long across DST changes.

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

/// The agent's calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calendar {
    tz: Tz,
}

/// `timezone` is not an IANA time zone name.
#[derive(Debug, thiserror::Error)]
#[error("unknown time zone {0:?}: use an IANA name such as UTC or Europe/Berlin")]
pub struct UnknownTimeZone(pub String);

impl Calendar {
    pub fn new(tz: Tz) -> Calendar {
        Calendar { tz }
    }

    /// Parses an IANA name such as `Europe/Berlin`.
    pub fn parse(name: &str) -> Result<Calendar, UnknownTimeZone> {
        name.parse::<Tz>()
            .map(Calendar::new)
            .map_err(|_| UnknownTimeZone(name.to_owned()))
    }

    pub fn tz(&self) -> Tz {
        self.tz
    }

    /// The local day of an instant (ms since the epoch).
    pub fn date_of(&self, ms: i64) -> NaiveDate {
        let utc = Utc.timestamp_millis_opt(ms).single().unwrap_or_default();
        utc.with_timezone(&self.tz).date_naive()
    }

    /// The first instant (ms) of local day `date`.
    pub fn day_start(&self, date: NaiveDate) -> i64 {
        let midnight = date.and_time(NaiveTime::MIN);
        // Midnight may fall in a DST gap: the day then starts at the first local minute that
        // exists, which is the instant of the jump. Gaps are at most a few hours long.
        (0..=24 * 60)
            .find_map(|minutes| {
                self.tz
                    .from_local_datetime(&(midnight + Duration::minutes(minutes)))
                    .earliest()
            })
            .map_or_else(
                || midnight.and_utc().timestamp_millis(),
                |t| t.timestamp_millis(),
            )
    }

    /// `[start, end)` in ms of local day `date`.
    pub fn day_range(&self, date: NaiveDate) -> (i64, i64) {
        let next = date.succ_opt().unwrap_or(NaiveDate::MAX);
        (self.day_start(date), self.day_start(next))
    }

    /// `[start, end)` in ms of the inclusive local day range `from..=to`; an open end is
    /// unbounded.
    pub fn range_ms(&self, from: Option<NaiveDate>, to: Option<NaiveDate>) -> (i64, i64) {
        let start = from.map_or(i64::MIN, |d| self.day_start(d));
        let end = to.map_or(i64::MAX, |d| self.day_range(d).1);
        (start, end)
    }

    /// The first day kept by a retention of `days` at `now`: the day that contains
    /// `now - days * 24h`. Everything before it is older than the retention as a whole
    /// day. Events are accepted up to exactly `days * 24h` old, so no event accepted
    /// later can land in a day this has already purged.
    pub fn first_kept_day(&self, now: DateTime<Utc>, days: u32) -> NaiveDate {
        self.date_of((now - Duration::days(days.into())).timestamp_millis())
    }
}

/// Formats a day as `YYYY-MM-DD`.
pub fn day_text(date: NaiveDate) -> String {
    date.format("%Y-%m-%d").to_string()
}

/// Parses a `YYYY-MM-DD` day.
pub fn parse_day(text: &str) -> Option<NaiveDate> {
    (text.len() == 10)
        .then(|| NaiveDate::parse_from_str(text, "%Y-%m-%d").ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> NaiveDate {
        parse_day(text).unwrap()
    }

    fn hours(range: (i64, i64)) -> i64 {
        (range.1 - range.0) / 3_600_000
    }

    #[test]
    fn days_follow_dst_in_berlin() {
        let berlin = Calendar::parse("Europe/Berlin").unwrap();
        assert_eq!(hours(berlin.day_range(day("2026-03-29"))), 23);
        assert_eq!(hours(berlin.day_range(day("2026-10-25"))), 25);
        assert_eq!(hours(berlin.day_range(day("2026-06-01"))), 24);
        // 2026-03-28 23:00 UTC is midnight in Berlin (CET, +1).
        let start = berlin.day_start(day("2026-03-29"));
        assert_eq!(
            start,
            Utc.with_ymd_and_hms(2026, 3, 28, 23, 0, 0)
                .unwrap()
                .timestamp_millis()
        );
        assert_eq!(berlin.date_of(start), day("2026-03-29"));
        assert_eq!(berlin.date_of(start - 1), day("2026-03-28"));
    }

    #[test]
    fn a_day_whose_midnight_is_skipped_starts_at_the_jump() {
        // Sao Paulo skipped 2018-11-04 00:00..01:00 (-03 to -02).
        let sao_paulo = Calendar::parse("America/Sao_Paulo").unwrap();
        let start = sao_paulo.day_start(day("2018-11-04"));
        assert_eq!(
            start,
            Utc.with_ymd_and_hms(2018, 11, 4, 3, 0, 0)
                .unwrap()
                .timestamp_millis()
        );
        assert_eq!(sao_paulo.date_of(start), day("2018-11-04"));
        assert_eq!(sao_paulo.date_of(start - 1), day("2018-11-03"));
        assert_eq!(hours(sao_paulo.day_range(day("2018-11-04"))), 23);
    }

    #[test]
    fn half_hour_zones_and_ranges() {
        let kolkata = Calendar::parse("Asia/Kolkata").unwrap();
        let start = kolkata.day_start(day("2026-01-10"));
        assert_eq!(
            start,
            Utc.with_ymd_and_hms(2026, 1, 9, 18, 30, 0)
                .unwrap()
                .timestamp_millis()
        );
        let (from, to) = kolkata.range_ms(Some(day("2026-01-10")), Some(day("2026-01-11")));
        assert_eq!((to - from) / 3_600_000, 48);
        assert_eq!(kolkata.range_ms(None, None), (i64::MIN, i64::MAX));
    }

    #[test]
    fn unknown_zones_and_bad_days_are_refused() {
        assert!(Calendar::parse("Mars/Olympus").is_err());
        assert!(Calendar::parse("").is_err());
        assert_eq!(parse_day("2026-02-30"), None);
        assert_eq!(parse_day("2026-2-3"), None);
        assert_eq!(day_text(day("2026-02-03")), "2026-02-03");
    }
}
