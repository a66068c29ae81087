//! One suite of store tests, run against both stores: every answer of the receiver is
//! the same on SQLite and on PostgreSQL. Each test is a function of a
//! `&dyn ReceiverStore`; [`suite!`] runs it on a fresh SQLite file and on a fresh database
//! of a throwaway PostgreSQL cluster shared by the test binary.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use uuid::Uuid;

use usage_protocol::event::Source;
use usage_protocol::signing::Secret;
use usage_receiver::billing::money::Micros;
use usage_receiver::billing::price_book::Rates;
use usage_receiver::billing::pricing::{ModelDayTokens, Plan, TokenCounts};
use usage_receiver::days::MS_PER_DAY;
use usage_receiver::store::postgres::PostgresStore;
use usage_receiver::store::rate_limit::Rate;
use usage_receiver::store::sqlite::SqliteStore;
use usage_receiver::store::*;
use usage_testkit::throwaway::{Durability, ThrowawayCluster};

/// The store's own test data, shared with its unit tests; it names the store's types as
/// `crate::store::...`, which this module provides here.
#[path = "../src/store/fixtures.rs"]
mod fixtures;
mod store {
    pub use usage_receiver::store::*;
}
use fixtures::{enroll, enroll_at, event};

/// A store under test and what must live as long as it.
pub struct TestStore {
    pub store: Arc<dyn ReceiverStore>,
    _dir: Option<tempfile::TempDir>,
}

impl std::ops::Deref for TestStore {
    type Target = dyn ReceiverStore;
    fn deref(&self) -> &Self::Target {
        &*self.store
    }
}

pub fn sqlite_store() -> TestStore {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("nested/receiver.db")).unwrap();
    TestStore {
        store: Arc::new(store),
        _dir: Some(dir),
    }
}

/// The runtime the PostgreSQL stores of the unit tests run their connections on.
pub fn test_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// The test binary's cluster, stopped when the binary ends (see [`ThrowawayCluster`]).
pub fn test_cluster() -> &'static ThrowawayCluster {
    static CLUSTER: OnceLock<ThrowawayCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        ThrowawayCluster::start(Durability::Fast).expect("start a throwaway PostgreSQL cluster")
    })
}

/// A fresh database of the test cluster, and a store ("node") on it.
pub fn postgres_url() -> String {
    test_cluster().new_database().unwrap()
}

pub fn postgres_node(url: &str) -> PostgresStore {
    PostgresStore::open(url, test_runtime().handle().clone()).unwrap()
}

pub fn postgres_store() -> TestStore {
    TestStore {
        store: Arc::new(postgres_node(&postgres_url())),
        _dir: None,
    }
}

macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        mod on_sqlite {
            $( #[test] fn $test() { super::$test(&*super::sqlite_store()) } )*
        }
        mod on_postgres {
            $( #[test] fn $test() { super::$test(&*super::postgres_store()) } )*
        }
    };
}

suite!(
    enrollment_is_idempotent_and_never_replaces_a_secret,
    ingest_dedupes_across_and_within_batches_per_install,
    summary_groups_and_filters,
    summary_groups_by_origin_and_raw_events_keep_it,
    events_page_walks_every_event_once_in_time_order,
    rollups_follow_ingest_and_skip_duplicates,
    the_rollup_keeps_every_token_kind_per_model_and_day,
    plans_change_and_erasure_removes_everything,
    retention_keeps_the_days_from_the_first_kept_one,
    an_install_erased_meanwhile_stores_nothing,
    the_request_allowance_is_the_stores,
    concurrent_batches_count_each_event_once,
    the_store_names_itself_and_answers_a_ping,
    budgets_are_set_read_with_the_install_and_removed,
    an_alert_is_recorded_once_per_install_threshold_and_month,
    an_installs_alerts_are_its_own_oldest_first,
    alerts_are_claimed_once_until_their_lease_ends_and_delivered,
    erasure_removes_the_budget_and_alerts,
    labels_are_stored_shown_and_erased,
    a_period_window_counts_and_prices_the_same_days,
    source_usage_groups_one_installs_raw_events_by_source_model_and_day,
    costed_installations_equal_the_straightforward_pricing,
    views_follow_every_change_of_usage_prices_and_installs,
    kept_views_follow_plans_new_days_and_reused_install_keys,
    the_fleets_model_days_sum_every_install_and_follow_changes,
    user_usage_groups_one_installs_raw_events_by_user_model_and_day,
    plan_history_starts_at_enrollment_and_keeps_each_days_plan,
);

fn model_event(n: u8, day: i64, model: &str, tokens: u64) -> NewEvent {
    NewEvent {
        model: model.into(),
        prompt_tokens: tokens,
        completion_tokens: 0,
        ..event(n, day * MS_PER_DAY + 1000)
    }
}

fn enrollment_is_idempotent_and_never_replaces_a_secret(store: &dyn ReceiverStore) {
    let first = NewInstall {
        install_id: "a".into(),
        secret: Secret::generate(),
        site_hash: "h".into(),
        enrolled_at_ms: 1,
    };
    assert_eq!(store.enroll(&first).unwrap(), EnrollOutcome::Created);
    assert_eq!(
        store.enroll(&first).unwrap(),
        EnrollOutcome::AlreadyEnrolled
    );
    let other = NewInstall {
        secret: Secret::generate(),
        ..first.clone()
    };
    assert_eq!(store.enroll(&other).unwrap(), EnrollOutcome::Conflict);
    assert_eq!(
        store.find_install("a").unwrap().unwrap().secret,
        first.secret
    );
    assert!(store.find_install("b").unwrap().is_none());
}

fn ingest_dedupes_across_and_within_batches_per_install(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    let b = enroll(store, "b");
    let batch = [event(1, 1000), event(2, 2000), event(1, 1000)];
    let counts = store.ingest(a.key, batch.to_vec(), 5).unwrap();
    assert_eq!(
        counts,
        IngestCounts {
            accepted: 2,
            duplicates: 1
        }
    );
    let again = store.ingest(a.key, batch.to_vec(), 6).unwrap();
    assert_eq!(
        again,
        IngestCounts {
            accepted: 0,
            duplicates: 3
        }
    );
    // The same event id from another install is another event.
    assert_eq!(
        store
            .ingest(b.key, batch[..1].to_vec(), 7)
            .unwrap()
            .accepted,
        1
    );
    let all = store.summary(&SummaryQuery::default()).unwrap();
    assert_eq!(all.totals.events, 3);
    assert!(all.rows.is_empty());
}

fn summary_groups_and_filters(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    let b = enroll(store, "b");
    store
        .ingest(
            a.key,
            vec![event(1, 0), event(2, MS_PER_DAY), event(3, MS_PER_DAY + 5)],
            0,
        )
        .unwrap();
    store.ingest(b.key, vec![event(4, 0)], 0).unwrap();
    let query = SummaryQuery {
        install_id: Some("a".into()),
        range: TimeRange::default(),
        group_by: SummaryGroupBy {
            day: true,
            ..SummaryGroupBy::default()
        },
    };
    let summary = store.summary(&query).unwrap();
    assert_eq!(summary.totals.events, 3);
    assert_eq!(summary.totals.total_tokens, 30 + 1 + 2 + 3);
    let days: Vec<_> = summary
        .rows
        .iter()
        .map(|r| (r.day, r.totals.events))
        .collect();
    assert_eq!(days, [(Some(0), 1), (Some(1), 2)]);
    let ranged = SummaryQuery {
        range: TimeRange {
            from_ms: Some(MS_PER_DAY),
            to_ms: None,
        },
        group_by: SummaryGroupBy {
            source: true,
            user: true,
            model: true,
            day: false,
            origin: false,
        },
        install_id: None,
    };
    let summary = store.summary(&ranged).unwrap();
    assert_eq!(summary.totals.events, 2);
    assert!(
        summary
            .rows
            .iter()
            .all(|r| r.model.as_deref() == Some("m") && r.day.is_none())
    );
    let unknown = SummaryQuery {
        install_id: Some("zzz".into()),
        ..SummaryQuery::default()
    };
    assert_eq!(store.summary(&unknown).unwrap(), Summary::default());
}

fn summary_groups_by_origin_and_raw_events_keep_it(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    let with = |n: u8, day: i64, origin: Option<&str>| NewEvent {
        origin: origin.map(str::to_owned),
        ..event(n, day * MS_PER_DAY + i64::from(n))
    };
    let first = vec![
        with(1, 0, Some("theme:acme")),
        with(2, 0, None),
        with(3, 1, Some("plugin:ai-alt-text")),
        with(4, 1, Some("theme:acme")),
    ];
    store.ingest(a.key, first, 0).unwrap();
    // A batch sent again with one new event: the path that skips stored keys keeps it too.
    let again = vec![with(4, 1, Some("theme:acme")), with(5, 1, Some("core"))];
    let counts = store.ingest(a.key, again, 0).unwrap();
    assert_eq!((counts.accepted, counts.duplicates), (1, 1));

    let summary = |group_by| {
        store
            .summary(&SummaryQuery {
                install_id: None,
                range: TimeRange::default(),
                group_by,
            })
            .unwrap()
    };
    let by_origin = summary(SummaryGroupBy {
        origin: true,
        ..SummaryGroupBy::default()
    });
    let rows: Vec<(Option<&str>, u64)> = by_origin
        .rows
        .iter()
        .map(|r| (r.origin.as_ref().unwrap().as_deref(), r.totals.events))
        .collect();
    // Events without an origin come first on both stores.
    assert_eq!(
        rows,
        [
            (None, 1),
            (Some("core"), 1),
            (Some("plugin:ai-alt-text"), 1),
            (Some("theme:acme"), 2)
        ]
    );
    assert_eq!(by_origin.totals.events, 5);

    let by_day = summary(SummaryGroupBy {
        day: true,
        origin: true,
        model: true,
        ..SummaryGroupBy::default()
    });
    let rows: Vec<(i64, Option<&str>, u64)> = by_day
        .rows
        .iter()
        .map(|r| {
            assert_eq!(r.model.as_deref(), Some("m"));
            (
                r.day.unwrap(),
                r.origin.as_ref().unwrap().as_deref(),
                r.totals.completion_tokens,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (0, None, 2),
            (0, Some("theme:acme"), 1),
            (1, Some("core"), 5),
            (1, Some("plugin:ai-alt-text"), 3),
            (1, Some("theme:acme"), 4)
        ]
    );
    let ungrouped = summary(SummaryGroupBy {
        model: true,
        ..SummaryGroupBy::default()
    });
    assert!(ungrouped.rows.iter().all(|r| r.origin.is_none()));

    let page = store
        .events_page(&EventsQuery {
            install_id: None,
            range: TimeRange::default(),
            limit: 10,
            after: None,
        })
        .unwrap();
    let origins: Vec<Option<&str>> = page.events.iter().map(|e| e.origin.as_deref()).collect();
    assert_eq!(
        origins,
        [
            Some("theme:acme"),
            None,
            Some("plugin:ai-alt-text"),
            Some("theme:acme"),
            Some("core")
        ]
    );
}

fn events_page_walks_every_event_once_in_time_order(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    let b = enroll(store, "b");
    // Two events share a timestamp across installs, to exercise the tie-break.
    store
        .ingest(a.key, vec![event(5, 300), event(6, 100), event(7, 200)], 0)
        .unwrap();
    store
        .ingest(b.key, vec![event(8, 200), event(9, 400)], 0)
        .unwrap();
    let mut seen = Vec::new();
    let mut after = None;
    for _ in 0..10 {
        let page = store
            .events_page(&EventsQuery {
                install_id: None,
                range: TimeRange::default(),
                limit: 2,
                after,
            })
            .unwrap();
        seen.extend(page.events.iter().map(|e| e.created_at_ms));
        match page.next {
            Some(cursor) => after = Some(cursor),
            None => break,
        }
    }
    assert_eq!(seen, [100, 200, 200, 300, 400]);
}

fn rollups_follow_ingest_and_skip_duplicates(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    let b = enroll(store, "b");
    // Day 100 is "today"; the month started on day 95; 30 days start on day 71.
    let window = UsageWindow {
        today: 100,
        from_30d: 71,
        month_start: 95,
    };
    let batch = [
        model_event(1, 100, "x", 10),
        model_event(2, 100, "x", 20),
        model_event(3, 95, "y", 5),
        model_event(4, 94, "x", 1000),  // 30d, not this month
        model_event(5, 70, "x", 9999),  // neither
        model_event(6, 101, "x", 7777), // after today
    ];
    store.ingest(a.key, batch.to_vec(), 42).unwrap();
    // Sent again (and one repeat inside the batch): nothing is counted twice.
    let again = store.ingest(a.key, vec![batch[0].clone(), batch[0].clone()], 43);
    assert_eq!(again.unwrap().duplicates, 2);
    store
        .ingest(b.key, vec![model_event(7, 99, "y", 1)], 44)
        .unwrap();

    let report = store.installations(None, window).unwrap();
    let rows = &report.installs;
    assert_eq!(rows.len(), 2);
    let a_row = &rows[0];
    assert_eq!(a_row.install_id, "a");
    assert_eq!(a_row.plans.current(), Plan::Free);
    assert_eq!(a_row.last_seen_ms, Some(43));
    assert_eq!((a_row.events_30d, a_row.tokens_30d), (4, 1035));
    let prompt = |model: &str, day, prompt| ModelDayTokens {
        model: model.into(),
        day,
        tokens: TokenCounts {
            prompt,
            ..TokenCounts::default()
        },
    };
    assert_eq!(a_row.usage_mtd, [prompt("x", 100, 30), prompt("y", 95, 5)]);
    assert_eq!(rows[1].usage_mtd, [prompt("y", 99, 1)]);

    // The chart: the 30 days summed over every install.
    let tokens: Vec<_> = report.daily.iter().map(|d| (d.day, d.tokens)).collect();
    assert_eq!(tokens, [(94, 1000), (95, 5), (99, 1), (100, 30)]);

    let only_b = store.installations(Some("b"), window).unwrap();
    assert_eq!(only_b.installs.len(), 1);
    assert_eq!(only_b.daily.len(), 1);
    let unknown = store.installations(Some("zz"), window).unwrap();
    assert!(unknown.installs.is_empty() && unknown.daily.is_empty());
}

fn kinds_event(n: u8, day: i64, model: &str, kinds: [u64; 5]) -> NewEvent {
    let [prompt, completion, cached, cache_write, reasoning] = kinds;
    NewEvent {
        model: model.into(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        cached_tokens: cached,
        cache_write_tokens: cache_write,
        reasoning_tokens: reasoning,
        ..event(n, day * MS_PER_DAY + i64::from(n))
    }
}

fn the_rollup_keeps_every_token_kind_per_model_and_day(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    let window = UsageWindow {
        today: 40,
        from_30d: 11,
        month_start: 31,
    };
    let first = [
        kinds_event(1, 32, "x", [100, 50, 30, 20, 10]),
        kinds_event(2, 32, "x", [10, 5, 1, 2, 3]),
        kinds_event(3, 33, "x", [7, 7, 0, 7, 0]),
        kinds_event(4, 32, "y", [1, 1, 1, 0, 1]),
        // Before the month: in the 30 days only.
        kinds_event(5, 30, "x", [1000, 0, 1000, 0, 0]),
    ];
    store.ingest(a.key, first.to_vec(), 1).unwrap();
    // A later batch adds to the same day and model; its resent event adds nothing.
    let second = [kinds_event(6, 32, "x", [1, 1, 1, 1, 1]), first[0].clone()];
    let counts = store.ingest(a.key, second.to_vec(), 2).unwrap();
    assert_eq!((counts.accepted, counts.duplicates), (1, 1));

    let report = store.installations(Some("a"), window).unwrap();
    let install = &report.installs[0];
    let day = |model: &str, day, [prompt, completion, cached, cache_write, reasoning]: [u64; 5]| {
        ModelDayTokens {
            model: model.into(),
            day,
            tokens: TokenCounts {
                prompt,
                completion,
                cached,
                cache_write,
                reasoning,
            },
        }
    };
    assert_eq!(
        install.usage_mtd,
        [
            day("x", 32, [111, 56, 32, 23, 14]),
            day("x", 33, [7, 7, 0, 7, 0]),
            day("y", 32, [1, 1, 1, 0, 1]),
        ]
    );
    assert_eq!(install.events_30d, 6);
    assert_eq!(install.tokens_30d, 111 + 56 + 14 + 2 + 1000);
}

fn plans_change_and_erasure_removes_everything(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    enroll(store, "b");
    store
        .ingest(a.key, vec![model_event(1, 10, "x", 5)], 0)
        .unwrap();
    assert!(store.set_plan("a", Plan::Agency, 5).unwrap());
    assert!(!store.set_plan("nope", Plan::Pro, 5).unwrap());
    let window = UsageWindow {
        today: 10,
        from_30d: 0,
        month_start: 0,
    };
    assert_eq!(
        store.installations(Some("a"), window).unwrap().installs[0]
            .plans
            .current(),
        Plan::Agency
    );

    assert_eq!(store.erase_install("a").unwrap(), Some(1));
    assert_eq!(store.erase_install("a").unwrap(), None);
    assert!(store.find_install("a").unwrap().is_none());
    let after = store.installations(None, window).unwrap();
    assert_eq!(after.installs.len(), 1);
    assert!(after.daily.is_empty());
    assert_eq!(
        store
            .summary(&SummaryQuery::default())
            .unwrap()
            .totals
            .events,
        0
    );
    assert!(store.find_install("b").unwrap().is_some());
}

fn labels_are_stored_shown_and_erased(store: &dyn ReceiverStore) {
    enroll(store, "a");
    enroll(store, "b");
    let window = DayRange { first: 0, last: 10 }.as_window();
    let labels = |store: &dyn ReceiverStore| -> Vec<Option<String>> {
        let report = store.installations(None, window).unwrap();
        report.installs.into_iter().map(|i| i.label).collect()
    };
    assert_eq!(labels(store), [None, None]);
    let label = "Ünïcode shop, \"quoted\" & <b>";
    assert!(store.set_label("a", label).unwrap());
    assert!(!store.set_label("nope", "x").unwrap());
    assert_eq!(labels(store), [Some(label.to_owned()), None]);
    assert!(store.set_label("a", "renamed").unwrap());
    assert_eq!(labels(store), [Some("renamed".to_owned()), None]);
    store.erase_install("a").unwrap();
    // Enrolled again, the id starts without a label.
    enroll(store, "a");
    assert_eq!(labels(store), [None, None]);
}

fn a_period_window_counts_and_prices_the_same_days(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    store
        .ingest(
            a.key,
            vec![
                model_event(1, 9, "x", 5),
                model_event(2, 10, "x", 7),
                model_event(3, 12, "y", 11),
                model_event(4, 13, "x", 13),
            ],
            0,
        )
        .unwrap();
    let report = store
        .installations(
            None,
            DayRange {
                first: 10,
                last: 12,
            }
            .as_window(),
        )
        .unwrap();
    let install = &report.installs[0];
    assert_eq!((install.events_30d, install.tokens_30d), (2, 18));
    let priced: Vec<(&str, i64)> = install
        .usage_mtd
        .iter()
        .map(|u| (u.model.as_str(), u.day))
        .collect();
    assert_eq!(priced, [("x", 10), ("y", 12)]);
    let days: Vec<i64> = report.daily.iter().map(|d| d.day).collect();
    assert_eq!(days, [10, 12]);
}

fn source_usage_groups_one_installs_raw_events_by_source_model_and_day(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    let b = enroll(store, "b");
    let kinds = |n: u8, day: i64, model: &str, source: Source| NewEvent {
        source,
        cached_tokens: 2,
        cache_write_tokens: 1,
        reasoning_tokens: u64::from(n) / 2,
        ..model_event(n, day, model, 10)
    };
    store
        .ingest(
            a.key,
            vec![
                kinds(1, 5, "x", Source::Bulk),
                kinds(2, 5, "x", Source::Bulk),
                kinds(3, 5, "x", Source::Inline),
                kinds(4, 6, "B", Source::Bulk),
                kinds(5, 7, "x", Source::Bulk),
            ],
            0,
        )
        .unwrap();
    store
        .ingest(b.key, vec![kinds(6, 5, "x", Source::Bulk)], 0)
        .unwrap();
    let groups = store
        .source_usage("a", DayRange { first: 5, last: 6 })
        .unwrap();
    let seen: Vec<(Source, &str, i64, u64, TokenCounts)> = groups
        .iter()
        .map(|g| {
            (
                g.source,
                g.usage.model.as_str(),
                g.usage.day,
                g.events,
                g.usage.tokens,
            )
        })
        .collect();
    let tokens = |n: u64, completion: u64, reasoning: u64| TokenCounts {
        prompt: 10 * n,
        completion,
        cached: 2 * n,
        cache_write: n,
        reasoning,
    };
    // Sources in code order (inline before bulk), models bytewise ("B" before "x").
    let mut expected = vec![
        (Source::Bulk, "B", 6, 1, tokens(1, 0, 2)),
        (Source::Bulk, "x", 5, 2, tokens(2, 0, 1)),
        (Source::Inline, "x", 5, 1, tokens(1, 0, 1)),
    ];
    expected.sort_by_key(|e| (e.0.code(), e.1.to_owned(), e.2));
    assert_eq!(seen, expected);
    assert!(
        store
            .source_usage("nope", DayRange { first: 0, last: 9 })
            .unwrap()
            .is_empty()
    );
}

fn the_fleets_model_days_sum_every_install_and_follow_changes(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    let b = enroll(store, "b");
    let kinds = |n: u8, day: i64, model: &str| NewEvent {
        cached_tokens: 2,
        reasoning_tokens: 1,
        completion_tokens: 3,
        ..model_event(n, day, model, 10)
    };
    store
        .ingest(
            a.key,
            vec![kinds(1, 5, "x"), kinds(2, 6, "x"), kinds(3, 6, "B")],
            0,
        )
        .unwrap();
    store
        .ingest(b.key, vec![kinds(4, 5, "x"), kinds(5, 9, "x")], 0)
        .unwrap();
    let days = DayRange { first: 5, last: 6 };
    let seen = |store: &dyn ReceiverStore| -> Vec<(String, i64, TokenCounts)> {
        store
            .fleet_model_days(days)
            .unwrap()
            .into_iter()
            .map(|d| (d.model, d.day, d.tokens))
            .collect()
    };
    let tokens = |n: u64| TokenCounts {
        prompt: 10 * n,
        completion: 3 * n,
        cached: 2 * n,
        cache_write: 0,
        reasoning: n,
    };
    // Sorted by model (bytewise: "B" before "x"), then day; day 9 is outside.
    assert_eq!(
        seen(store),
        [
            ("B".to_owned(), 6, tokens(1)),
            ("x".to_owned(), 5, tokens(2)),
            ("x".to_owned(), 6, tokens(1)),
        ]
    );
    // Together with the period's view: the same as each alone.
    let prices = PriceList {
        id: 7,
        rates: &test_rates,
    };
    let (costed, model_days) = store.costed_with_model_days(days, prices).unwrap();
    assert_eq!(
        costed,
        store
            .costed_installations(None, days.as_window(), prices)
            .unwrap()
    );
    assert_eq!(model_days, store.fleet_model_days(days).unwrap());
    // Asked again after a change to one day: the change shows, the other days stay.
    store.ingest(b.key, vec![kinds(6, 6, "x")], 0).unwrap();
    assert_eq!(seen(store)[2], ("x".to_owned(), 6, tokens(2)));
    // An erased install's usage goes.
    store.erase_install("a").unwrap();
    assert_eq!(
        seen(store),
        [
            ("x".to_owned(), 5, tokens(1)),
            ("x".to_owned(), 6, tokens(1))
        ]
    );
    assert!(
        store
            .fleet_model_days(DayRange { first: 0, last: 4 })
            .unwrap()
            .is_empty()
    );
}

fn user_usage_groups_one_installs_raw_events_by_user_model_and_day(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    let b = enroll(store, "b");
    // `event(n)`'s user hash is n % 2 in every byte.
    store
        .ingest(
            a.key,
            vec![
                model_event(1, 5, "x", 10),
                model_event(3, 5, "x", 10),
                model_event(2, 5, "x", 10),
                model_event(4, 6, "y", 10),
                model_event(5, 8, "x", 10),
            ],
            0,
        )
        .unwrap();
    store
        .ingest(b.key, vec![model_event(6, 5, "x", 10)], 0)
        .unwrap();
    let mut seen: Vec<(String, String, i64, u64, u64)> = store
        .user_usage("a", DayRange { first: 5, last: 6 })
        .unwrap()
        .into_iter()
        .map(|g| {
            (
                g.user_hash,
                g.usage.model,
                g.usage.day,
                g.events,
                g.usage.tokens.prompt,
            )
        })
        .collect();
    seen.sort();
    let (even, odd) = ("00".repeat(32), "01".repeat(32));
    assert_eq!(
        seen,
        [
            (even.clone(), "x".to_owned(), 5, 1, 10),
            (even, "y".to_owned(), 6, 1, 10),
            (odd, "x".to_owned(), 5, 2, 20),
        ]
    );
    assert!(
        store
            .user_usage("nope", DayRange { first: 0, last: 9 })
            .unwrap()
            .is_empty()
    );
}

/// Rates that differ by model and day: "a" dearer from day 20, any "p-..." model flat,
/// "free" costs nothing, every other model unpriced.
fn test_rates(model: &str, day: i64) -> Option<usage_receiver::billing::price_book::Rates> {
    use usage_receiver::billing::money::Micros;
    use usage_receiver::billing::price_book::Rates;
    match model {
        "a" => Some(Rates {
            input: Micros(if day >= 20 { 2_500_000 } else { 150_000 }),
            cached_input: Micros(75_000),
            cache_write: Micros(187_500),
            output: Micros(600_001),
            reasoning: Micros(1_333_333),
        }),
        "free" => Some(Rates::flat(Micros(0))),
        _ if model.starts_with("p-") => Some(Rates::flat(Micros(2_000_000 + day))),
        _ => None,
    }
}

const TEST_PRICES: PriceList<'static> = PriceList {
    id: 1,
    rates: &test_rates,
};

/// The view of every install, checked against the straightforward computation (which
/// reads every rollup row): a store that keeps figures between views must answer the
/// same after each change.
fn view_checked(store: &dyn ReceiverStore, window: UsageWindow, prices: PriceList) -> CostedReport {
    let costed = store.costed_installations(None, window, prices).unwrap();
    let straightforward =
        CostedReport::price(store.installations(None, window).unwrap(), prices.rates);
    assert_eq!(costed, straightforward);
    costed
}

fn figures_of<'a>(report: &'a CostedReport, install_id: &str) -> &'a CostedInstall {
    report
        .installs
        .iter()
        .find(|install| install.install_id == install_id)
        .unwrap()
}

fn views_follow_every_change_of_usage_prices_and_installs(store: &dyn ReceiverStore) {
    let window = UsageWindow {
        today: 30,
        from_30d: 1,
        month_start: 18,
    };
    let installs: Vec<Install> = (0..12)
        .map(|n| enroll(store, &format!("v{n:02}")))
        .collect();
    for (n, install) in installs.iter().enumerate() {
        let day = 10 + n as i64;
        let batch = vec![
            kinds_event(1, day, "a", [1_000 + n as u64, 10, 5, 5, 1]),
            kinds_event(2, 20, "p-x", [10, 20, 0, 0, 0]),
            kinds_event(3, 29, "unpriced", [3, 3, 0, 0, 0]),
        ];
        store.ingest(install.key, batch, 0).unwrap();
    }
    // In install id order, bytewise, whatever the database's collation.
    enroll(store, "Zed");
    enroll(store, "_under");
    let first = view_checked(store, window, TEST_PRICES);
    let ids: Vec<&str> = first
        .installs
        .iter()
        .map(|i| i.install_id.as_str())
        .collect();
    assert_eq!(ids.len(), 14);
    assert_eq!(&ids[..2], ["Zed", "_under"]);
    assert!(ids.is_sorted());
    assert_eq!(view_checked(store, window, TEST_PRICES), first);

    // One install's usage grows (another node's batch, for all a node can tell).
    store
        .ingest(
            installs[3].key,
            vec![kinds_event(4, 25, "a", [500, 5, 0, 0, 0])],
            0,
        )
        .unwrap();
    let grown = view_checked(store, window, TEST_PRICES);
    assert!(figures_of(&grown, "v03").priced.cost > figures_of(&first, "v03").priced.cost);
    assert_ne!(grown.daily, first.daily);

    // Only duplicates: nothing changes.
    store
        .ingest(
            installs[3].key,
            vec![kinds_event(4, 25, "a", [500, 5, 0, 0, 0])],
            0,
        )
        .unwrap();
    assert_eq!(view_checked(store, window, TEST_PRICES), grown);

    // An install erased, one enrolled, one with usage.
    store.erase_install("v05").unwrap();
    let late = enroll(store, "v99");
    enroll(store, "v98");
    store
        .ingest(late.key, vec![kinds_event(1, 30, "a", [7, 7, 0, 0, 0])], 0)
        .unwrap();
    let changed = view_checked(store, window, TEST_PRICES);
    assert!(changed.installs.iter().all(|i| i.install_id != "v05"));
    assert_eq!(figures_of(&changed, "v99").events_30d, 1);

    // Most installs change at once.
    for install in &installs[6..] {
        store
            .ingest(
                install.key,
                vec![kinds_event(9, 30, "p-y", [9, 9, 0, 0, 0])],
                0,
            )
            .unwrap();
    }
    let most = view_checked(store, window, TEST_PRICES);
    assert_eq!(figures_of(&most, "v11").events_30d, 4);

    // Other prices, and another window, are costed afresh.
    let double = |model: &str, day: i64| {
        test_rates(model, day).map(|r| Rates {
            input: Micros(r.input.0 * 2),
            ..r
        })
    };
    let doubled = view_checked(
        store,
        window,
        PriceList {
            id: 2,
            rates: &double,
        },
    );
    assert!(figures_of(&doubled, "v00").priced.cost > figures_of(&most, "v00").priced.cost);
    let later = UsageWindow {
        today: 31,
        from_30d: 2,
        month_start: 31,
    };
    view_checked(store, later, TEST_PRICES);
    assert_eq!(view_checked(store, window, TEST_PRICES), most);
}

/// The fleet's model days, checked against the sum of every install's rows: a store that
/// keeps days between calls must answer the same after each change.
fn model_days_checked(store: &dyn ReceiverStore, days: DayRange) -> Vec<ModelDayTokens> {
    let kept = store.fleet_model_days(days).unwrap();
    let summed = sum_model_days(&store.installations(None, days.as_window()).unwrap());
    assert_eq!(kept, summed, "{days:?}");
    kept
}

/// A period view and its model days, each checked, as the dashboard reads them.
fn page_checked(store: &dyn ReceiverStore, days: DayRange, prices: PriceList) -> CostedReport {
    let (costed, model_days) = store.costed_with_model_days(days, prices).unwrap();
    assert_eq!(costed, view_checked(store, days.as_window(), prices));
    assert_eq!(model_days, model_days_checked(store, days));
    costed
}

fn kept_views_follow_plans_new_days_and_reused_install_keys(store: &dyn ReceiverStore) {
    // Both stores keep views, so the server prepares them every minute for both.
    assert!(store.keeps_views());
    let days = DayRange {
        first: 11,
        last: 20,
    };
    let installs: Vec<Install> = ["k1", "k2", "k3", "k4"]
        .iter()
        .map(|id| enroll(store, id))
        .collect();
    for (n, install) in installs.iter().enumerate() {
        let n = n as u64;
        let batch = vec![
            kinds_event(1, 12, "a", [100 + n, 10, 5, 5, 1]),
            kinds_event(2, 15, "p-x", [10, 20 + n, 0, 0, 0]),
            kinds_event(3, 20, "unpriced", [3, 3, 0, 0, 0]),
        ];
        store.ingest(install.key, batch, 0).unwrap();
    }
    let first = page_checked(store, days, TEST_PRICES);
    assert_eq!(page_checked(store, days, TEST_PRICES), first);

    // Plans, labels, budgets and alerts are never kept: each shows at once.
    assert!(store.set_plan("k2", Plan::Pro, 20).unwrap());
    assert!(store.set_label("k3", "Shop").unwrap());
    assert!(
        store
            .set_budget("k4", Some(&budget(5, &[50, 100])))
            .unwrap()
    );
    let month = usage_receiver::days::month_text(20);
    store
        .record_alerts(&[new_alert(installs[3].key, 50, &month, 20 * MS_PER_DAY)])
        .unwrap();
    let changed = page_checked(store, days, TEST_PRICES);
    assert_ne!(
        figures_of(&changed, "k2").plans,
        figures_of(&first, "k2").plans
    );
    assert_eq!(figures_of(&changed, "k3").label.as_deref(), Some("Shop"));
    assert!(figures_of(&changed, "k4").budget.is_some());
    assert_eq!(figures_of(&changed, "k4").alerted_in_month, [50]);

    // One install's usage on a day already kept, and on a new day.
    store
        .ingest(
            installs[0].key,
            vec![
                kinds_event(4, 20, "a", [7, 7, 0, 0, 0]),
                kinds_event(5, 21, "a", [9, 9, 0, 0, 0]),
            ],
            0,
        )
        .unwrap();
    let grown = page_checked(store, days, TEST_PRICES);
    assert!(figures_of(&grown, "k1").priced.cost > figures_of(&first, "k1").priced.cost);
    let next_day = DayRange {
        first: 12,
        last: 21,
    };
    let later = page_checked(store, next_day, TEST_PRICES);
    assert_eq!(later.daily.last().map(|d| d.day), Some(21));

    // Other prices: costed afresh, the kept days' tokens the same.
    let dearer = |model: &str, day: i64| test_rates(model, day).map(|r| Rates::flat(r.output));
    page_checked(
        store,
        days,
        PriceList {
            id: 3,
            rates: &dearer,
        },
    );

    // An install enrolled after the newest one was erased may get its key: what was kept
    // of the erased one never stands for it, even at the same count of batches.
    let enrolled_with_one_batch = |id: &str, prompt: u64| {
        let install = enroll(store, id);
        let batch = vec![kinds_event(1, 15, "a", [prompt, prompt / 10, 0, 0, 0])];
        store.ingest(install.key, batch, 0).unwrap();
    };
    enrolled_with_one_batch("k5", 50);
    page_checked(store, days, TEST_PRICES);
    store.erase_install("k5").unwrap();
    let after_erasure = page_checked(store, days, TEST_PRICES);
    assert!(after_erasure.installs.iter().all(|i| i.install_id != "k5"));
    enrolled_with_one_batch("k6", 60);
    let with_new = page_checked(store, days, TEST_PRICES);
    assert_eq!(figures_of(&with_new, "k6").priced.tokens, 66);
    // Enrolled with no usage yet, after an erasure of an install that had some.
    store.erase_install("k6").unwrap();
    enroll(store, "k7");
    assert_eq!(
        figures_of(&page_checked(store, days, TEST_PRICES), "k7").events_30d,
        0
    );
}

fn costed_installations_equal_the_straightforward_pricing(store: &dyn ReceiverStore) {
    let mut n = 0u8;
    let mut next = |day: i64, model: &str, kinds: [u64; 5]| {
        n += 1;
        kinds_event(n, day, model, kinds)
    };
    let installs = ["i1", "i2", "i3", "idle"].map(|id| enroll(store, id));
    let batches = [
        vec![
            next(5, "a", [1_234_567, 333, 7, 890_123, 45_678]),
            next(19, "a", [999, 1, 1, 1, 0]),
            next(20, "a", [999, 1, 1, 1, 0]),
            next(20, "a", [3, 0, 0, 5, 5]),
            next(21, "p-x", [10, 0, 0, 10, 0]),
            next(25, "unpriced", [100, 0, 0, 0, 0]),
            // Cached and cache-write tokens above the prompt: uncached input is 0.
            next(26, "a", [10, 8, 8, 3, 9]),
        ],
        vec![
            next(18, "p-y", [77_777, 0, 0, 1, 0]),
            next(29, "free", [5, 0, 0, 5, 0]),
            next(30, "other", [1, 0, 0, 1, 0]),
        ],
        // So large a cost that no 64-bit sum holds it.
        vec![next(22, "a", [u64::MAX / 4, 0, 0, 0, 0])],
    ];
    for (install, batch) in installs.iter().zip(batches) {
        store.ingest(install.key, batch, 0).unwrap();
    }
    let windows = [
        UsageWindow {
            today: 30,
            from_30d: 1,
            month_start: 18,
        },
        DayRange {
            first: 19,
            last: 26,
        }
        .as_window(),
        DayRange { first: 0, last: 4 }.as_window(),
    ];
    for window in windows {
        for only in [
            None,
            Some("i1"),
            Some("i2"),
            Some("i3"),
            Some("idle"),
            Some("zz"),
        ] {
            let costed = store
                .costed_installations(only, window, TEST_PRICES)
                .unwrap();
            let straightforward =
                CostedReport::price(store.installations(only, window).unwrap(), &test_rates);
            assert_eq!(costed, straightforward, "{window:?} {only:?}");
        }
    }
    // And the sums are not all zero: the comparison compares something.
    let report = store
        .costed_installations(Some("i1"), windows[0], TEST_PRICES)
        .unwrap();
    let i1 = &report.installs[0].priced;
    assert!(i1.cost.0 > 0 && i1.tokens > 0);
    assert_eq!(i1.unpriced_models, ["unpriced"]);
}

fn total_events(store: &dyn ReceiverStore) -> u64 {
    store
        .summary(&SummaryQuery::default())
        .unwrap()
        .totals
        .events
}

fn retention_keeps_the_days_from_the_first_kept_one(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    // Days around the real retention edge, where PostgreSQL has partitions for some and
    // not for others.
    let today = chrono::Utc::now().timestamp_millis().div_euclid(MS_PER_DAY);
    let days = [-95, -93, -92, -91, -90, 0];
    let events: Vec<_> = (0u8..)
        .zip(days)
        .map(|(n, day)| event(n, (today + day) * MS_PER_DAY + i64::from(n)))
        .collect();
    store.ingest(a.key, events, 0).unwrap();
    let first_kept = today - 91;
    let deleted = store.maintain(RetainedDays { first_kept, today }).unwrap();
    assert_eq!(deleted, 3, "the events of days -95, -93 and -92 go");
    assert_eq!(total_events(store), 3);
    // Again: nothing more to delete.
    assert_eq!(
        store.maintain(RetainedDays { first_kept, today }).unwrap(),
        0
    );
    // The rollups stay.
    let window = UsageWindow {
        today,
        from_30d: today - 200,
        month_start: today - 200,
    };
    let report = store.installations(Some("a"), window).unwrap();
    assert_eq!(report.installs[0].events_30d, 6);
}

fn an_install_erased_meanwhile_stores_nothing(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    store.ingest(a.key, vec![event(1, 1000)], 1).unwrap();
    assert_eq!(store.erase_install("a").unwrap(), Some(1));
    // A batch checked before the erasure arrives after it.
    let late = store.ingest(a.key, vec![event(2, 2000)], 2);
    assert!(
        matches!(late, Err(ReceiverStoreError::InstallGone)),
        "{late:?}"
    );
    assert_eq!(total_events(store), 0);
    // Enrolled again, it is a new install that starts empty.
    let again = enroll(store, "a");
    assert_eq!(
        store
            .ingest(again.key, vec![event(2, 2000)], 3)
            .unwrap()
            .accepted,
        1
    );
}

fn the_request_allowance_is_the_stores(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    let b = enroll(store, "b");
    let rate = Rate { per_min: 2 };
    assert_eq!(store.take_request(a.key, rate).unwrap(), Ok(()));
    assert_eq!(store.take_request(a.key, rate).unwrap(), Ok(()));
    let wait = store.take_request(a.key, rate).unwrap().unwrap_err();
    // The next request is free 30 s after the first (the test took a little of that).
    assert!(
        wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
        "{wait:?}"
    );
    assert_eq!(store.take_request(b.key, rate).unwrap(), Ok(()));
    let off = Rate { per_min: 0 };
    assert!((0..50).all(|_| store.take_request(a.key, off).unwrap().is_ok()));
}

fn concurrent_batches_count_each_event_once(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    let shared: Vec<NewEvent> = (0..20).map(|n| event(n, 1_000)).collect();
    let threads = 8u8;
    let counts: Vec<IngestCounts> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mut batch = shared.clone();
                // Each thread also sends ten events of its own.
                batch.extend((0..10).map(|n| event(100 + t * 10 + n, 2_000)));
                scope.spawn(move || store.ingest(a.key, batch, 5).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let accepted: u64 = counts.iter().map(|c| c.accepted).sum();
    let duplicates: u64 = counts.iter().map(|c| c.duplicates).sum();
    assert_eq!(accepted, 20 + 10 * u64::from(threads));
    assert_eq!(duplicates, 20 * (u64::from(threads) - 1));
    assert_eq!(total_events(store), accepted);
}

fn the_store_names_itself_and_answers_a_ping(store: &dyn ReceiverStore) {
    store.ping().unwrap();
    assert!(["sqlite", "postgres"].contains(&store.kind().as_str()));
}

fn budget(monthly_units: i64, thresholds: &[u32]) -> Budget {
    Budget {
        monthly: usage_receiver::billing::money::Micros(monthly_units * 1_000_000),
        thresholds: thresholds.to_vec(),
    }
}

fn new_alert(install: InstallKey, threshold: u32, month: &str, at_ms: i64) -> NewAlert {
    NewAlert {
        alert_id: Uuid::now_v7(),
        install,
        threshold,
        month: month.into(),
        cost: usage_receiver::billing::money::Micros(41_000_000),
        budget: usage_receiver::billing::money::Micros(50_000_000),
        currency: "USD".into(),
        at_ms,
    }
}

fn an_installs_alerts_are_its_own_oldest_first(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    let b = enroll(store, "b");
    let alerts = [
        new_alert(a.key, 50, "2026-03", 3_000),
        new_alert(b.key, 50, "2026-03", 2_000),
        new_alert(a.key, 80, "2026-02", 1_000),
        new_alert(b.key, 80, "2026-03", 4_000),
    ];
    store.record_alerts(&alerts).unwrap();
    let of = |id: &str| -> Vec<(String, u32, i64)> {
        store
            .install_alerts(id)
            .unwrap()
            .into_iter()
            .map(|alert| (alert.install_id, alert.threshold, alert.at_ms))
            .collect()
    };
    assert_eq!(
        of("a"),
        [("a".to_owned(), 80, 1_000), ("a".to_owned(), 50, 3_000)]
    );
    assert_eq!(of("b").len(), 2);
    assert!(of("nope").is_empty());
    store.erase_install("a").unwrap();
    assert!(of("a").is_empty());
}

fn budgets_are_set_read_with_the_install_and_removed(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    assert_eq!(a.budget, None);
    assert!(
        store
            .set_budget("a", Some(&budget(50, &[50, 80, 100])))
            .unwrap()
    );
    assert_eq!(
        store.find_install("a").unwrap().unwrap().budget,
        Some(budget(50, &[50, 80, 100]))
    );
    // Replaced whole.
    assert!(store.set_budget("a", Some(&budget(7, &[90]))).unwrap());
    assert_eq!(
        store.find_install("a").unwrap().unwrap().budget,
        Some(budget(7, &[90]))
    );
    let window = UsageWindow {
        today: 20,
        from_30d: -9,
        month_start: 0,
    };
    let report = store.installations(None, window).unwrap();
    assert_eq!(report.installs[0].budget, Some(budget(7, &[90])));
    assert!(store.set_budget("a", None).unwrap());
    assert_eq!(store.find_install("a").unwrap().unwrap().budget, None);
    // Removing a budget the install does not have is no error; an unknown install is.
    assert!(store.set_budget("a", None).unwrap());
    assert!(!store.set_budget("nobody", Some(&budget(1, &[50]))).unwrap());
    assert!(!store.set_budget("nobody", None).unwrap());
}

fn an_alert_is_recorded_once_per_install_threshold_and_month(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    let b = enroll(store, "b");
    // Day 0 is 1970-01-01: the month 1970-01.
    store
        .ingest(
            a.key,
            vec![model_event(1, 2, "m", 100), model_event(2, 3, "m", 5)],
            1,
        )
        .unwrap();
    let first = new_alert(a.key, 50, "1970-01", 10);
    let recorded = store.record_alerts(std::slice::from_ref(&first)).unwrap();
    assert_eq!(recorded, vec![first.alert_id]);
    // Again, under another id, with another threshold beside it: only the new one.
    let again = new_alert(a.key, 50, "1970-01", 11);
    let eighty = new_alert(a.key, 80, "1970-01", 11);
    let recorded = store.record_alerts(&[again, eighty.clone()]).unwrap();
    assert_eq!(recorded, vec![eighty.alert_id]);
    // Another month and another install are other alerts.
    let next_month = new_alert(a.key, 50, "1970-02", 12);
    let other_install = new_alert(b.key, 50, "1970-01", 13);
    assert_eq!(
        store
            .record_alerts(&[next_month.clone(), other_install.clone()])
            .unwrap()
            .len(),
        2
    );

    let spend = store
        .month_spend(a.key, DayRange { first: 0, last: 30 }, "1970-01")
        .unwrap();
    assert_eq!(spend.alerted, vec![50, 80]);
    let days: Vec<(i64, u64)> = spend
        .usage
        .iter()
        .map(|u| (u.day, u.tokens.prompt))
        .collect();
    assert_eq!(days, vec![(2, 100), (3, 5)]);
    let spend = store
        .month_spend(a.key, DayRange { first: 3, last: 3 }, "1970-03")
        .unwrap();
    assert!(spend.alerted.is_empty());
    assert_eq!(spend.usage.len(), 1);

    let all = store.alerts(TimeRange::default()).unwrap();
    let ids: Vec<Uuid> = all.iter().map(|alert| alert.alert_id).collect();
    assert_eq!(
        ids,
        vec![
            first.alert_id,
            eighty.alert_id,
            next_month.alert_id,
            other_install.alert_id
        ]
    );
    assert_eq!(all[0].install_id, "a");
    assert_eq!(all[0].cost, first.cost);
    assert_eq!(all[0].delivered_at_ms, None);
    let window = store
        .alerts(TimeRange {
            from_ms: Some(11),
            to_ms: Some(13),
        })
        .unwrap();
    assert_eq!(window.len(), 2);
    let report = store
        .installations(
            None,
            UsageWindow {
                today: 20,
                from_30d: -9,
                month_start: 0,
            },
        )
        .unwrap();
    assert_eq!(report.installs[0].alerted_in_month, vec![50, 80]);
    assert_eq!(report.installs[1].alerted_in_month, vec![50]);
}

fn alerts_are_claimed_once_until_their_lease_ends_and_delivered(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    let alerts = [
        new_alert(a.key, 50, "2026-11", 100),
        new_alert(a.key, 80, "2026-11", 200),
    ];
    store.record_alerts(&alerts).unwrap();
    // Not due before they were recorded.
    assert!(store.claim_alerts(50, 1000, 10).unwrap().is_empty());
    let claimed = store.claim_alerts(300, 1000, 1).unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].attempts, 1);
    let first = claimed[0].alert_id;
    // Leased: another node (or loop) takes only the other one.
    let claimed = store.claim_alerts(300, 1000, 10).unwrap();
    assert_eq!(claimed.len(), 1);
    assert_ne!(claimed[0].alert_id, first);
    let second = claimed[0].alert_id;
    assert!(store.claim_alerts(1299, 1000, 10).unwrap().is_empty());

    store
        .finish_alert(first, DeliveryOutcome::Delivered { at_ms: 400 })
        .unwrap();
    store
        .finish_alert(second, DeliveryOutcome::RetryAt { at_ms: 5000 })
        .unwrap();
    // The delivered one never comes back; the other at its retry time, attempt 2.
    assert!(store.claim_alerts(4999, 1000, 10).unwrap().is_empty());
    let claimed = store.claim_alerts(5000, 1000, 10).unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!((claimed[0].alert_id, claimed[0].attempts), (second, 2));
    let listed = store.alerts(TimeRange::default()).unwrap();
    let delivered: Vec<Option<i64>> = listed.iter().map(|a| a.delivered_at_ms).collect();
    assert_eq!(delivered, vec![Some(400), None]);
    // A late retry mark never undoes a delivery.
    store
        .finish_alert(first, DeliveryOutcome::RetryAt { at_ms: 0 })
        .unwrap();
    assert!(store.claim_alerts(5000, 1000, 10).unwrap().is_empty());
}

fn erasure_removes_the_budget_and_alerts(store: &dyn ReceiverStore) {
    let a = enroll(store, "a");
    store.set_budget("a", Some(&budget(5, &[50]))).unwrap();
    store
        .record_alerts(&[new_alert(a.key, 50, "2026-11", 1)])
        .unwrap();
    store.erase_install("a").unwrap().unwrap();
    assert!(store.alerts(TimeRange::default()).unwrap().is_empty());
    assert!(store.claim_alerts(i64::MAX / 2, 1, 10).unwrap().is_empty());
    // Enrolled again, it starts with no budget and its thresholds can fire again.
    let again = enroll(store, "a");
    assert_eq!(again.budget, None);
    let alert = new_alert(again.key, 50, "2026-11", 2);
    assert_eq!(
        store.record_alerts(std::slice::from_ref(&alert)).unwrap(),
        vec![alert.alert_id]
    );
    // An alert for an install gone meanwhile is not recorded.
    store.erase_install("a").unwrap().unwrap();
    assert!(
        store
            .record_alerts(&[new_alert(again.key, 80, "2026-11", 3)])
            .unwrap()
            .is_empty()
    );
}

/// The async ingest path answers as the blocking methods do, and a batch takes its request
/// with it: one that does not fit in the allowance stores nothing.
fn the_ingest_path_takes_the_request_with_the_batch(store: Arc<dyn ReceiverStore>) {
    // Each future on its own: the blocking methods may not run inside the runtime.
    let wait = |future| test_runtime().block_on(future);
    enroll(&*store, "a");
    let a = wait(store.clone().find_install_async("a".into()))
        .unwrap()
        .unwrap();
    assert_eq!(a.install_id, "a");
    assert!(
        wait(store.clone().find_install_async("b".into()))
            .unwrap()
            .is_none()
    );
    let rate = Rate { per_min: 2 };
    let ingest = |n: u8, rate: Rate| {
        test_runtime()
            .block_on(
                store
                    .clone()
                    .ingest_async(a.key, vec![event(n, 1_000)], 5, rate),
            )
            .unwrap()
    };
    assert_eq!(ingest(0, rate).unwrap().accepted, 1);
    assert_eq!(ingest(1, rate).unwrap().accepted, 1);
    let refused = ingest(2, rate).unwrap_err();
    assert!(
        refused > Duration::from_secs(25) && refused <= Duration::from_secs(30),
        "{refused:?}"
    );
    assert_eq!(total_events(&*store), 2);
    // The same allowance as a request taken alone.
    let alone = test_runtime()
        .block_on(store.clone().take_request_async(a.key, rate))
        .unwrap();
    assert!(alone.is_err());
    assert_eq!(ingest(2, Rate { per_min: 0 }).unwrap().accepted, 1);
    assert_eq!(total_events(&*store), 3);
}

/// A batch sent again, whole or in part (an answer lost on the way), stores only its new
/// events, adds only those to the rollup and takes one request, like any batch: on
/// PostgreSQL it first fails as a fresh batch, and nothing of that attempt may stay.
fn a_batch_sent_again_stores_its_new_events_and_takes_one_request(store: Arc<dyn ReceiverStore>) {
    let a = enroll(&*store, "a");
    let window = UsageWindow {
        today: 100,
        from_30d: 71,
        month_start: 95,
    };
    let day = |n: u8| model_event(n, 100, "x", 10);
    // An allowance of two requests.
    let rate = Rate { per_min: 2 };
    let ingest = |events: Vec<NewEvent>, at: i64| {
        test_runtime()
            .block_on(store.clone().ingest_async(a.key, events, at, rate))
            .unwrap()
    };
    let first = ingest(vec![day(1), day(2)], 1).unwrap();
    assert_eq!((first.accepted, first.duplicates), (2, 0));
    // Two of three stored already: had the failed attempt kept its request, this second
    // request would not fit.
    let again = ingest(vec![day(3), day(2), day(1)], 2).unwrap();
    assert_eq!((again.accepted, again.duplicates), (1, 2));
    assert!(ingest(vec![day(4)], 3).is_err(), "a third request fits");
    assert_eq!(total_events(&*store), 3);
    let report = store.installations(None, window).unwrap();
    assert_eq!(
        (report.installs[0].events_30d, report.installs[0].tokens_30d),
        (3, 30)
    );
    assert_eq!(report.installs[0].last_seen_ms, Some(2));
    // Wholly stored already: nothing added, the install still seen.
    let none = test_runtime()
        .block_on(
            store
                .clone()
                .ingest_async(a.key, vec![day(1), day(3)], 4, Rate { per_min: 0 }),
        )
        .unwrap()
        .unwrap();
    assert_eq!((none.accepted, none.duplicates), (0, 2));
    assert_eq!(total_events(&*store), 3);
    let report = store.installations(None, window).unwrap();
    assert_eq!(report.installs[0].tokens_30d, 30);
    assert_eq!(report.installs[0].last_seen_ms, Some(4));
}

#[test]
fn a_batch_sent_again_stores_its_new_events_and_takes_one_request_on_sqlite() {
    a_batch_sent_again_stores_its_new_events_and_takes_one_request(sqlite_store().store);
}

#[test]
fn a_batch_sent_again_stores_its_new_events_and_takes_one_request_on_postgres() {
    a_batch_sent_again_stores_its_new_events_and_takes_one_request(postgres_store().store);
}

/// Batches of many installs at once, as a busy node meets them (on PostgreSQL the node's
/// writers store those that wait together), are each answered on their own: the batch of
/// an install erased meanwhile stores nothing, one over its install's rate is refused, one
/// sent again stores only its new events, two of one install both count; every other batch stores
/// all its events (1 to 4), and the rollup and each install's `last_seen` (its own
/// batch's time) hold exactly that.
fn batches_of_many_installs_at_once_are_each_answered_on_their_own(store: Arc<dyn ReceiverStore>) {
    const INSTALLS: usize = 40;
    let installs: Vec<Install> = (0..INSTALLS)
        .map(|n| enroll(&*store, &format!("i{n:02}")))
        .collect();
    let (rate, off) = (Rate { per_min: 1 }, Rate { per_min: 0 });
    let day = |n: u8| model_event(n, 100, "x", 10);
    // i00 stored event 1 before; i01 spent its one request; i02 is erased.
    let runtime = test_runtime();
    runtime
        .block_on(
            store
                .clone()
                .ingest_async(installs[0].key, vec![day(1)], 1, off),
        )
        .unwrap()
        .unwrap();
    runtime
        .block_on(store.clone().take_request_async(installs[1].key, rate))
        .unwrap()
        .unwrap();
    assert_eq!(store.erase_install("i02").unwrap(), Some(0));
    // Every install n sends events 1 to 1 + (n + 2) % 4 at once, received at 1000 + n (i00's
    // last, so that its group, which fails on the event stored already, is another's); i03
    // also sends events 5 and 6 in a second batch, with no rate.
    let sizes = |n: usize| 1 + (n as u8 + 2) % 4;
    let send = |n: usize| {
        let batch: Vec<NewEvent> = (1..=sizes(n)).map(day).collect();
        store
            .clone()
            .ingest_async(installs[n].key, batch, 1000 + n as i64, rate)
    };
    let mut sends: Vec<_> = (1..INSTALLS).map(send).collect();
    sends.push(
        store
            .clone()
            .ingest_async(installs[3].key, vec![day(5), day(6)], 2000, off),
    );
    sends.push(send(0));
    let answers = runtime.block_on(futures_util::future::join_all(sends));
    // The answer of install n's batch (i03's second at INSTALLS - 1, i00's last).
    let answer = |n: usize| match n {
        0 => &answers[INSTALLS],
        n => &answers[n - 1],
    };
    let counts = |n: usize| match answer(n) {
        Ok(Ok(counts)) => (counts.accepted, counts.duplicates),
        other => panic!("batch of i{n:02} answered {other:?}"),
    };
    assert_eq!(counts(0), (2, 1));
    assert!(matches!(answer(1), Ok(Err(_))), "{:?}", answer(1));
    assert!(
        matches!(answer(2), Err(ReceiverStoreError::InstallGone)),
        "{:?}",
        answer(2)
    );
    assert!(matches!(&answers[INSTALLS - 1], Ok(Ok(c)) if c.accepted == 2));
    for n in 3..INSTALLS {
        assert_eq!(counts(n), (u64::from(sizes(n)), 0), "batch of i{n:02}");
    }
    let stored: u64 = 3 + 2 + (3..INSTALLS).map(|n| u64::from(sizes(n))).sum::<u64>();
    assert_eq!(total_events(&*store), stored);
    let window = UsageWindow {
        today: 100,
        from_30d: 71,
        month_start: 95,
    };
    let report = store.installations(None, window).unwrap();
    assert_eq!(report.installs.len(), INSTALLS - 1);
    for usage in &report.installs {
        let n: usize = usage.install_id[1..].parse().unwrap();
        let (events, last_seen) = match n {
            0 => (3, 1000),
            1 => (0, 0),
            3 => (u64::from(sizes(3)) + 2, 0),
            n => (u64::from(sizes(n)), 1000 + n as i64),
        };
        assert_eq!(
            (usage.events_30d, usage.tokens_30d),
            (events, 10 * events),
            "{}",
            usage.install_id
        );
        match n {
            1 => {}
            // Its two batches went at once: either may be stored last.
            3 => assert!(
                matches!(usage.last_seen_ms, Some(1003 | 2000)),
                "{:?}",
                usage.last_seen_ms
            ),
            _ => assert_eq!(usage.last_seen_ms, Some(last_seen), "{}", usage.install_id),
        }
    }
}

#[test]
fn batches_of_many_installs_at_once_are_each_answered_on_their_own_on_sqlite() {
    batches_of_many_installs_at_once_are_each_answered_on_their_own(sqlite_store().store);
}

#[test]
fn batches_of_many_installs_at_once_are_each_answered_on_their_own_on_postgres() {
    let node = Arc::new(postgres_node(&postgres_url()));
    batches_of_many_installs_at_once_are_each_answered_on_their_own(node.clone());
    // 40 batches at once for a node's writers: those that waited went in together.
    assert!(node.batches_stored_in_groups() >= 2);
}

#[test]
fn the_ingest_path_takes_the_request_with_the_batch_on_sqlite() {
    the_ingest_path_takes_the_request_with_the_batch(sqlite_store().store);
}

#[test]
fn the_ingest_path_takes_the_request_with_the_batch_on_postgres() {
    the_ingest_path_takes_the_request_with_the_batch(postgres_store().store);
}

fn plan_history_starts_at_enrollment_and_keeps_each_days_plan(store: &dyn ReceiverStore) {
    use usage_receiver::billing::pricing::PlanPeriod;
    let periods = |id: &str| -> Option<Vec<(Plan, i64)>> {
        store.plan_history(id).unwrap().map(|history| {
            assert_eq!(history.enrolled_day(), 100);
            history
                .periods()
                .iter()
                .map(|period| (period.plan, period.from_day))
                .collect()
        })
    };
    // Enrolled late on day 100: its history starts that day, on the default plan.
    enroll_at(store, "a", 101 * MS_PER_DAY - 1);
    assert_eq!(periods("a"), Some(vec![(Plan::Free, 100)]));
    assert_eq!(periods("nope"), None);
    assert!(!store.set_plan("nope", Plan::Pro, 105).unwrap());

    // A change starts on its day; changes the same day replace it, and going back to the
    // plan of the day before continues that one.
    assert!(store.set_plan("a", Plan::Pro, 105).unwrap());
    assert_eq!(
        periods("a"),
        Some(vec![(Plan::Free, 100), (Plan::Pro, 105)])
    );
    assert!(store.set_plan("a", Plan::Agency, 105).unwrap());
    assert_eq!(
        periods("a"),
        Some(vec![(Plan::Free, 100), (Plan::Agency, 105)])
    );
    assert!(store.set_plan("a", Plan::Free, 105).unwrap());
    assert_eq!(periods("a"), Some(vec![(Plan::Free, 100)]));
    // The plan in force again: nothing recorded.
    assert!(store.set_plan("a", Plan::Free, 106).unwrap());
    assert_eq!(periods("a"), Some(vec![(Plan::Free, 100)]));
    assert!(store.set_plan("a", Plan::Pro, 110).unwrap());
    assert!(store.set_plan("a", Plan::Agency, 120).unwrap());
    assert!(store.set_plan("a", Plan::Pro, 121).unwrap());
    let full = vec![
        (Plan::Free, 100),
        (Plan::Pro, 110),
        (Plan::Agency, 120),
        (Plan::Pro, 121),
    ];
    assert_eq!(periods("a"), Some(full.clone()));

    // The views get the same history, but may leave out plans that ended before the month
    // of the days they report; today's plan is always there.
    let window = |month_start| UsageWindow {
        today: 150,
        from_30d: 121,
        month_start,
    };
    let viewed = store.installations(Some("a"), window(0)).unwrap().installs[0]
        .plans
        .clone();
    let as_pairs = |periods: &[PlanPeriod]| -> Vec<(Plan, i64)> {
        periods.iter().map(|p| (p.plan, p.from_day)).collect()
    };
    assert_eq!(as_pairs(viewed.periods()), full);
    assert_eq!(viewed.enrolled_day(), 100);
    let costed = store
        .costed_installations(
            None,
            window(0),
            PriceList {
                id: 1,
                rates: &|_: &str, _| None,
            },
        )
        .unwrap();
    assert_eq!(as_pairs(costed.installs[0].plans.periods()), full);
    // Day 150 is 1970-05-31: its month starts on day 120.
    let later = store.installations(None, window(150)).unwrap().installs[0]
        .plans
        .clone();
    assert_eq!(
        as_pairs(later.periods()).last(),
        Some(&(Plan::Pro, 121)),
        "{later:?}"
    );
    assert_eq!(later.current(), Plan::Pro);

    // A change dated before the enrollment day (a clock behind) takes effect on it.
    enroll_at(store, "b", 100 * MS_PER_DAY);
    assert!(store.set_plan("b", Plan::Agency, 90).unwrap());
    assert_eq!(periods("b"), Some(vec![(Plan::Agency, 100)]));

    // Erasure takes the history with it: enrolled again, the install starts afresh.
    assert_eq!(store.erase_install("a").unwrap(), Some(0));
    assert_eq!(periods("a"), None);
    enroll_at(store, "a", 100 * MS_PER_DAY);
    assert_eq!(periods("a"), Some(vec![(Plan::Free, 100)]));
}
