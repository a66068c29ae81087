//! How the dashboard writes figures and names: thousands separators, money with the
//! currency, the lower bound of a cost that leaves unpriced usage out, install names and
//! links. Pure.

use chrono::DateTime;
use maud::{Markup, html};

use crate::billing::money::Cents;
use crate::views::rows::CostChange;

/// `1,234,567`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// `1,234.56`, `-0.05`.
pub fn amount(cents: Cents) -> String {
    let sign = if cents.0 < 0 { "-" } else { "" };
    let abs = cents.0.unsigned_abs();
    format!("{sign}{}.{:02}", count(abs / 100), abs % 100)
}

/// `1,234.56 USD`.
pub fn money(cents: Cents, currency: &str) -> String {
    format!("{} {currency}", amount(cents))
}

/// What a cost cell says: `unpriced` when everything in it had no price, else the amount,
/// marked as a lower bound (`≥ 12.00`) when some of it had none.
pub fn cost_text(cents: Cents, unpriced: bool) -> String {
    match (unpriced, cents.0) {
        (true, 0) => "unpriced".to_owned(),
        (true, _) => format!("\u{2265} {}", amount(cents)),
        (false, _) => amount(cents),
    }
}

/// A table cell of a cost: right-aligned, `unpriced` in its own style.
pub fn cost_cell(cents: Cents, unpriced: bool, models: &[String]) -> Markup {
    let title = if unpriced {
        format!(
            "A lower bound: no price for {} on some days",
            if models.is_empty() {
                "some models".to_owned()
            } else {
                models.join(", ")
            }
        )
    } else {
        String::new()
    };
    html! {
        @if unpriced {
            td.n.unpriced.cost title=(title) { (cost_text(cents, true)) }
        } @else {
            td.n.cost { (amount(cents)) }
        }
    }
}

/// A money cell, red when negative; `upper`: the amount leaves some cost out, so it is at
/// most this (`≤`).
pub fn money_cell(cents: Cents, upper: bool) -> Markup {
    html! {
        td.n.neg[cents.0 < 0] {
            @if upper { "\u{2264} " }
            (amount(cents))
        }
    }
}

/// `+12.5%`, `-100.0%`, `new`, `–` (no cost in either period).
pub fn change_text(change: CostChange) -> String {
    match change {
        CostChange::Unknown => String::new(),
        CostChange::Idle => "\u{2013}".to_owned(),
        CostChange::New => "new".to_owned(),
        CostChange::Tenths(tenths) => {
            let sign = if tenths > 0 {
                "+"
            } else if tenths < 0 {
                "-"
            } else {
                ""
            };
            let abs = tenths.unsigned_abs();
            format!("{sign}{}.{}%", count(abs / 10), abs % 10)
        }
    }
}

/// `42.0%`.
pub fn percent(value: f64) -> String {
    format!("{value:.1}%")
}

/// The install's label, else its id shortened; the full id in the title.
pub fn install_name(install_id: &str, label: Option<&str>) -> Markup {
    match label {
        Some(label) => html! { span title=(install_id) { (label) } },
        None => html! { code title=(install_id) { (short_id(install_id)) } },
    }
}

/// The first 8 characters of a long id and an ellipsis.
pub fn short_id(id: &str) -> String {
    if id.chars().count() <= 12 {
        id.to_owned()
    } else {
        let head: String = id.chars().take(8).collect();
        format!("{head}\u{2026}")
    }
}

/// `2026-11-28 14:05`, UTC.
pub fn minute_text(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|at| at.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_default()
}

/// The dashboard path of one install, its id percent-encoded as a path segment.
pub fn install_path(install_id: &str) -> String {
    let mut url =
        url::Url::parse("http://receiver/dashboard/installations/").expect("a valid base address");
    url.path_segments_mut()
        .expect("an address with a path")
        .pop_if_empty()
        .push(install_id);
    url.path().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_have_separators_and_the_currency() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(1_031_256_093), "1,031,256,093");
        assert_eq!(amount(Cents(58_810)), "588.10");
        assert_eq!(amount(Cents(-123_456_789)), "-1,234,567.89");
        assert_eq!(amount(Cents(-5)), "-0.05");
        assert_eq!(money(Cents(123_456), "EUR"), "1,234.56 EUR");
    }

    #[test]
    fn unpriced_costs_never_read_zero() {
        assert_eq!(cost_text(Cents(0), true), "unpriced");
        assert_eq!(cost_text(Cents(1_200), true), "\u{2265} 12.00");
        assert_eq!(cost_text(Cents(0), false), "0.00");
    }

    #[test]
    fn changes_read_as_percentages() {
        assert_eq!(change_text(CostChange::Tenths(125)), "+12.5%");
        assert_eq!(change_text(CostChange::Tenths(-1000)), "-100.0%");
        assert_eq!(change_text(CostChange::Tenths(0)), "0.0%");
        assert_eq!(change_text(CostChange::Tenths(123_456)), "+12,345.6%");
        assert_eq!(change_text(CostChange::New), "new");
    }

    #[test]
    fn helpers_format_times_and_paths() {
        assert_eq!(minute_text(1_800_000_000_000), "2027-01-15 08:00");
        assert_eq!(
            install_path("a b/<c>_-.~"),
            "/dashboard/installations/a%20b%2F%3Cc%3E_-.~"
        );
        assert_eq!(short_id("short"), "short");
        assert_eq!(
            short_id("0192f3a4-5b6c-7d8e-9f00-112233445566"),
            "0192f3a4\u{2026}"
        );
    }
}
