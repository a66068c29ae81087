//! Several receiver nodes on one PostgreSQL database: the same batches sent to two nodes at
//! once count once, a change made through one node holds on the other at once, the rate
//! limit is shared, migrations run once however many nodes start together, and a node
//! killed with -9 mid-ingest loses nothing it acknowledged.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use usage_protocol::event::format_millis;
use usage_protocol::signing::{
    HEADER_ID, HEADER_INSTALL_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, sign,
};
use usage_protocol::wire::user_hash;
use usage_receiver::ReceiverStoreError;
use usage_testkit::throwaway::{Durability, ThrowawayCluster};

use crate::bin;
use crate::common::{
    ENROLL_TOKEN, PROVIDER_PASSWORD, PROVIDER_USER, TestInstall, TestReceiver, batch_body, client,
    enroll, open_postgres, provider_request, receiver_settings, signed, test_cluster,
};
use crate::support::{assert_error_shape, wait_with_deadline};

/// Two receiver nodes serving one fresh database.
fn two_nodes(settings: usage_receiver::ReceiverSettings) -> (TestReceiver, TestReceiver) {
    let url = test_cluster().new_database().unwrap();
    let node =
        |settings| TestReceiver::serve(settings, open_postgres(&url), tempfile::tempdir().unwrap());
    (node(settings.clone()), node(settings))
}

fn event(install: &TestInstall, n: u64) -> Value {
    json!({
        "event_id": Uuid::now_v7(),
        "user_hash": user_hash(&install.id, n % 3),
        "source": "bulk",
        "model": "gpt-4o-mini",
        "prompt_tokens": 100 + n,
        "completion_tokens": 20,
        "total_tokens": 120 + n,
        "created_at": format_millis(Utc::now().timestamp_millis() - 1000),
    })
}

/// A signed batch, ready to send to any node.
struct Batch {
    id: Uuid,
    body: Vec<u8>,
    events: usize,
}

fn batch(install: &TestInstall, events: &[Value]) -> Batch {
    let id = Uuid::now_v7();
    Batch {
        id,
        body: batch_body(id, &install.id, events),
        events: events.len(),
    }
}

/// Sends `batch` to the node at `base`; the answer, or `None` if the node did not give one.
async fn send(base: &str, install: &TestInstall, batch: &Batch) -> Option<(StatusCode, Value)> {
    let id = batch.id.to_string();
    let timestamp = Utc::now().timestamp();
    let response = client()
        .post(format!("{base}/api/usage/event"))
        .header("content-type", "application/json")
        .header(HEADER_ID, &id)
        .header(HEADER_TIMESTAMP, timestamp.to_string())
        .header(
            HEADER_SIGNATURE,
            sign(&install.secret, &id, timestamp, &batch.body),
        )
        .header(HEADER_INSTALL_ID, &install.id)
        .timeout(Duration::from_secs(20))
        .body(batch.body.clone())
        .send()
        .await
        .ok()?;
    let status = response.status();
    Some((status, response.json().await.ok()?))
}

async fn provider_json(base: &str, path: &str) -> Value {
    let response = client()
        .get(format!("{base}{path}"))
        .basic_auth(PROVIDER_USER, Some(PROVIDER_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    response.json().await.unwrap()
}

async fn stored_events(base: &str) -> u64 {
    provider_json(base, "/api/usage/summary").await["totals"]["events"]
        .as_u64()
        .unwrap()
}

/// The database name of a test cluster URL.
fn database_name(url: &str) -> &str {
    url.split('/').nth(3).unwrap().split('?').next().unwrap()
}

fn base(rx: &TestReceiver) -> String {
    rx.url("")
}

#[tokio::test]
async fn the_same_batches_sent_to_two_nodes_at_once_count_each_event_once() {
    let (a, b) = two_nodes(receiver_settings());
    let install = TestInstall::new();
    enroll(&a, &install).await;
    let batches: Vec<Batch> = (0..20)
        .map(|n| {
            batch(
                &install,
                &(0..50)
                    .map(|e| event(&install, n * 50 + e))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let (base_a, base_b) = (base(&a), base(&b));
    let answers = futures_util::future::join_all(batches.iter().flat_map(|batch| {
        [
            send(&base_a, &install, batch),
            send(&base_b, &install, batch),
        ]
    }))
    .await;
    let mut accepted = 0;
    let mut duplicates = 0;
    for answer in answers {
        let (status, body) = answer.expect("every node answers");
        assert_eq!(status, StatusCode::OK, "{body}");
        accepted += body["accepted"].as_u64().unwrap();
        duplicates += body["duplicates"].as_u64().unwrap();
    }
    assert_eq!(accepted, 1000, "each event accepted by exactly one node");
    assert_eq!(duplicates, 1000, "and counted as a duplicate by the other");
    assert_eq!(stored_events(&base_a).await, 1000);
    assert_eq!(stored_events(&base_b).await, 1000);
    // The rollup behind the installations view agrees.
    let view = provider_json(&base_b, "/api/usage/installations").await;
    assert_eq!(view["installations"][0]["events_30d"], 1000);
}

#[tokio::test]
async fn an_erasure_a_plan_or_a_label_change_through_one_node_holds_on_the_other_at_once() {
    let (a, b) = two_nodes(receiver_settings());
    let install = TestInstall::new();
    enroll(&a, &install).await;
    let first = batch(&install, &[event(&install, 1)]);
    let (status, _) = send(&base(&b), &install, &first).await.unwrap();
    assert_eq!(status, StatusCode::OK);

    let plan = provider_request(
        &a,
        Method::PUT,
        &format!("/api/installations/{}/plan", install.id),
    )
    .json(&json!({"plan": "agency"}))
    .send()
    .await
    .unwrap();
    assert_eq!(plan.status(), StatusCode::OK);
    let view = provider_json(&base(&b), "/api/usage/installations").await;
    assert_eq!(view["installations"][0]["plan"], "agency");
    let label = provider_request(
        &a,
        Method::PUT,
        &format!("/api/installations/{}/label", install.id),
    )
    .json(&json!({"label": "Fleet shop"}))
    .send()
    .await
    .unwrap();
    assert_eq!(label.status(), StatusCode::OK);
    let view = provider_json(&base(&b), "/api/usage/installations").await;
    assert_eq!(view["installations"][0]["label"], "Fleet shop");

    let erased = provider_request(
        &a,
        Method::DELETE,
        &format!("/api/installations/{}", install.id),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(erased.status(), StatusCode::OK);
    // Node b, which served this install a moment ago, refuses its next batch.
    let (status, body) = send(&base(&b), &install, &batch(&install, &[event(&install, 2)]))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_error_shape(&body, "unknown_install");
    assert_eq!(stored_events(&base(&b)).await, 0);
    // Re-enrolled through b, the install starts empty on a as well.
    enroll(&b, &install).await;
    let (status, _) = send(&base(&a), &install, &first).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored_events(&base(&a)).await, 1);
    // Erasure took the label too.
    let view = provider_json(&base(&a), "/api/usage/installations").await;
    assert_eq!(view["installations"][0]["label"], Value::Null);
}

#[tokio::test]
async fn the_rate_limit_counts_the_requests_of_every_node() {
    let settings = usage_receiver::ReceiverSettings {
        rate_limit_per_min: 4,
        ..receiver_settings()
    };
    let (a, b) = two_nodes(settings);
    let install = TestInstall::new();
    enroll(&a, &install).await;
    // Four requests through either node use up the install's minute; the fifth is refused
    // by whichever node gets it.
    for (node, allowed) in [
        (&a, true),
        (&b, true),
        (&a, true),
        (&b, true),
        (&a, false),
        (&b, false),
    ] {
        let one = batch(&install, &[event(&install, 0)]);
        let (status, body) = send(&base(node), &install, &one).await.unwrap();
        if allowed {
            assert_eq!(status, StatusCode::OK, "{body}");
        } else {
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
            assert_error_shape(&body, "rate_limited");
        }
    }
    assert_eq!(stored_events(&base(&b)).await, 4);
}

/// The cap on models per install and day holds over the nodes together, each model
/// counted once whichever node stored it.
#[tokio::test]
async fn the_cap_on_models_a_day_counts_the_models_stored_through_every_node() {
    let (a, b) = two_nodes(receiver_settings());
    let install = TestInstall::new();
    enroll(&a, &install).await;
    let of_model = |model: String| {
        let mut event = event(&install, 0);
        event["model"] = model.into();
        event
    };
    let cap = usage_receiver::store::model_cap::MAX_MODELS_PER_DAY;
    // All but one model of the day through the first node, and one through the second,
    // whose node has not seen the first node's.
    let first: Vec<Value> = (1..cap).map(|n| of_model(format!("m{n}"))).collect();
    let (status, body) = send(&base(&a), &install, &batch(&install, &first))
        .await
        .unwrap();
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (StatusCode::OK, Some(cap as u64 - 1))
    );
    let last = [of_model("m0".into())];
    let (_, body) = send(&base(&b), &install, &batch(&install, &last))
        .await
        .unwrap();
    assert_eq!(body["accepted"], 1, "{body}");
    // The day is full on both nodes: a new model is refused by either, a model stored
    // through the other node is accepted.
    for (node, known) in [(&a, "m0"), (&b, "m1")] {
        let events = [of_model("one-too-many".into()), of_model(known.into())];
        let (_, body) = send(&base(node), &install, &batch(&install, &events))
            .await
            .unwrap();
        assert_eq!(body["accepted"], 1, "{body}");
        assert_eq!(
            body["rejected"][0]["event_id"], events[0]["event_id"],
            "{body}"
        );
        let reason = body["rejected"][0]["reason"].as_str().unwrap();
        assert!(reason.starts_with("model: "), "{reason}");
    }
}

#[test]
fn the_token_kinds_migration_backfills_the_rollup_from_stored_events() {
    // A database at schema 1: a rollup of prompt and completion only, one day of it still
    // backed by raw events and one whose events were dropped.
    let url = test_cluster().new_database().unwrap();
    let name = database_name(&url);
    let schema_1 = include_str!("../../src/store/postgres/migrations/0001_schema.sql");
    test_cluster().psql(name, schema_1).unwrap();
    test_cluster()
        .psql(
            name,
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO schema_migrations (version) VALUES (1);
             INSERT INTO installs (install_id, secret, site_hash, enrolled_at)
                 VALUES ('a', 'x', 's', 0);
             INSERT INTO events SELECT 1, gen_random_uuid(), '\\x00', 0, 'm', p, c, k, w, r,
                 NULL, 86400000 * 5 + n, 0
                 FROM (VALUES (1, 30, 20, 10, 5, 4), (2, 3, 2, 1, 2, 1)) v(n, p, c, k, w, r);
             INSERT INTO daily_usage VALUES (1, 5, 'm', 2, 33, 22), (1, 4, 'm', 9, 90, 90);",
        )
        .unwrap();
    let store = open_postgres(&url);
    let window = usage_receiver::store::UsageWindow {
        today: 10,
        from_30d: 0,
        month_start: 0,
    };
    let report = store.installations(Some("a"), window).unwrap();
    let kinds: Vec<_> = report.installs[0]
        .usage_mtd
        .iter()
        .map(|u| {
            let t = u.tokens;
            (
                u.day,
                [t.prompt, t.completion, t.cached, t.cache_write, t.reasoning],
            )
        })
        .collect();
    // Day 4's events are gone: its new kinds stay 0.
    assert_eq!(kinds, [(4, [90, 90, 0, 0, 0]), (5, [33, 22, 11, 7, 5])]);
}

#[test]
fn migration_5_fills_the_chart_totals_and_refuses_batches_of_older_nodes() {
    // A database at schema 4 with usage on two days, as the previous release left it.
    let url = test_cluster().new_database().unwrap();
    let name = database_name(&url);
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/store/postgres/migrations");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    for file in &files[..4] {
        test_cluster()
            .psql(name, &std::fs::read_to_string(file).unwrap())
            .unwrap();
    }
    test_cluster()
        .psql(
            name,
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO schema_migrations (version) VALUES (1), (2), (3), (4);
             INSERT INTO installs (install_id, secret, site_hash, enrolled_at)
                 VALUES ('a', 'x', 's', 0), ('b', 'x', 's', 0);
             INSERT INTO daily_usage (install, day, model, events, prompt_tokens,
                                      completion_tokens)
                 VALUES (1, 5, 'm', 2, 30, 3), (2, 5, 'n', 1, 1, 1), (1, 6, 'm', 4, 7, 7);",
        )
        .unwrap();

    // A node of this release migrates: the chart's totals start from the rollup.
    let store = open_postgres(&url);
    let window = usage_receiver::store::UsageWindow {
        today: 10,
        from_30d: 0,
        month_start: 0,
    };
    let rates = |_: &str, _: i64| None;
    let prices = usage_receiver::store::PriceList {
        id: 0,
        rates: &rates,
    };
    let daily: Vec<_> = store
        .costed_installations(None, window, prices)
        .unwrap()
        .daily
        .iter()
        .map(|day| (day.day, day.events, day.tokens))
        .collect();
    assert_eq!(daily, [(5, 3, 35), (6, 4, 14)]);

    // A node of the previous release, still serving, stores its batches with one statement
    // that also sets the install's last_seen: refused, and nothing of it kept.
    let old_ingest = "WITH stored AS (
             INSERT INTO daily_usage (install, day, model, events, prompt_tokens,
                                      completion_tokens)
             VALUES (1, 7, 'm', 1, 1, 1) RETURNING install
         ), seen AS (UPDATE installs SET last_seen = 1 WHERE id = 1)
         SELECT count(*) FROM stored";
    let refused = test_cluster()
        .psql(name, old_ingest)
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("older than the database schema (5): upgrade it"),
        "{refused}"
    );
    let rows = test_cluster()
        .psql(name, "SELECT count(*) FROM daily_usage WHERE day = 7")
        .unwrap();
    assert_eq!(rows.trim(), "0");
}

#[test]
fn nodes_starting_together_apply_each_migration_once_and_a_newer_schema_is_refused() {
    let url = test_cluster().new_database().unwrap();
    let nodes: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || open_postgres(&url))
        })
        .collect();
    for node in nodes {
        node.join().expect("every node opens the store");
    }
    let name = database_name(&url);
    let applied = test_cluster()
        .psql(
            name,
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let shipped = std::fs::read_dir(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/store/postgres/migrations"
    ))
    .unwrap()
    .count();
    let expected: Vec<String> = (1..=shipped).map(|v| v.to_string()).collect();
    assert_eq!(applied, expected.join(","), "each shipped migration once");

    // A node of an older build meets a schema a newer one migrated.
    test_cluster()
        .psql(name, "INSERT INTO schema_migrations (version) VALUES (99)")
        .unwrap();
    let output = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &url])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("version 99, newer than this receiver knows"),
        "{stderr}"
    );
    let refused = std::thread::spawn(move || {
        usage_receiver::open_postgres(
            &url,
            tokio::runtime::Runtime::new().unwrap().handle().clone(),
        )
        .err()
    })
    .join()
    .unwrap();
    assert!(
        matches!(
            refused,
            Some(ReceiverStoreError::SchemaTooNew { found: 99, known })
                if known == shipped as i64
        ),
        "{refused:?}"
    );
}

#[test]
fn giving_both_a_sqlite_path_and_a_database_url_is_a_usage_error() {
    let output = Command::new(bin())
        .args([
            "serve",
            "--db",
            "x.db",
            "--database-url",
            "postgres://u@h/d",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--database-url"), "{stderr}");
}

#[test]
fn an_unreachable_database_stops_the_start_with_a_clear_error_and_no_password() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "postgres://someone:hunter2@localhost/db?host={}&port=5999",
        dir.path().display()
    );
    let output = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("could not connect"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[tokio::test]
async fn health_names_the_store_and_answers_503_while_the_database_is_down() {
    // A cluster of this test's own, stopped under the running node.
    let cluster = tokio::task::spawn_blocking(|| ThrowawayCluster::start(Durability::Fast))
        .await
        .unwrap()
        .unwrap();
    let url = cluster.url("postgres");
    let rx = TestReceiver::serve(
        receiver_settings(),
        open_postgres(&url),
        tempfile::tempdir().unwrap(),
    );
    let health = client().get(rx.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(
        health.json::<Value>().await.unwrap(),
        json!({"status": "ok", "store": "postgres"})
    );
    let install = TestInstall::new();
    enroll(&rx, &install).await;
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
    let down = client().get(rx.url("/health")).send().await.unwrap();
    assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(down.headers().contains_key("retry-after"));
    assert_error_shape(&down.json().await.unwrap(), "store_unavailable");
    // A batch meanwhile is refused so that the agent keeps it and tries again later.
    let batch = batch(&install, &[event(&install, 1)]);
    let response = signed(&rx, &install, batch.id, &batch.body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    assert_error_shape(&response.json().await.unwrap(), "store_unavailable");
}

/// A receiver process on the shared database; its address read from its first line.
fn spawn_node(url: &str) -> (Child, String) {
    let mut child = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", url])
        .env("ENROLLMENT_TOKEN", ENROLL_TOKEN)
        .env("PROVIDER_USERNAME", PROVIDER_USER)
        .env("PROVIDER_PASSWORD", PROVIDER_PASSWORD)
        .env("RATE_LIMIT_PER_MIN", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let address = crate::support::announced_address(&mut child);
    (child, address)
}

#[tokio::test]
async fn a_node_killed_with_kill_9_mid_ingest_loses_nothing_it_acknowledged() {
    let url = test_cluster().new_database().unwrap();
    let (mut doomed, doomed_base) = spawn_node(&url);
    let (mut survivor, survivor_base) = spawn_node(&url);
    let install = Arc::new(TestInstall::new());
    let enrolled = client()
        .post(format!("{survivor_base}/api/installations"))
        .bearer_auth(ENROLL_TOKEN)
        .json(
            &json!({"install_id": install.id, "secret": install.secret.to_whsec(),
                      "site_hash": "cd".repeat(32)}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(enrolled.status(), StatusCode::CREATED);

    let batches: Arc<Vec<Batch>> = Arc::new(
        (0..200)
            .map(|n| {
                batch(
                    &install,
                    &(0..50)
                        .map(|e| event(&install, n * 50 + e))
                        .collect::<Vec<_>>(),
                )
            })
            .collect(),
    );
    // Eight senders stream batches to the doomed node; it is killed part-way.
    let senders: Vec<_> = (0..8)
        .map(|lane| {
            let (install, batches, target) =
                (install.clone(), batches.clone(), doomed_base.clone());
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for index in (lane..batches.len()).step_by(8) {
                    match send(&target, &install, &batches[index]).await {
                        Some((StatusCode::OK, _)) => acknowledged.push(index),
                        _ => break,
                    }
                }
                acknowledged
            })
        })
        .collect();
    crate::support::poll(
        "some batches stored before the kill",
        Duration::from_secs(30),
        async || (stored_events(&survivor_base).await >= 2_000).then_some(()),
    )
    .await;
    doomed.kill().unwrap();
    let _ = doomed.wait();
    let mut acknowledged = HashSet::new();
    for sender in senders {
        acknowledged.extend(sender.await.unwrap());
    }
    assert!(
        !acknowledged.is_empty() && acknowledged.len() < batches.len(),
        "the kill came mid-ingest ({} of {} acknowledged)",
        acknowledged.len(),
        batches.len()
    );
    // Everything acknowledged is there; what follows is what an agent does: send every
    // batch it has no answer for again, to the node still up.
    let stored_after_kill = stored_events(&survivor_base).await;
    let acknowledged_events: u64 = acknowledged.iter().map(|&i| batches[i].events as u64).sum();
    assert!(stored_after_kill >= acknowledged_events);
    for (index, batch) in batches.iter().enumerate() {
        if !acknowledged.contains(&index) {
            let (status, body) = send(&survivor_base, &install, batch).await.unwrap();
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    }
    assert_eq!(
        stored_events(&survivor_base).await,
        200 * 50,
        "every event exactly once"
    );
    survivor.kill().unwrap();
    wait_with_deadline(&mut survivor, Duration::from_secs(10));
}

#[test]
fn signed_batches_need_the_install_on_the_shared_database() {
    // An install enrolled directly in one node's store is known to another node's store.
    let url = test_cluster().new_database().unwrap();
    let first = open_postgres(&url);
    let second = open_postgres(&url);
    let install = usage_receiver::store::NewInstall {
        install_id: "shared".into(),
        secret: usage_protocol::signing::Secret::generate(),
        site_hash: "s".into(),
        enrolled_at_ms: 0,
    };
    first.enroll(&install).unwrap();
    let found = second
        .find_install("shared")
        .unwrap()
        .expect("seen at once");
    assert_eq!(found.secret, install.secret);
}

#[test]
fn raw_events_live_in_day_partitions_made_ahead_and_dropped_whole() {
    use usage_receiver::store::RetainedDays;
    let url = test_cluster().new_database().unwrap();
    let name = database_name(&url).to_owned();
    let store = open_postgres(&url);
    let partitions = || {
        test_cluster()
            .psql(
                &name,
                "SELECT string_agg(c.relname, ' ' ORDER BY c.relname) FROM pg_inherits i
                 JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass",
            )
            .unwrap()
    };
    let day_name = |day: i64| {
        let date = chrono::DateTime::from_timestamp(day * 86_400, 0).unwrap();
        format!("events_{}", date.format("%Y%m%d"))
    };
    let today = Utc::now().timestamp_millis().div_euclid(86_400_000);
    // Opening made the 92 days kept, today, two days ahead, and the default partition.
    let made = partitions();
    assert_eq!(made.split(' ').count(), 92 + 1 + 2 + 1, "{made}");
    for day in [today - 92, today, today + 2] {
        assert!(made.contains(&day_name(day)), "{} in {made}", day_name(day));
    }
    let store_for_maintain = store.clone();
    let deleted = std::thread::spawn(move || {
        store_for_maintain.maintain(RetainedDays {
            first_kept: today - 10,
            today: today + 1,
        })
    })
    .join()
    .unwrap()
    .unwrap();
    assert_eq!(deleted, 0);
    let kept = partitions();
    assert!(!kept.contains(&day_name(today - 11)), "{kept}");
    assert!(kept.contains(&day_name(today - 10)) && kept.contains(&day_name(today + 3)));
    assert_eq!(kept.split(' ').count(), 11 + 3 + 1, "{kept}");
}

#[tokio::test]
async fn two_nodes_record_each_budget_alert_once_and_deliver_it_under_its_one_id() {
    use crate::budgets::{
        Sink, budget_settings, closed_port, put_budget, verified_bodies, webhook,
    };
    let secret = usage_protocol::signing::Secret::generate();
    let sink_addr = closed_port();
    let sink = Sink::default();
    sink.serve(sink_addr).await;
    let (a, b) = two_nodes(usage_receiver::ReceiverSettings {
        alert_webhook: Some(webhook(sink_addr, &secret)),
        ..budget_settings()
    });
    let install = TestInstall::new();
    enroll(&a, &install).await;
    // Set through one node, in force on the other at once. Each event below costs about
    // 0.12 (1.00 per 1000 tokens): ten thresholds crossed over 20 batches of 5 events.
    let (status, _) = put_budget(
        &a,
        &install.id,
        r#"{"monthly": 10.0, "thresholds": [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let batches: Vec<Batch> = (0..20)
        .map(|n| {
            let events: Vec<Value> = (0..5).map(|e| event(&install, n * 5 + e)).collect();
            batch(&install, &events)
        })
        .collect();
    let (base_a, base_b) = (base(&a), base(&b));
    let answers = futures_util::future::join_all(batches.iter().flat_map(|batch| {
        [
            send(&base_a, &install, batch),
            send(&base_b, &install, batch),
        ]
    }))
    .await;
    for answer in answers {
        let (status, body) = answer.expect("every node answers");
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let listed = provider_json(&base_b, "/api/alerts").await["alerts"]
        .as_array()
        .unwrap()
        .clone();
    let mut thresholds: Vec<u64> = listed
        .iter()
        .map(|alert| alert["threshold"].as_u64().unwrap())
        .collect();
    thresholds.sort_unstable();
    assert_eq!(thresholds, vec![10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);

    let ids: HashSet<String> = listed
        .iter()
        .map(|alert| alert["alert_id"].as_str().unwrap().to_owned())
        .collect();
    crate::support::poll(
        "every alert delivered",
        Duration::from_secs(30),
        async || {
            let listed = provider_json(&base_a, "/api/alerts").await;
            listed["alerts"]
                .as_array()
                .unwrap()
                .iter()
                .all(|alert| !alert["delivered_at"].is_null())
                .then_some(())
        },
    )
    .await;
    verified_bodies(&sink, &secret);
    let sent: HashSet<String> = sink.ids().into_iter().collect();
    assert_eq!(sent, ids, "each alert sent, under its own id only");
}

/// Each node keeps the figures of the views it answered; a batch or an erasure through
/// the other node shows in its next view all the same.
#[tokio::test]
async fn a_nodes_views_follow_batches_and_erasures_made_through_the_other_at_once() {
    let (a, b) = two_nodes(receiver_settings());
    let installs: Vec<TestInstall> = (0..6).map(|_| TestInstall::new()).collect();
    for install in &installs {
        enroll(&a, install).await;
        let (status, _) = send(&base(&b), install, &batch(install, &[event(install, 1)]))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    let events_of = |view: &Value, install: &TestInstall| {
        view["installations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["install_id"] == install.id.as_str())
            .map(|row| row["events_30d"].as_u64().unwrap())
    };
    let paths = [
        "/api/usage/installations",
        "/api/usage/installations?period=30d",
    ];
    for path in paths {
        let view = provider_json(&base(&a), path).await;
        let count = |row: &Value| row["events_30d"].as_u64().or(row["events"].as_u64());
        assert!(
            view["installations"]
                .as_array()
                .unwrap()
                .iter()
                .all(|row| count(row) == Some(1)),
            "{view}"
        );
    }

    let grown = &installs[2];
    let more: Vec<Value> = (10..13).map(|n| event(grown, n)).collect();
    let (status, _) = send(&base(&b), grown, &batch(grown, &more)).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let erased = &installs[4];
    let answer = provider_request(
        &b,
        Method::DELETE,
        &format!("/api/installations/{}", erased.id),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);

    let view = provider_json(&base(&a), paths[0]).await;
    assert_eq!(events_of(&view, grown), Some(4));
    assert_eq!(events_of(&view, erased), None);
    assert_eq!(events_of(&view, &installs[0]), Some(1));
    assert_eq!(view, provider_json(&base(&b), paths[0]).await);
    let period = provider_json(&base(&a), paths[1]).await;
    let rows = period["installations"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    let events: u64 = rows.iter().map(|row| row["events"].as_u64().unwrap()).sum();
    assert_eq!(events, 8, "{period}");
}
