//! Days in the agent's `timezone` (IANA, via chrono-tz): which day an event belongs to,
//! the millisecond range a day covers, the retention cut-offs, and when a `[schedule]`
//! cron expression fires. Pure: no clock, no I/O. A leaf: it imports nothing of the crate,
//! so anything may use it.
//!
//! A day is `[start(D), start(D + 1))`, where `start(D)` is the first instant whose local
//! time is at or after `D 00:00` (the earlier one when midnight repeats, the end of the gap
//! when a DST jump skips midnight). So days are 23, 24 or 25 hours long across DST changes.

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};

/// The agent's calendar: a time zone, parsed once when the config loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
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

    /// The zone's IANA name, as configured.
    pub fn name(&self) -> &'static str {
        self.tz.name()
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

impl TryFrom<String> for Calendar {
    type Error = UnknownTimeZone;

    fn try_from(name: String) -> Result<Calendar, UnknownTimeZone> {
        Calendar::parse(&name)
    }
}

/// A cron expression with seconds first (six or seven fields), the dialect
/// tokio-cron-scheduler uses; parsed once when the config loads. It fires in whatever
/// time zone [`Cron::next_after`] is given.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Cron {
    expression: String,
    cron: croner::Cron,
}

/// A `[schedule]` value that is not a cron expression with seconds first.
#[derive(Debug, thiserror::Error)]
#[error(
    "{expression:?} is not a cron expression with seconds first, such as \"0 0 2 * * *\" ({reason})"
)]
pub struct BadCron {
    pub expression: String,
    pub reason: String,
}

impl Cron {
    pub fn parse(expression: &str) -> Result<Cron, BadCron> {
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(expression)
            .map_err(|e| BadCron {
                expression: expression.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Cron {
            expression: expression.to_owned(),
            cron,
        })
    }

    /// The expression as configured.
    pub fn as_str(&self) -> &str {
        &self.expression
    }

    /// The first fire time strictly after `after`, reading the expression in `calendar`'s
    /// time zone (so "02:00" stays 02:00 local across DST changes).
    pub fn next_after(&self, calendar: Calendar, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&calendar.tz), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// How many fire times fall in `(after, until)`: the runs a schedule missed when its
    /// job ran at `after`'s slot and next looked at the clock at `until`.
    pub fn fires_between(
        &self,
        calendar: Calendar,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> u64 {
        let mut count = 0;
        let mut at = after;
        while let Some(next) = self.next_after(calendar, at).filter(|next| *next < until) {
            count += 1;
            at = next;
        }
        count
    }
}

impl TryFrom<String> for Cron {
    type Error = BadCron;

    fn try_from(expression: String) -> Result<Cron, BadCron> {
        Cron::parse(&expression)
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

    fn local(tz: Tz, y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        tz.with_ymd_and_hms(y, m, d, h, min, 0)
            .earliest()
            .unwrap()
            .with_timezone(&Utc)
    }

    fn fires(
        schedule: &Cron,
        calendar: Calendar,
        from: DateTime<Utc>,
        n: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut at = from;
        for _ in 0..n {
            at = schedule.next_after(calendar, at).unwrap();
            out.push(at);
        }
        out
    }

    #[test]
    fn daily_jobs_fire_at_local_time_across_dst() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let cleanup = Cron::parse("0 0 3 * * *").unwrap();
        let calendar = Calendar::new(berlin);
        // Spring forward (2026-03-29 02:00 -> 03:00) and fall back (2026-10-25 03:00 -> 02:00).
        let spring = fires(&cleanup, calendar, local(berlin, 2026, 3, 27, 12, 0), 4);
        let autumn = fires(&cleanup, calendar, local(berlin, 2026, 10, 23, 12, 0), 4);
        for at in spring.iter().chain(&autumn) {
            let local = at.with_timezone(&berlin);
            assert_eq!(local.format("%H:%M:%S").to_string(), "03:00:00", "{local}");
        }
        let days: Vec<u32> = autumn
            .iter()
            .map(|t| {
                t.with_timezone(&berlin)
                    .format("%d")
                    .to_string()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            days,
            vec![24, 25, 26, 27],
            "once a day, the long day included"
        );
        // 03:00 CET is 02:00 UTC, 03:00 CEST is 01:00 UTC.
        assert_eq!(
            spring[0],
            Utc.with_ymd_and_hms(2026, 3, 28, 2, 0, 0).unwrap()
        );
        assert_eq!(
            spring[1],
            Utc.with_ymd_and_hms(2026, 3, 29, 1, 0, 0).unwrap()
        );
    }

    #[test]
    fn a_time_skipped_by_dst_still_runs_that_day_and_a_repeated_one_runs_once() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let rollup = Cron::parse("0 30 2 * * *").unwrap();
        let calendar = Calendar::new(berlin);
        let spring = fires(&rollup, calendar, local(berlin, 2026, 3, 28, 12, 0), 2);
        assert_eq!(
            spring[0].with_timezone(&berlin).format("%m-%d").to_string(),
            "03-29",
            "{spring:?}"
        );
        assert_eq!(
            spring[1]
                .with_timezone(&berlin)
                .format("%m-%d %H:%M")
                .to_string(),
            "03-30 02:30"
        );
        let autumn = fires(&rollup, calendar, local(berlin, 2026, 10, 24, 12, 0), 2);
        assert_eq!(
            autumn[0]
                .with_timezone(&berlin)
                .format("%m-%d %H:%M")
                .to_string(),
            "10-25 02:30"
        );
        assert_eq!(
            autumn[1]
                .with_timezone(&berlin)
                .format("%m-%d %H:%M")
                .to_string(),
            "10-26 02:30"
        );
    }

    #[test]
    fn bad_expressions_are_refused() {
        for bad in ["0 2 * * *", "every day", "0 0 25 * * *", ""] {
            assert!(Cron::parse(bad).is_err(), "{bad:?}");
        }
        Cron::parse("*/5 * * * * *").unwrap();
    }

    #[test]
    fn runs_missed_between_two_instants_are_counted() {
        let utc = Calendar::new(Tz::UTC);
        let daily = Cron::parse("0 0 2 * * *").unwrap();
        let at = |d, h| Utc.with_ymd_and_hms(2026, 11, d, h, 0, 0).unwrap();
        // Ran at 02:00 on the 1st; looked at the clock again at 03:00 on the 4th: the runs of
        // the 2nd, 3rd and 4th were missed.
        assert_eq!(daily.fires_between(utc, at(1, 2), at(4, 3)), 3);
        assert_eq!(daily.fires_between(utc, at(1, 2), at(1, 3)), 0);
        // A run due exactly at `until` is the next one, not a missed one.
        assert_eq!(daily.fires_between(utc, at(1, 2), at(2, 2)), 0);
    }
}
