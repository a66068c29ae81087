//! The plan history migration on a database the previous release left: every install's
//! history starts at its enrollment day with the plan it has.

use usage_receiver::billing::pricing::Plan;
use usage_receiver::days::{MS_PER_DAY, parse_day};

use crate::common::{open_postgres, test_cluster};

#[test]
fn the_plan_history_migration_starts_each_install_at_its_enrollment_day() {
    // A database at schema 7: `a` enrolled on 5 January 2026 and is on pro, `b` enrolled in
    // the last millisecond of 10 March 2026 and is on free.
    let url = test_cluster().new_database().unwrap();
    let name = url.split('/').nth(3).unwrap().split('?').next().unwrap();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/store/postgres/migrations");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    for file in &files[..7] {
        test_cluster()
            .psql(name, &std::fs::read_to_string(file).unwrap())
            .unwrap();
    }
    let jan_5 = parse_day("2026-01-05").unwrap();
    let mar_10 = parse_day("2026-03-10").unwrap();
    test_cluster()
        .psql(
            name,
            &format!(
                "CREATE TABLE schema_migrations (version integer PRIMARY KEY,
                     applied_at timestamptz NOT NULL DEFAULT now());
                 INSERT INTO schema_migrations (version) SELECT generate_series(1, 7);
                 INSERT INTO installs (install_id, secret, site_hash, enrolled_at, plan)
                     VALUES ('a', 'x', 's', {}, 'pro'), ('b', 'x', 's', {}, 'free');",
                jan_5 * MS_PER_DAY + 9 * 3_600_000,
                (mar_10 + 1) * MS_PER_DAY - 1,
            ),
        )
        .unwrap();

    let store = open_postgres(&url);
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
