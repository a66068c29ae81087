//! The price book: per-model prices by token kind, each in force from a UTC date, read
//! from the TOML file `PRICE_BOOK` names (docs/install.md, "Prices on the receiver") and
//! checked by `usage-receiver prices check`.
//!
//! Parsing turns the file into a [`PriceBook`] that cannot be invalid: every price finite
//! and not negative, every date a real date, every `match` an exact name or a prefix ending
//! in `*`, no two entries for the same `match` and date. Every rejection names the line and
//! the key. Prices become integer micro-units per million tokens once, here; the money
//! arithmetic is [`crate::billing::pricing`]'s. This module reads one file and knows
//! nothing about HTTP or the stores.

use std::collections::HashMap;
use std::path::Path;

use chrono::NaiveDate;
use serde::Deserialize;
use toml::Spanned;

use crate::billing::money::Micros;
use crate::days::day_number;
use usage_common::toml_place::{describe, placed};

/// What one million tokens of each kind cost, in micro-units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    /// Prompt tokens neither cached nor written to cache.
    pub input: Micros,
    pub cached_input: Micros,
    pub cache_write: Micros,
    /// Completion tokens that are not reasoning.
    pub output: Micros,
    pub reasoning: Micros,
}

impl Rates {
    /// The same price for every kind of token.
    pub fn flat(per_mtok: Micros) -> Rates {
        Rates {
            input: per_mtok,
            cached_input: per_mtok,
            cache_write: per_mtok,
            output: per_mtok,
            reasoning: per_mtok,
        }
    }
}

/// Which model names an entry prices.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModelMatch {
    Exact(String),
    /// The text before the `*`.
    Prefix(String),
}

impl ModelMatch {
    /// As written in the book: `gpt-4o` or `claude-3-5-*`.
    pub fn to_text(&self) -> String {
        match self {
            ModelMatch::Exact(name) => name.clone(),
            ModelMatch::Prefix(prefix) => format!("{prefix}*"),
        }
    }
}

/// One `[[model]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceEntry {
    pub pattern: ModelMatch,
    pub effective_from: NaiveDate,
    /// Days since the Unix epoch of `effective_from`.
    pub from_day: i64,
    pub rates: Rates,
}

/// A checked price book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceBook {
    pub currency: String,
    /// As in the file, in file order.
    pub entries: Vec<PriceEntry>,
    /// Exact names to their rates by first day, sorted by day.
    exact: HashMap<String, Vec<(i64, Rates)>>,
    /// Prefixes, longest first, each with its rates by first day, sorted by day.
    prefixes: Vec<(String, Vec<(i64, Rates)>)>,
}

/// A price book that could not be read or is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceBookError {
    #[error("could not read {path}: {message}")]
    Read { path: String, message: String },
    /// `line N, key `k`: rule`, or just the rule when TOML gives no place.
    #[error("{0}")]
    Invalid(String),
}

impl PriceBook {
    /// Reads and checks the book at `path`.
    pub fn load(path: &Path) -> Result<PriceBook, PriceBookError> {
        let text = std::fs::read_to_string(path).map_err(|e| PriceBookError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        PriceBook::parse(&text)
    }

    /// Checks the TOML text of a book; an unknown key or a bad value is an error naming
    /// its line and key.
    pub fn parse(text: &str) -> Result<PriceBook, PriceBookError> {
        let raw: RawBook =
            toml::from_str(text).map_err(|e| PriceBookError::Invalid(describe(text, &e)))?;
        let invalid = |span: std::ops::Range<usize>, key: &str, rule: &str| {
            PriceBookError::Invalid(placed(text, span.start, Some(key), rule))
        };
        let currency = raw.currency.get_ref().trim();
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(invalid(
                raw.currency.span(),
                "currency",
                "must be a three-letter ISO 4217 code such as \"USD\"",
            ));
        }
        let mut entries: Vec<PriceEntry> = Vec::with_capacity(raw.model.len());
        for entry in &raw.model {
            let pattern = parse_match(entry.pattern.get_ref()).ok_or_else(|| {
                invalid(
                    entry.pattern.span(),
                    "model.match",
                    "must be a model name, or a prefix ending in a single \"*\" (\"claude-3-5-*\")",
                )
            })?;
            let effective_from =
                NaiveDate::parse_from_str(&entry.effective_from.get_ref().to_text(), "%Y-%m-%d")
                    .map_err(|_| {
                        invalid(
                            entry.effective_from.span(),
                            "model.effective_from",
                            "must be a UTC date written YYYY-MM-DD",
                        )
                    })?;
            let price = |value: &Spanned<f64>, key: &str| -> Result<Micros, PriceBookError> {
                let units = *value.get_ref();
                // Above a billion per million tokens is a typo, and it keeps every sum
                // far inside 128 bits.
                if !units.is_finite() || !(0.0..=1e9).contains(&units) {
                    return Err(invalid(
                        value.span(),
                        key,
                        "must be a number of currency units per million tokens, 0 or more",
                    ));
                }
                Ok(Micros::from_units(units))
            };
            let input = price(&entry.input_per_mtok, "model.input_per_mtok")?;
            let output = price(&entry.output_per_mtok, "model.output_per_mtok")?;
            let or = |value: &Option<Spanned<f64>>, key: &str, default: Micros| match value {
                Some(value) => price(value, key),
                None => Ok(default),
            };
            let rates = Rates {
                input,
                cached_input: or(
                    &entry.cached_input_per_mtok,
                    "model.cached_input_per_mtok",
                    input,
                )?,
                cache_write: or(
                    &entry.cache_write_per_mtok,
                    "model.cache_write_per_mtok",
                    input,
                )?,
                output,
                reasoning: or(
                    &entry.reasoning_per_mtok,
                    "model.reasoning_per_mtok",
                    output,
                )?,
            };
            if entries
                .iter()
                .any(|e| e.pattern == pattern && e.effective_from == effective_from)
            {
                return Err(invalid(
                    entry.effective_from.span(),
                    "model.effective_from",
                    &format!(
                        "an earlier entry already prices \"{}\" from {effective_from}: each match has one entry per date",
                        pattern.to_text()
                    ),
                ));
            }
            entries.push(PriceEntry {
                pattern,
                from_day: day_number(effective_from),
                effective_from,
                rates,
            });
        }
        Ok(PriceBook::index(currency.to_owned(), entries))
    }

    fn index(currency: String, entries: Vec<PriceEntry>) -> PriceBook {
        let mut exact: HashMap<String, Vec<(i64, Rates)>> = HashMap::new();
        let mut prefixes: HashMap<String, Vec<(i64, Rates)>> = HashMap::new();
        for entry in &entries {
            let (map, key) = match &entry.pattern {
                ModelMatch::Exact(name) => (&mut exact, name),
                ModelMatch::Prefix(prefix) => (&mut prefixes, prefix),
            };
            map.entry(key.clone())
                .or_default()
                .push((entry.from_day, entry.rates));
        }
        for dated in exact.values_mut().chain(prefixes.values_mut()) {
            dated.sort_by_key(|(day, _)| *day);
        }
        let mut prefixes: Vec<_> = prefixes.into_iter().collect();
        prefixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        PriceBook {
            currency,
            entries,
            exact,
            prefixes,
        }
    }

    /// The rates of `model` on `day` (days since the Unix epoch): among the entries in force
    /// that day (the latest `effective_from` on or before it), the exact match, else the
    /// longest matching prefix. `None` when no entry prices the model that day.
    pub fn rates(&self, model: &str, day: i64) -> Option<Rates> {
        let in_force = |dated: &[(i64, Rates)]| {
            let after = dated.partition_point(|(from, _)| *from <= day);
            after.checked_sub(1).map(|index| dated[index].1)
        };
        if let Some(rates) = self.exact.get(model).and_then(|d| in_force(d)) {
            return Some(rates);
        }
        self.prefixes
            .iter()
            .filter(|(prefix, _)| model.starts_with(prefix.as_str()))
            .find_map(|(_, dated)| in_force(dated))
    }
}

fn parse_match(text: &str) -> Option<ModelMatch> {
    if text.is_empty() || text.trim() != text {
        return None;
    }
    match text.strip_suffix('*') {
        Some(prefix) if !prefix.contains('*') => Some(ModelMatch::Prefix(prefix.to_owned())),
        Some(_) => None,
        None if text.contains('*') => None,
        None => Some(ModelMatch::Exact(text.to_owned())),
    }
}

/// `effective_from` as written: a string (`"2024-07-18"`, as contrib/prices.example.toml
/// writes it) or a bare TOML date (`2024-07-18`), which operators write as readily.
enum DateText {
    Text(String),
    Date(toml::value::Datetime),
}

impl<'de> Deserialize<'de> for DateText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<DateText, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = DateText;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a UTC date written YYYY-MM-DD")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<DateText, E> {
                Ok(DateText::Text(text.to_owned()))
            }
            // TOML hands a bare date over as a one-entry map, which `Datetime` reads.
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<DateText, A::Error> {
                let date = toml::value::Datetime::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )?;
                Ok(DateText::Date(date))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl DateText {
    fn to_text(&self) -> String {
        match self {
            DateText::Text(text) => text.trim().to_owned(),
            DateText::Date(date) => date.to_string(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBook {
    currency: Spanned<String>,
    #[serde(default)]
    model: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    #[serde(rename = "match")]
    pattern: Spanned<String>,
    effective_from: Spanned<DateText>,
    input_per_mtok: Spanned<f64>,
    cached_input_per_mtok: Option<Spanned<f64>>,
    cache_write_per_mtok: Option<Spanned<f64>>,
    output_per_mtok: Spanned<f64>,
    reasoning_per_mtok: Option<Spanned<f64>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(text: &str) -> PriceBook {
        PriceBook::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn day(date: &str) -> i64 {
        day_number(NaiveDate::parse_from_str(date, "%Y-%m-%d").unwrap())
    }

    #[test]
    fn defaults_fill_the_optional_prices() {
        let book = book(
            "currency = \"USD\"
             [[model]]
             match = \"m\"
             effective_from = \"2024-07-18\"
             input_per_mtok = 0.15
             output_per_mtok = 0.6",
        );
        let rates = book.rates("m", day("2024-07-18")).unwrap();
        assert_eq!(
            rates,
            Rates {
                input: Micros(150_000),
                cached_input: Micros(150_000),
                cache_write: Micros(150_000),
                output: Micros(600_000),
                reasoning: Micros(600_000),
            }
        );
        assert_eq!(book.rates("m", day("2024-07-17")), None, "not yet in force");
        assert_eq!(book.currency, "USD");
    }

    #[test]
    fn exact_beats_prefix_and_longer_prefixes_beat_shorter_ones() {
        let entry = |pattern: &str, from: &str, input: f64| {
            format!(
                "[[model]]\nmatch = \"{pattern}\"\neffective_from = \"{from}\"\ninput_per_mtok = {input}\noutput_per_mtok = 0\n"
            )
        };
        let text = format!(
            "currency = \"EUR\"\n{}{}{}{}{}",
            entry("claude-*", "2024-01-01", 1.0),
            entry("claude-3-5-*", "2024-06-01", 2.0),
            entry("claude-3-5-sonnet", "2024-01-01", 3.0),
            entry("claude-3-5-*", "2024-09-01", 4.0),
            entry("*", "2024-01-01", 9.0),
        );
        let book = book(&text);
        let input = |model: &str, date: &str| book.rates(model, day(date)).map(|r| r.input.0);
        let cases = [
            // The exact name wins whatever the prefixes say.
            ("claude-3-5-sonnet", "2024-10-01", Some(3_000_000)),
            // The longest prefix in force that day.
            ("claude-3-5-haiku", "2024-10-01", Some(4_000_000)),
            ("claude-3-5-haiku", "2024-08-31", Some(2_000_000)),
            // Before the longer prefix starts, the shorter one prices it.
            ("claude-3-5-haiku", "2024-05-31", Some(1_000_000)),
            ("claude-3-opus", "2024-10-01", Some(1_000_000)),
            // "*" matches every name.
            ("gpt-4o", "2024-10-01", Some(9_000_000)),
            // Nothing is in force before 2024.
            ("gpt-4o", "2023-12-31", None),
            // Names match case-sensitively.
            ("Claude-3-opus", "2024-10-01", Some(9_000_000)),
        ];
        for (model, date, expected) in cases {
            assert_eq!(input(model, date), expected, "{model} on {date}");
        }
    }

    #[test]
    fn rejections_name_the_line_and_key() {
        let valid = "match = \"m\"\neffective_from = \"2024-01-01\"\ninput_per_mtok = 1\noutput_per_mtok = 2\n";
        let cases = [
            ("currency = \"usd\"\n", "line 1, key `currency`"),
            (&format!("[[model]]\n{valid}"), "missing field `currency`"),
            ("currency = \"USD\"\ncolour = 1\n", "line 2, key `colour`"),
            (
                "currency = \"USD\"\n[[model]]\nmatch = \"m\"\neffective_from = \"2024-01-01\"\ninput_per_mtok = 1\noutput_per_mtok = 2\nouput_per_mtok = 2\n",
                "line 7, key `model.ouput_per_mtok`",
            ),
            (
                "currency = \"USD\"\n[[model]]\nmatch = \"m\"\neffective_from = \"2024-01-01\"\n",
                "missing field `input_per_mtok`",
            ),
            (
                "currency = \"USD\"\n[[model]]\nmatch = \"m\"\neffective_from = \"2024-02-30\"\ninput_per_mtok = 1\noutput_per_mtok = 2\n",
                "line 4, key `model.effective_from`",
            ),
            (
                "currency = \"USD\"\n[[model]]\nmatch = \"m\"\neffective_from = \"2024-01-01\"\ninput_per_mtok = -1\noutput_per_mtok = 2\n",
                "line 5, key `model.input_per_mtok`",
            ),
            (
                "currency = \"USD\"\n[[model]]\nmatch = \"m\"\neffective_from = \"2024-01-01\"\ninput_per_mtok = 1\noutput_per_mtok = \"2\"\n",
                "line 6, key `model.output_per_mtok`",
            ),
            (
                "currency = \"USD\"\n[[model]]\nmatch = \"m\"\neffective_from = \"2024-01-01\"\ninput_per_mtok = 1\noutput_per_mtok = 2\nreasoning_per_mtok = nan\n",
                "line 7, key `model.reasoning_per_mtok`",
            ),
            (
                "currency = \"USD\"\n[[model]]\nmatch = \"gpt-*-mini\"\neffective_from = \"2024-01-01\"\ninput_per_mtok = 1\noutput_per_mtok = 2\n",
                "line 3, key `model.match`",
            ),
            (
                "currency = \"USD\"\n[[model]]\nmatch = \"\"\neffective_from = \"2024-01-01\"\ninput_per_mtok = 1\noutput_per_mtok = 2\n",
                "line 3, key `model.match`",
            ),
            (
                &format!("currency = \"USD\"\n[[model]]\n{valid}[[model]]\n{valid}"),
                "line 9, key `model.effective_from`: an earlier entry already prices \"m\"",
            ),
        ];
        for (text, expected) in cases {
            let error = PriceBook::parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn effective_from_may_be_a_string_or_a_bare_toml_date() {
        let entry = |from: &str| {
            format!(
                "currency = \"USD\"\n[[model]]\nmatch = \"m\"\neffective_from = {from}\ninput_per_mtok = 1\noutput_per_mtok = 2\n"
            )
        };
        for from in ["\"2024-07-18\"", "2024-07-18"] {
            let book = book(&entry(from));
            assert_eq!(book.entries[0].from_day, day("2024-07-18"), "{from}");
        }
        // A date with a time is not a day.
        let error = PriceBook::parse(&entry("2024-07-18T00:00:00Z")).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("line 4, key `model.effective_from`"),
            "{error}"
        );
    }

    #[test]
    fn an_empty_book_prices_nothing() {
        let book = book("currency = \"USD\"");
        assert!(book.entries.is_empty());
        assert_eq!(book.rates("m", 0), None);
    }

    #[test]
    fn the_example_book_parses() {
        let text = include_str!("../../../../contrib/prices.example.toml");
        let book = book(text);
        assert_eq!(book.currency, "USD");
        // A few entries checked against the file, so a typo in a number shows here.
        let rates = |model: &str, date: &str| book.rates(model, day(date)).unwrap();
        let mini = rates("gpt-4o-mini", "2025-11-01");
        assert_eq!((mini.input.0, mini.cached_input.0), (150_000, 75_000));
        let sonnet = rates("claude-sonnet-4-5-20250929", "2025-11-01");
        assert_eq!(
            (sonnet.input.0, sonnet.cache_write.0, sonnet.cached_input.0),
            (3_000_000, 3_750_000, 300_000)
        );
        // o3's price cut of 2025-06-10 is a second entry.
        assert_eq!(rates("o3", "2025-06-09").output.0, 40_000_000);
        assert_eq!(rates("o3", "2025-06-10").output.0, 8_000_000);
        assert!(book.rates("gemini-2.5-pro", day("2025-11-01")).is_some());
    }
}
