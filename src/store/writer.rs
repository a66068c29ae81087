//! The single writer: one thread owns the writing connection and commits the events of
//! all concurrent requests together (group commit), so throughput is not bounded by one
//! fsync per request. Other writes (sync bookkeeping, jobs) run on the same thread, one
//! after another, so SQLite never sees two writers.

use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::events::Recorded;
use super::{Store, StoreError};
use crate::event::Event;

/// Requests waiting for the writer; beyond this the API answers 503 instead of queueing.
const QUEUE_CAPACITY: usize = 8192;
/// Most events committed in one transaction, to bound the latency of the group.
const MAX_GROUP_EVENTS: usize = 4096;

type RecordReply = oneshot::Sender<Result<Vec<Recorded>, StoreError>>;

enum Job {
    Record { events: Vec<Event>, reply: RecordReply },
    Run(Box<dyn FnOnce(&mut Store) + Send>),
    /// Finish what is queued before this, checkpoint, and end the thread.
    Stop,
}

/// A handle to the writer thread; cheap to clone. The thread stops, after a WAL
/// checkpoint, on [`Writer::stop`] or once every handle is dropped.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer thread on `store`.
    pub fn spawn(store: Store) -> (Writer, JoinHandle<()>) {
        let (jobs, queue) = mpsc::channel(QUEUE_CAPACITY);
        let thread = std::thread::Builder::new()
            .name("db-writer".into())
            .spawn(move || writer_loop(store, queue))
            .expect("spawning the writer thread (out of threads?)");
        (Writer { jobs }, thread)
    }

    /// Stores the events of one request; resolves only after the commit is on disk.
    pub async fn record(&self, events: Vec<Event>) -> Result<Vec<Recorded>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(Job::Record { events, reply })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => StoreError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => StoreError::WriterGone,
            })?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Asks the thread to commit everything queued so far, checkpoint and stop.
    /// Later requests fail with [`StoreError::WriterGone`].
    pub async fn stop(&self) {
        let _ = self.jobs.send(Job::Stop).await;
    }

    /// Runs any other write on the writer thread and returns its result.
    pub async fn run<R, F>(&self, work: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut Store) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Job::Run(Box::new(move |store: &mut Store| {
            // The caller may have gone away; its result is then simply dropped.
            let _ = reply.send(work(store));
        }));
        self.jobs
            .send(job)
            .await
            .map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }
}

fn writer_loop(mut store: Store, mut queue: mpsc::Receiver<Job>) {
    let mut pending_run = None;
    loop {
        let first = match pending_run.take() {
            Some(job) => job,
            None => match queue.blocking_recv() {
                Some(job) => job,
                None => break,
            },
        };
        match first {
            Job::Stop => break,
            Job::Run(work) => work(&mut store),
            Job::Record { events, reply } => {
                let mut group = vec![(events, reply)];
                let mut size = group[0].0.len();
                // Take every record request already waiting: they share one commit.
                while size < MAX_GROUP_EVENTS {
                    match queue.try_recv() {
                        Ok(Job::Record { events, reply }) => {
                            size += events.len();
                            group.push((events, reply));
                        }
                        Ok(run) => {
                            pending_run = Some(run);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                commit_group(&mut store, group);
            }
        }
    }
    if let Err(error) = store.checkpoint() {
        tracing::warn!(%error, "final WAL checkpoint failed");
    }
}

fn commit_group(store: &mut Store, group: Vec<(Vec<Event>, RecordReply)>) {
    let slices: Vec<&[Event]> = group.iter().map(|(events, _)| events.as_slice()).collect();
    match store.record_groups(&slices) {
        Ok(outcomes) => {
            for ((_, reply), outcome) in group.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(error) => {
            tracing::error!(%error, requests = group.len(), "write failed; nothing of it was stored");
            let message = error.to_string();
            for (_, reply) in group {
                let _ = reply.send(Err(StoreError::GroupFailed(message.clone())));
            }
        }
    }
}
