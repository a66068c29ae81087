//! Throttling of failed credentials per client address: after [`MAX_FAILURES`]
//! failed attempts within [`WINDOW`] from one address, that address is refused until its
//! window ends, even when it then sends the right credentials, so guessing the provider's
//! password or the enrollment token costs an attacker a minute per twenty guesses.
//!
//! A window opens at an address's first failure and lasts [`WINDOW`]; a failure after it
//! ends opens a new one. The table lives in memory and holds at most [`MAX_ADDRESSES`]
//! addresses: when full, expired windows go first, then the oldest quarter, so a flood of
//! addresses costs bounded memory and the eviction work is paid once per many new entries.
//!
//! One table counts one kind of credential: a server keeps one per kind, so a flood of
//! failures at one (a provider password guessed behind a shared address) never blocks
//! the other (an agent's enrollment). The table is one process's: each receiver node of a
//! fleet counts its own failures.
//!
//! This type only counts; each server decides what is a failure (a refused credential
//! that was presented, see [`super::presented`]) and answers `429`. The receiver does not
//! count signature failures at ingest: they come from agents that are not enrolled yet,
//! which may share an address on shared hosting. The clock is passed in, so tests need
//! no sleeping.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed attempts allowed from one address within one [`WINDOW`].
pub const MAX_FAILURES: u32 = 20;
/// How long failures count against an address.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at once.
pub const MAX_ADDRESSES: usize = 10_000;

/// Failure counts per client address.
#[derive(Debug)]
pub struct FailureThrottle {
    max_failures: u32,
    window: Duration,
    capacity: usize,
    windows: Mutex<HashMap<IpAddr, Window>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

impl Default for FailureThrottle {
    /// The servers' throttle: [`MAX_FAILURES`] per [`WINDOW`], [`MAX_ADDRESSES`] remembered.
    fn default() -> FailureThrottle {
        FailureThrottle::new(MAX_FAILURES, WINDOW, MAX_ADDRESSES)
    }
}

impl FailureThrottle {
    /// Blocks an address after `max_failures` failures within `window`, remembering at most
    /// `capacity` addresses (at least 1).
    pub fn new(max_failures: u32, window: Duration, capacity: usize) -> FailureThrottle {
        FailureThrottle {
            max_failures,
            window,
            capacity: capacity.max(1),
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `addr` may try credentials at `now`; if not, how long until its window ends.
    pub fn check(&self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        let windows = self.windows();
        match windows.get(&addr.to_canonical()) {
            Some(window) if window.failures >= self.max_failures => {
                let elapsed = now.saturating_duration_since(window.started);
                match self.window.checked_sub(elapsed) {
                    Some(left) if !left.is_zero() => Err(left),
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// Counts one failed attempt from `addr` at `now`.
    pub fn record_failure(&self, addr: IpAddr, now: Instant) {
        let addr = addr.to_canonical();
        let mut windows = self.windows();
        if let Some(window) = windows.get_mut(&addr) {
            if self.is_open(window, now) {
                window.failures = window.failures.saturating_add(1);
            } else {
                *window = Window {
                    started: now,
                    failures: 1,
                };
            }
            return;
        }
        if windows.len() >= self.capacity {
            self.evict(&mut windows, now);
        }
        windows.insert(
            addr,
            Window {
                started: now,
                failures: 1,
            },
        );
    }

    /// How many addresses are remembered.
    pub fn len(&self) -> usize {
        self.windows().len()
    }

    /// Whether no address is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn is_open(&self, window: &Window, now: Instant) -> bool {
        now.saturating_duration_since(window.started) < self.window
    }

    /// Makes room for one address: expired windows first (they no longer block anyone),
    /// then, if the table is still full, the oldest quarter.
    fn evict(&self, windows: &mut HashMap<IpAddr, Window>, now: Instant) {
        windows.retain(|_, window| self.is_open(window, now));
        if windows.len() < self.capacity {
            return;
        }
        let mut starts: Vec<Instant> = windows.values().map(|w| w.started).collect();
        let cut = starts.len() / 4;
        let (_, &mut newest_evicted, _) = starts.select_nth_unstable(cut);
        // Removes at least the oldest entry, since `newest_evicted` is at least as new.
        windows.retain(|_, window| window.started > newest_evicted);
    }

    fn windows(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Window>> {
        // The map holds plain counts and instants, so a poisoned lock is still consistent.
        self.windows.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn twenty_failures_block_the_address_until_the_window_ends() {
        let throttle = FailureThrottle::default();
        let start = Instant::now();
        let a = ip("192.0.2.1");
        for second in 0..20 {
            let now = start + Duration::from_secs(second);
            assert_eq!(throttle.check(a, now), Ok(()), "attempt {}", second + 1);
            throttle.record_failure(a, now);
        }
        // The window opened at the first failure, so 41 s of it are left at 19 s.
        let at = start + Duration::from_secs(19);
        assert_eq!(throttle.check(a, at), Err(Duration::from_secs(41)));
        assert_eq!(
            throttle.check(a, start + Duration::from_millis(59_999)),
            Err(Duration::from_millis(1))
        );
        assert_eq!(throttle.check(a, start + WINDOW), Ok(()));
        // A failure after the window opens a fresh one with a single failure.
        throttle.record_failure(a, start + WINDOW);
        assert_eq!(throttle.check(a, start + WINDOW), Ok(()));
    }

    #[test]
    fn failures_of_one_address_do_not_block_another() {
        let throttle = FailureThrottle::default();
        let now = Instant::now();
        for _ in 0..20 {
            throttle.record_failure(ip("192.0.2.1"), now);
        }
        assert!(throttle.check(ip("192.0.2.1"), now).is_err());
        assert_eq!(throttle.check(ip("192.0.2.2"), now), Ok(()));
        assert_eq!(throttle.check(ip("2001:db8::1"), now), Ok(()));
    }

    #[test]
    fn an_ipv4_mapped_ipv6_address_counts_as_the_ipv4_address() {
        let throttle = FailureThrottle::new(2, WINDOW, 10);
        let now = Instant::now();
        throttle.record_failure(ip("192.0.2.1"), now);
        throttle.record_failure(ip("::ffff:192.0.2.1"), now);
        assert!(throttle.check(ip("192.0.2.1"), now).is_err());
    }

    #[test]
    fn failures_spread_over_more_than_a_window_never_block() {
        let throttle = FailureThrottle::default();
        let start = Instant::now();
        let a = ip("192.0.2.1");
        for minute in 0..10 {
            for second in 0..19 {
                let now = start + WINDOW * minute + Duration::from_secs(second);
                assert_eq!(throttle.check(a, now), Ok(()));
                throttle.record_failure(a, now);
            }
        }
    }

    #[test]
    fn a_flood_of_addresses_stays_within_the_capacity() {
        let throttle = FailureThrottle::new(20, WINDOW, 100);
        let start = Instant::now();
        for n in 0..10_000u32 {
            let now = start + Duration::from_millis(u64::from(n));
            throttle.record_failure(IpAddr::from(n.to_be_bytes()), now);
            assert!(
                throttle.len() <= 100,
                "{} addresses after {n}",
                throttle.len()
            );
        }
        // The newest address is still counted.
        let newest = IpAddr::from(9_999u32.to_be_bytes());
        for _ in 0..19 {
            throttle.record_failure(newest, start + Duration::from_secs(10));
        }
        assert!(
            throttle
                .check(newest, start + Duration::from_secs(10))
                .is_err()
        );
    }

    #[test]
    fn expired_windows_are_evicted_before_live_ones() {
        let throttle = FailureThrottle::new(1, WINDOW, 2);
        let start = Instant::now();
        throttle.record_failure(ip("192.0.2.1"), start);
        throttle.record_failure(ip("192.0.2.2"), start + Duration::from_secs(30));
        let later = start + Duration::from_secs(61);
        throttle.record_failure(ip("192.0.2.3"), later);
        assert_eq!(throttle.len(), 2);
        // .2 was still inside its window, so it is still blocked.
        assert!(throttle.check(ip("192.0.2.2"), later).is_err());
        assert!(throttle.check(ip("192.0.2.3"), later).is_err());
    }
}
