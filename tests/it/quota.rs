//! Local quotas through the real socket: questions, holds, settlement, erasure, restarts,
//! the command line, status and metrics.

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Agent, assert_error_shape, get_text, new_id, parse_exposition, poll};

fn spend(user_id: u64, prompt: u64, completion: u64) -> Value {
    json!({
        "event_id": new_id(), "user_id": user_id, "source": "inline", "model": "gpt-4o-mini",
        "prompt_tokens": prompt, "completion_tokens": completion,
    })
}

async fn quota(agent: &Agent, query: &str) -> Value {
    let (code, body) = agent.get(&format!("/v1/quota?{query}")).await.unwrap();
    assert_eq!(code, StatusCode::OK, "{body}");
    body
}

fn limit<'a>(answer: &'a Value, scope: &str) -> &'a Value {
    answer["limits"]
        .as_array()
        .and_then(|limits| limits.iter().find(|l| l["scope"] == scope))
        .unwrap_or_else(|| panic!("no {scope} in {answer}"))
}

async fn started_with(quota: &str) -> Agent {
    let mut agent = Agent::configure_with("", &format!("[quota]\n{quota}"));
    agent.spawn().await;
    agent
}

#[tokio::test]
async fn recorded_events_advance_the_quota_at_once_and_duplicates_do_not() {
    let agent = started_with("user_daily_tokens = 1000\nsite_monthly_tokens = 100000").await;
    let answer = quota(&agent, "user_id=5").await;
    assert_eq!(answer["allowed"], true);
    assert_eq!(answer["user_id"], 5);
    let daily = limit(&answer, "user_daily");
    assert_eq!(
        (
            &daily["limit"],
            &daily["used"],
            &daily["held"],
            &daily["remaining"]
        ),
        (&json!(1000), &json!(0), &json!(0), &json!(1000))
    );
    assert!(daily["resets_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        answer["limits"].as_array().unwrap().len(),
        2,
        "only set limits"
    );

    let event = spend(5, 600, 100);
    assert_eq!(
        agent.post("/v1/events", &event).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        agent.post("/v1/events", &event).await.1["status"],
        "duplicate"
    );
    let mut invalid = spend(5, 500, 0);
    invalid["model"] = json!("");
    assert_eq!(
        agent
            .post("/v1/events", &json!({"events": [spend(5, 50, 0), invalid]}))
            .await
            .0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let answer = quota(&agent, "user_id=5&tokens=300").await;
    assert_eq!(limit(&answer, "user_daily")["used"], 700, "{answer}");
    assert_eq!(limit(&answer, "site_monthly")["used"], 700);
    assert_eq!(answer["allowed"], true, "700 + 300 is exactly the limit");
    let answer = quota(&agent, "user_id=5&tokens=301").await;
    assert_eq!(answer["allowed"], false);
    assert_eq!(
        quota(&agent, "user_id=6&tokens=1000").await["allowed"],
        true
    );

    // A back-dated event counts in its own day: yesterday's is not today's.
    let mut yesterday = spend(5, 200, 0);
    yesterday["created_at"] =
        json!((Utc::now() - chrono::Duration::days(1)).to_rfc3339_opts(SecondsFormat::Secs, true));
    assert_eq!(
        agent.post("/v1/events", &yesterday).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        limit(&quota(&agent, "user_id=5").await, "user_daily")["used"],
        700
    );
}

#[tokio::test]
async fn thirty_two_concurrent_holds_against_room_for_ten_give_exactly_ten() {
    let agent = started_with("site_daily_tokens = 10000").await;
    let asks = (0..32).map(|user| {
        let agent = &agent;
        async move {
            agent
                .post("/v1/quota/holds", &json!({"user_id": user, "tokens": 1000}))
                .await
        }
    });
    let answers = futures_util::future::join_all(asks).await;
    let granted: Vec<&Value> = answers
        .iter()
        .filter(|(code, _)| *code == StatusCode::CREATED)
        .map(|(_, body)| body)
        .collect();
    assert_eq!(granted.len(), 10, "{answers:?}");
    for (code, body) in &answers {
        match *code {
            StatusCode::CREATED => {
                assert_eq!(body["allowed"], true);
                assert!(body["hold_id"].as_str().is_some(), "{body}");
                assert!(body["expires_at"].as_str().is_some(), "{body}");
            }
            StatusCode::OK => {
                assert_eq!(body["allowed"], false, "{body}");
                assert!(body.get("hold_id").is_none(), "{body}");
            }
            other => panic!("{other}: {body}"),
        }
    }
    let site = quota(&agent, "user_id=0").await;
    assert_eq!(limit(&site, "site_daily")["held"], 10_000);
    assert_eq!(site["allowed"], false, "a limit reached allows nothing");

    // Each call spends less than it held; its event settles the hold.
    let settling: Vec<Value> = granted
        .iter()
        .enumerate()
        .map(|(i, hold)| {
            let mut event = spend(1, 500 + i as u64, 100);
            event["hold_id"] = hold["hold_id"].clone();
            event
        })
        .collect();
    let (code, body) = agent.post("/v1/events", &json!({"events": settling})).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    let site = quota(&agent, "user_id=0").await;
    let daily = limit(&site, "site_daily");
    let real: u64 = (0..10).map(|i| 600 + i).sum();
    assert_eq!(
        (&daily["used"], &daily["held"]),
        (&json!(real), &json!(0)),
        "{site}"
    );
    let (code, _, _) = get_text(&agent, "/metrics").await;
    assert_eq!(code, StatusCode::OK);
}

#[tokio::test]
async fn holds_are_released_by_delete_or_after_their_time() {
    let agent = started_with("user_daily_tokens = 1000\nhold_ttl_secs = 1").await;
    let (code, hold) = agent
        .post("/v1/quota/holds", &json!({"user_id": 3, "tokens": 900}))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{hold}");
    let path = format!("/v1/quota/holds/{}", hold["hold_id"].as_str().unwrap());
    let (code, body) = agent.request(Method::DELETE, &path, None).await.unwrap();
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["released"], true);
    let (code, body) = agent.request(Method::DELETE, &path, None).await.unwrap();
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_error_shape(&body, "unknown_hold");
    let (code, body) = agent
        .request(Method::DELETE, "/v1/quota/holds/not-a-hold", None)
        .await
        .unwrap();
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_error_shape(&body, "invalid_parameter");

    let (code, _) = agent
        .post("/v1/quota/holds", &json!({"user_id": 3, "tokens": 900}))
        .await;
    assert_eq!(code, StatusCode::CREATED);
    assert_eq!(
        limit(&quota(&agent, "user_id=3").await, "user_daily")["held"],
        900
    );
    poll("the hold to expire", Duration::from_secs(10), async || {
        let answer = quota(&agent, "user_id=3").await;
        (limit(&answer, "user_daily")["held"] == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn bad_questions_and_holds_are_refused_naming_the_field() {
    let agent = started_with("user_daily_tokens = 1000").await;
    for (query, parameter) in [
        ("", "user_id"),
        ("user_id=x", "user_id"),
        ("user_id=9007199254740993", "user_id"),
        ("user_id=1&tokens=-5", "tokens"),
        ("user_id=1&token=5", "token"),
    ] {
        let (code, body) = agent.get(&format!("/v1/quota?{query}")).await.unwrap();
        assert_eq!(code, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_error_shape(&body, "invalid_parameter");
        assert_eq!(
            body["error"]["details"][0]["parameter"], parameter,
            "{body}"
        );
    }
    for (hold, fields) in [
        (json!({"user_id": 1}), vec!["tokens"]),
        (
            json!({"user_id": -1, "tokens": 0}),
            vec!["user_id", "tokens"],
        ),
        (
            json!({"user_id": 1, "tokens": 5, "reason": "x"}),
            vec!["reason"],
        ),
        (json!({"user_id": 1, "tokens": 200_000_001}), vec!["tokens"]),
        (json!([1, 2]), vec!["body"]),
    ] {
        let (code, body) = agent.post("/v1/quota/holds", &hold).await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{hold}: {body}");
        assert_error_shape(&body, "invalid_hold");
        let named: Vec<&str> = body["error"]["details"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["field"].as_str().unwrap())
            .collect();
        assert_eq!(named, fields, "{body}");
    }
    let (code, body) = agent
        .post_raw("/v1/quota/holds", "application/json", b"{".to_vec())
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_error_shape(&body, "malformed_json");
    let (code, _) = agent
        .post_raw("/v1/quota/holds", "text/plain", b"{}".to_vec())
        .await;
    assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(agent.status().await["quota"]["holds"], 0, "nothing held");
}

#[tokio::test]
async fn counts_survive_a_restart_and_an_erased_user_leaves_them_at_once() {
    let mut agent = started_with("user_monthly_tokens = 50000\nsite_daily_tokens = 90000").await;
    let events: Vec<Value> = [(1, 1000), (1, 2000), (2, 500), (3, 70)]
        .into_iter()
        .map(|(user, prompt)| spend(user, prompt, 10))
        .collect();
    let (code, _) = agent.post("/v1/events", &json!({"events": events})).await;
    assert_eq!(code, StatusCode::ACCEPTED);
    let mut before = Vec::new();
    for user in 1..=3 {
        before.push(quota(&agent, &format!("user_id={user}")).await);
    }
    assert!(agent.terminate().success());
    agent.spawn().await;
    for user in 1..=3 {
        let after = quota(&agent, &format!("user_id={user}")).await;
        assert_eq!(after, before[user - 1], "user {user}");
    }
    assert_eq!(limit(&before[0], "user_monthly")["used"], 3020);
    assert_eq!(limit(&before[0], "site_daily")["used"], 3610);

    let (code, _) = agent
        .request(Method::DELETE, "/v1/users/1", None)
        .await
        .unwrap();
    assert_eq!(code, StatusCode::OK);
    let answer = quota(&agent, "user_id=1").await;
    assert_eq!(limit(&answer, "user_monthly")["used"], 0);
    assert_eq!(limit(&answer, "site_daily")["used"], 590);
}

#[tokio::test]
async fn without_limits_every_question_is_allowed_and_status_says_nothing() {
    let agent = Agent::start("").await;
    let answer = quota(&agent, "user_id=1&tokens=1000000000").await;
    assert_eq!(answer["allowed"], true);
    assert_eq!(answer["limits"], json!([]));
    assert!(agent.status().await.get("quota").is_none());
    let (code, hold) = agent
        .post("/v1/quota/holds", &json!({"user_id": 1, "tokens": 5}))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{hold}");
}

#[tokio::test]
async fn the_command_line_status_and_metrics_show_the_quota() {
    let agent = started_with("user_daily_tokens = 1000\nsite_daily_tokens = 5000").await;
    assert_eq!(
        agent.post("/v1/events", &spend(4, 800, 0)).await.0,
        StatusCode::ACCEPTED
    );
    let out = agent.cli(&["quota", "--user", "4", "--tokens", "100"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("user 4: allowed"), "{text}");
    assert!(text.contains("user_daily"), "{text}");
    let out = agent.cli(&["quota", "--user", "4", "--tokens", "201", "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["allowed"], false);
    let out = agent.cli(&["quota", "--user", "x"]);
    assert_eq!(out.status.code(), Some(2), "bad usage");

    let status = agent.status().await;
    let site = &status["quota"]["site_limits"];
    assert_eq!(site.as_array().unwrap().len(), 1, "{status}");
    assert_eq!(site[0]["scope"], "site_daily");
    assert_eq!(site[0]["used"], 800);
    let out = agent.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("site_daily"), "{text}");

    let (code, _) = agent
        .post("/v1/quota/holds", &json!({"user_id": 4, "tokens": 150}))
        .await;
    assert_eq!(code, StatusCode::CREATED);
    let (_, text, _) = get_text(&agent, "/metrics").await;
    let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        samples["usage_agent_quota_denials_total{scope=user_daily}"], 1.0,
        "{text}"
    );
    assert_eq!(
        samples["usage_agent_quota_denials_total{scope=site_daily}"],
        0.0
    );
    assert_eq!(samples["usage_agent_quota_holds"], 1.0);
}
