//! Budgets and their alerts: the rules of a budget and the check after each batch
//! ([`rules`]), and delivering recorded alerts to the webhook ([`delivery`]).

pub mod delivery;
pub mod rules;
