//! One sync run ([`SyncEngine::run_once`]): drain the pending queue to the backend, with
//! the retry rules of docs/reference/wire-protocol.md, and keep the bookkeeping status
//! reads. The first batch goes alone; then up to [`MAX_IN_FLIGHT`] lanes ship batches
//! concurrently (the backend dedupes, so the order batches land in does not matter).
//!
//! *When* runs happen is `crate::jobs::sync`'s business; this module is the unit of work,
//! and [`SyncEngine::run_now`] makes sure two runs never overlap (a manual sync that
//! arrives during a scheduled run waits for it and then runs, so it always reports on a
//! run that started after it was asked for). Every run, batch and failed attempt is
//! counted in [`Metrics`].
//! It reads the queue on its own database connection and writes only through the
//! [`Writer`], so the local API never waits on it or on the backend.
//!
//! **Invariants:** an event becomes `synced` only after a 2xx answer that accepted or
//! deduplicated it; it becomes `failed` only when the backend refused that one event
//! (a per-event reject, or a validation refusal of a batch bisected down to it);
//! transient errors (network, server, rate limit) and authentication errors leave every
//! event pending. Nothing here deletes an event.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use chrono::{SecondsFormat, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::client::{BackendClient, ClientError, PreparedBatch, http_client};
use super::enroll;
use super::error::{Category, SyncError};
use crate::config::{Config, SyncConfig};
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::store::status::LastError;
use crate::store::sync::PendingEvent;
use crate::store::writer::Writer;
use crate::store::{Store, StoreError};
use usage_protocol::wire::{self, Batch, BatchResult, WireEvent, format_sent_at};

/// The sync job's name in `usage_agent_job_runs_total` and the other job metrics.
pub const SYNC_JOB: &str = "sync";

/// The longest `Retry-After` waited for inside one run; a backend asking for more gets
/// the events at a later run instead of holding this one (and a manual `sync`) hostage.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Most batches on the wire at once during a run. The backend dedupes, so batches may land
/// in any order; several in flight let the agent read and sign while the backend commits.
pub const MAX_IN_FLIGHT: usize = 8;

/// Most events on the wire at once: large batches get fewer lanes, which bounds the memory a
/// run holds (about 4 MiB of events and their JSON).
pub const MAX_EVENTS_IN_FLIGHT: usize = 4_000;

/// How many batches of `batch_size` events go out at once: between 2 and [`MAX_IN_FLIGHT`].
pub fn in_flight(batch_size: usize) -> usize {
    (MAX_EVENTS_IN_FLIGHT / batch_size.max(1)).clamp(2, MAX_IN_FLIGHT)
}

/// What one run did (the body of `POST /v1/sync`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    /// Batches the backend gave a verdict on: a 2xx answer, or a validation refusal of a
    /// single-event batch.
    pub batches: u64,
    /// Events in those batches (`accepted + duplicates + rejected`).
    pub sent: u64,
    /// Events the backend stored now.
    pub accepted: u64,
    /// Events the backend already had.
    pub duplicates: u64,
    /// Events the backend refused; they are now `failed`, with its reason.
    pub rejected: u64,
    /// Why the run stopped early, `null` when it drained the queue.
    pub error: Option<RunError>,
    pub duration_ms: u64,
}

/// The error that ended a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunError {
    pub category: Category,
    pub message: String,
}

/// Why the engine could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Ships the queue to the backend; one per daemon.
pub struct SyncEngine {
    sync: SyncConfig,
    identity: Option<Identity>,
    identity_path: PathBuf,
    /// `None` until `init` has made an identity (nothing can be signed without it).
    client: Option<BackendClient>,
    http: reqwest::Client,
    writer: Writer,
    /// The engine's own read connection, so reading batches never queues behind the
    /// API's reads or the writer.
    queue: Arc<Mutex<Store>>,
    enrolled: AtomicBool,
    metrics: Arc<Metrics>,
    /// Held for a whole run: never two at once.
    running: tokio::sync::Mutex<()>,
}

impl SyncEngine {
    /// Sets up the HTTP client and a read connection to the database of `config`.
    pub fn new(
        config: &Config,
        identity: Option<Identity>,
        writer: Writer,
        metrics: Arc<Metrics>,
    ) -> Result<SyncEngine, SetupError> {
        let http = http_client(Duration::from_secs(config.sync.request_timeout_secs))?;
        let client = identity
            .as_ref()
            .map(|identity| BackendClient::new(http.clone(), &config.sync, identity))
            .transpose()?;
        let store = Store::open(&config.database_path(), config.synchronous)?;
        store.limit_cache(crate::store::SIDE_CACHE_KIB)?;
        let enrolled = identity.as_ref().is_some_and(|i| i.enrolled_at.is_some())
            || store.sync_meta()?.enrolled_ms.is_some();
        Ok(SyncEngine {
            sync: config.sync.clone(),
            identity,
            identity_path: config.identity_path(),
            client,
            http,
            writer,
            queue: Arc::new(Mutex::new(store)),
            enrolled: AtomicBool::new(enrolled),
            metrics,
            running: tokio::sync::Mutex::new(()),
        })
    }

    /// Whether this install is known to be enrolled with the backend.
    pub fn is_enrolled(&self) -> bool {
        self.enrolled.load(Ordering::Relaxed)
    }

    /// Runs a sync now, after any run in progress has finished, and counts it as a run of
    /// the `sync` job (failed when it ended with an error).
    pub async fn run_now(&self) -> SyncReport {
        let _running = self.running.lock().await;
        let report = self.run_once().await;
        self.metrics.job_run(SYNC_JOB, report.error.is_none());
        report
    }

    /// One run: enroll if still needed, drain the queue up to the newest event that existed
    /// when the run began, and record the outcome for status. Never panics on backend or
    /// database failures; they end up in the report's `error`.
    pub async fn run_once(&self) -> SyncReport {
        let started = Instant::now();
        let started_ms = Utc::now().timestamp_millis();
        self.enroll_if_needed().await;
        let mut report = SyncReport::default();
        let result = self.drain(&mut report).await;
        if let Err(error) = &result {
            report.error = Some(RunError {
                category: error.category(),
                message: error.to_string(),
            });
        }
        if let Err(error) = self.record_run(started_ms, report.error.clone()).await {
            tracing::warn!(%error, "could not record the sync run");
            report.error.get_or_insert(RunError {
                category: Category::Local,
                message: error.to_string(),
            });
        }
        report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match &report.error {
            None => tracing::info!(
                batches = report.batches,
                accepted = report.accepted,
                duplicates = report.duplicates,
                rejected = report.rejected,
                duration_ms = report.duration_ms,
                "sync run finished"
            ),
            Some(error) => tracing::warn!(
                category = %error.category,
                error = %error.message,
                batches = report.batches,
                accepted = report.accepted,
                duration_ms = report.duration_ms,
                "sync run stopped; unsent events stay pending"
            ),
        }
        report
    }

    async fn drain(&self, report: &mut SyncReport) -> Result<(), SyncError> {
        let client = self.client.as_ref().ok_or(SyncError::NoIdentity)?;
        let until = self.read(|store| store.last_seq()).await?;
        let run = Run {
            client,
            until,
            cursor: tokio::sync::Mutex::new(0),
            batch_size: AtomicUsize::new(self.sync.batch_size.max(1)),
            report: Mutex::new(SyncReport::default()),
            marks: tokio::sync::Mutex::new(Marks::default()),
            first_error: Mutex::new(None),
        };
        // The first batch goes alone: a backend that refuses the credentials, or is down,
        // sees one request (and its retries), not one per lane.
        if self.next_batch(&run).await {
            let lanes = (0..in_flight(self.sync.batch_size)).map(|_| self.lane(&run));
            futures_util::future::join_all(lanes).await;
        }
        // Whatever stopped the run, the verdicts already received are made durable.
        let flushed = run.marks.into_inner().finish(&self.writer).await;
        *report = run.report.into_inner().unwrap_or_else(|p| p.into_inner());
        let first_error = run
            .first_error
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        match first_error {
            Some(error) => Err(error),
            None => flushed,
        }
    }

    /// One of the run's lanes: ships batch after batch until the queue is drained or any
    /// lane has failed.
    async fn lane(&self, run: &Run<'_>) {
        while self.next_batch(run).await {}
    }

    /// Reads the next batch and ships it; false once there is nothing more to do. The
    /// read happens under the cursor's lock, so lanes cut disjoint batches in arrival
    /// order; shipping happens outside it, so several batches are on the wire at once.
    async fn next_batch(&self, run: &Run<'_>) -> bool {
        let read = async {
            let mut after = run.cursor.lock().await;
            if run.failed() {
                return Ok(Vec::new());
            }
            let (from, until, limit) = (*after, run.until, run.batch_size.load(Ordering::Relaxed));
            let events = self
                .read(move |store| store.pending_batch(from, until, limit))
                .await?;
            if let Some(last) = events.last() {
                *after = last.seq;
            }
            Ok(events)
        };
        let shipped = match read.await {
            Ok(events) if events.is_empty() => return false,
            Ok(events) => self.ship_parts(run, events).await,
            Err(error) => Err(error),
        };
        match shipped {
            Ok(()) => true,
            Err(error) => {
                run.fail(error);
                false
            }
        }
    }

    /// Ships one read batch. A refused batch is split in two and both halves go first, so
    /// only the events the backend refuses on their own become failed.
    async fn ship_parts(&self, run: &Run<'_>, events: Vec<PendingEvent>) -> Result<(), SyncError> {
        let mut parts = VecDeque::from([events]);
        while let Some(mut part) = parts.pop_front() {
            let batch_size = run.batch_size.load(Ordering::Relaxed);
            if part.len() > batch_size {
                // A 413 shrank the batch size since this part was cut.
                let rest = part.split_off(batch_size);
                parts.push_front(rest);
            }
            match self.ship(run.client, &part).await {
                Ok(answer) => {
                    let (synced, failed) = verdicts(&part, &answer)?;
                    self.metrics.sync_batch("ok");
                    self.metrics.sync_events("accepted", answer.accepted);
                    self.metrics.sync_events("duplicate", answer.duplicates);
                    self.metrics.sync_events("rejected", failed.len() as u64);
                    run.count(|report| {
                        report.batches += 1;
                        report.sent += part.len() as u64;
                        report.accepted += answer.accepted;
                        report.duplicates += answer.duplicates;
                        report.rejected += failed.len() as u64;
                    });
                    for (seq, _, reason) in &failed {
                        tracing::warn!(seq, %reason, "the backend rejected an event; it is now failed");
                    }
                    run.marks
                        .lock()
                        .await
                        .push(&self.writer, synced, failed)
                        .await?;
                }
                Err(error) if error.category() == Category::Validation => {
                    self.metrics.sync_batch("refused");
                    if error.status() == Some(413) {
                        let halved = (part.len() / 2).max(1);
                        let before = run.batch_size.fetch_min(halved, Ordering::Relaxed);
                        if halved < before {
                            tracing::warn!(
                                batch_size = halved,
                                "the backend found a batch too large; halving the batch size for this run"
                            );
                        }
                    }
                    if part.len() == 1 {
                        let reason = error.to_string();
                        tracing::warn!(seq = part[0].seq, %reason, "the backend refused an event; it is now failed");
                        self.metrics.sync_events("rejected", 1);
                        run.count(|report| {
                            report.batches += 1;
                            report.sent += 1;
                            report.rejected += 1;
                        });
                        run.marks
                            .lock()
                            .await
                            .push(
                                &self.writer,
                                Vec::new(),
                                vec![(part[0].seq, part[0].event.event_id, reason)],
                            )
                            .await?;
                    } else {
                        let right = part.split_off(part.len() / 2);
                        parts.push_front(right);
                        parts.push_front(part);
                    }
                }
                Err(error) => {
                    self.metrics.sync_batch("error");
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// Ships one batch with up to `max_attempts` attempts, exponential backoff with full
    /// jitter between them, and at least the backend's `Retry-After` after a 429.
    async fn ship(
        &self,
        client: &BackendClient,
        part: &[PendingEvent],
    ) -> Result<BatchResult, SyncError> {
        let install_id = client.install_id();
        // A batch often holds several events of one user: hash each user once.
        let mut user_hashes: HashMap<u64, String> = HashMap::new();
        let batch = Batch {
            batch_id: batch_id(install_id, part),
            install_id: install_id.to_owned(),
            sent_at: format_sent_at(Utc::now()),
            events: part
                .iter()
                .map(|p| {
                    let user_id = p.event.user_id;
                    let hash = user_hashes
                        .entry(user_id)
                        .or_insert_with(|| wire::user_hash(install_id, user_id));
                    WireEvent::with_user_hash(&p.event, hash.clone())
                })
                .collect(),
        };
        let prepared = PreparedBatch::new(&batch);
        // Only the JSON travels (and is re-signed on each attempt); free the events now, not
        // after the last retry, since several lanes hold a batch each.
        drop(batch);
        let retries =
            usize::try_from(self.sync.max_attempts.saturating_sub(1)).unwrap_or(usize::MAX);
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.sync.initial_backoff_ms))
            .with_max_delay(Duration::from_millis(self.sync.max_backoff_ms))
            .with_factor(2.0)
            .with_max_times(retries);
        (|| self.attempt(client, &prepared))
            .retry(backoff)
            .when(|error: &SyncError| {
                error.is_retryable()
                    && error
                        .retry_after()
                        .is_none_or(|wait| wait <= MAX_RETRY_AFTER)
            })
            .adjust(|error: &SyncError, delay| {
                delay.map(|delay| full_jitter(delay).max(error.retry_after().unwrap_or_default()))
            })
            .notify(|error: &SyncError, wait| {
                tracing::info!(
                    batch_id = %prepared.id,
                    category = %error.category(),
                    %error,
                    wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    "batch attempt failed; retrying"
                );
            })
            .await
    }

    /// One attempt, timed for `usage_agent_sync_batch_duration_seconds`; a failure is
    /// counted in the metrics and for status `error_categories` before it is returned.
    async fn attempt(
        &self,
        client: &BackendClient,
        batch: &PreparedBatch,
    ) -> Result<BatchResult, SyncError> {
        let started = Instant::now();
        let result = client.send(batch).await;
        self.metrics.sync_round_trip(started.elapsed());
        if let Err(error) = &result {
            self.metrics.sync_error(error.category().as_str());
        }
        if let Err(error) = &result
            && error.category() != Category::Local
        {
            let category = error.category().as_str();
            let at = Utc::now().timestamp_millis();
            if let Err(store_error) = self
                .writer
                .run(move |store| store.record_sync_error(at, category))
                .await
            {
                tracing::warn!(error = %store_error, "could not count a failed sync attempt");
            }
        }
        result
    }

    /// Updates the bookkeeping that status reads, in one write.
    async fn record_run(&self, started_ms: i64, error: Option<RunError>) -> Result<(), StoreError> {
        let ended_ms = Utc::now().timestamp_millis();
        self.writer
            .run(move |store| {
                let mut meta = store.sync_meta()?;
                meta.last_attempt_ms = Some(started_ms);
                match error {
                    None => {
                        meta.last_success_ms = Some(ended_ms);
                        meta.consecutive_failures = 0;
                        meta.last_run_failed = false;
                    }
                    Some(error) => {
                        meta.consecutive_failures = meta.consecutive_failures.saturating_add(1);
                        meta.last_run_failed = true;
                        meta.last_error = Some(LastError {
                            category: error.category.as_str().to_owned(),
                            message: error.message,
                            at: usage_protocol::event::format_millis(ended_ms),
                        });
                    }
                }
                store.set_sync_meta(&meta)
            })
            .await
    }

    /// Enrolls when a token is configured and the install is not enrolled yet. A failure is
    /// logged and retried at the next run; it never holds up the sync itself.
    async fn enroll_if_needed(&self) {
        if self.is_enrolled() || self.sync.enroll_token.is_empty() {
            return;
        }
        let (Some(identity), Some(backend_url)) = (&self.identity, &self.sync.backend_url) else {
            return;
        };
        match enroll::enroll(&self.http, backend_url, &self.sync.enroll_token, identity).await {
            Ok(()) => {
                self.enrolled.store(true, Ordering::Relaxed);
                let now = Utc::now();
                tracing::info!(install_id = %identity.install_id, "enrolled with the backend");
                let mut updated = identity.clone();
                updated.enrolled_at = Some(now.to_rfc3339_opts(SecondsFormat::Secs, true));
                let path = self.identity_path.clone();
                match tokio::task::spawn_blocking(move || updated.save(&path)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "enrolled, but could not record it in identity.json")
                    }
                    Err(error) => {
                        tracing::warn!(%error, "enrolled, but could not record it in identity.json")
                    }
                }
                let at = now.timestamp_millis();
                let recorded = self
                    .writer
                    .run(move |store| {
                        let mut meta = store.sync_meta()?;
                        meta.enrolled_ms = Some(at);
                        store.set_sync_meta(&meta)
                    })
                    .await;
                if let Err(error) = recorded {
                    tracing::warn!(%error, "enrolled, but could not record it in the database");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "enrollment failed; trying again at the next sync run");
            }
        }
    }

    /// Runs a read on the engine's own connection, off the async runtime.
    async fn read<R, F>(&self, work: F) -> Result<R, SyncError>
    where
        R: Send + 'static,
        F: FnOnce(&Store) -> Result<R, StoreError> + Send + 'static,
    {
        let queue = Arc::clone(&self.queue);
        tokio::task::spawn_blocking(move || {
            let store = queue
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            work(&store)
        })
        .await
        .map_err(|e| SyncError::Task(e.to_string()))?
        .map_err(SyncError::from)
    }
}

/// What the lanes of one run share.
struct Run<'a> {
    client: &'a BackendClient,
    /// The newest `seq` when the run began; later events wait for the next run.
    until: i64,
    /// The last `seq` handed to a lane.
    cursor: tokio::sync::Mutex<i64>,
    /// `sync.batch_size`, halved for the rest of the run by a 413.
    batch_size: AtomicUsize,
    report: Mutex<SyncReport>,
    marks: tokio::sync::Mutex<Marks>,
    /// The error that stopped the run; once set, lanes take no new batches.
    first_error: Mutex<Option<SyncError>>,
}

impl Run<'_> {
    fn count(&self, update: impl FnOnce(&mut SyncReport)) {
        update(&mut self.report.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn failed(&self) -> bool {
        self.first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Records the error that ends the run; a later lane's error is only logged.
    fn fail(&self, error: SyncError) {
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        match *first {
            None => *first = Some(error),
            Some(_) => tracing::info!(%error, "another batch failed as the run stopped"),
        }
    }
}

/// Writes verdicts in the background while the next batches are on the wire. At most one
/// write is outstanding; verdicts that arrive meanwhile wait and go together in the next
/// write, so a fast backend costs one commit per write, not one per batch. Marking late is
/// safe: an event re-sent after a crash is a duplicate at the backend, never counted twice.
#[derive(Default)]
struct Marks {
    writing: Option<tokio::task::JoinHandle<Result<(), StoreError>>>,
    synced: Vec<(i64, Uuid)>,
    failed: Vec<(i64, Uuid, String)>,
}

impl Marks {
    async fn push(
        &mut self,
        writer: &Writer,
        synced: Vec<(i64, Uuid)>,
        failed: Vec<(i64, Uuid, String)>,
    ) -> Result<(), SyncError> {
        self.synced.extend(synced);
        self.failed.extend(failed);
        if self
            .writing
            .as_ref()
            .is_some_and(|handle| !handle.is_finished())
        {
            return Ok(());
        }
        self.wait().await?;
        self.start(writer);
        Ok(())
    }

    /// Waits for every verdict received so far to be committed.
    async fn finish(&mut self, writer: &Writer) -> Result<(), SyncError> {
        self.wait().await?;
        if !self.synced.is_empty() || !self.failed.is_empty() {
            self.start(writer);
            self.wait().await?;
        }
        Ok(())
    }

    fn start(&mut self, writer: &Writer) {
        let synced = std::mem::take(&mut self.synced);
        let failed = std::mem::take(&mut self.failed);
        let writer = writer.clone();
        self.writing = Some(tokio::spawn(async move {
            let at = Utc::now().timestamp_millis();
            writer
                // One transaction records every verdict and moves the queue's cursor.
                .run(move |store| store.record_verdicts(&synced, &failed, at).map(drop))
                .await
        }));
    }

    async fn wait(&mut self) -> Result<(), SyncError> {
        match self.writing.take() {
            None => Ok(()),
            Some(handle) => handle
                .await
                .map_err(|e| SyncError::Task(e.to_string()))?
                .map_err(SyncError::from),
        }
    }
}

/// The events (`seq` and id) to mark synced, and those to mark failed with the backend's
/// reason.
type Verdicts = (Vec<(i64, Uuid)>, Vec<(i64, Uuid, String)>);

/// Splits a 2xx answer into the events to mark synced and those to mark failed. The answer
/// must account for every event of the batch, or nothing is marked: an event is synced only
/// on the backend's word that it was stored or already there.
fn verdicts(part: &[PendingEvent], answer: &BatchResult) -> Result<Verdicts, SyncError> {
    let seqs: HashMap<Uuid, i64> = part.iter().map(|p| (p.event.event_id, p.seq)).collect();
    let mut rejected = HashSet::new();
    let mut failed = Vec::new();
    for entry in &answer.rejected {
        let named = Uuid::parse_str(&entry.event_id)
            .ok()
            .and_then(|id| seqs.get(&id).map(|seq| (*seq, id)));
        let Some((seq, id)) = named else {
            return Err(SyncError::BadAnswer(format!(
                "it rejects event {:?}, which is not in the batch",
                entry.event_id
            )));
        };
        if rejected.insert(seq) {
            failed.push((seq, id, entry.reason.clone()));
        }
    }
    let synced: Vec<(i64, Uuid)> = part
        .iter()
        .map(|p| (p.seq, p.event.event_id))
        .filter(|(seq, _)| !rejected.contains(seq))
        .collect();
    let counted = answer.accepted.saturating_add(answer.duplicates);
    if counted != synced.len() as u64 {
        return Err(SyncError::BadAnswer(format!(
            "it counts {counted} events accepted or duplicate, but {} of the batch were not rejected",
            synced.len()
        )));
    }
    Ok((synced, failed))
}

/// The batch id: derived from the install and the event ids, so the same batch keeps the
/// same `webhook-id` on every retry, in this run or a later one, even after a restart.
pub fn batch_id(install_id: &str, part: &[PendingEvent]) -> Uuid {
    let mut hasher = Sha256::new();
    hasher.update(install_id.as_bytes());
    for pending in part {
        hasher.update(pending.event.event_id.as_bytes());
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Full jitter: a uniformly random wait between zero and `delay`.
pub fn full_jitter(delay: Duration) -> Duration {
    // Without randomness, half the delay still spreads retries better than none.
    let random = getrandom::u64().unwrap_or(u64::MAX / 2);
    let fraction = (random >> 11) as f64 / (1u64 << 53) as f64;
    delay.mul_f64(fraction)
}

#[cfg(test)]
mod tests;
