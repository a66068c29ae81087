//! `run_once` against small in-process backends: the retry and bisection rules without a
//! daemon or a clock to wait for.

use std::sync::Mutex as StdMutex;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::*;
use crate::config::Synchronous;
use usage_protocol::event::{Event, ModelName, Source, Tokens};
use usage_protocol::signing::{self, Secret};
use usage_protocol::wire;

/// One request as the stub backend saw it.
struct Seen {
    headers: HeaderMap,
    /// The uncompressed body as sent, which the signature covers.
    raw: Vec<u8>,
    body: Value,
}

type Respond = dyn Fn(usize, &Value) -> Response + Send + Sync;

struct Stub {
    url: String,
    seen: Arc<StdMutex<Vec<Seen>>>,
}

impl Stub {
    /// A backend that answers each batch with `respond(request_number, batch)`.
    async fn start(respond: impl Fn(usize, &Value) -> Response + Send + Sync + 'static) -> Stub {
        let seen = Arc::new(StdMutex::new(Vec::new()));
        let respond: Arc<Respond> = Arc::new(respond);
        let log = Arc::clone(&seen);
        let app = axum::Router::new().route(
            "/api/usage/event",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let log = Arc::clone(&log);
                let respond = Arc::clone(&respond);
                async move {
                    let raw = if headers.get("content-encoding").is_some_and(|v| v == "gzip") {
                        wire::gunzip(&body, 10 << 20).unwrap()
                    } else {
                        body.to_vec()
                    };
                    let batch: Value = serde_json::from_slice(&raw).unwrap();
                    let number = {
                        let mut log = log.lock().unwrap();
                        log.push(Seen {
                            headers,
                            raw,
                            body: batch.clone(),
                        });
                        log.len()
                    };
                    respond(number, &batch)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Stub { url, seen }
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A 200 answer that accepts every event of the batch except `reject`.
fn accept_all_but(batch: &Value, reject: &[String]) -> Response {
    let events = batch["events"].as_array().unwrap();
    let rejected: Vec<Value> = events
        .iter()
        .filter(|e| reject.iter().any(|r| e["event_id"] == r.as_str()))
        .map(|e| json!({"event_id": e["event_id"], "reason": "model: not priced here"}))
        .collect();
    let accepted = events.len() - rejected.len();
    axum::Json(json!({"batch_id": batch["batch_id"], "accepted": accepted, "duplicates": 0, "rejected": rejected}))
        .into_response()
}

fn contains(batch: &Value, id: &str) -> bool {
    batch["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["event_id"] == id)
}

struct Fixture {
    _dir: tempfile::TempDir,
    engine: SyncEngine,
    writer: Writer,
    identity: Identity,
    events: Vec<Event>,
}

impl Fixture {
    async fn new(backend: &str, sync: &str, n: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "data_dir = {:?}\n[sync]\nbackend_url = {backend:?}\ninitial_backoff_ms = 10\nmax_backoff_ms = 40\n{sync}\n",
            dir.path().display().to_string()
        );
        let mut config = Config::from_toml(&text).unwrap();
        config.synchronous = Synchronous::Normal;
        let identity = Identity::generate("https://example.com").unwrap();
        let store = Store::open(&config.database_path(), config.synchronous).unwrap();
        let (writer, _thread) = Writer::spawn(store);
        let events: Vec<Event> = (0..n)
            .map(|i| Event {
                event_id: Uuid::now_v7(),
                user_id: i,
                source: Source::Bulk,
                model: ModelName::parse("gpt-4o-mini").unwrap(),
                tokens: Tokens {
                    prompt: 100,
                    completion: 10,
                    ..Tokens::default()
                },
                origin: None,
                hold_id: None,
                context: Some(format!(r#"{{"attachment_id":{i}}}"#)),
                created_at_ms: Utc::now().timestamp_millis() - 1000,
            })
            .collect();
        writer.record(events.clone()).await.unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let engine =
            SyncEngine::new(&config, Some(identity.clone()), writer.clone(), metrics).unwrap();
        Fixture {
            _dir: dir,
            engine,
            writer,
            identity,
            events,
        }
    }

    async fn counts(&self) -> crate::store::status::QueueCounts {
        self.writer.run(|store| store.queue_counts()).await.unwrap()
    }

    async fn meta(&self) -> crate::store::status::SyncMeta {
        self.writer.run(|store| store.sync_meta()).await.unwrap()
    }

    fn id(&self, i: usize) -> String {
        self.events[i].event_id.to_string()
    }
}

#[tokio::test]
async fn a_run_drains_the_backlog_in_signed_batches() {
    let stub = Stub::start(|_, batch| accept_all_but(batch, &[])).await;
    let fx = Fixture::new(&stub.url, "batch_size = 3", 7).await;
    let report = fx.engine.run_once().await;
    assert_eq!(report.error, None);
    assert_eq!(
        (
            report.batches,
            report.sent,
            report.accepted,
            report.rejected
        ),
        (3, 7, 7, 0)
    );
    assert_eq!(fx.counts().await.synced, 7);
    assert_eq!(stub.requests(), 3);

    let secret = Secret::parse(&fx.identity.secret).unwrap();
    let mut batches = Vec::new();
    let first_batch = {
        let seen = stub.seen.lock().unwrap();
        for request in seen.iter() {
            let header = |name: &str| {
                request
                    .headers
                    .get(name)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned()
            };
            assert_eq!(header("x-install-id"), fx.identity.install_id);
            assert_eq!(
                header("webhook-id"),
                request.body["batch_id"].as_str().unwrap()
            );
            let body = &request.raw;
            let now = Utc::now().timestamp();
            signing::verify(
                &secret,
                &header("webhook-id"),
                &header("webhook-timestamp"),
                &header("webhook-signature"),
                body,
                now,
                300,
            )
            .expect("the batch verifies");
            let mut ids = Vec::new();
            for event in request.body["events"].as_array().unwrap() {
                assert!(event.get("user_id").is_none());
                ids.push(event["event_id"].as_str().unwrap().to_owned());
            }
            batches.push(ids);
        }
        seen[0].body.clone()
    };
    // Batches may land in any order, but each is cut in arrival order, and together they
    // hold every event once.
    let position = |id: &String| (0..7).position(|i| fx.id(i) == *id).unwrap();
    batches.sort_by_key(|ids| position(&ids[0]));
    assert_eq!(
        batches.concat(),
        (0..7).map(|i| fx.id(i)).collect::<Vec<_>>(),
        "arrival order within and across batches"
    );
    assert_eq!(
        first_batch["events"][1]["user_hash"],
        wire::user_hash(&fx.identity.install_id, 1)
    );

    let meta = fx.meta().await;
    assert!(meta.last_success_ms.is_some() && !meta.last_run_failed);
    // Nothing left: the next run sends nothing.
    let again = fx.engine.run_once().await;
    assert_eq!((again.batches, again.error), (0, None));
    assert_eq!(stub.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_first_batch_alone_several_batches_are_in_flight() {
    use std::sync::atomic::AtomicUsize;
    // A backend that answers the first batch at once and holds each later one until
    // `in_flight(1)` are waiting (or a deadline passes), noting how many were in flight as each
    // arrived.
    let holding = Arc::new(AtomicUsize::new(0));
    let arrivals = Arc::new(StdMutex::new(Vec::new()));
    let released = Arc::new(AtomicBool::new(false));
    let (state_in_flight, state_arrivals) = (Arc::clone(&holding), Arc::clone(&arrivals));
    let app = axum::Router::new().route(
        "/api/usage/event",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let (holding, arrivals) = (Arc::clone(&state_in_flight), Arc::clone(&state_arrivals));
            let released = Arc::clone(&released);
            async move {
                let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                let first = {
                    let mut arrivals = arrivals.lock().unwrap();
                    arrivals.push(now);
                    arrivals.len() == 1
                };
                let deadline = Instant::now() + Duration::from_secs(5);
                if now == in_flight(1) {
                    released.store(true, Ordering::SeqCst);
                }
                while !first && !released.load(Ordering::SeqCst) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let raw = if headers.get("content-encoding").is_some_and(|v| v == "gzip") {
                    wire::gunzip(&body, 10 << 20).unwrap()
                } else {
                    body.to_vec()
                };
                let batch: Value = serde_json::from_slice(&raw).unwrap();
                let answer = accept_all_but(&batch, &[]);
                holding.fetch_sub(1, Ordering::SeqCst);
                answer
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let n = 1 + in_flight(1) as u64;
    let fx = Fixture::new(&url, "batch_size = 1", n).await;
    let report = fx.engine.run_once().await;
    assert_eq!((report.error, report.accepted), (None, n));
    assert_eq!(fx.counts().await.synced, n);
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), n as usize, "{arrivals:?}");
    assert_eq!(arrivals[0], 1, "the first batch goes alone");
    assert_eq!(
        arrivals.iter().max(),
        Some(&in_flight(1)),
        "then {} batches are on the wire at once: {arrivals:?}",
        in_flight(1)
    );
}

#[tokio::test]
async fn a_refused_batch_is_bisected_down_to_the_bad_event() {
    let fx_bad = std::sync::OnceLock::<String>::new();
    let bad = Arc::new(fx_bad);
    let bad_for_stub = Arc::clone(&bad);
    let stub = Stub::start(move |_, batch| {
        let bad = bad_for_stub.get().unwrap();
        if contains(batch, bad) {
            let body = json!({"error": {"code": "invalid_batch", "message": "events[0].model: unknown", "details": []}});
            (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(body)).into_response()
        } else {
            accept_all_but(batch, &[])
        }
    })
    .await;
    let fx = Fixture::new(&stub.url, "batch_size = 8", 8).await;
    bad.set(fx.id(5)).unwrap();
    let report = fx.engine.run_once().await;
    assert_eq!(
        report.error, None,
        "an isolated bad event does not fail the run"
    );
    assert_eq!((report.sent, report.accepted, report.rejected), (8, 7, 1));
    // 8 -> 4+4 -> (4 ok) 2+2 -> (2 ok) 1+1: 1 + 2 + 2 + 2 requests.
    assert_eq!(stub.requests(), 7);
    let counts = fx.counts().await;
    assert_eq!((counts.synced, counts.failed, counts.pending), (7, 1, 0));
    let reason = fx
        .writer
        .run(|store| store.failure_reason(6))
        .await
        .unwrap();
    assert!(reason.unwrap().contains("events[0].model: unknown"));
    let meta = fx.meta().await;
    assert_eq!(meta.consecutive_failures, 0);
}

#[tokio::test]
async fn per_event_rejects_fail_only_those_events() {
    let reject = Arc::new(std::sync::OnceLock::<String>::new());
    let for_stub = Arc::clone(&reject);
    let stub =
        Stub::start(move |_, batch| accept_all_but(batch, &[for_stub.get().unwrap().clone()]))
            .await;
    let fx = Fixture::new(&stub.url, "", 4).await;
    reject.set(fx.id(2)).unwrap();
    let report = fx.engine.run_once().await;
    assert_eq!(
        (report.error, report.accepted, report.rejected),
        (None, 3, 1)
    );
    let counts = fx.counts().await;
    assert_eq!((counts.synced, counts.failed), (3, 1));
    let reason = fx
        .writer
        .run(|store| store.failure_reason(3))
        .await
        .unwrap();
    assert_eq!(reason.as_deref(), Some("model: not priced here"));
}

#[tokio::test]
async fn too_large_halves_the_batch_size_for_the_rest_of_the_run() {
    let stub = Stub::start(|_, batch| {
        if batch["events"].as_array().unwrap().len() > 2 {
            (StatusCode::PAYLOAD_TOO_LARGE, "too large").into_response()
        } else {
            accept_all_but(batch, &[])
        }
    })
    .await;
    let fx = Fixture::new(&stub.url, "batch_size = 8", 12).await;
    let report = fx.engine.run_once().await;
    assert_eq!((report.error, report.accepted), (None, 12));
    let sizes: Vec<usize> = stub
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.body["events"].as_array().unwrap().len())
        .collect();
    // 8 (413) -> 4 (413) -> 2, 2; the other half and every later batch come in twos.
    assert_eq!(sizes, [8, 4, 2, 2, 2, 2, 2, 2], "{sizes:?}");
}

#[tokio::test]
async fn server_errors_use_every_attempt_with_the_same_batch_id_then_stop() {
    let stub = Stub::start(|_, _| (StatusCode::SERVICE_UNAVAILABLE, "down").into_response()).await;
    let fx = Fixture::new(&stub.url, "max_attempts = 3", 2).await;
    let report = fx.engine.run_once().await;
    let error = report.error.expect("the run failed");
    assert_eq!(error.category, Category::Server);
    assert_eq!(stub.requests(), 3);
    let ids: HashSet<String> = stub
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.headers["webhook-id"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "one batch id for every retry");
    assert_eq!(fx.counts().await.pending, 2);
    let meta = fx.meta().await;
    assert_eq!((meta.consecutive_failures, meta.last_run_failed), (1, true));
    assert_eq!(meta.last_error.unwrap().category, "server");
    let errors = fx
        .writer
        .run(|s| s.sync_error_counts(Utc::now().timestamp_millis()))
        .await
        .unwrap();
    assert_eq!(errors, vec![("server".to_owned(), 3)]);
}

/// A `429` answer asking to wait `seconds`.
fn rate_limited(seconds: &str) -> Response {
    let mut answer = (
        StatusCode::TOO_MANY_REQUESTS,
        axum::Json(
            json!({"error": {"code": "rate_limited", "message": "slow down", "details": []}}),
        ),
    )
        .into_response();
    answer
        .headers_mut()
        .insert("retry-after", seconds.parse().unwrap());
    answer
}

#[tokio::test]
async fn a_rate_limit_pauses_the_run_costs_no_attempt_and_grows_the_batches() {
    let stub = Stub::start(|n, batch| {
        if n == 1 {
            rate_limited("1")
        } else {
            accept_all_but(batch, &[])
        }
    })
    .await;
    // One attempt per batch: the 429 must not spend it.
    let fx = Fixture::new(
        &stub.url,
        "batch_size = 2
max_attempts = 1",
        10,
    )
    .await;
    let started = Instant::now();
    let report = fx.engine.run_once().await;
    assert_eq!((report.error, report.accepted), (None, 10));
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "the run went on before Retry-After: 1 had passed"
    );
    let (sizes, ids): (Vec<usize>, Vec<Value>) = stub
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| {
            let events = s.body["events"].as_array().unwrap().len();
            (events, s.body["batch_id"].clone())
        })
        .unzip();
    // The refused batch of 2 again, then batches of 4 (doubled by the 429).
    assert_eq!(sizes[..2], [2, 2], "{sizes:?}");
    assert_eq!(ids[0], ids[1], "the same batch went again");
    let mut rest = sizes[2..].to_vec();
    rest.sort_unstable();
    assert_eq!(rest, [4, 4], "{sizes:?}");
    let progress = fx.engine.progress(Utc::now().timestamp_millis());
    assert_eq!((progress.running, progress.batch_size), (false, 4));
    let meta = fx.meta().await;
    assert_eq!(
        (
            meta.consecutive_failures,
            meta.last_run_failed,
            meta.last_run_rate_limited
        ),
        (0, false, false)
    );
}

#[tokio::test]
async fn a_retry_after_past_the_run_budget_stops_the_run_without_failing_it() {
    let stub = Stub::start(|_, _| rate_limited("120")).await;
    let fx = Fixture::new(
        &stub.url,
        "interval_secs = 2
max_attempts = 3",
        4,
    )
    .await;
    let started = Instant::now();
    let report = fx.engine.run_once().await;
    let error = report.error.expect("the run stopped");
    assert_eq!(error.category, Category::RateLimit);
    assert!(error.message.contains("time budget"), "{}", error.message);
    assert!(started.elapsed() < Duration::from_secs(2), "the run waited");
    assert_eq!(stub.requests(), 1);
    assert_eq!(fx.counts().await.pending, 4);
    let meta = fx.meta().await;
    assert_eq!(
        (
            meta.consecutive_failures,
            meta.last_run_failed,
            meta.last_run_rate_limited
        ),
        (0, false, true)
    );
    assert_eq!(meta.last_error, None, "a paced run is not a failed one");
    let now_ms = Utc::now().timestamp_millis();
    let until = fx.engine.progress(now_ms).rate_limited_until_ms.unwrap();
    assert!(
        (100_000..=121_000).contains(&(until - now_ms)),
        "{}",
        until - now_ms
    );
    // The next run honours the wait it was told without asking again.
    let again = fx.engine.run_once().await;
    assert_eq!(again.error.unwrap().category, Category::RateLimit);
    assert_eq!(stub.requests(), 1);
    assert_eq!(fx.meta().await.consecutive_failures, 0);
}

#[tokio::test]
async fn an_answer_that_does_not_account_for_every_event_marks_nothing() {
    let stub = Stub::start(|_, batch| {
        axum::Json(
            json!({"batch_id": batch["batch_id"], "accepted": 1, "duplicates": 0, "rejected": []}),
        )
        .into_response()
    })
    .await;
    let fx = Fixture::new(&stub.url, "max_attempts = 1", 3).await;
    let report = fx.engine.run_once().await;
    assert_eq!(report.error.unwrap().category, Category::Server);
    assert_eq!(fx.counts().await.pending, 3);
}

#[test]
fn full_jitter_stays_within_the_delay() {
    let delay = Duration::from_millis(1000);
    let waits: Vec<Duration> = (0..200).map(|_| full_jitter(delay)).collect();
    assert!(waits.iter().all(|w| *w <= delay));
    assert!(waits.iter().any(|w| *w < delay / 2) && waits.iter().any(|w| *w > delay / 2));
}

#[test]
fn a_large_backlog_starts_with_larger_batches() {
    let cases: [(usize, u64, usize); 8] = [
        (50, 0, 50),
        (50, 5_000, 50),
        (50, 5_001, 51),
        (50, 20_000, 200),
        (50, 200_000, 1000),
        (1000, 10, 1000),
        (0, 0, 1),
        (5000, 0, 1000),
    ];
    for (configured, backlog, expected) in cases {
        assert_eq!(
            start_batch_size(configured, backlog),
            expected,
            "batch_size {configured}, backlog {backlog}"
        );
    }
}

#[test]
fn a_run_waits_out_rate_limits_only_while_it_can_end_before_the_next_run() {
    let sync = |interval: u64, timeout: u64| SyncConfig {
        interval_secs: interval,
        request_timeout_secs: timeout,
        ..SyncConfig::default()
    };
    // The defaults: the last request after a wait ends before the next run is due.
    assert_eq!(run_budget(&sync(300, 30)), Duration::from_secs(270));
    assert_eq!(run_budget(&sync(60, 50)), Duration::from_secs(30));
    assert_eq!(run_budget(&sync(2, 30)), Duration::from_secs(1));
    assert_eq!(run_budget(&sync(3600, 30)), MAX_RUN_BUDGET);
}

#[test]
fn big_batches_get_fewer_lanes() {
    assert_eq!(in_flight(1), MAX_IN_FLIGHT);
    assert_eq!(in_flight(50), MAX_IN_FLIGHT);
    assert_eq!(in_flight(1000), 4);
    assert_eq!(in_flight(wire::MAX_BATCH_EVENTS), 4);
    assert_eq!(in_flight(10_000), 2);
}

#[test]
fn kept_user_hashes_are_each_installs_own_and_bounded() {
    let mut hashes = UserHashes::default();
    for user in 0..(USER_HASHES_KEPT as u64 + 10) {
        assert_eq!(hashes.get("inst", user), wire::user_hash("inst", user));
    }
    assert!(hashes.hashes.len() <= USER_HASHES_KEPT);
    assert_eq!(hashes.get("inst", 3), wire::user_hash("inst", 3));
    assert_eq!(hashes.get("other", 3), wire::user_hash("other", 3));
    assert_eq!(hashes.hashes.len(), 1);
}

#[test]
fn a_part_split_and_sent_again_is_the_batch_of_its_own_events() {
    let mut hashes = UserHashes::default();
    let mut writer = PartWriter::with_capacity(4);
    let events: Vec<Event> = (0..4u64)
        .map(|i| Event {
            event_id: Uuid::new_v4(),
            user_id: i,
            source: Source::Bulk,
            model: ModelName::parse("gpt-4o-mini").unwrap(),
            tokens: Tokens {
                prompt: 10 + i,
                completion: 5,
                cached: i % 2,
                ..Tokens::default()
            },
            origin: None,
            hold_id: None,
            context: (i % 2 == 0).then(|| r#"{"w":1}"#.to_owned()),
            created_at_ms: 1_764_240_000_000 + i as i64,
        })
        .collect();
    for (seq, event) in (1..).zip(&events) {
        let row = PendingRow {
            seq,
            event_id: event.event_id,
            user_id: event.user_id,
            source: event.source,
            model: event.model.as_str(),
            tokens: event.tokens,
            origin: None,
            context: event.context.as_deref(),
            created_at_ms: event.created_at_ms,
        };
        writer.push(&row, "inst", &mut hashes);
    }
    let mut part = writer.finish();
    let whole = part.prepare("inst");
    let expected = |events: &[Event], id: Uuid, json: &[u8]| {
        let sent: Value = serde_json::from_slice(json).unwrap();
        let batch = wire::Batch {
            batch_id: id,
            install_id: "inst".into(),
            sent_at: sent["sent_at"].as_str().unwrap().to_owned(),
            events: events
                .iter()
                .map(|e| wire::WireEvent::from_event(e, "inst"))
                .collect(),
        };
        assert_eq!(json, batch.to_json().as_slice());
    };
    expected(&events, whole.id, &whole.json());
    let mut right = part.split_off(1);
    let left = part.prepare("inst");
    expected(&events[..1], left.id, &left.json());
    let right_batch = right.prepare("inst");
    expected(&events[1..], right_batch.id, &right_batch.json());
    assert_eq!(
        right.events.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    assert_ne!(left.id, right_batch.id);
}
