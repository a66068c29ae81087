use super::migrations::MIGRATIONS;
use super::*;
use crate::store::fixtures::{enroll, event};

fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("nested/receiver.db")).unwrap();
    (dir, store)
}

#[test]
fn the_rollup_migration_backfills_stored_events() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    {
        // A database at schema 1 with events already in it.
        let mut conn = connect(&path).unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute_batch(MIGRATIONS[0]).unwrap();
        tx.pragma_update(None, "user_version", 1).unwrap();
        tx.execute_batch(
            "INSERT INTO installs (id, install_id, secret, site_hash, enrolled_at)
                 VALUES (1, 'a', 'x', 's', 0);
             INSERT INTO events VALUES (1, x'01', x'00', 0, 'm', 3, 4, 0, 0, 0, NULL,
                 86400000 * 5 + 1, 0);
             INSERT INTO events VALUES (1, x'02', x'00', 0, 'm', 1, 2, 0, 0, 0, NULL,
                 86400000 * 5 + 2, 0);",
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let window = UsageWindow {
        today: 10,
        from_30d: 0,
        month_start: 0,
    };
    let report = store.installations(Some("a"), window).unwrap();
    assert_eq!(report.installs[0].tokens_30d, 10);
    assert_eq!(
        report.daily,
        [DailyTokens {
            day: 5,
            events: 2,
            tokens: 10
        }]
    );
}

#[test]
fn the_arrival_order_migration_keeps_events_and_their_dedupe() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    let stored = [event(1, 5_000), event(2, 6_000)];
    {
        // A database at schema 2, its events clustered on (install, event_id).
        let mut conn = connect(&path).unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute_batch(MIGRATIONS[0]).unwrap();
        tx.execute_batch(MIGRATIONS[1]).unwrap();
        tx.pragma_update(None, "user_version", 2).unwrap();
        tx.execute(
            "INSERT INTO installs (id, install_id, secret, site_hash, enrolled_at)
                 VALUES (1, 'a', ?1, 's', 0)",
            [Secret::generate().to_whsec()],
        )
        .unwrap();
        for e in &stored {
            tx.execute(
                "INSERT INTO events VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, 0, 0, 0, ?7, ?8, 9)",
                params![
                    e.event_id.as_bytes().as_slice(),
                    e.user_hash.as_slice(),
                    e.source.code(),
                    e.model,
                    e.prompt_tokens,
                    e.completion_tokens,
                    e.context,
                    e.created_at_ms
                ],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let install = store.find_install("a").unwrap().unwrap();
    let page = store
        .events_page(&EventsQuery {
            install_id: None,
            range: TimeRange::default(),
            after: None,
            limit: 10,
        })
        .unwrap();
    let ids: Vec<Uuid> = page.events.iter().map(|e| e.event_id).collect();
    assert_eq!(ids, [stored[0].event_id, stored[1].event_id]);
    assert_eq!(page.events[1].context, stored[1].context);
    // The moved events still dedupe a resend; a new event still goes in.
    let counts = store
        .ingest(install.key, vec![stored[1].clone(), event(3, 7_000)], 10)
        .unwrap();
    assert_eq!((counts.accepted, counts.duplicates), (1, 1));
}

#[test]
fn concurrent_batches_commit_together_and_count_each_event_once() {
    let (_dir, store) = store();
    let a = enroll(&store, "a");
    let shared: Vec<NewEvent> = (0..20).map(|n| event(n, 1_000)).collect();
    let threads = 8u8;
    let counts: Vec<IngestCounts> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let store = &store;
                let mut batch = shared.clone();
                // Each thread also sends ten events of its own.
                batch.extend((0..10).map(|n| event(100 + t * 10 + n, 2_000)));
                scope.spawn(move || store.ingest(a.key, batch.clone(), 5).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let accepted: u64 = counts.iter().map(|c| c.accepted).sum();
    let duplicates: u64 = counts.iter().map(|c| c.duplicates).sum();
    assert_eq!(accepted, 20 + 10 * u64::from(threads));
    assert_eq!(duplicates, 20 * (u64::from(threads) - 1));
    let stored: i64 = store
        .reader()
        .query_row("SELECT count(*) FROM events", [], |row| row.get(0))
        .unwrap();
    assert_eq!(stored, i64::try_from(accepted).unwrap());
}

#[test]
fn a_failed_commit_stores_nothing_and_the_next_batch_still_goes_in() {
    let (_dir, store) = store();
    let a = enroll(&store, "a");
    // Break the rollup the ingest transaction writes after the events.
    store
        .writer()
        .execute_batch("ALTER TABLE daily_usage RENAME TO daily_usage_away")
        .unwrap();
    let error = store
        .ingest(a.key, vec![event(1, 0), event(2, 0)], 5)
        .unwrap_err();
    assert!(error.to_string().contains("daily_usage"), "{error}");
    let count = |store: &SqliteStore| -> i64 {
        store
            .reader()
            .query_row("SELECT count(*) FROM events", [], |row| row.get(0))
            .unwrap()
    };
    assert_eq!(count(&store), 0, "no event of the failed batch is stored");
    store
        .writer()
        .execute_batch("ALTER TABLE daily_usage_away RENAME TO daily_usage")
        .unwrap();
    let counts = store
        .ingest(a.key, vec![event(1, 0), event(2, 0)], 6)
        .unwrap();
    assert_eq!((counts.accepted, counts.duplicates), (2, 0));
    assert_eq!(count(&store), 2);
}

#[test]
fn reopening_keeps_data_and_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        enroll(&store, "a");
    }
    let store = SqliteStore::open(&path).unwrap();
    assert!(store.find_install("a").unwrap().is_some());
}

#[test]
fn the_token_kinds_migration_backfills_the_rollup_from_stored_events() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    {
        // A database at schema 3: a rollup of prompt and completion only, two days of it
        // still backed by raw events and one whose events were purged.
        let mut conn = connect(&path).unwrap();
        let tx = conn.transaction().unwrap();
        for sql in &MIGRATIONS[..3] {
            tx.execute_batch(sql).unwrap();
        }
        tx.pragma_update(None, "user_version", 3).unwrap();
        tx.execute(
            "INSERT INTO installs (id, install_id, secret, site_hash, enrolled_at)
                 VALUES (1, 'a', ?1, 's', 0)",
            [Secret::generate().to_whsec()],
        )
        .unwrap();
        tx.execute_batch(
            "INSERT INTO events VALUES (1, x'01', x'00', 0, 'm', 30, 20, 10, 5, 4, NULL,
                 86400000 * 5 + 1, 0);
             INSERT INTO events VALUES (1, x'02', x'00', 0, 'm', 3, 2, 1, 2, 1, NULL,
                 86400000 * 5 + 2, 0);
             INSERT INTO events VALUES (1, x'03', x'00', 0, 'n', 8, 8, 0, 8, 0, NULL,
                 86400000 * 5 + 3, 0);
             INSERT INTO events VALUES (1, x'04', x'00', 0, 'm', 6, 6, 6, 0, 6, NULL,
                 86400000 * 6 + 1, 0);
             INSERT INTO daily_usage VALUES (1, 5, 'm', 2, 33, 22);
             INSERT INTO daily_usage VALUES (1, 5, 'n', 1, 8, 8);
             INSERT INTO daily_usage VALUES (1, 6, 'm', 1, 6, 6);
             INSERT INTO daily_usage VALUES (1, 4, 'm', 9, 90, 90);",
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let window = UsageWindow {
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
                u.model.as_str(),
                u.day,
                [t.prompt, t.completion, t.cached, t.cache_write, t.reasoning],
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            // Purged: only what the old rollup knew; the new kinds stay 0.
            ("m", 4, [90, 90, 0, 0, 0]),
            ("m", 5, [33, 22, 11, 7, 5]),
            ("m", 6, [6, 6, 6, 0, 6]),
            ("n", 5, [8, 8, 0, 8, 0]),
        ]
    );
    // Later batches add to the backfilled rows.
    let install = store.find_install("a").unwrap().unwrap();
    let more = NewEvent {
        model: "m".into(),
        cached_tokens: 1,
        reasoning_tokens: 1,
        ..event(9, crate::days::MS_PER_DAY * 5 + 9)
    };
    store.ingest(install.key, vec![more], 1).unwrap();
    let report = store.installations(Some("a"), window).unwrap();
    let day5 = report.installs[0].usage_mtd[1].tokens;
    assert_eq!((day5.prompt, day5.cached, day5.reasoning), (43, 12, 6));
}

#[test]
fn the_plan_history_migration_starts_each_install_at_its_enrollment_day() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    // 5 January and 10 March 2026.
    let (jan_5, mar_10) = (20_458, 20_522);
    {
        // A database at schema 7: `a` enrolled on 5 January and is on pro, `b` enrolled in
        // the last millisecond of 10 March and is on free.
        let mut conn = connect(&path).unwrap();
        let tx = conn.transaction().unwrap();
        for migration in &MIGRATIONS[..7] {
            tx.execute_batch(migration).unwrap();
        }
        tx.pragma_update(None, "user_version", 7).unwrap();
        tx.execute(
            "INSERT INTO installs (install_id, secret, site_hash, enrolled_at, plan)
             VALUES ('a', 'x', 's', ?1, 'pro'), ('b', 'x', 's', ?2, 'free')",
            params![
                jan_5 * MS_PER_DAY + 9 * 3_600_000,
                (mar_10 + 1) * MS_PER_DAY - 1
            ],
        )
        .unwrap();
        tx.commit().unwrap();
    }
    assert_eq!(crate::days::day_text(jan_5), "2026-01-05");
    assert_eq!(crate::days::day_text(mar_10), "2026-03-10");
    let store = SqliteStore::open(&path).unwrap();
    let periods = |id: &str| -> Vec<(Plan, i64)> {
        let history = store.plan_history(id).unwrap().unwrap();
        history
            .periods()
            .iter()
            .map(|period| (period.plan, period.from_day))
            .collect()
    };
    assert_eq!(periods("a"), [(Plan::Pro, jan_5)]);
    assert_eq!(periods("b"), [(Plan::Free, mar_10)]);
    // A change after the migration starts a new period and keeps the migrated one.
    assert!(store.set_plan("a", Plan::Agency, mar_10).unwrap());
    assert_eq!(periods("a"), [(Plan::Pro, jan_5), (Plan::Agency, mar_10)]);
}

#[test]
fn the_usage_versions_migration_keeps_views_exact_for_stored_usage() {
    use crate::billing::price_book::Rates;
    use crate::store::{PriceList, sum_model_days};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    {
        // A database at schema 8: installs 1 and 2 with usage on days 5 and 6.
        let mut conn = connect(&path).unwrap();
        let tx = conn.transaction().unwrap();
        for migration in &MIGRATIONS[..8] {
            tx.execute_batch(migration).unwrap();
        }
        tx.pragma_update(None, "user_version", 8).unwrap();
        tx.execute_batch(
            "INSERT INTO installs (id, install_id, secret, site_hash, enrolled_at)
                 VALUES (1, 'a', 'x', 's', 0), (2, 'b', 'x', 's', 0);
             INSERT INTO daily_usage (install, day, model, events, prompt_tokens,
                     completion_tokens, cached_tokens, cache_write_tokens, reasoning_tokens)
                 VALUES (1, 5, 'm', 2, 100, 10, 0, 0, 0), (1, 6, 'm', 1, 50, 5, 0, 0, 0),
                        (2, 6, 'm', 3, 300, 30, 0, 0, 0);",
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let version: i64 = store
        .reader()
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap();
    assert_eq!(version, MIGRATIONS.len() as i64);
    let rates = |model: &str, _day: i64| (model == "m").then(|| Rates::flat(Micros(1_000_000)));
    let prices = PriceList {
        id: 1,
        rates: &rates,
    };
    let days = DayRange { first: 0, last: 9 };
    let checked = |store: &SqliteStore| {
        let (costed, model_days) = store.costed_with_model_days(days, prices).unwrap();
        let report = store.installations(None, days.as_window()).unwrap();
        assert_eq!(model_days, sum_model_days(&report));
        assert_eq!(costed, CostedReport::price(report, prices.rates));
        costed
    };
    // Read whole, then from what was kept: the same.
    let first = checked(&store);
    assert_eq!(first.installs[1].priced.tokens, 330);
    assert_eq!(checked(&store), first);

    // `b`, the newest, erased: an install enrolled next takes its key, and its one batch
    // shows as its own.
    store.erase_install("b").unwrap();
    let c = enroll(&store, "c");
    assert_eq!(c.key, 2);
    let batch = vec![NewEvent {
        model: "m".into(),
        prompt_tokens: 7,
        completion_tokens: 0,
        ..event(1, 6 * MS_PER_DAY)
    }];
    store.ingest(c.key, batch, 0).unwrap();
    let after = checked(&store);
    assert_eq!(after.installs[1].install_id, "c");
    assert_eq!(after.installs[1].priced.tokens, 7);
}
