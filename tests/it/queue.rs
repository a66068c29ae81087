//! The sync queue as a log with a cursor, through the real binary and the bundled receiver:
//! a kill -9 while parallel lanes have batches on the wire, and an agent whose database was
//! written by the schema before the cursor (each event with its own sync state).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use usage_protocol::event::format_millis;

use crate::common::{TestReceiver, receiver_settings};
use crate::harness::{Agent, poll};
use crate::sync::{agent_for, identity, provider_json, received, record, sync_now};

/// Every event id the receiver holds for the agent's install, with repeats.
async fn receiver_ids(rx: &TestReceiver, agent: &Agent) -> Vec<String> {
    let install_id = identity(agent)["install_id"].as_str().unwrap().to_owned();
    let mut ids = Vec::new();
    let mut after = String::new();
    loop {
        let page = provider_json(
            rx,
            &format!("/api/usage/events?install_id={install_id}&limit=1000{after}"),
        )
        .await;
        for event in page["events"].as_array().expect("events") {
            ids.push(event["event_id"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => return ids,
        }
    }
}

/// Syncs until nothing is pending and a run ends without error.
async fn drain(agent: &Agent) {
    poll("the queue to drain", Duration::from_secs(120), async || {
        let report = sync_now(agent).await;
        let status = agent.status().await;
        (report["error"].is_null() && status["pending_events"] == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_lanes_have_batches_in_flight_loses_nothing_and_counts_nothing_twice() {
    let rx = TestReceiver::start(receiver_settings());
    // Batches of 25: eight lanes ship at once (`in_flight`), so a kill mid-run cuts
    // several batches, some answered and recorded, some stored by the receiver but not
    // yet recorded, some not yet sent.
    let mut agent = agent_for(&rx.url(""), "batch_size = 25", true);
    agent.spawn().await;
    let mut sent: HashSet<String> = HashSet::new();
    let mut cut_mid_run = 0;
    const ROUNDS: usize = 4;
    for _ in 0..ROUNDS {
        sent.extend(record(&agent, 2000).await);
        let before = received(&rx, &agent).await;
        let socket = agent.socket.clone();
        let run = tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .unix_socket(socket)
                .build()
                .unwrap();
            // Cut by the kill: no answer is expected.
            let _ = client
                .post("http://localhost/v1/sync")
                .json(&json!({}))
                .send()
                .await;
        });
        // Kill as soon as the receiver has stored part of this run's backlog.
        let deadline = Instant::now() + Duration::from_secs(60);
        let landed = loop {
            let now = received(&rx, &agent).await;
            if now > before {
                break now;
            }
            assert!(
                Instant::now() < deadline,
                "the run never reached the receiver"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        agent.kill9();
        run.await.unwrap();
        if landed < sent.len() as u64 {
            cut_mid_run += 1;
        }
        agent.spawn().await;
        // After the restart the counts still add up, whatever the kill cut.
        let status = agent.status().await;
        let counted = ["pending_events", "failed_events", "synced_events"]
            .iter()
            .map(|key| status[key].as_u64().unwrap())
            .sum::<u64>();
        assert_eq!(counted, sent.len() as u64, "{status}");
        assert_eq!(status["failed_events"], 0, "{status}");
    }
    assert!(
        cut_mid_run >= 1,
        "no kill landed while the run was still shipping ({ROUNDS} rounds)"
    );
    drain(&agent).await;

    let ids = receiver_ids(&rx, &agent).await;
    let unique: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), unique.len(), "the receiver holds an event twice");
    assert_eq!(
        unique, sent,
        "the receiver holds exactly the events recorded"
    );
    assert_eq!(received(&rx, &agent).await, sent.len() as u64);
    let status = agent.status().await;
    assert_eq!(status["synced_events"].as_u64(), Some(sent.len() as u64));
    assert_eq!(
        (&status["pending_events"], &status["failed_events"]),
        (&json!(0), &json!(0))
    );
    println!("{cut_mid_run} of {ROUNDS} kills cut a run short");
}

/// `(sync_state, synced_at)` of events 1..=30 as the schema before the cursor stored them:
/// 0 pending, 1 synced, 2 failed.
fn old_states(now_ms: i64) -> Vec<(i64, Option<i64>)> {
    (1..=30)
        .map(|seq: i64| match seq {
            11 | 21 => (2, None),
            1..=10 => (1, Some(now_ms - 600_000)),
            16..=20 => (1, Some(now_ms - 300_000 + seq)),
            _ => (0, None),
        })
        .collect()
}

/// Writes a database of the schema before the cursor (the migrations before the fourth, as
/// the agent before it applied them) holding `states`, recorded an hour ago.
fn write_old_database(agent: &Agent, states: &[(i64, Option<i64>)], now_ms: i64) -> Vec<String> {
    std::fs::create_dir_all(agent.data_dir()).unwrap();
    let conn = agent.open_db();
    // As the agent makes its database: private.
    std::fs::set_permissions(
        agent.data_dir().join("usage.db"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    conn.pragma_update(None, "page_size", 1024).unwrap();
    // The schema before the cursor (the block `-- migration 4`; versions count the file's
    // header as a block of its own, so that schema is version 4), which every later
    // migration then meets.
    crate::harness::create_schema_at(&conn, 4);
    conn.execute(
        "INSERT INTO models (id, name) VALUES (1, 'gpt-4o-mini')",
        [],
    )
    .unwrap();
    let mut ids = Vec::new();
    for (i, (state, synced_at)) in states.iter().enumerate() {
        let seq = i as i64 + 1;
        let id = uuid::Uuid::new_v4();
        ids.push(id.to_string());
        conn.execute(
            "INSERT INTO events (seq, event_id, user_id, source, model_id, prompt_tokens,
                 completion_tokens, created_at, sync_state, synced_at)
             VALUES (?1, ?2, 5, 1, 1, 150, 25, ?3, ?4, ?5)",
            rusqlite::params![
                seq,
                id.as_bytes(),
                now_ms - 3_600_000 + seq,
                state,
                synced_at
            ],
        )
        .unwrap();
        if *state == 2 {
            conn.execute(
                "INSERT INTO sync_failures (seq, reason, failed_at) VALUES (?1, ?2, ?3)",
                rusqlite::params![seq, format!("model: refused {seq}"), now_ms - 60_000],
            )
            .unwrap();
        }
    }
    ids
}

/// `synced_at` of every exported event, by event id.
async fn exported_synced_at(agent: &Agent) -> Vec<(String, Value)> {
    let (code, body) = agent.get("/v1/export?format=json").await.unwrap();
    assert_eq!(code, StatusCode::OK, "{body}");
    body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event_id"].as_str().unwrap().to_owned(),
                e["synced_at"].clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_with_per_event_sync_state_is_upgraded_without_losing_or_resending_any() {
    let rx = TestReceiver::start(receiver_settings());
    // Sync off at first, so no scheduled run moves anything before the counts are read.
    let mut agent = agent_for(&rx.url(""), "enabled = false", true);
    let now_ms = chrono::Utc::now().timestamp_millis();
    let states = old_states(now_ms);
    let ids = write_old_database(&agent, &states, now_ms);
    let count = |state: i64| states.iter().filter(|(s, _)| *s == state).count() as u64;
    let (pending, synced, failed) = (count(0), count(1), count(2));
    assert_eq!((pending, synced, failed), (13, 15, 2));

    agent.spawn().await;
    let status = agent.status().await;
    assert_eq!(
        (
            status["pending_events"].as_u64(),
            status["failed_events"].as_u64(),
            status["synced_events"].as_u64()
        ),
        (Some(pending), Some(failed), Some(synced)),
        "{status}"
    );
    let expected: Vec<(String, Value)> = ids
        .iter()
        .zip(&states)
        .map(|(id, (_, at))| {
            (
                id.clone(),
                at.map_or(Value::Null, |at| json!(format_millis(at))),
            )
        })
        .collect();
    assert_eq!(exported_synced_at(&agent).await, expected);
    // Every stored id is still stored: sent again, whatever its state, each is a duplicate.
    let again: Vec<Value> = ids.iter().map(|id| crate::harness::event(id)).collect();
    let (code, body) = agent.post("/v1/events", &json!({ "events": again })).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        (body["recorded"].as_u64(), body["duplicates"].as_u64()),
        (Some(0), Some(ids.len() as u64)),
        "{body}"
    );
    assert!(agent.terminate().success());

    // Sync on: a sync ships exactly the events that were pending.
    let config = std::fs::read_to_string(&agent.config_path).unwrap();
    std::fs::write(
        &agent.config_path,
        config.replace("enabled = false", "enabled = true"),
    )
    .unwrap();
    agent.spawn().await;
    drain(&agent).await;
    let pending_ids: HashSet<String> = ids
        .iter()
        .zip(&states)
        .filter(|(_, (state, _))| *state == 0)
        .map(|(id, _)| id.clone())
        .collect();
    let shipped: HashSet<String> = receiver_ids(&rx, &agent).await.into_iter().collect();
    assert_eq!(shipped, pending_ids, "exactly the unsynced events went out");
    let status = agent.status().await;
    assert_eq!(status["failed_events"].as_u64(), Some(failed), "{status}");
    assert_eq!(status["synced_events"].as_u64(), Some(synced + pending));

    // retry-failed puts back exactly the failed ones, and the next sync ships them.
    let (code, body) = agent.post("/v1/retry-failed", &json!({})).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["requeued"].as_u64(), Some(failed));
    assert_eq!(
        agent.status().await["pending_events"].as_u64(),
        Some(failed)
    );
    drain(&agent).await;
    let shipped: Vec<String> = receiver_ids(&rx, &agent).await;
    let failed_ids: HashSet<String> = ids
        .iter()
        .zip(&states)
        .filter(|(_, (state, _))| *state == 2)
        .map(|(id, _)| id.clone())
        .collect();
    let expected_ids: HashSet<String> = pending_ids.union(&failed_ids).cloned().collect();
    assert_eq!(shipped.len(), expected_ids.len(), "nothing shipped twice");
    assert_eq!(shipped.into_iter().collect::<HashSet<_>>(), expected_ids);
    let status = agent.status().await;
    assert_eq!(status["synced_events"].as_u64(), Some(30), "{status}");
    // The events synced before the upgrade keep the time they were synced.
    for ((id, at), (exported_id, exported_at)) in
        expected.iter().zip(exported_synced_at(&agent).await)
    {
        assert_eq!(*id, exported_id);
        if !at.is_null() {
            assert_eq!(*at, exported_at, "synced_at of {id}");
        }
    }
}
