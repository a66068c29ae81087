//! What one client can hold, tried on the real servers: the connection cap of the agent's
//! socket and of the receiver, and the agent's shutdown deadline against a client that
//! never finishes its request. The timeouts themselves are unit-tested in
//! `crates/usage-common/src/server.rs` with short limits. And the receiver's turns for
//! costly work (`MAX_INFLIGHT_BATCHES`), held by batches whose database write the test
//! keeps waiting.

use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use usage_protocol::event::format_millis;
use usage_protocol::wire::user_hash;
use usage_receiver::billing::pricing::{Plan, PlanHistory};
use usage_receiver::store::rate_limit::Rate;
use usage_receiver::store::{
    Alert, AlertCursor, Budget, DayRange, DeliveryOutcome, EnrollOutcome, EventsPage, EventsQuery,
    IngestCounts, Install, InstallKey, InstallationsReport, MonthSpend, NewAlert, NewEvent,
    NewInstall, RetainedDays, SourceModelDay, StoreKind, Summary, SummaryQuery, TimeRange,
    UsageWindow,
};
use usage_receiver::{ReceiverSettings, ReceiverStore, ReceiverStoreError};
use uuid::Uuid;

use crate::common::{TestInstall, TestReceiver, batch_body, enroll, receiver_settings, signed};
use crate::harness::{Agent, assert_error_shape, exists, poll, signal, wait_with_deadline};

/// Whether the peer closes `stream` within `within` (a read that ends, not one that waits).
fn closed_within<S: Read>(stream: &mut S, within: Duration) -> bool {
    let mut buffer = [0u8; 256];
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) if Instant::now() < deadline => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
    false
}

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";

fn answer_status<S: Read + Write>(stream: &mut S, request: &[u8]) -> String {
    stream.write_all(request).unwrap();
    let mut buffer = [0u8; 1024];
    let n = stream.read(&mut buffer).unwrap();
    String::from_utf8_lossy(&buffer[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn the_receiver_closes_connections_past_max_connections_and_serves_the_open_ones() {
    let settings = usage_receiver::ReceiverSettings {
        max_connections: 3,
        ..receiver_settings()
    };
    let rx = TestReceiver::start(settings);
    let open: Vec<std::net::TcpStream> = (0..3)
        .map(|_| {
            let stream = std::net::TcpStream::connect(rx.addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            stream
        })
        .collect();
    let mut refused = std::net::TcpStream::connect(rx.addr).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = refused.write_all(HEALTH);
    assert!(
        closed_within(&mut refused, Duration::from_secs(4)),
        "the fourth connection is closed at once"
    );
    for mut stream in open {
        assert_eq!(answer_status(&mut stream, HEALTH), "HTTP/1.1 200 OK");
    }
}

#[tokio::test]
async fn the_agent_closes_connections_past_max_connections_and_serves_the_open_ones() {
    let agent = Agent::start("max_connections = 2").await;
    let socket = agent.socket.clone();
    tokio::task::spawn_blocking(move || {
        let connect = || {
            let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            stream
        };
        // The harness may keep a pooled connection of its own, so count: of four new
        // connections, at most two are served, the rest are closed at once, and the
        // served ones keep being served.
        let healthz = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut served = Vec::new();
        let mut closed = 0;
        for _ in 0..4 {
            let mut stream = connect();
            let _ = stream.write_all(healthz);
            let mut buffer = [0u8; 1024];
            match stream.read(&mut buffer) {
                Ok(n) if n > 0 => {
                    assert!(buffer.starts_with(b"HTTP/1.1 200"));
                    served.push(stream);
                }
                _ => closed += 1,
            }
        }
        assert!((1..=2).contains(&served.len()), "served {}", served.len());
        assert_eq!(served.len() + closed, 4);
        for stream in &mut served {
            assert_eq!(answer_status(stream, healthz), "HTTP/1.1 200 OK");
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn sigterm_ends_within_shutdown_timeout_while_a_client_holds_a_half_sent_request() {
    let mut agent = Agent::start("shutdown_timeout_secs = 2").await;
    // Headers in, a tenth of the body, then nothing: before shutdown cut the connections
    // still open at its deadline, this held the agent's graceful shutdown open for as long
    // as the client liked.
    let mut holder = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    holder
        .write_all(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{\"events\": [",
        )
        .unwrap();
    let (code, _) = agent.get("/v1/status").await.unwrap();
    assert_eq!(
        code,
        reqwest::StatusCode::OK,
        "the agent still serves others"
    );
    let mut child = agent.child.take().unwrap();
    let started = Instant::now();
    signal(&child, "-TERM");
    let status = wait_with_deadline(&mut child, Duration::from_secs(15));
    let took = started.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_secs(4),
        "stopped after {took:?}, past shutdown_timeout_secs = 2 (and its margin)"
    );
    assert!(!exists(&agent.socket), "the socket is removed");
    drop(holder);
}

// -- MAX_INFLIGHT_BATCHES: costly work for a bounded number of batches at once ----------

/// A store whose `ingest` (the database write, the last of a batch's costly work) waits
/// at a gate the test opens, and counts the batches inside it at once.
struct GatedStore {
    inner: Arc<dyn ReceiverStore>,
    gate: Mutex<Gate>,
    changed: Condvar,
}

#[derive(Default)]
struct Gate {
    open: bool,
    inside: usize,
    most_inside: usize,
    entered: usize,
}

impl GatedStore {
    fn new(inner: Arc<dyn ReceiverStore>) -> GatedStore {
        GatedStore {
            inner,
            gate: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    fn open(&self) {
        self.gate.lock().unwrap().open = true;
        self.changed.notify_all();
    }

    /// (batches that reached the write, most of them inside at once)
    fn counts(&self) -> (usize, usize) {
        let gate = self.gate.lock().unwrap();
        (gate.entered, gate.most_inside)
    }
}

impl ReceiverStore for GatedStore {
    fn ingest(
        &self,
        install: InstallKey,
        events: Vec<NewEvent>,
        received_at_ms: i64,
    ) -> Result<IngestCounts, ReceiverStoreError> {
        let mut gate = self.gate.lock().unwrap();
        gate.entered += 1;
        gate.inside += 1;
        gate.most_inside = gate.most_inside.max(gate.inside);
        // Bounded, so a broken test cannot hang the suite.
        let (mut gate, _) = self
            .changed
            .wait_timeout_while(gate, Duration::from_secs(30), |gate| !gate.open)
            .unwrap();
        gate.inside -= 1;
        drop(gate);
        self.inner.ingest(install, events, received_at_ms)
    }

    fn enroll(&self, install: &NewInstall) -> Result<EnrollOutcome, ReceiverStoreError> {
        self.inner.enroll(install)
    }
    fn find_install(&self, install_id: &str) -> Result<Option<Install>, ReceiverStoreError> {
        self.inner.find_install(install_id)
    }
    fn day_models(
        &self,
        install: InstallKey,
        days: &[i64],
    ) -> Result<Vec<(i64, String)>, ReceiverStoreError> {
        self.inner.day_models(install, days)
    }
    fn summary(&self, query: &SummaryQuery) -> Result<Summary, ReceiverStoreError> {
        self.inner.summary(query)
    }
    fn summary_at_most(
        &self,
        query: &SummaryQuery,
        max_rows: usize,
    ) -> Result<Option<Summary>, ReceiverStoreError> {
        self.inner.summary_at_most(query, max_rows)
    }
    fn events_page(&self, query: &EventsQuery) -> Result<EventsPage, ReceiverStoreError> {
        self.inner.events_page(query)
    }
    fn kind(&self) -> StoreKind {
        self.inner.kind()
    }
    fn ping(&self) -> Result<(), ReceiverStoreError> {
        self.inner.ping()
    }
    fn take_request(
        &self,
        install: InstallKey,
        rate: Rate,
    ) -> Result<Result<(), Duration>, ReceiverStoreError> {
        self.inner.take_request(install, rate)
    }
    fn maintain(&self, days: RetainedDays) -> Result<u64, ReceiverStoreError> {
        self.inner.maintain(days)
    }
    fn installations(
        &self,
        install_id: Option<&str>,
        window: UsageWindow,
    ) -> Result<InstallationsReport, ReceiverStoreError> {
        self.inner.installations(install_id, window)
    }
    fn set_plan(&self, install_id: &str, plan: Plan, day: i64) -> Result<bool, ReceiverStoreError> {
        self.inner.set_plan(install_id, plan, day)
    }
    fn plan_history(&self, install_id: &str) -> Result<Option<PlanHistory>, ReceiverStoreError> {
        self.inner.plan_history(install_id)
    }
    fn set_label(&self, install_id: &str, label: &str) -> Result<bool, ReceiverStoreError> {
        self.inner.set_label(install_id, label)
    }
    fn source_usage(
        &self,
        install_id: &str,
        days: DayRange,
    ) -> Result<Vec<SourceModelDay>, ReceiverStoreError> {
        self.inner.source_usage(install_id, days)
    }
    fn fleet_model_days(
        &self,
        days: DayRange,
    ) -> Result<Vec<usage_receiver::billing::pricing::ModelDayTokens>, ReceiverStoreError> {
        self.inner.fleet_model_days(days)
    }
    fn user_usage(
        &self,
        install_id: &str,
        days: DayRange,
    ) -> Result<Vec<usage_receiver::store::UserModelDay>, ReceiverStoreError> {
        self.inner.user_usage(install_id, days)
    }
    fn erase_install(&self, install_id: &str) -> Result<Option<u64>, ReceiverStoreError> {
        self.inner.erase_install(install_id)
    }
    fn set_budget(
        &self,
        install_id: &str,
        budget: Option<&Budget>,
    ) -> Result<bool, ReceiverStoreError> {
        self.inner.set_budget(install_id, budget)
    }
    fn month_spend(
        &self,
        install: InstallKey,
        days: DayRange,
        month: &str,
    ) -> Result<MonthSpend, ReceiverStoreError> {
        self.inner.month_spend(install, days, month)
    }
    fn record_alerts(&self, alerts: &[NewAlert]) -> Result<Vec<Uuid>, ReceiverStoreError> {
        self.inner.record_alerts(alerts)
    }
    fn alerts(&self, range: TimeRange) -> Result<Vec<Alert>, ReceiverStoreError> {
        self.inner.alerts(range)
    }
    fn alerts_page(
        &self,
        range: TimeRange,
        after: Option<AlertCursor>,
        limit: usize,
    ) -> Result<Vec<Alert>, ReceiverStoreError> {
        self.inner.alerts_page(range, after, limit)
    }
    fn claim_alerts(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Alert>, ReceiverStoreError> {
        self.inner.claim_alerts(now_ms, lease_ms, limit)
    }
    fn finish_alert(
        &self,
        alert_id: Uuid,
        outcome: DeliveryOutcome,
    ) -> Result<(), ReceiverStoreError> {
        self.inner.finish_alert(alert_id, outcome)
    }
}

/// A receiver with `MAX_INFLIGHT_BATCHES = cap`, waits of `wait`, and a gated store; and
/// an enrolled install.
async fn gated_receiver(
    cap: usize,
    wait: Duration,
) -> (TestReceiver, Arc<GatedStore>, TestInstall) {
    let settings = ReceiverSettings {
        max_inflight_batches: cap,
        inflight_wait: wait,
        ..receiver_settings()
    };
    let mut gated = None;
    let rx = TestReceiver::start_wrapped(settings, |store| {
        let store = Arc::new(GatedStore::new(store));
        gated = Some(store.clone());
        store
    });
    let install = TestInstall::new();
    enroll(&rx, &install).await;
    (rx, gated.expect("the store was wrapped"), install)
}

/// One signed batch of one valid event, sent on its own task.
fn send_one(
    rx: &TestReceiver,
    install: &TestInstall,
) -> tokio::task::JoinHandle<reqwest::Response> {
    let batch_id = Uuid::new_v4();
    let event = json!({
        "event_id": Uuid::now_v7(),
        "user_hash": user_hash(&install.id, 1),
        "source": "bulk",
        "model": "gpt-4o-mini",
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "total_tokens": 120,
        "created_at": format_millis(chrono::Utc::now().timestamp_millis() - 1000),
    });
    let body = batch_body(batch_id, &install.id, &[event]);
    let request = signed(rx, install, batch_id, &body);
    tokio::spawn(async move { request.send().await.expect("an answer") })
}

async fn assert_accepted(response: reqwest::Response) {
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["accepted"], 1, "{body}");
}

#[tokio::test]
async fn batches_past_max_inflight_batches_wait_their_turn_then_go_through() {
    let (rx, gated, install) = gated_receiver(1, Duration::from_secs(10)).await;
    let first = send_one(&rx, &install);
    poll(
        "the first batch to reach its write",
        Duration::from_secs(10),
        async || (gated.counts().0 == 1).then_some(()),
    )
    .await;
    let second = send_one(&rx, &install);
    // While the first holds the only turn, the second gets no answer and no write.
    let early = tokio::time::timeout(Duration::from_millis(300), async {
        while !second.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        early.is_err(),
        "the second batch was answered while the first held the turn"
    );
    assert_eq!(gated.counts(), (1, 1));
    gated.open();
    assert_accepted(first.await.unwrap()).await;
    assert_accepted(second.await.unwrap()).await;
    assert_eq!(
        gated.counts(),
        (2, 1),
        "one batch in its costly work at a time"
    );
}

#[tokio::test]
async fn a_batch_that_waits_past_the_inflight_wait_is_answered_503_with_retry_after() {
    const CAP: usize = 2;
    const SENT: usize = 5;
    let wait = Duration::from_millis(500);
    let (rx, gated, install) = gated_receiver(CAP, wait).await;
    let started = Instant::now();
    let mut pending: Vec<_> = (0..SENT).map(|_| send_one(&rx, &install)).collect();
    // With the gate shut, CAP batches hold the turns and the rest time out.
    let mut refused = Vec::new();
    poll(
        "the batches past the cap to be refused",
        Duration::from_secs(20),
        async || {
            let (done, still): (Vec<_>, Vec<_>) = std::mem::take(&mut pending)
                .into_iter()
                .partition(|task| task.is_finished());
            pending = still;
            for task in done {
                refused.push(task.await.unwrap());
            }
            (refused.len() >= SENT - CAP).then_some(())
        },
    )
    .await;
    assert!(started.elapsed() >= wait, "refused before waiting {wait:?}");
    assert_eq!(refused.len(), SENT - CAP);
    assert_eq!(gated.counts(), (CAP, CAP));
    for response in refused {
        assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "5");
        let body: Value = response.json().await.unwrap();
        assert_error_shape(&body, "too_busy");
    }
    gated.open();
    for task in pending {
        assert_accepted(task.await.unwrap()).await;
    }
    // The turns are free again.
    assert_accepted(send_one(&rx, &install).await.unwrap()).await;
}
