//! Per-install request rate limiting for ingest: the generic cell rate algorithm (a token
//! bucket in exact integer time) allowing bursts of up to one minute's allowance.
//!
//! Only requests whose signature verified are counted, so nobody can spend another
//! install's allowance. The clock is passed in, so tests need no sleeping.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::store::InstallKey;

/// The limiter shared by all ingest requests.
#[derive(Debug)]
pub struct RateLimiter {
    /// Time one request "costs"; `None` when limiting is off.
    interval: Option<Duration>,
    /// How far ahead of now the schedule may run: the burst allowance.
    burst: Duration,
    /// Per install, the theoretical arrival time of its next request.
    next_at: Mutex<HashMap<InstallKey, Instant>>,
}

impl RateLimiter {
    /// `per_min` requests per install per minute, in bursts of up to `per_min`;
    /// 0 turns limiting off.
    pub fn new(per_min: u32) -> RateLimiter {
        let interval = (per_min > 0).then(|| Duration::from_secs(60) / per_min);
        let burst = interval.map_or(Duration::ZERO, |i| i * per_min.saturating_sub(1));
        RateLimiter {
            interval,
            burst,
            next_at: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from the install's allowance, or says how long until one is free.
    pub fn check(&self, install: InstallKey, now: Instant) -> Result<(), Duration> {
        let Some(interval) = self.interval else {
            return Ok(());
        };
        // The map only holds plain instants, so a poisoned lock is still consistent.
        let mut next_at = self.next_at.lock().unwrap_or_else(|p| p.into_inner());
        let scheduled = next_at.get(&install).copied().unwrap_or(now).max(now);
        let ahead = scheduled.saturating_duration_since(now);
        if ahead > self.burst {
            return Err(ahead - self.burst);
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
        let limiter = RateLimiter::new(60);
        let start = Instant::now();
        for _ in 0..60 {
            assert_eq!(limiter.check(1, start), Ok(()));
        }
        let wait = limiter.check(1, start).unwrap_err();
        assert_eq!(retry_after_secs(wait), 1);
        // One request per second refills.
        assert_eq!(limiter.check(1, start + Duration::from_secs(1)), Ok(()));
        assert!(limiter.check(1, start + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn installs_have_separate_allowances() {
        let limiter = RateLimiter::new(2);
        let now = Instant::now();
        assert!(limiter.check(1, now).is_ok() && limiter.check(1, now).is_ok());
        assert!(limiter.check(1, now).is_err());
        assert!(limiter.check(2, now).is_ok());
    }

    #[test]
    fn retry_after_tells_when_a_request_is_free() {
        let limiter = RateLimiter::new(2);
        let now = Instant::now();
        limiter.check(1, now).unwrap();
        limiter.check(1, now).unwrap();
        let wait = limiter.check(1, now).unwrap_err();
        assert_eq!(retry_after_secs(wait), 30);
        assert!(limiter.check(1, now + wait).is_ok());
    }

    #[test]
    fn zero_turns_the_limit_off() {
        let limiter = RateLimiter::new(0);
        let now = Instant::now();
        assert!((0..10_000).all(|_| limiter.check(1, now).is_ok()));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}
