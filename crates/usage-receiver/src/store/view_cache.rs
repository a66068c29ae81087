//! What a receiver keeps of the views it was asked for (the installations view without a
//! period, the dashboard's periods), so that a view over a whole fleet reads the rollup
//! rows of only the installs whose usage changed since; and the fleet's figures per day
//! (the dashboard's chart), so that it reads again only the days that changed. Both stores
//! use it: a PostgreSQL node keeps its own copy (`postgres/mod.rs`, `postgres/dashboard.rs`),
//! the bundled SQLite receiver its one (`sqlite/views.rs`).
//!
//! Exact whatever else writes to the database: each install's figures are kept with the
//! `usage_version` of the install they were read with, in the same snapshot, and every
//! write that changes an install's rollup rows (ingest, erasure) bumps that version in the
//! same transaction. A view reads every install's version (with its plan, label and
//! budget, which are never kept), takes the figures whose version is unchanged and reads
//! the others again. Another window (a new day) or other prices (another price book) is
//! another view. A day's figures are kept with the day's stamp (on PostgreSQL its totals
//! in `daily_totals`, on SQLite its version in `day_versions`), which the same writes move.
//!
//! On PostgreSQL only the ingest statement and erasure change usage, and both keep the
//! version (nodes of older releases are refused: migration 5); on SQLite the store's own
//! writer is the only one (migration 9). A rollup row changed by hand in SQL without
//! bumping the install's version shows once the view is read whole again (a new day, other
//! prices, a third of the installs changed, or a restart).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Mutex;

use super::{InstallKey, UsageWindow};
use crate::billing::pricing::PricedUsage;

/// How many views a node keeps (LRU): the installations view without a period, the
/// dashboard's three periods and the previous period of each, which its change column
/// compares with (all seven prepared every minute), and one more period a provider asked
/// for.
const VIEWS_KEPT: usize = 8;

/// Which view: its days and the identity of the prices it was costed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ViewKey {
    pub window: UsageWindow,
    pub prices: u64,
}

/// One install's figures in a view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct InstallFigures {
    /// Over the counted days.
    pub events_30d: u64,
    pub tokens_30d: u64,
    /// Over the priced days.
    pub priced: PricedUsage,
}

struct Kept {
    usage_version: i64,
    figures: InstallFigures,
}

struct KeptView {
    key: ViewKey,
    installs: HashMap<InstallKey, Kept>,
}

/// The views a node keeps, most recently used last.
#[derive(Default)]
pub(super) struct ViewCache {
    views: Mutex<Vec<KeptView>>,
}

/// What a view can take from the cache.
pub(super) struct Lookup {
    /// For each install asked about, in order: its kept figures, or `None` when they must
    /// be read again.
    pub figures: Vec<Option<InstallFigures>>,
    /// The installs to read again.
    pub stale: Vec<InstallKey>,
    /// How many installs the view keeps that were not asked about (erased since).
    pub gone: usize,
}

impl Lookup {
    /// Whether taking what is kept is worth it for a view of `installs` installs: reading
    /// again a third of them costs about what reading them all does.
    pub fn worth_taking(&self, installs: usize) -> bool {
        self.stale.len() * 3 <= installs && self.gone * 3 <= installs
    }
}

impl ViewCache {
    /// The kept figures of `installs` (key, usage version) in view `key`, or `None` when
    /// the node keeps no such view.
    pub fn lookup(
        &self,
        key: ViewKey,
        installs: impl ExactSizeIterator<Item = (InstallKey, i64)>,
    ) -> Option<Lookup> {
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        let at = views.iter().position(|view| view.key == key)?;
        // Most recently used last.
        let view = views.remove(at);
        let mut lookup = Lookup {
            figures: Vec::with_capacity(installs.len()),
            stale: Vec::new(),
            gone: 0,
        };
        let mut found = 0;
        for (install, version) in installs {
            match view.installs.get(&install) {
                Some(kept) if kept.usage_version == version => {
                    found += 1;
                    lookup.figures.push(Some(kept.figures.clone()));
                }
                other => {
                    found += usize::from(other.is_some());
                    lookup.figures.push(None);
                    lookup.stale.push(install);
                }
            }
        }
        lookup.gone = view.installs.len() - found;
        views.push(view);
        Some(lookup)
    }

    /// Keeps figures read at the given usage versions in view `key`; `whole`: they are
    /// every install there is, so the view is made anew from them alone.
    pub fn keep(
        &self,
        key: ViewKey,
        figures: impl IntoIterator<Item = (InstallKey, i64, InstallFigures)>,
        whole: bool,
    ) {
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        let mut view = match views.iter().position(|view| view.key == key) {
            Some(at) if !whole => views.remove(at),
            Some(at) => {
                views.remove(at);
                KeptView {
                    key,
                    installs: HashMap::new(),
                }
            }
            // A view made by reading everything, or none at all: parts of a view that
            // another request dropped meanwhile are not worth keeping.
            None if whole => KeptView {
                key,
                installs: HashMap::new(),
            },
            None => return,
        };
        for (install, usage_version, figures) in figures {
            let kept = Kept {
                usage_version,
                figures,
            };
            // Versions only grow: a slower request's older read never replaces a newer one.
            match view.installs.entry(install) {
                Entry::Occupied(mut old) if old.get().usage_version < usage_version => {
                    old.insert(kept);
                }
                Entry::Occupied(_) => {}
                Entry::Vacant(slot) => {
                    slot.insert(kept);
                }
            }
        }
        views.push(view);
        if views.len() > VIEWS_KEPT {
            views.remove(0);
        }
    }
}

/// How many days a node keeps of the fleet's figures: the longest period and a little more.
const DAYS_KEPT: usize = 800;

/// The fleet's figures per day (`T`: what the dashboard's chart needs of the day), each
/// kept with the stamp `S` of the day it was read at; a handful of kilobytes per day
/// whatever the fleet's size.
pub(super) struct DayCache<S, T> {
    days: Mutex<HashMap<i64, (S, T)>>,
}

impl<S, T> Default for DayCache<S, T> {
    fn default() -> Self {
        DayCache {
            days: Mutex::new(HashMap::new()),
        }
    }
}

impl<S: PartialEq, T: Clone> DayCache<S, T> {
    /// For each of `days` (day, its stamp now), in order: its kept figures, or `None` when
    /// they must be read again.
    pub fn lookup<'a>(&self, days: impl IntoIterator<Item = (i64, &'a S)>) -> Vec<Option<T>>
    where
        S: 'a,
    {
        let kept = self.days.lock().unwrap_or_else(|e| e.into_inner());
        days.into_iter()
            .map(|(day, stamp)| match kept.get(&day) {
                Some((at, figures)) if at == stamp => Some(figures.clone()),
                _ => None,
            })
            .collect()
    }

    /// Keeps each day's figures read at its stamp.
    pub fn keep(&self, days: impl IntoIterator<Item = (i64, S, T)>) {
        let mut kept = self.days.lock().unwrap_or_else(|e| e.into_inner());
        for (day, stamp, figures) in days {
            kept.insert(day, (stamp, figures));
        }
        if kept.len() > DAYS_KEPT {
            // The oldest days go first: periods are asked for recent days far more.
            let mut held: Vec<i64> = kept.keys().copied().collect();
            held.sort_unstable();
            for day in &held[..held.len() - DAYS_KEPT] {
                kept.remove(day);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::money::Micros;

    fn key(today: i64, prices: u64) -> ViewKey {
        ViewKey {
            window: UsageWindow {
                today,
                from_30d: today - 29,
                month_start: today - 3,
            },
            prices,
        }
    }

    fn figures(cost: i64) -> InstallFigures {
        InstallFigures {
            events_30d: 1,
            tokens_30d: 2,
            priced: PricedUsage {
                tokens: 2,
                cost: Micros(cost),
                unpriced_models: Vec::new(),
            },
        }
    }

    #[test]
    fn figures_are_taken_only_at_the_version_they_were_read_at() {
        let cache = ViewCache::default();
        let view = key(100, 7);
        assert!(cache.lookup(view, [(1, 0)].into_iter()).is_none());
        cache.keep(view, [(1, 3, figures(10)), (2, 5, figures(20))], true);

        let lookup = cache
            .lookup(view, [(1, 3), (2, 6), (3, 0)].into_iter())
            .unwrap();
        assert_eq!(lookup.figures, [Some(figures(10)), None, None]);
        assert_eq!(lookup.stale, [2, 3]);
        assert_eq!(lookup.gone, 0);

        // Another day or other prices is another view.
        assert!(cache.lookup(key(101, 7), [(1, 3)].into_iter()).is_none());
        assert!(cache.lookup(key(100, 8), [(1, 3)].into_iter()).is_none());

        // Install 1 erased: the view still keeps it, and says so.
        let lookup = cache.lookup(view, [(2, 5)].into_iter()).unwrap();
        assert_eq!(lookup.gone, 1);
    }

    #[test]
    fn an_older_read_never_replaces_a_newer_one_and_whole_views_start_afresh() {
        let cache = ViewCache::default();
        let view = key(100, 7);
        cache.keep(view, [(1, 3, figures(10))], true);
        cache.keep(view, [(1, 4, figures(11))], false);
        cache.keep(view, [(1, 2, figures(9))], false);
        let lookup = cache.lookup(view, [(1, 4)].into_iter()).unwrap();
        assert_eq!(lookup.figures, [Some(figures(11))]);

        cache.keep(view, [(2, 1, figures(5))], true);
        let lookup = cache.lookup(view, [(1, 4), (2, 1)].into_iter()).unwrap();
        assert_eq!(lookup.figures, [None, Some(figures(5))]);
    }

    #[test]
    fn days_are_taken_at_their_stamp_and_the_oldest_go_first() {
        let cache: DayCache<i64, &str> = DayCache::default();
        cache.keep([(10, 1, "ten"), (11, 1, "eleven")]);
        assert_eq!(
            cache.lookup([(10, &1), (11, &2), (12, &1)]),
            [Some("ten"), None, None]
        );
        cache.keep((100..100 + DAYS_KEPT as i64).map(|day| (day, 0, "later")));
        assert_eq!(cache.lookup([(10, &1), (11, &1)]), [None, None]);
        assert_eq!(cache.lookup([(100, &0)]), [Some("later")]);
    }

    #[test]
    fn parts_of_a_view_no_longer_kept_are_dropped_and_few_views_are_kept() {
        let cache = ViewCache::default();
        cache.keep(key(1, 0), [(1, 1, figures(1))], false);
        assert!(cache.lookup(key(1, 0), [(1, 1)].into_iter()).is_none());

        for today in 0..=VIEWS_KEPT as i64 {
            cache.keep(key(today, 0), [(1, 1, figures(today))], true);
        }
        // The least recently used went.
        assert!(cache.lookup(key(0, 0), [(1, 1)].into_iter()).is_none());
        assert!(cache.lookup(key(1, 0), [(1, 1)].into_iter()).is_some());
        // Looking it up made view 1 the most recently used: view 2 goes next.
        cache.keep(key(50, 0), [(1, 1, figures(50))], true);
        assert!(cache.lookup(key(2, 0), [(1, 1)].into_iter()).is_none());
        assert!(cache.lookup(key(1, 0), [(1, 1)].into_iter()).is_some());
    }
}
