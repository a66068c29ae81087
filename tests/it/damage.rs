//! Damaged storage: the real agent and receiver on databases damaged the way an unlucky
//! operator meets them: whole pages of the file overwritten with garbage, while the process
//! is stopped or under it while it runs.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use reqwest::{StatusCode, header};
use serde_json::{Value, json};

use crate::common::{ENROLL_TOKEN, TestReceiver, receiver_settings};
use crate::harness::{Agent, assert_error_shape, bin, event, new_id, poll, wait_with_deadline};

/// Page size of both servers' databases.
const PAGE: u64 = 1024;

/// Records `n` events in batches of 1000.
async fn record(agent: &Agent, n: usize) {
    for start in (0..n).step_by(1000) {
        let events: Vec<Value> = (start..n.min(start + 1000))
            .map(|_| event(&new_id()))
            .collect();
        let (code, body) = agent.post("/v1/events", &json!({"events": events})).await;
        assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    }
}

/// Pages of the b-tree `name` of kind `leaf` or `internal`, with their cell counts, as
/// SQLite's `dbstat` sees them through a connection of the test's own.
fn pages(db: &Path, name: &str, kind: &str) -> Vec<(u64, u64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT pageno, ncell FROM dbstat WHERE name = ?1 AND pagetype = ?2 ORDER BY pageno",
        )
        .unwrap();
    stmt.query_map([name, kind], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Every page of the b-trees `names`.
fn all_pages(db: &Path, names: &[&str]) -> Vec<u64> {
    names
        .iter()
        .flat_map(|name| {
            ["leaf", "internal"]
                .into_iter()
                .flat_map(move |kind| pages(db, name, kind))
        })
        .map(|(page, _)| page)
        .collect()
}

/// Overwrites whole pages (numbered from 1) with bytes no SQLite page starts with.
fn garble(db: &Path, pages: impl IntoIterator<Item = u64>) {
    let mut file = std::fs::OpenOptions::new().write(true).open(db).unwrap();
    for page in pages {
        file.seek(SeekFrom::Start((page - 1) * PAGE)).unwrap();
        file.write_all(&[0xA5; PAGE as usize]).unwrap();
    }
    file.sync_all().unwrap();
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn a_damaged_database_is_moved_aside_salvaged_and_degraded_until_check_finds_it_sound() {
    let mut agent = Agent::start("").await;
    record(&agent, 3000).await;
    assert!(agent.terminate().success());
    let db = agent.data_dir().join("usage.db");
    // Two table leaves side by side and one alone (rows on the good pages between and
    // after them must come back), and the whole table of stored event ids.
    let leaves = pages(&db, "events", "leaf");
    assert!(leaves.len() > 40, "{} leaves", leaves.len());
    let bad = [leaves[5], leaves[6], leaves[leaves.len() / 2]];
    let lost: u64 = bad.iter().map(|(_, cells)| cells).sum();
    let index = all_pages(&db, &["event_ids"]);
    garble(&db, bad.iter().map(|(page, _)| *page).chain(index));
    let expected = 3000 - lost;
    let garbled = std::fs::read(&db).unwrap();

    agent.spawn().await;
    let status = agent.status().await;
    let storage = &status["storage"];
    assert_eq!(storage["state"], "recovered", "{status}");
    assert_eq!(storage["events_recovered"], expected, "{status}");
    assert!(storage["at"].is_string(), "{status}");
    let damaged = PathBuf::from(storage["damaged_file"].as_str().unwrap());
    assert_eq!(
        std::fs::read(&damaged).unwrap(),
        garbled,
        "the damaged file is evidence: moved, never written"
    );
    assert!(
        damaged
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("usage.db.damaged-"),
        "{status}"
    );
    assert_eq!(status["status"], "degraded", "{status}");
    assert_eq!(status["pending_events"], expected, "{status}");
    assert_eq!(agent.cli(&["status"]).status.code(), Some(3));
    // The new database takes events.
    let (code, body) = agent.post("/v1/events", &event(&new_id())).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");

    // The state outlasts a restart, and the sound new file is not moved aside again.
    assert!(agent.terminate().success());
    agent.spawn().await;
    let status = agent.status().await;
    assert_eq!(status["storage"], *storage, "{status}");
    assert_eq!(status["pending_events"], expected + 1, "{status}");
    let aside = std::fs::read_dir(agent.data_dir())
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.contains("damaged") && !name.ends_with("-wal") && !name.ends_with("-shm")
        })
        .count();
    assert_eq!(aside, 1);

    let out = agent.cli(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("sound"));
    let status = agent.status().await;
    assert_eq!(status["storage"], json!({"state": "ok"}), "{status}");
    assert_eq!(status["status"], "disabled", "no backend here: {status}");
}

#[tokio::test]
async fn salvaged_events_keep_their_sync_state_so_nothing_synced_is_sent_again() {
    let receiver = TestReceiver::start(receiver_settings());
    let backend = receiver.url("");
    let mut agent = Agent::configure_with(
        "",
        &format!("[sync]\nbackend_url = {backend:?}\ninterval_secs = 3600\n"),
    );
    let out = agent.cli(&[
        "init",
        "--site-url",
        "https://example.com",
        "--backend-url",
        &backend,
        "--enroll-token",
        ENROLL_TOKEN,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    agent.spawn().await;
    record(&agent, 2000).await;
    let (code, report) = agent.post("/v1/sync", &json!({})).await;
    assert_eq!(code, StatusCode::OK, "{report}");
    let status = agent.status().await;
    assert_eq!(status["synced_events"], 2000, "{status}");
    assert!(agent.terminate().success());

    let db = agent.data_dir().join("usage.db");
    let leaves = pages(&db, "events", "leaf");
    let bad = leaves[leaves.len() / 3];
    garble(&db, [bad.0]);
    agent.spawn().await;
    let status = agent.status().await;
    let expected = 2000 - bad.1;
    assert_eq!(status["storage"]["events_recovered"], expected, "{status}");
    assert_eq!(status["synced_events"], expected, "{status}");
    assert_eq!(status["pending_events"], 0, "{status}");

    record(&agent, 10).await;
    let (code, report) = agent.post("/v1/sync", &json!({})).await;
    assert_eq!(code, StatusCode::OK, "{report}");
    assert_eq!(report["sent"], 10, "only the new events go out: {report}");
    assert_eq!(report["duplicates"], 0, "{report}");
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_replaced_and_the_agent_serves() {
    let mut agent = Agent::start("").await;
    record(&agent, 10).await;
    assert!(agent.terminate().success());
    garble(&agent.data_dir().join("usage.db"), [1]);
    agent.spawn().await;
    let status = agent.status().await;
    assert_eq!(status["storage"]["state"], "recovered", "{status}");
    assert_eq!(status["storage"]["events_recovered"], 0, "{status}");
    let (code, body) = agent.post("/v1/events", &event(&new_id())).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");
}

/// A running agent with 3000 events, then pages of its database (chosen by `pick` from
/// the file) overwritten under it. The WAL is empty first (its idle checkpoint), which
/// also makes every connection of the agent drop its page cache at its next transaction,
/// so the agent reads the damage from the file, as it would after pages went bad on the
/// disk.
async fn damaged_under_a_running_agent(pick: fn(&Path) -> Vec<u64>) -> Agent {
    let agent = Agent::start("").await;
    record(&agent, 3000).await;
    let data = agent.data_dir();
    poll(
        "the idle WAL to be emptied",
        Duration::from_secs(20),
        async || {
            let wal = std::fs::metadata(data.join("usage.db-wal")).map_or(0, |m| m.len());
            (wal == 0).then_some(())
        },
    )
    .await;
    let db = data.join("usage.db");
    garble(&db, pick(&db));
    agent
}

/// The later half of the events table's leaves: the first 1000 events (an export's
/// first page) stay readable, the newest leaf (where the next insert goes) does not.
fn later_half(db: &Path) -> Vec<u64> {
    let leaves = pages(db, "events", "leaf");
    leaves[leaves.len() / 2..]
        .iter()
        .map(|(page, _)| *page)
        .collect()
}

/// Every page of the events table, its indexes and the table of stored event ids.
fn every_event_page(db: &Path) -> Vec<u64> {
    all_pages(
        db,
        &[
            "events",
            "event_ids",
            "events_unsynced",
            "events_created_at",
        ],
    )
}

#[tokio::test]
async fn a_write_that_fails_on_damage_answers_503_and_status_turns_failing() {
    let agent = damaged_under_a_running_agent(later_half).await;
    let response = reqwest::Client::builder()
        .unix_socket(agent.socket.clone())
        .build()
        .unwrap()
        .post("http://localhost/v1/events")
        .json(&event(&new_id()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key(header::RETRY_AFTER));
    let body: Value = response.json().await.unwrap();
    assert_error_shape(&body, "storage_failing");

    let status = agent.status().await;
    assert_eq!(status["status"], "failing", "{status}");
    assert_eq!(status["storage"]["state"], "failing", "{status}");
    assert_eq!(agent.cli(&["status"]).status.code(), Some(4));
}

#[tokio::test]
async fn check_exits_3_on_a_damaged_database_and_keeps_status_failing() {
    let agent = damaged_under_a_running_agent(later_half).await;
    let out = agent.cli(&["check", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["result"], "damaged", "{answer}");
    assert!(
        !answer["problems"].as_array().unwrap().is_empty(),
        "{answer}"
    );
    let status = agent.status().await;
    assert_eq!(status["status"], "failing", "{status}");
    assert_eq!(status["storage"]["state"], "failing", "{status}");
}

#[tokio::test]
async fn a_failed_export_ends_without_its_last_chunk_and_the_cli_exits_1() {
    let agent = damaged_under_a_running_agent(later_half).await;
    let socket = agent.socket.clone();
    let raw = tokio::task::spawn_blocking(move || {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream
            .write_all(b"GET /v1/export HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut raw = Vec::new();
        // The server closes the connection, cut short or not.
        let _ = stream.read_to_end(&mut raw);
        String::from_utf8_lossy(&raw).into_owned()
    })
    .await
    .unwrap();
    // The server may have sent the head and the first pages before the failure, or
    // nothing at all; never the chunk that ends a complete body.
    assert!(!raw.ends_with("0\r\n\r\n"), "a complete body: {raw:?}");
    if let Some((head, _)) = raw.split_once("\r\n\r\n") {
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{head}"
        );
    }

    let out = agent.cli(&["export"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cut off"), "{}", stderr(&out));
    assert!(
        out.stdout.split(|b| *b == b'\n').count() < 3000,
        "not every event was written"
    );
}

#[tokio::test]
async fn an_export_that_cannot_read_its_first_page_answers_503_and_the_cli_exits_1() {
    let agent = damaged_under_a_running_agent(every_event_page).await;
    let (code, body) = agent.get("/v1/export").await.unwrap();
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_error_shape(&body, "storage_failing");
    let out = agent.cli(&["export"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("503"), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "nothing that looks like an export");
    assert_eq!(agent.status().await["status"], "failing");
}

#[tokio::test]
async fn without_a_running_agent_check_reads_the_file_directly_and_changes_nothing() {
    let mut agent = Agent::start("").await;
    record(&agent, 500).await;
    assert!(agent.terminate().success());
    let out = agent.cli(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("directly"), "{}", stderr(&out));

    let db = agent.data_dir().join("usage.db");
    garble(&db, all_pages(&db, &["events_created_at"]));
    let garbled = std::fs::read(&db).unwrap();
    let out = agent.cli(&["check", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["result"], "damaged", "{answer}");
    assert_eq!(std::fs::read(&db).unwrap(), garbled, "a check only reads");
}

#[test]
fn the_receiver_refuses_a_damaged_database_naming_the_file_and_leaves_it_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("receiver.db");
    drop(usage_receiver::open_sqlite(&db).unwrap());
    let conn = rusqlite::Connection::open(&db).unwrap();
    let page: u64 = conn
        .query_row(
            "SELECT pageno FROM dbstat WHERE name NOT LIKE 'sqlite_%' AND pageno > 1 LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    drop(conn);
    garble(&db, [page]);
    let before = std::fs::read(&db).unwrap();

    let mut child = Command::new(bin())
        .args(["receiver", "--listen", "127.0.0.1:0", "--db"])
        .arg(&db)
        .env_clear()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_deadline(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(1));
    let mut text = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert!(text.contains(&db.display().to_string()), "{text}");
    assert!(text.contains("damaged"), "{text}");
    assert_eq!(std::fs::read(&db).unwrap(), before, "never rebuilt");
}
