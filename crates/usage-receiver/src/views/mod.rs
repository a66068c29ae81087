//! What the provider reads: usage summaries and raw events ([`usage`]), installations
//! with cost, revenue and profit ([`installations`], one row per install in [`rows`]), the
//! price book in force ([`prices`]), the alerts ([`alerts`]), the HTML dashboard
//! ([`dashboard`]) and the node's metrics ([`metrics`]); [`query`] reads what a view asks (dates, period, sort, page).
//!
//! **Invariant:** reads only; every change to an install is [`crate::admin`]'s.

pub mod alerts;
pub mod dashboard;
pub mod installations;
pub mod metrics;
pub mod prices;
pub mod query;
pub mod rows;
pub mod usage;
