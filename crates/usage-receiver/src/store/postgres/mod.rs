//! The receiver's PostgreSQL store, for a fleet of receiver nodes on one database: every
//! SQL statement of it lives in this module and its children (`migrations/*.sql` among
//! them). It knows nothing about HTTP.
//!
//! What makes several nodes one receiver:
//! - **dedupe in the insert** (`ingest.rs`): each event's `(install, event_id)` goes into
//!   `event_ids`, and only the keys that went in are stored as events and added to the
//!   daily rollup, all in one statement; a second node inserting the same key at the same
//!   moment waits for the first to commit, then skips it. Batches that wait for the
//!   node's writers (`writers.rs`) are stored together, by `COPY` (`group.rs`), and a
//!   group that meets a key stored already goes batch by batch through that statement;
//! - **the install row locked in the same statement** (`FOR NO KEY UPDATE`, as its
//!   `last_seen` is updated): batches of one install take turns, whichever node they reach,
//!   and an erasure (`FOR UPDATE`) either waits for a batch in flight, then deletes it too,
//!   or goes first, and the batch then stores nothing; a disabled install stores nothing;
//! - **the rate limit in a table** (`request_schedule`), one atomic upsert per request, in
//!   the database's clock;
//! - **nothing cached that could go stale**: installs, plans and secrets are read from
//!   the database on every request; the views' figures a node keeps
//!   (`store/view_cache.rs`) hold only while the install's `usage_version`, read in the
//!   view's snapshot, is the one they were read at.
//!
//! Raw events are partitioned by UTC day (`partitions.rs`), made ahead and dropped whole
//! past retention. The ingest path (`find_install_async`, `take_request_async`,
//! `ingest_async`) is async: the handler of a batch awaits its queries on the runtime where
//! the pool's connections live, so a batch costs no thread switch per query. The other
//! methods of the trait are blocking (the handlers call them on the blocking pool) and run
//! their queries on the server's runtime with [`Handle::block_on`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::tokio_postgres::{self, NoTls, Row};
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio::runtime::Handle;
use uuid::Uuid;

use self::connect::DatabaseUrl;
use self::ingest::Columns;
use self::writers::{Batch, Writers};
use super::view_cache::{DayCache, InstallFigures, ViewCache, ViewKey};

use super::{
    Alert, AlertCursor, Budget, CostedInstall, CostedReport, DailyTokens, DayRange,
    DeliveryOutcome, EnrollOutcome, EventCursor, EventsPage, EventsQuery, IngestCounts, Install,
    InstallKey, InstallUsage, InstallationsReport, MonthSpend, NewAlert, NewEvent, NewInstall,
    PlanChange, PoolUse, PriceList, RatesOf, ReceivedEvent, ReceiverStore, ReceiverStoreError,
    RetainedDays, SourceModelDay, StoreFuture, StoreKind, Summary, SummaryQuery, SummaryRow,
    TimeRange, Totals, UsageWindow, UserModelDay,
};
use crate::billing::money::Micros;
use crate::billing::pricing::{
    ModelDayTokens, Plan, PlanHistory, PlanPeriod, PricedUsage, TokenCounts,
};
use crate::days::{month_of, month_text};
use crate::store::rate_limit::Rate;
use usage_protocol::event::Source;
use usage_protocol::signing::Secret;
use usage_protocol::wire::to_hex;

/// How every statement that stores usage adds to the rollup (`rollup_into!()`, then the
/// rows as `(install, day, model, events, five token kinds)`, then `rollup_add!()`) and to
/// the chart's per-day totals (`chart_add!()` after rows of `(day, shard, events,
/// tokens)`; an erasure adds negative ones): shared by [`ingest`], [`group`] and erasure,
/// so the forms cannot drift apart.
macro_rules! rollup_into {
    () => {
        "INSERT INTO daily_usage AS d (install, day, model, events, prompt_tokens,
                              completion_tokens, cached_tokens, cache_write_tokens,
                              reasoning_tokens)
"
    };
}
macro_rules! rollup_add {
    () => {
        "
    ON CONFLICT (install, day, model) DO UPDATE SET
        events = d.events + excluded.events,
        prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = d.completion_tokens + excluded.completion_tokens,
        cached_tokens = d.cached_tokens + excluded.cached_tokens,
        cache_write_tokens = d.cache_write_tokens + excluded.cache_write_tokens,
        reasoning_tokens = d.reasoning_tokens + excluded.reasoning_tokens"
    };
}
/// How a request is taken from an install's schedule (`request_schedule AS s`, the
/// interval and burst in ms as parameters `$interval` and `$burst`): the schedule moves on
/// only when the request fits in the burst. Shared by [`TAKE_REQUEST`], [`ingest`] and
/// [`group`], so a batch alone, in a group or without events meets one rate.
macro_rules! take_request_on_conflict {
    ($interval:literal, $burst:literal) => {
        concat!(
            "
    ON CONFLICT (install) DO UPDATE SET next_at_ms = greatest(s.next_at_ms,
        (extract(epoch FROM statement_timestamp()) * 1000)::bigint) + $",
            $interval,
            "
    WHERE s.next_at_ms - (extract(epoch FROM statement_timestamp()) * 1000)::bigint <= $",
            $burst
        )
    };
}
macro_rules! chart_add {
    () => {
        "
    ON CONFLICT (day, shard) DO UPDATE SET
        events = t.events + excluded.events, tokens = t.tokens + excluded.tokens"
    };
}

pub mod connect;
mod dashboard;
mod group;
mod ingest;
mod migrations;
mod partitions;
mod writers;

use crate::days::MS_PER_DAY;
use crate::days::day_of_ms;
/// Connections per node: twice its cores, at least 4. A batch holds one for its two
/// statements only; more connections than the node can keep busy only make backends
/// contend inside the database (on two cores, 4 per node stored a tenth more than 16:
/// BENCHMARKS.md, "The fleet receiver on PostgreSQL").
fn pool_size() -> usize {
    (2 * cores()).max(4)
}
/// Writer tasks per node ([`writers`]): one per core, at least 2, so the node's batches
/// keep the database busy while each waits for its commit; more only make groups smaller.
fn writer_count() -> usize {
    cores().max(2)
}
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
/// How long a request waits for a connection, or for one to be made.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The schema whose upkeep on ingest this node does (see migration 5).
const WRITER_OPTION: &str = "-c usage_agent.writer=5";
/// Raw event ids deleted per retention transaction.
const RETENTION_CHUNK: i64 = 5000;

/// The receiver's PostgreSQL database.
pub struct PostgresStore {
    pool: Pool,
    /// Connections that commit without waiting for the WAL flush, for the request
    /// schedule only: a crash may forget the last few requests counted, which only lets an
    /// install send a few more; billing data never goes through them.
    relaxed: Pool,
    runtime: Handle,
    /// Figures of the views this node was asked for, kept while they hold.
    views: ViewCache,
    /// The fleet's tokens per model of each day this node was asked for, kept while the
    /// day's totals (events, tokens) in `daily_totals` are unchanged (`dashboard.rs`).
    model_days: DayCache<(i64, i64), Vec<ModelDayTokens>>,
    /// The tasks that store every batch, together when several wait.
    writers: Writers,
}

impl From<tokio_postgres::Error> for ReceiverStoreError {
    fn from(error: tokio_postgres::Error) -> ReceiverStoreError {
        ReceiverStoreError::Backend(Box::new(error))
    }
}

impl From<deadpool_postgres::PoolError> for ReceiverStoreError {
    fn from(error: deadpool_postgres::PoolError) -> ReceiverStoreError {
        match error {
            // The database's own error says it all; the pool's wrapper only adds words.
            deadpool_postgres::PoolError::Backend(error) => error.into(),
            other => ReceiverStoreError::Backend(Box::new(other)),
        }
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (libpq's URL or `key=value` form, TLS as its
    /// `sslmode` says: [`connect`]), brings its schema up to date under a database lock, and
    /// makes the partitions of the days around today. Its connections run on `runtime`;
    /// call this from outside that runtime's tasks.
    pub fn open(url: &str, runtime: Handle) -> Result<PostgresStore, ReceiverStoreError> {
        let url = DatabaseUrl::parse(url).map_err(|error| ReceiverStoreError::Connect {
            target: "the PostgreSQL URL given".to_owned(),
            source: Box::new(error),
        })?;
        let connect_error =
            |source: Box<dyn std::error::Error + Send + Sync>| ReceiverStoreError::Connect {
                target: url.shown().to_owned(),
                source,
            };
        let tls = url.tls().map_err(|e| connect_error(Box::new(e)))?;
        let mut config = url.config().clone();
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("usage-agent receiver");
        // This node keeps `usage_version` and `daily_totals` as ingest stores usage
        // (migration 5 refuses the batches of nodes that do not say so).
        config.options(WRITER_OPTION);
        let mut relaxed = config.clone();
        relaxed.options(format!("{WRITER_OPTION} -c synchronous_commit=off"));
        let pool = |config, size| {
            let recycling = ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            };
            let manager = match tls.clone() {
                Some(tls) => Manager::from_config(config, tls, recycling),
                None => Manager::from_config(config, NoTls, recycling),
            };
            Pool::builder(manager)
                .max_size(size)
                .wait_timeout(Some(CONNECT_TIMEOUT))
                .create_timeout(Some(CONNECT_TIMEOUT))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .map_err(|e| connect_error(Box::new(e)))
        };
        let (pool, relaxed) = (
            pool(config, pool_size())?,
            pool(relaxed, (pool_size() / 4).max(2))?,
        );
        let store = PostgresStore {
            writers: Writers::start(pool.clone(), &runtime, writer_count()),
            pool,
            relaxed,
            runtime,
            views: ViewCache::default(),
            model_days: DayCache::default(),
        };
        store
            .run(async |store| {
                let mut client = store.client().await?;
                migrations::migrate(&mut client).await
            })
            .map_err(|error| match error {
                ReceiverStoreError::Backend(source) => connect_error(source),
                other => other,
            })?;
        let today = day_of_ms(chrono::Utc::now().timestamp_millis());
        store.maintain(RetainedDays {
            first_kept: today - super::EVENT_RETENTION.num_days(),
            today,
        })?;
        Ok(store)
    }

    /// Batches this node stored so far as part of a group of two or more (`writers.rs`):
    /// how often batches arrived faster than one at a time could be stored.
    pub fn batches_stored_in_groups(&self) -> u64 {
        self.writers.grouped()
    }

    /// Runs `work` on the store's runtime and waits for it.
    fn run<T>(
        &self,
        work: impl AsyncFnOnce(&PostgresStore) -> Result<T, ReceiverStoreError>,
    ) -> Result<T, ReceiverStoreError> {
        self.runtime.block_on(work(self))
    }

    async fn client(&self) -> Result<Object, ReceiverStoreError> {
        Ok(self.pool.get().await?)
    }

    // The ingest path: awaited on the runtime by the handler of every batch, and by the
    // blocking methods of the trait through `run`.

    async fn find_install_now(
        &self,
        install_id: &str,
    ) -> Result<Option<Install>, ReceiverStoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT i.id, i.secret, i.disabled, b.monthly_micros, b.thresholds
                 FROM installs i LEFT JOIN budgets b ON b.install = i.id
                 WHERE i.install_id = $1",
            )
            .await?;
        let Some(row) = client.query_opt(&statement, &[&install_id]).await? else {
            return Ok(None);
        };
        let secret = Secret::parse(row.get(1)).map_err(|e| {
            ReceiverStoreError::Corrupt(format!(
                "the stored secret of an install is unreadable: {e}"
            ))
        })?;
        Ok(Some(Install {
            key: row.get(0),
            install_id: install_id.to_owned(),
            secret,
            disabled: row.get(2),
            budget: Budget::from_columns(row.get(3), row.get(4))?,
        }))
    }

    async fn day_models_now(
        &self,
        install: InstallKey,
        days: &[i64],
    ) -> Result<Vec<(i64, String)>, ReceiverStoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT day, model FROM daily_usage WHERE install = $1 AND day = ANY($2)",
            )
            .await?;
        let rows = client.query(&statement, &[&install, &days]).await?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    /// Takes a request of `rate` (none: no limit) and, if it fits, stores the batch, in
    /// one statement, alone or with the other batches waiting for the node's writers
    /// ([`writers`]).
    async fn ingest_now(
        &self,
        install: InstallKey,
        events: Vec<NewEvent>,
        received_at_ms: i64,
        rate: Option<Rate>,
    ) -> Result<Result<IngestCounts, Duration>, ReceiverStoreError> {
        let sent = events.len() as u64;
        // Within a batch the first occurrence of an id counts; the rest are duplicates.
        // In key order, so two nodes storing overlapping batches lock keys in one order.
        let mut events = events;
        events.sort_by_key(|event| event.event_id);
        let mut seen = std::collections::HashSet::with_capacity(events.len());
        let mut columns = Columns::default();
        for event in events {
            if seen.insert(event.event_id) {
                columns.push(event);
            }
        }
        let (interval_ms, burst_ms) = match rate.and_then(schedule_ms) {
            Some((interval, burst)) => (Some(interval), Some(burst)),
            None => (None, None),
        };

        let outcome = self
            .writers
            .store(Batch {
                install,
                columns,
                received_at_ms,
                interval_ms,
                burst_ms,
            })
            .await?;
        if !outcome.accepting {
            return Err(ReceiverStoreError::InstallGone);
        }
        if !outcome.allowed {
            let client = self.client().await?;
            let burst_ms = burst_ms.unwrap_or(0);
            return Ok(Err(wait_for(&client, install, burst_ms).await?));
        }
        let accepted = count(outcome.stored)?;
        Ok(Ok(IngestCounts {
            accepted,
            duplicates: sent - accepted,
        }))
    }

    async fn take_request_now(
        &self,
        install: InstallKey,
        rate: Rate,
    ) -> Result<Result<(), Duration>, ReceiverStoreError> {
        let Some((interval_ms, burst_ms)) = schedule_ms(rate) else {
            return Ok(Ok(()));
        };
        let client = self.relaxed.get().await?;
        let statement = client.prepare_cached(TAKE_REQUEST).await?;
        if client
            .query_opt(&statement, &[&install, &interval_ms, &burst_ms])
            .await?
            .is_some()
        {
            return Ok(Ok(()));
        }
        Ok(Err(wait_for(&client, install, burst_ms).await?))
    }
}

/// A rate's interval and burst in ms, as the schedule counts them; `None` for no limit.
fn schedule_ms(rate: Rate) -> Option<(i64, i64)> {
    let interval = rate.interval()?;
    Some((
        i64::try_from(interval.as_millis()).unwrap_or(i64::MAX),
        i64::try_from(rate.burst().as_millis()).unwrap_or(i64::MAX),
    ))
}

/// How long until an install whose request did not fit in `burst_ms` may send again.
async fn wait_for(
    client: &Object,
    install: InstallKey,
    burst_ms: i64,
) -> Result<Duration, ReceiverStoreError> {
    let statement = client.prepare_cached(SCHEDULE_AHEAD).await?;
    let ahead: i64 = client.query_one(&statement, &[&install]).await?.get(0);
    Ok(Duration::from_millis(
        u64::try_from(ahead - burst_ms).unwrap_or(0).max(1),
    ))
}

fn count(value: i64) -> Result<u64, ReceiverStoreError> {
    u64::try_from(value)
        .map_err(|_| ReceiverStoreError::Corrupt(format!("a stored count is negative: {value}")))
}

/// The five token kinds from the columns `first..first + 5` (prompt, completion, cached,
/// cache write, reasoning).
fn token_counts(row: &Row, first: usize) -> Result<TokenCounts, ReceiverStoreError> {
    Ok(TokenCounts {
        prompt: count(row.get(first))?,
        completion: count(row.get(first + 1))?,
        cached: count(row.get(first + 2))?,
        cache_write: count(row.get(first + 3))?,
        reasoning: count(row.get(first + 4))?,
    })
}

fn tokens(value: u64) -> i64 {
    // Validated events hold at most 10^8 tokens of each kind.
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn source_from(code: i16) -> Result<Source, ReceiverStoreError> {
    Source::from_code(i64::from(code))
        .ok_or_else(|| ReceiverStoreError::Corrupt(format!("unknown source code {code}")))
}

fn source_code(source: Source) -> i16 {
    i16::from(source.code())
}

fn plan_from(text: &str) -> Result<Plan, ReceiverStoreError> {
    text.parse()
        .map_err(|_| ReceiverStoreError::Corrupt(format!("unknown plan {text:?}")))
}

/// The plans of every install (or only `only`) that ended after `since`, oldest first.
async fn past_plans(
    client: &impl GenericClient,
    only: Option<InstallKey>,
    since: i64,
) -> Result<HashMap<InstallKey, Vec<PlanPeriod>>, ReceiverStoreError> {
    let rows = client
        .query(
            "SELECT install, from_day, plan FROM past_plans
             WHERE until_day > $1 AND ($2::bigint IS NULL OR install = $2)
             ORDER BY install, from_day",
            &[&since, &only],
        )
        .await?;
    let mut plans: HashMap<InstallKey, Vec<PlanPeriod>> = HashMap::new();
    for row in rows {
        plans.entry(row.get(0)).or_default().push(PlanPeriod {
            plan: plan_from(row.get(2))?,
            from_day: row.get(1),
        });
    }
    Ok(plans)
}

/// An install's plan history from its row's `[plan, enrolled_at, plan_from]` columns (at
/// these indexes) and its `earlier` plans.
fn history_of(
    row: &Row,
    [plan, enrolled_at, plan_day]: [usize; 3],
    earlier: Vec<PlanPeriod>,
) -> Result<PlanHistory, ReceiverStoreError> {
    let current = PlanPeriod {
        plan: plan_from(row.get(plan))?,
        from_day: row.get(plan_day),
    };
    Ok(PlanHistory::new(
        day_of_ms(row.get(enrolled_at)),
        current,
        earlier,
    ))
}

async fn install_key(
    client: &Object,
    install_id: &str,
) -> Result<Option<InstallKey>, ReceiverStoreError> {
    let statement = client
        .prepare_cached("SELECT id FROM installs WHERE install_id = $1")
        .await?;
    Ok(client
        .query_opt(&statement, &[&install_id])
        .await?
        .map(|row| row.get(0)))
}

/// `Some(None)`: every install; `Some(Some(key))`: that one; `None`: the one asked for is
/// unknown.
async fn optional_install(
    client: &Object,
    install_id: Option<&str>,
) -> Result<Option<Option<InstallKey>>, ReceiverStoreError> {
    match install_id {
        None => Ok(Some(None)),
        Some(id) => Ok(install_key(client, id).await?.map(Some)),
    }
}

/// Takes an install's days out of the chart's totals (`$1` the install), before its
/// rollup rows go; into the connection's own shard, as ingest adds.
const SUBTRACT_FROM_DAILY_TOTALS: &str = concat!(
    "
INSERT INTO daily_totals AS t (day, shard, events, tokens)
SELECT day, pg_backend_pid() % 64, -sum(events), -sum(prompt_tokens + completion_tokens)
FROM daily_usage WHERE install = $1 GROUP BY day ORDER BY day",
    chart_add!()
);

/// Takes one request from an install's schedule (`$2` the interval, `$3` the burst, in ms):
/// the schedule moves on only when the request fits in the burst; the row lock makes two
/// nodes' requests of one install take turns. Answers a row when the request fits.
const TAKE_REQUEST: &str = concat!(
    "
INSERT INTO request_schedule AS s (install, next_at_ms)
VALUES ($1, (extract(epoch FROM statement_timestamp()) * 1000)::bigint + $2)",
    take_request_on_conflict!(2, 3),
    "
RETURNING next_at_ms"
);

/// How far an install's schedule runs ahead of now, in ms.
const SCHEDULE_AHEAD: &str = "
SELECT next_at_ms - (extract(epoch FROM statement_timestamp()) * 1000)::bigint
FROM request_schedule WHERE install = $1";

impl ReceiverStore for PostgresStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Postgres
    }

    fn ping(&self) -> Result<(), ReceiverStoreError> {
        self.run(async |store| {
            store.client().await?.simple_query("SELECT 1").await?;
            Ok(())
        })
    }

    fn enroll(&self, install: &NewInstall) -> Result<EnrollOutcome, ReceiverStoreError> {
        self.run(async |store| {
            let client = store.client().await?;
            // Inserting first makes two nodes enrolling the same install at once agree:
            // one inserts, the other finds its row.
            let inserted = client
                .execute(
                    "INSERT INTO installs (install_id, secret, site_hash, enrolled_at, plan_from)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (install_id) DO NOTHING",
                    &[
                        &install.install_id,
                        &install.secret.to_whsec(),
                        &install.site_hash,
                        &install.enrolled_at_ms,
                        &day_of_ms(install.enrolled_at_ms),
                    ],
                )
                .await?;
            if inserted == 1 {
                return Ok(EnrollOutcome::Created);
            }
            let stored: String = client
                .query_one(
                    "SELECT secret FROM installs WHERE install_id = $1",
                    &[&install.install_id],
                )
                .await?
                .get(0);
            Ok(match Secret::parse(&stored) {
                Ok(stored) if stored == install.secret => EnrollOutcome::AlreadyEnrolled,
                _ => EnrollOutcome::Conflict,
            })
        })
    }

    fn find_install(&self, install_id: &str) -> Result<Option<Install>, ReceiverStoreError> {
        self.run(async |store| store.find_install_now(install_id).await)
    }

    fn day_models(
        &self,
        install: InstallKey,
        days: &[i64],
    ) -> Result<Vec<(i64, String)>, ReceiverStoreError> {
        self.run(async |store| store.day_models_now(install, days).await)
    }

    fn ingest(
        &self,
        install: InstallKey,
        events: Vec<NewEvent>,
        received_at_ms: i64,
    ) -> Result<IngestCounts, ReceiverStoreError> {
        let stored = self.run(async |store| {
            store
                .ingest_now(install, events, received_at_ms, None)
                .await
        })?;
        // Without a rate the request always fits.
        stored.map_err(|_| ReceiverStoreError::Corrupt("no rate, yet a wait".to_owned()))
    }

    fn take_request(
        &self,
        install: InstallKey,
        rate: Rate,
    ) -> Result<Result<(), Duration>, ReceiverStoreError> {
        self.run(async |store| store.take_request_now(install, rate).await)
    }

    fn summary(&self, query: &SummaryQuery) -> Result<Summary, ReceiverStoreError> {
        Ok(self.summary_at_most(query, usize::MAX)?.unwrap_or_default())
    }

    fn summary_at_most(
        &self,
        query: &SummaryQuery,
        max_rows: usize,
    ) -> Result<Option<Summary>, ReceiverStoreError> {
        self.run(async |store| {
            let client = store.client().await?;
            let Some(only) = optional_install(&client, query.install_id.as_deref()).await? else {
                return Ok(Some(Summary::default()));
            };
            let group = query.group_by;
            // Only these fixed fragments are ever spliced into the SQL text. Text sorts
            // bytewise (`COLLATE "C"`), as in SQLite.
            let mut keys = Vec::new();
            if group.day {
                keys.push(format!("created_at / {MS_PER_DAY}"));
            }
            if group.user {
                keys.push("user_hash".to_owned());
            }
            if group.source {
                keys.push("source".to_owned());
            }
            if group.model {
                keys.push(r#"model COLLATE "C""#.to_owned());
            }
            if group.origin {
                keys.push(r#"origin COLLATE "C""#.to_owned());
            }
            let key_columns: String = keys.iter().map(|k| format!("{k}, ")).collect();
            // PostgreSQL sorts nulls last, SQLite first: first here too, as in SQLite.
            let order: Vec<String> = keys.iter().map(|k| format!("{k} NULLS FIRST")).collect();
            let group_clause = if keys.is_empty() {
                String::new()
            } else {
                format!("GROUP BY {} ORDER BY {}", keys.join(", "), order.join(", "))
            };
            let install_clause = if only.is_some() {
                "install = $1"
            } else {
                "$1::bigint IS NULL"
            };
            let sql = format!(
                "SELECT {key_columns} count(*), coalesce(sum(prompt_tokens), 0)::bigint,
                        coalesce(sum(completion_tokens), 0)::bigint
                 FROM events
                 WHERE {install_clause} AND created_at >= $2 AND created_at < $3
                 {group_clause} LIMIT $4"
            );
            let from = query.range.from_ms.unwrap_or(i64::MIN);
            let to = query.range.to_ms.unwrap_or(i64::MAX);
            // One row past the most asked for tells there are more; null is no limit.
            let limit = i64::try_from(max_rows)
                .ok()
                .map(|max| max.saturating_add(1));
            let rows = client.query(&sql, &[&only, &from, &to, &limit]).await?;
            if rows.len() > max_rows {
                return Ok(None);
            }
            let mut summary = Summary::default();
            for row in rows {
                let mut column = 0;
                let mut next = || {
                    column += 1;
                    column - 1
                };
                let day = group.day.then(|| row.get::<_, i64>(next()));
                let user_hash = group.user.then(|| to_hex(row.get::<_, &[u8]>(next())));
                let source = if group.source {
                    Some(source_from(row.get(next()))?)
                } else {
                    None
                };
                let model = group.model.then(|| row.get::<_, String>(next()));
                let origin = group.origin.then(|| row.get::<_, Option<String>>(next()));
                let events = count(row.get(next()))?;
                let prompt_tokens = count(row.get(next()))?;
                let completion_tokens = count(row.get(next()))?;
                summary.add_row(
                    SummaryRow {
                        day,
                        user_hash,
                        source,
                        model,
                        origin,
                        totals: Totals::of(events, prompt_tokens, completion_tokens),
                    },
                    group.any(),
                );
            }
            Ok(Some(summary))
        })
    }

    fn events_page(&self, query: &EventsQuery) -> Result<EventsPage, ReceiverStoreError> {
        self.run(async |store| {
            let client = store.client().await?;
            let Some(only) = optional_install(&client, query.install_id.as_deref()).await? else {
                return Ok(EventsPage::default());
            };
            let from = query.range.from_ms.unwrap_or(i64::MIN);
            let to = query.range.to_ms.unwrap_or(i64::MAX);
            // No cursor: start before every event (the nil id sorts first).
            let after = query.after.unwrap_or(EventCursor {
                created_at_ms: i64::MIN,
                install: i64::MIN,
                event_id: Uuid::nil(),
            });
            let limit = i64::try_from(query.limit.max(1)).unwrap_or(i64::MAX);
            let statement = client
                .prepare_cached(
                    "SELECT i.install_id, e.install, e.event_id, e.user_hash, e.source, e.model,
                            e.prompt_tokens, e.completion_tokens, e.cached_tokens,
                            e.cache_write_tokens, e.reasoning_tokens, e.context, e.created_at,
                            e.received_at, e.origin
                     FROM events e JOIN installs i ON i.id = e.install
                     WHERE ($1::bigint IS NULL OR e.install = $1)
                       AND e.created_at >= $2 AND e.created_at < $3
                       AND (e.created_at, e.install, e.event_id) > ($4, $5, $6)
                     ORDER BY e.created_at, e.install, e.event_id
                     LIMIT $7",
                )
                .await?;
            let rows = client
                .query(
                    &statement,
                    &[
                        &only,
                        &from,
                        &to,
                        &after.created_at_ms,
                        &after.install,
                        &after.event_id,
                        &limit,
                    ],
                )
                .await?;
            let mut page = EventsPage::default();
            for row in &rows {
                page.events.push(received_event(row)?);
            }
            if page.events.len() == query.limit.max(1) {
                page.next = rows.last().map(|row| EventCursor {
                    created_at_ms: row.get(12),
                    install: row.get(1),
                    event_id: row.get(2),
                });
            }
            Ok(page)
        })
    }

    fn maintain(&self, days: RetainedDays) -> Result<u64, ReceiverStoreError> {
        self.run(async |store| {
            let mut client = store.client().await?;
            let deleted = partitions::maintain(&mut client, days).await?;
            // The dedupe keys of the days dropped, in small transactions.
            let cutoff = days.first_kept.saturating_mul(MS_PER_DAY);
            let purge = client
                .prepare_cached(
                    "DELETE FROM event_ids WHERE ctid = ANY (ARRAY(
                         SELECT ctid FROM event_ids WHERE created_at < $1 LIMIT $2))",
                )
                .await?;
            while client.execute(&purge, &[&cutoff, &RETENTION_CHUNK]).await?
                == RETENTION_CHUNK as u64
            {}
            Ok(deleted)
        })
    }

    fn installations(
        &self,
        install_id: Option<&str>,
        window: UsageWindow,
    ) -> Result<InstallationsReport, ReceiverStoreError> {
        self.run(async |store| {
            let mut client = store.client().await?;
            let Some(only) = optional_install(&client, install_id).await? else {
                return Ok(InstallationsReport::default());
            };
            let mut report = InstallationsReport::default();
            let mut by_key = HashMap::new();
            for head in install_heads(&client, only, window).await? {
                by_key.insert(head.key, report.installs.len());
                report.installs.push(InstallUsage {
                    install_id: head.install_id,
                    label: head.label,
                    plans: head.plans,
                    last_seen_ms: head.last_seen_ms,
                    events_30d: 0,
                    tokens_30d: 0,
                    usage_mtd: Vec::new(),
                    budget: head.budget,
                    alerted_in_month: head.alerted_in_month,
                });
            }
            // One statement, so one snapshot: the month's rollup rows as they are (prices
            // change by day and costs round per model and day, so they cannot be summed
            // here), and the last 30 days summed in the database per install and per day
            // for the chart. Enough memory that the sums never spill to disk, and no JIT:
            // compiling costs more than this query saves by it.
            let tx = client.build_transaction().read_only(true).start().await?;
            tx.batch_execute("SET LOCAL work_mem = '256MB'; SET LOCAL jit = off")
                .await?;
            let rows = tx
                .query(
                    "SELECT 0::int2, install, model, day, events, prompt_tokens,
                            completion_tokens, cached_tokens, cache_write_tokens,
                            reasoning_tokens
                     FROM daily_usage
                     WHERE day >= $2 AND day <= $3 AND ($4::bigint IS NULL OR install = $4)
                     UNION ALL
                     SELECT CASE WHEN GROUPING(day) = 1 THEN 1 ELSE 2 END::int2, install,
                            NULL, day, sum(events)::bigint, sum(prompt_tokens)::bigint,
                            sum(completion_tokens)::bigint, 0::bigint, 0::bigint, 0::bigint
                     FROM daily_usage
                     WHERE day >= $1 AND day <= $3 AND ($4::bigint IS NULL OR install = $4)
                     GROUP BY GROUPING SETS ((install), (day))",
                    &[&window.from_30d, &window.month_start, &window.today, &only],
                )
                .await?;
            tx.commit().await?;
            let mut daily = BTreeMap::new();
            for row in rows {
                let events = count(row.get(4))?;
                let kinds = token_counts(&row, 5)?;
                match row.get::<_, i16>(0) {
                    // The chart's day, summed over every install.
                    2 => {
                        let day: i64 = row.get(3);
                        daily.insert(
                            day,
                            DailyTokens {
                                day,
                                events,
                                tokens: kinds.total(),
                            },
                        );
                    }
                    kind => {
                        let Some(&index) = by_key.get(&row.get::<_, i64>(1)) else {
                            continue;
                        };
                        let install = &mut report.installs[index];
                        if kind == 1 {
                            install.events_30d = events;
                            install.tokens_30d = kinds.total();
                        } else {
                            install.usage_mtd.push(ModelDayTokens {
                                model: row.get(2),
                                day: row.get(3),
                                tokens: kinds,
                            });
                        }
                    }
                }
            }
            report.finish(daily);
            Ok(report)
        })
    }

    /// Costed in the database, so 100,000 installs' month of rows never leave it: one
    /// pass sums per model and day (the chart, and the (model, day) pairs to price); their
    /// rates, from the receiver, go back as arrays; a second pass costs each rollup row
    /// with them in `bigint` (half up, once per row; in `numeric` for a row too large for
    /// `bigint`) and sums everything per install. Both in one snapshot. A total past
    /// `bigint` is an error in PostgreSQL, and
    /// then the straightforward computation answers instead, so the answer is always
    /// exactly [`CostedReport::price`]'s.
    fn costed_installations(
        &self,
        install_id: Option<&str>,
        window: UsageWindow,
        prices: PriceList<'_>,
    ) -> Result<CostedReport, ReceiverStoreError> {
        match self.run(async |store| costed(store, install_id, window, prices).await) {
            Err(ReceiverStoreError::Backend(error))
                if error
                    .downcast_ref::<tokio_postgres::Error>()
                    .and_then(tokio_postgres::Error::code)
                    == Some(&tokio_postgres::error::SqlState::NUMERIC_VALUE_OUT_OF_RANGE) =>
            {
                Ok(CostedReport::price(
                    self.installations(install_id, window)?,
                    prices.rates,
                ))
            }
            other => other,
        }
    }

    fn keeps_views(&self) -> bool {
        true
    }

    fn pool_use(&self) -> Vec<PoolUse> {
        [("main", &self.pool), ("relaxed", &self.relaxed)]
            .into_iter()
            .map(|(name, pool)| {
                let status = pool.status();
                PoolUse {
                    pool: name,
                    size: status.size,
                    available: status.available,
                    waiting: status.waiting,
                }
            })
            .collect()
    }

    fn set_plan(&self, install_id: &str, plan: Plan, day: i64) -> Result<bool, ReceiverStoreError> {
        self.run(async |store| {
            let mut client = store.client().await?;
            let tx = client.transaction().await?;
            // The row lock makes changes through several nodes take turns.
            let Some(row) = tx
                .query_opt(
                    "SELECT id, plan, enrolled_at, plan_from FROM installs
                     WHERE install_id = $1 FOR NO KEY UPDATE",
                    &[&install_id],
                )
                .await?
            else {
                return Ok(false);
            };
            let key: InstallKey = row.get(0);
            let current = plan_from(row.get(1))?;
            let current_from = row.get::<_, i64>(3).max(day_of_ms(row.get(2)));
            let set = "UPDATE installs SET plan = $2, plan_from = $3 WHERE id = $1";
            match PlanChange::of(current, current_from, plan, day) {
                PlanChange::Unchanged => {}
                PlanChange::Start => {
                    tx.execute(
                        "INSERT INTO past_plans (install, from_day, until_day, plan)
                         VALUES ($1, $2, $3, $4)",
                        &[&key, &current_from, &day, &current.as_str()],
                    )
                    .await?;
                    tx.execute(set, &[&key, &plan.as_str(), &day]).await?;
                }
                PlanChange::Replace => {
                    let resumed: Option<i64> = tx
                        .query_opt(
                            "DELETE FROM past_plans
                             WHERE install = $1 AND until_day = $2 AND plan = $3
                             RETURNING from_day",
                            &[&key, &current_from, &plan.as_str()],
                        )
                        .await?
                        .map(|row| row.get(0));
                    let from_day = resumed.unwrap_or(current_from);
                    tx.execute(set, &[&key, &plan.as_str(), &from_day]).await?;
                }
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    fn plan_history(&self, install_id: &str) -> Result<Option<PlanHistory>, ReceiverStoreError> {
        self.run(async |store| {
            let mut client = store.client().await?;
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let Some(row) = tx
                .query_opt(
                    "SELECT id, plan, enrolled_at, plan_from FROM installs WHERE install_id = $1",
                    &[&install_id],
                )
                .await?
            else {
                return Ok(None);
            };
            let key: InstallKey = row.get(0);
            let mut earlier = past_plans(&tx, Some(key), i64::MIN).await?;
            let history = history_of(&row, [1, 2, 3], earlier.remove(&key).unwrap_or_default())?;
            tx.commit().await?;
            Ok(Some(history))
        })
    }

    fn set_label(&self, install_id: &str, label: &str) -> Result<bool, ReceiverStoreError> {
        self.run(async |store| {
            let changed = store
                .client()
                .await?
                .execute(
                    "UPDATE installs SET label = $2 WHERE install_id = $1",
                    &[&install_id, &label],
                )
                .await?;
            Ok(changed == 1)
        })
    }

    fn source_usage(
        &self,
        install_id: &str,
        days: DayRange,
    ) -> Result<Vec<SourceModelDay>, ReceiverStoreError> {
        self.run(async |store| {
            let client = store.client().await?;
            let from = days.first.saturating_mul(MS_PER_DAY);
            let to = days.last.saturating_add(1).saturating_mul(MS_PER_DAY);
            let rows = client
                .query(
                    "SELECT e.source, e.model, e.created_at / 86400000 AS day,
                            count(*)::bigint, sum(e.prompt_tokens)::bigint,
                            sum(e.completion_tokens)::bigint, sum(e.cached_tokens)::bigint,
                            sum(e.cache_write_tokens)::bigint, sum(e.reasoning_tokens)::bigint
                     FROM events e JOIN installs i ON i.id = e.install
                     WHERE i.install_id = $1 AND e.created_at >= $2 AND e.created_at < $3
                     GROUP BY 1, 2, 3 ORDER BY 1, e.model COLLATE \"C\", 3",
                    &[&install_id, &from, &to],
                )
                .await?;
            rows.iter()
                .map(|row| {
                    Ok(SourceModelDay {
                        source: source_from(row.get(0))?,
                        events: count(row.get(3))?,
                        usage: ModelDayTokens {
                            model: row.get(1),
                            day: row.get(2),
                            tokens: token_counts(row, 4)?,
                        },
                    })
                })
                .collect()
        })
    }

    /// In slices, so no batch waits for the whole of it: first the install is disabled
    /// (under its row lock, which waits for a batch of it in flight), so no node stores
    /// anything more of it; then its raw events and keys go a day (a partition) at a time,
    /// each day in a transaction of its own that locks no install; last, in one
    /// transaction under its row lock, its rollups, chart sums, schedule, budget, alerts
    /// and row. An erasure cut short leaves the install disabled; erasing it again
    /// finishes the work.
    fn erase_install(&self, install_id: &str) -> Result<Option<u64>, ReceiverStoreError> {
        self.run(async |store| {
            let mut client = store.client().await?;
            let Some(row) = client
                .query_opt(
                    "UPDATE installs SET disabled = true WHERE install_id = $1 RETURNING id",
                    &[&install_id],
                )
                .await?
            else {
                return Ok(None);
            };
            let key: i64 = row.get(0);
            let span = client
                .query_one(
                    "SELECT min(created_at) / 86400000, max(created_at) / 86400000
                     FROM events WHERE install = $1",
                    &[&key],
                )
                .await?;
            let mut events = 0;
            if let (Some(first), Some(last)) = (span.get::<_, Option<i64>>(0), span.get(1)) {
                let slice_events = client
                    .prepare_cached(
                        "DELETE FROM events WHERE install = $1
                         AND created_at >= $2 AND created_at < $3",
                    )
                    .await?;
                let slice_keys = client
                    .prepare_cached(
                        "DELETE FROM event_ids WHERE install = $1
                         AND created_at >= $2 AND created_at < $3",
                    )
                    .await?;
                for day in first..=last {
                    let range = (day * MS_PER_DAY, (day + 1) * MS_PER_DAY);
                    events += client
                        .execute(&slice_events, &[&key, &range.0, &range.1])
                        .await?;
                    client
                        .execute(&slice_keys, &[&key, &range.0, &range.1])
                        .await?;
                }
            }
            let tx = client.transaction().await?;
            tx.query_opt("SELECT id FROM installs WHERE id = $1 FOR UPDATE", &[&key])
                .await?;
            // A last sweep, in case the slices missed an event (none is expected).
            events += tx
                .execute("DELETE FROM events WHERE install = $1", &[&key])
                .await?;
            tx.execute(SUBTRACT_FROM_DAILY_TOTALS, &[&key]).await?;
            for table in [
                "event_ids",
                "daily_usage",
                "request_schedule",
                "budgets",
                "alerts",
                "past_plans",
            ] {
                tx.execute(&format!("DELETE FROM {table} WHERE install = $1"), &[&key])
                    .await?;
            }
            tx.execute("DELETE FROM installs WHERE id = $1", &[&key])
                .await?;
            tx.commit().await?;
            Ok(Some(events))
        })
    }

    fn set_budget(
        &self,
        install_id: &str,
        budget: Option<&Budget>,
    ) -> Result<bool, ReceiverStoreError> {
        self.run(async |store| {
            let client = store.client().await?;
            let changed = match budget {
                Some(budget) => {
                    client
                        .execute(
                            "INSERT INTO budgets (install, monthly_micros, thresholds)
                             SELECT id, $2, $3 FROM installs WHERE install_id = $1
                             ON CONFLICT (install) DO UPDATE
                                 SET monthly_micros = excluded.monthly_micros,
                                     thresholds = excluded.thresholds",
                            &[&install_id, &budget.monthly.0, &budget.thresholds_text()],
                        )
                        .await?
                }
                None => {
                    // The install's existence, whether or not it had a budget.
                    client
                        .query_one(
                            "WITH gone AS (DELETE FROM budgets WHERE install =
                                 (SELECT id FROM installs WHERE install_id = $1))
                             SELECT count(*) FROM installs WHERE install_id = $1",
                            &[&install_id],
                        )
                        .await?
                        .get::<_, i64>(0) as u64
                }
            };
            Ok(changed == 1)
        })
    }

    fn month_spend(
        &self,
        install: InstallKey,
        days: DayRange,
        month: &str,
    ) -> Result<MonthSpend, ReceiverStoreError> {
        self.run(async |store| {
            let client = store.client().await?;
            // One statement, one snapshot: the month's rollup and its alerts.
            let rows = client
                .query(
                    r#"SELECT 0::int2, model COLLATE "C", day, prompt_tokens, completion_tokens,
                              cached_tokens, cache_write_tokens, reasoning_tokens, 0
                       FROM daily_usage WHERE install = $1 AND day >= $2 AND day <= $3
                       UNION ALL
                       SELECT 1::int2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, threshold
                       FROM alerts WHERE install = $1 AND month = $4
                       ORDER BY 1, 2, 3, 9"#,
                    &[&install, &days.first, &days.last, &month],
                )
                .await?;
            let mut spend = MonthSpend::default();
            for row in rows {
                if row.get::<_, i16>(0) == 1 {
                    spend.alerted.push(threshold_from(row.get(8))?);
                    continue;
                }
                spend.usage.push(ModelDayTokens {
                    model: row.get(1),
                    day: row.get(2),
                    tokens: token_counts(&row, 3)?,
                });
            }
            Ok(spend)
        })
    }

    fn record_alerts(&self, alerts: &[NewAlert]) -> Result<Vec<Uuid>, ReceiverStoreError> {
        self.run(async |store| {
            let client = store.client().await?;
            let mut recorded = Vec::new();
            for alert in alerts {
                // The unique (install, threshold, month) makes a second node's insert of
                // the same crossing wait for the first, then skip it. An install erased
                // meanwhile gets no alert (its row is gone).
                let inserted = client
                    .execute(
                        "INSERT INTO alerts (alert_id, install, threshold, month, cost_micros,
                             budget_micros, currency, at, next_attempt_at)
                         SELECT $1, id, $3, $4, $5, $6, $7, $8, $8 FROM installs WHERE id = $2
                         ON CONFLICT (install, threshold, month) DO NOTHING",
                        &[
                            &alert.alert_id,
                            &alert.install,
                            &(alert.threshold as i32),
                            &alert.month,
                            &alert.cost.0,
                            &alert.budget.0,
                            &alert.currency,
                            &alert.at_ms,
                        ],
                    )
                    .await?;
                if inserted == 1 {
                    recorded.push(alert.alert_id);
                }
            }
            Ok(recorded)
        })
    }

    fn alerts(&self, range: TimeRange) -> Result<Vec<Alert>, ReceiverStoreError> {
        self.run(async |store| {
            let client = store.client().await?;
            let rows = client
                .query(
                    &format!(
                        "{ALERT_COLUMNS} WHERE ($1::bigint IS NULL OR a.at >= $1)
                         AND ($2::bigint IS NULL OR a.at < $2) ORDER BY a.at, a.alert_id"
                    ),
                    &[&range.from_ms, &range.to_ms],
                )
                .await?;
            rows.iter().map(alert_row).collect()
        })
    }

    fn install_alerts(&self, install_id: &str) -> Result<Vec<Alert>, ReceiverStoreError> {
        self.run(async |store| {
            let client = store.client().await?;
            let rows = client
                .query(
                    &format!("{ALERT_COLUMNS} WHERE i.install_id = $1 ORDER BY a.at, a.alert_id"),
                    &[&install_id],
                )
                .await?;
            rows.iter().map(alert_row).collect()
        })
    }

    fn alerts_page(
        &self,
        range: TimeRange,
        after: Option<AlertCursor>,
        limit: usize,
    ) -> Result<Vec<Alert>, ReceiverStoreError> {
        self.run(async |store| {
            let client = store.client().await?;
            // No cursor: start before every alert (the nil id sorts first).
            let after = after.unwrap_or(AlertCursor {
                at_ms: i64::MIN,
                alert_id: Uuid::nil(),
            });
            let rows = client
                .query(
                    &format!(
                        "{ALERT_COLUMNS} WHERE ($1::bigint IS NULL OR a.at >= $1)
                         AND ($2::bigint IS NULL OR a.at < $2)
                         AND (a.at, a.alert_id) > ($3, $4)
                         ORDER BY a.at, a.alert_id LIMIT $5"
                    ),
                    &[
                        &range.from_ms,
                        &range.to_ms,
                        &after.at_ms,
                        &after.alert_id,
                        &i64::try_from(limit).unwrap_or(i64::MAX),
                    ],
                )
                .await?;
            rows.iter().map(alert_row).collect()
        })
    }

    fn claim_alerts(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Alert>, ReceiverStoreError> {
        self.run(async |store| {
            let client = store.client().await?;
            // SKIP LOCKED: nodes claiming at the same moment take different alerts.
            let rows = client
                .query(
                    &format!(
                        "WITH claimed AS (
                             UPDATE alerts SET next_attempt_at = $2, attempts = attempts + 1
                             WHERE alert_id IN (SELECT alert_id FROM alerts
                                 WHERE delivered_at IS NULL AND next_attempt_at <= $1
                                 ORDER BY next_attempt_at, at LIMIT $3
                                 FOR UPDATE SKIP LOCKED)
                             RETURNING *)
                         {}",
                        ALERT_COLUMNS.replace("FROM alerts a", "FROM claimed a")
                    ),
                    &[&now_ms, &now_ms.saturating_add(lease_ms), &(limit as i64)],
                )
                .await?;
            rows.iter().map(alert_row).collect()
        })
    }

    fn finish_alert(
        &self,
        alert_id: Uuid,
        outcome: DeliveryOutcome,
    ) -> Result<(), ReceiverStoreError> {
        self.run(async |store| {
            let client = store.client().await?;
            match outcome {
                DeliveryOutcome::Delivered { at_ms } => {
                    client
                        .execute(
                            "UPDATE alerts SET delivered_at = $2 WHERE alert_id = $1",
                            &[&alert_id, &at_ms],
                        )
                        .await?
                }
                DeliveryOutcome::RetryAt { at_ms } => {
                    client
                        .execute(
                            "UPDATE alerts SET next_attempt_at = $2
                             WHERE alert_id = $1 AND delivered_at IS NULL",
                            &[&alert_id, &at_ms],
                        )
                        .await?
                }
            };
            Ok(())
        })
    }

    fn fleet_model_days(&self, days: DayRange) -> Result<Vec<ModelDayTokens>, ReceiverStoreError> {
        self.run(async |store| dashboard::fleet_model_days(store, days).await)
    }

    fn user_usage(
        &self,
        install_id: &str,
        days: DayRange,
    ) -> Result<Vec<UserModelDay>, ReceiverStoreError> {
        self.run(async |store| dashboard::user_usage(store, install_id, days).await)
    }

    fn find_install_async(self: Arc<Self>, install_id: String) -> StoreFuture<Option<Install>> {
        Box::pin(async move { self.find_install_now(&install_id).await })
    }

    fn day_models_async(
        self: Arc<Self>,
        install: InstallKey,
        days: Vec<i64>,
    ) -> StoreFuture<Vec<(i64, String)>> {
        Box::pin(async move { self.day_models_now(install, &days).await })
    }

    fn take_request_async(
        self: Arc<Self>,
        install: InstallKey,
        rate: Rate,
    ) -> StoreFuture<Result<(), Duration>> {
        Box::pin(async move { self.take_request_now(install, rate).await })
    }

    fn ingest_async(
        self: Arc<Self>,
        install: InstallKey,
        events: Vec<NewEvent>,
        received_at_ms: i64,
        rate: Rate,
    ) -> StoreFuture<Result<IngestCounts, Duration>> {
        Box::pin(async move {
            self.ingest_now(install, events, received_at_ms, Some(rate))
                .await
        })
    }
}

/// The columns [`alert_row`] reads, joined to the install for its id.
const ALERT_COLUMNS: &str = "SELECT a.alert_id, i.install_id, a.threshold, a.month,
        a.cost_micros, a.budget_micros, a.currency, a.at, a.delivered_at, a.attempts, i.label
    FROM alerts a JOIN installs i ON i.id = a.install";

fn alert_row(row: &Row) -> Result<Alert, ReceiverStoreError> {
    Ok(Alert {
        alert_id: row.get(0),
        install_id: row.get(1),
        label: row.get(10),
        threshold: threshold_from(row.get(2))?,
        month: row.get(3),
        cost: Micros(row.get(4)),
        budget: Micros(row.get(5)),
        currency: row.get(6),
        at_ms: row.get(7),
        delivered_at_ms: row.get(8),
        attempts: u32::try_from(row.get::<_, i32>(9)).unwrap_or(0),
    })
}

fn threshold_from(value: i32) -> Result<u32, ReceiverStoreError> {
    u32::try_from(value).map_err(|_| {
        ReceiverStoreError::Corrupt(format!("a stored threshold is negative: {value}"))
    })
}

/// What every installations view shows of an install beside its usage.
struct InstallHead {
    key: InstallKey,
    install_id: String,
    label: Option<String>,
    /// From the first day of the month of the window's `month_start` on.
    plans: PlanHistory,
    last_seen_ms: Option<i64>,
    budget: Option<Budget>,
    /// Thresholds alerted in the month of `today`.
    alerted_in_month: Vec<u32>,
    /// Goes up whenever a batch stores usage of the install.
    usage_version: i64,
}

/// Every install (or only `only`) in install id order, with its plans over the months of
/// `window`, its budget and the thresholds alerted in the month of `window.today`.
async fn install_heads(
    client: &impl GenericClient,
    only: Option<InstallKey>,
    window: UsageWindow,
) -> Result<Vec<InstallHead>, ReceiverStoreError> {
    let today = window.today;
    let rows = client
        .query(
            r#"SELECT i.id, i.install_id, i.plan, i.last_seen, i.label, b.monthly_micros,
                      b.thresholds, i.usage_version, i.enrolled_at, i.plan_from
               FROM installs i LEFT JOIN budgets b ON b.install = i.id
               WHERE $1::bigint IS NULL OR i.id = $1"#,
            &[&only],
        )
        .await?;
    let mut earlier = past_plans(client, only, month_of(window.month_start).0).await?;
    let mut heads = Vec::with_capacity(rows.len());
    for row in rows {
        let key = row.get(0);
        heads.push(InstallHead {
            key,
            install_id: row.get(1),
            label: row.get(4),
            plans: history_of(&row, [2, 8, 9], earlier.remove(&key).unwrap_or_default())?,
            last_seen_ms: row.get(3),
            budget: Budget::from_columns(row.get(5), row.get(6))?,
            alerted_in_month: Vec::new(),
            usage_version: row.get(7),
        });
    }
    // Sorted here rather than by PostgreSQL (`COLLATE "C"`): a third of the query's time
    // at 100,000 installs. A `String`'s order is its bytes' order, as "C" sorts.
    heads.sort_unstable_by(|a, b| a.install_id.cmp(&b.install_id));
    let by_key: HashMap<InstallKey, usize> = heads
        .iter()
        .enumerate()
        .map(|(index, head)| (head.key, index))
        .collect();
    let alerted = client
        .query(
            "SELECT install, threshold FROM alerts
             WHERE month = $1 AND ($2::bigint IS NULL OR install = $2)
             ORDER BY install, threshold",
            &[&month_text(today), &only],
        )
        .await?;
    for row in alerted {
        if let Some(&index) = by_key.get(&row.get::<_, i64>(0)) {
            heads[index]
                .alerted_in_month
                .push(threshold_from(row.get(1))?);
        }
    }
    Ok(heads)
}

/// [`PostgresStore::costed_installations`] in one read-only snapshot: every install's
/// head, then each install's figures from the node's [`ViewCache`] where they still hold,
/// else read again (only the stale installs' rows, or, when there is no view yet or too
/// much changed, everything), and the chart from `daily_totals`.
async fn costed(
    store: &PostgresStore,
    install_id: Option<&str>,
    window: UsageWindow,
    prices: PriceList<'_>,
) -> Result<CostedReport, ReceiverStoreError> {
    let mut client = store.client().await?;
    let Some(only) = optional_install(&client, install_id).await? else {
        return Ok(CostedReport::default());
    };
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    tx.batch_execute("SET LOCAL work_mem = '256MB'; SET LOCAL jit = off")
        .await?;
    let heads = install_heads(&tx, only, window).await?;
    let view = ViewKey {
        window,
        prices: prices.id,
    };
    let kept = match only {
        Some(_) => None,
        None => store.views.lookup(
            view,
            heads.iter().map(|head| (head.key, head.usage_version)),
        ),
    };
    let (figures, daily) = match kept {
        Some(kept) if kept.worth_taking(heads.len()) => {
            let mut fresh = figures_of(&tx, &kept.stale, window, prices.rates).await?;
            let daily = chart_of_totals(&tx, window).await?;
            let stale = heads.iter().zip(&kept.figures).filter(|(_, f)| f.is_none());
            store.views.keep(
                view,
                stale.map(|(head, _)| {
                    let figures = fresh.get(&head.key).cloned().unwrap_or_default();
                    (head.key, head.usage_version, figures)
                }),
                false,
            );
            let figures = heads
                .iter()
                .zip(kept.figures)
                .map(|(head, kept)| kept.or_else(|| fresh.remove(&head.key)).unwrap_or_default())
                .collect();
            (figures, daily)
        }
        _ => {
            let (mut all, daily) = costed_whole(&tx, only, window, prices.rates).await?;
            let figures: Vec<InstallFigures> = heads
                .iter()
                .map(|head| all.remove(&head.key).unwrap_or_default())
                .collect();
            let daily = match only {
                Some(_) => daily,
                None => {
                    store.views.keep(
                        view,
                        heads
                            .iter()
                            .zip(&figures)
                            .map(|(head, f)| (head.key, head.usage_version, f.clone())),
                        true,
                    );
                    chart_of_totals(&tx, window).await?
                }
            };
            (figures, daily)
        }
    };
    tx.commit().await?;
    let installs = heads
        .into_iter()
        .zip(figures)
        .map(|(head, figures)| CostedInstall {
            install_id: head.install_id,
            label: head.label,
            plans: head.plans,
            last_seen_ms: head.last_seen_ms,
            events_30d: figures.events_30d,
            tokens_30d: figures.tokens_30d,
            priced: figures.priced,
            budget: head.budget,
            alerted_in_month: head.alerted_in_month,
        })
        .collect();
    Ok(CostedReport { installs, daily })
}

/// Events and tokens per day over the counted days, summed over every install from the
/// chart's totals (a day's shards together); days without events left out.
async fn chart_of_totals(
    tx: &tokio_postgres::Transaction<'_>,
    window: UsageWindow,
) -> Result<Vec<DailyTokens>, ReceiverStoreError> {
    let rows = tx
        .query(
            "SELECT day, sum(events)::bigint, sum(tokens)::bigint FROM daily_totals
             WHERE day >= $1 AND day <= $2
             GROUP BY day HAVING sum(events) <> 0 ORDER BY day",
            &[&window.from_30d, &window.today],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(DailyTokens {
                day: row.get(0),
                events: count(row.get(1))?,
                tokens: count(row.get(2))?,
            })
        })
        .collect()
}

/// The figures of `installs` from their rollup rows, costed here as
/// [`CostedReport::price`] costs them; installs without rows in the window left out.
async fn figures_of(
    tx: &tokio_postgres::Transaction<'_>,
    installs: &[InstallKey],
    window: UsageWindow,
    rates: RatesOf<'_>,
) -> Result<HashMap<InstallKey, InstallFigures>, ReceiverStoreError> {
    let mut usage: HashMap<InstallKey, (InstallFigures, Vec<ModelDayTokens>)> = HashMap::new();
    if installs.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = tx
        .query(
            "SELECT install, model, day, events, prompt_tokens, completion_tokens,
                    cached_tokens, cache_write_tokens, reasoning_tokens
             FROM daily_usage
             WHERE install = ANY($1) AND day >= least($2::bigint, $3::bigint) AND day <= $4",
            &[
                &installs,
                &window.from_30d,
                &window.month_start,
                &window.today,
            ],
        )
        .await?;
    for row in rows {
        let (figures, days) = usage.entry(row.get(0)).or_default();
        let day: i64 = row.get(2);
        let tokens = token_counts(&row, 4)?;
        if day >= window.from_30d {
            figures.events_30d = figures.events_30d.saturating_add(count(row.get(3))?);
            figures.tokens_30d = figures.tokens_30d.saturating_add(tokens.total());
        }
        if day >= window.month_start {
            days.push(ModelDayTokens {
                model: row.get(1),
                day,
                tokens,
            });
        }
    }
    Ok(usage
        .into_iter()
        .map(|(install, (mut figures, days))| {
            figures.priced = PricedUsage::of(&days, rates);
            (install, figures)
        })
        .collect())
}

/// Every install's figures (or only `only`'s) read from all rollup rows of the window:
/// one pass sums per model and day (the chart, and the (model, day) pairs to price);
/// their rates go back as arrays; a second pass costs each rollup row with them in
/// `bigint` (`numeric` for a row too large for it; half up, once per row) and sums
/// everything per install. Installs without
/// rows in the window left out.
async fn costed_whole(
    tx: &tokio_postgres::Transaction<'_>,
    only: Option<InstallKey>,
    window: UsageWindow,
    rates: RatesOf<'_>,
) -> Result<(HashMap<InstallKey, InstallFigures>, Vec<DailyTokens>), ReceiverStoreError> {
    // First pass: events and tokens per model and day, for the chart (summed over the
    // models) and the (model, day) pairs to price; a few hundred groups, so cheap to hash.
    let first_day = window.from_30d.min(window.month_start);
    let pairs = tx
        .query(
            "SELECT model, day, sum(events)::bigint,
                    sum(prompt_tokens + completion_tokens)::bigint
             FROM daily_usage
             WHERE day >= $1 AND day <= $2 AND ($3::bigint IS NULL OR install = $3)
             GROUP BY model, day",
            &[&first_day, &window.today, &only],
        )
        .await?;
    let mut daily = BTreeMap::new();
    let mut models = Vec::new();
    let mut days = Vec::new();
    let mut kinds: [Vec<i64>; 5] = Default::default();
    for row in pairs {
        let (model, day): (String, i64) = (row.get(0), row.get(1));
        if day >= window.from_30d {
            let totals = daily.entry(day).or_insert(DailyTokens {
                day,
                events: 0,
                tokens: 0,
            });
            totals.events += count(row.get(2))?;
            totals.tokens += count(row.get(3))?;
        }
        if day < window.month_start {
            continue;
        }
        if let Some(r) = rates(&model, day) {
            for (list, rate) in kinds.iter_mut().zip([
                r.input,
                r.cached_input,
                r.cache_write,
                r.output,
                r.reasoning,
            ]) {
                list.push(rate.0);
            }
            models.push(model);
            days.push(day);
        }
    }
    // Second pass, per install: the counted events and tokens, the priced tokens, and each
    // priced row's cost as `cost_at` computes it (uncached input never negative, the exact
    // sum in micro-units per million tokens, half up once). In `bigint` while every count
    // is under 2^30 and every rate under 2^31, so the five products' sum stays under 2^63;
    // a larger row in `numeric`, so no row is too large to cost here.
    let costs = tx
        .query(
            "SELECT d.install,
                    coalesce(sum(d.events) FILTER (WHERE d.day >= $1), 0)::bigint,
                    coalesce(sum(d.prompt_tokens + d.completion_tokens)
                             FILTER (WHERE d.day >= $1), 0)::bigint,
                    coalesce(sum(d.prompt_tokens + d.completion_tokens)
                             FILTER (WHERE d.day >= $2), 0)::bigint,
                    coalesce(sum(CASE
                        WHEN greatest(d.prompt_tokens, d.completion_tokens, d.cached_tokens,
                                      d.cache_write_tokens, d.reasoning_tokens) < 1073741824
                         AND greatest(r.input, r.cached, r.cache_write, r.output,
                                      r.reasoning) < 2147483648
                        THEN (greatest(d.prompt_tokens - d.cached_tokens
                                       - d.cache_write_tokens, 0) * r.input
                              + d.cached_tokens * r.cached
                              + d.cache_write_tokens * r.cache_write
                              + greatest(d.completion_tokens - d.reasoning_tokens, 0)
                                * r.output
                              + d.reasoning_tokens * r.reasoning
                              + 500000) / 1000000
                        ELSE div(greatest(d.prompt_tokens - d.cached_tokens
                                          - d.cache_write_tokens, 0)::numeric * r.input
                                 + d.cached_tokens::numeric * r.cached
                                 + d.cache_write_tokens::numeric * r.cache_write
                                 + greatest(d.completion_tokens - d.reasoning_tokens, 0)::numeric
                                   * r.output
                                 + d.reasoning_tokens::numeric * r.reasoning
                                 + 500000, 1000000)::bigint
                        END) FILTER (WHERE d.day >= $2), 0)::bigint,
                    array_agg(d.model) FILTER (WHERE r.model IS NULL AND d.day >= $2)
             FROM daily_usage d
             LEFT JOIN unnest($5::text[], $6::bigint[], $7::bigint[], $8::bigint[],
                              $9::bigint[], $10::bigint[], $11::bigint[])
                       AS r (model, day, input, cached, cache_write, output, reasoning)
                    ON r.model = d.model AND r.day = d.day
             WHERE d.day >= least($1, $2) AND d.day <= $3
               AND ($4::bigint IS NULL OR d.install = $4)
             GROUP BY d.install",
            &[
                &window.from_30d,
                &window.month_start,
                &window.today,
                &only,
                &models,
                &days,
                &kinds[0],
                &kinds[1],
                &kinds[2],
                &kinds[3],
                &kinds[4],
            ],
        )
        .await?;
    let mut figures = HashMap::with_capacity(costs.len());
    for row in costs {
        let mut unpriced: Vec<String> = row.get::<_, Option<Vec<String>>>(5).unwrap_or_default();
        // Not DISTINCT in SQL: a DISTINCT aggregate would force sorting every row.
        unpriced.sort();
        unpriced.dedup();
        figures.insert(
            row.get::<_, i64>(0),
            InstallFigures {
                events_30d: count(row.get(1))?,
                tokens_30d: count(row.get(2))?,
                priced: PricedUsage {
                    tokens: count(row.get(3))?,
                    cost: Micros(row.get(4)),
                    unpriced_models: unpriced,
                },
            },
        );
    }
    Ok((figures, daily.into_values().collect()))
}

fn received_event(row: &Row) -> Result<ReceivedEvent, ReceiverStoreError> {
    Ok(ReceivedEvent {
        install_id: row.get(0),
        event_id: row.get(2),
        user_hash: to_hex(row.get::<_, &[u8]>(3)),
        source: source_from(row.get(4))?,
        model: row.get(5),
        prompt_tokens: count(row.get(6))?,
        completion_tokens: count(row.get(7))?,
        cached_tokens: count(row.get(8))?,
        cache_write_tokens: count(row.get(9))?,
        reasoning_tokens: count(row.get(10))?,
        origin: row.get(14),
        context: row.get(11),
        created_at_ms: row.get(12),
        received_at_ms: row.get(13),
    })
}

/// A node on a fresh database of this test binary's throwaway cluster, for the unit tests.
#[cfg(test)]
pub(crate) fn test_node() -> PostgresStore {
    use std::sync::OnceLock;
    use usage_testkit::throwaway::{Durability, ThrowawayCluster};

    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    static CLUSTER: OnceLock<ThrowawayCluster> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("start the test runtime")
    });
    let cluster = CLUSTER.get_or_init(|| {
        ThrowawayCluster::start(Durability::Fast).expect("start a throwaway PostgreSQL cluster")
    });
    let url = cluster.new_database().expect("create a test database");
    PostgresStore::open(&url, runtime.handle().clone()).expect("open the test store")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::money::Micros;
    use crate::billing::price_book::Rates;
    use crate::store::usage_window;

    fn big_rates(model: &str, _day: i64) -> Option<Rates> {
        (model == "big").then(|| Rates::flat(Micros(60_000_000)))
    }

    /// A day's row whose cost per row does not fit in `bigint` before it is divided is
    /// still costed in the database, where the node keeps its figures.
    #[test]
    fn a_huge_day_row_is_costed_in_the_database() {
        let store = test_node();
        let install = NewInstall {
            install_id: "huge".into(),
            secret: Secret::generate(),
            site_hash: "site".into(),
            enrolled_at_ms: 0,
        };
        store.enroll(&install).unwrap();
        let key = store.find_install("huge").unwrap().unwrap().key;
        let now = chrono::Utc::now();
        let event = NewEvent {
            event_id: uuid::Uuid::new_v4(),
            user_hash: [1; 32],
            source: Source::Inline,
            model: "big".into(),
            prompt_tokens: 400_000_000_000,
            completion_tokens: 1,
            cached_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            origin: None,
            context: None,
            created_at_ms: now.timestamp_millis(),
        };
        store
            .ingest(key, vec![event], now.timestamp_millis())
            .unwrap();
        let window = usage_window(now);
        let prices = PriceList {
            id: 1,
            rates: &big_rates,
        };
        let costed = store
            .run(async |store| costed(store, None, window, prices).await)
            .expect("costed in the database");
        let straightforward =
            CostedReport::price(store.installations(None, window).unwrap(), prices.rates);
        assert_eq!(costed, straightforward);
        assert_eq!(costed.installs[0].priced.cost, Micros(24_000_000_000_060));
    }
}
