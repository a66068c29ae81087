//! The database side of a fleet: receiver nodes on PostgreSQL (a throwaway cluster of this
//! test's own) while the database goes away. Agents ingest and sync all along; every event
//! an agent acknowledged must end up stored exactly once, whatever the nodes answered on
//! the way, and the receiver's summaries must equal the sums of its raw events (nothing
//! half-stored).

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::common::{
    TestInstall, TestReceiver, batch_body, enroll, open_postgres, receiver_settings, signed,
};
use crate::harness::Agent;
use crate::proxy::{Fault, FaultProxy};
use crate::support::{
    Ledger, Rng, call, enrolled_agent, install_id, post_events, random_event, seed, socket_client,
    start, sync_table, verify,
};
use usage_protocol::signing::{
    HEADER_ID, HEADER_INSTALL_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, sign,
};
use usage_testkit::throwaway::{ClusterOptions, Durability, ThrowawayCluster};

/// How long PostgreSQL stays down (`FAULT_DATABASE_DOWN_SECS` overrides the 30 s).
fn outage() -> Duration {
    let secs = std::env::var("FAULT_DATABASE_DOWN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// The name of the database a throwaway cluster's URL names.
fn database_name(url: &str) -> String {
    url.split_once("@localhost/")
        .and_then(|(_, rest)| rest.split('?').next())
        .expect("a throwaway cluster's URL")
        .to_owned()
}

/// An agent enrolled with one node, ingesting in the background.
struct Site {
    _agent: Agent,
    install: String,
    client: reqwest::Client,
    ledger: Arc<Mutex<Ledger>>,
}

impl Site {
    async fn start(node: &TestReceiver) -> Site {
        let tables = sync_table(
            &node.url(""),
            "interval_secs = 1\nbatch_size = 10\nmax_attempts = 2\nrequest_timeout_secs = 10",
        );
        let mut agent = enrolled_agent("", &tables, &node.url(""));
        start(&mut agent).await;
        Site {
            install: install_id(&agent),
            client: socket_client(&agent),
            _agent: agent,
            ledger: Arc::new(Mutex::new(Ledger::default())),
        }
    }

    /// Posts a few events every 50 ms until `stop` is set; the ledger notes each answer.
    fn ingest(
        &self,
        mut rng: Rng,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        let (client, ledger) = (self.client.clone(), self.ledger.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let events: Vec<Value> = (0..rng.range(1, 6))
                    .map(|_| {
                        let user = rng.range(1, 11);
                        random_event(&mut rng, user, (0, 3))
                    })
                    .collect();
                let acked = matches!(post_events(&client, &events).await, Ok(Some(_)));
                ledger.lock().await.note(&events, acked);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }

    /// Events the receiver at `node` holds for this site, by the provider API.
    async fn received(&self, node: &TestReceiver) -> usize {
        crate::support::receiver_events(&node.url(""), &self.install, "")
            .await
            .len()
    }
}

/// Polls `/health` of `node` until it answers `status`; its body.
async fn health_becomes(node: &TestReceiver, status: StatusCode, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(answer) = reqwest::get(node.url("/health")).await
            && answer.status() == status
        {
            return answer.json().await.unwrap_or(Value::Null);
        }
        assert!(
            Instant::now() < deadline,
            "{} did not answer /health with {status}",
            node.url("")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A signed batch of one event for `install` to `node`: the answer's status and body.
async fn direct_batch(node: &TestReceiver, install: &TestInstall) -> (StatusCode, Value, bool) {
    let batch_id = Uuid::now_v7();
    let event = json!({
        "event_id": Uuid::now_v7(),
        "user_hash": "ab".repeat(32),
        "source": "inline",
        "model": "m",
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "total_tokens": 2,
        "created_at": usage_protocol::event::format_millis(chrono::Utc::now().timestamp_millis()),
    });
    let body = batch_body(batch_id, &install.id, &[event]);
    let answer = signed(node, install, batch_id, &body)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("the node answers");
    let status = answer.status();
    let retry_after = answer.headers().contains_key("retry-after");
    (
        status,
        answer.json().await.unwrap_or(Value::Null),
        retry_after,
    )
}

/// What a client sending signed batches straight to a node was told.
#[derive(Default)]
struct DirectLedger {
    /// Events of batches answered `200`.
    acked: std::collections::HashSet<String>,
    /// Batches sent again after an answer other than `200` (or none).
    resent: u64,
    /// Of those, events the node answered as duplicates: stored by an attempt whose
    /// answer never came back whole.
    duplicates: u64,
}

/// Sends batches of 20 events for `install` to `node` back to back until `stop`, each
/// sent again until it is answered `200`, as an agent would: keeps the node's database
/// connections busy, so a cut meets a transaction in flight.
fn send_directly(
    node_url: String,
    install: Arc<TestInstall>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<DirectLedger> {
    tokio::spawn(async move {
        let mut ledger = DirectLedger::default();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let events: Vec<Value> = (0..20).map(|_| direct_event()).collect();
            let batch_id = Uuid::now_v7();
            let body = batch_body(batch_id, &install.id, &events);
            let mut attempts = 0u32;
            loop {
                attempts += 1;
                let timestamp = chrono::Utc::now().timestamp();
                let id = batch_id.to_string();
                let answer = client
                    .post(format!("{node_url}/api/usage/event"))
                    .header("content-type", "application/json")
                    .header(HEADER_ID, &id)
                    .header(HEADER_TIMESTAMP, timestamp.to_string())
                    .header(
                        HEADER_SIGNATURE,
                        sign(&install.secret, &id, timestamp, &body),
                    )
                    .header(HEADER_INSTALL_ID, &install.id)
                    .body(body.clone())
                    .send()
                    .await;
                if let Ok(answer) = answer
                    && answer.status() == StatusCode::OK
                {
                    let counts: Value = answer.json().await.expect("a JSON answer");
                    if attempts > 1 {
                        ledger.resent += 1;
                        ledger.duplicates += counts["duplicates"].as_u64().unwrap_or(0);
                    }
                    ledger.acked.extend(
                        events
                            .iter()
                            .map(|event| event["event_id"].as_str().unwrap().to_owned()),
                    );
                    break;
                }
                assert!(attempts < 200, "a batch was never stored");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        ledger
    })
}

fn direct_event() -> Value {
    json!({
        "event_id": Uuid::now_v7(),
        "user_hash": "ab".repeat(32),
        "source": "inline",
        "model": "m",
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "created_at": usage_protocol::event::format_millis(chrono::Utc::now().timestamp_millis() - 1000),
    })
}

/// Every event of `ledger` is stored at `node` exactly once, nothing else is, and the
/// summary's totals count each once.
async fn check_direct(node: &TestReceiver, install: &TestInstall, ledger: &DirectLedger) {
    let stored = crate::support::receiver_events(&node.url(""), &install.id, "").await;
    let mut ids = std::collections::HashSet::new();
    for event in &stored {
        let id = event["event_id"].as_str().expect("event_id").to_owned();
        assert!(ids.insert(id.clone()), "event {id} stored twice");
        assert!(
            ledger.acked.contains(&id),
            "event {id} stored but never acknowledged"
        );
    }
    assert_eq!(ids.len(), ledger.acked.len(), "acknowledged events missing");
    let total = crate::support::receiver_total(&node.url(""), &install.id).await;
    assert_eq!(
        total as usize,
        ids.len(),
        "the summary counts what is stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_30_s_mid_ingest_through_two_nodes_loses_nothing_and_counts_nothing_twice()
 {
    let _alone = crate::support::EXCLUSIVE.lock().await;
    let mut rng = Rng::new(seed(
        "postgres_down_for_30_s_mid_ingest_through_two_nodes_loses_nothing_and_counts_nothing_twice",
    ));
    let cluster =
        Arc::new(ThrowawayCluster::start(Durability::Fast).expect("a PostgreSQL cluster"));
    let url = cluster.new_database().expect("a database");
    let nodes = [
        TestReceiver::serve(
            receiver_settings(),
            open_postgres(&url),
            tempfile::tempdir().unwrap(),
        ),
        TestReceiver::serve(
            receiver_settings(),
            open_postgres(&url),
            tempfile::tempdir().unwrap(),
        ),
    ];
    let sites = [Site::start(&nodes[0]).await, Site::start(&nodes[1]).await];
    let probe = TestInstall::new();
    enroll(&nodes[0], &probe).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ingest: Vec<_> = sites
        .iter()
        .map(|site| site.ingest(rng.fork(), stop.clone()))
        .collect();
    // Ingest and the agents' scheduled syncs run for a while before the database goes.
    for (site, node) in sites.iter().zip(&nodes) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while site.received(node).await < 20 {
            assert!(
                Instant::now() < deadline,
                "no sync reached {}",
                node.url("")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let down_at = Instant::now();
    let stopping = cluster.clone();
    tokio::task::spawn_blocking(move || stopping.stop_server())
        .await
        .unwrap()
        .expect("stop PostgreSQL");
    // Meanwhile every node says so: /health, a batch and a provider view answer 503.
    for node in &nodes {
        let health = health_becomes(
            node,
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(20),
        )
        .await;
        crate::shared::assert_error_shape(&health, "store_unavailable");
        let (status, body, retry_after) = direct_batch(node, &probe).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(retry_after, "a 503 for a batch says when to retry");
        let view = reqwest::Client::new()
            .get(node.url("/api/usage/summary"))
            .basic_auth(
                crate::common::PROVIDER_USER,
                Some(crate::common::PROVIDER_PASSWORD),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(view.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    // The agents keep acknowledging events; their syncs fail and keep them pending.
    for site in &sites {
        let (code, report) = call(&site.client, Method::POST, "/v1/sync", Some(&json!({})))
            .await
            .unwrap();
        assert_eq!(code, StatusCode::OK, "{report}");
        assert!(
            !report["error"].is_null(),
            "a sync with the database down: {report}"
        );
    }
    tokio::time::sleep(outage().saturating_sub(down_at.elapsed())).await;
    let acked_during: usize = {
        let mut acked = 0;
        for site in &sites {
            acked += site.ledger.lock().await.acked();
        }
        acked
    };

    let starting = cluster.clone();
    tokio::task::spawn_blocking(move || starting.start_server())
        .await
        .unwrap()
        .expect("start PostgreSQL again");
    eprintln!(
        "PostgreSQL was down {:.1} s; {acked_during} events acknowledged by the agents so far",
        down_at.elapsed().as_secs_f64()
    );
    // The nodes serve again without a restart.
    for node in &nodes {
        let health = health_becomes(node, StatusCode::OK, Duration::from_secs(30)).await;
        assert_eq!(health["store"], "postgres", "{health}");
        let (status, body, _) = direct_batch(node, &probe).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    // A little more ingest after the restart, then every acknowledged event, once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in ingest {
        task.await.unwrap();
    }
    for (site, node) in sites.iter().zip(&nodes) {
        let ledger = site.ledger.lock().await;
        // Through the other node: both read the one database.
        let other = if std::ptr::eq(node, &nodes[0]) {
            &nodes[1]
        } else {
            &nodes[0]
        };
        let seen = verify(&site.client, &other.url(""), &site.install, &ledger, &[]).await;
        assert_eq!(seen.received_events, ledger.acked());
        eprintln!(
            "{}: {} events acknowledged and stored once, {} re-sent that the receiver already had",
            node.url(""),
            seen.received_events,
            seen.duplicates
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_database_connections_are_cut_mid_transaction_stores_each_event_once() {
    let _alone = crate::support::EXCLUSIVE.lock().await;
    let mut rng = Rng::new(seed(
        "a_node_whose_database_connections_are_cut_mid_transaction_stores_each_event_once",
    ));
    let options = ClusterOptions {
        tcp: true,
        tls: None,
    };
    let cluster =
        ThrowawayCluster::start_with(Durability::Fast, options).expect("a PostgreSQL cluster");
    let name = database_name(&cluster.new_database().expect("a database"));
    let proxy = FaultProxy::start(
        format!("127.0.0.1:{}", cluster.port())
            .parse()
            .expect("an address"),
    );
    let url = format!(
        "postgres://usage_agent@{}/{name}?sslmode=disable",
        proxy.addr
    );
    let node = TestReceiver::serve(
        receiver_settings(),
        open_postgres(&url),
        tempfile::tempdir().unwrap(),
    );
    let site = Site::start(&node).await;
    let direct = Arc::new(TestInstall::new());
    enroll(&node, &direct).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ingest = site.ingest(rng.fork(), stop.clone());
    let sender = send_directly(node.url(""), direct.clone(), stop.clone());

    // Rounds of: a clean stretch, then every connection cut at its next request (the
    // statement or the commit never arrives whole) or at its next answer (the database
    // may have committed what the node never hears of).
    let rounds = 12;
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(rng.range(300, 1200))).await;
        let fault = if round % 2 == 0 {
            Fault::ResetUpstreamAfter(0)
        } else {
            Fault::ResetDownstreamAfter(0)
        };
        proxy.set(fault);
        tokio::time::sleep(Duration::from_millis(rng.range(50, 400))).await;
        proxy.set(Fault::None);
    }
    eprintln!(
        "{} connections to PostgreSQL cut in {rounds} rounds",
        proxy.resets()
    );
    assert!(
        proxy.resets() >= rounds / 2,
        "the cuts met connections in use"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    ingest.await.unwrap();
    let sent = sender.await.unwrap();
    let health = health_becomes(&node, StatusCode::OK, Duration::from_secs(30)).await;
    assert_eq!(health["store"], "postgres", "{health}");
    check_direct(&node, &direct, &sent).await;
    eprintln!(
        "direct batches: {} events acknowledged and stored once; {} batches sent again, {} of their events already stored by an attempt whose answer was lost",
        sent.acked.len(),
        sent.resent,
        sent.duplicates
    );
    assert!(sent.resent > 0, "no cut met a batch in flight");
    let ledger = site.ledger.lock().await;
    let seen = verify(&site.client, &node.url(""), &site.install, &ledger, &[]).await;
    assert_eq!(seen.received_events, ledger.acked());
    eprintln!(
        "{} events acknowledged and stored once, {} re-sent that the receiver already had",
        seen.received_events, seen.duplicates
    );
}
