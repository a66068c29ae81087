//! Amounts of money: [`Micros`] (millionths of a currency unit), in which every price and
//! cost is summed exactly, and [`Cents`], to which a figure is rounded once, to be shown.

use std::fmt;

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
        serde_json::Value::from(self.as_units())
    }

    /// The amount in currency units, as JSON shows it.
    pub fn as_units(self) -> f64 {
        // Exact for any amount below 2^53 cents; the division by 100 only places the point.
        self.0 as f64 / 100.0
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
