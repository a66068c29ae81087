//! Helpers to run the real `usage-agent` binary in a temp dir and talk to its socket.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

#[allow(unused_imports)]
pub use crate::shared::{assert_error_shape, poll, poll_blocking, wait_with_deadline};

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_usage-agent")
}

/// A data dir with a config file; the agent process may or may not be running.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub socket: PathBuf,
    pub child: Option<Child>,
    http: reqwest::Client,
}

impl Agent {
    /// Writes a config (`data_dir` set to a fresh temp dir, plus `extra` TOML lines that go
    /// before any table) and runs `init`, without starting the daemon.
    pub fn configure(extra: &str) -> Agent {
        Agent::configure_with(extra, "")
    }

    /// Like [`Agent::configure`], with `tables` appended after the top-level keys.
    pub fn configure_with(extra: &str, tables: &str) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("agent.toml");
        // Tests default to `normal` durability for speed unless they ask for `full`.
        let durability = if extra.contains("synchronous") {
            ""
        } else {
            "synchronous = \"normal\"\n"
        };
        let text = format!(
            "data_dir = {:?}\n{durability}{extra}\n{tables}\n",
            data_dir.display().to_string()
        );
        std::fs::write(&config_path, text).expect("writing config");
        usage_agent::sync::install_tls_provider();
        let socket = data_dir.join("agent.sock");
        let http = reqwest::Client::builder()
            .unix_socket(socket.clone())
            .build()
            .expect("socket client");
        let agent = Agent {
            dir,
            config_path,
            socket,
            child: None,
            http,
        };
        let out = agent.cli(&["init", "--site-url", "https://example.com"]);
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        agent
    }

    /// Configures and starts an agent, waiting until it answers.
    pub async fn start(extra: &str) -> Agent {
        let mut agent = Agent::configure(extra);
        agent.spawn().await;
        agent
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts `usage-agent run` and waits for `/healthz`.
    pub async fn spawn(&mut self) {
        let child = self.spawn_process();
        self.child = Some(child);
        self.wait_ready().await;
    }

    /// Starts `usage-agent run` without waiting.
    pub fn spawn_process(&self) -> Child {
        Command::new(bin())
            .args(["--config", self.config_path.to_str().unwrap(), "run"])
            .env_remove("USAGE_AGENT_CONFIG")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            // A file, not a pipe: a daemon that logs for long would fill a pipe nobody reads
            // and block on its next log line, which looks exactly like a hung agent.
            .stderr(self.log_file())
            .spawn()
            .expect("spawning usage-agent run")
    }

    /// Where the daemon's log goes (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    fn log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the agent's log")
    }

    pub async fn wait_ready(&mut self) {
        poll(
            "the agent to answer /healthz",
            Duration::from_secs(20),
            async || {
                if let Some(child) = self.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                    panic!("agent exited early with {status}: {log}");
                }
                match self.get("/healthz").await {
                    Ok((StatusCode::OK, _)) => Some(()),
                    _ => None,
                }
            },
        )
        .await;
    }

    /// Runs the binary with this agent's config and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .env_remove("USAGE_AGENT_CONFIG")
            .output()
            .expect("running usage-agent")
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> reqwest::Result<(StatusCode, Value)> {
        let mut request = self.http.request(method, format!("http://localhost{path}"));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await?;
        let status = response.status();
        let value = response.json().await.unwrap_or(Value::Null);
        Ok((status, value))
    }

    pub async fn get(&self, path: &str) -> reqwest::Result<(StatusCode, Value)> {
        self.request(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.request(Method::POST, path, Some(body))
            .await
            .expect("request to the agent")
    }

    /// Posts raw bytes with a given content type.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let response = self
            .http
            .post(format!("http://localhost{path}"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request to the agent");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn status(&self) -> Value {
        let (code, body) = self.get("/v1/status").await.expect("status request");
        assert_eq!(code, StatusCode::OK, "{body}");
        body
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent running");
        signal(&child, "-TERM");
        wait_with_deadline(&mut child, Duration::from_secs(20))
    }

    /// Kills the daemon with SIGKILL, as a crash or power cut would.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("agent running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaping");
    }

    /// Opens the agent database directly (the daemon must be stopped or may be running in WAL).
    pub fn open_db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.data_dir().join("usage.db")).expect("open usage.db")
    }

    /// Number of events stored.
    pub fn stored_events(&self) -> i64 {
        let path = self.data_dir().join("usage.db");
        if !path.exists() {
            return 0;
        }
        self.open_db()
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
            .expect("count events")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([name, &child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success());
}

/// A valid event with the given id.
pub fn event(id: &str) -> Value {
    serde_json::json!({
        "event_id": id, "user_id": 5, "source": "bulk", "model": "gpt-4o-mini",
        "prompt_tokens": 150, "completion_tokens": 25,
        "context": {"attachment_id": 42, "width": 1024, "height": 768, "mime": "image/jpeg"}
    })
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// GET with the raw answer text and content type.
pub async fn get_text(agent: &Agent, path: &str) -> (StatusCode, String, String) {
    let client = reqwest::Client::builder()
        .unix_socket(agent.socket.clone())
        .build()
        .unwrap();
    let response = client
        .get(format!("http://localhost{path}"))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, response.text().await.unwrap(), content_type)
}

/// A strict reader of the OpenMetrics text format (the same rules as the unit test's):
/// every line is a known comment or a sample of a declared family; ends with `# EOF`.
/// Returns `name{k=v,...}` (labels sorted) to value.
pub fn parse_exposition(text: &str) -> Result<HashMap<String, f64>, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    let mut eof = false;
    for line in text.lines() {
        if eof {
            return Err(format!("text after # EOF: {line:?}"));
        }
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let parts: Vec<&str> = rest.splitn(3, ' ').collect();
            match parts.as_slice() {
                ["HELP" | "UNIT", _, ..] => {}
                ["TYPE", name, kind] if ["counter", "gauge", "histogram"].contains(kind) => {
                    types.insert((*name).to_owned(), (*kind).to_owned());
                }
                _ => return Err(format!("unknown comment {line:?}")),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or(format!("no value: {line:?}"))?;
        let value: f64 = if value == "+Inf" {
            f64::INFINITY
        } else {
            value.parse().map_err(|_| format!("bad value: {line:?}"))?
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (
                name,
                rest.strip_suffix('}')
                    .ok_or(format!("unclosed labels: {line:?}"))?,
            ),
            None => (series, ""),
        };
        let mut pairs = Vec::new();
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (key, quoted) = pair.split_once('=').ok_or(format!("bad label: {line:?}"))?;
            let inner = quoted
                .strip_prefix('"')
                .and_then(|q| q.strip_suffix('"'))
                .ok_or(format!("bad label: {line:?}"))?;
            pairs.push(format!("{key}={inner}"));
        }
        pairs.sort();
        let family = ["_total", "_bucket", "_count", "_sum", "_created"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|base| types.contains_key(*base))
            })
            .unwrap_or(name);
        let kind = types
            .get(family)
            .ok_or(format!("undeclared family: {line:?}"))?;
        let suffix = &name[family.len()..];
        let fits = match kind.as_str() {
            "counter" => ["_total", "_created"].contains(&suffix),
            "histogram" => ["_bucket", "_count", "_sum", "_created"].contains(&suffix),
            _ => suffix.is_empty(),
        };
        if !fits {
            return Err(format!("{name} does not fit its {kind} family"));
        }
        let key = if pairs.is_empty() {
            name.to_owned()
        } else {
            format!("{name}{{{}}}", pairs.join(","))
        };
        samples.insert(key, value);
    }
    if eof {
        Ok(samples)
    } else {
        Err("missing # EOF".into())
    }
}

/// Applies every migration but the newest to `conn` (a database as the release before
/// left it) and records that version; the version.
pub fn create_previous_schema(conn: &rusqlite::Connection) -> i64 {
    let newest = usage_agent::store::SCHEMA.matches("-- migration ").count() as i64;
    create_schema_at(conn, newest - 1);
    newest - 1
}

/// Applies the migrations up to `version` to `conn` (a database as the release of that
/// schema left it) and records that version.
pub fn create_schema_at(conn: &rusqlite::Connection, version: i64) {
    let blocks = usage_agent::store::SCHEMA.split("-- migration ").skip(1);
    for block in blocks.take(version as usize) {
        conn.execute_batch(block.split_once('\n').unwrap().1)
            .unwrap();
    }
    conn.pragma_update(None, "user_version", version).unwrap();
}
