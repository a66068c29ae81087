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
//! **Backpressure is not failure:** a `429` pauses every lane of the run until its
//! `Retry-After` has passed, costs the batch none of its `max_attempts`, and doubles the
//! run's batch size (up to the wire maximum), so a backlog drains within the backend's
//! request allowance. A run waits out rate limits only within its time budget
//! ([`run_budget`]); a run stopped by one is not a failed run (status stays `pending`).
//!
//! **Invariants:** an event becomes `synced` only after a 2xx answer that accepted or
//! deduplicated it; it becomes `failed` only when the backend refused that one event
//! (a per-event reject, or a validation refusal of a batch bisected down to it);
//! transient errors (network, server, rate limit) and authentication errors leave every
//! event pending. Nothing here deletes an event.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
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
use crate::store::sync::PendingRow;
use crate::store::writer::Writer;
use crate::store::{Store, StoreError};
use usage_protocol::event::MillisText;
use usage_protocol::wire::{
    self, BatchResult, MAX_BATCH_EVENTS, WireEventRef, format_sent_at, raw_context,
};

/// The sync job's name in `usage_agent_job_runs_total` and the other job metrics.
pub const SYNC_JOB: &str = "sync";

/// The longest a run may wait out the backend's rate limit, whatever the interval: a
/// backend asking for more gets the events at a later run instead of holding this one (and
/// a manual `sync`) hostage.
pub const MAX_RUN_BUDGET: Duration = Duration::from_secs(600);

/// A run that finds more than this many batches' worth of events pending sends larger
/// batches: the backlog over this many requests (up to the wire maximum). 100 is the
/// receiver's default requests per install per minute, so a backlog fits, where it can, in
/// one minute's allowance.
pub const BACKLOG_BATCHES: u64 = 100;

/// How long one run may go on waiting for rate limits: until one request's time
/// (`sync.request_timeout_secs`) before the next scheduled run, so the request after the
/// last wait still ends before that run is due (but at least half of
/// `sync.interval_secs`), and never more than [`MAX_RUN_BUDGET`]. A `Retry-After` that
/// ends past it stops the run; the next run goes on.
pub fn run_budget(sync: &SyncConfig) -> Duration {
    let interval = Duration::from_secs(sync.interval_secs);
    let before_next = interval.saturating_sub(Duration::from_secs(sync.request_timeout_secs));
    before_next.max(interval / 2).min(MAX_RUN_BUDGET)
}

/// The batch size a run starts with: `sync.batch_size`, or more when the backlog is over
/// [`BACKLOG_BATCHES`] batches of it, up to the wire maximum.
pub fn start_batch_size(configured: usize, backlog: u64) -> usize {
    let wanted = usize::try_from(backlog.div_ceil(BACKLOG_BATCHES)).unwrap_or(usize::MAX);
    wanted.clamp(configured.clamp(1, MAX_BATCH_EVENTS), MAX_BATCH_EVENTS)
}

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
    /// Events per batch in the run in progress, or in the last one.
    batch_size: AtomicUsize,
    /// Unix ms until which the backend asked this install to wait (its last `Retry-After`),
    /// 0 when it never did; later runs honour it too.
    rate_limited_until_ms: AtomicI64,
    /// Each user's `user_hash`, computed once rather than once per batch.
    user_hashes: Arc<Mutex<UserHashes>>,
}

/// What status shows of the sync in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncProgress {
    /// A run is in progress.
    pub running: bool,
    /// Events per batch in the run in progress, or in the last one.
    pub batch_size: usize,
    /// Unix ms until which the backend asked the agent to wait, if that is still ahead.
    pub rate_limited_until_ms: Option<i64>,
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
            batch_size: AtomicUsize::new(config.sync.batch_size.max(1)),
            rate_limited_until_ms: AtomicI64::new(0),
            user_hashes: Arc::default(),
        })
    }

    /// The run in progress (or the last one) as status shows it.
    pub fn progress(&self, now_ms: i64) -> SyncProgress {
        let until = self.rate_limited_until_ms.load(Ordering::Relaxed);
        SyncProgress {
            running: self.running.try_lock().is_err(),
            batch_size: self.batch_size.load(Ordering::Relaxed),
            rate_limited_until_ms: (until > now_ms).then_some(until),
        }
    }

    /// Whether this install is known to be enrolled with the backend.
    pub fn is_enrolled(&self) -> bool {
        self.enrolled.load(Ordering::Relaxed)
    }

    /// Runs a sync now, after any run in progress has finished, and counts it as a run of
    /// the `sync` job (failed when it ended with an error other than the backend's rate
    /// limit).
    pub async fn run_now(&self) -> SyncReport {
        let _running = self.running.lock().await;
        let report = self.run_once().await;
        let paced = report
            .error
            .as_ref()
            .is_some_and(|error| error.category == Category::RateLimit);
        self.metrics
            .job_run(SYNC_JOB, report.error.is_none() || paced);
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
        let result = self.drain(&mut report, started).await;
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

    async fn drain(&self, report: &mut SyncReport, started: Instant) -> Result<(), SyncError> {
        let client = self.client.as_ref().ok_or(SyncError::NoIdentity)?;
        let (until, backlog) = self
            .read(|store| Ok((store.last_seq()?, store.queue_counts()?.pending)))
            .await?;
        let batch_size = start_batch_size(self.sync.batch_size, backlog);
        self.batch_size.store(batch_size, Ordering::Relaxed);
        if batch_size > self.sync.batch_size {
            tracing::info!(
                backlog,
                batch_size,
                "a large backlog: sending larger batches this run"
            );
        }
        // A `Retry-After` a previous run was told still holds.
        let now_ms = Utc::now().timestamp_millis();
        let resume_ms = self.rate_limited_until_ms.load(Ordering::Relaxed) - now_ms;
        let resume = (resume_ms > 0)
            .then(|| Instant::now() + Duration::from_millis(resume_ms.unsigned_abs()));
        let run = Run {
            client,
            until,
            cursor: tokio::sync::Mutex::new(0),
            batch_size: AtomicUsize::new(batch_size),
            ceiling: AtomicUsize::new(MAX_BATCH_EVENTS),
            deadline: started + run_budget(&self.sync),
            pace: Mutex::new(Pace {
                until: resume,
                grown_at: started,
            }),
            met_rate_limit: AtomicBool::new(resume.is_some()),
            single_file: tokio::sync::Mutex::new(()),
            report: Mutex::new(SyncReport::default()),
            marks: tokio::sync::Mutex::new(Marks::default()),
            first_error: Mutex::new(None),
        };
        // The first batch goes alone: a backend that refuses the credentials, or is down,
        // sees one request (and its retries), not one per lane.
        if self.next_batch(&run).await {
            let lanes = (0..in_flight(batch_size)).map(|lane| self.lane(&run, lane));
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
    /// lane has failed. Lanes past what the grown batch size allows ([`in_flight`]) stop,
    /// so the events in flight stay bounded.
    async fn lane(&self, run: &Run<'_>, lane: usize) {
        while lane < in_flight(run.batch_size.load(Ordering::Relaxed)) && self.next_batch(run).await
        {
        }
    }

    /// Reads the next batch and ships it; false once there is nothing more to do. The
    /// read happens under the cursor's lock, so lanes cut disjoint batches in arrival
    /// order; shipping happens outside it, so several batches are on the wire at once.
    async fn next_batch(&self, run: &Run<'_>) -> bool {
        let read = async {
            let mut after = run.cursor.lock().await;
            if run.failed() {
                return Ok(PartWriter::with_capacity(0).finish());
            }
            let (from, until, limit) = (*after, run.until, run.batch_size.load(Ordering::Relaxed));
            let install_id = run.client.install_id().to_owned();
            let user_hashes = Arc::clone(&self.user_hashes);
            let part = self
                .read(move |store| {
                    let mut user_hashes = user_hashes.lock().unwrap_or_else(|p| p.into_inner());
                    let mut part = PartWriter::with_capacity(limit);
                    store.pending_each(from, until, limit, |row| {
                        part.push(&row, &install_id, &mut user_hashes);
                    })?;
                    Ok(part.finish())
                })
                .await?;
            if let Some((last, _)) = part.events.last() {
                *after = *last;
            }
            Ok(part)
        };
        let shipped = match read.await {
            Ok(part) if part.events.is_empty() => return false,
            Ok(part) => self.ship_parts(run, part).await,
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
    async fn ship_parts(&self, run: &Run<'_>, events: Part) -> Result<(), SyncError> {
        let mut parts = VecDeque::from([events]);
        while let Some(mut part) = parts.pop_front() {
            let batch_size = run.batch_size.load(Ordering::Relaxed);
            if part.len() > batch_size {
                // A 413 shrank the batch size since this part was cut.
                let rest = part.split_off(batch_size);
                parts.push_front(rest);
            }
            match self.ship(run, &mut part).await {
                Ok(answer) => {
                    let (synced, failed) = verdicts(&part.events, &answer)?;
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
                        run.ceiling.fetch_min(halved, Ordering::Relaxed);
                        let before = run.batch_size.fetch_min(halved, Ordering::Relaxed);
                        self.batch_size
                            .store(run.batch_size.load(Ordering::Relaxed), Ordering::Relaxed);
                        if halved < before {
                            tracing::warn!(
                                batch_size = halved,
                                "the backend found a batch too large; halving the batch size for this run"
                            );
                        }
                    }
                    if part.len() == 1 {
                        let reason = error.to_string();
                        let (seq, event_id) = part.events[0];
                        tracing::warn!(seq, %reason, "the backend refused an event; it is now failed");
                        self.metrics.sync_events("rejected", 1);
                        run.count(|report| {
                            report.batches += 1;
                            report.sent += 1;
                            report.rejected += 1;
                        });
                        run.marks
                            .lock()
                            .await
                            .push(&self.writer, Vec::new(), vec![(seq, event_id, reason)])
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
    /// jitter between them. A `429` is the backend pacing the run, not a failed attempt: the
    /// whole run waits out its `Retry-After` (at least the first backoff step) and the batch
    /// goes again, as long as the wait ends within the run's budget.
    async fn ship(&self, run: &Run<'_>, part: &mut Part) -> Result<BatchResult, SyncError> {
        let client = run.client;
        let prepared = part.prepare(client.install_id());
        let mut failed_attempts: u32 = 0;
        let mut paced: u32 = 0;
        loop {
            // Once paced, the lanes send one at a time: woken together, they would spend
            // the backend's next free request on one and draw 429s for the rest.
            let single_file = match run.met_rate_limit.load(Ordering::Relaxed) {
                true => Some(run.single_file.lock().await),
                false => None,
            };
            run.wait_turn().await?;
            let sent_at = Instant::now();
            let result = self.attempt(client, &prepared).await;
            drop(single_file);
            let error = match result {
                Ok(answer) => return Ok(answer),
                Err(error) => error,
            };
            let wait = if error.category() == Category::RateLimit {
                paced = paced.saturating_add(1);
                let wait = match error.retry_after() {
                    Some(asked) => asked.max(full_jitter(self.backoff(1))),
                    None => full_jitter(self.backoff(paced)),
                };
                self.pace(run, wait, sent_at);
                tracing::info!(
                    batch_id = %prepared.id,
                    %error,
                    wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    batch_size = run.batch_size.load(Ordering::Relaxed),
                    "the backend is pacing this install; waiting before the next batch"
                );
                continue;
            } else if error.is_retryable() && failed_attempts + 1 < self.sync.max_attempts {
                failed_attempts += 1;
                full_jitter(self.backoff(failed_attempts))
            } else {
                return Err(error);
            };
            tracing::info!(
                batch_id = %prepared.id,
                category = %error.category(),
                %error,
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "batch attempt failed; retrying"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// The `n`th backoff step (from 1): `initial_backoff_ms` doubled each step, capped at
    /// `max_backoff_ms`; full jitter is applied by the caller.
    fn backoff(&self, n: u32) -> Duration {
        let doublings = n.saturating_sub(1).min(32);
        let delay = self
            .sync
            .initial_backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(self.sync.max_backoff_ms);
        Duration::from_millis(delay)
    }

    /// A `429` for an attempt sent at `sent_at`: every lane holds off for `wait`, and the
    /// batch size doubles (up to the wire maximum, and never past a size the backend found
    /// too large), once per pause: answers to attempts sent before the last growth do
    /// not grow it again.
    fn pace(&self, run: &Run<'_>, wait: Duration, sent_at: Instant) {
        let now = Instant::now();
        let until = now + wait;
        run.met_rate_limit.store(true, Ordering::Relaxed);
        let mut pace = run.pace.lock().unwrap_or_else(|p| p.into_inner());
        pace.until = Some(pace.until.map_or(until, |held| held.max(until)));
        let until_ms =
            Utc::now().timestamp_millis() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
        self.rate_limited_until_ms
            .fetch_max(until_ms, Ordering::Relaxed);
        if sent_at < pace.grown_at {
            return;
        }
        pace.grown_at = now;
        let ceiling = run.ceiling.load(Ordering::Relaxed);
        let grown = run
            .batch_size
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |size| {
                let grown = size.saturating_mul(2).min(ceiling);
                (grown > size).then_some(grown)
            });
        if let Ok(before) = grown {
            let now_size = run.batch_size.load(Ordering::Relaxed);
            self.batch_size.store(now_size, Ordering::Relaxed);
            tracing::info!(
                from = before,
                to = now_size,
                "rate limited with events waiting: sending larger batches"
            );
        }
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

    /// Updates the bookkeeping that status reads, in one write. A run stopped by the
    /// backend's rate limit is not a failed run: the backend answered and knows this
    /// install, so the streak of failures ends and status stays `pending`.
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
                        meta.last_run_rate_limited = false;
                    }
                    Some(error) if error.category == Category::RateLimit => {
                        meta.consecutive_failures = 0;
                        meta.last_run_failed = false;
                        meta.last_run_rate_limited = true;
                    }
                    Some(error) => {
                        meta.consecutive_failures = meta.consecutive_failures.saturating_add(1);
                        meta.last_run_failed = true;
                        meta.last_run_rate_limited = false;
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
    /// Events per batch: the start size, doubled by a 429, halved by a 413.
    batch_size: AtomicUsize,
    /// The largest batch size the backend has not found too large (413) this run.
    ceiling: AtomicUsize,
    /// The end of the run's budget ([`run_budget`]): no rate-limit wait goes past it.
    deadline: Instant,
    /// The backend's pacing of this run.
    pace: Mutex<Pace>,
    /// Whether the backend has paced this run; from then on lanes send one at a time,
    /// taking turns through `single_file`.
    met_rate_limit: AtomicBool,
    single_file: tokio::sync::Mutex<()>,
    report: Mutex<SyncReport>,
    marks: tokio::sync::Mutex<Marks>,
    /// The error that stopped the run; once set, lanes take no new batches.
    first_error: Mutex<Option<SyncError>>,
}

/// The backend's pacing of one run.
struct Pace {
    /// No lane sends before this instant (the latest `Retry-After`).
    until: Option<Instant>,
    /// When the batch size last grew on a `429`.
    grown_at: Instant,
}

impl Run<'_> {
    /// Waits until the backend's rate limit lets the run send again. A wait that would end
    /// past the run's budget stops the run instead (category `rate_limit`): the events stay
    /// pending for the next run.
    async fn wait_turn(&self) -> Result<(), SyncError> {
        loop {
            let until = self.pace.lock().unwrap_or_else(|p| p.into_inner()).until;
            let now = Instant::now();
            let Some(until) = until.filter(|until| *until > now) else {
                return Ok(());
            };
            if until > self.deadline {
                let left = until - now;
                return Err(SyncError::RateLimited {
                    retry_after: Some(left),
                    message: format!(
                        "the next batch may go in {} s, past this run's time budget; the next run goes on",
                        left.as_secs_f64().ceil()
                    ),
                });
            }
            tokio::time::sleep_until(until.into()).await;
        }
    }

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
fn verdicts(part: &[(i64, Uuid)], answer: &BatchResult) -> Result<Verdicts, SyncError> {
    let seqs: HashMap<Uuid, i64> = match answer.rejected.is_empty() {
        true => HashMap::new(),
        false => part.iter().map(|(seq, id)| (*id, *seq)).collect(),
    };
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
        .copied()
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
pub fn batch_id(install_id: &str, part: &[(i64, Uuid)]) -> Uuid {
    let mut hasher = Sha256::new();
    hasher.update(install_id.as_bytes());
    for (_, event_id) in part {
        hasher.update(event_id.as_bytes());
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Users whose `user_hash` is kept; past this the cache starts again, so a site with very
/// many users costs a hash per user per batch, as it did before, and no more memory.
const USER_HASHES_KEPT: usize = 4_096;

/// Each user's `user_hash` for one install, computed once.
#[derive(Default)]
struct UserHashes {
    install_id: String,
    hashes: HashMap<u64, String>,
}

impl UserHashes {
    fn get(&mut self, install_id: &str, user_id: u64) -> &str {
        if self.install_id != install_id {
            self.hashes.clear();
            install_id.clone_into(&mut self.install_id);
        }
        if self.hashes.len() >= USER_HASHES_KEPT && !self.hashes.contains_key(&user_id) {
            self.hashes.clear();
        }
        self.hashes
            .entry(user_id)
            .or_insert_with(|| wire::user_hash(install_id, user_id))
    }
}

/// Events of one batch (or of part of one, after a split), each already in its wire JSON:
/// written once, straight from the rows, and reused as they are when part of the batch
/// goes again on its own.
struct Part {
    /// `(seq, event_id)` of each event, in arrival order.
    events: Vec<(i64, Uuid)>,
    /// Holds each event's JSON, at `spans`: the events written back to back as read, then
    /// the body last sent, whose events they are.
    json: Text,
    spans: Vec<std::ops::Range<usize>>,
}

/// Where a [`Part`]'s JSON is.
#[derive(Clone)]
enum Text {
    Plain(Bytes),
    /// In the gzipped body last sent, which is all a batch on the wire keeps.
    Sent(Arc<PreparedBatch>),
}

impl Text {
    fn bytes(&self) -> Bytes {
        match self {
            Text::Plain(json) => json.clone(),
            Text::Sent(batch) => batch.json(),
        }
    }
}

/// A [`Part`] being read from the queue.
struct PartWriter {
    events: Vec<(i64, Uuid)>,
    json: Vec<u8>,
    spans: Vec<std::ops::Range<usize>>,
}

impl PartWriter {
    fn with_capacity(events: usize) -> PartWriter {
        PartWriter {
            events: Vec::with_capacity(events),
            // About what one event's JSON takes, so the buffer seldom grows.
            json: Vec::with_capacity(events.saturating_mul(400)),
            spans: Vec::with_capacity(events),
        }
    }

    /// Appends one event read from the queue, in its wire form.
    fn push(&mut self, row: &PendingRow<'_>, install_id: &str, user_hashes: &mut UserHashes) {
        let created_at = MillisText::new(row.created_at_ms);
        let wire = WireEventRef {
            event_id: row.event_id,
            user_hash: user_hashes.get(install_id, row.user_id),
            source: row.source,
            model: row.model,
            prompt_tokens: row.tokens.prompt,
            completion_tokens: row.tokens.completion,
            total_tokens: row.tokens.total(),
            cached_tokens: row.tokens.cached,
            cache_write_tokens: row.tokens.cache_write,
            reasoning_tokens: row.tokens.reasoning,
            origin: row.origin,
            // A damaged context is left out rather than making the batch unreadable.
            context: row.context.and_then(raw_context),
            created_at: created_at.as_str(),
        };
        let start = self.json.len();
        wire.write_json(&mut self.json);
        self.spans.push(start..self.json.len());
        self.events.push((row.seq, row.event_id));
    }

    fn finish(self) -> Part {
        Part {
            events: self.events,
            json: Text::Plain(Bytes::from(self.json)),
            spans: self.spans,
        }
    }
}

impl Part {
    fn len(&self) -> usize {
        self.events.len()
    }

    /// The batch of these events, signed anew on each attempt but serialized once: its
    /// id comes from the install and the event ids, `sent_at` is now. From now on the
    /// events' JSON is read from this batch, so the buffer they were written into is freed.
    fn prepare(&mut self, install_id: &str) -> Arc<PreparedBatch> {
        let id = batch_id(install_id, &self.events);
        let source = self.json.bytes();
        let size: usize = self.spans.iter().map(|span| span.len() + 1).sum();
        let mut body = Vec::with_capacity(size + install_id.len() + 128);
        let spans = wire::batch_json(
            id,
            install_id,
            &format_sent_at(Utc::now()),
            self.spans.iter().map(|span| &source[span.clone()]),
            &mut body,
        );
        drop(source);
        let body = Bytes::from(body);
        let prepared = Arc::new(PreparedBatch::from_json(id, body.clone()));
        self.json = match prepared.is_gzipped() {
            true => Text::Sent(Arc::clone(&prepared)),
            false => Text::Plain(body),
        };
        self.spans = spans;
        prepared
    }

    /// Splits off the events from `at` on, as [`Vec::split_off`]; both parts keep reading
    /// their JSON from the same place.
    fn split_off(&mut self, at: usize) -> Part {
        Part {
            events: self.events.split_off(at),
            json: self.json.clone(),
            spans: self.spans.split_off(at),
        }
    }
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
