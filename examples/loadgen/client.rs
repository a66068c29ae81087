//! The HTTP clients that speak to the agent over its Unix socket: reqwest for the few
//! control requests of the drain phases (`socket_client`, `agent_url`), and hyper's bare
//! HTTP/1.1 connection for the load itself (`connect`, `exchange`).

use std::path::Path;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// An HTTP client that speaks to the agent over its Unix socket.
pub(crate) fn socket_client(socket: &Path, keep_alive: bool) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().unix_socket(socket);
    if !keep_alive {
        builder = builder.pool_max_idle_per_host(0);
    }
    builder.build().context("building the HTTP client")
}

/// The URL host is ignored over a Unix socket, but HTTP/1.1 needs one.
pub(crate) fn agent_url(path: &str) -> String {
    format!("http://agent{path}")
}

/// One keep-alive HTTP/1.1 connection to the agent's socket. hyper's connection API is
/// used directly (no pool, no redirects) so the load generator, which shares the two
/// cores with the agent, spends as little CPU per request as it can.
pub(crate) type Connection = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

pub(crate) async fn connect(socket: &Path) -> anyhow::Result<Connection> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends one request on `connection` and returns the status and body.
pub(crate) async fn exchange(
    connection: &mut Connection,
    method: &str,
    path: &str,
    body: String,
) -> anyhow::Result<(u16, Bytes)> {
    connection.ready().await.context("connection closed")?;
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "agent")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response = connection.send_request(request).await?;
    let status = response.status().as_u16();
    let answer = response.into_body().collect().await?.to_bytes();
    Ok((status, answer))
}
