//! What agents send: signed batches of events ([`batch`]) and enrollment ([`enroll`]).

pub mod batch;
pub mod enroll;
