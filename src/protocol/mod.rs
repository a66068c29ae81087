//! What the agent and the backend share (SPEC 5): the wire types and their per-event
//! rules ([`wire`]) and the Standard Webhooks signing ([`signing`]).
//!
//! **Invariant:** no I/O and no state; this module imports nothing of the crate but
//! [`crate::event`]'s pure rules, so both sides can depend on it without depending on
//! each other.

pub mod signing;
pub mod wire;
