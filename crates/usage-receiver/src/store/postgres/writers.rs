//! The node's ingest writers: every batch a node stores goes through a few writer tasks,
//! and batches that arrive while the writers are busy are stored together.
//!
//! A batch costs the database a fixed part (the statement's start and end, the commit) and
//! a part per event. At 50 events the fixed part was about half of the whole
//! (BENCHMARKS.md, "The fleet receiver on PostgreSQL"), so when many sites send at once,
//! one statement for the batches waiting costs much less than one for each. Nothing waits
//! on purpose: a writer takes the next batch as soon as it is free, with whatever queued
//! behind it, so a batch that reaches an idle node is stored at once and alone.
//!
//! A group is one transaction and one commit ([`group::store`], with `COPY`): every batch
//! in it is stored or none is, and each gets its own answer (install erased or disabled, rate
//! refused, events stored). Its batches are of different installs, so each install's
//! request and rows are touched once. A batch of an install already in the group, or a
//! group that fails because a key was stored already (a batch sent again), is stored
//! alone as before ([`super::ingest::store_batch`]). A group that fails otherwise (a lost
//! connection) answers every batch in it with that error: the node answers each `503`
//! and the agents send them again, which the dedupe makes safe.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::{Object, Pool};
use tokio::runtime::Handle;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::group::{self, GroupedBatch};
use super::ingest::{self, Columns, Outcome};
use crate::store::{InstallKey, ReceiverStoreError};

/// Most batches stored by one statement.
const MAX_GROUP_BATCHES: usize = 16;
/// A group takes no more batches once it holds this many events (one batch may be larger).
const MAX_GROUP_EVENTS: usize = 1000;
/// Batches waiting for a writer before `store` itself waits; a node's handlers bound
/// the batches in progress anyway (`MAX_INFLIGHT_BATCHES`).
const QUEUE_DEPTH: usize = 256;

/// One batch for the writers: its install, its events (unique, in key order), when it
/// was received, and the rate its request is taken from (none for no limit).
pub(super) struct Batch {
    pub(super) install: InstallKey,
    pub(super) columns: Columns,
    pub(super) received_at_ms: i64,
    pub(super) interval_ms: Option<i64>,
    pub(super) burst_ms: Option<i64>,
}

struct Pending {
    batch: Batch,
    answer: oneshot::Sender<Result<Outcome, ReceiverStoreError>>,
}

/// The writer tasks of one node, and their queue.
pub(super) struct Writers {
    queue: mpsc::Sender<Pending>,
    grouped: Arc<AtomicU64>,
}

impl Writers {
    /// Starts `count` writers on `runtime`, each storing with a connection of `pool`.
    /// They stop when the `Writers` is dropped, after the batches queued.
    pub(super) fn start(pool: Pool, runtime: &Handle, count: usize) -> Writers {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let receiver = Arc::new(Mutex::new(receiver));
        let grouped = Arc::new(AtomicU64::new(0));
        for _ in 0..count {
            runtime.spawn(write(pool.clone(), receiver.clone(), grouped.clone()));
        }
        Writers { queue, grouped }
    }

    /// Stores `batch` (alone or in a group) and answers what its statement did.
    pub(super) async fn store(&self, batch: Batch) -> Result<Outcome, ReceiverStoreError> {
        let stopped = || ReceiverStoreError::Backend("the node's ingest writers stopped".into());
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Pending { batch, answer })
            .await
            .map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }

    /// Batches stored so far as part of a group of two or more.
    pub(super) fn grouped(&self) -> u64 {
        self.grouped.load(Ordering::Relaxed)
    }
}

/// One writer: takes the next batch and those waiting behind it, and stores them.
async fn write(pool: Pool, queue: Arc<Mutex<mpsc::Receiver<Pending>>>, grouped: Arc<AtomicU64>) {
    while let Some(taken) = take(&queue).await {
        let mut client = match pool.get().await {
            Ok(client) => client,
            Err(error) => {
                answer_all(taken, &error.to_string());
                continue;
            }
        };
        let (group, mut alone) = split(taken);
        if group.len() > 1 {
            match store_together(&mut client, &group).await {
                Ok(outcomes) => {
                    grouped.fetch_add(group.len() as u64, Ordering::Relaxed);
                    for (pending, outcome) in group.into_iter().zip(outcomes) {
                        let _ = pending.answer.send(Ok(outcome));
                    }
                }
                Err(error) if ingest::some_key_stored_already(&error) => alone.extend(group),
                Err(error) => answer_all(group, &error.to_string()),
            }
        } else {
            alone.extend(group);
        }
        for pending in alone {
            let batch = &pending.batch;
            let outcome = ingest::store_batch(
                &client,
                batch.install,
                &batch.columns,
                batch.received_at_ms,
                batch.interval_ms,
                batch.burst_ms,
            )
            .await
            .map(|row| Outcome::from_row(&row));
            let _ = pending.answer.send(outcome);
        }
    }
}

/// The next batch, waited for, and the batches queued behind it, up to a group's size.
/// `None` once the queue is closed and empty.
async fn take(queue: &Mutex<mpsc::Receiver<Pending>>) -> Option<Vec<Pending>> {
    let mut queue = queue.lock().await;
    let first = queue.recv().await?;
    let mut events = first.batch.columns.len();
    let mut taken = vec![first];
    while taken.len() < MAX_GROUP_BATCHES && events < MAX_GROUP_EVENTS {
        let Ok(next) = queue.try_recv() else { break };
        events += next.batch.columns.len();
        taken.push(next);
    }
    Some(taken)
}

/// The batches that can share a statement (each of another install, all of the first's
/// rate), and the rest.
fn split(taken: Vec<Pending>) -> (Vec<Pending>, Vec<Pending>) {
    let rate = |pending: &Pending| (pending.batch.interval_ms, pending.batch.burst_ms);
    let first_rate = rate(&taken[0]);
    let mut installs = HashSet::new();
    taken
        .into_iter()
        .partition(|pending| rate(pending) == first_rate && installs.insert(pending.batch.install))
}

async fn store_together(
    client: &mut Object,
    group: &[Pending],
) -> Result<Vec<Outcome>, deadpool_postgres::tokio_postgres::Error> {
    let batches: Vec<GroupedBatch> = group
        .iter()
        .map(|pending| GroupedBatch {
            install: pending.batch.install,
            columns: &pending.batch.columns,
            received_at_ms: pending.batch.received_at_ms,
        })
        .collect();
    let first = &group[0].batch;
    group::store(client, &batches, first.interval_ms, first.burst_ms).await
}

/// Answers every batch of `pending` with the same failure (the group's, or no connection).
fn answer_all(pending: Vec<Pending>, error: &str) {
    for pending in pending {
        let _ = pending
            .answer
            .send(Err(ReceiverStoreError::Backend(error.to_owned().into())));
    }
}
