//! The fleet phase: two receiver nodes on one PostgreSQL, fed signed, gzipped batches of 50
//! events from thousands of enrolled installs, beside the ceiling of the same rows copied
//! into the same tables and indexes with `COPY` (no HTTP, no checks), and the installations
//! view over 100,000 installs (`--view-installs`), each with a rollup row on each of the
//! last 30 days. Between the two, for the table only: the same batches straight into the
//! store's ingest path, as the nodes call it but without HTTP, and for each of the three
//! the whole machine's busy CPU time per event, which shows where the two cores go.
//!
//! PostgreSQL is a throwaway cluster of loadgen's own (fsync on) unless `--database-url`
//! names a server; loadgen makes its databases there and drops them afterwards.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::Utc;
use deadpool_postgres::tokio_postgres::binary_copy::BinaryCopyInWriter;
use deadpool_postgres::tokio_postgres::types::Type;
use deadpool_postgres::tokio_postgres::{self, Client, NoTls};
use serde_json::{Value, json};
use usage_protocol::event::Source;
use usage_protocol::event::format_millis;
use usage_protocol::signing::{
    HEADER_ID, HEADER_INSTALL_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, Secret, sign,
};
use usage_protocol::wire::{gzip, user_hash};
use usage_receiver::settings::DEFAULT_RATE_LIMIT_PER_MIN;
use usage_receiver::store::postgres::PostgresStore;
use usage_receiver::store::rate_limit::Rate;
use usage_receiver::store::{NewEvent, ReceiverStore};
use usage_testkit::throwaway::{Durability, ThrowawayCluster};
use uuid::Uuid;

use crate::phases::drain::free_port;
use crate::roles::{
    ENROLL_TOKEN, RECEIVER_ROLE, busy_us_per_event, machine_busy_seconds, spawn_self, wait_until,
};

/// Events per batch, as the agent sends by default.
const BATCH_EVENTS: usize = 50;
/// Requests in flight at once by default, spread over the two nodes (`--fleet-in-flight`):
/// thousands of sites send on their own schedules, so a node meets many batches at once.
/// 40 keep both nodes and the database busy on two cores, and let each node's writers
/// store the batches that wait together; 48 were no faster and only waited longer
/// (BENCHMARKS.md, "The fleet receiver on PostgreSQL").
pub(crate) const DEFAULT_IN_FLIGHT: usize = 40;
/// Requests in flight while enrolling, and for the views' batches.
const SETUP_IN_FLIGHT: usize = 16;
const PROVIDER_USER: &str = "loadgen";
const PROVIDER_PASSWORD: &str = "loadgen-password";

/// What the fleet phase measured.
#[derive(Debug, Default)]
pub(crate) struct FleetFigures {
    pub(crate) eps: f64,
    pub(crate) ceiling_eps: f64,
    /// The same batches straight into the store, without HTTP: [`store_only`].
    pub(crate) store_eps: f64,
    /// The whole machine's busy CPU time per event (µs) through the nodes, straight into
    /// the store, and by `COPY`: where the two cores go.
    pub(crate) cpu_us: Option<f64>,
    pub(crate) store_cpu_us: Option<f64>,
    pub(crate) ceiling_cpu_us: Option<f64>,
    pub(crate) p99_ms: f64,
    /// The provider views over `view_installs` installs.
    pub(crate) views: ViewTimes,
    /// Enrolled installs that sent batches.
    pub(crate) installs: usize,
    pub(crate) events: u64,
}

/// Runs the fleet phase; `installs` each send one batch of 50 events.
pub(crate) fn fleet_phase(
    runtime: &tokio::runtime::Runtime,
    root: &Path,
    database_url: Option<&str>,
    installs: usize,
    in_flight: usize,
    view_installs: u32,
) -> anyhow::Result<FleetFigures> {
    let cluster = match database_url {
        Some(_) => None,
        None => Some(ThrowawayCluster::start(Durability::Full).context("starting PostgreSQL")?),
    };
    let server = match (&cluster, database_url) {
        (_, Some(url)) => url.to_owned(),
        (Some(cluster), None) => cluster.url("postgres"),
        (None, None) => unreachable!("a cluster was started"),
    };
    let databases = Databases::create(runtime, &server)?;
    let outcome = run(
        runtime,
        root,
        &databases,
        installs,
        in_flight,
        view_installs,
    );
    databases.drop_all(runtime);
    outcome
}

fn run(
    runtime: &tokio::runtime::Runtime,
    root: &Path,
    databases: &Databases,
    installs: usize,
    in_flight: usize,
    view_installs: u32,
) -> anyhow::Result<FleetFigures> {
    let dir = root.join("fleet");
    std::fs::create_dir_all(&dir).context("creating the fleet dir")?;
    let nodes = [
        Node::start(&dir, "node-a", &databases.fleet)?,
        Node::start(&dir, "node-b", &databases.fleet)?,
    ];
    let bases: Vec<String> = nodes.iter().map(|n| format!("http://{}", n.addr)).collect();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(in_flight)
        .build()
        .context("building the HTTP client")?;

    eprintln!("  fleet     enrolling {installs} installs");
    let fleet: Vec<(String, Secret)> = (0..installs)
        .map(|n| (format!("loadgen-install-{n:06}"), Secret::generate()))
        .collect();
    runtime.block_on(enroll_all(&http, &bases, &fleet))?;

    let batches = ready_batches(&fleet);
    eprintln!("  fleet     {installs} batches of {BATCH_EVENTS} through two nodes");
    let (started, busy) = (Instant::now(), machine_busy_seconds());
    let latencies = runtime.block_on(send_all(&http, &bases, batches, in_flight))?;
    let took = started.elapsed();
    let events = (installs * BATCH_EVENTS) as u64;
    let mut figures = FleetFigures {
        eps: events as f64 / took.as_secs_f64(),
        cpu_us: busy_us_per_event(busy, events),
        p99_ms: percentile_ms(latencies, 0.99),
        installs,
        events,
        ..FleetFigures::default()
    };
    let stored = runtime.block_on(count(&databases.fleet, "SELECT count(*) FROM events"))?;
    if stored != events as i64 {
        bail!("{stored} events stored for {events} sent: not exactly once");
    }
    drop(nodes);

    eprintln!("  fleet     ceiling: the same rows by COPY");
    (figures.ceiling_eps, figures.ceiling_cpu_us) =
        runtime.block_on(copy_ceiling(&databases.fleet, installs))?;
    eprintln!("  fleet     the same batches straight into the store, no HTTP");
    (figures.store_eps, figures.store_cpu_us) = store_only(&databases.fleet, in_flight)?;

    figures.views = time_views(runtime, &dir, &databases.view, &http, view_installs)?;
    Ok(figures)
}

/// The provider views alone (`--phases view`): the installations view and a dashboard
/// page over `view_installs` installs, in ms.
pub(crate) fn view_phase(
    runtime: &tokio::runtime::Runtime,
    root: &Path,
    database_url: Option<&str>,
    view_installs: u32,
) -> anyhow::Result<ViewTimes> {
    let cluster = match database_url {
        Some(_) => None,
        None => Some(ThrowawayCluster::start(Durability::Full).context("starting PostgreSQL")?),
    };
    let server = match (&cluster, database_url) {
        (_, Some(url)) => url.to_owned(),
        (Some(cluster), None) => cluster.url("postgres"),
        (None, None) => unreachable!("a cluster was started"),
    };
    let databases = Databases::create(runtime, &server)?;
    let dir = root.join("view");
    let outcome = std::fs::create_dir_all(&dir)
        .context("creating the view dir")
        .and_then(|()| {
            let http = reqwest::Client::new();
            time_views(runtime, &dir, &databases.view, &http, view_installs)
        });
    databases.drop_all(runtime);
    outcome
}

/// The provider views' times, in ms, each to the answer's last byte.
#[derive(Debug, Default)]
pub(crate) struct ViewTimes {
    /// The node's first installations view: it reads every rollup row.
    pub(crate) installations_first_ms: f64,
    /// The best of three after it (`installations_100k_ms`).
    pub(crate) installations_ms: f64,
    /// The first dashboard page (100 rows sorted by cost, month to date), then the best
    /// of three (`dashboard_100k_ms`).
    pub(crate) dashboard_first_ms: f64,
    pub(crate) dashboard_ms: f64,
    /// Each once more after 1% of the installs sent a batch through the node.
    pub(crate) installations_changed_ms: f64,
    pub(crate) dashboard_changed_ms: f64,
}

/// Seeds `url` with `view_installs` installs and times both views on a node of its own.
fn time_views(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    url: &str,
    http: &reqwest::Client,
    view_installs: u32,
) -> anyhow::Result<ViewTimes> {
    eprintln!("  view      installations view and dashboard over {view_installs} installs");
    let view_node = Node::start(dir, "node-view", url)?;
    let secret = runtime.block_on(seed_view(url, view_installs))?;
    let base = format!("http://{}", view_node.addr);
    let installations = format!("{base}/api/usage/installations");
    let dashboard = format!("{base}/dashboard?period=mtd&sort=-cost");
    let installs = view_installs as usize;
    runtime.block_on(async {
        let mut times = ViewTimes {
            installations_first_ms: time_view(http, &installations, installs).await?,
            installations_ms: best_of_three(http, &installations, installs).await?,
            dashboard_first_ms: time_view(http, &dashboard, installs).await?,
            dashboard_ms: best_of_three(http, &dashboard, installs).await?,
            ..ViewTimes::default()
        };
        let changed: Vec<(String, Secret)> = (1..=view_installs.div_ceil(100))
            .map(|n| (view_install_id(n), secret.clone()))
            .collect();
        eprintln!("  view      {} of them send a batch", changed.len());
        let batches = ready_batches(&changed);
        send_all(http, std::slice::from_ref(&base), batches, SETUP_IN_FLIGHT).await?;
        times.installations_changed_ms = time_view(http, &installations, installs).await?;
        times.dashboard_changed_ms = time_view(http, &dashboard, installs).await?;
        if let Some(rss) = crate::roles::peak_rss_mib(view_node.child.id()) {
            eprintln!("  view      the node's peak RSS {rss:.0} MiB");
        }
        anyhow::Ok(times)
    })
}

/// The three databases of the phase, made on the server and dropped at the end.
struct Databases {
    server: String,
    fleet: String,
    view: String,
    names: Vec<String>,
}

impl Databases {
    fn create(runtime: &tokio::runtime::Runtime, server: &str) -> anyhow::Result<Databases> {
        let suffix = std::process::id();
        let names = vec![
            format!("loadgen_fleet_{suffix}"),
            format!("loadgen_view_{suffix}"),
        ];
        runtime.block_on(async {
            let admin = connect(server).await?;
            for name in &names {
                admin
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .await
                    .with_context(|| format!("creating database {name}"))?;
            }
            anyhow::Ok(())
        })?;
        Ok(Databases {
            server: server.to_owned(),
            fleet: with_database(server, &names[0])?,
            view: with_database(server, &names[1])?,
            names,
        })
    }

    fn drop_all(&self, runtime: &tokio::runtime::Runtime) {
        let dropped = runtime.block_on(async {
            let admin = connect(&self.server).await?;
            for name in &self.names {
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
            }
            anyhow::Ok(())
        });
        if let Err(error) = dropped {
            eprintln!("loadgen: could not drop the fleet databases: {error:#}");
        }
    }
}

/// `server` with its database name replaced.
fn with_database(server: &str, name: &str) -> anyhow::Result<String> {
    let mut url = url::Url::parse(server).context("reading the database URL")?;
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(connection);
    Ok(client)
}

async fn count(url: &str, sql: &str) -> anyhow::Result<i64> {
    let client = connect(url).await?;
    Ok(client.query_one(sql, &[]).await?.get(0))
}

/// A receiver node: this binary re-executed as `usage-agent receiver --database-url`.
struct Node {
    child: Child,
    addr: SocketAddr,
}

impl Node {
    fn start(dir: &Path, name: &str, url: &str) -> anyhow::Result<Node> {
        let addr = free_port()?;
        let log = dir.join(format!("{name}.log"));
        let mut child = spawn_self(
            &[RECEIVER_ROLE, &addr.to_string(), "--database-url", url],
            &log,
            &[
                ("ENROLLMENT_TOKEN", ENROLL_TOKEN),
                ("PROVIDER_USERNAME", PROVIDER_USER),
                ("PROVIDER_PASSWORD", PROVIDER_PASSWORD),
            ],
        )?;
        wait_until(&mut child, &log, name, || TcpStream::connect(addr).is_ok())?;
        Ok(Node { child, addr })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn enroll_all(
    http: &reqwest::Client,
    bases: &[String],
    fleet: &[(String, Secret)],
) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    let mut answers = futures_util::stream::iter(fleet.iter().enumerate())
        .map(|(n, (install_id, secret))| {
            http.post(format!("{}/api/installations", bases[n % bases.len()]))
                .bearer_auth(ENROLL_TOKEN)
                .json(
                    &json!({"install_id": install_id, "secret": secret.to_whsec(),
                              "site_hash": "cd".repeat(32)}),
                )
                .send()
        })
        .buffer_unordered(SETUP_IN_FLIGHT);
    while let Some(answer) = answers.next().await {
        let status = answer.context("enrolling")?.status();
        if !status.is_success() {
            bail!("an enrollment was answered {status}");
        }
    }
    Ok(())
}

/// The wire body of one batch of `install_id`, gzipped as the agent sends it.
fn batch_body(install_id: &str, n: usize) -> (Uuid, Vec<u8>, Vec<u8>) {
    const MODELS: [&str; 4] = [
        "gpt-4o-mini",
        "gpt-4o",
        "claude-3-5-haiku",
        "gemini-1.5-flash",
    ];
    let now = Utc::now().timestamp_millis();
    let events: Vec<Value> = (0..BATCH_EVENTS)
        .map(|e| {
            let prompt = 100 + (n * 7 + e * 13) % 900;
            json!({
                "event_id": Uuid::now_v7(),
                "user_hash": user_hash(install_id, (e % 5) as u64),
                "source": "bulk",
                "model": MODELS[(n + e) % MODELS.len()],
                "prompt_tokens": prompt,
                "completion_tokens": 25,
                "total_tokens": prompt + 25,
                "context": {"attachment_id": e},
                "created_at": format_millis(now - 1000 - e as i64),
            })
        })
        .collect();
    let batch_id = Uuid::now_v7();
    let json = serde_json::to_vec(&json!({
        "batch_id": batch_id, "install_id": install_id,
        "sent_at": Utc::now().to_rfc3339(), "events": events,
    }))
    .expect("a batch serializes");
    let gzipped = gzip(&json);
    (batch_id, json, gzipped)
}

/// One batch ready to send: gzipped and signed ahead, so the timed phase spends the
/// client's share of the two cores on sending, not on building requests. Signatures stay
/// valid for the receiver's five-minute tolerance.
struct ReadyBatch {
    install_id: String,
    batch_id: String,
    timestamp: i64,
    signature: String,
    gzipped: Vec<u8>,
}

fn ready_batches(fleet: &[(String, Secret)]) -> Vec<ReadyBatch> {
    let timestamp = Utc::now().timestamp();
    fleet
        .iter()
        .enumerate()
        .map(|(n, (install_id, secret))| {
            let (batch_id, json, gzipped) = batch_body(install_id, n);
            let batch_id = batch_id.to_string();
            ReadyBatch {
                signature: sign(secret, &batch_id, timestamp, &json),
                install_id: install_id.clone(),
                batch_id,
                timestamp,
                gzipped,
            }
        })
        .collect()
}

/// Sends every batch, `in_flight` at a time, alternating nodes; the latency of each
/// acknowledged batch.
async fn send_all(
    http: &reqwest::Client,
    bases: &[String],
    batches: Vec<ReadyBatch>,
    in_flight: usize,
) -> anyhow::Result<Vec<Duration>> {
    use futures_util::StreamExt;
    let count = batches.len();
    let mut answers = futures_util::stream::iter(batches.into_iter().enumerate())
        .map(|(n, batch)| {
            let url = format!("{}/api/usage/event", bases[n % bases.len()]);
            async move {
                let started = Instant::now();
                let response = http
                    .post(url)
                    .header("content-type", "application/json")
                    .header("content-encoding", "gzip")
                    .header(HEADER_ID, &batch.batch_id)
                    .header(HEADER_TIMESTAMP, batch.timestamp.to_string())
                    .header(HEADER_SIGNATURE, &batch.signature)
                    .header(HEADER_INSTALL_ID, &batch.install_id)
                    .body(batch.gzipped)
                    .send()
                    .await
                    .context("sending a batch")?;
                let status = response.status();
                let answer: Value = response.json().await.context("reading an answer")?;
                if !status.is_success() || answer["accepted"] != BATCH_EVENTS {
                    bail!("a batch was answered {status}: {answer}");
                }
                Ok(started.elapsed())
            }
        })
        .buffer_unordered(in_flight);
    let mut latencies = Vec::with_capacity(count);
    while let Some(latency) = answers.next().await {
        latencies.push(latency?);
    }
    Ok(latencies)
}

/// One batch of 50 new events for each install, straight into the store's ingest path as
/// two nodes call it (the nodes' rate limit taken with it), `in_flight` at a time from this
/// process: no HTTP, gzip, signature or JSON, and no install looked up. What the database
/// and the ingest statement allow on their own, between the nodes and the ceiling:
/// events per second, and the machine's busy CPU µs per event.
fn store_only(url: &str, in_flight: usize) -> anyhow::Result<(f64, Option<f64>)> {
    use futures_util::StreamExt;
    // A runtime as a node's: the store's blocking methods drive their queries from outside it.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the store's runtime")?;
    // Two stores, as two nodes have, each with its own connections.
    let open = || {
        PostgresStore::open(url, runtime.handle().clone())
            .map(Arc::new)
            .context("opening the store")
    };
    let stores = [open()?, open()?];
    let keys: Vec<i64> = runtime.block_on(async {
        let rows = connect(url)
            .await?
            .query("SELECT id FROM installs ORDER BY id", &[])
            .await?;
        anyhow::Ok(rows.iter().map(|row| row.get(0)).collect())
    })?;
    let now = Utc::now().timestamp_millis();
    let batches: Vec<(i64, Vec<NewEvent>)> = keys
        .iter()
        .enumerate()
        .map(|(n, &key)| {
            let events = (0..BATCH_EVENTS)
                .map(|e| NewEvent {
                    event_id: Uuid::now_v7(),
                    user_hash: [(e % 5) as u8; 32],
                    source: Source::Bulk,
                    model: "gpt-4o-mini".into(),
                    prompt_tokens: (100 + (n * 7 + e * 13) % 900) as u64,
                    completion_tokens: 25,
                    cached_tokens: 0,
                    cache_write_tokens: 0,
                    reasoning_tokens: 0,
                    origin: None,
                    context: Some(format!(r#"{{"attachment_id":{e}}}"#)),
                    created_at_ms: now - 1000 - e as i64,
                })
                .collect();
            (key, events)
        })
        .collect();
    let rate = Rate {
        per_min: DEFAULT_RATE_LIMIT_PER_MIN,
    };
    let events = batches.len() * BATCH_EVENTS;
    let (started, busy) = (Instant::now(), machine_busy_seconds());
    runtime.block_on(async {
        let mut stored = futures_util::stream::iter(batches)
            .enumerate()
            .map(|(n, (key, events))| stores[n % 2].clone().ingest_async(key, events, now, rate))
            .buffer_unordered(in_flight);
        while let Some(counts) = stored.next().await {
            match counts? {
                Ok(counts) if counts.accepted == BATCH_EVENTS as u64 => {}
                other => bail!("a batch straight into the store was answered {other:?}"),
            }
        }
        anyhow::Ok(())
    })?;
    let eps = events as f64 / started.elapsed().as_secs_f64();
    Ok((eps, busy_us_per_event(busy, events as u64)))
}

fn percentile_ms(mut latencies: Vec<Duration>, quantile: f64) -> f64 {
    latencies.sort();
    let index = ((latencies.len() as f64 * quantile).ceil() as usize).clamp(1, latencies.len());
    latencies[index - 1].as_secs_f64() * 1000.0
}

/// Copies as many rows as the nodes stored, of the same shape and the same installs, into
/// the same two tables and their indexes (`event_ids`, `events`) over two connections,
/// 5,000 rows per `COPY`: events per second, and the machine's busy CPU µs per event.
async fn copy_ceiling(url: &str, installs: usize) -> anyhow::Result<(f64, Option<f64>)> {
    const CHUNK: usize = 5000;
    const LANES: usize = 2;
    let total = installs * BATCH_EVENTS;
    let keys: Vec<i64> = connect(url)
        .await?
        .query("SELECT id FROM installs ORDER BY id", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let keys = Arc::new(keys);
    let (started, busy) = (Instant::now(), machine_busy_seconds());
    let mut lanes = Vec::new();
    for lane in 0..LANES {
        let (keys, url) = (keys.clone(), url.to_owned());
        lanes.push(tokio::spawn(async move {
            let mut client = connect(&url).await?;
            let mut row = lane * CHUNK;
            while row < total {
                copy_chunk(&mut client, &keys, row, CHUNK.min(total - row)).await?;
                row += LANES * CHUNK;
            }
            anyhow::Ok(())
        }));
    }
    for lane in lanes {
        lane.await.context("a COPY lane")??;
    }
    let eps = total as f64 / started.elapsed().as_secs_f64();
    Ok((eps, busy_us_per_event(busy, total as u64)))
}

async fn copy_chunk(
    client: &mut Client,
    keys: &[i64],
    first: usize,
    rows: usize,
) -> anyhow::Result<()> {
    let now = Utc::now().timestamp_millis();
    let tx = client.transaction().await?;
    let rows: Vec<(i64, Uuid, i64)> = (first..first + rows)
        .map(|n| {
            (
                keys[(n / BATCH_EVENTS) % keys.len()],
                Uuid::now_v7(),
                now - (n % 1000) as i64,
            )
        })
        .collect();
    let ids = tx
        .copy_in("COPY event_ids (install, event_id, created_at) FROM STDIN BINARY")
        .await?;
    let writer = BinaryCopyInWriter::new(ids, &[Type::INT8, Type::UUID, Type::INT8]);
    futures_util::pin_mut!(writer);
    for (install, event_id, created_at) in &rows {
        writer
            .as_mut()
            .write(&[install, event_id, created_at])
            .await?;
    }
    writer.finish().await?;
    let events = tx
        .copy_in(
            "COPY events (install, event_id, user_hash, source, model, prompt_tokens,
                 completion_tokens, cached_tokens, cache_write_tokens, reasoning_tokens,
                 context, created_at, received_at) FROM STDIN BINARY",
        )
        .await?;
    let writer = BinaryCopyInWriter::new(
        events,
        &[
            Type::INT8,
            Type::UUID,
            Type::BYTEA,
            Type::INT2,
            Type::TEXT,
            Type::INT8,
            Type::INT8,
            Type::INT8,
            Type::INT8,
            Type::INT8,
            Type::TEXT,
            Type::INT8,
            Type::INT8,
        ],
    );
    futures_util::pin_mut!(writer);
    let user_hash = vec![7u8; 32];
    let (source, zero, completion) = (1i16, 0i64, 25i64);
    for (n, (install, event_id, created_at)) in rows.iter().enumerate() {
        let prompt = 100 + (n as i64 * 7) % 900;
        let context = Some(format!(r#"{{"attachment_id":{}}}"#, n % BATCH_EVENTS));
        writer
            .as_mut()
            .write(&[
                install,
                event_id,
                &user_hash,
                &source,
                &"gpt-4o-mini",
                &prompt,
                &completion,
                &zero,
                &zero,
                &zero,
                &context,
                created_at,
                &now,
            ])
            .await?;
    }
    writer.finish().await?;
    tx.commit().await?;
    Ok(())
}

fn view_install_id(n: u32) -> String {
    format!("view-install-{n:06}")
}

/// `installs` installs ([`view_install_id`] 1 to `installs`), each with a rollup row on
/// each of the last 30 days; answers their one secret.
async fn seed_view(url: &str, installs: u32) -> anyhow::Result<Secret> {
    let client = connect(url).await?;
    let today = Utc::now().timestamp_millis().div_euclid(86_400_000);
    let secret = Secret::generate();
    client
        .execute(
            "INSERT INTO installs (install_id, secret, site_hash, plan, enrolled_at, last_seen)
             SELECT 'view-install-' || lpad(g::text, 6, '0'), $2, 'site',
                    (ARRAY['free', 'pro', 'agency'])[1 + g % 3], 0, $3
             FROM generate_series(1, $1::int) g",
            &[
                &(installs as i32),
                &secret.to_whsec(),
                &Utc::now().timestamp_millis(),
            ],
        )
        .await?;
    client
        .execute(
            "INSERT INTO daily_usage (install, day, model, events, prompt_tokens,
                                      completion_tokens)
             SELECT i.id, d, 'gpt-4o-mini', 10 + i.id % 7, 1000 + i.id % 100, 200
             FROM installs i, generate_series($1::bigint - 29, $1::bigint) d",
            &[&today],
        )
        .await?;
    // The chart's per-day totals, as the ingest statement would have kept them.
    client
        .execute(
            "INSERT INTO daily_totals (day, shard, events, tokens)
             SELECT day, 0, sum(events)::bigint, sum(prompt_tokens + completion_tokens)::bigint
             FROM daily_usage GROUP BY day",
            &[],
        )
        .await?;
    client
        .batch_execute("VACUUM ANALYZE installs, daily_usage, daily_totals")
        .await?;
    Ok(secret)
}

/// The best of three [`time_view`]s.
async fn best_of_three(http: &reqwest::Client, url: &str, installs: usize) -> anyhow::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        best = best.min(time_view(http, url, installs).await?);
    }
    Ok(best)
}

/// One `GET` of a provider view (basic auth included) to the answer's last byte, in ms;
/// then checks it lists `installs` installs (the installations view) or a full page of
/// them (the dashboard). How the client reads 23 MB of JSON afterwards is not the view's
/// time.
async fn time_view(http: &reqwest::Client, url: &str, installs: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let response = http
        .get(url)
        .basic_auth(PROVIDER_USER, Some(PROVIDER_PASSWORD))
        .send()
        .await?;
    let status = response.status();
    let body = response.bytes().await?;
    let took = started.elapsed().as_secs_f64() * 1000.0;
    let (listed, expected) = if url.contains("/dashboard") {
        let page = String::from_utf8_lossy(&body);
        (
            page.matches(r#"<tr class="install">"#).count(),
            installs.min(100),
        )
    } else {
        let answer: Value = serde_json::from_slice(&body)?;
        (
            answer["installations"].as_array().map_or(0, Vec::len),
            installs,
        )
    };
    if !status.is_success() || listed != expected {
        bail!("{url} answered {status} listing {listed} installs");
    }
    eprintln!("  view      {url} {took:.1} ms");
    Ok(took)
}
