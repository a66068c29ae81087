//! What every handler shares about HTTP: the error answer ([`error`]), CSV answers
//! ([`csv`]), the provider's basic auth, the enrollment token and the throttle of failed
//! credentials ([`auth`]), and clipping request values before they are logged ([`clip`]).
//!
//! **Invariant:** knows no handler; handlers import it, never the other way.

pub mod auth;
pub mod clip;
pub mod csv;
pub mod error;
