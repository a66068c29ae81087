//! The agent's secrets (the enrollment token, in each way it can be given, and the install's
//! signing secret) never reach its log, an error it prints or a status answer, through an
//! enrollment refused, a sync that works and syncs the receiver refuses once the install
//! is erased there.

use std::process::Command;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{ENROLL_TOKEN, TestReceiver, provider_request, receiver_settings};
use crate::harness::{Agent, bin, event, new_id, poll};

const WRONG_TOKEN: &str = "wrong-enroll-3f9c-secret";

fn assert_no_secret(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{what} holds the secret {secret:?}:\n{text}"
        );
    }
}

/// `usage-agent init` for `agent` with the token given as `how` says; its printed output.
fn init(agent: &Agent, backend: &str, how: &str, token: &str) -> (bool, String) {
    let mut command = Command::new(bin());
    command
        .arg("--config")
        .arg(&agent.config_path)
        .env_remove("USAGE_AGENT_CONFIG")
        .env_remove("USAGE_AGENT_ENROLL_TOKEN")
        .args([
            "init",
            "--site-url",
            "https://example.com",
            "--backend-url",
            backend,
        ]);
    let token_file = agent.dir.path().join("enroll-token");
    match how {
        "flag" => {
            command.args(["--enroll-token", token]);
        }
        "file" => {
            std::fs::write(&token_file, format!("{token}\n")).unwrap();
            command.arg("--enroll-token-file").arg(&token_file);
        }
        _ => {
            command.env("USAGE_AGENT_ENROLL_TOKEN", token);
        }
    }
    let output = command.output().unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), printed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_secret_reaches_its_log_an_error_or_a_status_answer() {
    let rx = TestReceiver::start(receiver_settings());
    let backend = rx.url("");
    let mut agent = Agent::configure_with(
        "",
        &format!(
            "[sync]\nbackend_url = {backend:?}\ninterval_secs = 1\ninitial_backoff_ms = 20\nmax_backoff_ms = 200\n"
        ),
    );
    let mut printed = String::new();
    for how in ["flag", "file", "env"] {
        let (enrolled, output) = init(&agent, &backend, how, WRONG_TOKEN);
        assert!(!enrolled, "a wrong token ({how}) enrolls: {output}");
        assert!(output.contains("401"), "{how}: {output}");
        printed.push_str(&output);
    }
    let (enrolled, output) = init(&agent, &backend, "file", ENROLL_TOKEN);
    assert!(enrolled, "{output}");
    printed.push_str(&output);
    let identity: Value = serde_json::from_str(
        &std::fs::read_to_string(agent.data_dir().join("identity.json")).unwrap(),
    )
    .unwrap();
    let install_secret = identity["secret"].as_str().unwrap().to_owned();
    let install_id = identity["install_id"].as_str().unwrap().to_owned();

    agent.spawn().await;
    let (code, _) = agent.post("/v1/events", &event(&new_id())).await;
    assert_eq!(code, StatusCode::ACCEPTED);
    let (code, report) = agent.post("/v1/sync", &json!({})).await;
    assert_eq!(code, StatusCode::OK, "{report}");
    assert!(report["error"].is_null(), "{report}");

    // Erased at the receiver: its syncs are refused from now on.
    let erased = provider_request(
        &rx,
        Method::DELETE,
        &format!("/api/installations/{install_id}"),
    )
    .send()
    .await
    .unwrap();
    assert!(erased.status().is_success(), "{}", erased.status());
    let (code, _) = agent.post("/v1/events", &event(&new_id())).await;
    assert_eq!(code, StatusCode::ACCEPTED);
    let (_, report) = agent.post("/v1/sync", &json!({})).await;
    assert!(!report["error"].is_null(), "{report}");
    let status = poll(
        "a refused sync in the status",
        Duration::from_secs(20),
        async || {
            let status = agent.status().await;
            (!status["last_error"].is_null()).then_some(status)
        },
    )
    .await;
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    let seen = format!("{printed}\n{report}\n{status}\n{log}");
    assert_no_secret(
        "the agent's output, answers and log",
        &seen,
        &[
            WRONG_TOKEN,
            ENROLL_TOKEN,
            install_secret.as_str(),
            install_secret.trim_start_matches("whsec_"),
        ],
    );
}

/// `usage-agent receiver` reads the database URL as `usage-receiver` does: a bad `sslmode`
/// is bad usage (exit 2), an unreachable database a failure (exit 1), each said once and
/// without the password.
#[test]
fn the_bundled_receiver_names_a_bad_database_url_without_its_password() {
    let run = |url: &str| {
        let output = Command::new(bin())
            .args(["receiver", "--listen", "127.0.0.1:0", "--database-url", url])
            .env_remove("USAGE_AGENT_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!stderr.contains("hunter2"), "{stderr}");
        (
            output.status.code(),
            stderr.lines().last().unwrap_or_default().to_owned(),
        )
    };
    assert_eq!(
        run("postgres://u:hunter2@h/d?sslmode=nope"),
        (
            Some(2),
            "error: --database-url (or DATABASE_URL): the database URL's sslmode must be disable, prefer, require, verify-ca or verify-full, not \"nope\"".to_owned()
        )
    );
    assert_eq!(
        run("postgres://u@127.0.0.1:1/d?password=hunter2"),
        (
            Some(1),
            "error: opening the receiver's PostgreSQL database: could not connect to the receiver database postgres://u@127.0.0.1:1/d: error connecting to server: Connection refused (os error 111)".to_owned()
        )
    );
}
