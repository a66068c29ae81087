//! Money: amounts in micro-units and cents ([`money`]), the arithmetic of costs, revenue
//! and profit ([`pricing`]) and the price book that prices each token kind by model and date
//! ([`price_book`]).
//!
//! **Invariant:** pure arithmetic and parsing; no I/O but reading a price book file.

pub mod money;
pub mod price_book;
pub mod pricing;
