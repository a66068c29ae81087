//! The agent core through the real binary and its socket: the local API
//! (docs/reference/local-api.md) and the configuration (docs/reference/config.md).

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Agent, bin, event, exists, new_id};

fn with(field: &str, value: Value) -> Value {
    let mut e = event(&new_id());
    e[field] = value;
    e
}

fn without(field: &str) -> Value {
    let mut e = event(&new_id());
    e.as_object_mut().unwrap().remove(field);
    e
}

#[tokio::test]
async fn records_one_event_and_reports_it() {
    let agent = Agent::start("").await;
    let id = new_id();
    let (code, body) = agent.post("/v1/events", &event(&id)).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body, json!({"event_id": id, "status": "recorded"}));
    let status = agent.status().await;
    assert_eq!(status["pending_events"], 1);
    assert_eq!(status["status"], "disabled", "no backend_url configured");
    assert_eq!(status["tracking_enabled"], true);
    assert!(status["install_id"].as_str().unwrap().contains('_'));
    for key in [
        "failed_events",
        "synced_events",
        "consecutive_failures",
        "db_bytes",
        "uptime_s",
        "error_categories",
        "last_sync",
        "last_attempt",
        "next_sync",
        "last_error",
        "enrolled",
        "version",
        "sync_enabled",
        "oldest_pending_age_s",
    ] {
        assert!(status.get(key).is_some(), "status lacks {key}: {status}");
    }
    assert_eq!(
        agent.get("/healthz").await.unwrap(),
        (StatusCode::OK, json!({"ok": true}))
    );
}

#[tokio::test]
async fn an_event_without_id_gets_a_uuid_v7() {
    let agent = Agent::start("").await;
    let (code, body) = agent.post("/v1/events", &without("event_id")).await;
    assert_eq!(code, StatusCode::ACCEPTED);
    let id = uuid::Uuid::parse_str(body["event_id"].as_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 7);
}

#[tokio::test]
async fn every_validation_rule_is_enforced_and_nothing_is_stored() {
    let agent = Agent::start("").await;
    let mut wp_alias_and_user = event(&new_id());
    wp_alias_and_user["wp_user_id"] = json!(5);
    let cases: Vec<(Value, &str)> = vec![
        (with("event_id", json!("nope")), "event_id"),
        (with("event_id", json!(7)), "event_id"),
        (without("user_id"), "user_id"),
        (with("user_id", json!(-1)), "user_id"),
        (with("user_id", json!(9_007_199_254_740_993u64)), "user_id"),
        (wp_alias_and_user, "user_id"),
        (without("source"), "source"),
        (with("source", json!("cron")), "source"),
        (without("model"), "model"),
        (with("model", json!("")), "model"),
        (with("model", json!("gpt 4o")), "model"),
        (with("model", json!("m".repeat(129))), "model"),
        (without("prompt_tokens"), "prompt_tokens"),
        (with("prompt_tokens", json!(100_000_001)), "prompt_tokens"),
        (with("completion_tokens", json!(-5)), "completion_tokens"),
        (with("completion_tokens", json!("25")), "completion_tokens"),
        (with("total_tokens", json!(170)), "total_tokens"),
        (with("cached_tokens", json!(151)), "cached_tokens"),
        (with("cache_write_tokens", json!(151)), "cache_write_tokens"),
        (with("reasoning_tokens", json!(26)), "reasoning_tokens"),
        (with("context", json!("attachment 42")), "context"),
        (
            with("context", json!({"blob": "x".repeat(4096)})),
            "context",
        ),
        (
            with(
                "context",
                json!({"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":1}}}}}}}}}),
            ),
            "context",
        ),
        (with("created_at", json!("27/11/2026")), "created_at"),
        (
            with(
                "created_at",
                json!((chrono::Utc::now() + chrono::Duration::minutes(6)).to_rfc3339()),
            ),
            "created_at",
        ),
        (
            with(
                "created_at",
                json!((chrono::Utc::now() - chrono::Duration::days(91)).to_rfc3339()),
            ),
            "created_at",
        ),
        (with("prompt", json!("a secret prompt")), "prompt"),
    ];
    for (bad, field) in cases {
        let (code, body) = agent.post("/v1/events", &bad).await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {body}");
        assert_eq!(body["error"]["code"], "invalid_event", "{body}");
        let fields: Vec<&str> = body["error"]["details"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, [field], "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "{body}"
        );
    }
    assert_eq!(agent.status().await["pending_events"], 0);
    assert_eq!(agent.stored_events(), 0);
}

#[tokio::test]
async fn limits_at_their_edges_are_accepted() {
    let agent = Agent::start("").await;
    let edge = json!({"user_id": 9_007_199_254_740_992u64, "source": "manual", "model": "a-Z_0.9:/@x",
        "prompt_tokens": 100_000_000, "completion_tokens": 100_000_000, "total_tokens": 200_000_000,
        "cached_tokens": 100_000_000, "cache_write_tokens": 100_000_000, "reasoning_tokens": 100_000_000,
        "created_at": (chrono::Utc::now() - chrono::Duration::days(89)).to_rfc3339(),
        "context": {"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":1}}}}}}}}});
    let (code, body) = agent.post("/v1/events", &edge).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    let mut alias = without("user_id");
    alias["wp_user_id"] = json!(0);
    assert_eq!(
        agent.post("/v1/events", &alias).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(agent.stored_events(), 2);
}

#[tokio::test]
async fn duplicates_are_answered_and_stored_once() {
    let agent = Agent::start("").await;
    let id = new_id();
    assert_eq!(
        agent.post("/v1/events", &event(&id)).await.1["status"],
        "recorded"
    );
    // Same id, different content: still a duplicate, nothing changes.
    let mut changed = event(&id);
    changed["prompt_tokens"] = json!(999);
    let (code, body) = agent.post("/v1/events", &changed).await;
    assert_eq!(
        (code, body["status"].clone()),
        (StatusCode::ACCEPTED, json!("duplicate"))
    );
    let other = new_id();
    let batch = json!({"events": [event(&id), event(&other), event(&other)]});
    let (code, body) = agent.post("/v1/events", &batch).await;
    assert_eq!(code, StatusCode::ACCEPTED);
    assert_eq!(
        body,
        json!({"recorded": 1, "duplicates": 2, "event_ids": [id, other, other]})
    );
    assert_eq!(agent.stored_events(), 2);
    let prompt: i64 = agent
        .open_db()
        .query_row(
            "SELECT prompt_tokens FROM events ORDER BY seq LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(prompt, 150);
}

#[tokio::test]
async fn a_batch_is_all_or_nothing() {
    let agent = Agent::start("").await;
    let batch = json!({"events": [event(&new_id()), with("source", json!("cron")), event(&new_id()), with("model", json!(""))]});
    let (code, body) = agent.post("/v1/events", &batch).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let details = body["error"]["details"].as_array().unwrap();
    let named: Vec<(i64, &str)> = details
        .iter()
        .map(|d| (d["index"].as_i64().unwrap(), d["field"].as_str().unwrap()))
        .collect();
    assert_eq!(named, [(1, "source"), (3, "model")]);
    assert_eq!(agent.stored_events(), 0);

    let (code, body) = agent
        .post(
            "/v1/events",
            &json!({"events": [event(&new_id())], "extra": 1}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (code, _) = agent.post("/v1/events", &json!({"events": "nope"})).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(agent.stored_events(), 0);
}

#[tokio::test]
async fn size_limits_and_body_errors() {
    let agent = Agent::start("").await;
    let full: Vec<Value> = (0..1000).map(|_| event(&new_id())).collect();
    let (code, body) = agent.post("/v1/events", &json!({"events": full})).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["recorded"], 1000);

    let too_many: Vec<Value> = (0..1001).map(|_| event(&new_id())).collect();
    let (code, body) = agent.post("/v1/events", &json!({"events": too_many})).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"]["code"], "too_many_events");

    let huge = format!(
        "{{\"events\": [], \"pad\": \"{}\"}}",
        "x".repeat(1024 * 1024)
    );
    let (code, body) = agent
        .post_raw("/v1/events", "application/json", huge.into_bytes())
        .await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"]["code"], "too_large");

    let (code, body) = agent
        .post_raw(
            "/v1/events",
            "application/json",
            b"{\"user_id\": 5,".to_vec(),
        )
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "malformed_json");

    let valid = serde_json::to_vec(&event(&new_id())).unwrap();
    let (code, body) = agent.post_raw("/v1/events", "text/plain", valid).await;
    assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");
    assert_eq!(body["error"]["code"], "unsupported_media_type");

    assert_eq!(agent.stored_events(), 1000);
}

#[tokio::test]
async fn the_kill_switch_stores_nothing() {
    for (extra, env) in [
        ("tracking_enabled = false", None),
        ("", Some("USAGE_AGENT_DISABLE_TRACKING")),
    ] {
        let mut agent = Agent::configure(extra);
        let mut command = Command::new(bin());
        command.args(["--config", agent.config_path.to_str().unwrap(), "run"]);
        if let Some(var) = env {
            command.env(var, "1");
        }
        agent.child = Some(command.stderr(std::process::Stdio::null()).spawn().unwrap());
        agent.wait_ready().await;
        let (code, body) = agent.post("/v1/events", &event(&new_id())).await;
        assert_eq!(
            (code, body),
            (StatusCode::OK, json!({"status": "disabled"}))
        );
        let status = agent.status().await;
        assert_eq!(status["status"], "disabled");
        assert_eq!(status["tracking_enabled"], false);
        assert_eq!(agent.stored_events(), 0);
    }
}

#[tokio::test]
async fn an_acknowledged_event_survives_kill_9() {
    let mut agent = Agent::configure("synchronous = \"full\"");
    agent.spawn().await;
    let ids: Vec<String> = (0..20).map(|_| new_id()).collect();
    for id in &ids {
        assert_eq!(
            agent.post("/v1/events", &event(id)).await.0,
            StatusCode::ACCEPTED
        );
    }
    agent.kill9();
    // The socket file is left behind by the crash; the next start must replace it.
    assert!(exists(&agent.socket));
    agent.spawn().await;
    assert_eq!(agent.status().await["pending_events"], 20);
    for id in &ids {
        let (_, body) = agent.post("/v1/events", &event(id)).await;
        assert_eq!(body["status"], "duplicate", "{id} was lost");
    }
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_restart_keeps_data() {
    let mut agent = Agent::start("").await;
    let id = new_id();
    agent.post("/v1/events", &event(&id)).await;
    let status = agent.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(!exists(&agent.socket), "socket removed on shutdown");
    let wal = agent.data_dir().join("usage.db-wal");
    assert!(
        !exists(&wal) || std::fs::metadata(&wal).unwrap().len() == 0,
        "WAL checkpointed"
    );
    assert_eq!(agent.stored_events(), 1);
    agent.spawn().await;
    assert_eq!(
        agent.post("/v1/events", &event(&id)).await.1["status"],
        "duplicate"
    );
}

#[tokio::test]
async fn a_second_agent_on_the_same_data_dir_is_refused() {
    let agent = Agent::start("").await;
    let out = agent.cli(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already running"), "{stderr}");
    // The first agent still serves.
    assert_eq!(
        agent.post("/v1/events", &event(&new_id())).await.0,
        StatusCode::ACCEPTED
    );
}

#[tokio::test]
async fn the_socket_gets_the_configured_mode() {
    let agent = Agent::start("socket_mode = \"0600\"").await;
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let agent = Agent::start("").await;
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
}

#[tokio::test]
async fn an_unknown_socket_group_is_a_clear_error() {
    let agent = Agent::configure("socket_group = \"no-such-group-xyz\"");
    let out = agent.cli(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-group-xyz"));
}

#[tokio::test]
async fn tcp_listen_requires_the_token() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agent = Agent::start(&format!(
        "tcp_listen = \"127.0.0.1:{port}\"\napi_token = \"s3cret\""
    ))
    .await;
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/events");
    let without = client
        .post(&url)
        .json(&event(&new_id()))
        .send()
        .await
        .unwrap();
    assert_eq!(without.status(), StatusCode::UNAUTHORIZED);
    let wrong = client
        .post(&url)
        .bearer_auth("nope")
        .json(&event(&new_id()))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let right = client
        .post(&url)
        .bearer_auth("s3cret")
        .json(&event(&new_id()))
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), StatusCode::ACCEPTED);
    assert_eq!(agent.stored_events(), 1);
}

#[test]
fn config_errors_name_the_key() {
    let cases = [
        ("colour = \"red\"", "colour"),
        ("[sync]\nbatch_size = 5000", "sync.batch_size"),
        ("synchronous = \"sometimes\"", "synchronous"),
        (
            "tcp_listen = \"0.0.0.0:1\"\napi_token = \"t\"",
            "tcp_listen",
        ),
        ("tcp_listen = \"127.0.0.1:1\"", "api_token"),
    ];
    for (text, key) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            format!("data_dir = \"{}\"\n{text}", dir.path().display()),
        )
        .unwrap();
        let out = Command::new(bin())
            .args(["--config", path.to_str().unwrap(), "run"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{text}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one sentence: {stderr}");
    }
}

#[test]
fn init_is_idempotent_and_private() {
    let agent = Agent::configure("");
    let path = agent.data_dir().join("identity.json");
    let before = std::fs::read_to_string(&path).unwrap();
    let out = agent.cli(&["init", "--site-url", "https://other.example"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing changed"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let identity: Value = serde_json::from_str(&before).unwrap();
    assert!(identity["secret"].as_str().unwrap().starts_with("whsec_"));
    assert_eq!(identity["site_url"], "https://example.com");
    assert_eq!(identity["enrolled_at"], Value::Null);
}

#[test]
fn clients_say_when_no_agent_listens() {
    let agent = Agent::configure("");
    for args in [
        vec!["status"],
        vec![
            "record",
            "--user",
            "5",
            "--source",
            "bulk",
            "--model",
            "m",
            "--prompt-tokens",
            "1",
            "--completion-tokens",
            "1",
        ],
    ] {
        let out = agent.cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("no usage-agent is answering") && stderr.contains("agent.sock"),
            "{stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1);
    }
}

#[tokio::test]
async fn cli_record_and_status() {
    let agent = Agent::start("").await;
    let out = agent.cli(&[
        "record",
        "--user",
        "5",
        "--source",
        "bulk",
        "--model",
        "gpt-4o-mini",
        "--prompt-tokens",
        "150",
        "--completion-tokens",
        "25",
        "--context",
        "{\"attachment_id\": 42}",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["status"], "recorded");

    let out = agent.cli(&[
        "record",
        "--user",
        "5",
        "--source",
        "cron",
        "--model",
        "m",
        "--prompt-tokens",
        "1",
        "--completion-tokens",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("source"));

    let out = agent.cli(&[
        "record",
        "--user",
        "5",
        "--source",
        "bulk",
        "--model",
        "m",
        "--prompt-tokens",
        "1",
        "--completion-tokens",
        "1",
        "--context",
        "{oops",
    ]);
    assert_eq!(out.status.code(), Some(2), "bad usage");

    let out = agent.cli(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "disabled exits 0");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["pending_events"], 1);
    let out = agent.cli(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 pending"));
}
