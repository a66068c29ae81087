//! Throttling of failed bearer tokens on the loopback TCP listener (SPEC 10): after
//! [`MAX_FAILURES`] failures within [`WINDOW`] from one client address, that address is
//! refused until the oldest of those failures is a window old, whatever token it sends.
//!
//! Kept in memory and bounded: at most [`MAX_ADDRESSES`] addresses, each with at most
//! [`MAX_FAILURES`] failure times. The clock is a parameter, so tests never sleep. This
//! module knows nothing about HTTP.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures from one address that close it for the rest of the window.
pub const MAX_FAILURES: usize = 20;
/// How far back failures count.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at once; past that, the address whose last failure is oldest is
/// forgotten, so a flood of addresses cannot grow the table.
pub const MAX_ADDRESSES: usize = 4096;

/// Failure times per client address.
#[derive(Debug, Default)]
pub struct Throttle {
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl Throttle {
    /// `Err(retry_after)` while `addr` has [`MAX_FAILURES`] failures within the window
    /// before `now`.
    pub fn check(&self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match failures.get(&addr) {
            Some(times) if times.len() >= MAX_FAILURES => {
                let oldest = times.front().expect("a full list has a first entry");
                let reopens = *oldest + WINDOW;
                if now < reopens {
                    Err(reopens - now)
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// Counts one failure from `addr` at `now`.
    pub fn record_failure(&self, addr: IpAddr, now: Instant) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if !failures.contains_key(&addr) && failures.len() >= MAX_ADDRESSES {
            make_room(&mut failures, now);
        }
        let times = failures.entry(addr).or_default();
        while times
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW)
        {
            times.pop_front();
        }
        if times.len() == MAX_FAILURES {
            times.pop_front();
        }
        times.push_back(now);
    }

    /// Addresses tracked now (for tests of the bound).
    pub fn tracked(&self) -> usize {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// Drops every address whose failures have all left the window, and if none has, the
/// address whose last failure is oldest.
fn make_room(failures: &mut HashMap<IpAddr, VecDeque<Instant>>, now: Instant) {
    failures.retain(|_, times| {
        times
            .back()
            .is_some_and(|t| now.saturating_duration_since(*t) < WINDOW)
    });
    if failures.len() >= MAX_ADDRESSES {
        let stalest = failures
            .iter()
            .min_by_key(|(_, times)| times.back().copied())
            .map(|(addr, _)| *addr);
        if let Some(addr) = stalest {
            failures.remove(&addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    fn fail(throttle: &Throttle, addr: IpAddr, at: Instant, times: usize) {
        for _ in 0..times {
            throttle.record_failure(addr, at);
        }
    }

    #[test]
    fn nineteen_failures_leave_the_address_open_and_the_twentieth_closes_it() {
        let throttle = Throttle::default();
        let t0 = Instant::now();
        fail(&throttle, ip(1), t0, MAX_FAILURES - 1);
        assert_eq!(throttle.check(ip(1), t0), Ok(()));
        throttle.record_failure(ip(1), t0 + Duration::from_secs(10));
        assert_eq!(
            throttle.check(ip(1), t0 + Duration::from_secs(15)),
            Err(Duration::from_secs(45))
        );
    }

    #[test]
    fn a_closed_address_reopens_when_its_oldest_failure_leaves_the_window() {
        let throttle = Throttle::default();
        let t0 = Instant::now();
        fail(&throttle, ip(1), t0, MAX_FAILURES);
        assert!(
            throttle
                .check(ip(1), t0 + WINDOW - Duration::from_millis(1))
                .is_err()
        );
        assert_eq!(throttle.check(ip(1), t0 + WINDOW), Ok(()));
    }

    #[test]
    fn failures_spread_over_more_than_a_window_never_close_the_address() {
        let throttle = Throttle::default();
        let t0 = Instant::now();
        // One failure every 4 s: never more than 15 within a minute.
        for i in 0..100u64 {
            let at = t0 + Duration::from_secs(4 * i);
            throttle.record_failure(ip(1), at);
            assert_eq!(throttle.check(ip(1), at), Ok(()), "after failure {i}");
        }
    }

    #[test]
    fn one_address_failing_does_not_close_another() {
        let throttle = Throttle::default();
        let t0 = Instant::now();
        fail(&throttle, ip(1), t0, MAX_FAILURES);
        assert!(throttle.check(ip(1), t0).is_err());
        assert_eq!(throttle.check(ip(2), t0), Ok(()));
    }

    #[test]
    fn the_table_stays_bounded_and_forgets_the_stalest_address_first() {
        let throttle = Throttle::default();
        let t0 = Instant::now();
        fail(&throttle, ip(1), t0, MAX_FAILURES);
        let later = t0 + Duration::from_secs(1);
        for n in 0..MAX_ADDRESSES as u32 + 10 {
            let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n));
            throttle.record_failure(addr, later);
        }
        assert_eq!(throttle.tracked(), MAX_ADDRESSES);
        // The address that failed first was the one forgotten.
        assert_eq!(throttle.check(ip(1), later), Ok(()));
    }

    #[test]
    fn addresses_whose_failures_expired_are_dropped_before_any_recent_one() {
        let throttle = Throttle::default();
        let t0 = Instant::now();
        for n in 0..MAX_ADDRESSES as u32 {
            throttle.record_failure(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), t0);
        }
        let later = t0 + WINDOW;
        fail(&throttle, ip(1), later, MAX_FAILURES);
        assert_eq!(throttle.tracked(), 1);
        assert!(throttle.check(ip(1), later).is_err());
    }
}
