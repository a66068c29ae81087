//! UTC days, the receiver's unit of time for rollups, periods, budgets and partitions: a
//! day is a count of days since the Unix epoch, as every store and view counts it.
//!
//! **Invariant:** the only place that converts between milliseconds, day numbers, dates and
//! months; it knows nothing of HTTP or storage.

use chrono::{Datelike, Months, NaiveDate, TimeDelta};

/// Milliseconds in a UTC day.
pub const MS_PER_DAY: i64 = 86_400_000;

fn epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).expect("the epoch is a valid date")
}

/// The UTC day of an instant in milliseconds since the epoch.
pub fn day_of_ms(ms: i64) -> i64 {
    ms.div_euclid(MS_PER_DAY)
}

/// Days since the Unix epoch of a UTC date.
pub fn day_number(date: NaiveDate) -> i64 {
    (date - epoch()).num_days()
}

/// The date of a day number (the epoch for one out of chrono's range).
pub fn date_of(day: i64) -> NaiveDate {
    TimeDelta::try_days(day)
        .and_then(|delta| epoch().checked_add_signed(delta))
        .unwrap_or_else(epoch)
}

/// A day as `YYYY-MM-DD`.
pub fn day_text(day: i64) -> String {
    date_of(day).format("%Y-%m-%d").to_string()
}

/// A `YYYY-MM-DD` date as a day number, or `None` when it is not one.
pub fn parse_day(text: &str) -> Option<i64> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .map(day_number)
}

/// The first and last day of the month of `day`.
pub fn month_of(day: i64) -> (i64, i64) {
    let first = date_of(day)
        .with_day(1)
        .expect("every month has a first day");
    let next = first
        .checked_add_months(Months::new(1))
        .unwrap_or(NaiveDate::MAX);
    (day_number(first), day_number(next) - 1)
}

/// The month of a day as `YYYY-MM`.
pub fn month_text(day: i64) -> String {
    date_of(day).format("%Y-%m").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_dates_and_months_convert_both_ways() {
        let day = parse_day("2024-02-29").unwrap();
        assert_eq!(day_text(day), "2024-02-29");
        assert_eq!(day_of_ms(day * MS_PER_DAY + MS_PER_DAY - 1), day);
        assert_eq!(day_of_ms(-1), -1, "the day before the epoch");
        let (first, last) = month_of(day);
        assert_eq!(
            (day_text(first), day_text(last)),
            ("2024-02-01".into(), "2024-02-29".into())
        );
        assert_eq!(month_text(day), "2024-02");
        assert_eq!(
            month_of(parse_day("2026-12-31").unwrap()).1,
            parse_day("2026-12-31").unwrap()
        );
        assert_eq!(parse_day("2026-02-30"), None);
        assert_eq!(parse_day("yesterday"), None);
        assert_eq!(day_text(0), "1970-01-01");
        assert_eq!(day_text(20_784), "2026-11-27");
    }
}
