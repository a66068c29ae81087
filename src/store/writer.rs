//! The single writer: one thread owns the writing connection and commits the events of
//! all concurrent requests together (group commit), so throughput is not bounded by one
//! fsync per request. Other writes (sync bookkeeping, jobs) run on the same thread, one
//! after another, so SQLite never sees two writers.
//!
//! WAL checkpoints (copying committed pages into the database file, with an fsync of it)
//! run on a second, background thread with its own connection, so a commit never waits
//! for one: with SQLite's default auto-checkpoint, every few dozen commits stalled every
//! waiting request for a whole checkpoint, which set the p99 acknowledgment latency.

use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use tokio::sync::{mpsc, oneshot};

use super::events::Recorded;
use super::health::StorageHealth;
use super::{Store, StoreError};
use usage_protocol::event::Event;

/// Requests waiting for the writer; beyond this the API answers 503 instead of queueing.
const QUEUE_CAPACITY: usize = 8192;
/// Most events committed in one transaction, to bound the latency of the group.
const MAX_GROUP_EVENTS: usize = 4096;
/// Least time between two background checkpoints: each one syncs the database file, so
/// checkpointing after every commit would cost an fsync per commit.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);
/// WAL pages after which the writer checkpoints by itself, should the background
/// checkpointer fall behind (under continuous load the WAL restarts only then). That
/// checkpoint runs inside a commit, so it should come rarely; BENCHMARKS.md ("Where the
/// tuned constants come from") has what this size did to the p99 acknowledgment.
const WRITER_AUTOCHECKPOINT_PAGES: i64 = 16_384;
/// Size the WAL file is truncated back to after it restarts: above the most a checkpoint
/// cycle writes (the pages above, 1,048 bytes each with their frame headers), so under
/// load the WAL keeps its size and each commit overwrites blocks the file already has,
/// instead of cutting the file inside a commit and growing it again (BENCHMARKS.md,
/// "Where the tuned constants come from").
const WAL_SIZE_LIMIT_BYTES: i64 = 20 * 1024 * 1024;
/// Quiet time after which the checkpointer empties the WAL file, so an idle agent keeps
/// no large WAL on disk.
const IDLE_BEFORE_TRUNCATE: Duration = Duration::from_secs(2);

type RecordReply = oneshot::Sender<Result<Vec<Recorded>, StoreError>>;
/// Any other write, given the storage state to mark should it fail on damage.
type Work = Box<dyn FnOnce(&mut Store, &StorageHealth) + Send>;

enum Job {
    Record {
        events: Vec<Event>,
        reply: RecordReply,
    },
    Run(Work),
    /// Finish what is queued before this, checkpoint, and end the thread.
    Stop,
}

/// A handle to the writer thread; cheap to clone. The thread stops, after a WAL
/// checkpoint, on [`Writer::stop`] or once every handle is dropped.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
    health: Arc<StorageHealth>,
}

impl Writer {
    /// Starts the writer thread on `store`, with the storage state recorded in it.
    pub fn spawn(store: Store) -> (Writer, JoinHandle<()>) {
        let state = store.storage_state().unwrap_or_else(|error| {
            health_unreadable(&error);
            Default::default()
        });
        let health = Arc::new(StorageHealth::new(state));
        let (jobs, queue) = mpsc::channel(QUEUE_CAPACITY);
        let checkpointer = Checkpointer::start(&store);
        let watching = Arc::clone(&health);
        let thread = std::thread::Builder::new()
            .name("db-writer".into())
            .spawn(move || writer_loop(store, queue, checkpointer, &watching))
            .expect("spawning the writer thread (out of threads?)");
        (Writer { jobs, health }, thread)
    }

    /// The storage state; every write that fails on damage or I/O sets it `failing`.
    pub fn storage(&self) -> &Arc<StorageHealth> {
        &self.health
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
        let job = Job::Run(Box::new(
            move |store: &mut Store, health: &StorageHealth| {
                let result = work(store);
                if let Err(error) = &result {
                    health.observe(error);
                }
                // The caller may have gone away; its result is then simply dropped.
                let _ = reply.send(result);
            },
        ));
        self.jobs
            .send(job)
            .await
            .map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }
}

fn health_unreadable(error: &StoreError) {
    tracing::error!(%error, "cannot read the recorded storage state; assuming ok");
}

fn writer_loop(
    mut store: Store,
    mut queue: mpsc::Receiver<Job>,
    checkpointer: Option<Checkpointer>,
    health: &StorageHealth,
) {
    if let Err(error) = store.read_known_ids() {
        // Read again at the first write; should that fail too, the write fails with it.
        tracing::error!(%error, "cannot read the stored event ids");
    }
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
            Job::Run(work) => work(&mut store, health),
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
                commit_group(&mut store, group, health);
                merge_event_ids_step(&mut store, size, health);
                // Nothing waiting: the rest of a merge under way costs no one anything.
                while store.merge_under_way() && queue.is_empty() {
                    merge_event_ids_step(&mut store, 0, health);
                }
            }
        }
        if let Some(checkpointer) = &checkpointer {
            checkpointer.nudge();
        }
    }
    if let Some(checkpointer) = checkpointer {
        checkpointer.stop();
    }
    if let Err(error) = store.checkpoint() {
        tracing::warn!(%error, "final WAL checkpoint failed");
    }
}

fn commit_group(store: &mut Store, group: Vec<(Vec<Event>, RecordReply)>, health: &StorageHealth) {
    let slices: Vec<&[Event]> = group.iter().map(|(events, _)| events.as_slice()).collect();
    match store.record_groups(&slices) {
        Ok(outcomes) => {
            for ((_, reply), outcome) in group.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(error) => {
            tracing::error!(%error, requests = group.len(), "write failed; nothing of it was stored");
            let damage = health.observe(&error);
            let message = error.to_string();
            for (_, reply) in group {
                let _ = reply.send(Err(StoreError::GroupFailed {
                    message: message.clone(),
                    damage,
                }));
            }
        }
    }
}

/// Writes the ids of the events above the mark to their table once enough have gathered (see
/// `super::event_ids`), a few slices after each group of `recorded` events once its
/// answers went out, so requests wait for a few slices at most.
fn merge_event_ids_step(store: &mut Store, recorded: usize, health: &StorageHealth) {
    if let Err(error) = store.merge_event_ids_step(recorded) {
        tracing::error!(%error, "writing event ids to their table failed; they are read from the log again");
        health.observe(&error);
    }
}

/// The background checkpointer: a thread with its own connection that runs a PASSIVE
/// checkpoint (which never blocks the writer) at most every [`CHECKPOINT_INTERVAL`]
/// while commits keep coming.
struct Checkpointer {
    nudges: std_mpsc::SyncSender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    /// Starts the thread and hands routine checkpoints over to it; `None` (the writer then
    /// keeps SQLite's auto-checkpoint) for a database without a file or a failed open.
    fn start(store: &Store) -> Option<Checkpointer> {
        let path = store.conn.path().filter(|p| !p.is_empty())?.to_owned();
        // A new connection syncs checkpoints fully (SQLite's default), whatever the writer's
        // `synchronous`; that only affects the background thread.
        // Checkpoints copy pages from the WAL file; they need next to no page cache.
        // No busy wait: a truncating checkpoint that finds the database busy gives up at
        // once rather than hold up the writer, and is tried at the next quiet time.
        let conn = match Connection::open(&path)
            .and_then(|conn| conn.pragma_update(None, "cache_size", -64).map(|()| conn))
            .and_then(|conn| conn.busy_timeout(Duration::ZERO).map(|()| conn))
        {
            Ok(conn) => conn,
            Err(error) => {
                tracing::warn!(%error, "no background checkpointer; the writer checkpoints itself");
                return None;
            }
        };
        let (nudges, wakes) = std_mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("db-checkpoint".into())
            .spawn(move || checkpoint_loop(&conn, &wakes))
            .ok()?;
        let tuned = store
            .conn
            .pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)
            .and_then(|()| {
                store
                    .conn
                    .pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)
            });
        if let Err(error) = tuned {
            tracing::warn!(%error, "could not tune WAL checkpoints; keeping SQLite's defaults");
        }
        Some(Checkpointer { nudges, thread })
    }

    /// Tells the thread that a commit happened; never blocks.
    fn nudge(&self) {
        let _ = self.nudges.try_send(());
    }

    /// Ends the thread (after any checkpoint in progress) and waits for it.
    fn stop(self) {
        drop(self.nudges);
        let _ = self.thread.join();
    }
}

fn checkpoint_loop(conn: &Connection, wakes: &std_mpsc::Receiver<()>) {
    let mut pending = false;
    let mut wal_emptied = true;
    loop {
        if !pending {
            let woke = if wal_emptied {
                wakes
                    .recv()
                    .map_err(|_| std_mpsc::RecvTimeoutError::Disconnected)
            } else {
                wakes.recv_timeout(IDLE_BEFORE_TRUNCATE)
            };
            match woke {
                Ok(()) => {}
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    wal_emptied = empty_wal(conn);
                    continue;
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        pending = false;
        wal_emptied = false;
        let started = Instant::now();
        // PASSIVE copies what it can without waiting for the writer or readers.
        if let Err(error) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(%error, "background WAL checkpoint failed");
        }
        // Pace the checkpoints; a commit during the pause means one more right after it.
        let next = started + CHECKPOINT_INTERVAL;
        loop {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match wakes.recv_timeout(left) {
                Ok(()) => pending = true,
                Err(std_mpsc::RecvTimeoutError::Timeout) => break,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

/// Checkpoints everything and truncates the WAL file to nothing; `false` when someone
/// was using the database (the checkpointer does not wait), so it is tried again later.
fn empty_wal(conn: &Connection) -> bool {
    match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
        row.get::<_, i64>(0)
    }) {
        Ok(busy) => busy == 0,
        Err(error) => {
            if error.sqlite_error_code() != Some(rusqlite::ErrorCode::DatabaseBusy) {
                tracing::warn!(%error, "emptying the idle WAL failed");
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;
    use usage_protocol::event::{ModelName, Source, Tokens};

    fn event() -> Event {
        Event {
            event_id: uuid::Uuid::new_v4(),
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

    fn wal_bytes(dir: &std::path::Path) -> u64 {
        std::fs::metadata(dir.join("usage.db-wal")).map_or(0, |m| m.len())
    }

    #[tokio::test]
    async fn an_idle_writer_empties_its_wal_and_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        let (writer, _thread) = Writer::spawn(Store::open(&path, Synchronous::Full).unwrap());
        for _ in 0..20 {
            writer.record(vec![event(), event()]).await.unwrap();
        }
        assert!(wal_bytes(dir.path()) > 0, "the commits went to the WAL");
        let deadline = Instant::now() + IDLE_BEFORE_TRUNCATE + Duration::from_secs(20);
        while wal_bytes(dir.path()) > 0 {
            assert!(Instant::now() < deadline, "the idle WAL was never emptied");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Everything committed is in the database file, and writing goes on.
        assert_eq!(
            Store::open(&path, Synchronous::Full)
                .unwrap()
                .event_count()
                .unwrap(),
            40
        );
        writer.record(vec![event()]).await.unwrap();
        assert!(wal_bytes(dir.path()) > 0);
    }

    #[tokio::test]
    async fn stopping_commits_everything_and_leaves_an_empty_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        let (writer, thread) = Writer::spawn(Store::open(&path, Synchronous::Full).unwrap());
        for _ in 0..20 {
            let outcome = writer.record(vec![event(), event()]).await.unwrap();
            assert_eq!(outcome, [Recorded::New, Recorded::New]);
        }
        writer.stop().await;
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
        let wal = std::fs::metadata(dir.path().join("usage.db-wal")).map_or(0, |m| m.len());
        assert_eq!(wal, 0, "the final checkpoint truncates the WAL");
        let store = Store::open(&path, Synchronous::Full).unwrap();
        assert_eq!(store.event_count().unwrap(), 40);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_stores_every_event_of_many_concurrent_requests() {
        // Groups of up to 128 requests, WAL restarts and background checkpoints, through
        // the gathering VFS of `synchronous = full` connections.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.db");
        let (writer, thread) = Writer::spawn(Store::open(&path, Synchronous::Full).unwrap());
        let mut clients = Vec::new();
        for _ in 0..128 {
            let writer = writer.clone();
            clients.push(tokio::spawn(async move {
                for _ in 0..150 {
                    writer.record(vec![event()]).await.unwrap();
                }
            }));
        }
        for client in clients {
            client.await.unwrap();
        }
        writer.stop().await;
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
        let plain = rusqlite::Connection::open(&path).unwrap();
        let stored: i64 = plain
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, 128 * 150);
        let integrity: String = plain
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(integrity, "ok");
    }
}
