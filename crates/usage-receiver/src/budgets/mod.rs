//! Budgets and their alerts: the rules of a budget and the check after each batch
//! ([`rules`]), and delivering recorded alerts to the webhook ([`delivery`]).
//!
//! No route is answered here: setting a budget is [`crate::admin::budget`]'s and listing
//! alerts [`crate::views::alerts`]'s.

pub mod delivery;
pub mod rules;
