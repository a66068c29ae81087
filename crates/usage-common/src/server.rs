//! Serving an axum router over HTTP/1.1 within fixed bounds, for every listener
//! of both servers (the agent's socket and TCP port, the receiver): what one client can
//! hold is bounded, and shutdown ends on time.
//!
//! - A request's headers must arrive within [`HEADER_TIMEOUT`] of its first byte, and a
//!   kept-alive connection that waits for its next request is closed after
//!   [`IDLE_TIMEOUT`]. hyper has one timer for both (its header read timeout starts as
//!   soon as a connection waits for a request), so it is set to the idle time, and
//!   `Watched` closes a connection whose started headers take longer than the header
//!   time.
//! - A body must arrive within [`BODY_TIMEOUT`] of its headers, else `408` and the
//!   connection is closed.
//! - At most `max_connections` connections are open at once; past that, a new one is
//!   closed as soon as it is accepted, while requests on open ones go on.
//! - At shutdown, accepting stops, open connections finish their request and close, and
//!   any still open after the drain time are cut.
//!
//! A leaf: it knows axum, hyper and tokio, and nothing of the agent or the receiver.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::serve::Listener;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::ServiceExt;

/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a kept-alive connection may wait for its next request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client may take to send a body once its headers are in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// What one server allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    /// Open connections at once.
    pub max_connections: usize,
    /// How long shutdown waits for open connections before it closes them.
    pub drain_timeout: Duration,
}

impl Limits {
    /// The timeouts above with the given connection cap and drain time.
    pub fn new(max_connections: usize, drain_timeout: Duration) -> Limits {
        Limits {
            header_timeout: HEADER_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            body_timeout: BODY_TIMEOUT,
            max_connections,
            drain_timeout,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains (see the module
/// doc). Each request carries [`ConnectInfo`] with the peer's address, for per-client
/// throttling.
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) where
    L: Listener,
    L::Addr: Clone + Send + Sync + 'static,
{
    let router = router.layer(middleware::from_fn_with_state(
        limits.body_timeout,
        body_deadline,
    ));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .keep_alive(true);
    let mut refused: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        let (io, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        while connections.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            // Closed at once: the client sees its connection end, not a hang.
            drop(io);
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    refused,
                    "connection limit reached; closing new connections"
                );
            }
            continue;
        };
        let phase = Arc::new(AtomicU8::new(BETWEEN_REQUESTS));
        let (on_request, on_response) = (Arc::clone(&phase), Arc::clone(&phase));
        let service = router
            .clone()
            .map_request(move |mut request: Request<_>| {
                on_request.store(IN_REQUEST, Ordering::Relaxed);
                request.extensions_mut().insert(ConnectInfo(addr.clone()));
                request
            })
            .map_response(move |response| {
                on_response.store(BETWEEN_REQUESTS, Ordering::Relaxed);
                response
            });
        let io = Watched {
            io,
            phase,
            header_timeout: limits.header_timeout,
            deadline: tokio::time::Instant::now(),
            timer: None,
        };
        let connection = http.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            let _permit = permit;
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            drain_s = limits.drain_timeout.as_secs_f64(),
            "closing connections still open at the end of the drain time"
        );
    }
    connections.shutdown().await;
}

/// Where a connection is: waiting for a request, reading one's headers, or in a request
/// (headers parsed, until its response is made).
const BETWEEN_REQUESTS: u8 = 0;
const READING_HEADERS: u8 = 1;
const IN_REQUEST: u8 = 2;

/// A connection's IO that fails once a request's headers, begun, take longer than the
/// header time: the first byte after [`BETWEEN_REQUESTS`] starts the clock, the service
/// seeing the request stops it. The timer is armed only when a read has to wait in the
/// middle of headers; a request whose headers come in one read (nearly all) costs a clock
/// read, not a timer.
struct Watched<IO> {
    io: IO,
    phase: Arc<AtomicU8>,
    header_timeout: Duration,
    /// When the headers being read must be complete.
    deadline: tokio::time::Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        let got_bytes = buf.filled().len() > before;
        if got_bytes
            && self
                .phase
                .compare_exchange(
                    BETWEEN_REQUESTS,
                    READING_HEADERS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            self.deadline = tokio::time::Instant::now() + self.header_timeout;
        }
        if self.phase.load(Ordering::Relaxed) != READING_HEADERS {
            return read;
        }
        let timed_out = || {
            Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request headers did not arrive in time",
            )))
        };
        if tokio::time::Instant::now() >= self.deadline {
            return timed_out();
        }
        if read.is_pending() {
            // Wake up at the deadline, should the rest of the headers not come.
            let deadline = self.deadline;
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_ready() {
                return timed_out();
            }
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Gives the request body a deadline; a body that is not in by then makes the answer
/// `408` with `Connection: close`, whatever the handler made of the cut body.
async fn body_deadline(
    axum::extract::State(timeout): axum::extract::State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    if request.body().is_end_stream() {
        // Nothing to wait for (a GET): no timer on the way.
        return next.run(request).await;
    }
    let expired = Arc::new(AtomicBool::new(false));
    let request = request.map(|body| {
        Body::new(DeadlineBody {
            inner: body,
            deadline: tokio::time::Instant::now() + timeout,
            sleep: None,
            expired: Arc::clone(&expired),
        })
    });
    let response = next.run(request).await;
    if !expired.load(Ordering::Relaxed) {
        return response;
    }
    let body = serde_json::json!({"error": {
        "code": "request_timeout",
        "message": format!("the request body did not arrive within {} s of its headers", timeout.as_secs()),
        "details": [],
    }});
    let mut response = (StatusCode::REQUEST_TIMEOUT, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A request body that fails once its deadline passes. The timer is made only when the
/// body has to be waited for: most bodies are in the buffer with their headers, and a
/// timer per request costs the ingest path (the timer wheel is shared by all workers).
struct DeadlineBody {
    inner: Body,
    deadline: tokio::time::Instant,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    expired: Arc<AtomicBool>,
}

/// The body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimedOut;

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = self.deadline;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            self.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::routing::post;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    const SHORT: Limits = Limits {
        header_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(1200),
        body_timeout: Duration::from_millis(300),
        max_connections: 2,
        drain_timeout: Duration::from_millis(300),
    };

    /// A server with an echo route, stopped by the returned sender.
    async fn start(
        limits: Limits,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route(
            "/echo",
            post(
                |ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>, body: Bytes| async move {
                    format!("{} {}", peer.ip(), body.len())
                },
            ),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, router, limits, async move {
            let _ = stopped.await;
        }));
        (addr, stop, task)
    }

    /// Reads until the peer closes the connection (or `within` passes) and returns what
    /// came, or `None` when it stayed open.
    async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
        let mut got = Vec::new();
        let deadline = Instant::now() + within;
        let mut buffer = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.read(&mut buffer)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&got).into_owned()),
                Ok(Ok(n)) => got.extend_from_slice(&buffer[..n]),
            }
        }
    }

    const REQUEST: &[u8] = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";

    #[tokio::test]
    async fn a_request_is_served_with_the_peer_address() {
        let (addr, _stop, _task) = start(SHORT).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(REQUEST).await.unwrap();
        let mut buffer = [0u8; 1024];
        let n = stream.read(&mut buffer).await.unwrap();
        let answer = String::from_utf8_lossy(&buffer[..n]);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("127.0.0.1 5"), "{answer}");
    }

    #[tokio::test]
    async fn half_sent_headers_close_at_the_header_time_and_idle_connections_at_the_idle_time() {
        let limits = Limits {
            max_connections: 8,
            ..SHORT
        };
        let (addr, _stop, _task) = start(limits).await;
        let mut half = TcpStream::connect(addr).await.unwrap();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut kept = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        half.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        kept.write_all(REQUEST).await.unwrap();
        let mut buffer = [0u8; 1024];
        assert!(kept.read(&mut buffer).await.unwrap() > 0);
        assert!(
            read_until_closed(&mut half, Duration::from_secs(5))
                .await
                .is_some()
        );
        let half_closed = started.elapsed();
        assert!(
            half_closed >= Duration::from_millis(250) && half_closed < Duration::from_millis(1000),
            "half-sent headers closed after {half_closed:?}, not at the 300 ms header time"
        );
        // Past the header time, an idle connection and one kept alive after a request are
        // still open, and the kept one serves its next request.
        assert!(
            read_until_closed(&mut idle, Duration::from_millis(100))
                .await
                .is_none()
        );
        kept.write_all(REQUEST).await.unwrap();
        let n = kept.read(&mut buffer).await.unwrap();
        assert!(String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 200"));
        assert!(
            read_until_closed(&mut idle, Duration::from_secs(5))
                .await
                .is_some()
        );
        let idle_closed = started.elapsed();
        assert!(
            idle_closed >= Duration::from_millis(1100),
            "the idle connection closed after {idle_closed:?}, before the 1.2 s idle time"
        );
    }

    #[tokio::test]
    async fn a_body_that_does_not_arrive_in_time_is_answered_408() {
        let (addr, _stop, _task) = start(SHORT).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly some")
            .await
            .unwrap();
        let answer = read_until_closed(&mut stream, Duration::from_secs(5))
            .await
            .expect("the server closes the connection");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    }

    #[tokio::test]
    async fn past_the_cap_new_connections_close_while_open_ones_are_served() {
        let limits = Limits {
            header_timeout: Duration::from_secs(30),
            ..SHORT
        };
        let (addr, _stop, _task) = start(limits).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        // Both connections are taken once a request on each has been served.
        for stream in [&mut first, &mut second] {
            stream.write_all(REQUEST).await.unwrap();
            let mut buffer = [0u8; 1024];
            assert!(stream.read(&mut buffer).await.unwrap() > 0);
        }
        let mut third = TcpStream::connect(addr).await.unwrap();
        let _ = third.write_all(REQUEST).await;
        let answer = read_until_closed(&mut third, Duration::from_secs(5))
            .await
            .expect("the third connection is closed");
        assert_eq!(answer, "", "closed without an answer");
        first.write_all(REQUEST).await.unwrap();
        let mut buffer = [0u8; 1024];
        let n = first.read(&mut buffer).await.unwrap();
        assert!(String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 200"));
        // A slot frees when a connection closes.
        drop(second);
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                stream.write_all(REQUEST).await.unwrap();
                let mut buffer = [0u8; 1024];
                if let Ok(n) = stream.read(&mut buffer).await
                    && n > 0
                {
                    return String::from_utf8_lossy(&buffer[..n]).into_owned();
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("a freed slot takes a new connection");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[tokio::test]
    async fn shutdown_cuts_connections_still_open_after_the_drain_time() {
        let limits = Limits {
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            ..SHORT
        };
        let (addr, stop, task) = start(limits).await;
        let mut holding = TcpStream::connect(addr).await.unwrap();
        holding
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nsome")
            .await
            .unwrap();
        tokio::task::yield_now().await;
        let started = Instant::now();
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve returns after the drain time")
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            read_until_closed(&mut holding, Duration::from_secs(5))
                .await
                .is_some()
        );
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "no longer accepting"
        );
    }
}
