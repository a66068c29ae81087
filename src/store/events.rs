//! Recording events: the group-commit insert with idempotent event ids.

use rusqlite::{OptionalExtension, Transaction, params};
use uuid::Uuid;

use super::{Doing, Store, StoreError};
use usage_protocol::event::Event;

/// What happened to one event of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Stored now.
    New,
    /// Its id was already stored (or came earlier in the same write); nothing changed.
    Duplicate,
}

impl Store {
    /// Stores the events of several requests in one transaction, so one fsync acknowledges
    /// them all. Either everything commits or nothing does.
    pub fn record_groups(&mut self, groups: &[&[Event]]) -> Result<Vec<Vec<Recorded>>, StoreError> {
        let result = self.try_record_groups(groups);
        if result.is_err() {
            // A rolled-back transaction may have taken model and origin ids with it.
            self.model_ids.clear();
            self.origin_ids.clear();
        }
        result
    }

    fn try_record_groups(&mut self, groups: &[&[Event]]) -> Result<Vec<Vec<Recorded>>, StoreError> {
        let tx = self.conn.transaction().doing("starting a write")?;
        let mut outcomes = Vec::with_capacity(groups.len());
        for events in groups {
            let mut group = Vec::with_capacity(events.len());
            for event in *events {
                let model_id = name_id(
                    &tx,
                    &mut self.model_ids,
                    Names::Models,
                    event.model.as_str(),
                )?;
                let origin_id = match &event.origin {
                    Some(origin) => {
                        name_id(&tx, &mut self.origin_ids, Names::Origins, origin.as_str())?
                    }
                    None => 0,
                };
                group.push(insert_event(&tx, event, model_id, origin_id)?);
            }
            outcomes.push(group);
        }
        tx.commit().doing("committing events")?;
        Ok(outcomes)
    }

    /// Stores the events of one request.
    pub fn record(&mut self, events: &[Event]) -> Result<Vec<Recorded>, StoreError> {
        Ok(self.record_groups(&[events])?.remove(0))
    }

    /// Whether an event id is stored.
    pub fn contains_event(&self, event_id: Uuid) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached("SELECT 1 FROM events WHERE event_id = ?1")
            .and_then(|mut stmt| {
                stmt.query_row(params![event_id.as_bytes()], |_| Ok(()))
                    .optional()
            })
            .doing("looking up an event")
            .map(|found| found.is_some())
    }

    /// Number of stored events.
    pub fn event_count(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT count(*) FROM events", [], |row| row.get(0))
            .doing("counting events")
    }
}

/// The tables of names that events refer to by id.
#[derive(Clone, Copy)]
enum Names {
    Models,
    Origins,
}

/// The id of `name` in its table, stored the first time it is seen.
fn name_id(
    tx: &Transaction,
    cache: &mut std::collections::HashMap<String, i64>,
    names: Names,
    name: &str,
) -> Result<i64, StoreError> {
    if let Some(id) = cache.get(name) {
        return Ok(*id);
    }
    let (insert, select, storing, looking_up) = match names {
        Names::Models => (
            "INSERT INTO models (name) VALUES (?1) ON CONFLICT(name) DO NOTHING",
            "SELECT id FROM models WHERE name = ?1",
            "storing a model name",
            "looking up a model name",
        ),
        Names::Origins => (
            "INSERT INTO origins (name) VALUES (?1) ON CONFLICT(name) DO NOTHING",
            "SELECT id FROM origins WHERE name = ?1",
            "storing an origin",
            "looking up an origin",
        ),
    };
    tx.prepare_cached(insert)
        .and_then(|mut stmt| stmt.execute(params![name]))
        .doing(storing)?;
    let id: i64 = tx
        .prepare_cached(select)
        .and_then(|mut stmt| stmt.query_row(params![name], |row| row.get(0)))
        .doing(looking_up)?;
    cache.insert(name.to_owned(), id);
    Ok(id)
}

fn insert_event(
    tx: &Transaction,
    event: &Event,
    model_id: i64,
    origin_id: i64,
) -> Result<Recorded, StoreError> {
    let tokens = &event.tokens;
    let changed = tx
        .prepare_cached(
            "INSERT INTO events (event_id, user_id, source, model_id, prompt_tokens,
                 completion_tokens, cached_tokens, cache_write_tokens, reasoning_tokens,
                 context, created_at, origin_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT(event_id) DO NOTHING",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                event.event_id.as_bytes(),
                event.user_id as i64,
                event.source.code(),
                model_id,
                tokens.prompt as i64,
                tokens.completion as i64,
                tokens.cached as i64,
                tokens.cache_write as i64,
                tokens.reasoning as i64,
                event.context,
                event.created_at_ms,
                origin_id,
            ])
        })
        .doing("storing an event")?;
    Ok(if changed == 1 {
        Recorded::New
    } else {
        Recorded::Duplicate
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Synchronous;
    use usage_protocol::event::{ModelName, Source, Tokens};

    pub(crate) fn sample_event(id: Uuid) -> Event {
        Event {
            event_id: id,
            user_id: 5,
            source: Source::Bulk,
            model: ModelName::parse("gpt-4o-mini").unwrap(),
            tokens: Tokens {
                prompt: 150,
                completion: 25,
                ..Tokens::default()
            },
            origin: None,
            hold_id: None,
            context: Some(r#"{"attachment_id":42}"#.into()),
            created_at_ms: 1_764_240_000_000,
        }
    }

    #[test]
    fn duplicates_are_detected_across_and_within_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("u.db"), Synchronous::Normal).unwrap();
        let a = sample_event(Uuid::new_v4());
        let b = sample_event(Uuid::new_v4());
        assert_eq!(
            store.record(std::slice::from_ref(&a)).unwrap(),
            [Recorded::New]
        );
        let outcome = store
            .record_groups(&[&[a.clone(), b.clone()], std::slice::from_ref(&b)])
            .unwrap();
        assert_eq!(
            outcome,
            [
                vec![Recorded::Duplicate, Recorded::New],
                vec![Recorded::Duplicate]
            ]
        );
        assert_eq!(store.event_count().unwrap(), 2);
        assert!(store.contains_event(b.event_id).unwrap());
    }
}
