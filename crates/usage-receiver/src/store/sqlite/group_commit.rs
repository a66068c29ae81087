//! Group commit: batches that arrive while one commits wait, and the next thread to find no
//! commit running commits all of them in one transaction and one fsync.

use std::sync::{Arc, Mutex};

use super::SqliteStore;
use crate::store::{IngestCounts, InstallKey, NewEvent, ReceiverStoreError};

/// What became of a batch: its counts, `None` when its install was gone, or the error
/// of its group's commit as a message.
type Outcome = Result<Option<IngestCounts>, String>;

/// Stores one batch with whatever other batches are waiting, in one transaction.
pub(super) fn ingest(
    store: &SqliteStore,
    install: InstallKey,
    events: Vec<NewEvent>,
    received_at_ms: i64,
) -> Result<IngestCounts, ReceiverStoreError> {
    let mine = Arc::new(PendingIngest {
        install,
        events,
        received_at_ms,
        outcome: Mutex::new(None),
    });
    let mut queue = store.ingest_queue();
    queue.waiting.push(Arc::clone(&mine));
    loop {
        if let Some(outcome) = mine.take_outcome() {
            return match outcome {
                Ok(Some(counts)) => Ok(counts),
                Ok(None) => Err(ReceiverStoreError::InstallGone),
                Err(message) => Err(ReceiverStoreError::Backend(message.into())),
            };
        }
        if queue.committing {
            queue = store
                .committed
                .wait(queue)
                .unwrap_or_else(|p| p.into_inner());
            continue;
        }
        // Lead: commit every batch waiting now (this one included) in one transaction.
        queue.committing = true;
        let group = Committing {
            store,
            group: std::mem::take(&mut queue.waiting),
        };
        drop(queue);
        group.commit();
        queue = store.ingest_queue();
    }
}

/// One batch waiting for a group commit.
pub(super) struct PendingIngest {
    pub(super) install: InstallKey,
    pub(super) events: Vec<NewEvent>,
    pub(super) received_at_ms: i64,
    /// Set by whichever thread committed the group.
    outcome: Mutex<Option<Outcome>>,
}

impl PendingIngest {
    fn take_outcome(&self) -> Option<Outcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn settle(&self, outcome: Outcome) {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(outcome);
    }
}

/// Batches that arrived while a group was committing; the next thread to find no commit
/// running takes them all.
#[derive(Default)]
pub(super) struct IngestQueue {
    waiting: Vec<Arc<PendingIngest>>,
    committing: bool,
}

/// A group being committed by the thread that holds this. Dropping it, even by a panic,
/// settles every batch of the group and lets the next group go.
struct Committing<'a> {
    store: &'a SqliteStore,
    group: Vec<Arc<PendingIngest>>,
}

impl Committing<'_> {
    /// Commits the group, settles each batch, and (on drop) lets the next group go.
    fn commit(self) {
        match self.store.commit_group(&self.group) {
            Ok(counts) => {
                for (pending, counts) in self.group.iter().zip(counts) {
                    pending.settle(Ok(counts));
                }
            }
            Err(error) => {
                let message = error.to_string();
                for pending in &self.group {
                    pending.settle(Err(message.clone()));
                }
            }
        }
    }
}

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        for pending in &self.group {
            pending.settle(Err("the ingest commit did not finish".to_owned()));
        }
        self.store.ingest_queue().committing = false;
        self.store.committed.notify_all();
    }
}
