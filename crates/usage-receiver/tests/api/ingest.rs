//! Receiver integration tests: a real receiver on a loopback port, driven over HTTP.
//! Every refusal is checked for its status, its error shape, and that nothing was stored.

use chrono::{DateTime, Duration, Utc};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use usage_protocol::event::format_millis;
use usage_protocol::signing::{
    HEADER_ID, HEADER_INSTALL_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, Secret, sign,
};
use usage_protocol::wire::{gzip, user_hash};
use usage_receiver::ReceiverSettings;
use usage_receiver::store::SummaryQuery;

use crate::common::{
    ENROLL_TOKEN, PROVIDER_USER, TestInstall, TestReceiver, batch_body, client, enroll,
    enroll_request, provider_request, receiver_settings, signed, signed_at,
};
use crate::support::assert_error_shape;

/// Asserts the status and the `{"error": {"code", "message", "details"}}` shape; returns
/// the error object.
async fn assert_error(response: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.expect("error bodies are JSON");
    assert_error_shape(&body, code);
    body["error"].clone()
}

fn event_at(install: &TestInstall, user: u64, created_at: DateTime<Utc>) -> Value {
    json!({
        "event_id": Uuid::now_v7(),
        "user_hash": user_hash(&install.id, user),
        "source": "bulk",
        "model": "gpt-4o-mini",
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "total_tokens": 120,
        "context": {"attachment_id": 42},
        "created_at": format_millis(created_at.timestamp_millis()),
    })
}

fn event(install: &TestInstall) -> Value {
    event_at(install, 1, Utc::now() - Duration::seconds(1))
}

/// Sends `request` with some headers replaced (reqwest's `header` appends instead).
async fn send_replacing(request: RequestBuilder, headers: &[(&'static str, &str)]) -> Response {
    let mut request = request.build().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    client().execute(request).await.unwrap()
}

/// Sends `events` as one signed batch and returns the `200` answer.
async fn send_batch(rx: &TestReceiver, install: &TestInstall, events: &[Value]) -> Value {
    let batch_id = Uuid::now_v7();
    let body = batch_body(batch_id, &install.id, events);
    let response = signed(rx, install, batch_id, &body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["batch_id"], batch_id.to_string());
    answer
}

fn provider_get(rx: &TestReceiver, path_and_query: &str) -> RequestBuilder {
    provider_request(rx, Method::GET, path_and_query)
}

async fn provider_json(rx: &TestReceiver, path_and_query: &str) -> Value {
    let response = provider_get(rx, path_and_query).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{path_and_query}");
    response.json().await.unwrap()
}

/// Events stored for every install, read through the provider summary.
async fn stored_events(rx: &TestReceiver) -> u64 {
    let summary = provider_json(rx, "/api/usage/summary").await;
    summary["totals"]["events"].as_u64().unwrap()
}

#[tokio::test]
async fn health_answers_without_auth() {
    let rx = TestReceiver::start(receiver_settings());
    let response = client().get(rx.url("/health")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let store = crate::RECEIVER_STORE.as_str();
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"status": "ok", "store": store})
    );
    let missing = client().get(rx.url("/nope")).send().await.unwrap();
    assert_error(missing, StatusCode::NOT_FOUND, "not_found").await;
    if store == "sqlite" {
        assert!(rx.dir.path().join("receiver.db").exists());
    }
}

#[tokio::test]
async fn enrollment_is_idempotent_and_refuses_a_different_secret() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    enroll(&rx, &install).await;

    let again = enroll_request(&rx, &install, &install.secret)
        .bearer_auth(ENROLL_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let body: Value = again.json().await.unwrap();
    assert_eq!(
        body,
        json!({"install_id": install.id, "status": "already_enrolled"})
    );

    let other = enroll_request(&rx, &install, &Secret::generate())
        .bearer_auth(ENROLL_TOKEN)
        .send()
        .await
        .unwrap();
    assert_error(other, StatusCode::CONFLICT, "install_conflict").await;

    // The original secret still signs accepted batches.
    let answer = send_batch(&rx, &install, &[event(&install)]).await;
    assert_eq!(answer["accepted"], 1);
}

#[tokio::test]
async fn enrollment_needs_the_right_token() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    let missing = enroll_request(&rx, &install, &install.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    assert_error(
        missing,
        StatusCode::UNAUTHORIZED,
        "invalid_enrollment_token",
    )
    .await;
    let wrong = enroll_request(&rx, &install, &install.secret)
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_error(wrong, StatusCode::UNAUTHORIZED, "invalid_enrollment_token").await;

    // Nothing was enrolled: the install's batches are still unknown.
    let batch_id = Uuid::now_v7();
    let body = batch_body(batch_id, &install.id, &[event(&install)]);
    let response = signed(&rx, &install, batch_id, &body).send().await.unwrap();
    assert_error(response, StatusCode::UNAUTHORIZED, "unknown_install").await;
}

#[tokio::test]
async fn enrollment_is_disabled_without_a_token_or_trust_on_first_use() {
    let settings = ReceiverSettings {
        enrollment_token: None,
        ..receiver_settings()
    };
    let rx = TestReceiver::start(settings);
    let install = TestInstall::new();
    for token in [None, Some(ENROLL_TOKEN)] {
        let mut request = enroll_request(&rx, &install, &install.secret);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_error(response, StatusCode::FORBIDDEN, "enrollment_disabled").await;
    }
}

#[tokio::test]
async fn trust_on_first_use_enrolls_only_unseen_installs() {
    let settings = ReceiverSettings {
        allow_first_sync_without_signature: true,
        ..receiver_settings()
    };
    let rx = TestReceiver::start(settings);
    let install = TestInstall::new();
    let first = enroll_request(&rx, &install, &install.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let same = enroll_request(&rx, &install, &install.secret)
        .send()
        .await
        .unwrap();
    assert_eq!(same.status(), StatusCode::OK);
    let takeover = enroll_request(&rx, &install, &Secret::generate())
        .send()
        .await
        .unwrap();
    assert_error(takeover, StatusCode::CONFLICT, "install_conflict").await;
    // A wrong token is still wrong, even with trust on first use.
    let wrong = enroll_request(&rx, &TestInstall::new(), &Secret::generate())
        .bearer_auth("bad")
        .send()
        .await
        .unwrap();
    assert_error(wrong, StatusCode::UNAUTHORIZED, "invalid_enrollment_token").await;

    let answer = send_batch(&rx, &install, &[event(&install)]).await;
    assert_eq!(answer["accepted"], 1);
}

#[tokio::test]
async fn enrollment_bodies_are_checked() {
    let rx = TestReceiver::start(receiver_settings());
    let post = |body: &'static str, content_type: &'static str| {
        client()
            .post(rx.url("/api/installations"))
            .bearer_auth(ENROLL_TOKEN)
            .header("content-type", content_type)
            .body(body)
    };
    let bad_secret = post(
        r#"{"install_id": "a_b", "secret": "whsec_c2hvcnQ=", "site_hash": "h"}"#,
        "application/json",
    );
    let error = assert_error(
        bad_secret.send().await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_enrollment",
    )
    .await;
    assert_eq!(error["details"][0]["field"], "secret");
    assert!(
        !error.to_string().contains("c2hvcnQ"),
        "the secret is not echoed"
    );
    let missing = post(r#"{"install_id": "a_b"}"#, "application/json");
    assert_error(
        missing.send().await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_enrollment",
    )
    .await;
    let malformed = post("{", "application/json");
    assert_error(
        malformed.send().await.unwrap(),
        StatusCode::BAD_REQUEST,
        "malformed_json",
    )
    .await;
    let text = post("{}", "text/plain");
    assert_error(
        text.send().await.unwrap(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
}

#[tokio::test]
async fn a_batch_is_stored_once_even_when_sent_again() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    enroll(&rx, &install).await;
    let events = [event(&install), event(&install), event(&install)];
    let batch_id = Uuid::now_v7();
    let body = batch_body(batch_id, &install.id, &events);

    let response = signed(&rx, &install, batch_id, &body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer,
        json!({"batch_id": batch_id, "accepted": 3, "duplicates": 0, "rejected": []})
    );

    // A retry of the same batch (signed anew) changes nothing.
    let retry = signed(&rx, &install, batch_id, &body).send().await.unwrap();
    let answer: Value = retry.json().await.unwrap();
    assert_eq!(
        (answer["accepted"].clone(), answer["duplicates"].clone()),
        (json!(0), json!(3))
    );

    let summary = provider_json(
        &rx,
        &format!("/api/usage/summary?install_id={}", install.id),
    )
    .await;
    assert_eq!(
        summary,
        json!({"totals": {"events": 3, "prompt_tokens": 300, "completion_tokens": 60,
                          "total_tokens": 360}, "rows": []})
    );
}

#[tokio::test]
async fn repeats_within_a_batch_count_once() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    enroll(&rx, &install).await;
    let first = event(&install);
    let answer = send_batch(&rx, &install, &[first.clone(), event(&install), first]).await;
    assert_eq!(
        (answer["accepted"].as_u64(), answer["duplicates"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(stored_events(&rx).await, 2);
}

#[tokio::test]
async fn gzip_bodies_are_verified_after_decompression() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    enroll(&rx, &install).await;
    let events: Vec<Value> = (0..20).map(|_| event(&install)).collect();
    let batch_id = Uuid::now_v7();
    let body = batch_body(batch_id, &install.id, &events);
    assert!(body.len() > 1024);
    let response = signed(&rx, &install, batch_id, &body)
        .header("content-encoding", "gzip")
        .body(gzip(&body))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap()["accepted"], 20);
    assert_eq!(stored_events(&rx).await, 20);

    let corrupt = signed(&rx, &install, batch_id, &body)
        .header("content-encoding", "gzip")
        .body(b"not gzip".to_vec())
        .send()
        .await
        .unwrap();
    assert_error(corrupt, StatusCode::BAD_REQUEST, "bad_gzip").await;
    let brotli = signed(&rx, &install, batch_id, &body)
        .header("content-encoding", "br")
        .send()
        .await
        .unwrap();
    assert_error(
        brotli,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
}

#[tokio::test]
async fn bad_signatures_are_refused_and_nothing_is_stored() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    enroll(&rx, &install).await;
    let batch_id = Uuid::now_v7();
    let body = batch_body(batch_id, &install.id, &[event(&install)]);
    let now = Utc::now().timestamp();
    let id = batch_id.to_string();

    let by_other_key = send_replacing(
        signed_at(&rx, &install, batch_id, &body, now),
        &[(
            HEADER_SIGNATURE,
            &sign(&Secret::generate(), &id, now, &body),
        )],
    )
    .await;
    assert_error(by_other_key, StatusCode::UNAUTHORIZED, "invalid_signature").await;
    let mut tampered = body.clone();
    let at = tampered.iter().position(|&b| b == b'1').unwrap();
    tampered[at] = b'2';
    let tampered_body = signed(&rx, &install, batch_id, &body).body(tampered);
    let unsigned = client()
        .post(rx.url("/api/usage/event"))
        .header("content-type", "application/json")
        .header(HEADER_ID, &id)
        .header(HEADER_TIMESTAMP, now.to_string())
        .header(HEADER_INSTALL_ID, &install.id)
        .body(body.clone());
    for request in [tampered_body, unsigned] {
        let response = request.send().await.unwrap();
        assert_error(response, StatusCode::UNAUTHORIZED, "invalid_signature").await;
    }
    assert_eq!(stored_events(&rx).await, 0);
    // The store agrees with the provider view.
    let store = rx.store.clone();
    let summary = tokio::task::spawn_blocking(move || store.summary(&SummaryQuery::default()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.totals.events, 0);
}

#[tokio::test]
async fn stale_and_future_timestamps_are_refused() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    enroll(&rx, &install).await;
    let now = Utc::now().timestamp();
    for timestamp in [now - 301 - 5, now + 301 + 5] {
        let batch_id = Uuid::now_v7();
        let body = batch_body(batch_id, &install.id, &[event(&install)]);
        let response = signed_at(&rx, &install, batch_id, &body, timestamp)
            .send()
            .await
            .unwrap();
        let error = assert_error(response, StatusCode::UNAUTHORIZED, "invalid_signature").await;
        assert!(
            error["message"].as_str().unwrap().contains("timestamp"),
            "{error}"
        );
    }
    assert_eq!(stored_events(&rx).await, 0);
    // Well inside the tolerance in either direction is fine.
    for timestamp in [now - 250, now + 250] {
        let batch_id = Uuid::now_v7();
        let body = batch_body(batch_id, &install.id, &[event(&install)]);
        let response = signed_at(&rx, &install, batch_id, &body, timestamp)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(stored_events(&rx).await, 2);
}

#[tokio::test]
async fn unknown_installs_are_refused() {
    let rx = TestReceiver::start(receiver_settings());
    let stranger = TestInstall::new();
    let batch_id = Uuid::now_v7();
    let body = batch_body(batch_id, &stranger.id, &[event(&stranger)]);
    let response = signed(&rx, &stranger, batch_id, &body)
        .send()
        .await
        .unwrap();
    assert_error(response, StatusCode::UNAUTHORIZED, "unknown_install").await;
    let anonymous = client()
        .post(rx.url("/api/usage/event"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_error(anonymous, StatusCode::UNAUTHORIZED, "missing_install_id").await;
    assert_eq!(stored_events(&rx).await, 0);
}

#[tokio::test]
async fn oversized_bodies_and_gzip_bombs_are_refused() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    enroll(&rx, &install).await;
    let batch_id = Uuid::now_v7();

    let huge = vec![b' '; (2 << 20) + 1];
    let response = signed(&rx, &install, batch_id, &huge).send().await.unwrap();
    assert_error(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

    // 11 MiB of spaces around a valid batch compress to a few KiB.
    let mut bomb = batch_body(batch_id, &install.id, &[event(&install)]);
    bomb.extend(std::iter::repeat_n(b' ', 11 << 20));
    let packed = gzip(&bomb);
    assert!(packed.len() < 100 << 10);
    let response = signed(&rx, &install, batch_id, &bomb)
        .header("content-encoding", "gzip")
        .body(packed)
        .send()
        .await
        .unwrap();
    assert_error(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert_eq!(stored_events(&rx).await, 0);
}

/// A small gzip body may inflate far past what the receiver checks in place: it is then
/// read whole, within the receiver's limit, like any larger body.
#[tokio::test]
async fn a_small_gzip_body_that_inflates_far_is_read_whole() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    enroll(&rx, &install).await;
    let batch_id = Uuid::now_v7();
    // 1 MiB of spaces after a valid batch compress to about 1 KiB.
    let mut body = batch_body(batch_id, &install.id, &[event(&install)]);
    body.extend(std::iter::repeat_n(b' ', 1 << 20));
    let packed = gzip(&body);
    assert!(packed.len() < 16 << 10);
    let response = signed(&rx, &install, batch_id, &body)
        .header("content-encoding", "gzip")
        .body(packed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap()["accepted"], 1);
    assert_eq!(stored_events(&rx).await, 1);
}

#[tokio::test]
async fn malformed_json_wrong_content_type_and_wrong_shape_are_refused() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    enroll(&rx, &install).await;
    let batch_id = Uuid::now_v7();
    let good_events = [event(&install)];

    let malformed = b"{\"batch_id\": ".to_vec();
    let response = signed(&rx, &install, batch_id, &malformed)
        .send()
        .await
        .unwrap();
    assert_error(response, StatusCode::BAD_REQUEST, "malformed_json").await;

    let body = batch_body(batch_id, &install.id, &good_events);
    let response = send_replacing(
        signed(&rx, &install, batch_id, &body),
        &[("content-type", "text/plain")],
    )
    .await;
    assert_error(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;

    let no_events = serde_json::to_vec(&json!({"batch_id": batch_id, "install_id": install.id,
        "sent_at": Utc::now().to_rfc3339()}))
    .unwrap();
    let other_install = batch_body(batch_id, "someone-else", &good_events);
    let other_batch_id = batch_body(Uuid::now_v7(), &install.id, &good_events);
    let too_many: Vec<Value> = (0..1001).map(|_| event(&install)).collect();
    let too_many = batch_body(batch_id, &install.id, &too_many);
    let cases = [
        (no_events, None),
        (other_install, Some("install_id")),
        (other_batch_id, Some("batch_id")),
        (too_many, Some("events")),
    ];
    for (body, field) in cases {
        let response = signed(&rx, &install, batch_id, &body).send().await.unwrap();
        let error = assert_error(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_batch").await;
        if let Some(field) = field {
            assert_eq!(error["details"][0]["field"], field, "{error}");
        }
    }
    assert_eq!(stored_events(&rx).await, 0);
}

#[tokio::test]
async fn invalid_events_are_rejected_one_by_one() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    enroll(&rx, &install).await;
    let mut bad = event(&install);
    bad["model"] = json!("gpt 4o");
    let mut unknown_field = event(&install);
    unknown_field["colour"] = json!("red");
    let events = [
        event(&install),
        bad.clone(),
        event(&install),
        unknown_field.clone(),
    ];
    let answer = send_batch(&rx, &install, &events).await;
    assert_eq!(
        (answer["accepted"].as_u64(), answer["duplicates"].as_u64()),
        (Some(2), Some(0))
    );
    let rejected = answer["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[0]["event_id"], bad["event_id"]);
    assert!(
        rejected[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("model: "),
        "{answer}"
    );
    assert_eq!(rejected[1]["event_id"], unknown_field["event_id"]);
    assert_eq!(rejected[1]["reason"], "colour: unknown field");
    assert_eq!(stored_events(&rx).await, 2);
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after() {
    let settings = ReceiverSettings {
        rate_limit_per_min: 2,
        ..receiver_settings()
    };
    let rx = TestReceiver::start(settings);
    let install = TestInstall::new();
    enroll(&rx, &install).await;
    send_batch(&rx, &install, &[event(&install)]).await;
    send_batch(&rx, &install, &[event(&install)]).await;

    let batch_id = Uuid::now_v7();
    let body = batch_body(batch_id, &install.id, &[event(&install)]);
    let response = signed(&rx, &install, batch_id, &body).send().await.unwrap();
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    assert_error(response, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    assert_eq!(stored_events(&rx).await, 2);

    // Another install has its own allowance.
    let other = TestInstall::new();
    enroll(&rx, &other).await;
    send_batch(&rx, &other, &[event(&other)]).await;
}

#[tokio::test]
async fn the_summary_groups_by_day_user_source_and_model() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    let other = TestInstall::new();
    enroll(&rx, &install).await;
    enroll(&rx, &other).await;
    let today = Utc::now().date_naive();
    let noon = |days_ago: i64| {
        (today - Duration::days(days_ago))
            .and_hms_opt(12, 0, 0)
            .unwrap()
            .and_utc()
    };
    let day = |days_ago: i64| {
        (today - Duration::days(days_ago))
            .format("%Y-%m-%d")
            .to_string()
    };

    let mut inline = event_at(&install, 2, noon(1));
    inline["source"] = json!("inline");
    inline["model"] = json!("claude-3-haiku");
    let events = [
        event_at(&install, 1, noon(2)),
        event_at(&install, 1, noon(1)),
        inline,
    ];
    send_batch(&rx, &install, &events).await;
    send_batch(&rx, &other, &[event_at(&other, 1, noon(1))]).await;

    let base = format!("/api/usage/summary?install_id={}", install.id);
    let by_day = provider_json(&rx, &format!("{base}&group_by=day")).await;
    assert_eq!(by_day["totals"]["events"], 3);
    assert_eq!(
        by_day["rows"],
        json!([
            {"day": day(2), "events": 1, "prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
            {"day": day(1), "events": 2, "prompt_tokens": 200, "completion_tokens": 40, "total_tokens": 240},
        ])
    );

    let by_user = provider_json(&rx, &format!("{base}&group_by=user,source,model")).await;
    let rows = by_user["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let user2 = rows
        .iter()
        .find(|r| r["user_hash"] == user_hash(&install.id, 2))
        .unwrap();
    assert_eq!(
        (&user2["source"], &user2["model"], &user2["events"]),
        (&json!("inline"), &json!("claude-3-haiku"), &json!(1))
    );
    assert!(rows.iter().all(|r| r.get("day").is_none()));

    let one_day = provider_json(&rx, &format!("{base}&from={0}&to={0}", day(2))).await;
    assert_eq!(one_day["totals"]["events"], 1);
    assert_eq!(one_day["rows"], json!([]));

    let everyone = provider_json(&rx, "/api/usage/summary?group_by=source").await;
    assert_eq!(everyone["totals"]["events"], 4);

    let csv = provider_get(&rx, &format!("{base}&group_by=day&format=csv"))
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), StatusCode::OK);
    assert!(
        csv.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let text = csv.text().await.unwrap();
    assert_eq!(
        text,
        format!(
            "day,events,prompt_tokens,completion_tokens,total_tokens\n{},1,100,20,120\n{},2,200,40,240\n",
            day(2),
            day(1)
        )
    );

    for bad in [
        "group_by=week",
        "from=yesterday",
        "from=2026-02-02&to=2026-02-01",
        "colour=red",
    ] {
        let response = provider_get(&rx, &format!("/api/usage/summary?{bad}"))
            .send()
            .await
            .unwrap();
        assert_error(response, StatusCode::BAD_REQUEST, "invalid_query").await;
    }
}

#[tokio::test]
async fn the_summary_groups_by_origin_alone_and_with_other_keys_as_json_and_csv() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    enroll(&rx, &install).await;
    // Noon of the past two days: never in the future.
    let day1 = Utc::now().date_naive() - Duration::days(1);
    let day2 = day1 - Duration::days(1);
    let noon = day1.and_hms_opt(12, 0, 0).unwrap().and_utc();
    let earlier = day2.and_hms_opt(12, 0, 0).unwrap().and_utc();
    let with_origin = |user: u64, at, origin: &str| {
        let mut event = event_at(&install, user, at);
        event["origin"] = json!(origin);
        event
    };
    let events = [
        with_origin(1, noon, "plugin:ai-alt-text"),
        with_origin(2, noon, "plugin:ai-alt-text"),
        with_origin(1, earlier, "theme:acme"),
        event_at(&install, 1, noon),
    ];
    send_batch(&rx, &install, &events).await;

    let base = format!("/api/usage/summary?install_id={}", install.id);
    let by_origin = provider_json(&rx, &format!("{base}&group_by=origin")).await;
    assert_eq!(
        by_origin["rows"],
        json!([
            {"origin": null, "events": 1, "prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
            {"origin": "plugin:ai-alt-text", "events": 2, "prompt_tokens": 200, "completion_tokens": 40, "total_tokens": 240},
            {"origin": "theme:acme", "events": 1, "prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
        ]),
        "{by_origin}"
    );
    assert_eq!(by_origin["totals"]["events"], 4);

    let by_day = provider_json(&rx, &format!("{base}&group_by=day,user,origin")).await;
    let rows: Vec<(String, Value, u64)> = by_day["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["user_hash"].as_str().unwrap().len(), 64, "{r}");
            (
                r["day"].as_str().unwrap().to_owned(),
                r["origin"].clone(),
                r["events"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows.len(), 4, "{by_day}");
    assert_eq!(rows[0], (day2.to_string(), json!("theme:acme"), 1));
    assert!(
        rows[1..]
            .iter()
            .all(|(day, _, events)| *day == day1.to_string() && *events == 1)
    );
    assert_eq!(
        rows.iter()
            .filter(|(_, origin, _)| origin.is_null())
            .count(),
        1
    );

    let csv = provider_get(&rx, &format!("{base}&group_by=origin&format=csv"))
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), StatusCode::OK);
    assert_eq!(
        csv.text().await.unwrap(),
        "origin,events,prompt_tokens,completion_tokens,total_tokens\n\
         ,1,100,20,120\n\
         plugin:ai-alt-text,2,200,40,240\n\
         theme:acme,1,100,20,120\n"
    );

    let raw = provider_json(&rx, &format!("/api/usage/events?install_id={}", install.id)).await;
    let mut origins: Vec<Value> = raw["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["origin"].clone())
        .collect();
    origins.sort_by_key(|o| o.to_string());
    assert_eq!(
        origins,
        [
            json!("plugin:ai-alt-text"),
            json!("plugin:ai-alt-text"),
            json!("theme:acme"),
            Value::Null
        ]
    );
}

#[tokio::test]
async fn events_are_paged_oldest_first() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    enroll(&rx, &install).await;
    let start = Utc::now() - Duration::hours(1);
    // Sent newest first, so the order of the pages comes from created_at alone.
    let events: Vec<Value> = (0..5)
        .rev()
        .map(|i| event_at(&install, i, start + Duration::minutes(i as i64)))
        .collect();
    send_batch(&rx, &install, &events).await;

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = Vec::new();
    loop {
        let mut query = format!("/api/usage/events?install_id={}&limit=2", install.id);
        if let Some(cursor) = &after {
            query.push_str(&format!("&after={cursor}"));
        }
        let page = provider_json(&rx, &query).await;
        let batch = page["events"].as_array().unwrap().clone();
        pages.push(batch.len());
        seen.extend(batch);
        match page["next"].as_str() {
            Some(cursor) => after = Some(cursor.to_owned()),
            None => {
                assert_eq!(page["next"], Value::Null);
                break;
            }
        }
        assert!(pages.len() < 10, "paging does not end");
    }
    assert_eq!(pages.iter().sum::<usize>(), 5);
    assert_eq!(pages[..2], [2, 2]);
    let created: Vec<&str> = seen
        .iter()
        .map(|e| e["created_at"].as_str().unwrap())
        .collect();
    let mut sorted = created.clone();
    sorted.sort();
    assert_eq!(created, sorted);
    let mut expected: Vec<Value> = events.clone();
    expected.reverse();
    assert_eq!(seen[0]["event_id"], expected[0]["event_id"]);
    assert_eq!(seen[0]["install_id"], install.id);
    assert_eq!(seen[0]["context"], json!({"attachment_id": 42}));
    assert_eq!(seen[0]["total_tokens"], 120);

    let all = provider_json(&rx, "/api/usage/events?limit=5000").await;
    assert_eq!(all["events"].as_array().unwrap().len(), 5);
    assert_eq!(all["next"], Value::Null);
    for bad in ["limit=0", "limit=ten", "after=garbage"] {
        let response = provider_get(&rx, &format!("/api/usage/events?{bad}"))
            .send()
            .await
            .unwrap();
        assert_error(response, StatusCode::BAD_REQUEST, "invalid_query").await;
    }
}

#[tokio::test]
async fn every_provider_route_needs_basic_auth() {
    let rx = TestReceiver::start(receiver_settings());
    let unconfigured = TestReceiver::start(ReceiverSettings {
        provider_username: None,
        provider_password: None,
        ..receiver_settings()
    });
    for path in ["/api/usage/summary", "/api/usage/events"] {
        let anonymous = client().get(rx.url(path)).send().await.unwrap();
        assert_eq!(
            anonymous.headers()["www-authenticate"],
            r#"Basic realm="usage-agent""#
        );
        assert_error(anonymous, StatusCode::UNAUTHORIZED, "unauthorized").await;
        let wrong = client()
            .get(rx.url(path))
            .basic_auth(PROVIDER_USER, Some("wrong"))
            .send()
            .await
            .unwrap();
        assert_error(wrong, StatusCode::UNAUTHORIZED, "unauthorized").await;
        let right = provider_get(&rx, path).send().await.unwrap();
        assert_eq!(right.status(), StatusCode::OK, "{path}");

        let unset = provider_get(&unconfigured, path).send().await.unwrap();
        assert_error(unset, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
}
