//! What a hostile client or agent finds at the receiver's edges: credentials checked
//! before a body is read, a bounded number of models per install and day, bounded lists.
//! Runs on SQLite here and on PostgreSQL in `tests/api_postgres`.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{ENROLL_TOKEN, TestReceiver, receiver_settings};

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
