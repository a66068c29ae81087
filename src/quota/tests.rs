use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::*;
use crate::config::Synchronous;
use usage_protocol::event::{Event, ModelName, Source, Tokens};

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

fn limits(user_daily: u64, user_monthly: u64, site_daily: u64, site_monthly: u64) -> QuotaConfig {
    QuotaConfig {
        user_daily_tokens: user_daily,
        user_monthly_tokens: user_monthly,
        site_daily_tokens: site_daily,
        site_monthly_tokens: site_monthly,
        hold_ttl_secs: 300,
    }
}

fn event(
    user_id: u64,
    source: Source,
    model: &str,
    created_at_ms: i64,
    prompt: u64,
    completion: u64,
) -> Event {
    Event {
        event_id: Uuid::new_v4(),
        user_id,
        source,
        model: ModelName::parse(model).unwrap(),
        tokens: Tokens {
            prompt,
            completion,
            ..Tokens::default()
        },
        context: None,
        created_at_ms,
        origin: None,
        hold_id: None,
    }
}

fn utc() -> Calendar {
    Calendar::parse("UTC").unwrap()
}

fn spent(user_id: u64, when: &str, tokens: u64) -> Spent {
    Spent {
        user_id,
        created_at_ms: at(when).timestamp_millis(),
        tokens,
        hold_id: None,
        new: true,
    }
}

fn scope(answer: &Answer, scope: Scope) -> &LimitState {
    answer
        .limits
        .iter()
        .find(|l| l.scope == scope)
        .unwrap_or_else(|| panic!("no {scope:?} in {answer:?}"))
}

#[test]
fn no_limit_set_allows_everything_and_lists_nothing() {
    let quota = Quota::new(QuotaConfig::default(), utc());
    let now = at("2026-12-07T12:00:00Z");
    quota.spent(&[spent(1, "2026-12-07T11:00:00Z", 1_000_000)], now);
    let answer = quota.check(1, 1_000_000_000, now);
    assert!(answer.allowed);
    assert!(answer.limits.is_empty());
    assert_eq!(quota.site_state(now), None);
}

#[test]
fn a_limit_reached_is_not_allowed_and_names_its_scope() {
    let quota = Quota::new(limits(1_000, 0, 0, 5_000), utc());
    let now = at("2026-12-07T12:00:00Z");
    quota.spent(&[spent(1, "2026-12-07T11:00:00Z", 600)], now);
    let answer = quota.check(1, 400, now);
    assert!(answer.allowed, "600 + 400 is exactly the limit: {answer:?}");
    let daily = scope(&answer, Scope::UserDaily);
    assert_eq!((daily.used, daily.held, daily.remaining), (600, 0, 400));
    assert_eq!(daily.resets_at, "2026-12-08T00:00:00Z");
    assert_eq!(
        scope(&answer, Scope::SiteMonthly).resets_at,
        "2027-01-01T00:00:00Z"
    );
    let answer = quota.check(1, 401, now);
    assert!(!answer.allowed);
    assert_eq!(answer.denied, [Scope::UserDaily]);
    assert!(
        quota.check(2, 1_000, now).allowed,
        "another user has their own"
    );
    quota.spent(&[spent(1, "2026-12-07T11:30:00Z", 400)], now);
    let answer = quota.check(1, 0, now);
    assert!(
        !answer.allowed,
        "a limit reached is not allowed even for 0 more"
    );
    assert_eq!(scope(&answer, Scope::UserDaily).remaining, 0);
    assert_eq!(
        quota.site_state(now).unwrap(),
        vec![LimitState {
            scope: Scope::SiteMonthly,
            limit: 5_000,
            used: 1_000,
            held: 0,
            remaining: 4_000,
            resets_at: "2027-01-01T00:00:00Z".into(),
        }]
    );
}

#[test]
fn days_roll_over_at_local_midnight_and_months_on_the_first() {
    let berlin = Calendar::parse("Europe/Berlin").unwrap();
    let quota = Quota::new(limits(1_000, 10_000, 0, 0), berlin);
    // 23:30 on 31 January in Berlin (UTC+1).
    let late = at("2027-01-31T22:30:00Z");
    quota.spent(&[spent(1, "2027-01-31T22:00:00Z", 900)], late);
    let answer = quota.check(1, 0, late);
    assert_eq!(scope(&answer, Scope::UserDaily).used, 900);
    assert_eq!(
        scope(&answer, Scope::UserDaily).resets_at,
        "2027-01-31T23:00:00Z"
    );
    assert_eq!(
        scope(&answer, Scope::UserMonthly).resets_at,
        "2027-01-31T23:00:00Z"
    );
    // 00:30 on 1 February in Berlin: a new day and a new month.
    let answer = quota.check(1, 0, at("2027-01-31T23:30:00Z"));
    assert_eq!(scope(&answer, Scope::UserDaily).used, 0);
    assert_eq!(scope(&answer, Scope::UserMonthly).used, 0);
    assert_eq!(
        scope(&answer, Scope::UserMonthly).resets_at,
        "2027-02-28T23:00:00Z"
    );
}

#[test]
fn a_day_of_the_summer_time_change_has_23_hours() {
    let berlin = Calendar::parse("Europe/Berlin").unwrap();
    let quota = Quota::new(limits(1_000, 0, 0, 0), berlin);
    // 28 March 2027 starts at 23:00 UTC the day before (UTC+1) and ends at 22:00 UTC
    // (UTC+2): clocks go forward at 01:00 UTC.
    let morning = at("2027-03-28T08:00:00Z");
    quota.spent(
        &[
            spent(1, "2027-03-27T22:30:00Z", 1),   // 23:30 on the 27th
            spent(1, "2027-03-27T23:30:00Z", 10),  // 00:30 on the 28th
            spent(1, "2027-03-28T21:30:00Z", 100), // 23:30 on the 28th
        ],
        morning,
    );
    let answer = quota.check(1, 0, morning);
    assert_eq!(scope(&answer, Scope::UserDaily).used, 110);
    assert_eq!(
        scope(&answer, Scope::UserDaily).resets_at,
        "2027-03-28T22:00:00Z"
    );
    let next_day = quota.check(1, 0, at("2027-03-28T22:00:00Z"));
    assert_eq!(scope(&next_day, Scope::UserDaily).used, 0);
}

#[test]
fn a_back_dated_event_counts_in_its_own_day() {
    let quota = Quota::new(limits(1_000, 10_000, 0, 0), utc());
    let now = at("2026-12-07T12:00:00Z");
    quota.spent(&[spent(1, "2026-12-06T23:59:59Z", 500)], now);
    let answer = quota.check(1, 0, now);
    assert_eq!(
        scope(&answer, Scope::UserDaily).used,
        0,
        "yesterday is not today"
    );
    assert_eq!(scope(&answer, Scope::UserMonthly).used, 500);
    // Last month's event counts in neither.
    quota.spent(&[spent(1, "2026-11-30T23:00:00Z", 7)], now);
    assert_eq!(scope(&quota.check(1, 0, now), Scope::UserMonthly).used, 500);
}

#[test]
fn a_hold_counts_until_its_event_settles_it_with_the_real_tokens() {
    let quota = Quota::new(limits(1_000, 0, 0, 0), utc());
    let now = at("2026-12-07T12:00:00Z");
    let HoldOutcome::Granted {
        hold_id,
        expires_at,
        answer,
    } = quota.hold(1, 800, now)
    else {
        panic!("the hold fits");
    };
    assert_eq!(expires_at, at("2026-12-07T12:05:00Z"));
    assert_eq!(scope(&answer, Scope::UserDaily).held, 800);
    assert!(matches!(quota.hold(1, 201, now), HoldOutcome::Refused(_)));
    assert!(!quota.check(1, 201, now).allowed);
    quota.spent(
        &[Spent {
            hold_id: Some(hold_id),
            ..spent(1, "2026-12-07T12:00:01Z", 650)
        }],
        now,
    );
    let daily = quota.check(1, 0, now).limits[0].clone();
    assert_eq!((daily.used, daily.held, daily.remaining), (650, 0, 350));
    assert!(!quota.release(hold_id, now), "a settled hold is not open");
}

#[test]
fn a_duplicate_settles_its_hold_without_counting_again() {
    let quota = Quota::new(limits(1_000, 0, 0, 0), utc());
    let now = at("2026-12-07T12:00:00Z");
    let HoldOutcome::Granted { hold_id, .. } = quota.hold(1, 500, now) else {
        panic!("the hold fits");
    };
    quota.spent(
        &[Spent {
            hold_id: Some(hold_id),
            new: false,
            ..spent(1, "2026-12-07T11:00:00Z", 300)
        }],
        now,
    );
    let daily = &quota.check(1, 0, now).limits[0];
    assert_eq!((daily.used, daily.held), (0, 0));
}

#[test]
fn holds_are_released_on_request_or_when_they_expire() {
    let quota = Quota::new(
        QuotaConfig {
            hold_ttl_secs: 60,
            ..limits(0, 0, 1_000, 0)
        },
        utc(),
    );
    let now = at("2026-12-07T12:00:00Z");
    let HoldOutcome::Granted { hold_id: a, .. } = quota.hold(1, 400, now) else {
        panic!()
    };
    let HoldOutcome::Granted { .. } = quota.hold(2, 400, now) else {
        panic!()
    };
    assert_eq!(quota.open_holds(now), 2);
    assert!(quota.release(a, now));
    assert!(!quota.release(a, now));
    assert_eq!(scope(&quota.check(1, 0, now), Scope::SiteDaily).held, 400);
    let later = at("2026-12-07T12:01:00Z");
    assert_eq!(quota.open_holds(later), 0);
    assert_eq!(scope(&quota.check(1, 0, later), Scope::SiteDaily).held, 0);
}

#[test]
fn concurrent_holds_never_overshoot() {
    let quota = Arc::new(Quota::new(limits(0, 0, 1_000, 0), utc()));
    let now = at("2026-12-07T12:00:00Z");
    let threads: Vec<_> = (0..32)
        .map(|user| {
            let quota = Arc::clone(&quota);
            std::thread::spawn(move || {
                matches!(quota.hold(user, 100, now), HoldOutcome::Granted { .. })
            })
        })
        .collect();
    let granted = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|granted| *granted)
        .count();
    assert_eq!(granted, 10);
    assert_eq!(scope(&quota.check(0, 0, now), Scope::SiteDaily).held, 1_000);
}

#[test]
fn an_erased_user_leaves_the_counters_at_once() {
    let quota = Quota::new(limits(1_000, 0, 0, 5_000), utc());
    let now = at("2026-12-07T12:00:00Z");
    quota.spent(
        &[
            spent(1, "2026-12-07T10:00:00Z", 700),
            spent(2, "2026-12-07T10:00:00Z", 100),
        ],
        now,
    );
    quota.forget_user(1);
    let answer = quota.check(1, 0, now);
    assert_eq!(scope(&answer, Scope::UserDaily).used, 0);
    assert_eq!(scope(&answer, Scope::SiteMonthly).used, 100);
}

#[test]
fn the_counts_rebuilt_from_the_store_equal_the_counts_kept_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("u.db"), Synchronous::Normal).unwrap();
    let berlin = Calendar::parse("Europe/Berlin").unwrap();
    let config = limits(10_000, 100_000, 50_000, 500_000);
    let live = Quota::new(config.clone(), berlin);
    let now = at("2026-12-15T12:00:00Z");
    let times = [
        "2026-11-30T22:59:59Z", // 23:59:59 on 30 November: last month
        "2026-11-30T23:00:00Z", // midnight on 1 December
        "2026-12-10T09:00:00Z",
        "2026-12-14T23:30:00Z", // 00:30 on the 15th
        "2026-12-15T11:00:00Z",
    ];
    let mut events = Vec::new();
    for (i, when) in times.iter().enumerate() {
        for user in [1, 2] {
            let ms = at(when).timestamp_millis();
            events.push(event(
                user,
                Source::Inline,
                "m",
                ms,
                100 * (i as u64 + 1),
                user,
            ));
        }
    }
    store.record(&events).unwrap();
    let as_spent: Vec<Spent> = events
        .iter()
        .map(|e| Spent {
            user_id: e.user_id,
            created_at_ms: e.created_at_ms,
            tokens: e.tokens.total(),
            hold_id: None,
            new: true,
        })
        .collect();
    live.spent(&as_spent, now);
    let rebuilt = Quota::rebuild(config, berlin, &store, now).unwrap();
    for user in [1, 2, 3] {
        assert_eq!(rebuilt.check(user, 0, now), live.check(user, 0, now));
    }
    let answer = rebuilt.check(1, 0, now);
    assert_eq!(scope(&answer, Scope::UserDaily).used, 400 + 1 + 500 + 1);
    assert_eq!(
        scope(&answer, Scope::UserMonthly).used,
        (200 + 300 + 400 + 500) + 4
    );
}

#[test]
fn days_whose_events_retention_deleted_are_counted_from_the_summaries() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("u.db"), Synchronous::Normal).unwrap();
    let now = at("2026-12-15T12:00:00Z");
    let early = at("2026-12-02T10:00:00Z").timestamp_millis();
    let today = at("2026-12-15T10:00:00Z").timestamp_millis();
    store
        .record(&[
            event(1, Source::Inline, "m", early, 1_000, 0),
            event(1, Source::Inline, "m", today, 20, 0),
        ])
        .unwrap();
    let (start, end) = utc().day_range("2026-12-02".parse().unwrap());
    store.recompute_day("2026-12-02", start, end).unwrap();
    store
        .set_rollup_seq(store.max_event_seq().unwrap())
        .unwrap();
    assert_eq!(store.purge_events_chunk(end, 100).unwrap().rows, 1);
    let rebuilt = Quota::rebuild(limits(0, 100_000, 0, 0), utc(), &store, now).unwrap();
    assert_eq!(
        scope(&rebuilt.check(1, 0, now), Scope::UserMonthly).used,
        1_020
    );
    // A day with its raw events still there is not counted twice.
    let (start, end) = utc().day_range("2026-12-15".parse().unwrap());
    store.recompute_day("2026-12-15", start, end).unwrap();
    let rebuilt = Quota::rebuild(limits(0, 100_000, 0, 0), utc(), &store, now).unwrap();
    assert_eq!(
        scope(&rebuilt.check(1, 0, now), Scope::UserMonthly).used,
        1_020
    );
}

#[test]
fn a_changed_time_zone_recounts_the_days_at_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("u.db"), Synchronous::Normal).unwrap();
    // 23:30 UTC on the 14th is 00:30 on the 15th in Berlin.
    let ms = at("2026-12-14T23:30:00Z").timestamp_millis();
    store
        .record(&[event(1, Source::Inline, "m", ms, 50, 0)])
        .unwrap();
    let now = at("2026-12-15T12:00:00Z");
    let in_utc = Quota::rebuild(limits(1_000, 0, 0, 0), utc(), &store, now).unwrap();
    assert_eq!(in_utc.check(1, 0, now).limits[0].used, 0);
    let berlin = Calendar::parse("Europe/Berlin").unwrap();
    let in_berlin = Quota::rebuild(limits(1_000, 0, 0, 0), berlin, &store, now).unwrap();
    assert_eq!(in_berlin.check(1, 0, now).limits[0].used, 50);
    assert_eq!(
        in_berlin.check(1, 0, now).limits[0].resets_at,
        "2026-12-15T23:00:00Z"
    );
}

#[test]
fn hold_ids_are_unique() {
    let quota = Quota::new(QuotaConfig::default(), utc());
    let now = at("2026-12-07T12:00:00Z");
    let ids: std::collections::HashSet<Uuid> = (0..100)
        .map(|_| match quota.hold(1, 1, now) {
            HoldOutcome::Granted { hold_id, .. } => hold_id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids.len(), 100);
}

#[test]
fn past_the_most_open_holds_a_hold_is_refused_until_one_closes() {
    let quota = Quota::new(QuotaConfig::default(), utc());
    let now = at("2026-12-07T12:00:00Z");
    let mut first = None;
    for _ in 0..holds::MAX_OPEN_HOLDS {
        match quota.hold(1, 1, now) {
            HoldOutcome::Granted { hold_id, .. } => {
                first.get_or_insert(hold_id);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(quota.hold(1, 1, now), HoldOutcome::Full);
    assert!(quota.release(first.unwrap(), now));
    assert!(matches!(quota.hold(1, 1, now), HoldOutcome::Granted { .. }));
}
