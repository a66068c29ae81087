//! Slow and idle connections: 300 connections held open against each server, half sending
//! nothing, half trickling header bytes that never end, while real requests on fresh
//! connections keep being answered within 50 ms (the connection caps are 512 for the agent
//! and 4096 for the receiver, far above 300; a header that takes over 10 s closes its
//! connection).
//!
//! Latency on a shared 2-core machine is noisy, so the bound is on the 90th percentile
//! of 40 requests, and a measurement over the bound is taken once more before failing
//! (both are printed). The test holds [`crate::support::EXCLUSIVE`] so that the suite's
//! kill loop does not load the machine meanwhile.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use uuid::Uuid;

use crate::common::{
    PROVIDER_PASSWORD, PROVIDER_USER, TestInstall, TestReceiver, batch_body, enroll,
    receiver_settings, signed,
};
use crate::harness::{Agent, event, new_id, poll};
use crate::support::EXCLUSIVE;

const HELD: usize = 300;
const REQUESTS: usize = 40;
const BOUND: Duration = Duration::from_millis(50);

/// Holds `stream` open: sends nothing if `idle`, else a request line and then one header
/// byte every 500 ms, never the blank line that ends the headers. Counts the connection
/// in `closed` once the server has closed it.
fn hold<S>(mut stream: S, idle: bool, closed: Arc<AtomicUsize>) -> tokio::task::JoinHandle<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut buffer = [0u8; 64];
        if idle {
            // Waits for the server to close (or the test to end).
            let _ = stream.read(&mut buffer).await;
        } else {
            let mut gone = stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .is_err();
            while !gone {
                tokio::select! {
                    read = stream.read(&mut buffer) => gone = matches!(read, Ok(0) | Err(_)),
                    () = tokio::time::sleep(Duration::from_millis(500)) => {
                        gone = stream.write_all(b"a").await.is_err();
                    }
                }
            }
        }
        closed.fetch_add(1, Ordering::Relaxed);
    })
}

/// Times `REQUESTS` requests; each must succeed. Returns the sorted durations.
async fn measure<F, Fut>(mut request: F) -> Vec<Duration>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut times = Vec::with_capacity(REQUESTS);
    for i in 0..REQUESTS {
        let started = Instant::now();
        let ok = tokio::time::timeout(Duration::from_secs(5), request(i))
            .await
            .unwrap_or(false);
        assert!(ok, "request {i} failed while connections were held");
        times.push(started.elapsed());
    }
    times.sort();
    times
}

fn p90(times: &[Duration]) -> Duration {
    times[(times.len() * 9).div_ceil(10) - 1]
}

/// Measures, and measures once more if the 90th percentile is over the bound.
async fn assert_fast<F, Fut>(server: &str, mut request: F)
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = bool>,
{
    for attempt in 1..=2 {
        let times = measure(&mut request).await;
        let (median, p90, max) = (times[times.len() / 2], p90(&times), times[times.len() - 1]);
        eprintln!(
            "{server} with {HELD} slow connections held, attempt {attempt}: median {median:?}, p90 {p90:?}, max {max:?}"
        );
        if p90 <= BOUND {
            return;
        }
        assert!(
            attempt < 2,
            "{server}: p90 {p90:?} over {BOUND:?} twice with {HELD} slow connections held"
        );
    }
}

/// Waits until the servers closed every trickling connection (10 s header limit), and
/// checks that the idle ones are still open (their limit is the 60 s idle time).
async fn slow_headers_are_cut(closed: &AtomicUsize, since: Instant) {
    poll(
        "the server to close connections whose headers never end",
        Duration::from_secs(25),
        async || (closed.load(Ordering::Relaxed) >= HELD / 2).then_some(()),
    )
    .await;
    let took = since.elapsed();
    assert!(
        took >= Duration::from_secs(9),
        "closed after {took:?}, before the 10 s header limit"
    );
    assert_eq!(
        closed.load(Ordering::Relaxed),
        HELD / 2,
        "only the trickling connections are closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_answers_within_50_ms_while_300_slow_connections_are_held() {
    let _alone = EXCLUSIVE.lock().await;
    let agent = Agent::start("").await;
    let closed = Arc::new(AtomicUsize::new(0));
    let opened = Instant::now();
    let mut held = Vec::new();
    for i in 0..HELD {
        let stream = tokio::net::UnixStream::connect(&agent.socket)
            .await
            .expect("connect to the agent");
        held.push(hold(stream, i % 2 == 0, Arc::clone(&closed)));
    }
    let client = reqwest::Client::builder()
        .unix_socket(agent.socket.clone())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    assert_fast("the agent", |i| {
        let client = client.clone();
        async move {
            // A fresh connection each time: the accept loop is not starved either.
            let request = if i % 2 == 0 {
                client.get("http://localhost/v1/status")
            } else {
                client
                    .post("http://localhost/v1/events")
                    .json(&event(&new_id()))
            };
            match request.send().await {
                Ok(r) => matches!(r.status(), StatusCode::OK | StatusCode::ACCEPTED),
                Err(_) => false,
            }
        }
    })
    .await;
    assert_eq!(
        closed.load(Ordering::Relaxed),
        0,
        "every slow one still held"
    );
    slow_headers_are_cut(&closed, opened).await;
    for task in held {
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_answers_within_50_ms_while_300_slow_connections_are_held() {
    let _alone = EXCLUSIVE.lock().await;
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    enroll(&rx, &install).await;
    let closed = Arc::new(AtomicUsize::new(0));
    let opened = Instant::now();
    let mut held = Vec::new();
    for i in 0..HELD {
        let stream = tokio::net::TcpStream::connect(rx.addr)
            .await
            .expect("connect to the receiver");
        held.push(hold(stream, i % 2 == 0, Arc::clone(&closed)));
    }
    let summary = rx.url(&format!("/api/usage/summary?install_id={}", install.id));
    assert_fast("the receiver", |i| {
        let (rx, install, summary) = (&rx, &install, summary.clone());
        async move {
            // `signed` and the provider request each build a client of their own, so
            // every request opens a fresh connection.
            let response = match i % 3 {
                0 => reqwest::Client::new().get(rx.url("/health")).send().await,
                1 => {
                    reqwest::Client::new()
                        .get(summary)
                        .basic_auth(PROVIDER_USER, Some(PROVIDER_PASSWORD))
                        .send()
                        .await
                }
                _ => {
                    let batch_id = Uuid::new_v4();
                    let event = json!({
                        "event_id": new_id(), "user_hash": "ab".repeat(32), "source": "bulk",
                        "model": "gpt-4o-mini", "prompt_tokens": 10, "completion_tokens": 5,
                        "total_tokens": 15, "created_at": chrono::Utc::now().to_rfc3339(),
                    });
                    let body = batch_body(batch_id, &install.id, &[event]);
                    signed(rx, install, batch_id, &body).send().await
                }
            };
            response.is_ok_and(|r| r.status() == StatusCode::OK)
        }
    })
    .await;
    assert_eq!(
        closed.load(Ordering::Relaxed),
        0,
        "every slow one still held"
    );
    slow_headers_are_cut(&closed, opened).await;
    for task in held {
        task.abort();
    }
}
