//! The receiver's PostgreSQL store, for a fleet of receiver nodes on one database
//! (SPEC 9): every SQL statement of it lives here and in [`migrations`].
//!
//! What makes several nodes one receiver:
//! - **dedupe in the insert**: each event's `(install, event_id)` goes into `event_ids`
//!   (`ON CONFLICT DO NOTHING`), and only the keys that went in are stored as events and
//!   added to the daily rollup, all in one statement; a second node inserting the same key
//!   at the same moment waits for the first to commit, then skips it;
//! - **the install row locked in the same statement** (`FOR NO KEY UPDATE`, as its
//!   `last_seen` is updated): batches of one install take turns, whichever node they reach,
//!   and an erasure (`FOR UPDATE`) either waits for a batch in flight, then deletes it too,
//!   or goes first, and the batch then stores nothing; a disabled install stores nothing;
//! - **the rate limit in a table** (`request_schedule`), one atomic upsert per request, in
//!   the database's clock;
//! - **nothing cached**: installs, plans and secrets are read from the database on every
//!   request.
//!
//! Raw events are partitioned by UTC day ([`partitions`]), made ahead and dropped whole
//! past retention. The trait is blocking (the handlers call it on the blocking pool), so
//! each method runs its queries on the server's runtime with [`Handle::block_on`]; the
//! pool's connections live there too.

use std::collections::BTreeMap;
use std::time::Duration;

use deadpool_postgres::tokio_postgres::{self, NoTls, Row};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio::runtime::Handle;
use uuid::Uuid;

use super::{
    CostedInstall, CostedReport, DailyTokens, DayRange, EnrollOutcome, EventCursor, EventsPage,
    EventsQuery, IngestCounts, Install, InstallKey, InstallUsage, InstallationsReport, NewEvent,
    NewInstall, RatesOf, ReceivedEvent, ReceiverStore, ReceiverStoreError, RetainedDays,
    SourceModelDay, StoreKind, Summary, SummaryQuery, SummaryRow, Totals, UsageWindow,
};
use crate::event::Source;
use crate::protocol::signing::Secret;
use crate::protocol::wire::to_hex;
use crate::receiver::pricing::{Micros, ModelDayTokens, Plan, PricedUsage, TokenCounts};
use crate::receiver::rate_limit::Rate;

mod migrations;
mod partitions;
pub mod throwaway;

const MS_PER_DAY: i64 = 86_400_000;
/// Connections per node. Ingest holds one for about one statement; more than the cores
/// of a small database server only queue inside it.
const POOL_SIZE: usize = 16;
/// How long a request waits for a connection, or for one to be made.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
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
}

impl From<tokio_postgres::Error> for ReceiverStoreError {
    fn from(error: tokio_postgres::Error) -> ReceiverStoreError {
        ReceiverStoreError::Backend(Box::new(error))
    }
}

impl From<deadpool_postgres::PoolError> for ReceiverStoreError {
    fn from(error: deadpool_postgres::PoolError) -> ReceiverStoreError {
        ReceiverStoreError::Backend(Box::new(error))
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (libpq's URL form), brings its schema up to date
    /// under a database lock, and makes the partitions of the days around today. Its
    /// connections run on `runtime`; call this from outside that runtime's tasks.
    pub fn open(url: &str, runtime: Handle) -> Result<PostgresStore, ReceiverStoreError> {
        let connect_error =
            |source: Box<dyn std::error::Error + Send + Sync>| ReceiverStoreError::Connect {
                target: redacted(url),
                source,
            };
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| connect_error(Box::new(e)))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("usage-agent receiver");
        let mut relaxed = config.clone();
        relaxed.options("-c synchronous_commit=off");
        let pool = |config, size| {
            let manager = Manager::from_config(
                config,
                NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(size)
                .wait_timeout(Some(CONNECT_TIMEOUT))
                .create_timeout(Some(CONNECT_TIMEOUT))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .map_err(|e| connect_error(Box::new(e)))
        };
        let store = PostgresStore {
            pool: pool(config, POOL_SIZE)?,
            relaxed: pool(relaxed, POOL_SIZE / 4)?,
            runtime,
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
        let today = chrono::Utc::now().timestamp_millis().div_euclid(MS_PER_DAY);
        store.maintain(RetainedDays {
            first_kept: today - crate::receiver::EVENT_RETENTION.num_days(),
            today,
        })?;
        Ok(store)
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
}

/// `url` without its password, for messages.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "the PostgreSQL URL given".to_owned(),
    }
}

fn count(value: i64) -> Result<u64, ReceiverStoreError> {
    u64::try_from(value)
        .map_err(|_| ReceiverStoreError::Corrupt(format!("a stored count is negative: {value}")))
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

/// One batch as column arrays, for `unnest`: one statement stores the whole batch.
#[derive(Default)]
struct Columns {
    event_id: Vec<Uuid>,
    user_hash: Vec<Vec<u8>>,
    source: Vec<i16>,
    model: Vec<String>,
    prompt: Vec<i64>,
    completion: Vec<i64>,
    cached: Vec<i64>,
    cache_write: Vec<i64>,
    reasoning: Vec<i64>,
    context: Vec<Option<String>>,
    created_at: Vec<i64>,
}

impl Columns {
    fn push(&mut self, event: NewEvent) {
        self.event_id.push(event.event_id);
        self.user_hash.push(event.user_hash.to_vec());
        self.source.push(source_code(event.source));
        self.model.push(event.model);
        self.prompt.push(tokens(event.prompt_tokens));
        self.completion.push(tokens(event.completion_tokens));
        self.cached.push(tokens(event.cached_tokens));
        self.cache_write.push(tokens(event.cache_write_tokens));
        self.reasoning.push(tokens(event.reasoning_tokens));
        self.context.push(event.context);
        self.created_at.push(event.created_at_ms);
    }
}

/// Stores one batch: the keys not stored yet go into `event_ids`, exactly those events into
/// `events`, and their sums into `daily_usage`, under a lock on the install's row, which
/// must exist and not be disabled. Answers (install still accepting, events stored).
const INGEST: &str = "
WITH install AS (
    SELECT id FROM installs WHERE id = $1 AND NOT disabled FOR NO KEY UPDATE
), input AS (
    SELECT * FROM unnest($3::uuid[], $4::bytea[], $5::int2[], $6::text[], $7::int8[],
                         $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::text[],
                         $13::int8[])
        AS t(event_id, user_hash, source, model, prompt_tokens, completion_tokens,
             cached_tokens, cache_write_tokens, reasoning_tokens, context, created_at)
), fresh AS (
    INSERT INTO event_ids (install, event_id, created_at)
    SELECT install.id, input.event_id, input.created_at FROM input, install
    ORDER BY input.event_id
    ON CONFLICT DO NOTHING
    RETURNING event_id
), stored AS (
    INSERT INTO events (install, event_id, user_hash, source, model, prompt_tokens,
                        completion_tokens, cached_tokens, cache_write_tokens,
                        reasoning_tokens, context, created_at, received_at)
    SELECT $1, i.event_id, i.user_hash, i.source, i.model, i.prompt_tokens,
           i.completion_tokens, i.cached_tokens, i.cache_write_tokens, i.reasoning_tokens,
           i.context, i.created_at, $2
    FROM input i JOIN fresh USING (event_id)
    RETURNING created_at, model, prompt_tokens, completion_tokens, cached_tokens,
              cache_write_tokens, reasoning_tokens
), rolled AS (
    INSERT INTO daily_usage AS d (install, day, model, events, prompt_tokens,
                                  completion_tokens, cached_tokens, cache_write_tokens,
                                  reasoning_tokens)
    SELECT $1, created_at / 86400000, model, count(*), sum(prompt_tokens),
           sum(completion_tokens), sum(cached_tokens), sum(cache_write_tokens),
           sum(reasoning_tokens)
    FROM stored GROUP BY 2, 3 ORDER BY 2, 3
    ON CONFLICT (install, day, model) DO UPDATE SET
        events = d.events + excluded.events,
        prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = d.completion_tokens + excluded.completion_tokens,
        cached_tokens = d.cached_tokens + excluded.cached_tokens,
        cache_write_tokens = d.cache_write_tokens + excluded.cache_write_tokens,
        reasoning_tokens = d.reasoning_tokens + excluded.reasoning_tokens
), seen AS (
    UPDATE installs SET last_seen = $2 WHERE id = (SELECT id FROM install)
)
SELECT (SELECT count(*) FROM install), (SELECT count(*) FROM stored)";

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
                    "INSERT INTO installs (install_id, secret, site_hash, enrolled_at)
                     VALUES ($1, $2, $3, $4) ON CONFLICT (install_id) DO NOTHING",
                    &[
                        &install.install_id,
                        &install.secret.to_whsec(),
                        &install.site_hash,
                        &install.enrolled_at_ms,
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
        self.run(async |store| {
            let client = store.client().await?;
            let statement = client
                .prepare_cached("SELECT id, secret, disabled FROM installs WHERE install_id = $1")
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
            }))
        })
    }

    fn ingest(
        &self,
        install: InstallKey,
        events: Vec<NewEvent>,
        received_at_ms: i64,
    ) -> Result<IngestCounts, ReceiverStoreError> {
        let sent = events.len() as u64;
        // Within a batch the first occurrence of an id counts; the rest are duplicates.
        let mut seen = std::collections::HashSet::with_capacity(events.len());
        let mut columns = Columns::default();
        for event in events {
            if seen.insert(event.event_id) {
                columns.push(event);
            }
        }
        self.run(async |store| {
            let client = store.client().await?;
            let statement = client.prepare_cached(INGEST).await?;
            let c = &columns;
            let row = client
                .query_one(
                    &statement,
                    &[
                        &install,
                        &received_at_ms,
                        &c.event_id,
                        &c.user_hash,
                        &c.source,
                        &c.model,
                        &c.prompt,
                        &c.completion,
                        &c.cached,
                        &c.cache_write,
                        &c.reasoning,
                        &c.context,
                        &c.created_at,
                    ],
                )
                .await?;
            if row.get::<_, i64>(0) == 0 {
                return Err(ReceiverStoreError::InstallGone);
            }
            let accepted = count(row.get(1))?;
            Ok(IngestCounts {
                accepted,
                duplicates: sent - accepted,
            })
        })
    }

    fn take_request(
        &self,
        install: InstallKey,
        rate: Rate,
    ) -> Result<Result<(), Duration>, ReceiverStoreError> {
        let Some(interval) = rate.interval() else {
            return Ok(Ok(()));
        };
        let interval_ms = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX);
        let burst_ms = i64::try_from(rate.burst().as_millis()).unwrap_or(i64::MAX);
        self.run(async |store| {
            let client = store.relaxed.get().await?;
            // The schedule moves on only when the request fits in the burst; the row lock
            // makes two nodes' requests of one install take turns.
            let statement = client
                .prepare_cached(
                    "INSERT INTO request_schedule AS s (install, next_at_ms)
                     VALUES ($1, (extract(epoch FROM statement_timestamp()) * 1000)::bigint + $2)
                     ON CONFLICT (install) DO UPDATE SET next_at_ms = greatest(s.next_at_ms,
                         (extract(epoch FROM statement_timestamp()) * 1000)::bigint) + $2
                     WHERE s.next_at_ms
                         - (extract(epoch FROM statement_timestamp()) * 1000)::bigint <= $3
                     RETURNING next_at_ms",
                )
                .await?;
            if client
                .query_opt(&statement, &[&install, &interval_ms, &burst_ms])
                .await?
                .is_some()
            {
                return Ok(Ok(()));
            }
            let ahead: i64 = client
                .query_one(
                    "SELECT next_at_ms - (extract(epoch FROM statement_timestamp()) * 1000)::bigint
                     FROM request_schedule WHERE install = $1",
                    &[&install],
                )
                .await?
                .get(0);
            let wait_ms = u64::try_from(ahead - burst_ms).unwrap_or(0).max(1);
            Ok(Err(Duration::from_millis(wait_ms)))
        })
    }

    fn summary(&self, query: &SummaryQuery) -> Result<Summary, ReceiverStoreError> {
        self.run(async |store| {
            let client = store.client().await?;
            let Some(only) = optional_install(&client, query.install_id.as_deref()).await? else {
                return Ok(Summary::default());
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
            let key_columns: String = keys.iter().map(|k| format!("{k}, ")).collect();
            let group_clause = if keys.is_empty() {
                String::new()
            } else {
                format!("GROUP BY {0} ORDER BY {0}", keys.join(", "))
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
                 {group_clause}"
            );
            let from = query.range.from_ms.unwrap_or(i64::MIN);
            let to = query.range.to_ms.unwrap_or(i64::MAX);
            let rows = client.query(&sql, &[&only, &from, &to]).await?;
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
                let events = count(row.get(next()))?;
                let prompt_tokens = count(row.get(next()))?;
                let completion_tokens = count(row.get(next()))?;
                summary.add_row(
                    SummaryRow {
                        day,
                        user_hash,
                        source,
                        model,
                        totals: Totals::of(events, prompt_tokens, completion_tokens),
                    },
                    group.any(),
                );
            }
            Ok(summary)
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
                            e.received_at
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
            let mut by_key = std::collections::HashMap::new();
            let installs = client
                .query(
                    r#"SELECT id, install_id, plan, last_seen, label FROM installs
                       WHERE $1::bigint IS NULL OR id = $1 ORDER BY install_id COLLATE "C""#,
                    &[&only],
                )
                .await?;
            for row in installs {
                by_key.insert(row.get::<_, i64>(0), report.installs.len());
                report.installs.push(InstallUsage {
                    install_id: row.get(1),
                    label: row.get(4),
                    plan: plan_from(row.get(2))?,
                    last_seen_ms: row.get(3),
                    events_30d: 0,
                    tokens_30d: 0,
                    usage_mtd: Vec::new(),
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
                let kinds = TokenCounts {
                    prompt: count(row.get(5))?,
                    completion: count(row.get(6))?,
                    cached: count(row.get(7))?,
                    cache_write: count(row.get(8))?,
                    reasoning: count(row.get(9))?,
                };
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
    /// with them in `bigint` (half up, once per row) and sums everything per install. Both in one snapshot. A sum past `bigint` is an error in PostgreSQL, and
    /// then the straightforward computation answers instead, so the answer is always
    /// exactly [`CostedReport::price`]'s.
    fn costed_installations(
        &self,
        install_id: Option<&str>,
        window: UsageWindow,
        rates: RatesOf<'_>,
    ) -> Result<CostedReport, ReceiverStoreError> {
        match self.run(async |store| costed(store, install_id, window, rates).await) {
            Err(ReceiverStoreError::Backend(error))
                if error
                    .downcast_ref::<tokio_postgres::Error>()
                    .and_then(tokio_postgres::Error::code)
                    == Some(&tokio_postgres::error::SqlState::NUMERIC_VALUE_OUT_OF_RANGE) =>
            {
                Ok(CostedReport::price(
                    self.installations(install_id, window)?,
                    rates,
                ))
            }
            other => other,
        }
    }

    fn set_plan(&self, install_id: &str, plan: Plan) -> Result<bool, ReceiverStoreError> {
        self.run(async |store| {
            let changed = store
                .client()
                .await?
                .execute(
                    "UPDATE installs SET plan = $2 WHERE install_id = $1",
                    &[&install_id, &plan.as_str()],
                )
                .await?;
            Ok(changed == 1)
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
                            tokens: TokenCounts {
                                prompt: count(row.get(4))?,
                                completion: count(row.get(5))?,
                                cached: count(row.get(6))?,
                                cache_write: count(row.get(7))?,
                                reasoning: count(row.get(8))?,
                            },
                        },
                    })
                })
                .collect()
        })
    }

    fn erase_install(&self, install_id: &str) -> Result<Option<u64>, ReceiverStoreError> {
        self.run(async |store| {
            let mut client = store.client().await?;
            let tx = client.transaction().await?;
            // The row lock waits for a batch of this install in flight (it holds a lock on
            // the row), and makes any later one find no install.
            let Some(row) = tx
                .query_opt(
                    "SELECT id FROM installs WHERE install_id = $1 FOR UPDATE",
                    &[&install_id],
                )
                .await?
            else {
                return Ok(None);
            };
            let key: i64 = row.get(0);
            let events = tx
                .execute("DELETE FROM events WHERE install = $1", &[&key])
                .await?;
            for table in ["event_ids", "daily_usage", "request_schedule"] {
                tx.execute(&format!("DELETE FROM {table} WHERE install = $1"), &[&key])
                    .await?;
            }
            tx.execute("DELETE FROM installs WHERE id = $1", &[&key])
                .await?;
            tx.commit().await?;
            Ok(Some(events))
        })
    }
}

/// [`PostgresStore::costed_installations`] in one read-only snapshot.
async fn costed(
    store: &PostgresStore,
    install_id: Option<&str>,
    window: UsageWindow,
    rates: RatesOf<'_>,
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
    let mut report = CostedReport::default();
    let mut by_key = std::collections::HashMap::new();
    let installs = tx
        .query(
            r#"SELECT id, install_id, plan, last_seen, label FROM installs
               WHERE $1::bigint IS NULL OR id = $1 ORDER BY install_id COLLATE "C""#,
            &[&only],
        )
        .await?;
    for row in installs {
        by_key.insert(row.get::<_, i64>(0), report.installs.len());
        report.installs.push(CostedInstall {
            install_id: row.get(1),
            label: row.get(4),
            plan: plan_from(row.get(2))?,
            last_seen_ms: row.get(3),
            events_30d: 0,
            tokens_30d: 0,
            priced: PricedUsage::default(),
        });
    }
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
    // sum in micro-units per million tokens, half up once).
    let costs = tx
        .query(
            "SELECT d.install,
                    coalesce(sum(d.events) FILTER (WHERE d.day >= $1), 0)::bigint,
                    coalesce(sum(d.prompt_tokens + d.completion_tokens)
                             FILTER (WHERE d.day >= $1), 0)::bigint,
                    coalesce(sum(d.prompt_tokens + d.completion_tokens)
                             FILTER (WHERE d.day >= $2), 0)::bigint,
                    coalesce(sum((greatest(d.prompt_tokens - d.cached_tokens
                                           - d.cache_write_tokens, 0) * r.input
                                  + d.cached_tokens * r.cached
                                  + d.cache_write_tokens * r.cache_write
                                  + greatest(d.completion_tokens - d.reasoning_tokens, 0)
                                    * r.output
                                  + d.reasoning_tokens * r.reasoning
                                  + 500000) / 1000000) FILTER (WHERE d.day >= $2), 0)::bigint,
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
    tx.commit().await?;
    for row in costs {
        let Some(&index) = by_key.get(&row.get::<_, i64>(0)) else {
            continue;
        };
        let install = &mut report.installs[index];
        install.events_30d = count(row.get(1))?;
        install.tokens_30d = count(row.get(2))?;
        let priced = &mut install.priced;
        priced.tokens = count(row.get(3))?;
        priced.cost = Micros(row.get(4));
        let mut unpriced: Vec<String> = row.get::<_, Option<Vec<String>>>(5).unwrap_or_default();
        // Not DISTINCT in SQL: a DISTINCT aggregate would force sorting every row.
        unpriced.sort();
        unpriced.dedup();
        priced.unpriced_models = unpriced;
    }
    report.daily = daily.into_values().collect();
    Ok(report)
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
        context: row.get(11),
        created_at_ms: row.get(12),
        received_at_ms: row.get(13),
    })
}
