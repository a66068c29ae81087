//! What the provider changes: an install's plan, label and erasure ([`installs`]) and its
//! budget ([`budget`]).

pub mod budget;
pub mod installs;
