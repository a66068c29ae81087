//! A client of the local API over the agent's Unix socket, used by the client subcommands.

use std::path::PathBuf;

use anyhow::Context;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::config::Config;

/// Talks to the running agent through its socket.
pub struct AgentClient {
    http: reqwest::Client,
    socket: PathBuf,
}

/// The agent could not be reached at all (exit code 1, one sentence).
#[derive(Debug, thiserror::Error)]
#[error("no usage-agent is answering on socket {}: start it with `usage-agent run` (or check socket_path in the config)", .socket.display())]
pub struct NotRunning {
    pub socket: PathBuf,
}

impl AgentClient {
    pub fn new(config: &Config) -> anyhow::Result<AgentClient> {
        let socket = config.socket_path();
        crate::sync::install_tls_provider();
        let http = reqwest::Client::builder()
            .unix_socket(socket.clone())
            .build()
            .context("building the socket client")?;
        Ok(AgentClient { http, socket })
    }

    /// Sends one request and returns the status and JSON body of the answer.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut request = self.http.request(method, format!("http://localhost{path}"));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|error| {
            if error.is_connect() || error.is_request() {
                anyhow::Error::new(NotRunning {
                    socket: self.socket.clone(),
                })
            } else {
                anyhow::Error::new(error)
                    .context(format!("talking to the agent on {}", self.socket.display()))
            }
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .context("reading the agent's answer")?;
        let value = serde_json::from_str(&text).with_context(|| {
            format!("the agent answered {status} with a body that is not JSON: {text}")
        })?;
        Ok((status, value))
    }

    /// Sends a GET and returns the answer unread, for bodies streamed to the caller.
    /// An agent that takes the connection and closes it before its answer's head (a
    /// stream that failed at once) is not "not running": the error says it was cut off.
    pub async fn get_streamed(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        self.http
            .get(format!("http://localhost{path}"))
            .send()
            .await
            .map_err(|error| {
                if std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
                    anyhow::Error::new(NotRunning {
                        socket: self.socket.clone(),
                    })
                } else {
                    anyhow::Error::new(error).context(format!(
                        "the agent on {} closed the connection before its answer ended",
                        self.socket.display()
                    ))
                }
            })
    }
}

/// The `message` of an error answer, or the whole body if it has none.
pub fn error_message(body: &Value) -> String {
    body.pointer("/error/message")
        .and_then(Value::as_str)
        .map_or_else(|| body.to_string(), str::to_owned)
}
