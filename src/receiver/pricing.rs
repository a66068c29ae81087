//! Money for the provider views: model prices, plan prices, and the month-to-date bill of
//! an installation (SPEC section 6).
//!
//! Every amount is an integer number of micro-units ([`Micros`], a millionth of a currency
//! unit); floats appear only where a configured price is read, once, at start. A model's
//! cost is `tokens × price per 1K / 1000`, computed exactly in 128-bit integers and rounded
//! half up to a micro-unit; amounts are rounded to cents only for display. Model prices
//! match the model name exactly. This module does no I/O and knows nothing about HTTP.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use super::settings::ReceiverSettings;

/// Micro-units in one currency unit.
pub const MICROS_PER_UNIT: i64 = 1_000_000;
/// Micro-units in one cent.
const MICROS_PER_CENT: i64 = 10_000;

/// An amount of money in micro-units (millionths of a currency unit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Micros(pub i64);

impl Micros {
    /// A configured price in currency units, rounded to the nearest micro-unit. Settings
    /// only hold finite, non-negative prices; anything else (or an absurdly large price)
    /// saturates rather than wrapping.
    pub fn from_units(units: f64) -> Micros {
        let micros = (units * MICROS_PER_UNIT as f64).round();
        if micros.is_nan() {
            Micros(0)
        } else {
            // `as` saturates at the i64 bounds.
            Micros(micros as i64)
        }
    }

    /// Rounded to whole cents, halves away from zero.
    pub fn to_cents(self) -> Cents {
        let half = MICROS_PER_CENT / 2;
        let cents = if self.0 >= 0 {
            self.0.saturating_add(half) / MICROS_PER_CENT
        } else {
            self.0.saturating_sub(half) / MICROS_PER_CENT
        };
        Cents(cents)
    }
}

/// A displayed amount: whole cents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cents(pub i64);

impl Cents {
    /// The amount as a JSON number in currency units with at most two decimals.
    pub fn to_json(self) -> serde_json::Value {
        // Exact for any amount below 2^53 cents; the division by 100 only places the point.
        serde_json::Value::from(self.0 as f64 / 100.0)
    }
}

impl std::ops::Sub for Cents {
    type Output = Cents;
    fn sub(self, other: Cents) -> Cents {
        Cents(self.0.saturating_sub(other.0))
    }
}

impl std::ops::Add for Cents {
    type Output = Cents;
    fn add(self, other: Cents) -> Cents {
        Cents(self.0.saturating_add(other.0))
    }
}

impl fmt::Display for Cents {
    /// `12.34`, `-0.05`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

/// An installation's plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Plan {
    #[default]
    Free,
    Pro,
    Agency,
}

impl Plan {
    pub const ALL: [Plan; 3] = [Plan::Free, Plan::Pro, Plan::Agency];

    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Pro => "pro",
            Plan::Agency => "agency",
        }
    }
}

/// A plan name that is not `free`, `pro` or `agency`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plan must be one of free, pro, agency")]
pub struct UnknownPlan;

impl FromStr for Plan {
    type Err = UnknownPlan;
    fn from_str(text: &str) -> Result<Plan, UnknownPlan> {
        Plan::ALL
            .into_iter()
            .find(|plan| plan.as_str() == text)
            .ok_or(UnknownPlan)
    }
}

/// The prices, converted once from the settings.
#[derive(Debug, Clone, Default)]
pub struct Pricing {
    /// `DEFAULT_COST_PER_1K_TOKENS` (0 when unset).
    default_per_1k: Micros,
    /// `MODEL_COST_OVERRIDES`, by exact model name.
    overrides: HashMap<String, Micros>,
    /// `PLAN_FREE_MONTHLY`, `PLAN_PRO_MONTHLY`, `PLAN_AGENCY_MONTHLY` (0 when unset).
    free: Micros,
    pro: Micros,
    agency: Micros,
}

/// Tokens of every kind, as events count them: cached and cache-write tokens are part of
/// the prompt, reasoning tokens part of the completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub cache_write: u64,
    pub reasoning: u64,
}

impl TokenCounts {
    /// Prompt plus completion tokens.
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// The tokens one install used of one model on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDayTokens {
    pub model: String,
    /// Days since the Unix epoch (UTC).
    pub day: i64,
    pub tokens: TokenCounts,
}

/// What an installation costs and brings in over a month, in displayed cents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bill {
    pub tokens: u64,
    pub cost: Cents,
    pub revenue: Cents,
    /// `revenue - cost` of the rounded amounts, so the shown numbers always add up.
    pub profit: Cents,
    /// Models with no price of their own, billed at the default price; sorted.
    pub unpriced_models: Vec<String>,
}

impl Pricing {
    pub fn from_settings(settings: &ReceiverSettings) -> Pricing {
        let money = |value: Option<f64>| value.map(Micros::from_units).unwrap_or_default();
        Pricing {
            default_per_1k: money(settings.default_cost_per_1k_tokens),
            overrides: settings
                .model_cost_overrides
                .iter()
                .map(|(model, price)| (model.clone(), Micros::from_units(*price)))
                .collect(),
            free: money(settings.plan_free_monthly),
            pro: money(settings.plan_pro_monthly),
            agency: money(settings.plan_agency_monthly),
        }
    }

    /// The price of 1000 tokens of `model`, and whether the model has a price of its own.
    pub fn price_per_1k(&self, model: &str) -> (Micros, bool) {
        match self.overrides.get(model) {
            Some(price) => (*price, true),
            None => (self.default_per_1k, false),
        }
    }

    /// The cost of `tokens` tokens of `model`, exact to the micro-unit (halves rounded up).
    pub fn cost(&self, model: &str, tokens: u64) -> Micros {
        let (price, _) = self.price_per_1k(model);
        let exact = i128::from(tokens) * i128::from(price.0);
        let rounded = (exact + 500) / 1000;
        Micros(i64::try_from(rounded).unwrap_or(i64::MAX))
    }

    /// A plan's monthly price.
    pub fn revenue(&self, plan: Plan) -> Micros {
        match plan {
            Plan::Free => self.free,
            Plan::Pro => self.pro,
            Plan::Agency => self.agency,
        }
    }

    /// The month's bill of an installation on `plan` that used `usage`.
    pub fn bill(&self, plan: Plan, usage: &[ModelDayTokens]) -> Bill {
        let mut cost = Micros(0);
        let mut tokens = 0u64;
        let mut unpriced_models = Vec::new();
        for usage in usage {
            let total = usage.tokens.total();
            cost = Micros(cost.0.saturating_add(self.cost(&usage.model, total).0));
            tokens = tokens.saturating_add(total);
            if !self.price_per_1k(&usage.model).1 {
                unpriced_models.push(usage.model.clone());
            }
        }
        unpriced_models.sort();
        unpriced_models.dedup();
        let cost = cost.to_cents();
        let revenue = self.revenue(plan).to_cents();
        Bill {
            tokens,
            cost,
            revenue,
            profit: revenue - cost,
            unpriced_models,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pricing() -> Pricing {
        Pricing::from_settings(&ReceiverSettings {
            default_cost_per_1k_tokens: Some(0.002),
            model_cost_overrides: [("gpt-4o".to_owned(), 0.005), ("cheap".to_owned(), 0.00015)]
                .into_iter()
                .collect(),
            plan_pro_monthly: Some(19.0),
            plan_agency_monthly: Some(99.99),
            ..ReceiverSettings::default()
        })
    }

    fn usage(model: &str, tokens: u64) -> ModelDayTokens {
        ModelDayTokens {
            model: model.into(),
            day: 0,
            tokens: TokenCounts {
                prompt: tokens,
                ..TokenCounts::default()
            },
        }
    }

    #[test]
    fn prices_convert_once_to_micro_units() {
        assert_eq!(Micros::from_units(0.002), Micros(2_000));
        assert_eq!(Micros::from_units(0.00015), Micros(150));
        assert_eq!(Micros::from_units(99.99), Micros(99_990_000));
        // 0.1 + 0.2 != 0.3 in floats; in micro-units the sum is exact.
        assert_eq!(
            Micros::from_units(0.1).0 + Micros::from_units(0.2).0,
            Micros::from_units(0.3).0
        );
    }

    #[test]
    fn costs_are_exact_per_model() {
        let p = pricing();
        // Hand-computed: tokens × price / 1000.
        let cases = [
            ("gpt-4o", 1_000, 5_000),       // 1K × 0.005 = 0.005
            ("gpt-4o", 123_456, 617_280),   // 123.456 × 0.005 = 0.61728
            ("cheap", 1, 0),                // 0.00000015 rounds to 0 micro-units
            ("cheap", 10, 2),               // 0.0000015 rounds half up to 2 micro-units
            ("cheap", 1_000_000, 150_000),  // 1000K × 0.00015 = 0.15
            ("unknown", 2_500, 5_000),      // default: 2.5 × 0.002 = 0.005
            ("GPT-4O", 1_000, 2_000),       // names match exactly: default price
            ("gpt-4o", u64::MAX, i64::MAX), // saturates instead of wrapping
        ];
        for (model, tokens, micros) in cases {
            assert_eq!(p.cost(model, tokens), Micros(micros), "{model} × {tokens}");
        }
    }

    #[test]
    fn bills_round_to_cents_and_list_unpriced_models() {
        let p = pricing();
        let bill = p.bill(
            Plan::Pro,
            &[
                usage("gpt-4o", 1_234_567), // 6.172835
                usage("cheap", 2_000_000),  // 0.30
                usage("mystery", 1_000),    // 0.002, default
                usage("another", 3_000),    // 0.006, default
            ],
        );
        // 6.172835 + 0.30 + 0.002 + 0.006 = 6.480835 → 6.48
        assert_eq!(bill.cost, Cents(648));
        assert_eq!(bill.revenue, Cents(1900));
        assert_eq!(bill.profit, Cents(1252));
        assert_eq!(bill.tokens, 3_238_567);
        assert_eq!(bill.unpriced_models, ["another", "mystery"]);

        let half_cent = p.bill(Plan::Free, &[usage("gpt-4o", 1_000)]); // 0.005 → 0.01
        assert_eq!(half_cent.cost, Cents(1));
        assert_eq!(half_cent.profit, Cents(-1));
        assert!(half_cent.unpriced_models.is_empty());

        let agency = p.bill(Plan::Agency, &[]);
        assert_eq!((agency.cost, agency.revenue), (Cents(0), Cents(9999)));
    }

    #[test]
    fn missing_prices_are_zero() {
        let p = Pricing::from_settings(&ReceiverSettings::default());
        let bill = p.bill(Plan::Pro, &[usage("m", 1_000_000)]);
        assert_eq!(
            (bill.cost, bill.revenue, bill.profit),
            (Cents(0), Cents(0), Cents(0))
        );
        assert_eq!(bill.unpriced_models, ["m"]);
    }

    #[test]
    fn cents_display_and_json() {
        assert_eq!(Cents(1252).to_string(), "12.52");
        assert_eq!(Cents(-5).to_string(), "-0.05");
        assert_eq!(Cents(0).to_string(), "0.00");
        assert_eq!(Cents(1252).to_json(), serde_json::json!(12.52));
        assert_eq!(Micros(-5_000).to_cents(), Cents(-1));
        assert_eq!(Micros(4_999).to_cents(), Cents(0));
    }

    #[test]
    fn plans_parse_by_exact_name() {
        for plan in Plan::ALL {
            assert_eq!(plan.as_str().parse::<Plan>(), Ok(plan));
        }
        assert_eq!("Pro".parse::<Plan>(), Err(UnknownPlan));
        assert_eq!("".parse::<Plan>(), Err(UnknownPlan));
        assert_eq!(Plan::default(), Plan::Free);
    }
}
