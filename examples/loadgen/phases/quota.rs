//! The quota phase, against one agent with every limit set:
//!
//! - recording beside quota questions asked at the recording's own pace (one question per
//!   event, from 4 other clients, as a site asks once per call), against the same recording
//!   alone (alternated, twice each): what reading the quotas costs the recording; and the
//!   same 4 clients asking before each event themselves (each event then waits for an
//!   answer first);
//! - quota questions (`GET /v1/quota`) and holds (`POST /v1/quota/holds`) at 32 clients as
//!   fast as they go, while 4 clients record at the same time: how many answers the agent
//!   gives, and what that flood leaves of the recording on a machine it saturates.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::Options;
use crate::client::{connect, exchange};
use crate::phases::ingest::{Phase, PhaseResult, run_phase};
use crate::roles::Agent;

/// Clients asking the quotas.
const ASKING_CLIENTS: usize = 32;
/// Clients recording events meanwhile: a site's steady traffic, not a flood.
const RECORDING_CLIENTS: usize = 4;
/// Clients asking at the recording's pace.
const PACED_CLIENTS: usize = 4;
/// Every limit set, high enough that every answer is "allowed" and every hold is granted
/// (the answer is worked out in full either way); holds expire after a second, so open
/// holds stay far below the agent's cap.
const QUOTA_TABLE: &str = "[quota]\n\
    user_daily_tokens = 1000000000000\n\
    user_monthly_tokens = 1000000000000\n\
    site_daily_tokens = 1000000000000000\n\
    site_monthly_tokens = 1000000000000000\n\
    hold_ttl_secs = 1\n";

/// What the quota phase measured.
pub(crate) struct QuotaFigures {
    pub(crate) get: PhaseResult,
    pub(crate) hold: PhaseResult,
    /// Events recorded alone, beside questions at their pace, and asking before each
    /// (both runs of each summed).
    pub(crate) record_alone: PhaseResult,
    pub(crate) record_paced: PhaseResult,
    /// The questions asked beside `record_paced` (about one per event).
    pub(crate) paced_questions: PhaseResult,
    pub(crate) record_asking: PhaseResult,
    /// Recording beside the 32 clients of `get` and of `hold`.
    pub(crate) record_with_get: PhaseResult,
    pub(crate) record_with_hold: PhaseResult,
}

#[derive(Clone, Copy)]
enum Ask {
    Question,
    Hold,
}

pub(crate) fn quota_phase(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    options: &Options,
    events: usize,
    cap: Duration,
) -> anyhow::Result<QuotaFigures> {
    let agent = Agent::start_with(&dir.join("quota"), options, None, QUOTA_TABLE)?;
    let socket = agent.socket.clone();
    let recording = Phase::single(RECORDING_CLIENTS, events / 4, cap);
    let mut record_alone = PhaseResult::default();
    let mut record_paced = PhaseResult::default();
    let mut paced_questions = PhaseResult::default();
    let mut record_asking = PhaseResult::default();
    for _ in 0..2 {
        let alone = runtime.block_on(run_phase(&socket, recording))?;
        // One question per event: each paced client asks every PACED_CLIENTS / rate s.
        let every = Duration::from_secs_f64(PACED_CLIENTS as f64 / alone.eps().max(1.0));
        add(&mut record_alone, alone);
        let (paced, questions) = runtime.block_on(beside_recording(
            &socket,
            recording,
            Ask::Question,
            PACED_CLIENTS,
            Some(every),
        ))?;
        add(&mut record_paced, paced);
        add(&mut paced_questions, questions);
        add(
            &mut record_asking,
            runtime.block_on(asking_first(&socket, recording))?,
        );
    }
    let (record_with_get, get) = runtime.block_on(beside_recording(
        &socket,
        recording,
        Ask::Question,
        ASKING_CLIENTS,
        None,
    ))?;
    let (record_with_hold, hold) = runtime.block_on(beside_recording(
        &socket,
        recording,
        Ask::Hold,
        ASKING_CLIENTS,
        None,
    ))?;
    agent.stop()?;
    for (name, result) in [
        ("recording alone", &record_alone),
        ("recording beside paced questions", &record_paced),
        ("paced questions", &paced_questions),
        ("recording asking first", &record_asking),
        ("recording beside questions", &record_with_get),
        ("recording beside holds", &record_with_hold),
        ("questions", &get),
        ("holds", &hold),
    ] {
        if result.failures > 0 {
            bail!(
                "quota phase, {name}: {} requests failed: {}",
                result.failures,
                result.first_failure
            );
        }
    }
    Ok(QuotaFigures {
        get,
        hold,
        record_alone,
        record_paced,
        paced_questions,
        record_asking,
        record_with_get,
        record_with_hold,
    })
}

/// Adds one run's events, time and failures to `total`.
fn add(total: &mut PhaseResult, run: PhaseResult) {
    total.elapsed += run.elapsed;
    total.absorb(run);
}

/// Records as a site with quotas does: each client asks `GET /v1/quota` for the event's
/// user, then posts the event.
async fn asking_first(socket: &Path, recording: Phase) -> anyhow::Result<PhaseResult> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(recording.clients);
    let started = Instant::now();
    for client in 0..recording.clients {
        let socket = socket.to_path_buf();
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move {
            let mut result = PhaseResult::default();
            let mut generator = crate::generator::Generator::new(1_000 + client as u64);
            let deadline = Instant::now() + recording.cap;
            let mut connection = match connect(&socket).await {
                Ok(connection) => connection,
                Err(error) => {
                    result.failures = 1;
                    result.first_failure = format!("{error:#}");
                    return result;
                }
            };
            while next.fetch_add(1, Ordering::Relaxed) < recording.requests
                && Instant::now() < deadline
            {
                let user = client as u64;
                let path = format!("/v1/quota?user_id={user}&tokens=2000");
                let asked = exchange(&mut connection, "GET", &path, String::new()).await;
                let recorded = match asked {
                    Ok((200, _)) => {
                        exchange(&mut connection, "POST", "/v1/events", generator.next_json()).await
                    }
                    other => other,
                };
                match recorded {
                    Ok((202, _)) => result.events += 1,
                    Ok((status, answer)) => {
                        if result.failures == 0 {
                            result.first_failure =
                                format!("{status}: {}", String::from_utf8_lossy(&answer));
                        }
                        result.failures += 1;
                    }
                    Err(error) => {
                        result.failures += 1;
                        result.first_failure = format!("{error:#}");
                        break;
                    }
                }
            }
            result
        }));
    }
    let mut total = PhaseResult::default();
    for task in tasks {
        total.absorb(task.await.context("a recording client panicked")?);
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

/// Records `recording` while `clients` clients ask, each as fast as it is answered or once
/// `every`; the asking stops when the recording ends.
async fn beside_recording(
    socket: &Path,
    recording: Phase,
    ask: Ask,
    clients: usize,
    every: Option<Duration>,
) -> anyhow::Result<(PhaseResult, PhaseResult)> {
    let stop = Arc::new(AtomicBool::new(false));
    let asking = tokio::spawn(asking(
        socket.to_path_buf(),
        ask,
        Arc::clone(&stop),
        clients,
        every,
    ));
    let recorded = run_phase(socket, recording).await;
    stop.store(true, Ordering::Relaxed);
    let asked = asking.await.context("the asking clients panicked")??;
    Ok((recorded?, asked))
}

/// `clients` keep-alive clients each asking in turn (at most once `every`) until `stop`;
/// every request's latency is kept.
async fn asking(
    socket: std::path::PathBuf,
    ask: Ask,
    stop: Arc<AtomicBool>,
    clients: usize,
    every: Option<Duration>,
) -> anyhow::Result<PhaseResult> {
    let mut tasks = Vec::with_capacity(clients);
    for client in 0..clients {
        let socket = socket.clone();
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut pace = every.map(|every| {
                let mut pace = tokio::time::interval(every);
                // Timer ticks are coarser than the pace: catch up in bursts, so the rate
                // holds on average.
                pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                pace
            });
            let mut result = PhaseResult::default();
            let mut connection = match connect(&socket).await {
                Ok(connection) => connection,
                Err(error) => {
                    result.failures = 1;
                    result.first_failure = format!("{error:#}");
                    return result;
                }
            };
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some(pace) = pace.as_mut() {
                    pace.tick().await;
                }
                n += 1;
                let user = client as u64 * 1_000 + n % 1_000;
                let (method, path, body, expect) = match ask {
                    Ask::Question => (
                        "GET",
                        format!("/v1/quota?user_id={user}&tokens=2000"),
                        String::new(),
                        200,
                    ),
                    Ask::Hold => (
                        "POST",
                        "/v1/quota/holds".to_owned(),
                        format!(r#"{{"user_id":{user},"tokens":2000}}"#),
                        201,
                    ),
                };
                let sent = Instant::now();
                match exchange(&mut connection, method, &path, body).await {
                    Ok((status, _)) if status == expect => {
                        result
                            .latencies_us
                            .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        result.events += 1;
                    }
                    Ok((status, answer)) => {
                        if result.failures == 0 {
                            result.first_failure =
                                format!("{status}: {}", String::from_utf8_lossy(&answer));
                        }
                        result.failures += 1;
                    }
                    Err(error) => {
                        if result.failures == 0 {
                            result.first_failure = format!("{error:#}");
                        }
                        result.failures += 1;
                        break;
                    }
                }
            }
            result
        }));
    }
    let started = Instant::now();
    let mut total = PhaseResult::default();
    for task in tasks {
        total.absorb(task.await.context("an asking client panicked")?);
    }
    total.elapsed = started.elapsed();
    total.latencies_us.sort_unstable();
    Ok(total)
}
