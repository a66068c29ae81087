//! What one client can hold (SPEC 10), tried on the real servers: the connection cap of
//! the agent's socket and of the receiver, and the agent's shutdown deadline against a
//! client that never finishes its request. The timeouts themselves are unit-tested in
//! `src/server.rs` with short limits.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::common::{TestReceiver, receiver_settings};
use crate::harness::{Agent, exists, signal, wait_with_deadline};

/// Whether the peer closes `stream` within `within` (a read that ends, not one that waits).
fn closed_within<S: Read>(stream: &mut S, within: Duration) -> bool {
    let mut buffer = [0u8; 256];
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) if Instant::now() < deadline => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
    false
}

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";

fn answer_status<S: Read + Write>(stream: &mut S, request: &[u8]) -> String {
    stream.write_all(request).unwrap();
    let mut buffer = [0u8; 1024];
    let n = stream.read(&mut buffer).unwrap();
    String::from_utf8_lossy(&buffer[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn the_receiver_closes_connections_past_max_connections_and_serves_the_open_ones() {
    let settings = usage_agent::receiver::ReceiverSettings {
        max_connections: 3,
        ..receiver_settings()
    };
    let rx = TestReceiver::start(settings);
    let open: Vec<std::net::TcpStream> = (0..3)
        .map(|_| {
            let stream = std::net::TcpStream::connect(rx.addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            stream
        })
        .collect();
    let mut refused = std::net::TcpStream::connect(rx.addr).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = refused.write_all(HEALTH);
    assert!(
        closed_within(&mut refused, Duration::from_secs(4)),
        "the fourth connection is closed at once"
    );
    for mut stream in open {
        assert_eq!(answer_status(&mut stream, HEALTH), "HTTP/1.1 200 OK");
    }
}

#[tokio::test]
async fn the_agent_closes_connections_past_max_connections_and_serves_the_open_ones() {
    let agent = Agent::start("max_connections = 2").await;
    let socket = agent.socket.clone();
    tokio::task::spawn_blocking(move || {
        let connect = || {
            let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            stream
        };
        // The harness may keep a pooled connection of its own, so count: of four new
        // connections, at most two are served, the rest are closed at once, and the
        // served ones keep being served.
        let healthz = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut served = Vec::new();
        let mut closed = 0;
        for _ in 0..4 {
            let mut stream = connect();
            let _ = stream.write_all(healthz);
            let mut buffer = [0u8; 1024];
            match stream.read(&mut buffer) {
                Ok(n) if n > 0 => {
                    assert!(buffer.starts_with(b"HTTP/1.1 200"));
                    served.push(stream);
                }
                _ => closed += 1,
            }
        }
        assert!((1..=2).contains(&served.len()), "served {}", served.len());
        assert_eq!(served.len() + closed, 4);
        for stream in &mut served {
            assert_eq!(answer_status(stream, healthz), "HTTP/1.1 200 OK");
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn sigterm_ends_within_shutdown_timeout_while_a_client_holds_a_half_sent_request() {
    let mut agent = Agent::start("shutdown_timeout_secs = 2").await;
    // Headers in, a tenth of the body, then nothing: before SPEC 10 this held the
    // agent's graceful shutdown open for as long as the client liked.
    let mut holder = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    holder
        .write_all(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{\"events\": [",
        )
        .unwrap();
    let (code, _) = agent.get("/v1/status").await.unwrap();
    assert_eq!(
        code,
        reqwest::StatusCode::OK,
        "the agent still serves others"
    );
    let mut child = agent.child.take().unwrap();
    let started = Instant::now();
    signal(&child, "-TERM");
    let status = wait_with_deadline(&mut child, Duration::from_secs(15));
    let took = started.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_secs(4),
        "stopped after {took:?}, past shutdown_timeout_secs = 2 (and its margin)"
    );
    assert!(!exists(&agent.socket), "the socket is removed");
    drop(holder);
}
