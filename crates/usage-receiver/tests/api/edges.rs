//! What a hostile client or agent finds at the receiver's edges: credentials checked
//! before a body is read, a bounded number of models per install and day, bounded lists.
//! Runs on SQLite here and on PostgreSQL in `tests/api_postgres`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{Datelike, NaiveTime, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use usage_protocol::event::format_millis;
use usage_protocol::signing::Secret;
use usage_protocol::wire::user_hash;
use usage_receiver::ReceiverSettings;

use crate::budgets::{
    Sink, alerts, budget_settings, closed_port, enroll, put_budget, send, webhook,
};
use crate::common::{
    ENROLL_TOKEN, TestInstall, TestReceiver, batch_body, provider_request, receiver_settings,
    signed,
};
use crate::support::poll;

/// Sends the head of a request announcing a body of a megabyte that never follows, and
/// answers the status the receiver sends within `within`, or `None` if it sends none.
async fn status_without_the_body(
    rx: &TestReceiver,
    method: &str,
    path: &str,
    authorization: &str,
    within: Duration,
) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(rx.addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {}\r\nauthorization: {authorization}\r\n\
         content-type: application/json\r\ncontent-length: 1000000\r\n\r\n",
        rx.addr
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 512];
        while !answer.windows(2).any(|w| w == b"\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok()?;
    let line = String::from_utf8_lossy(&answer);
    line.split(' ').nth(1)?.parse().ok()
}

/// Wrong credentials are answered at once, before the body they announce has come: an
/// unauthenticated client holds no body in the receiver.
#[tokio::test]
async fn wrong_credentials_are_refused_before_the_body_is_read() {
    let rx = TestReceiver::start(receiver_settings());
    let wrong_basic = "Basic d3Jvbmc6d3Jvbmc="; // wrong:wrong
    let cases = [
        ("POST", "/api/installations", "Bearer not-the-token"),
        ("PUT", "/api/installations/some-install/plan", wrong_basic),
        ("PUT", "/api/installations/some-install/label", wrong_basic),
        ("PUT", "/api/installations/some-install/budget", wrong_basic),
    ];
    for (method, path, authorization) in cases {
        let started = Instant::now();
        let status =
            status_without_the_body(&rx, method, path, authorization, Duration::from_secs(5)).await;
        assert_eq!(
            status,
            Some(401),
            "{method} {path} answered {status:?} after {:?}",
            started.elapsed()
        );
    }
    // The right enrollment token still waits for its body: it is read, then checked.
    let status = status_without_the_body(
        &rx,
        "POST",
        "/api/installations",
        &format!("Bearer {ENROLL_TOKEN}"),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(status, None);
}

/// A webhook that answers `307` to another address is a failed delivery, retried: the
/// signed alert never goes where the redirect points.
#[tokio::test]
async fn a_webhook_redirect_is_a_failed_delivery_never_followed() {
    let elsewhere_addr = closed_port();
    let elsewhere = Sink::default();
    elsewhere.serve(elsewhere_addr).await;
    let redirecting_addr = closed_port();
    let redirects = Arc::new(AtomicUsize::new(0));
    let counted = redirects.clone();
    let target = format!("http://{elsewhere_addr}/hook");
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            let target = target.clone();
            async move {
                (
                    axum::http::StatusCode::TEMPORARY_REDIRECT,
                    [(axum::http::header::LOCATION, target)],
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(redirecting_addr)
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let secret = Secret::generate();
    let rx = TestReceiver::start(ReceiverSettings {
        alert_webhook: Some(webhook(redirecting_addr, &secret)),
        ..budget_settings()
    });
    let install = enroll(&rx).await;
    put_budget(&rx, &install.id, r#"{"monthly": 1.0, "thresholds": [100]}"#).await;
    send(&rx, &install, &crate::budgets::events(&install, 1500)).await;
    poll(
        "the alert to be tried again",
        Duration::from_secs(20),
        async || {
            (redirects.load(Ordering::SeqCst) >= 2 || !elsewhere.ids().is_empty()).then_some(())
        },
    )
    .await;
    assert!(elsewhere.ids().is_empty(), "the redirect was followed");
    assert!(redirects.load(Ordering::SeqCst) >= 2);
    assert_eq!(alerts(&rx).await[0]["delivered_at"], Value::Null);
}

/// An event of `tokens` tokens of `model` at `at_ms`.
fn event_at(install: &TestInstall, model: &str, tokens: u64, at_ms: i64) -> Value {
    json!({
        "event_id": uuid::Uuid::now_v7(),
        "user_hash": user_hash(&install.id, 7),
        "source": "inline",
        "model": model,
        "prompt_tokens": tokens / 2,
        "completion_tokens": tokens - tokens / 2,
        "total_tokens": tokens,
        "created_at": format_millis(at_ms),
    })
}

/// Noon of a day well inside the month before this one.
fn last_month_noon() -> chrono::DateTime<Utc> {
    let first = Utc::now().date_naive().with_day(1).unwrap();
    (first - chrono::Duration::days(10))
        .and_time(NaiveTime::from_hms_opt(12, 0, 0).unwrap())
        .and_utc()
}

/// A late event that takes last month past a threshold alerts in last month; this
/// month's spend is its own.
#[tokio::test]
async fn a_late_event_alerts_in_its_own_month() {
    let rx = TestReceiver::start(budget_settings());
    let install = enroll(&rx).await;
    put_budget(&rx, &install.id, r#"{"monthly": 10.0, "thresholds": [50]}"#).await;
    let late = last_month_noon();
    let month = late.format("%Y-%m").to_string();
    // 4.00 last month: below the threshold.
    send(
        &rx,
        &install,
        &[event_at(&install, "m", 4000, late.timestamp_millis())],
    )
    .await;
    assert!(alerts(&rx).await.is_empty());
    // 2.00 more, late: last month reaches 6.00 of 10.00.
    let later = late + chrono::Duration::days(1);
    send(
        &rx,
        &install,
        &[event_at(&install, "m", 2000, later.timestamp_millis())],
    )
    .await;
    let listed = alerts(&rx).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["month"], month.as_str());
    assert_eq!(listed[0]["threshold"], 50);
    assert_eq!(listed[0]["cost"], json!(6.0));
    // This month has 1.00: nothing more.
    send(&rx, &install, &crate::budgets::events(&install, 1000)).await;
    assert_eq!(alerts(&rx).await.len(), 1);
}

/// Sends `events` as one batch and answers the batch result.
async fn batch(rx: &TestReceiver, install: &TestInstall, events: &[Value]) -> Value {
    let batch_id = uuid::Uuid::now_v7();
    let body = batch_body(batch_id, &install.id, events);
    let response = signed(rx, install, batch_id, &body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

/// An install has at most 200 models a day (UTC): past that, each event of a model new
/// that day is refused on its own, naming the rule; models already counted that day and
/// other days are not affected.
#[tokio::test]
async fn an_install_has_a_bounded_number_of_models_a_day() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    crate::common::enroll(&rx, &install).await;
    let now = Utc::now();
    let midnight = now.date_naive().and_time(NaiveTime::MIN).and_utc();
    let today_ms = (now - chrono::Duration::seconds(2))
        .max(midnight)
        .timestamp_millis();
    let yesterday_ms = today_ms - 86_400_000;

    let events: Vec<Value> = (0..201)
        .map(|n| event_at(&install, &format!("model-{n}"), 10, today_ms))
        .collect();
    let answer = batch(&rx, &install, &events).await;
    assert_eq!(answer["accepted"], 200, "{answer}");
    let rejected = answer["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 1, "{answer}");
    assert_eq!(rejected[0]["event_id"], events[200]["event_id"]);
    let reason = rejected[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("model: ") && reason.contains("200 models"),
        "{reason}"
    );

    let more = [
        event_at(&install, "model-7", 10, today_ms),
        event_at(&install, "model-new", 10, today_ms),
        event_at(&install, "model-new", 10, yesterday_ms),
    ];
    let answer = batch(&rx, &install, &more).await;
    assert_eq!(answer["accepted"], 2, "{answer}");
    assert_eq!(answer["rejected"][0]["event_id"], more[1]["event_id"]);

    let today = format_millis(today_ms)[..10].to_owned();
    let response = provider_request(
        &rx,
        Method::GET,
        &format!(
            "/api/usage/summary?install_id={}&from={today}&to={today}&group_by=model",
            install.id
        ),
    )
    .send()
    .await
    .unwrap();
    let summary: Value = response.json().await.unwrap();
    assert_eq!(summary["rows"].as_array().unwrap().len(), 200);
    assert_eq!(summary["totals"]["events"], 201);
}

async fn get(rx: &TestReceiver, path: &str) -> (StatusCode, Value) {
    let response = provider_request(rx, Method::GET, path)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// `GET /api/alerts` answers a page at a time, with a cursor to the next one, like raw
/// events: every alert once, oldest first.
#[tokio::test]
async fn alerts_are_listed_a_page_at_a_time() {
    let rx = TestReceiver::start(budget_settings());
    let install = enroll(&rx).await;
    let thresholds = r#"{"monthly": 1.0, "thresholds": [10, 20, 30, 40, 50]}"#;
    put_budget(&rx, &install.id, thresholds).await;
    send(&rx, &install, &crate::budgets::events(&install, 600)).await;

    let (status, all) = get(&rx, "/api/alerts").await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(all["alerts"].as_array().unwrap().len(), 5);
    assert_eq!(all["next"], Value::Null);
    let mut paged = Vec::new();
    let mut path = "/api/alerts?limit=2".to_owned();
    for expected in [2, 2, 1] {
        let (status, page) = get(&rx, &path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(page["alerts"].as_array().unwrap().len(), expected, "{page}");
        paged.extend(page["alerts"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(next) => path = format!("/api/alerts?limit=2&after={next}"),
            None => assert_eq!(expected, 1),
        }
    }
    assert_eq!(&paged, all["alerts"].as_array().unwrap());

    for (query, parameter) in [("limit=0", "limit"), ("after=garbage", "after")] {
        let (status, body) = get(&rx, &format!("/api/alerts?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["details"][0]["field"], parameter, "{body}");
    }
}

/// A summary grouped by user over every install has a bound on its rows; past it, the
/// answer names `group_by` and says what to give instead. One install's users have none.
#[tokio::test]
async fn a_summary_of_every_installs_users_is_bounded() {
    let bound = usage_receiver::views::usage::MAX_USER_ROWS_OF_ALL_INSTALLS;
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    crate::common::enroll(&rx, &install).await;
    let at = Utc::now().timestamp_millis() - 2000;
    let users: Vec<u64> = (0..=bound as u64).collect();
    for chunk in users.chunks(1000) {
        let events: Vec<Value> = chunk
            .iter()
            .map(|&user| {
                let mut event = event_at(&install, "m", 10, at);
                event["user_hash"] = user_hash(&install.id, user).into();
                event
            })
            .collect();
        assert_eq!(batch(&rx, &install, &events).await["accepted"], chunk.len());
    }
    let (status, body) = get(&rx, "/api/usage/summary?group_by=user").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{}", body["totals"]);
    assert_eq!(body["error"]["code"], "too_many_rows", "{body}");
    assert_eq!(body["error"]["details"][0]["field"], "group_by", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("install_id")
    );
    let (status, body) = get(&rx, "/api/usage/summary?group_by=user&format=csv").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let path = format!("/api/usage/summary?group_by=user&install_id={}", install.id);
    let (status, body) = get(&rx, &path).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["rows"].as_array().unwrap().len(), bound + 1);
    // Grouped otherwise, every install's summary is answered.
    let (status, body) = get(&rx, "/api/usage/summary?group_by=model").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["totals"]["events"], bound as u64 + 1);
}

/// Erasing a large install holds up no other install: batches of other installs sent
/// meanwhile (with the erased install's own batches among them) are each answered in a
/// fraction of the erasure's time (an erasure in one piece held one of them for all of
/// it), and the erasure leaves nothing of the install.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn erasing_a_large_install_holds_up_no_other_install() {
    let rx = Arc::new(TestReceiver::start(receiver_settings()));
    let large = TestInstall::new();
    crate::common::enroll(&rx, &large).await;
    let now_ms = Utc::now().timestamp_millis();
    // 150,000 events over 30 days.
    for n in 0..150u64 {
        let at = now_ms - 2000 - (n % 30) as i64 * 86_400_000;
        let events: Vec<Value> = (0..1000).map(|_| event_at(&large, "m", 10, at)).collect();
        assert_eq!(batch(&rx, &large, &events).await["accepted"], 1000);
    }
    let others: Vec<TestInstall> = (0..3).map(|_| TestInstall::new()).collect();
    for other in &others {
        crate::common::enroll(&rx, other).await;
    }

    let erasing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let senders: Vec<_> = others
        .into_iter()
        .map(Some)
        .chain([None, None])
        .map(|other| {
            let (rx, erasing, large_id, large_secret) = (
                rx.clone(),
                erasing.clone(),
                large.id.clone(),
                large.secret.clone(),
            );
            tokio::spawn(async move {
                // `None`: the erased install's own agent, still sending.
                let is_other = other.is_some();
                let install = other.unwrap_or(TestInstall {
                    id: large_id,
                    secret: large_secret,
                });
                let mut slowest = Duration::ZERO;
                let mut answered = 0;
                while erasing.load(Ordering::SeqCst) {
                    let events = [event_at(&install, "m", 10, now_ms - 1000)];
                    let batch_id = uuid::Uuid::now_v7();
                    let body = batch_body(batch_id, &install.id, &events);
                    let started = Instant::now();
                    let status = signed(&rx, &install, batch_id, &body)
                        .send()
                        .await
                        .unwrap()
                        .status();
                    slowest = slowest.max(started.elapsed());
                    answered += 1;
                    if is_other {
                        assert_eq!(status, StatusCode::OK);
                    }
                }
                (slowest, answered)
            })
        })
        .collect();
    let started = Instant::now();
    let response = provider_request(
        &rx,
        Method::DELETE,
        &format!("/api/installations/{}", large.id),
    )
    .send()
    .await
    .unwrap();
    let erase_took = started.elapsed();
    erasing.store(false, Ordering::SeqCst);
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    // With the events its agent sent before the erasure began.
    assert!(
        body["events_deleted"].as_u64().unwrap() >= 150_000,
        "{body}"
    );
    let mut results = Vec::new();
    for sender in senders {
        results.push(sender.await.unwrap());
    }
    for (slowest, answered) in &results[..3] {
        assert!(*answered >= 1);
        assert!(
            *slowest < erase_took * 3 / 4,
            "a batch of another install took {slowest:?} while the erasure took {erase_took:?}"
        );
    }
    // Nothing of the erased install is left.
    let path = format!("/api/usage/summary?install_id={}", large.id);
    let (status, summary) = get(&rx, &path).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(summary["totals"]["events"], 0, "{summary}");
    let (_, events) = get(&rx, &format!("/api/usage/events?install_id={}", large.id)).await;
    assert!(events["events"].as_array().unwrap().is_empty());
    let (_, summary) = get(&rx, "/api/usage/summary").await;
    let others_sent: u64 = results[..3].iter().map(|(_, n)| *n as u64).sum();
    assert_eq!(summary["totals"]["events"], others_sent);
}
