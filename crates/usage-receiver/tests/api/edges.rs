//! What a hostile client or agent finds at the receiver's edges: credentials checked
//! before a body is read, a bounded number of models per install and day, bounded lists.
//! Runs on SQLite here and on PostgreSQL in `tests/api_postgres`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use usage_protocol::signing::Secret;
use usage_receiver::ReceiverSettings;

use crate::budgets::{
    Sink, alerts, budget_settings, closed_port, enroll, put_budget, send, webhook,
};
use crate::common::{ENROLL_TOKEN, TestReceiver, receiver_settings};
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
