//! Rollups, retention, schedules, local analytics, export, erasure and metrics through the
//! real binary, its socket and its CLI.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use usage_agent::calendar::{Calendar, day_text};

use crate::harness::{Agent, get_text, new_id, parse_exposition, poll};

const DAY_MS: i64 = 86_400_000;

fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A valid event with the given fields.
fn event(
    user: u64,
    source: &str,
    model: &str,
    created_at_ms: i64,
    prompt: u64,
    completion: u64,
) -> Value {
    json!({
        "event_id": new_id(), "user_id": user, "source": source, "model": model,
        "prompt_tokens": prompt, "completion_tokens": completion,
        "cached_tokens": prompt / 2, "reasoning_tokens": completion / 4,
        "context": {"attachment_id": 42, "alt": "a \"quoted\", comma\nline"},
        "created_at": rfc3339(created_at_ms),
    })
}

async fn record_all(agent: &Agent, events: &[Value]) {
    let (code, body) = agent.post("/v1/events", &json!({"events": events})).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");
}

fn assert_bad_parameter(code: StatusCode, body: &Value, parameter: &str) {
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "invalid_parameter", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(parameter),
        "{body}"
    );
    assert_eq!(
        body["error"]["details"][0]["parameter"], parameter,
        "{body}"
    );
}

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Expected per-day sums for `group_by=day`.
fn by_day(calendar: Calendar, events: &[Value]) -> HashMap<String, (u64, u64)> {
    let mut sums: HashMap<String, (u64, u64)> = HashMap::new();
    for e in events {
        let created = DateTime::parse_from_rfc3339(e["created_at"].as_str().unwrap()).unwrap();
        let day = day_text(calendar.date_of(created.timestamp_millis()));
        let entry = sums.entry(day).or_default();
        entry.0 += 1;
        entry.1 += e["prompt_tokens"].as_u64().unwrap() + e["completion_tokens"].as_u64().unwrap();
    }
    sums
}

#[tokio::test]
async fn rollup_feeds_local_usage_in_the_agents_timezone() {
    let agent = Agent::start("timezone = \"Asia/Kathmandu\"").await;
    let calendar = Calendar::parse("Asia/Kathmandu").unwrap();
    let now = Utc::now().timestamp_millis();
    let events: Vec<Value> = (0..24)
        .map(|i| {
            let source = ["inline", "bulk", "queue", "manual"][i % 4];
            let model = ["gpt-4o-mini", "claude-3.5"][i % 2];
            event(
                (i % 3) as u64,
                source,
                model,
                now - (i as i64) * DAY_MS / 6,
                100 + i as u64,
                10,
            )
        })
        .collect();
    record_all(&agent, &events).await;

    let (code, body) = agent.post("/v1/rollup", &json!({})).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["new_events"], 24);
    let expected = by_day(calendar, &events);
    assert_eq!(
        body["days"].as_array().unwrap().len(),
        expected.len(),
        "{body}"
    );

    let (code, usage) = agent.get("/v1/usage?group_by=day").await.unwrap();
    assert_eq!(code, StatusCode::OK, "{usage}");
    let rows = usage["rows"].as_array().unwrap();
    assert_eq!(rows.len(), expected.len());
    for row in rows {
        let (events, total) = expected[row["day"].as_str().unwrap()];
        assert_eq!(row["events"], events, "{row}");
        assert_eq!(row["total_tokens"], total, "{row}");
        assert!(
            row.get("user_id").is_none() && row.get("model").is_none(),
            "only grouped keys: {row}"
        );
        for key in [
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "cache_write_tokens",
            "reasoning_tokens",
        ] {
            assert!(row[key].is_u64(), "{key} missing in {row}");
        }
    }
    let total_tokens: u64 = expected.values().map(|(_, t)| t).sum();
    assert_eq!(usage["totals"]["events"], 24);
    assert_eq!(usage["totals"]["total_tokens"], total_tokens);

    // Every key at once: one row per (day, user, source, model); the sums add up.
    let (_, full) = agent
        .get("/v1/usage?group_by=day,user,source,model")
        .await
        .unwrap();
    let rows = full["rows"].as_array().unwrap();
    assert!(rows.iter().all(|r| r["day"].is_string()
        && r["user_id"].is_u64()
        && r["source"].is_string()
        && r["model"].is_string()));
    assert_eq!(
        rows.iter()
            .map(|r| r["events"].as_u64().unwrap())
            .sum::<u64>(),
        24
    );

    // A range: today only.
    let today = day_text(calendar.date_of(now));
    let (_, today_usage) = agent
        .get(&format!("/v1/usage?from={today}&to={today}"))
        .await
        .unwrap();
    assert_eq!(today_usage["rows"], json!([]), "no group_by: totals only");
    assert_eq!(today_usage["totals"]["events"], expected[&today].0);

    // Idempotent: nothing new, nothing changes.
    let (_, again) = agent.post("/v1/rollup", &json!({})).await;
    assert_eq!(again["new_events"], 0);
    assert_eq!(
        agent
            .get("/v1/usage?group_by=day,user,source,model")
            .await
            .unwrap()
            .1,
        full
    );

    // Bad parameters are 400s naming the parameter.
    let (code, body) = agent.get("/v1/usage?from=2026-02-30").await.unwrap();
    assert_bad_parameter(code, &body, "from");
    let (code, body) = agent.get("/v1/usage?to=yesterday").await.unwrap();
    assert_bad_parameter(code, &body, "to");
    let (code, body) = agent.get("/v1/usage?group_by=day,week").await.unwrap();
    assert_bad_parameter(code, &body, "group_by");
    let (code, body) = agent.get("/v1/usage?colour=red").await.unwrap();
    assert_bad_parameter(code, &body, "colour");
}

#[tokio::test]
async fn cli_rollup_export_and_json_export_round_trip() {
    let agent = Agent::start("").await;
    let now = Utc::now().timestamp_millis();
    let mut events: Vec<Value> = (0..7)
        .map(|i| event(i, "bulk", "gpt-4o-mini", now - (i as i64) * DAY_MS, 150, 25))
        .collect();
    events[3].as_object_mut().unwrap().remove("context");
    for e in events.iter_mut().step_by(2) {
        e["origin"] = json!("plugin:ai-alt-text");
    }
    record_all(&agent, &events).await;

    let text = stdout(&agent.cli(&["rollup"]));
    assert!(text.contains("7 new event(s)"), "{text}");
    assert_eq!(
        agent.cli(&["rollup", "--date", "2026-13-01"]).status.code(),
        Some(2)
    );
    let old = day_text(Calendar::parse("UTC").unwrap().date_of(now - 120 * DAY_MS));
    let refused = agent.cli(&["rollup", "--date", &old]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("retention"),
        "{refused:?}"
    );
    let today = day_text(Calendar::parse("UTC").unwrap().date_of(now));
    let one_day: Value =
        serde_json::from_str(&stdout(&agent.cli(&["rollup", "--date", &today, "--json"]))).unwrap();
    assert_eq!(one_day["days"], json!([today]));

    // CSV: a header row, then every event, parsing back to the same fields.
    let csv_text = stdout(&agent.cli(&["export"]));
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        header.join(","),
        "event_id,user_id,source,model,origin,prompt_tokens,completion_tokens,total_tokens,cached_tokens,cache_write_tokens,reasoning_tokens,context,created_at,synced_at"
    );
    let records: Vec<HashMap<String, String>> = reader.deserialize().map(Result::unwrap).collect();
    assert_eq!(records.len(), events.len());
    for sent in &events {
        let row = records
            .iter()
            .find(|r| r["event_id"] == sent["event_id"].as_str().unwrap())
            .expect("exported");
        assert_eq!(row["user_id"], sent["user_id"].to_string());
        assert_eq!(row["source"], "bulk");
        assert_eq!(row["model"], "gpt-4o-mini");
        assert_eq!(row["origin"], sent["origin"].as_str().unwrap_or(""));
        assert_eq!(row["total_tokens"], "175");
        assert_eq!(row["cached_tokens"], "75");
        assert_eq!(row["created_at"], sent["created_at"].as_str().unwrap());
        assert_eq!(row["synced_at"], "");
        match sent.get("context") {
            Some(context) => assert_eq!(
                serde_json::from_str::<Value>(&row["context"]).unwrap(),
                *context
            ),
            None => assert_eq!(row["context"], ""),
        }
    }
    // The install secret is never part of an export.
    let identity: Value =
        serde_json::from_slice(&std::fs::read(agent.data_dir().join("identity.json")).unwrap())
            .unwrap();
    assert!(!csv_text.contains(identity["secret"].as_str().unwrap()));

    // A day range (inclusive) over HTTP as JSON.
    let (code, text, content_type) = get_text(
        &agent,
        &format!("/v1/export?format=json&from={today}&to={today}"),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let exported: Value = serde_json::from_str(&text).unwrap();
    let exported = exported["events"].as_array().unwrap();
    assert_eq!(exported.len(), 1);
    assert_eq!(exported[0]["event_id"], events[0]["event_id"]);
    assert_eq!(exported[0]["context"], events[0]["context"]);
    assert_eq!(exported[0]["origin"], "plugin:ai-alt-text");

    // Daily rows use the /v1/usage names.
    let daily_text = stdout(&agent.cli(&["export", "--daily"]));
    let mut reader = csv::Reader::from_reader(daily_text.as_bytes());
    assert_eq!(
        reader
            .headers()
            .unwrap()
            .iter()
            .collect::<Vec<_>>()
            .join(","),
        "day,user_id,source,model,origin,events,prompt_tokens,completion_tokens,total_tokens,cached_tokens,cache_write_tokens,reasoning_tokens"
    );
    let daily: Vec<HashMap<String, String>> = reader.deserialize().map(Result::unwrap).collect();
    assert_eq!(daily.len(), 7);
    let with_origin = daily.iter().filter(|r| r["origin"] == "plugin:ai-alt-text");
    assert_eq!(with_origin.count(), 4, "{daily:?}");
    let daily_json: Value = serde_json::from_str(&stdout(
        &agent.cli(&["export", "--daily", "--format", "json"]),
    ))
    .unwrap();
    let rows = daily_json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 7);
    assert_eq!(rows.iter().filter(|r| r["origin"].is_null()).count(), 3);

    let (code, body) = agent.get("/v1/export?format=xml").await.unwrap();
    assert_bad_parameter(code, &body, "format");
}

#[tokio::test]
async fn usage_is_current_to_the_last_event_and_counts_each_event_once_after_a_rollup() {
    let agent = Agent::start("").await;
    let now = Utc::now().timestamp_millis();
    let today = day_text(Calendar::parse("UTC").unwrap().date_of(now));
    let yesterday = day_text(Calendar::parse("UTC").unwrap().date_of(now - DAY_MS));
    let with_origin = |mut e: Value, origin: &str| {
        e["origin"] = json!(origin);
        e
    };
    record_all(
        &agent,
        &[
            with_origin(
                event(1, "inline", "gpt-4o-mini", now, 100, 10),
                "plugin:ai-alt-text",
            ),
            with_origin(
                event(2, "inline", "gpt-4o-mini", now, 200, 20),
                "theme:acme",
            ),
            event(1, "queue", "gpt-4o-mini", now - DAY_MS, 300, 30),
        ],
    )
    .await;

    // No rollup has run: the answer comes from the raw events at once.
    let (code, usage) = agent
        .get("/v1/usage?group_by=day,user,origin")
        .await
        .unwrap();
    assert_eq!(code, StatusCode::OK, "{usage}");
    assert_eq!(
        usage["rows"],
        json!([
            {"day": yesterday, "user_id": 1, "origin": null, "events": 1,
             "prompt_tokens": 300, "completion_tokens": 30, "total_tokens": 330,
             "cached_tokens": 150, "cache_write_tokens": 0, "reasoning_tokens": 7},
            {"day": today, "user_id": 1, "origin": "plugin:ai-alt-text", "events": 1,
             "prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110,
             "cached_tokens": 50, "cache_write_tokens": 0, "reasoning_tokens": 2},
            {"day": today, "user_id": 2, "origin": "theme:acme", "events": 1,
             "prompt_tokens": 200, "completion_tokens": 20, "total_tokens": 220,
             "cached_tokens": 100, "cache_write_tokens": 0, "reasoning_tokens": 5},
        ]),
        "{usage}"
    );
    assert_eq!(usage["totals"]["events"], 3);
    assert_eq!(usage["totals"]["total_tokens"], 660);

    // Rolled up, then one more event today: each event counts exactly once.
    let (code, rolled) = agent.post("/v1/rollup", &json!({})).await;
    assert_eq!(code, StatusCode::OK, "{rolled}");
    record_all(
        &agent,
        &[with_origin(
            event(3, "bulk", "gpt-4o-mini", now, 1000, 100),
            "plugin:ai-alt-text",
        )],
    )
    .await;
    let (_, usage) = agent.get("/v1/usage?group_by=origin").await.unwrap();
    let by_origin: Vec<(Value, u64, u64)> = usage["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["origin"].clone(),
                r["events"].as_u64().unwrap(),
                r["total_tokens"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        by_origin,
        [
            (Value::Null, 1, 330),
            (json!("plugin:ai-alt-text"), 2, 1210),
            (json!("theme:acme"), 1, 220),
        ],
        "{usage}"
    );
    assert_eq!(usage["totals"]["events"], 4);
    let (_, today_only) = agent
        .get(&format!("/v1/usage?from={today}&to={today}&group_by=day"))
        .await
        .unwrap();
    assert_eq!(today_only["rows"][0]["events"], 3, "{today_only}");
    assert_eq!(today_only["totals"]["total_tokens"], 1430);
    let (_, past) = agent
        .get(&format!("/v1/usage?to={yesterday}"))
        .await
        .unwrap();
    assert_eq!(past["totals"]["events"], 1, "{past}");

    // One user's own usage, by origin, rolled up or not.
    let (_, user1) = agent
        .get("/v1/usage?user_id=1&group_by=origin")
        .await
        .unwrap();
    assert_eq!(user1["totals"]["events"], 2, "{user1}");
    assert_eq!(user1["rows"][1]["origin"], "plugin:ai-alt-text", "{user1}");
    let (code, body) = agent.get("/v1/usage?user_id=-1").await.unwrap();
    assert_bad_parameter(code, &body, "user_id");

    // After the next rollup the summaries alone give the same answer.
    agent.post("/v1/rollup", &json!({})).await;
    let (_, rolled_usage) = agent.get("/v1/usage?group_by=origin").await.unwrap();
    assert_eq!(rolled_usage, usage);
    let (_, rolled_user1) = agent
        .get("/v1/usage?user_id=1&group_by=origin")
        .await
        .unwrap();
    assert_eq!(rolled_user1, user1);
}

/// Inserts events straight into the database (the API refuses events older than the
/// retention), as if they had been recorded long ago.
fn insert_old_events(agent: &Agent, user: u64, created_at_ms: i64, count: usize) {
    let mut db = agent.open_db();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let tx = db.transaction().unwrap();
    tx.execute(
        "INSERT INTO models (name) VALUES ('old-model') ON CONFLICT(name) DO NOTHING",
        [],
    )
    .unwrap();
    let model: i64 = tx
        .query_row("SELECT id FROM models WHERE name = 'old-model'", [], |r| {
            r.get(0)
        })
        .unwrap();
    for i in 0..count {
        tx.execute(
            "INSERT INTO events (event_id, user_id, source, model_id, prompt_tokens, completion_tokens, created_at)
             VALUES (?1, ?2, 1, ?3, 10, 5, ?4)",
            rusqlite::params![uuid::Uuid::new_v4().as_bytes(), user as i64, model, created_at_ms + i as i64],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

#[tokio::test]
async fn purge_deletes_expired_events_after_rolling_them_up_and_counts_unsynced() {
    let agent = Agent::start("").await;
    let now = Utc::now().timestamp_millis();
    insert_old_events(&agent, 8, now - 100 * DAY_MS, 30);
    insert_old_events(&agent, 8, now - 89 * DAY_MS, 5);
    record_all(&agent, &[event(1, "inline", "gpt-4o-mini", now, 1, 1)]).await;

    let purged: Value = serde_json::from_str(&stdout(&agent.cli(&["purge", "--json"]))).unwrap();
    assert_eq!(purged["events_deleted"], 30, "{purged}");
    assert_eq!(purged["unsynced_deleted"], 30, "{purged}");
    assert_eq!(
        purged["rollup"]["new_events"], 36,
        "rolled up before purging: {purged}"
    );
    assert_eq!(agent.stored_events(), 6);

    // The purged day keeps its summary.
    let old_day = day_text(Calendar::parse("UTC").unwrap().date_of(now - 100 * DAY_MS));
    let (_, usage) = agent
        .get(&format!("/v1/usage?from={old_day}&to={old_day}"))
        .await
        .unwrap();
    assert_eq!(usage["totals"]["events"], 30);

    let (_, metrics, _) = get_text(&agent, "/metrics").await;
    let samples = parse_exposition(&metrics).unwrap();
    assert_eq!(samples["usage_agent_purged_unsynced_events_total"], 30.0);
    assert!(samples["usage_agent_job_runs_total{job=cleanup}"] >= 1.0);

    let (code, again) = agent.post("/v1/purge", &json!({})).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(again["events_deleted"], 0);
}

#[tokio::test]
async fn forget_erases_a_user_over_http_and_cli() {
    let agent = Agent::start("").await;
    let now = Utc::now().timestamp_millis();
    let events: Vec<Value> = (0..12)
        .map(|i| {
            event(
                5 + i % 3,
                "queue",
                "gpt-4o-mini",
                now - (i as i64) * DAY_MS / 2,
                10,
                10,
            )
        })
        .collect();
    record_all(&agent, &events).await;
    agent.post("/v1/rollup", &json!({})).await;

    let (code, body) = agent
        .request(reqwest::Method::DELETE, "/v1/users/5", None)
        .await
        .unwrap();
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], 5);
    assert_eq!(body["events_deleted"], 4);
    assert!(body["daily_rows_deleted"].as_u64().unwrap() >= 1, "{body}");

    let out = stdout(&agent.cli(&["forget", "--user", "6"]));
    assert!(out.contains("4 event(s)"), "{out}");

    let (_, usage) = agent.get("/v1/usage?group_by=user").await.unwrap();
    let users: Vec<u64> = usage["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["user_id"].as_u64().unwrap())
        .collect();
    assert_eq!(users, vec![7]);
    let csv_text = stdout(&agent.cli(&["export"]));
    let records: Vec<csv::StringRecord> = csv::Reader::from_reader(csv_text.as_bytes())
        .records()
        .map(Result::unwrap)
        .collect();
    assert_eq!(records.len(), 4, "user 7's events only:\n{csv_text}");
    assert!(records.iter().all(|r| &r[1] == "7"));

    let (code, body) = agent
        .request(reqwest::Method::DELETE, "/v1/users/abc", None)
        .await
        .unwrap();
    assert_bad_parameter(code, &body, "user_id");
    assert_eq!(agent.cli(&["forget", "--user", "x"]).status.code(), Some(2));
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_count_events() {
    let agent = Agent::start("").await;
    let now = Utc::now().timestamp_millis();
    record_all(
        &agent,
        &[
            event(1, "bulk", "m", now, 1, 1),
            event(2, "bulk", "m", now, 1, 1),
        ],
    )
    .await;
    let mut bad = event(1, "queue", "m", now, 1, 1);
    bad["prompt_tokens"] = json!(-1);
    let (code, _) = agent.post("/v1/events", &bad).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);

    let (code, text, content_type) = get_text(&agent, "/metrics").await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        samples["usage_agent_events_total{outcome=recorded,source=bulk}"], 2.0,
        "{text}"
    );
    assert_eq!(
        samples["usage_agent_events_total{outcome=rejected,source=queue}"], 1.0,
        "{text}"
    );
    assert_eq!(samples["usage_agent_pending_events"], 2.0);
    assert_eq!(samples["usage_agent_failed_events"], 0.0);
    assert_eq!(samples["usage_agent_ingest_latency_seconds_count"], 1.0);
    assert_eq!(
        samples["usage_agent_last_successful_sync_timestamp_seconds"],
        0.0
    );
}

/// Every labelled series the agent knows is on the first scrape, at 0, so `increase()` in
/// an alert rule sees its first increment (a missed run, a rate-limited sync).
#[tokio::test]
async fn every_known_labelled_series_starts_at_zero() {
    let agent = Agent::start("").await;
    let (code, text, _) = get_text(&agent, "/metrics").await;
    assert_eq!(code, StatusCode::OK);
    let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let zero = |name: &str| {
        assert_eq!(samples.get(name), Some(&0.0), "{name} in\n{text}");
    };
    for job in ["rollup", "cleanup", "sync"] {
        zero(&format!("usage_agent_job_runs_total{{job={job}}}"));
        zero(&format!("usage_agent_job_failures_total{{job={job}}}"));
        zero(&format!("usage_agent_job_missed_total{{job={job}}}"));
    }
    for category in [
        "network",
        "server",
        "rate_limit",
        "authentication",
        "validation",
        "local",
    ] {
        zero(&format!(
            "usage_agent_sync_errors_total{{category={category}}}"
        ));
    }
    for result in ["ok", "refused", "error"] {
        zero(&format!(
            "usage_agent_sync_batches_total{{result={result}}}"
        ));
    }
    for result in ["accepted", "duplicate", "rejected"] {
        zero(&format!("usage_agent_sync_events_total{{result={result}}}"));
    }
    for source in ["inline", "bulk", "queue", "manual"] {
        for outcome in ["recorded", "duplicate", "rejected"] {
            zero(&format!(
                "usage_agent_events_total{{outcome={outcome},source={source}}}"
            ));
        }
    }
    zero("usage_agent_events_total{outcome=rejected,source=unknown}");
    for scope in ["user_daily", "user_monthly", "site_daily", "site_monthly"] {
        zero(&format!("usage_agent_quota_denials_total{{scope={scope}}}"));
    }
    zero("usage_agent_quota_holds");
}

#[tokio::test]
async fn the_schedule_runs_rollup_and_cleanup_on_its_own() {
    let mut agent = Agent::configure_with(
        "timezone = \"Europe/Berlin\"",
        "[schedule]\nrollup = \"* * * * * *\"\ncleanup = \"*/2 * * * * *\"",
    );
    agent.spawn().await;
    record_all(
        &agent,
        &[event(3, "manual", "m", Utc::now().timestamp_millis(), 4, 2)],
    )
    .await;
    poll(
        "the scheduled rollup",
        Duration::from_secs(20),
        async || {
            let (_, usage) = agent.get("/v1/usage").await.ok()?;
            (usage["totals"]["events"] == 1).then_some(())
        },
    )
    .await;
    poll(
        "a scheduled cleanup run",
        Duration::from_secs(20),
        async || {
            let (_, text, _) = get_text(&agent, "/metrics").await;
            let samples = parse_exposition(&text).ok()?;
            (samples
                .get("usage_agent_job_runs_total{job=cleanup}")
                .copied()
                .unwrap_or(0.0)
                >= 1.0)
                .then_some(())
        },
    )
    .await;
    assert!(
        agent.terminate().success(),
        "stops cleanly with the scheduler running"
    );
}
