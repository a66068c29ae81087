//! What the fault tests share: a seeded random source, an agent enrolled with a test
//! receiver, a ledger of what clients were told, and the check that compares the ledger
//! with what the agent and the receiver hold once a sync has drained the queue.
//!
//! Every check reads from outside: the agent's API (`/v1/status`, `/v1/export`,
//! `/v1/sync`, `/v1/rollup`) and the receiver's provider API (`/api/usage/events`,
//! `/api/usage/summary`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{ENROLL_TOKEN, PROVIDER_PASSWORD, PROVIDER_USER};
use crate::harness::Agent;

pub const DAY_MS: i64 = 86_400_000;

/// A small seeded generator (splitmix64): the same seed replays the same choices.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi` (`hi` excluded).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo < hi);
        lo + self.next_u64() % (hi - lo)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.range(0, 100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.range(0, items.len() as u64) as usize]
    }

    /// A child generator (for a task), so tasks do not share state.
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

/// The seed of a test: `FAULT_SEED` if set, else the clock; printed so a failure can be
/// replayed (`cargo test` shows it with the failure).
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("FAULT_SEED") {
        Ok(text) => text.trim().parse().expect("FAULT_SEED is a whole number"),
        Err(_) => Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64,
    };
    eprintln!(
        "{test}: FAULT_SEED={seed} (replay: FAULT_SEED={seed} cargo test --test faults {test})"
    );
    seed
}

/// The `[sync]` table for `backend`: fast backoff, a short request timeout, and `extra`.
pub fn sync_table(backend: &str, extra: &str) -> String {
    format!(
        "[sync]\nbackend_url = {backend:?}\ninitial_backoff_ms = 20\nmax_backoff_ms = 200\n{extra}\n"
    )
}

/// An agent (not started) configured by `top` and `tables`, enrolled with the receiver at
/// `receiver` (`http://host:port`; enrollment goes straight to it, whatever sits between
/// them later).
pub fn enrolled_agent(top: &str, tables: &str, receiver: &str) -> Agent {
    let agent = Agent::configure_with(top, tables);
    let out = agent.cli(&[
        "init",
        "--site-url",
        "https://example.com",
        "--backend-url",
        receiver,
        "--enroll-token",
        ENROLL_TOKEN,
    ]);
    assert!(
        out.status.success(),
        "enrollment failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent
}

/// Starts the daemon (its log goes to `agent.log` in its temp dir).
pub async fn start(agent: &mut Agent) {
    agent.spawn().await;
}

pub fn install_id(agent: &Agent) -> String {
    let text =
        std::fs::read_to_string(agent.data_dir().join("identity.json")).expect("identity.json");
    let identity: Value = serde_json::from_str(&text).expect("identity.json is JSON");
    identity["install_id"]
        .as_str()
        .expect("install_id")
        .to_owned()
}

/// A client of the agent's socket with its own connection pool, so connections to a
/// killed daemon are never reused against the next one.
pub fn socket_client(agent: &Agent) -> reqwest::Client {
    reqwest::Client::builder()
        .unix_socket(agent.socket.clone())
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("socket client")
}

/// A request to the agent: status and JSON body, or the transport error.
pub async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> reqwest::Result<(StatusCode, Value)> {
    let mut request = client.request(method, format!("http://localhost{path}"));
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await?;
    let status = response.status();
    let text = response.bytes().await?;
    Ok((status, serde_json::from_slice(&text).unwrap_or(Value::Null)))
}

pub fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .expect("a time in range")
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The UTC day (`YYYY-MM-DD`) of an RFC 3339 time (the agent runs in UTC here, as the
/// receiver always does).
pub fn day_of(created_at: &str) -> String {
    let at = DateTime::parse_from_rfc3339(created_at).expect("an RFC 3339 time");
    at.with_timezone(&Utc).format("%Y-%m-%d").to_string()
}

/// Event count and the six token sums, in `/v1/usage` order.
pub type Sums = [u64; 7];
const SUM_FIELDS: [&str; 6] = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
];

fn add_event(sums: &mut Sums, event: &Value) {
    sums[0] += 1;
    for (i, field) in SUM_FIELDS.iter().enumerate() {
        sums[i + 1] += event[*field].as_u64().unwrap_or(0);
    }
}

fn row_sums(row: &Value) -> Sums {
    let mut sums = [0; 7];
    sums[0] = row["events"].as_u64().expect("events");
    for (i, field) in SUM_FIELDS.iter().enumerate() {
        sums[i + 1] = row[*field].as_u64().unwrap_or(0);
    }
    sums
}

/// Summary key: day, user, source, model.
pub type Key = (String, String, String, String);

const MODELS: [&str; 3] = ["gpt-4o-mini", "claude-3.5", "gemini-2.0-flash"];
const SOURCES: [&str; 4] = ["inline", "bulk", "queue", "manual"];

/// A random valid event of `user`, created between `ages.0` and `ages.1` days ago.
pub fn random_event(rng: &mut Rng, user: u64, ages: (u64, u64)) -> Value {
    let prompt = rng.range(1, 5000);
    let completion = rng.range(0, 2000);
    let age = rng.range(ages.0 * DAY_MS as u64, ages.1 * DAY_MS as u64) as i64;
    json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "user_id": user,
        "source": rng.pick(&SOURCES),
        "model": rng.pick(&MODELS),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": rng.range(0, prompt + 1),
        "reasoning_tokens": rng.range(0, completion + 1),
        "context": {"attachment_id": rng.range(1, 1000)},
        "created_at": rfc3339(Utc::now().timestamp_millis() - age),
    })
}

/// One event as a client sent it, and whether the agent acknowledged it.
#[derive(Clone)]
pub struct Sent {
    pub event: Value,
    /// The UTC day of its `created_at`.
    pub day: String,
    pub acked: bool,
}

/// Everything clients sent, what they were told, and what was erased or planted.
#[derive(Default)]
pub struct Ledger {
    pub sent: HashMap<String, Sent>,
    /// Users erased with an answered `DELETE /v1/users/{id}`; nothing is sent for them
    /// afterwards.
    pub erased: HashSet<u64>,
    /// Expected summaries of days planted older than the retention (their raw events may
    /// be purged; their summaries stay).
    pub old_days: BTreeMap<Key, Sums>,
    pub old_ids: HashSet<String>,
}

impl Ledger {
    /// Notes a request's events and whether the agent answered `202`. An id once
    /// acknowledged stays acknowledged (a re-send is answered `duplicate`).
    pub fn note(&mut self, events: &[Value], acked: bool) {
        for event in events {
            let id = event["event_id"].as_str().expect("event_id").to_owned();
            let entry = self.sent.entry(id).or_insert_with(|| Sent {
                event: event.clone(),
                day: day_of(event["created_at"].as_str().expect("created_at")),
                acked: false,
            });
            entry.acked |= acked;
        }
    }

    pub fn acked(&self) -> usize {
        self.sent.values().filter(|s| s.acked).count()
    }
}

/// Posts `events`: a lone event in the one-event form, more as a batch. On `202`,
/// `Some(duplicates)`: how many of them the agent already had.
pub async fn post_events(
    client: &reqwest::Client,
    events: &[Value],
) -> reqwest::Result<Option<u64>> {
    let body = match events {
        [one] => one.clone(),
        _ => json!({"events": events}),
    };
    let (code, answer) = call(client, reqwest::Method::POST, "/v1/events", Some(&body)).await?;
    if code != StatusCode::ACCEPTED {
        return Ok(None);
    }
    if let [one] = events {
        assert_eq!(answer["event_id"], one["event_id"], "{answer}");
        return Ok(Some(u64::from(answer["status"] == "duplicate")));
    }
    let ids = answer["event_ids"].as_array().map_or(0, Vec::len);
    assert_eq!(ids, events.len(), "a 202 names every event: {answer}");
    Ok(Some(answer["duplicates"].as_u64().expect("duplicates")))
}

/// Inserts `count` events of user 900 and model `old-model`, on `day_offset` days ago
/// (older than the retention), straight into the database, already synced: the API
/// refuses events that old, and they stand for data recorded and shipped long ago.
/// Returns the day (`YYYY-MM-DD`).
pub fn plant_old_events(
    agent: &Agent,
    ledger: &mut Ledger,
    day_offset: i64,
    count: usize,
) -> String {
    let mut db = agent.open_db();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let tx = db.transaction().unwrap();
    tx.execute(
        "INSERT INTO models (name) VALUES ('old-model') ON CONFLICT(name) DO NOTHING",
        [],
    )
    .unwrap();
    let model: i64 = tx
        .query_row("SELECT id FROM models WHERE name = 'old-model'", [], |r| {
            r.get(0)
        })
        .unwrap();
    let now = Utc::now().timestamp_millis();
    let day_start = (now / DAY_MS - day_offset) * DAY_MS;
    let mut planted = Vec::with_capacity(count);
    for i in 0..count {
        let id = uuid::Uuid::new_v4();
        let created = day_start + 1000 + i as i64;
        tx.execute(
            "INSERT INTO events (event_id, user_id, source, model_id, prompt_tokens,
                 completion_tokens, created_at)
             VALUES (?1, 900, 1, ?2, 10, 5, ?3)",
            rusqlite::params![id.as_bytes(), model, created],
        )
        .unwrap();
        planted.push(tx.last_insert_rowid());
        ledger.old_ids.insert(id.to_string());
        let key = (
            day_of(&rfc3339(created)),
            "900".to_owned(),
            "bulk".to_owned(),
            "old-model".to_owned(),
        );
        let sums = ledger.old_days.entry(key).or_default();
        add_event(
            sums,
            &json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}),
        );
    }
    // Already synced: one range of acknowledged events covers them (src/store/sync.rs);
    // this transaction held the write lock, so their seqs are consecutive.
    if let (Some(first), Some(last)) = (planted.first(), planted.last()) {
        assert_eq!(
            last - first + 1,
            count as i64,
            "planted seqs are consecutive"
        );
        tx.execute(
            "INSERT INTO synced_ranges (first_seq, last_seq, synced_at) VALUES (?1, ?2, ?3)",
            rusqlite::params![first, last, now],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    day_of(&rfc3339(day_start))
}

/// Runs syncs until nothing is pending (the scheduled runs may take part). Returns the
/// status and how many events the receiver answered as duplicates in those runs.
pub async fn drain(client: &reqwest::Client, within: Duration) -> (Value, u64) {
    let deadline = Instant::now() + within;
    let mut duplicates = 0;
    loop {
        let (code, report) = call(client, reqwest::Method::POST, "/v1/sync", Some(&json!({})))
            .await
            .expect("the agent answers /v1/sync");
        assert_eq!(code, StatusCode::OK, "{report}");
        duplicates += report["duplicates"].as_u64().unwrap_or(0);
        let (_, status) = call(client, reqwest::Method::GET, "/v1/status", None)
            .await
            .expect("the agent answers /v1/status");
        if report["error"].is_null() && status["pending_events"] == 0 {
            return (status, duplicates);
        }
        assert!(
            Instant::now() < deadline,
            "the queue did not drain: {report} {status}"
        );
    }
}

/// Every event of `install` the receiver at `receiver` holds (`query`: more parameters,
/// such as `&from=...&to=...`), through the provider API.
pub async fn receiver_events(receiver: &str, install: &str, query: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("/api/usage/events?install_id={install}&limit=1000{query}");
        if let Some(cursor) = &after {
            url.push_str(&format!("&after={cursor}"));
        }
        let page = provider_get(receiver, &url).await;
        events.extend(page["events"].as_array().expect("events").iter().cloned());
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return events,
        }
    }
}

/// A provider request (basic auth) to the receiver at `receiver`; must answer `200`.
pub async fn provider_get(receiver: &str, path: &str) -> Value {
    let response = reqwest::Client::new()
        .get(format!("{receiver}{path}"))
        .basic_auth(PROVIDER_USER, Some(PROVIDER_PASSWORD))
        .send()
        .await
        .expect("the receiver answers");
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    response.json().await.expect("JSON")
}

/// Events the receiver counts for `install` in its totals.
pub async fn receiver_total(receiver: &str, install: &str) -> u64 {
    let summary = provider_get(
        receiver,
        &format!("/api/usage/summary?install_id={install}"),
    )
    .await;
    summary["totals"]["events"].as_u64().expect("totals.events")
}

/// Reads a JSON export of the agent.
async fn export(client: &reqwest::Client, query: &str) -> Value {
    let (code, body) = call(
        client,
        reqwest::Method::GET,
        &format!("/v1/export?format=json{query}"),
        None,
    )
    .await
    .expect("the agent answers /v1/export");
    assert_eq!(code, StatusCode::OK, "{body}");
    body
}

/// What [`verify`] saw.
pub struct Verified {
    pub local_events: usize,
    pub received_events: usize,
    /// Events the receiver answered as duplicates while the queue was drained: sent
    /// before, but never noted synced by the agent.
    pub duplicates: u64,
}

/// Days to check, both ends included (`YYYY-MM-DD`, UTC); none means everything.
pub type Ranges = [(String, String)];

fn in_ranges(day: &str, ranges: &Ranges) -> bool {
    ranges.is_empty()
        || ranges
            .iter()
            .any(|(from, to)| from.as_str() <= day && day <= to.as_str())
}

/// The query strings that cover `ranges` (one empty string for everything).
fn range_queries(ranges: &Ranges) -> Vec<String> {
    if ranges.is_empty() {
        return vec![String::new()];
    }
    ranges
        .iter()
        .map(|(from, to)| format!("&from={from}&to={to}"))
        .collect()
}

/// Drains the queue, rolls up, and checks the ledger against both sides, on the days of
/// `ranges` (disjoint; empty: every day):
/// - the agent holds every acknowledged event once, none of an erased user, and nothing
///   nobody sent; an unanswered event at most once;
/// - every daily summary equals the sum of its raw events (planted old days: the sums
///   planted, whether or not retention has purged their raw events since);
/// - the receiver holds every event the agent holds exactly once (so every acknowledged
///   event of a user not erased), and nothing else but events of erased users synced
///   before their erasure;
/// - the receiver's summaries equal the sums of its raw events, per day, user, source
///   and model.
pub async fn verify(
    client: &reqwest::Client,
    receiver: &str,
    install: &str,
    ledger: &Ledger,
    ranges: &Ranges,
) -> Verified {
    let (status, duplicates) = drain(client, Duration::from_secs(60)).await;
    assert_eq!(status["failed_events"], 0, "{status}");
    let (code, body) = call(
        client,
        reqwest::Method::POST,
        "/v1/rollup",
        Some(&json!({})),
    )
    .await
    .expect("the agent answers /v1/rollup");
    assert_eq!(code, StatusCode::OK, "{body}");

    // The agent's raw events.
    let mut raw = Vec::new();
    let mut daily = Vec::new();
    let mut received = Vec::new();
    let mut summary_rows = Vec::new();
    let mut summary_total = 0;
    for query in range_queries(ranges) {
        let page = export(client, &query).await;
        raw.extend(page["events"].as_array().expect("export events").clone());
        let page = export(client, &format!("&daily{query}")).await;
        daily.extend(page["rows"].as_array().expect("daily rows").clone());
        received.extend(receiver_events(receiver, install, &query).await);
        let summary = provider_get(
            receiver,
            &format!(
                "/api/usage/summary?install_id={install}&group_by=day,user,source,model{query}"
            ),
        )
        .await;
        summary_total += summary["totals"]["events"].as_u64().expect("totals");
        summary_rows.extend(summary["rows"].as_array().expect("summary rows").clone());
    }

    let mut local: HashMap<&str, &Value> = HashMap::new();
    let mut raw_sums: BTreeMap<Key, Sums> = BTreeMap::new();
    for event in &raw {
        let id = event["event_id"].as_str().expect("event_id");
        assert!(
            local.insert(id, event).is_none(),
            "the agent holds {id} twice"
        );
        let user = event["user_id"].as_u64().expect("user_id");
        if ledger.old_ids.contains(id) {
            continue;
        }
        let sent = ledger
            .sent
            .get(id)
            .unwrap_or_else(|| panic!("the agent holds {id}, which nobody sent: {event}"));
        assert!(
            !ledger.erased.contains(&user),
            "user {user} was erased, yet the agent holds {event}"
        );
        for field in [
            "user_id",
            "prompt_tokens",
            "completion_tokens",
            "created_at",
        ] {
            assert_eq!(event[field], sent.event[field], "{field} of {id}");
        }
        let key = (
            day_of(event["created_at"].as_str().expect("created_at")),
            user.to_string(),
            event["source"].as_str().expect("source").to_owned(),
            event["model"].as_str().expect("model").to_owned(),
        );
        add_event(raw_sums.entry(key).or_default(), event);
    }
    for (id, sent) in &ledger.sent {
        let user = sent.event["user_id"].as_u64().expect("user_id");
        if sent.acked && !ledger.erased.contains(&user) && in_ranges(&sent.day, ranges) {
            assert!(
                local.contains_key(id.as_str()),
                "acknowledged event {id} of user {user} is lost at the agent"
            );
        }
    }

    // Daily summaries against the raw events.
    let mut daily_sums: BTreeMap<Key, Sums> = BTreeMap::new();
    for row in &daily {
        let key = (
            row["day"].as_str().expect("day").to_owned(),
            row["user_id"].as_u64().expect("user_id").to_string(),
            row["source"].as_str().expect("source").to_owned(),
            row["model"].as_str().expect("model").to_owned(),
        );
        daily_sums.insert(key, row_sums(row));
    }
    let mut expected = raw_sums;
    expected.extend(
        ledger
            .old_days
            .iter()
            .filter(|(k, _)| in_ranges(&k.0, ranges))
            .map(|(k, v)| (k.clone(), *v)),
    );
    if daily_sums != expected {
        let differ: Vec<String> = expected
            .keys()
            .chain(daily_sums.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|k| expected.get(*k) != daily_sums.get(*k))
            .take(10)
            .map(|k| {
                format!(
                    "{k:?}: summary {:?}, events {:?}",
                    daily_sums.get(k),
                    expected.get(k)
                )
            })
            .collect();
        panic!("daily summaries differ from their raw events: {differ:#?}");
    }

    // The receiver's raw events against the agent's.
    let mut remote: HashSet<&str> = HashSet::new();
    let mut remote_sums: BTreeMap<Key, [u64; 4]> = BTreeMap::new();
    for event in &received {
        let id = event["event_id"].as_str().expect("event_id");
        assert!(remote.insert(id), "the receiver holds {id} twice");
        let sent = ledger
            .sent
            .get(id)
            .unwrap_or_else(|| panic!("the receiver holds {id}, which nobody sent: {event}"));
        let user = sent.event["user_id"].as_u64().expect("user_id");
        if !ledger.erased.contains(&user) {
            assert!(
                local.contains_key(id),
                "the receiver holds {id} (user {user}), which the agent does not"
            );
        }
        for field in ["prompt_tokens", "completion_tokens", "created_at"] {
            assert_eq!(
                event[field], sent.event[field],
                "{field} of {id} at the receiver"
            );
        }
        let key = (
            day_of(event["created_at"].as_str().expect("created_at")),
            event["user_hash"].as_str().expect("user_hash").to_owned(),
            event["source"].as_str().expect("source").to_owned(),
            event["model"].as_str().expect("model").to_owned(),
        );
        let sums = remote_sums.entry(key).or_default();
        sums[0] += 1;
        sums[1] += event["prompt_tokens"].as_u64().unwrap_or(0);
        sums[2] += event["completion_tokens"].as_u64().unwrap_or(0);
        sums[3] += event["total_tokens"].as_u64().unwrap_or(0);
    }
    for id in local.keys() {
        if !ledger.old_ids.contains(*id) {
            assert!(
                remote.contains(id),
                "{id} is synced at the agent but missing at the receiver"
            );
        }
    }

    // The receiver's summaries against its raw events.
    assert_eq!(
        summary_total,
        received.len() as u64,
        "the receiver's totals count each stored event once"
    );
    let mut summed: BTreeMap<Key, [u64; 4]> = BTreeMap::new();
    for row in &summary_rows {
        let key = (
            row["day"].as_str().expect("day").to_owned(),
            row["user_hash"].as_str().expect("user_hash").to_owned(),
            row["source"].as_str().expect("source").to_owned(),
            row["model"].as_str().expect("model").to_owned(),
        );
        let fields = [
            "events",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
        ];
        summed.insert(key, fields.map(|f| row[f].as_u64().unwrap_or(0)));
    }
    assert!(
        summed == remote_sums,
        "the receiver's summaries differ from its raw events"
    );

    Verified {
        local_events: local.len(),
        received_events: received.len(),
        duplicates,
    }
}

/// Taken by the tests that load the machine (the kill loop) and by those that measure
/// latency, so that the two never overlap; the others run beside either.
pub static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
