//! Hardening at the receiver: error shapes, credentials, throttling, logging and file
//! modes, each tried the way an attacker or an unlucky operator would.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use usage_protocol::signing::{
    HEADER_ID, HEADER_INSTALL_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, Secret, sign,
};
use usage_protocol::wire::gzip;
use usage_receiver::settings::DEFAULT_MAX_DECOMPRESSED_BYTES;
use uuid::Uuid;

use crate::common::{
    ENROLL_TOKEN, PROVIDER_PASSWORD, PROVIDER_USER, TestInstall, TestReceiver, batch_body, client,
    enroll, enroll_request, provider_request, receiver_settings, signed,
};
use crate::harness::{assert_error_shape, poll_blocking};

/// Asserts `response` is `status` with the error shape and `code`; returns the body.
async fn assert_error(response: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.expect("a JSON error body");
    assert_error_shape(&body, code);
    body
}

fn challenge(response: &Response) -> &str {
    response
        .headers()
        .get(WWW_AUTHENTICATE)
        .map(|value| value.to_str().expect("an ASCII challenge"))
        .unwrap_or_else(|| panic!("a {} answer without WWW-Authenticate", response.status()))
}

// -- 404 and 405 in the error shape ------------------------------------------------------

#[tokio::test]
async fn unknown_paths_and_wrong_methods_answer_in_the_error_shape() {
    let rx = TestReceiver::start(receiver_settings());
    let response = client().get(rx.url("/no/such/path")).send().await.unwrap();
    let body = assert_error(response, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(body["error"]["details"], json!([]));
    for (method, path) in [
        (Method::GET, "/api/usage/event"),
        (Method::DELETE, "/api/installations"),
        (Method::POST, "/health"),
    ] {
        let response = client().request(method, rx.url(path)).send().await.unwrap();
        let body = assert_error(
            response,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        )
        .await;
        assert_eq!(body["error"]["details"], json!([]));
    }
}

// -- Schemes whatever their case, and a challenge on every 401 ---------------------------

#[tokio::test]
async fn basic_and_bearer_are_matched_whatever_the_case_of_the_scheme() {
    use base64::Engine;
    let rx = TestReceiver::start(receiver_settings());
    let credentials = base64::engine::general_purpose::STANDARD
        .encode(format!("{PROVIDER_USER}:{PROVIDER_PASSWORD}"));
    for scheme in ["basic", "BASIC", "bAsIc"] {
        let response = client()
            .get(rx.url("/api/usage/installations"))
            .header(AUTHORIZATION, format!("{scheme} {credentials}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "scheme {scheme}");
    }
    for scheme in ["bearer", "BEARER"] {
        let install = TestInstall::new();
        let response = enroll_request(&rx, &install, &install.secret)
            .header(AUTHORIZATION, format!("{scheme} {ENROLL_TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "scheme {scheme}");
    }
}

#[tokio::test]
async fn every_401_carries_the_challenge_of_its_scheme_and_the_error_shape() {
    let rx = TestReceiver::start(receiver_settings());

    let wrong_password = client()
        .get(rx.url("/api/usage/summary"))
        .basic_auth(PROVIDER_USER, Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(challenge(&wrong_password), r#"Basic realm="usage-agent""#);
    assert_error(wrong_password, StatusCode::UNAUTHORIZED, "unauthorized").await;

    let install = TestInstall::new();
    let wrong_token = enroll_request(&rx, &install, &install.secret)
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(challenge(&wrong_token), "Bearer");
    assert_error(
        wrong_token,
        StatusCode::UNAUTHORIZED,
        "invalid_enrollment_token",
    )
    .await;

    // Ingest: no install id, an unknown install, a signature by the wrong key.
    enroll(&rx, &install).await;
    let batch_id = Uuid::new_v4();
    let body = batch_body(batch_id, &install.id, &[]);
    let impostor = TestInstall {
        id: install.id.clone(),
        secret: Secret::generate(),
    };
    let cases = [
        (
            client()
                .post(rx.url("/api/usage/event"))
                .header("content-type", "application/json")
                .body(body.clone()),
            "missing_install_id",
        ),
        (
            signed(&rx, &TestInstall::new(), batch_id, &body),
            "unknown_install",
        ),
        (signed(&rx, &impostor, batch_id, &body), "invalid_signature"),
    ];
    for (request, code) in cases {
        let response = request.send().await.unwrap();
        assert!(
            challenge(&response).starts_with("Signature"),
            "{code}: {}",
            challenge(&response)
        );
        assert_error(response, StatusCode::UNAUTHORIZED, code).await;
    }
}

// -- Failed credentials throttled per client address -------------------------------------

/// Asserts `response` is the throttle's `429` and returns its `Retry-After` seconds.
async fn assert_throttled(response: Response) -> u64 {
    let retry_after: u64 = response
        .headers()
        .get(RETRY_AFTER)
        .expect("a 429 with Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in whole seconds");
    assert_error(
        response,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_failed_credentials",
    )
    .await;
    retry_after
}

#[tokio::test]
async fn twenty_wrong_passwords_block_the_address_even_with_the_right_one() {
    let rx = TestReceiver::start(receiver_settings());
    for attempt in 1..=20 {
        let response = client()
            .get(rx.url("/api/usage/installations"))
            .basic_auth(PROVIDER_USER, Some(format!("guess-{attempt}")))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "attempt {attempt}"
        );
    }
    let right = provider_request(&rx, Method::GET, "/api/usage/installations")
        .send()
        .await
        .unwrap();
    let retry_after = assert_throttled(right).await;
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    // The metrics scrape shares the provider's table; enrollment tokens are counted
    // apart, so an agent behind the same address still enrolls. Health and ingest are
    // no credentials checks.
    let scrape = provider_request(&rx, Method::GET, "/metrics")
        .send()
        .await
        .unwrap();
    assert_throttled(scrape).await;
    let install = TestInstall::new();
    let enrollment = enroll_request(&rx, &install, &install.secret)
        .bearer_auth(ENROLL_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(enrollment.status(), StatusCode::CREATED);
    let health = client().get(rx.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test]
async fn twenty_wrong_enrollment_tokens_block_the_address_even_with_the_right_one() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    for attempt in 1..=20 {
        let response = enroll_request(&rx, &install, &install.secret)
            .bearer_auth(format!("guess-{attempt}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "attempt {attempt}"
        );
    }
    let right = enroll_request(&rx, &install, &install.secret)
        .bearer_auth(ENROLL_TOKEN)
        .send()
        .await
        .unwrap();
    let retry_after = assert_throttled(right).await;
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    assert!(
        rx.store.find_install(&install.id).unwrap().is_none(),
        "a throttled enrollment must not be stored"
    );
    // The provider's credentials are counted apart.
    let provider = provider_request(&rx, Method::GET, "/api/usage/installations")
        .send()
        .await
        .unwrap();
    assert_eq!(provider.status(), StatusCode::OK);
}

/// Twenty wrong provider passwords, each with `forwarded` as `X-Forwarded-For`.
async fn twenty_wrong_passwords(rx: &TestReceiver, forwarded: impl Fn(u32) -> String) {
    for attempt in 1..=20 {
        let response = client()
            .get(rx.url("/api/usage/installations"))
            .basic_auth(PROVIDER_USER, Some(format!("guess-{attempt}")))
            .header("x-forwarded-for", forwarded(attempt))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "attempt {attempt}"
        );
    }
}

/// The provider's right credentials, sent with `forwarded` as `X-Forwarded-For` if given.
async fn right_password(rx: &TestReceiver, forwarded: Option<&str>) -> Response {
    let mut request = provider_request(rx, Method::GET, "/api/usage/installations");
    if let Some(forwarded) = forwarded {
        request = request.header("x-forwarded-for", forwarded);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_client_is_throttled_not_the_proxy() {
    // The test's requests come from 127.0.0.1, the trusted balancer here.
    let rx = TestReceiver::start(usage_receiver::ReceiverSettings {
        trusted_proxies: usage_common::credentials::TrustedProxies::parse(
            "127.0.0.1/32, 10.0.0.0/8",
        )
        .unwrap(),
        ..receiver_settings()
    });
    // The client forges a different left-most address each time; the balancer appends
    // the address it saw, and a second trusted hop its own.
    twenty_wrong_passwords(&rx, |attempt| {
        format!("198.51.100.{attempt}, 203.0.113.9, 10.1.2.3")
    })
    .await;
    assert_throttled(right_password(&rx, Some("203.0.113.9")).await).await;
    assert_throttled(right_password(&rx, Some("192.0.2.1, 203.0.113.9")).await).await;
    // Other clients behind the same balancer, and the balancer itself, are not blocked.
    let other = right_password(&rx, Some("203.0.113.10")).await;
    assert_eq!(other.status(), StatusCode::OK);
    let balancer = right_password(&rx, None).await;
    assert_eq!(balancer.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_forwarded_header_from_an_untrusted_peer_is_ignored() {
    let no_proxies = receiver_settings();
    let another_proxy = usage_receiver::ReceiverSettings {
        trusted_proxies: usage_common::credentials::TrustedProxies::parse("10.0.0.5").unwrap(),
        ..receiver_settings()
    };
    for settings in [no_proxies, another_proxy] {
        let rx = TestReceiver::start(settings);
        // A guesser rotating a spoofed header is still its own address (127.0.0.1).
        twenty_wrong_passwords(&rx, |attempt| format!("198.51.100.{attempt}")).await;
        assert_throttled(right_password(&rx, Some("198.51.100.99")).await).await;
        assert_throttled(right_password(&rx, None).await).await;
    }
}

#[tokio::test]
async fn failed_provider_logins_behind_a_balancer_never_block_enrollment() {
    // Every client shares the balancer's address when no proxy is trusted.
    let rx = TestReceiver::start(receiver_settings());
    twenty_wrong_passwords(&rx, |_| "203.0.113.9".to_owned()).await;
    assert_throttled(right_password(&rx, None).await).await;
    let install = TestInstall::new();
    let enrollment = enroll_request(&rx, &install, &install.secret)
        .bearer_auth(ENROLL_TOKEN)
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(enrollment.status(), StatusCode::CREATED);
    assert!(rx.store.find_install(&install.id).unwrap().is_some());
}

#[tokio::test]
async fn fewer_than_twenty_failures_leave_the_right_credentials_working() {
    let rx = TestReceiver::start(receiver_settings());
    for _ in 0..19 {
        let response = client()
            .get(rx.url("/api/usage/installations"))
            .basic_auth(PROVIDER_USER, Some("wrong"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    let right = provider_request(&rx, Method::GET, "/api/usage/installations")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), StatusCode::OK);
}

#[tokio::test]
async fn requests_without_credentials_are_no_guesses_and_never_block_the_address() {
    let rx = TestReceiver::start(receiver_settings());
    for _ in 0..25 {
        let anonymous = client()
            .get(rx.url("/api/usage/installations"))
            .send()
            .await
            .unwrap();
        assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    }
    let right = provider_request(&rx, Method::GET, "/api/usage/installations")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), StatusCode::OK);
}

// -- The enrollment body refuses unknown fields ------------------------------------------

#[tokio::test]
async fn an_enrollment_with_an_unknown_field_is_refused_naming_the_field() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    let response = client()
        .post(rx.url("/api/installations"))
        .bearer_auth(ENROLL_TOKEN)
        .json(&json!({
            "install_id": install.id,
            "secret": install.secret.to_whsec(),
            "site_hash": "cd".repeat(32),
            "plan": "agency",
        }))
        .send()
        .await
        .unwrap();
    let body = assert_error(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_enrollment",
    )
    .await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("unknown field `plan`"), "{message}");
    assert!(rx.store.find_install(&install.id).unwrap().is_none());
}

#[tokio::test]
async fn an_enrollment_written_as_an_array_is_refused() {
    let rx = TestReceiver::start(receiver_settings());
    let install = TestInstall::new();
    let response = client()
        .post(rx.url("/api/installations"))
        .bearer_auth(ENROLL_TOKEN)
        .json(&json!([
            install.id,
            install.secret.to_whsec(),
            "cd".repeat(32)
        ]))
        .send()
        .await
        .unwrap();
    assert_error(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_enrollment",
    )
    .await;
    assert!(rx.store.find_install(&install.id).unwrap().is_none());
}

#[tokio::test]
async fn the_agents_own_enrollment_is_accepted() {
    use usage_agent::config::BackendUrl;
    use usage_agent::identity::Identity;
    let rx = TestReceiver::start(receiver_settings());
    let identity = Identity::generate("https://shop.example.com").unwrap();
    let backend = BackendUrl::parse(&rx.url("")).unwrap();
    usage_agent::sync::enroll::enroll(&client(), &backend, ENROLL_TOKEN, &identity)
        .await
        .expect("the agent enrolls");
    assert!(
        rx.store
            .find_install(&identity.install_id)
            .unwrap()
            .is_some()
    );
}

// -- Logging and file modes, through the real binary -------------------------------------

/// `usage-agent receiver` run by `sh` (so the umask can be set first) in a temp dir, its
/// log (stderr) in a file. Killed on drop.
struct ReceiverProcess {
    child: Child,
    addr: String,
    log: PathBuf,
    db: PathBuf,
    _dir: tempfile::TempDir,
}

impl ReceiverProcess {
    fn start(umask: &str) -> ReceiverProcess {
        ReceiverProcess::start_with(umask, &[])
    }

    /// Like [`ReceiverProcess::start`], with these environment variables (settings) set.
    fn start_with(umask: &str, env: &[(&str, &str)]) -> ReceiverProcess {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("data").join("receiver.db");
        let log = dir.path().join("receiver.log");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask {umask} && exec \"$0\" receiver --listen 127.0.0.1:0 --db \"$1\""
            ))
            .arg(crate::harness::bin())
            .arg(&db)
            // Only what the test sets: no settings or log filter from the caller's shell.
            .env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn the receiver");
        let stdout = child.stdout.take().unwrap();
        // The first line names the bound address; read it on a thread so a receiver
        // that never prints cannot hang the test past the deadline.
        let (sender, announced) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        let line = announced
            .recv_timeout(Duration::from_secs(20))
            .expect("the receiver announces its address");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        ReceiverProcess {
            child,
            addr,
            log,
            db,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }
}

impl Drop for ReceiverProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn a_huge_install_id_of_a_refused_batch_is_logged_clipped() {
    let rx = ReceiverProcess::start("022");
    let huge_id = "x".repeat(60 * 1024);
    let before = std::fs::metadata(&rx.log).unwrap().len();
    let response = client()
        .post(rx.url("/api/usage/event"))
        .header("content-type", "application/json")
        .header(HEADER_INSTALL_ID, &huge_id)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let log = poll_blocking("the refusal in the log", Duration::from_secs(10), || {
        let log = rx.log_text();
        log.contains("batch refused").then_some(log)
    });
    let refusal = log.lines().find(|l| l.contains("batch refused")).unwrap();
    assert!(
        refusal.contains(&format!("{}…(+{} bytes)", "x".repeat(128), 60 * 1024 - 128)),
        "{refusal}"
    );
    let grown = std::fs::metadata(&rx.log).unwrap().len() - before;
    assert!(
        grown < 2048,
        "the log grew by {grown} bytes for one refusal"
    );
}

#[test]
fn the_database_and_its_wal_and_shm_are_private_whatever_the_umask() {
    let rx = ReceiverProcess::start("022");
    let files = ["", "-wal", "-shm"].map(|suffix| {
        let mut name = rx.db.clone().into_os_string();
        name.push(suffix);
        PathBuf::from(name)
    });
    poll_blocking(
        "the database, its WAL and shm",
        Duration::from_secs(10),
        || files.iter().all(|f| f.exists()).then_some(()),
    );
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    // Nothing else in the data directory is readable by others either.
    let data = rx.db.parent().unwrap();
    for entry in std::fs::read_dir(data).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path) & 0o077, 0, "{}", path.display());
    }
}

// -- An unauthenticated body is never held decompressed ----------------------------------

/// A field of `/proc/<pid>/status` in bytes (`VmRSS`, `VmHWM`: the resident set now, and
/// its peak since the process started).
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable {line:?}"));
    kib * 1024
}

/// A gzip bomb from an enrolled install: a body that inflates to exactly the receiver's
/// limit (so it is inflated to the end, not stopped at the cap) and is signed with the
/// wrong key, so every byte of it is unauthenticated.
fn badly_signed_bomb(rx: &ReceiverProcess, install: &TestInstall, packed: &[u8]) -> RequestBuilder {
    let batch_id = Uuid::new_v4();
    let id = batch_id.to_string();
    let now = chrono::Utc::now().timestamp();
    // What is signed does not matter: no key the receiver has made this signature.
    let signature = sign(&Secret::generate(), &id, now, b"{}");
    client()
        .post(rx.url("/api/usage/event"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .header(HEADER_ID, &id)
        .header(HEADER_TIMESTAMP, now.to_string())
        .header(HEADER_SIGNATURE, signature)
        .header(HEADER_INSTALL_ID, &install.id)
        .body(packed.to_vec())
}

#[tokio::test]
async fn concurrent_badly_signed_gzip_bombs_are_refused_without_holding_them_inflated() {
    const BOMBS: usize = 32;
    let inflated = DEFAULT_MAX_DECOMPRESSED_BYTES;
    let rx = ReceiverProcess::start_with("022", &[("ENROLLMENT_TOKEN", ENROLL_TOKEN)]);
    let install = TestInstall::new();
    let enrolled = client()
        .post(rx.url("/api/installations"))
        .bearer_auth(ENROLL_TOKEN)
        .json(&json!({
            "install_id": install.id,
            "secret": install.secret.to_whsec(),
            "site_hash": "cd".repeat(32),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(enrolled.status(), StatusCode::CREATED);
    let mut body = batch_body(Uuid::new_v4(), &install.id, &[]);
    body.resize(inflated, b' ');
    let packed = gzip(&body);
    assert!(packed.len() < 64 << 10, "{} bytes compressed", packed.len());

    // One bomb alone first, so the baseline holds what any one request costs (a blocking
    // thread, buffers); the peak after that is what the concurrent ones added.
    let response = badly_signed_bomb(&rx, &install, &packed)
        .send()
        .await
        .unwrap();
    assert_error(response, StatusCode::UNAUTHORIZED, "invalid_signature").await;
    let pid = rx.child.id();
    let baseline = proc_status_bytes(pid, "VmHWM");

    let answers = futures_util::future::join_all(
        (0..BOMBS).map(|_| badly_signed_bomb(&rx, &install, &packed).send()),
    )
    .await;
    for response in answers {
        assert_error(
            response.unwrap(),
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        )
        .await;
    }
    let grown = proc_status_bytes(pid, "VmHWM").saturating_sub(baseline);
    // Holding each bomb inflated would take BOMBS × 10 MiB (320 MiB) at once; checking it
    // as a stream keeps a few buffers per bomb.
    let allowed = (BOMBS * inflated / 8) as u64;
    assert!(
        grown < allowed,
        "the receiver's peak memory grew by {} MiB for {BOMBS} bombs of {} MiB (allowed {} MiB)",
        grown >> 20,
        inflated >> 20,
        allowed >> 20
    );
}
