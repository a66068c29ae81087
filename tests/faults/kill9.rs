//! Kill -9 at random moments. A workload runs against the real agent (clients posting
//! batches, sync runs, rollups, purges of planted old days, erasures of users) while a real
//! receiver takes the batches; the agent is SIGKILLed at a seeded random moment of one
//! phase, restarted on the same data dir, and then everything acknowledged must be at the
//! receiver exactly once, every daily summary must equal its raw events, and erased users
//! must be gone from the agent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{TestReceiver, receiver_settings};
use crate::support::{
    DAY_MS, Ledger, Rng, call, day_of, enrolled_agent, install_id, plant_old_events, post_events,
    random_event, rfc3339, seed, socket_client, start, sync_table, verify,
};

const PHASES: [&str; 5] = ["ingest", "sync", "rollup", "purge", "erasure"];
/// Clients posting during every kill window.
const CLIENTS: usize = 3;
/// Every tenth restart (and the last) checks every day; the others check the days the
/// iteration's events fall on (and a planted day), so a check costs the same late in the
/// run as early.
const FULL_CHECK_EVERY: usize = 10;

/// What one client request carried and whether it was answered `202`.
type Noted = Arc<Mutex<Vec<(Vec<Value>, bool)>>>;

/// Posts random batches of users 1..=20 (created `ages` days ago) until `stop`, noting
/// each request's outcome.
fn spawn_client(
    client: reqwest::Client,
    mut rng: Rng,
    ages: (u64, u64),
    stop: Arc<AtomicBool>,
    noted: Noted,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let size = rng.range(1, 6);
            let events: Vec<Value> = (0..size)
                .map(|_| {
                    let user = rng.range(1, 21);
                    random_event(&mut rng, user, ages)
                })
                .collect();
            let acked = matches!(post_events(&client, &events).await, Ok(Some(_)));
            noted.lock().unwrap().push((events, acked));
        }
    })
}

/// Posts `count` events (of `user`, or of users 1..=20) and requires `202`s.
async fn post_acked(
    client: &reqwest::Client,
    rng: &mut Rng,
    ledger: &mut Ledger,
    user: Option<u64>,
    count: u64,
    ages: (u64, u64),
) {
    let events: Vec<Value> = (0..count)
        .map(|_| {
            let user = user.unwrap_or_else(|| rng.range(1, 21));
            random_event(rng, user, ages)
        })
        .collect();
    for chunk in events.chunks(200) {
        assert!(
            post_events(client, chunk)
                .await
                .expect("the agent answers")
                .is_some(),
            "a 202 for a batch"
        );
        ledger.note(chunk, true);
    }
}

/// An operation sent to the agent, and when (if ever) it was answered.
struct Op {
    started: Instant,
    task: tokio::task::JoinHandle<(reqwest::Result<(StatusCode, Value)>, Instant)>,
}

fn start_op(client: &reqwest::Client, method: Method, path: String) -> Op {
    let client = client.clone();
    Op {
        started: Instant::now(),
        task: tokio::spawn(async move {
            let body = (method != Method::DELETE).then(|| json!({}));
            let answer = call(&client, method, &path, body.as_ref()).await;
            (answer, Instant::now())
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_acknowledged_and_counts_nothing_twice() {
    // The loop loads the machine: the latency tests wait for it to end.
    let _alone = crate::support::EXCLUSIVE.lock().await;
    let seed = seed("kill_9_at_random_moments_loses_nothing_acknowledged_and_counts_nothing_twice");
    let mut rng = Rng::new(seed);
    let kills: usize = std::env::var("FAULT_KILLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let began = Instant::now();

    let rx = TestReceiver::start(receiver_settings());
    let tables = sync_table(
        &rx.url(""),
        "interval_secs = 1\nbatch_size = 10\nrequest_timeout_secs = 5",
    );
    // `full` is the default durability, and the one whose commits go through the
    // gathering VFS (which holds WAL writes back until the commit's sync).
    let mut agent = enrolled_agent("synchronous = \"full\"", &tables, &rx.url(""));
    start(&mut agent).await;
    let install = install_id(&agent);
    let mut ledger = Ledger::default();

    // Per phase: the kill moment is drawn from 0..window ms after the phase's operation
    // is sent; the window follows the operation's measured length, so most kills land
    // while it runs.
    let mut windows: [u64; 5] = [200, 300, 200, 300, 30];
    let mut in_flight = [0usize; 5];
    let mut targeted = [0usize; 5];
    let mut unanswered_events = 0usize;
    let mut resent_events = 0usize;
    // Of those re-sent, events the agent had committed before the kill cut its answer.
    let mut stored_unanswered = 0usize;
    // Events the receiver already had when the agent sent them again after a restart.
    let mut resent_to_receiver = 0u64;

    for kill in 0..kills {
        let phase = kill % PHASES.len();
        targeted[phase] += 1;
        let client = socket_client(&agent);
        // This iteration's events fall on a few days of their own (1 to 56 days ago,
        // inside both the agent's and the receiver's windows).
        let base = 1 + (kill as u64 * 7) % 50;
        let ages = (base, base + 5);
        let now = chrono::Utc::now().timestamp_millis();
        let first_day = day_of(&rfc3339(now - (ages.1 as i64) * DAY_MS));
        let mut ranges = Vec::new();

        // Work for the phase's operation, acknowledged before the kill window opens.
        let victim = 1000 + kill as u64;
        let (method, path) = match PHASES[phase] {
            "sync" => {
                let backlog = rng.range(100, 250);
                post_acked(&client, &mut rng, &mut ledger, None, backlog, ages).await;
                (Method::POST, "/v1/sync".to_owned())
            }
            "rollup" => {
                let fresh = rng.range(100, 250);
                post_acked(&client, &mut rng, &mut ledger, None, fresh, ages).await;
                (Method::POST, "/v1/rollup".to_owned())
            }
            "purge" => {
                // A day of its own, never planted before: retention never sees an event
                // arrive in a day it has partly purged.
                let count = rng.range(500, 2500) as usize;
                let day = plant_old_events(&agent, &mut ledger, 100 + kill as i64, count);
                ranges.push((day.clone(), day));
                (Method::POST, "/v1/purge".to_owned())
            }
            "erasure" => {
                let count = rng.range(30, 120);
                post_acked(&client, &mut rng, &mut ledger, Some(victim), count, ages).await;
                (Method::DELETE, format!("/v1/users/{victim}"))
            }
            _ => (Method::GET, "/healthz".to_owned()),
        };

        let stop = Arc::new(AtomicBool::new(false));
        let noted: Noted = Arc::default();
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                spawn_client(
                    socket_client(&agent),
                    rng.fork(),
                    ages,
                    Arc::clone(&stop),
                    Arc::clone(&noted),
                )
            })
            .collect();
        let op = (PHASES[phase] != "ingest").then(|| start_op(&client, method, path.clone()));
        let delay = rng.range(0, windows[phase] + 1);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        // Clients send nothing new from here; what they have on the wire is cut.
        stop.store(true, Ordering::Relaxed);
        agent.kill9();
        for task in clients {
            task.await.expect("a client task");
        }

        // What the kill interrupted.
        let mut unanswered = Vec::new();
        for (events, acked) in std::mem::take(&mut *noted.lock().unwrap()) {
            ledger.note(&events, acked);
            if !acked {
                unanswered.push(events);
            }
        }
        let ingest_hit = !unanswered.is_empty();
        let op_hit = match op {
            None => ingest_hit,
            Some(op) => {
                let (answer, answered) = op.task.await.expect("the operation task");
                match answer {
                    Ok((code, body)) => {
                        assert_eq!(code, StatusCode::OK, "{path}: {body}");
                        if PHASES[phase] == "erasure" {
                            ledger.erased.insert(victim);
                        }
                        // Answered before the kill: aim the next window at its length.
                        let took = (answered - op.started).as_millis() as u64;
                        windows[phase] = (took * 3 / 2).max(2);
                        false
                    }
                    Err(_) => true,
                }
            }
        };
        if op_hit {
            in_flight[phase] += 1;
        }

        start(&mut agent).await;
        let client = socket_client(&agent);
        // A client that retries sends the same ids again: half of the unanswered
        // requests are re-sent (a duplicate if the first try was stored), the others
        // stay unanswered, which may or may not have been stored, but at most once.
        for events in unanswered {
            unanswered_events += events.len();
            if rng.chance(50) {
                let duplicates = post_events(&client, &events)
                    .await
                    .expect("the agent answers")
                    .expect("a re-sent batch is acknowledged");
                ledger.note(&events, true);
                resent_events += events.len();
                stored_unanswered += duplicates as usize;
            }
        }
        // An erasure that was not answered is asked for again, as its caller would.
        if PHASES[phase] == "erasure" && !ledger.erased.contains(&victim) {
            let (code, body) = call(
                &client,
                Method::DELETE,
                &format!("/v1/users/{victim}"),
                None,
            )
            .await
            .expect("the agent answers");
            assert_eq!(code, StatusCode::OK, "{body}");
            ledger.erased.insert(victim);
        }

        let full = kill % FULL_CHECK_EVERY == FULL_CHECK_EVERY - 1 || kill + 1 == kills;
        if full {
            ranges.clear();
        } else {
            let last_day = day_of(&rfc3339(
                chrono::Utc::now().timestamp_millis() - (ages.0 as i64) * DAY_MS,
            ));
            ranges.push((first_day, last_day));
        }
        let seen = verify(&client, &rx.url(""), &install, &ledger, &ranges).await;
        resent_to_receiver += seen.duplicates;
        eprintln!(
            "kill {kill:3} at {:6.1} s: {:7} after {delay:4} ms, {} in flight; {} acknowledged in all; {} check: {} at the agent, {} at the receiver",
            began.elapsed().as_secs_f64(),
            PHASES[phase],
            if op_hit {
                "operation"
            } else if ingest_hit {
                "ingest only"
            } else {
                "nothing"
            },
            ledger.acked(),
            if full { "full" } else { "days'" },
            seen.local_events,
            seen.received_events,
        );
    }

    eprintln!(
        "{kills} kills in {:?}; unanswered events {unanswered_events}, re-sent {resent_events}, \
         of which {stored_unanswered} had been stored before the kill (answered duplicate); \
         the syncs after the restarts re-sent {resent_to_receiver} events the receiver already had \
         (answered duplicate)",
        began.elapsed()
    );
    for (i, phase) in PHASES.iter().enumerate() {
        eprintln!(
            "  {phase:8}: {} kills aimed, {} while its operation ran",
            targeted[i], in_flight[i]
        );
    }
    if kills >= 50 {
        for (i, phase) in PHASES.iter().enumerate() {
            assert!(
                in_flight[i] >= 3,
                "only {} of {} kills aimed at {phase} landed while it ran (seed {seed})",
                in_flight[i],
                targeted[i]
            );
        }
    }
}
