//! What the usage agent and its backend share: the event and its field rules ([`event`]),
//! the wire types of a batch and their per-event rules ([`wire`]), and the Standard
//! Webhooks signing of a batch ([`signing`]).
//!
//! **Invariant:** no I/O and no state, so both sides can depend on it without depending on
//! each other.

pub mod event;
pub mod signing;
pub mod wire;
