//! No secret in a log line, an error or an answer. The receiver binary runs, in text and
//! in JSON log lines, with every secret set to a value easy to find, through each failure
//! path an operator meets: a wrong enrollment token, a wrong provider password, a wrong
//! metrics token, an alert webhook that cannot be reached (its URL holds a token in its
//! path, as chat services' do), the database going away and coming back, and databases
//! that cannot be reached at start, the password given in every form libpq reads. Every
//! line it wrote (the JSON run down to the libraries' debug lines), every error it printed
//! and every answer it gave is searched for each secret.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::{NaiveTime, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use usage_protocol::event::format_millis;
use usage_protocol::signing::{
    HEADER_ID, HEADER_INSTALL_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, Secret, sign,
};
use usage_protocol::wire::user_hash;
use usage_testkit::throwaway::{Durability, ThrowawayCluster};

use crate::common::{TestInstall, batch_body, client};
use crate::support::{announced_address, poll, wait_with_deadline};

const ENROLLMENT_TOKEN: &str = "enroll-7c1f-secret";
const PROVIDER_PASSWORD: &str = "provider-9d2e-secret";
const METRICS_TOKEN: &str = "metrics-4b8a-secret";
/// The secret part of the webhook URL (its path).
const WEBHOOK_PATH_TOKEN: &str = "hook-5e6f-secret";
const DATABASE_PASSWORD: &str = "hunter2-db-secret";

/// A receiver process, killed if a test fails before it stops it.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Asserts no secret of `secrets` is in `text` (what `what` is).
fn assert_no_secret(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{what} holds the secret {secret:?}:\n{text}"
        );
    }
}

/// Every answer's status line and body, as one text to search.
async fn answer_text(answer: reqwest::Response) -> (StatusCode, String) {
    let status = answer.status();
    let headers = format!("{:?}", answer.headers());
    let body = answer.text().await.unwrap();
    (status, format!("{status} {headers} {body}"))
}

/// A signed batch of one event of `tokens` tokens.
fn batch(base: &str, install: &TestInstall, tokens: u64) -> reqwest::RequestBuilder {
    let now = Utc::now();
    let midnight = now.date_naive().and_time(NaiveTime::MIN).and_utc();
    let at = (now - chrono::Duration::seconds(2)).max(midnight);
    let events = [json!({
        "event_id": Uuid::now_v7(),
        "user_hash": user_hash(&install.id, 7),
        "source": "inline",
        "model": "m",
        "prompt_tokens": tokens / 2,
        "completion_tokens": tokens - tokens / 2,
        "total_tokens": tokens,
        "created_at": format_millis(at.timestamp_millis()),
    })];
    let batch_id = Uuid::now_v7();
    let body = batch_body(batch_id, &install.id, &events);
    let timestamp = Utc::now().timestamp();
    client()
        .post(format!("{base}/api/usage/event"))
        .header("content-type", "application/json")
        .header(HEADER_ID, batch_id.to_string())
        .header(HEADER_TIMESTAMP, timestamp.to_string())
        .header(
            HEADER_SIGNATURE,
            sign(&install.secret, &batch_id.to_string(), timestamp, &body),
        )
        .header(HEADER_INSTALL_ID, &install.id)
        .body(body)
}

/// One run of a node with every secret set, in `log_format`, through every failure path
/// while it serves; returns everything it wrote and answered.
async fn a_run_through_every_failure(
    cluster: &ThrowawayCluster,
    log_format: &str,
    webhook_secret: &Secret,
) -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let webhook_url = format!("http://{closed}/services/T0001/B0002/{WEBHOOK_PATH_TOKEN}");
    let database_url = format!(
        "{}&password={DATABASE_PASSWORD}",
        cluster.new_database().unwrap()
    );
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    let mut command = Command::new(crate::bin());
    // The JSON run logs everything down to debug, the libraries' lines included.
    match log_format {
        "json" => command.env("RUST_LOG", "debug"),
        _ => command.env_remove("RUST_LOG"),
    };
    let mut node = Node(
        command
            .args(["--listen", "127.0.0.1:0"])
            .env("DATABASE_URL", &database_url)
            .env("ENROLLMENT_TOKEN", ENROLLMENT_TOKEN)
            .env("PROVIDER_USERNAME", "provider")
            .env("PROVIDER_PASSWORD", PROVIDER_PASSWORD)
            .env("METRICS_TOKEN", METRICS_TOKEN)
            .env("DEFAULT_COST_PER_1K_TOKENS", "1")
            .env("DEFAULT_MONTHLY_BUDGET", "1")
            .env("ALERT_WEBHOOK_URL", &webhook_url)
            .env("ALERT_WEBHOOK_SECRET", webhook_secret.to_whsec())
            .env("LOG_FORMAT", log_format)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let base = announced_address(&mut node.0);
    let mut answers = String::new();
    let mut keep = |(status, text): (StatusCode, String), expected: StatusCode| {
        assert_eq!(status, expected, "{text}");
        answers.push_str(&text);
        answers.push('\n');
    };
    let http = client();

    // A wrong enrollment token, then the right one.
    let install = TestInstall::new();
    let enrollment = json!({
        "install_id": install.id,
        "secret": install.secret.to_whsec(),
        "site_hash": "cd".repeat(32),
    });
    let wrong = http
        .post(format!("{base}/api/installations"))
        .bearer_auth("enroll-wrong")
        .json(&enrollment);
    keep(
        answer_text(wrong.send().await.unwrap()).await,
        StatusCode::UNAUTHORIZED,
    );
    let right = http
        .post(format!("{base}/api/installations"))
        .bearer_auth(ENROLLMENT_TOKEN)
        .json(&enrollment);
    keep(
        answer_text(right.send().await.unwrap()).await,
        StatusCode::CREATED,
    );

    // 1.50 of usage against a 1.00 budget: alerts, whose delivery cannot reach the hook.
    keep(
        answer_text(batch(&base, &install, 1500).send().await.unwrap()).await,
        StatusCode::OK,
    );

    // A wrong provider password, a wrong metrics token, then both right.
    let provider = |password: &str| {
        http.get(format!("{base}/api/alerts"))
            .basic_auth("provider", Some(password))
    };
    keep(
        answer_text(provider("provider-wrong").send().await.unwrap()).await,
        StatusCode::UNAUTHORIZED,
    );
    keep(
        answer_text(provider(PROVIDER_PASSWORD).send().await.unwrap()).await,
        StatusCode::OK,
    );
    let scrape = |token: &str| http.get(format!("{base}/metrics")).bearer_auth(token);
    keep(
        answer_text(scrape("metrics-wrong").send().await.unwrap()).await,
        StatusCode::UNAUTHORIZED,
    );
    keep(
        answer_text(scrape(METRICS_TOKEN).send().await.unwrap()).await,
        StatusCode::OK,
    );
    poll(
        "a failed webhook delivery in the log",
        Duration::from_secs(30),
        async || {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            log.contains("the alert webhook could not be reached")
                .then_some(())
        },
    )
    .await;

    // The database goes away: health, ingest and the provider's views answer 503.
    cluster.stop_server().unwrap();
    let health = poll(
        "/health to answer 503",
        Duration::from_secs(30),
        async || {
            let answer = http.get(format!("{base}/health")).send().await.unwrap();
            (answer.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(answer)
        },
    )
    .await;
    keep(answer_text(health).await, StatusCode::SERVICE_UNAVAILABLE);
    keep(
        answer_text(batch(&base, &install, 10).send().await.unwrap()).await,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    keep(
        answer_text(provider(PROVIDER_PASSWORD).send().await.unwrap()).await,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    // It comes back: the node serves again without a restart.
    cluster.start_server().unwrap();
    let health = poll(
        "/health to answer 200",
        Duration::from_secs(30),
        async || {
            let answer = http.get(format!("{base}/health")).send().await.unwrap();
            (answer.status() == StatusCode::OK).then_some(answer)
        },
    )
    .await;
    keep(answer_text(health).await, StatusCode::OK);

    let stop = Command::new("kill")
        .args(["-TERM", &node.0.id().to_string()])
        .status()
        .unwrap();
    assert!(stop.success());
    assert!(wait_with_deadline(&mut node.0, Duration::from_secs(20)).success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    if log_format == "json" {
        for line in log.lines() {
            serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        }
    }
    // The failures were logged (so the search below searched something).
    for expected in [
        "install enrolled",
        "provider request refused",
        "metrics scrape refused",
        &closed.to_string(),
        "store_unavailable",
    ] {
        assert!(
            log.contains(expected),
            "{expected:?} not in the log:\n{log}"
        );
    }
    format!("{log}\n{answers}")
}

#[tokio::test]
async fn no_secret_reaches_a_log_line_an_error_or_an_answer() {
    let cluster = ThrowawayCluster::start(Durability::Fast).unwrap();
    let webhook_secret = Secret::generate();
    let whsec = webhook_secret.to_whsec();
    let secrets = [
        ENROLLMENT_TOKEN,
        PROVIDER_PASSWORD,
        METRICS_TOKEN,
        WEBHOOK_PATH_TOKEN,
        "/services/T0001",
        DATABASE_PASSWORD,
        whsec.as_str(),
        whsec.trim_start_matches("whsec_"),
    ];
    for log_format in ["text", "json"] {
        let seen = a_run_through_every_failure(&cluster, log_format, &webhook_secret).await;
        assert_no_secret(
            &format!("a run with LOG_FORMAT={log_format}"),
            &seen,
            &secrets,
        );
    }
}

#[test]
fn no_form_of_the_database_password_reaches_a_start_error() {
    let unreachable = [
        format!("postgres://u:{DATABASE_PASSWORD}@127.0.0.1:1/d"),
        format!("postgres://u@127.0.0.1:1/d?password={DATABASE_PASSWORD}"),
        format!("postgresql://u@127.0.0.1:1/d?sslmode=require&password={DATABASE_PASSWORD}"),
        format!("host=127.0.0.1 port=1 user=u password={DATABASE_PASSWORD} dbname=d"),
        format!("host=127.0.0.1 port=1 user=u password='{DATABASE_PASSWORD}' dbname=d"),
        // Unreadable ones: a bad port, a bad sslmode, an unknown parameter.
        format!("postgres://u:{DATABASE_PASSWORD}@127.0.0.1:notaport/d"),
        format!("postgres://u:{DATABASE_PASSWORD}@127.0.0.1:1/d?sslmode=on"),
        format!("postgres://u@127.0.0.1:1/d?password={DATABASE_PASSWORD}&pasword=x"),
        format!("host=127.0.0.1 password='{DATABASE_PASSWORD}"),
        format!("mysql://u:{DATABASE_PASSWORD}@127.0.0.1/d"),
    ];
    for url in &unreachable {
        for log_format in ["text", "json"] {
            for as_flag in [true, false] {
                let mut command = Command::new(crate::bin());
                command
                    .args(["--listen", "127.0.0.1:0"])
                    .env("LOG_FORMAT", log_format)
                    .env("ENROLLMENT_TOKEN", ENROLLMENT_TOKEN);
                if as_flag {
                    command.arg("--database-url").arg(url);
                } else {
                    command.env("DATABASE_URL", url);
                }
                let output = command.output().unwrap();
                let printed = format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
                assert!(
                    matches!(output.status.code(), Some(1 | 2)),
                    "{url}: {printed}"
                );
                assert!(printed.contains("error: "), "{url}: {printed}");
                assert_no_secret(
                    &format!("the start error for {url}"),
                    &printed,
                    &[DATABASE_PASSWORD, "hunter2"],
                );
            }
        }
    }
}
