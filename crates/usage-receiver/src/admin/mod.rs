//! What the provider changes: an install's plan, label and erasure ([`installs`]) and its
//! budget ([`budget`]).
//!
//! **Invariant:** the only handlers that change an install; they never read usage or
//! cost (that is [`crate::views`]'s) and never speak SQL (that is [`crate::store`]'s).

pub mod budget;
pub mod installs;
