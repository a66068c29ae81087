//! Per-install request rate limiting for ingest: the generic cell rate algorithm (a token
//! bucket in exact integer time) allowing bursts of up to one minute's allowance.
//!
//! Only requests whose signature verified are counted, so nobody can spend another
//! install's allowance. The clock is passed in, so tests need no sleeping.
//!
//! This is the allowance of a single node (the SQLite store's). Nodes sharing PostgreSQL
//! keep the same schedule in a table instead, so the limit holds across them:
//! [`crate::store::ReceiverStore::take_request`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::InstallKey;

/// `per_min` requests per install per minute, in bursts of up to `per_min`; 0 means no
/// limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_min: u32,
}

impl Rate {
    /// Time one request "costs"; `None` when limiting is off.
    pub fn interval(self) -> Option<Duration> {
        (self.per_min > 0).then(|| Duration::from_secs(60) / self.per_min)
    }

    /// How far ahead of now the schedule may run: the burst allowance.
    pub fn burst(self) -> Duration {
        self.interval()
            .map_or(Duration::ZERO, |i| i * self.per_min.saturating_sub(1))
    }
}

/// One node's allowances, in memory.
#[derive(Debug, Default)]
pub struct RateLimiter {
    /// Per install, the theoretical arrival time of its next request.
    next_at: Mutex<HashMap<InstallKey, Instant>>,
}

impl RateLimiter {
    /// Takes one request from the install's allowance, or says how long until one is free.
    pub fn check(&self, install: InstallKey, rate: Rate, now: Instant) -> Result<(), Duration> {
        let Some(interval) = rate.interval() else {
            return Ok(());
        };
        // The map only holds plain instants, so a poisoned lock is still consistent.
        let mut next_at = self.next_at.lock().unwrap_or_else(|p| p.into_inner());
        let scheduled = next_at.get(&install).copied().unwrap_or(now).max(now);
        let ahead = scheduled.saturating_duration_since(now);
        if ahead > rate.burst() {
            return Err(ahead - rate.burst());
        }
        next_at.insert(install, scheduled + interval);
        Ok(())
    }
}

/// Whole seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_minute_of_requests_may_come_at_once_then_one_per_interval() {
        let limiter = RateLimiter::default();
        let rate = Rate { per_min: 60 };
        let start = Instant::now();
        for _ in 0..60 {
            assert_eq!(limiter.check(1, rate, start), Ok(()));
        }
        let wait = limiter.check(1, rate, start).unwrap_err();
        assert_eq!(retry_after_secs(wait), 1);
        // One request per second refills.
        assert_eq!(
            limiter.check(1, rate, start + Duration::from_secs(1)),
            Ok(())
        );
        assert!(
            limiter
                .check(1, rate, start + Duration::from_secs(1))
                .is_err()
        );
    }

    #[test]
    fn installs_have_separate_allowances() {
        let limiter = RateLimiter::default();
        let rate = Rate { per_min: 2 };
        let now = Instant::now();
        assert!(limiter.check(1, rate, now).is_ok() && limiter.check(1, rate, now).is_ok());
        assert!(limiter.check(1, rate, now).is_err());
        assert!(limiter.check(2, rate, now).is_ok());
    }

    #[test]
    fn retry_after_tells_when_a_request_is_free() {
        let limiter = RateLimiter::default();
        let rate = Rate { per_min: 2 };
        let now = Instant::now();
        limiter.check(1, rate, now).unwrap();
        limiter.check(1, rate, now).unwrap();
        let wait = limiter.check(1, rate, now).unwrap_err();
        assert_eq!(retry_after_secs(wait), 30);
        assert!(limiter.check(1, rate, now + wait).is_ok());
    }

    #[test]
    fn zero_turns_the_limit_off() {
        let limiter = RateLimiter::default();
        let rate = Rate { per_min: 0 };
        let now = Instant::now();
        assert!((0..10_000).all(|_| limiter.check(1, rate, now).is_ok()));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}
