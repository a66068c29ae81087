//! The cap on distinct models per install and UTC day ([`MAX_MODELS_PER_DAY`]): an agent
//! with a valid secret cannot grow the rollups, the unpriced models and every view
//! without limit by naming a new model in each event.
//!
//! The store's daily rollup is the record of the models an install used on a day, so the
//! cap holds across every node sharing a database and counts a model once whichever node
//! stored it. A node remembers the models it knows to be stored ([`KnownModels`]): a
//! batch whose models it knows costs no query; one with a model it does not know reads
//! that day's models from the store first. A remembered model is one the store had, and
//! a day's models only grow, so what a node remembers never refuses a model the cap
//! allows.
//!
//! Batches of one install stored at the same instant by two nodes are each checked against
//! the models stored before them, so together they may pass the cap by their own new
//! models; an agent sends its batches one after another.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crate::days::{day_of_ms, day_text};
use crate::store::{InstallKey, NewEvent};

/// Most distinct models one install may use on one UTC day. Far more than any site uses
/// (a handful of models a day), and few enough that no install can grow the views.
pub const MAX_MODELS_PER_DAY: usize = 200;

/// Most (install, day, model) entries a node remembers; past that it forgets them all
/// and reads them again as batches come, so its memory stays bounded.
const MAX_REMEMBERED: usize = 250_000;

/// An event refused by the cap, and why (`model: ...`, as per-event rules read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub event_id: uuid::Uuid,
    pub reason: String,
}

/// The models a node knows to be stored, per install and day.
#[derive(Default)]
pub struct KnownModels {
    known: Mutex<Remembered>,
}

#[derive(Default)]
struct Remembered {
    days: HashMap<(InstallKey, i64), HashSet<String>>,
    entries: usize,
}

impl Remembered {
    fn learn(&mut self, install: InstallKey, pairs: Vec<(i64, String)>) {
        // Forgotten before, never while, learning: what was just read stays remembered.
        if self.entries + pairs.len() > MAX_REMEMBERED {
            self.days.clear();
            self.entries = 0;
        }
        for (day, model) in pairs {
            if self.days.entry((install, day)).or_default().insert(model) {
                self.entries += 1;
            }
        }
    }
}

impl KnownModels {
    /// The days of `events` with a model this node does not know to be stored for
    /// `install`: the days to read from the store before [`KnownModels::admit`].
    pub fn days_to_read(&self, install: InstallKey, events: &[NewEvent]) -> Vec<i64> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let mut days: Vec<i64> = events
            .iter()
            .map(|event| (day_of_ms(event.created_at_ms), event.model.as_str()))
            .filter(|(day, model)| {
                !known
                    .days
                    .get(&(install, *day))
                    .is_some_and(|models| models.contains(*model))
            })
            .map(|(day, _)| day)
            .collect();
        days.sort_unstable();
        days.dedup();
        days
    }

    /// Remembers `(day, model)` pairs stored for `install`.
    pub fn learn(&self, install: InstallKey, pairs: Vec<(i64, String)>) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.learn(install, pairs);
    }

    /// Splits `events` of `install` into those the cap admits and those it refuses: an
    /// event of a model already stored that day, or among the first new ones that keep
    /// the day within [`MAX_MODELS_PER_DAY`], is admitted. `stored`: the models the store
    /// has on the days of [`KnownModels::days_to_read`], read just before.
    pub fn admit(
        &self,
        install: InstallKey,
        events: Vec<NewEvent>,
        stored: Vec<(i64, String)>,
    ) -> (Vec<NewEvent>, Vec<Refused>) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.learn(install, stored);
        let mut added: HashMap<i64, HashSet<String>> = HashMap::new();
        let mut admitted = Vec::with_capacity(events.len());
        let mut refused = Vec::new();
        for event in events {
            let day = day_of_ms(event.created_at_ms);
            let stored = known.days.get(&(install, day));
            let new = added.entry(day).or_default();
            let counted = stored.is_some_and(|models| models.contains(&event.model))
                || new.contains(&event.model);
            if counted {
                admitted.push(event);
                continue;
            }
            let used = stored.map_or(0, HashSet::len) + new.len();
            if used < MAX_MODELS_PER_DAY {
                new.insert(event.model.clone());
                admitted.push(event);
            } else {
                refused.push(Refused {
                    event_id: event.event_id,
                    reason: format!(
                        "model: this install already used {MAX_MODELS_PER_DAY} models on {} \
                         (UTC), the most one install may use in a day",
                        day_text(day)
                    ),
                });
            }
        }
        (admitted, refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::days::MS_PER_DAY;
    use usage_protocol::event::Source;

    fn event(model: &str, day: i64) -> NewEvent {
        NewEvent {
            event_id: uuid::Uuid::new_v4(),
            user_hash: [0; 32],
            source: Source::Inline,
            model: model.into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            cached_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            origin: None,
            context: None,
            created_at_ms: day * MS_PER_DAY + 1000,
        }
    }

    #[test]
    fn new_models_past_the_cap_are_refused_known_ones_and_other_days_are_not() {
        let known = KnownModels::default();
        let stored: Vec<_> = (0..MAX_MODELS_PER_DAY - 1)
            .map(|n| (10, format!("m{n}")))
            .collect();
        known.learn(1, stored);
        let events = vec![
            event("m3", 10),
            event("new-a", 10),
            event("new-a", 10),
            event("new-b", 10),
            event("new-b", 11),
        ];
        let refused_id = events[3].event_id;
        assert!(known.days_to_read(1, &events[..1]).is_empty());
        assert_eq!(known.days_to_read(1, &events), [10, 11]);
        let (admitted, refused) = known.admit(1, events, Vec::new());
        assert_eq!(admitted.len(), 4);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].event_id, refused_id);
        assert!(refused[0].reason.starts_with("model: "), "{:?}", refused[0]);
        assert!(refused[0].reason.contains("1970-01-11"), "{:?}", refused[0]);
        // Another install counts its own models.
        let (admitted, refused) = known.admit(2, vec![event("new-b", 10)], Vec::new());
        assert_eq!((admitted.len(), refused.len()), (1, 0));
        // What the store has counts as well as what the node knew.
        let stored_elsewhere = vec![(10, "other-node".to_owned())];
        let (admitted, refused) = known.admit(1, vec![event("new-c", 10)], stored_elsewhere);
        assert_eq!((admitted.len(), refused.len()), (0, 1));
    }

    #[test]
    fn a_node_forgets_everything_past_its_bound() {
        let known = KnownModels::default();
        known.learn(
            1,
            (0..MAX_REMEMBERED as i64)
                .map(|day| (day, "m".into()))
                .collect(),
        );
        assert!(known.days_to_read(1, &[event("m", 0)]).is_empty());
        known.learn(2, vec![(0, "m".into())]);
        assert_eq!(known.days_to_read(1, &[event("m", 0)]), [0]);
        assert!(known.days_to_read(2, &[event("m", 0)]).is_empty());
    }
}
