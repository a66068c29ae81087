//! Hardening at the agent: error shapes, the bearer token, throttling, the socket path,
//! file modes and secrets kept off the command line.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use reqwest::{Method, StatusCode, header};
use serde_json::Value;

use crate::common::{ENROLL_TOKEN, TestReceiver, receiver_settings};
use crate::harness::{Agent, assert_error_shape, bin, event, new_id, poll, poll_blocking};

/// The API token of [`tcp_agent`].
const API_TOKEN: &str = "s3cret-api-token";

/// A free loopback port, for `tcp_listen`.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A running agent that also listens on loopback TCP, and the URL of its events endpoint.
async fn tcp_agent() -> (Agent, String) {
    let port = free_port();
    let agent = Agent::start(&format!(
        "tcp_listen = \"127.0.0.1:{port}\"\napi_token = {API_TOKEN:?}"
    ))
    .await;
    (agent, format!("http://127.0.0.1:{port}/v1/events"))
}

/// Posts one event to `url` with the given `Authorization` header, if any.
async fn post_event(
    client: &reqwest::Client,
    url: &str,
    authorization: Option<&str>,
) -> reqwest::Response {
    let mut request = client.post(url).json(&event(&new_id()));
    if let Some(value) = authorization {
        request = request.header(header::AUTHORIZATION, value);
    }
    request.send().await.expect("request to the TCP listener")
}

#[tokio::test]
async fn wrong_methods_and_unknown_paths_answer_in_the_error_shape() {
    let agent = Agent::start("").await;
    for (method, path) in [
        (Method::GET, "/v1/events"),
        (Method::DELETE, "/healthz"),
        (Method::PUT, "/v1/sync"),
    ] {
        let (status, body) = agent.request(method.clone(), path, None).await.unwrap();
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_error_shape(&body, "method_not_allowed");
    }
    let (status, body) = agent.get("/v1/no-such-thing").await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error_shape(&body, "not_found");
}

#[tokio::test]
async fn the_bearer_scheme_is_matched_in_any_case_and_a_refusal_carries_a_challenge() {
    let (agent, url) = tcp_agent().await;
    let client = reqwest::Client::new();
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let response = post_event(&client, &url, Some(&format!("{scheme} {API_TOKEN}"))).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED, "scheme {scheme}");
    }
    let near_misses = [
        None,
        Some(format!("Basic {API_TOKEN}")),
        Some("Bearer ".to_owned()),
        Some(format!("Bearer {}", &API_TOKEN[..API_TOKEN.len() - 1])),
        Some(format!("Bearer {API_TOKEN}x")),
    ];
    for authorization in near_misses {
        let response = post_event(&client, &url, authorization.as_deref()).await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{authorization:?}"
        );
        assert_eq!(
            response.headers()[header::WWW_AUTHENTICATE],
            "Bearer",
            "{authorization:?}"
        );
        assert_error_shape(&response.json().await.unwrap(), "unauthorized");
    }
    assert_eq!(agent.stored_events(), 4);
}

#[tokio::test]
async fn twenty_failed_tokens_close_that_address_even_to_the_right_token() {
    let (agent, url) = tcp_agent().await;
    let client = reqwest::Client::new();
    for attempt in 1..=20 {
        let response = post_event(&client, &url, Some("Bearer wrong")).await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "attempt {attempt}"
        );
    }
    let right = format!("Bearer {API_TOKEN}");
    let response = post_event(&client, &url, Some(&right)).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    assert_error_shape(
        &response.json().await.unwrap(),
        "too_many_failed_credentials",
    );
    assert_eq!(agent.stored_events(), 0);

    // Another client address is not held back by the first one's failures.
    let elsewhere = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let response = post_event(&elsewhere, &url, Some(&right)).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(agent.stored_events(), 1);
}

#[test]
fn something_at_socket_path_that_is_not_a_socket_is_kept_and_named() {
    for what in ["a regular file", "a directory"] {
        let outside = tempfile::tempdir().unwrap();
        let path = outside.path().join("agent.sock");
        let kept = if what == "a directory" {
            std::fs::create_dir(&path).unwrap();
            path.join("inside")
        } else {
            path.clone()
        };
        std::fs::write(&kept, "precious data\n").unwrap();
        let mut agent =
            Agent::configure(&format!("socket_path = {:?}", path.display().to_string()));
        agent.child = Some(agent.spawn_process());
        poll_blocking(
            "the agent to refuse to start",
            Duration::from_secs(20),
            || agent.child.as_mut().unwrap().try_wait().unwrap(),
        );
        let status = agent.child.take().unwrap().wait().unwrap();
        let stderr = std::fs::read_to_string(agent.log_path()).unwrap();
        assert_eq!(status.code(), Some(1), "{what}: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()) && stderr.contains("not a socket"),
            "{what}: {stderr}"
        );
        assert_eq!(
            std::fs::read_to_string(&kept).unwrap(),
            "precious data\n",
            "{what}"
        );
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn the_database_its_wal_and_shm_and_the_lock_are_private_under_umask_022() {
    let mut agent = Agent::configure("");
    let child = Command::new("sh")
        .args(["-c", "umask 022; exec \"$0\" --config \"$1\" run", bin()])
        .arg(&agent.config_path)
        .env_remove("USAGE_AGENT_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the agent under umask 022");
    agent.child = Some(child);
    agent.wait_ready().await;
    let (code, body) = agent.post("/v1/events", &event(&new_id())).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");

    let data = agent.data_dir();
    let files = ["usage.db", "usage.db-wal", "usage.db-shm", "agent.lock"];
    poll(
        "the WAL and shared-memory files",
        Duration::from_secs(10),
        async || files.iter().all(|f| data.join(f).exists()).then_some(()),
    )
    .await;
    for file in files {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
}

/// The backend part of the config for `rx`.
fn sync_table(rx: &TestReceiver) -> String {
    format!(
        "[sync]\nbackend_url = {:?}\ninterval_secs = 3600\n",
        rx.url("")
    )
}

/// `usage-agent init` against `rx` with `extra` arguments and `env` set.
fn init(agent: &Agent, rx: &TestReceiver, extra: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin())
        .arg("--config")
        .arg(&agent.config_path)
        .args(["init", "--site-url", "https://example.com", "--backend-url"])
        .arg(rx.url(""))
        .args(extra)
        .env_remove("USAGE_AGENT_CONFIG")
        .env_remove("USAGE_AGENT_ENROLL_TOKEN")
        .envs(env.iter().copied())
        .output()
        .expect("running usage-agent init")
}

fn enrolled_at(agent: &Agent) -> Value {
    let text = std::fs::read_to_string(agent.data_dir().join("identity.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["enrolled_at"].clone()
}

#[test]
fn init_enrolls_with_a_token_read_from_a_file() {
    let rx = TestReceiver::start(receiver_settings());
    let agent = Agent::configure_with("", &sync_table(&rx));
    let token_file = agent.dir.path().join("enroll-token");

    // The file's content is what is sent: a wrong one is refused by the backend.
    std::fs::write(&token_file, "not-the-token\n").unwrap();
    let out = init(
        &agent,
        &rx,
        &["--enroll-token-file", token_file.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(enrolled_at(&agent).is_null());

    std::fs::write(&token_file, format!("{ENROLL_TOKEN}\n")).unwrap();
    let out = init(
        &agent,
        &rx,
        &["--enroll-token-file", token_file.to_str().unwrap()],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(enrolled_at(&agent).is_string());
}

#[test]
fn init_enrolls_with_a_token_from_the_environment() {
    let rx = TestReceiver::start(receiver_settings());
    let agent = Agent::configure_with("", &sync_table(&rx));
    let out = init(
        &agent,
        &rx,
        &[],
        &[("USAGE_AGENT_ENROLL_TOKEN", ENROLL_TOKEN)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(enrolled_at(&agent).is_string());
}

/// An `init` that must fail: its arguments, environment, exit code and what stderr names.
struct BadInit<'a> {
    args: &'a [&'a str],
    env: &'a [(&'a str, &'a str)],
    exit: i32,
    names: &'a str,
}

#[test]
fn a_bad_enroll_token_file_or_two_token_sources_is_a_clear_error() {
    let rx = TestReceiver::start(receiver_settings());
    let agent = Agent::configure_with("", &sync_table(&rx));
    let missing = agent.dir.path().join("no-such-token-file");
    let empty = agent.dir.path().join("empty-token-file");
    std::fs::write(&empty, "\n").unwrap();
    let token_file = agent.dir.path().join("token");
    std::fs::write(&token_file, ENROLL_TOKEN).unwrap();
    let token_file = token_file.to_str().unwrap();
    let cases = [
        BadInit {
            args: &["--enroll-token-file", missing.to_str().unwrap()],
            env: &[],
            exit: 1,
            names: missing.to_str().unwrap(),
        },
        BadInit {
            args: &["--enroll-token-file", empty.to_str().unwrap()],
            env: &[],
            exit: 2,
            names: empty.to_str().unwrap(),
        },
        BadInit {
            args: &[
                "--enroll-token",
                ENROLL_TOKEN,
                "--enroll-token-file",
                token_file,
            ],
            env: &[],
            exit: 2,
            names: "--enroll-token-file",
        },
        BadInit {
            args: &["--enroll-token-file", token_file],
            env: &[("USAGE_AGENT_ENROLL_TOKEN", ENROLL_TOKEN)],
            exit: 2,
            names: "--enroll-token",
        },
    ];
    for BadInit {
        args,
        env,
        exit,
        names,
    } in cases
    {
        let out = init(&agent, &rx, args, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(exit), "{args:?}: {stderr}");
        assert!(stderr.contains(names), "{args:?}: {stderr}");
        assert!(enrolled_at(&agent).is_null(), "{args:?}");
    }
}

/// The agent's log, written to a file (as under systemd, to the journal), carries no
/// terminal colour codes: a collector would store them as text.
#[tokio::test]
async fn logs_written_to_a_file_carry_no_colour_codes() {
    let mut agent = Agent::start("").await;
    let (status, _) = agent.post("/v1/events", &event(&new_id())).await;
    assert!(status.is_success(), "{status}");
    assert!(agent.terminate().success());
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    assert!(log.contains("INFO"), "the agent logged its start: {log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a file: {log:?}");
}
