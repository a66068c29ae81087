//! A misbehaving network between the agent and the receiver: the agent's `backend_url`
//! points at a [`FaultProxy`] that adds latency, resets connections in the middle of a
//! request or of an answer, or swallows everything for a while. While faulted, the agent's
//! status names the failure (category `network`); nothing is lost or counted twice at the
//! receiver; once the fault is lifted, the schedule ships the backlog by itself.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::common::{TestReceiver, receiver_settings};
use crate::harness::{Agent, poll};
use crate::proxy::{Fault, FaultProxy};
use crate::support::{
    Ledger, Rng, call, enrolled_agent, install_id, post_events, random_event, receiver_total, seed,
    socket_client, start, sync_table, verify,
};

/// How long the black hole lasts (30 s, the default `sync.request_timeout_secs`);
/// `FAULT_BLACK_HOLE_SECS` overrides it.
fn black_hole_duration() -> Duration {
    let secs = std::env::var("FAULT_BLACK_HOLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// A receiver, a proxy in front of it, and an agent enrolled with the receiver that
/// syncs through the proxy every second.
struct Rig {
    rx: TestReceiver,
    proxy: FaultProxy,
    /// Held for its `Drop`, which stops the daemon.
    _agent: Agent,
    install: String,
    client: reqwest::Client,
    ledger: Ledger,
    rng: Rng,
}

impl Rig {
    async fn start(test: &str, request_timeout_secs: u64) -> Rig {
        let rng = Rng::new(seed(test));
        let rx = TestReceiver::start(receiver_settings());
        let proxy = FaultProxy::start(rx.addr);
        let tables = sync_table(
            &proxy.url(),
            &format!(
                "interval_secs = 1\nbatch_size = 10\nmax_attempts = 2\nrequest_timeout_secs = {request_timeout_secs}"
            ),
        );
        let mut agent = enrolled_agent("", &tables, &rx.url(""));
        start(&mut agent).await;
        let install = install_id(&agent);
        let client = socket_client(&agent);
        Rig {
            rx,
            proxy,
            _agent: agent,
            install,
            client,
            ledger: Ledger::default(),
            rng,
        }
    }

    /// Records `count` events (acknowledged) in batches of at most 10.
    async fn record(&mut self, count: usize) {
        for start in (0..count).step_by(10) {
            let events: Vec<Value> = (start..count.min(start + 10))
                .map(|_| {
                    let user = self.rng.range(1, 6);
                    random_event(&mut self.rng, user, (0, 30))
                })
                .collect();
            assert!(
                post_events(&self.client, &events)
                    .await
                    .expect("agent")
                    .is_some()
            );
            self.ledger.note(&events, true);
        }
    }

    async fn status(&self) -> Value {
        let (code, status) = call(&self.client, Method::GET, "/v1/status", None)
            .await
            .expect("the agent answers /v1/status");
        assert_eq!(code, StatusCode::OK, "{status}");
        status
    }

    async fn received(&self) -> u64 {
        receiver_total(&self.rx.url(""), &self.install).await
    }

    /// Waits until a scheduled run has failed with a network error since `since_failures`
    /// errors of that category, and returns the status.
    async fn wait_for_network_failure(&self, since_failures: u64) -> Value {
        let status = poll(
            "the status to report a network failure",
            Duration::from_secs(60),
            async || {
                let status = self.status().await;
                let network = status["error_categories"]["network"].as_u64().unwrap_or(0);
                (status["last_error"]["category"] == "network" && network > since_failures)
                    .then_some(status)
            },
        )
        .await;
        assert!(
            ["degraded", "failing"].contains(&status["status"].as_str().unwrap_or("")),
            "{status}"
        );
        assert!(
            status["consecutive_failures"].as_u64() >= Some(1),
            "{status}"
        );
        assert!(status["pending_events"].as_u64() > Some(0), "{status}");
        status
    }

    /// With the fault lifted, waits for the schedule alone to ship everything, then
    /// checks every event against both sides.
    async fn recovers_by_itself(&self) {
        self.proxy.set(Fault::None);
        let acked = self.ledger.acked() as u64;
        let status = poll(
            "the schedule to ship the backlog after the fault",
            Duration::from_secs(60),
            async || {
                let status = self.status().await;
                (status["pending_events"] == 0 && status["consecutive_failures"] == 0)
                    .then_some(status)
            },
        )
        .await;
        assert_eq!(status["status"], "healthy", "{status}");
        assert_eq!(status["synced_events"].as_u64(), Some(acked), "{status}");
        assert_eq!(
            self.received().await,
            acked,
            "each event once at the receiver"
        );
        let seen = verify(
            &self.client,
            &self.rx.url(""),
            &self.install,
            &self.ledger,
            &[],
        )
        .await;
        assert_eq!(seen.received_events as u64, acked);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_of_200_ms_each_way_slows_sync_and_loses_nothing() {
    let mut rig = Rig::start("latency_of_200_ms_each_way_slows_sync_and_loses_nothing", 5).await;
    rig.proxy.set(Fault::Latency(Duration::from_millis(200)));
    rig.record(30).await;
    let started = Instant::now();
    let (code, report) = call(
        &rig.client,
        Method::POST,
        "/v1/sync",
        Some(&serde_json::json!({})),
    )
    .await
    .expect("the agent answers /v1/sync");
    assert_eq!(code, StatusCode::OK, "{report}");
    assert!(
        report["error"].is_null(),
        "latency alone is no failure: {report}"
    );
    // A batch went out in this run, or in the scheduled one it waited for: either way at
    // least one round trip through the proxy (200 ms each way) happened meanwhile.
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "the proxy slowed nothing: {:?}",
        started.elapsed()
    );
    assert_eq!(rig.received().await, 30);
    rig.record(20).await;
    rig.recovers_by_itself().await;
}

/// Resets every connection after `bytes` of its request: the receiver never gets a
/// whole request, so it stores nothing; the agent sees a reset.
async fn reset_mid_request(test: &str, bytes: usize) {
    let mut rig = Rig::start(test, 5).await;
    rig.record(10).await;
    rig.recovers_by_itself().await;
    let before = rig.received().await;

    rig.proxy.set(Fault::ResetUpstreamAfter(bytes));
    rig.record(25).await;
    let status = rig.wait_for_network_failure(0).await;
    assert!(rig.proxy.resets() > 0, "the proxy cut something");
    assert_eq!(
        rig.received().await,
        before,
        "a request cut short stores nothing: {status}"
    );
    rig.recovers_by_itself().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_inside_the_request_headers_loses_nothing_and_recovers() {
    reset_mid_request(
        "a_reset_inside_the_request_headers_loses_nothing_and_recovers",
        100,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_inside_the_request_body_loses_nothing_and_recovers() {
    // The signed headers take about 400 bytes; a batch of 10 events is gzipped past 1 KiB.
    reset_mid_request(
        "a_reset_inside_the_request_body_loses_nothing_and_recovers",
        700,
    )
    .await;
}

/// Resets every connection after `bytes` of its answer: the receiver has stored the
/// batch, the agent never hears it and sends it again. The re-sent events must be
/// duplicates at the receiver, never counted twice.
async fn reset_mid_answer(test: &str, bytes: usize) {
    let mut rig = Rig::start(test, 5).await;
    rig.record(10).await;
    rig.recovers_by_itself().await;
    let before = rig.received().await;

    rig.proxy.set(Fault::ResetDownstreamAfter(bytes));
    rig.record(25).await;
    let status = rig.wait_for_network_failure(0).await;
    // The double-count setup: the receiver holds events the agent still counts pending.
    let received = poll(
        "the receiver to store a batch whose answer was cut",
        Duration::from_secs(30),
        async || {
            let received = rig.received().await;
            (received > before).then_some(received)
        },
    )
    .await;
    let pending = rig.status().await["pending_events"].as_u64().unwrap();
    assert_eq!(pending, 25, "no answer, nothing marked synced: {status}");
    assert!(received <= before + 25, "stored at most once: {received}");
    rig.recovers_by_itself().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_inside_the_answer_status_line_is_a_duplicate_not_a_double_count() {
    reset_mid_answer(
        "a_reset_inside_the_answer_status_line_is_a_duplicate_not_a_double_count",
        12,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_inside_the_answer_body_is_a_duplicate_not_a_double_count() {
    // The answer's headers take about 142 bytes; its JSON body (about 85) follows.
    reset_mid_answer(
        "a_reset_inside_the_answer_body_is_a_duplicate_not_a_double_count",
        160,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_times_out_as_a_network_error_and_sync_recovers_after_it() {
    let hold = black_hole_duration();
    // The agent gives up on a silent backend after 2 s instead of 30.
    let mut rig = Rig::start(
        "a_black_hole_times_out_as_a_network_error_and_sync_recovers_after_it",
        2,
    )
    .await;
    rig.record(10).await;
    rig.recovers_by_itself().await;
    let before = rig.received().await;

    let started = Instant::now();
    rig.proxy.set(Fault::BlackHole);
    rig.record(30).await;
    let status = rig.wait_for_network_failure(0).await;
    assert!(
        status["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("timed out")),
        "{status}"
    );
    assert!(
        rig.proxy.swallowed() > 0,
        "the black hole took the requests"
    );
    // For as long as the hole lasts, runs keep failing and nothing arrives.
    let failures = status["error_categories"]["network"].as_u64().unwrap();
    rig.wait_for_network_failure(failures).await;
    assert!(
        started.elapsed() < hold,
        "a second timed-out run came within the hole ({:?}); raise FAULT_BLACK_HOLE_SECS",
        started.elapsed()
    );
    assert_eq!(rig.received().await, before);
    tokio::time::sleep_until((started + hold).into()).await;
    assert_eq!(rig.received().await, before, "nothing got through the hole");
    rig.recovers_by_itself().await;
}
