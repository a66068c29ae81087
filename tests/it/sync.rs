//! Sync through the real binary: the agent against the bundled receiver and against small
//! backends that fail in one specific way, each error category from a real cause, with the
//! resulting status, counts and number of requests asserted.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use axum::response::{IntoResponse, Response};
use reqwest::StatusCode;
use serde_json::{Value, json};
use usage_protocol::signing::{self, Secret};
use usage_protocol::wire;

use crate::common::{
    ENROLL_TOKEN, PROVIDER_PASSWORD, PROVIDER_USER, TestReceiver, receiver_settings,
};
use crate::harness::{
    Agent, bin, event, get_text, new_id, parse_exposition, poll, wait_with_deadline,
};

/// `[sync]` for tests: fast backoff, no scheduled run during the test (only the first,
/// a few seconds after start, which the assertions tolerate), and `extra` lines.
pub(crate) fn sync_table(backend: &str, extra: &str) -> String {
    format!(
        "[sync]\nbackend_url = {backend:?}\ninterval_secs = 3600\ninitial_backoff_ms = 20\nmax_backoff_ms = 100\nrequest_timeout_secs = 5\n{extra}\n"
    )
}

/// An agent configured for `backend`, enrolled with the test receiver's token if
/// `enroll` is set, not yet started.
pub(crate) fn agent_for(backend: &str, extra: &str, enroll: bool) -> Agent {
    let agent = Agent::configure_with("", &sync_table(backend, extra));
    if enroll {
        let out = agent.cli(&[
            "init",
            "--site-url",
            "https://example.com",
            "--backend-url",
            backend,
            "--enroll-token",
            ENROLL_TOKEN,
        ]);
        assert!(
            out.status.success(),
            "enrollment failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    agent
}

pub(crate) fn identity(agent: &Agent) -> Value {
    let text =
        std::fs::read_to_string(agent.data_dir().join("identity.json")).expect("identity.json");
    serde_json::from_str(&text).expect("identity.json is JSON")
}

pub(crate) async fn record(agent: &Agent, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let events: Vec<Value> = chunk
            .iter()
            .map(|_| {
                let id = new_id();
                ids.push(id.clone());
                event(&id)
            })
            .collect();
        let (code, body) = agent.post("/v1/events", &json!({"events": events})).await;
        assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    }
    ids
}

pub(crate) async fn sync_now(agent: &Agent) -> Value {
    let (code, report) = agent.post("/v1/sync", &json!({})).await;
    assert_eq!(code, StatusCode::OK, "{report}");
    for key in [
        "batches",
        "sent",
        "accepted",
        "duplicates",
        "rejected",
        "error",
        "duration_ms",
    ] {
        assert!(
            report.get(key).is_some(),
            "the report lacks {key}: {report}"
        );
    }
    report
}

pub(crate) async fn provider_json(rx: &TestReceiver, path_and_query: &str) -> Value {
    let response = reqwest::Client::new()
        .get(rx.url(path_and_query))
        .basic_auth(PROVIDER_USER, Some(PROVIDER_PASSWORD))
        .send()
        .await
        .expect("receiver answers");
    assert_eq!(response.status(), StatusCode::OK, "{path_and_query}");
    response.json().await.expect("JSON")
}

/// Events the receiver stored for this agent.
pub(crate) async fn received(rx: &TestReceiver, agent: &Agent) -> u64 {
    let install_id = identity(agent)["install_id"].as_str().unwrap().to_owned();
    let summary = provider_json(rx, &format!("/api/usage/summary?install_id={install_id}")).await;
    summary["totals"]["events"].as_u64().unwrap()
}

/// One request as a stub backend saw it.
#[derive(Clone)]
struct Seen {
    at: Instant,
    headers: HeaderMap,
    /// The body as sent on the wire (possibly gzip).
    wire: Vec<u8>,
    /// The uncompressed JSON.
    json: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }

    fn batch(&self) -> Value {
        serde_json::from_slice(&self.json).unwrap()
    }
}

type Respond = dyn Fn(usize, &Value) -> Response + Send + Sync;

/// A backend on 127.0.0.1:0 that answers every batch with `respond(request_number, batch)`
/// and remembers what it saw. Runs on its own thread, so blocking CLI calls cannot stall it.
struct Stub {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Stub {
    fn start(respond: impl Fn(usize, &Value) -> Response + Send + Sync + 'static) -> Stub {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let respond: Arc<Respond> = Arc::new(respond);
        let log = Arc::clone(&seen);
        let app = axum::Router::new().route(
            "/api/usage/event",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let log = Arc::clone(&log);
                let respond = Arc::clone(&respond);
                async move {
                    let json = if headers.get("content-encoding").is_some_and(|v| v == "gzip") {
                        wire::gunzip(&body, 10 << 20).expect("valid gzip")
                    } else {
                        body.to_vec()
                    };
                    let batch: Value = serde_json::from_slice(&json).expect("a JSON batch");
                    let number = {
                        let mut log = log.lock().unwrap();
                        log.push(Seen {
                            at: Instant::now(),
                            headers,
                            wire: body.to_vec(),
                            json,
                        });
                        log.len()
                    };
                    respond(number, &batch)
                }
            }),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        Stub {
            addr,
            seen,
            _stop: stop,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A 200 that accepts every event of `batch` except those in `reject`.
fn accept_all_but(batch: &Value, reject: &[String]) -> Response {
    let events = batch["events"].as_array().unwrap();
    let rejected: Vec<Value> = events
        .iter()
        .filter(|e| reject.iter().any(|r| e["event_id"] == r.as_str()))
        .map(|e| json!({"event_id": e["event_id"], "reason": "model: not allowed on this plan"}))
        .collect();
    let accepted = events.len() - rejected.len();
    axum::Json(json!({"batch_id": batch["batch_id"], "accepted": accepted, "duplicates": 0, "rejected": rejected}))
        .into_response()
}

fn error_answer(status: AxumStatus, code: &str) -> Response {
    (
        status,
        axum::Json(
            json!({"error": {"code": code, "message": "test backend says no", "details": []}}),
        ),
    )
        .into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_receiver_once_with_user_hashes() {
    let rx = TestReceiver::start(receiver_settings());
    let mut agent = agent_for(&rx.url(""), "batch_size = 4", true);
    agent.spawn().await;
    let ids = record(&agent, 10).await;

    let report = sync_now(&agent).await;
    assert_eq!(report["error"], Value::Null, "{report}");
    // The first scheduled run (seconds after start) may have shipped them already.
    if report["sent"] == 10 {
        let counts = (report["batches"].as_u64(), report["accepted"].as_u64());
        assert_eq!(counts, (Some(3), Some(10)), "{report}");
    }
    assert_eq!(received(&rx, &agent).await, 10);
    // Nothing is left to send: a second run sends nothing and nothing is counted twice.
    let again = sync_now(&agent).await;
    assert_eq!(again["sent"], 0, "{again}");
    assert_eq!(received(&rx, &agent).await, 10);

    let install_id = identity(&agent)["install_id"].as_str().unwrap().to_owned();
    let page = provider_json(
        &rx,
        &format!("/api/usage/events?install_id={install_id}&limit=100"),
    )
    .await;
    let stored = page["events"].as_array().unwrap();
    let mut stored_ids: Vec<&str> = stored
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    stored_ids.sort_unstable();
    let mut sent_ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    sent_ids.sort_unstable();
    assert_eq!(stored_ids, sent_ids);
    for e in stored {
        assert_eq!(e["user_hash"], wire::user_hash(&install_id, 5), "{e}");
        assert!(e.get("user_id").is_none());
        assert_eq!(e["context"]["attachment_id"], 42);
    }

    let status = agent.status().await;
    assert_eq!(status["status"], "healthy", "{status}");
    assert_eq!(
        (
            status["synced_events"].as_u64(),
            status["pending_events"].as_u64()
        ),
        (Some(10), Some(0))
    );
    assert_eq!(status["enrolled"], true);
    assert_eq!(status["consecutive_failures"], 0);
    assert!(
        status["last_sync"].is_string() && status["next_sync"].is_string(),
        "{status}"
    );

    // The CLI prints the report and exits 0.
    record(&agent, 1).await;
    let out = agent.cli(&["sync"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 accepted"), "{stdout}");
    assert_eq!(received(&rx, &agent).await, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_recorded_at_the_agent_reaches_the_receiver_and_groups_there() {
    let rx = TestReceiver::start(receiver_settings());
    let mut agent = agent_for(&rx.url(""), "", true);
    agent.spawn().await;
    let with_origin = |origin: Option<&str>| {
        let mut e = event(&new_id());
        if let Some(origin) = origin {
            e["origin"] = json!(origin);
        }
        e
    };
    let mut held = with_origin(Some("plugin:ai-alt-text"));
    // A quota hold stays on the agent: the receiver would refuse the field.
    held["hold_id"] = json!(new_id());
    let events = [
        with_origin(Some("plugin:ai-alt-text")),
        held,
        with_origin(Some("theme:acme")),
        with_origin(None),
    ];
    let (code, body) = agent.post("/v1/events", &json!({"events": events})).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");

    let report = sync_now(&agent).await;
    assert_eq!(report["error"], Value::Null, "{report}");
    assert_eq!(report["rejected"], 0, "{report}");
    assert_eq!(received(&rx, &agent).await, 4);

    let install_id = identity(&agent)["install_id"].as_str().unwrap().to_owned();
    let summary = provider_json(
        &rx,
        &format!("/api/usage/summary?install_id={install_id}&group_by=origin,model"),
    )
    .await;
    let rows: Vec<(Value, u64)> = summary["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["origin"].clone(), r["events"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        rows,
        [
            (Value::Null, 1),
            (json!("plugin:ai-alt-text"), 2),
            (json!("theme:acme"), 1)
        ],
        "{summary}"
    );
    // The agent's own answer groups the same way.
    let (_, local) = agent.get("/v1/usage?group_by=origin").await.unwrap();
    let local: Vec<(Value, u64)> = local["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["origin"].clone(), r["events"].as_u64().unwrap()))
        .collect();
    assert_eq!(local, rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_receiver_is_a_network_error_and_events_stay_pending() {
    let rx = TestReceiver::start(receiver_settings());
    let backend = rx.url("");
    let mut agent = agent_for(&backend, "max_attempts = 2", true);
    agent.spawn().await;
    record(&agent, 2).await;
    assert_eq!(sync_now(&agent).await["error"], Value::Null);
    assert_eq!(received(&rx, &agent).await, 2);
    drop(rx);

    record(&agent, 3).await;
    let report = sync_now(&agent).await;
    assert_eq!(report["error"]["category"], "network", "{report}");
    assert_eq!(report["accepted"], 0);
    let status = agent.status().await;
    assert_eq!(status["status"], "degraded", "{status}");
    assert_eq!(
        (
            status["pending_events"].as_u64(),
            status["failed_events"].as_u64()
        ),
        (Some(3), Some(0))
    );
    assert_eq!(status["last_error"]["category"], "network");
    assert!(status["last_error"]["at"].is_string());
    let runs = status["consecutive_failures"].as_u64().unwrap();
    let network = status["error_categories"]["network"].as_u64();
    assert_eq!(network, Some(2 * runs), "one per attempt: {status}");
    let out = agent.cli(&["sync"]);
    assert_eq!(out.status.code(), Some(1), "a failed run exits 1");
    assert!(String::from_utf8_lossy(&out.stdout).contains("network"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_use_every_attempt_then_leave_events_pending() {
    let stub = Stub::start(|_, _| error_answer(AxumStatus::INTERNAL_SERVER_ERROR, "boom"));
    let mut agent = agent_for(&stub.url(), "max_attempts = 3", false);
    agent.spawn().await;
    record(&agent, 2).await;
    let report = sync_now(&agent).await;
    assert_eq!(report["error"]["category"], "server", "{report}");
    assert!(
        report["error"]["message"]
            .as_str()
            .unwrap()
            .contains("test backend says no")
    );
    let requests = stub.requests();
    let status = agent.status().await;
    // Every run makes max_attempts attempts (a scheduled run may have added its own three).
    assert_eq!(
        requests.len() as u64,
        3 * status["consecutive_failures"].as_u64().unwrap()
    );
    let batch_ids: std::collections::HashSet<String> =
        requests.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(
        batch_ids.len(),
        1,
        "the batch id is the same on every retry"
    );
    assert_eq!(status["pending_events"], 2);
    assert_eq!(
        status["failed_events"], 0,
        "transient errors never fail events"
    );
    assert_eq!(status["status"], "degraded");
    assert_eq!(
        status["error_categories"]["server"].as_u64(),
        Some(requests.len() as u64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_wait_for_retry_after() {
    let stub = Stub::start(|n, batch| {
        if n == 1 {
            let mut answer = error_answer(AxumStatus::TOO_MANY_REQUESTS, "rate_limited");
            answer
                .headers_mut()
                .insert("retry-after", "1".parse().unwrap());
            answer
        } else {
            accept_all_but(batch, &[])
        }
    });
    let mut agent = agent_for(&stub.url(), "max_attempts = 3", false);
    agent.spawn().await;
    record(&agent, 3).await;
    let report = sync_now(&agent).await;
    assert_eq!(report["error"], Value::Null, "{report}");
    let requests = stub.requests();
    assert_eq!(requests.len(), 2);
    let waited = requests[1].at - requests[0].at;
    assert!(
        waited >= Duration::from_millis(950),
        "waited only {waited:?} despite Retry-After: 1"
    );
    let status = agent.status().await;
    assert_eq!(status["error_categories"]["rate_limit"], 1);
    assert_eq!(status["synced_events"], 3);
    assert_eq!(status["status"], "healthy", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_errors_stop_the_run_without_a_retry_storm() {
    let stub = Stub::start(|_, _| error_answer(AxumStatus::UNAUTHORIZED, "unknown_install"));
    let mut agent = agent_for(&stub.url(), "max_attempts = 5\nbatch_size = 1", false);
    agent.spawn().await;
    record(&agent, 3).await;
    for run in 1..=2u64 {
        let report = sync_now(&agent).await;
        assert_eq!(report["error"]["category"], "authentication", "{report}");
        let status = agent.status().await;
        // Exactly one request per run, however many batches and attempts were allowed.
        assert_eq!(
            stub.requests().len() as u64,
            status["consecutive_failures"].as_u64().unwrap()
        );
        assert!(status["consecutive_failures"].as_u64().unwrap() >= run);
        assert_eq!(status["status"], "failing", "{status}");
        assert_eq!(
            (
                status["pending_events"].as_u64(),
                status["failed_events"].as_u64()
            ),
            (Some(3), Some(0))
        );
        assert_eq!(status["last_error"]["category"], "authentication");
    }
    let out = agent.cli(&["status"]);
    assert_eq!(out.status.code(), Some(4), "status exits 4 when failing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_event_fails_alone_and_retry_failed_requeues_it() {
    let poison: Arc<Mutex<Vec<String>>> = Arc::default();
    let for_stub = Arc::clone(&poison);
    let stub = Stub::start(move |_, batch| accept_all_but(batch, &for_stub.lock().unwrap()));
    let mut agent = agent_for(&stub.url(), "", false);
    agent.spawn().await;
    let ids = record(&agent, 5).await;
    poison.lock().unwrap().push(ids[2].clone());

    let report = sync_now(&agent).await;
    assert_eq!(
        report["error"],
        Value::Null,
        "per-event rejects do not fail the run: {report}"
    );
    if report["sent"] == 5 {
        let counts = (report["accepted"].as_u64(), report["rejected"].as_u64());
        assert_eq!(counts, (Some(4), Some(1)), "{report}");
    }
    let status = agent.status().await;
    assert_eq!(
        (
            status["synced_events"].as_u64(),
            status["failed_events"].as_u64()
        ),
        (Some(4), Some(1))
    );
    assert_eq!(status["status"], "degraded", "{status}");
    let reason: String = agent
        .open_db()
        .query_row("SELECT reason FROM sync_failures", [], |r| r.get(0))
        .expect("one failure reason");
    assert_eq!(reason, "model: not allowed on this plan");

    // A failed event is not sent again until it is requeued.
    let before = stub.requests().len();
    assert_eq!(sync_now(&agent).await["sent"], 0);
    assert_eq!(stub.requests().len(), before);

    poison.lock().unwrap().clear();
    let out = agent.cli(&["retry-failed"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Requeued 1"));
    let (code, body) = agent.post("/v1/retry-failed", &json!({})).await;
    assert_eq!((code, body), (StatusCode::OK, json!({"requeued": 0})));
    let report = sync_now(&agent).await;
    assert_eq!(report["accepted"], 1, "{report}");
    let status = agent.status().await;
    assert_eq!(
        (
            status["synced_events"].as_u64(),
            status["failed_events"].as_u64()
        ),
        (Some(5), Some(0))
    );
    assert_eq!(status["status"], "healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_one_kib_are_gzipped_and_signed_uncompressed() {
    let stub = Stub::start(|_, batch| accept_all_but(batch, &[]));
    let mut agent = agent_for(&stub.url(), "auth_token = \"bearer-123\"", false);
    agent.spawn().await;
    record(&agent, 1).await;
    sync_now(&agent).await;
    record(&agent, 20).await;
    sync_now(&agent).await;

    let requests = stub.requests();
    let small = requests
        .iter()
        .find(|r| r.batch()["events"].as_array().unwrap().len() == 1)
        .unwrap();
    let large = requests
        .iter()
        .find(|r| r.batch()["events"].as_array().unwrap().len() == 20)
        .unwrap();
    assert_eq!(small.header("content-encoding"), "");
    assert!(small.json.len() <= 1024);
    assert_eq!(large.header("content-encoding"), "gzip");
    assert!(large.json.len() > 1024 && large.wire.len() < large.json.len());

    let id = identity(&agent);
    let secret = Secret::parse(id["secret"].as_str().unwrap()).unwrap();
    for request in [small, large] {
        assert_eq!(
            request.header("x-install-id"),
            id["install_id"].as_str().unwrap()
        );
        assert_eq!(request.header("authorization"), "Bearer bearer-123");
        assert_eq!(
            request.header("webhook-id"),
            request.batch()["batch_id"].as_str().unwrap()
        );
        let now = chrono::Utc::now().timestamp();
        signing::verify(
            &secret,
            &request.header("webhook-id"),
            &request.header("webhook-timestamp"),
            &request.header("webhook-signature"),
            &request.json,
            now,
            300,
        )
        .expect("the signature covers the uncompressed JSON");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_enrolls_with_the_backend_and_refuses_plain_http_elsewhere() {
    let rx = TestReceiver::start(receiver_settings());
    // The config does not name the backend, so init says it must be set there too.
    let agent = Agent::configure_with("", "");
    let out = agent.cli(&[
        "init",
        "--site-url",
        "https://example.com",
        "--backend-url",
        &rx.url(""),
        "--enroll-token",
        ENROLL_TOKEN,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("sync.backend_url"), "{stdout}");
    assert!(stdout.contains("Enrolled"), "{stdout}");
    assert!(identity(&agent)["enrolled_at"].is_string());
    let secret = identity(&agent)["secret"].as_str().unwrap().to_owned();
    assert!(!stdout.contains(&secret));

    let bad_token = agent.cli(&[
        "init",
        "--site-url",
        "https://example.com",
        "--backend-url",
        &rx.url(""),
        "--enroll-token",
        "wrong",
    ]);
    assert_eq!(bad_token.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad_token.stderr).contains("refused"));

    let insecure = agent.cli(&[
        "init",
        "--site-url",
        "https://example.com",
        "--backend-url",
        "http://backend.example.com",
        "--enroll-token",
        "T",
    ]);
    assert_eq!(insecure.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&insecure.stderr);
    assert!(
        stderr.contains("plain http") && stderr.contains("backend.example.com"),
        "{stderr}"
    );
    assert!(!stderr.contains(&secret));

    // Enrolled, the agent's batches are accepted.
    let mut enrolled = Agent::configure_with("", &sync_table(&rx.url(""), ""));
    std::fs::copy(
        agent.data_dir().join("identity.json"),
        enrolled.data_dir().join("identity.json"),
    )
    .unwrap();
    enrolled.spawn().await;
    assert_eq!(enrolled.status().await["enrolled"], true);
    record(&enrolled, 2).await;
    assert_eq!(sync_now(&enrolled).await["error"], Value::Null);
    assert_eq!(received(&rx, &enrolled).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_enrolls_with_sync_enroll_token_before_sending() {
    let rx = TestReceiver::start(receiver_settings());
    let extra = format!("enroll_token = {ENROLL_TOKEN:?}");
    let mut agent = agent_for(&rx.url(""), &extra, false);
    agent.spawn().await;
    assert_eq!(agent.status().await["enrolled"], false);
    record(&agent, 3).await;
    let report = sync_now(&agent).await;
    assert_eq!(report["error"], Value::Null, "{report}");
    // A scheduled run may have shipped some of them first; together all three arrived once.
    assert_eq!(received(&rx, &agent).await, 3);
    let status = agent.status().await;
    assert_eq!(status["enrolled"], true, "{status}");
    assert!(identity(&agent)["enrolled_at"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unenrolled_install_gets_authentication_errors() {
    let rx = TestReceiver::start(receiver_settings());
    let mut agent = agent_for(&rx.url(""), "", false);
    agent.spawn().await;
    record(&agent, 1).await;
    let report = sync_now(&agent).await;
    assert_eq!(report["error"]["category"], "authentication", "{report}");
    assert_eq!(agent.status().await["status"], "failing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_sync_then_restart_delivers_every_event_exactly_once() {
    let rx = TestReceiver::start(receiver_settings());
    let mut agent = agent_for(&rx.url(""), "batch_size = 5", true);
    agent.spawn().await;
    let total = 3000;
    record(&agent, total).await;

    // Start a sync from another process and kill the agent while batches are flowing.
    let mut client = Command::new(bin())
        .args(["--config", agent.config_path.to_str().unwrap(), "sync"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    poll(
        "some batches to arrive",
        Duration::from_secs(30),
        async || (received(&rx, &agent).await > 0).then_some(()),
    )
    .await;
    agent.kill9();
    let _ = wait_with_deadline(&mut client, Duration::from_secs(10));
    let partial = received(&rx, &agent).await;
    assert!(
        partial > 0 && partial < total as u64,
        "the kill came mid-sync: {partial} of {total}"
    );

    agent.spawn().await;
    poll(
        "the backlog to drain after the restart",
        Duration::from_secs(120),
        async || {
            let report = sync_now(&agent).await;
            assert_eq!(report["error"], Value::Null, "{report}");
            (agent.status().await["pending_events"] == 0).then_some(())
        },
    )
    .await;
    assert_eq!(
        received(&rx, &agent).await,
        total as u64,
        "every event exactly once ({partial} before the kill)"
    );
    let status = agent.status().await;
    assert_eq!(status["synced_events"].as_u64(), Some(total as u64));
    assert_eq!(status["status"], "healthy", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_makes_one_last_sync() {
    let rx = TestReceiver::start(receiver_settings());
    let mut agent = agent_for(&rx.url(""), "", true);
    agent.spawn().await;
    record(&agent, 4).await;
    let exit = agent.terminate();
    assert!(exit.success(), "{exit}");
    assert_eq!(received(&rx, &agent).await, 4);
    assert_eq!(
        agent
            .open_db()
            .query_row(
                // Synced: covered by a range of acknowledged events (src/store/sync.rs).
                "SELECT count(*) FROM events e WHERE coalesce((SELECT r.last_seq
                     FROM synced_ranges r WHERE r.first_seq <= e.seq
                     ORDER BY r.first_seq DESC LIMIT 1), 0) >= e.seq",
                [],
                |r| r.get::<_, i64>(0)
            )
            .unwrap(),
        4
    );
}

#[tokio::test]
async fn sync_answers_409_when_disabled() {
    let cases = [
        ("", String::new(), "backend_url"),
        (
            "",
            sync_table("http://127.0.0.1:9", "enabled = false"),
            "sync.enabled",
        ),
        (
            "tracking_enabled = false",
            sync_table("http://127.0.0.1:9", ""),
            "tracking",
        ),
    ];
    for (top, tables, names) in cases {
        let mut agent = Agent::configure_with(top, &tables);
        agent.spawn().await;
        let (code, body) = agent.post("/v1/sync", &json!({})).await;
        assert_eq!(code, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["error"]["code"], "sync_disabled");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(names),
            "{body}"
        );
        assert_eq!(agent.status().await["status"], "disabled");
        assert_eq!(agent.status().await["next_sync"], Value::Null);
        let out = agent.cli(&["sync"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("sync"));
    }
}

#[test]
fn sync_and_retry_failed_have_help_with_examples() {
    for command in ["sync", "retry-failed"] {
        let out = Command::new(bin())
            .args([command, "--help"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("Example"),
            "{command}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_runs_ship_events_without_being_asked() {
    let rx = TestReceiver::start(receiver_settings());
    let table = sync_table(&rx.url(""), "").replace("interval_secs = 3600", "interval_secs = 1");
    let agent = Agent::configure_with("", &table);
    let out = agent.cli(&[
        "init",
        "--site-url",
        "https://example.com",
        "--backend-url",
        &rx.url(""),
        "--enroll-token",
        ENROLL_TOKEN,
    ]);
    assert!(out.status.success());
    let mut agent = agent;
    agent.spawn().await;
    record(&agent, 3).await;
    poll(
        "a scheduled run to ship the events",
        Duration::from_secs(20),
        async || (received(&rx, &agent).await == 3).then_some(()),
    )
    .await;
    // The run marks the events and records its bookkeeping after the receiver has
    // answered; wait for both. (An earlier run with nothing to send may already have set
    // `last_sync`, so that alone does not show the shipping run has finished.)
    let status = poll(
        "the scheduled run to be recorded in status",
        Duration::from_secs(20),
        async || {
            let status = agent.status().await;
            (status["last_sync"].is_string() && status["synced_events"] == 3).then_some(status)
        },
    )
    .await;
    assert!(status["next_sync"].is_string(), "{status}");
    assert_eq!(status["synced_events"], 3, "{status}");
}

/// The agent's metrics, as `name{labels}` (labels sorted) to value.
async fn metrics(agent: &Agent) -> std::collections::HashMap<String, f64> {
    let (code, text, _) = get_text(agent, "/metrics").await;
    assert_eq!(code, StatusCode::OK, "{text}");
    parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn sample(samples: &std::collections::HashMap<String, f64>, name: &str) -> f64 {
    samples.get(name).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_counters_move_when_a_real_sync_runs() {
    let rx = TestReceiver::start(receiver_settings());
    let mut agent = agent_for(&rx.url(""), "batch_size = 4\nmax_attempts = 2", true);
    agent.spawn().await;
    record(&agent, 10).await;
    assert_eq!(sync_now(&agent).await["error"], Value::Null);
    assert_eq!(received(&rx, &agent).await, 10);

    // Whether the scheduled first run or the manual one shipped them, 10 events went in
    // 3 batches of at most 4, each one timed.
    let after_success = metrics(&agent).await;
    assert_eq!(
        sample(&after_success, "usage_agent_sync_batches_total{result=ok}"),
        3.0
    );
    assert_eq!(
        sample(
            &after_success,
            "usage_agent_sync_events_total{result=accepted}"
        ),
        10.0
    );
    assert_eq!(
        sample(
            &after_success,
            "usage_agent_sync_batch_duration_seconds_count"
        ),
        3.0
    );
    assert!(
        sample(
            &after_success,
            "usage_agent_sync_batch_duration_seconds_sum"
        ) > 0.0
    );
    assert!(sample(&after_success, "usage_agent_job_runs_total{job=sync}") >= 1.0);
    assert_eq!(
        sample(&after_success, "usage_agent_job_failures_total{job=sync}"),
        0.0
    );

    // With the receiver gone, each failed run is one failed batch after two attempts.
    drop(rx);
    record(&agent, 2).await;
    assert_eq!(sync_now(&agent).await["error"]["category"], "network");
    let after_failure = metrics(&agent).await;
    let failed_runs = sample(&after_failure, "usage_agent_job_failures_total{job=sync}");
    assert!(failed_runs >= 1.0, "{after_failure:?}");
    assert_eq!(
        sample(
            &after_failure,
            "usage_agent_sync_batches_total{result=error}"
        ),
        failed_runs
    );
    assert_eq!(
        sample(
            &after_failure,
            "usage_agent_sync_errors_total{category=network}"
        ),
        2.0 * failed_runs
    );
    assert_eq!(
        sample(&after_failure, "usage_agent_sync_batches_total{result=ok}"),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_run_longer_than_the_interval_counts_missed_runs() {
    // A backend that takes 2.5 s to answer, against a 1 s sync interval.
    let stub = Stub::start(|_, batch| {
        std::thread::sleep(Duration::from_millis(2500));
        accept_all_but(batch, &[])
    });
    let mut agent = Agent::configure_with(
        "",
        &format!(
            "[sync]\nbackend_url = {:?}\ninterval_secs = 1\nrequest_timeout_secs = 10\n",
            stub.url()
        ),
    );
    assert!(
        agent
            .cli(&["init", "--site-url", "https://example.com"])
            .status
            .success()
    );
    agent.spawn().await;
    record(&agent, 1).await;
    poll("a missed sync run", Duration::from_secs(30), async || {
        let samples = metrics(&agent).await;
        (sample(&samples, "usage_agent_job_missed_total{job=sync}") >= 1.0).then_some(())
    })
    .await;
    assert_eq!(
        sample(
            &metrics(&agent).await,
            "usage_agent_job_missed_total{job=rollup}"
        ),
        0.0
    );
}

/// What a drain behind a receiver's rate limit showed: the worst status seen while it ran,
/// the largest batch size status reported, and the `rate_limit` attempts counted.
struct Drained {
    statuses: std::collections::BTreeSet<String>,
    largest_batch_size: u64,
    rate_limited_attempts: u64,
    took: Duration,
}

/// Records `n` events at an agent with `batch_size`, the default sync interval (so the
/// default run budget), against a real receiver allowing `per_min` requests a minute; syncs
/// while polling status, and returns once every event reached the receiver.
async fn drain_behind_the_rate_limit(per_min: u32, batch_size: usize, n: usize) -> Drained {
    let rx = TestReceiver::start(usage_receiver::ReceiverSettings {
        rate_limit_per_min: per_min,
        ..receiver_settings()
    });
    let url = rx.url("");
    let mut agent = Agent::configure_with(
        "",
        &format!("[sync]\nbackend_url = {url:?}\nbatch_size = {batch_size}\n"),
    );
    let out = agent.cli(&[
        "init",
        "--site-url",
        "https://example.com",
        "--backend-url",
        &url,
        "--enroll-token",
        ENROLL_TOKEN,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.spawn().await;
    // The default `sync.interval_secs`: how long one run may last.
    let interval = Duration::from_secs(300);
    record(&agent, n).await;

    let started = Instant::now();
    let mut drained = Drained {
        statuses: Default::default(),
        largest_batch_size: 0,
        rate_limited_attempts: 0,
        took: Duration::ZERO,
    };
    let empty = json!({});
    let sync = agent.post("/v1/sync", &empty);
    tokio::pin!(sync);
    let mut observe = |status: &Value| {
        drained
            .statuses
            .insert(status["status"].as_str().unwrap().to_owned());
        let size = status["sync"]["batch_size"]
            .as_u64()
            .expect("sync.batch_size");
        drained.largest_batch_size = drained.largest_batch_size.max(size);
    };
    let report = loop {
        tokio::select! {
            (code, report) = &mut sync => {
                assert_eq!(code, StatusCode::OK, "{report}");
                break report;
            }
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                observe(&agent.status().await);
            }
        }
    };
    // The first scheduled run may have drained part or all of the queue; the manual run
    // waited for it and sent the rest.
    assert_eq!(report["error"], Value::Null, "{report}");
    drained.took = started.elapsed();
    let status = agent.status().await;
    observe(&status);
    assert_eq!(status["pending_events"], 0, "{status}");
    assert_eq!(status["synced_events"], n as u64, "{status}");
    assert_eq!(status["consecutive_failures"], 0, "{status}");
    drained.rate_limited_attempts = status["error_categories"]["rate_limit"].as_u64().unwrap();
    assert_eq!(received(&rx, &agent).await, n as u64);
    assert!(
        drained.took < interval,
        "draining took {:?}, longer than a run may last",
        drained.took
    );
    let out = agent.cli(&["status"]);
    assert!(
        out.status.success(),
        "usage-agent status exits 0 after the drain"
    );
    eprintln!(
        "{n} events at {per_min}/min: drained in {:?}, statuses {:?}, largest batch {}, {} attempts rate limited",
        drained.took, drained.statuses, drained.largest_batch_size, drained.rate_limited_attempts
    );
    drained
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_backlog_drains_in_one_run_behind_the_default_rate_limit() {
    let drained = drain_behind_the_rate_limit(100, 50, 20_000).await;
    for status in &drained.statuses {
        assert!(
            ["pending", "healthy"].contains(&status.as_str()),
            "status was {status} during the drain ({:?})",
            drained.statuses
        );
    }
    assert!(
        drained.largest_batch_size > 50,
        "status never showed larger batches: {}",
        drained.largest_batch_size
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_agent_waits_grows_its_batches_and_stays_pending() {
    // 5,000 events in batches of 50 at most need 100 requests; the receiver allows 60 at
    // once, then one a second, so the run meets 429s and must wait them out.
    let drained = drain_behind_the_rate_limit(60, 1, 5_000).await;
    assert!(
        drained.rate_limited_attempts > 0,
        "the receiver never answered 429"
    );
    for status in &drained.statuses {
        assert!(
            ["pending", "healthy"].contains(&status.as_str()),
            "status was {status} during the drain ({:?})",
            drained.statuses
        );
    }
    assert!(
        drained.largest_batch_size > 50,
        "a 429 never grew the batches: {}",
        drained.largest_batch_size
    );
}
