//! The dashboard as a browser shows it: headless Chromium renders the pages of a receiver
//! filled through the real API (signed batches of several models, one of them without a
//! price, plans, labels, budgets and their alerts), and the checks read the DOM it built.
//! Screenshots at 1400 and 400 px wide; `UPDATE_SCREENSHOTS=1` writes them to `docs/`
//! (docs/dashboard.md).

use chrono::{Duration, TimeZone, Utc};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use usage_protocol::signing::Secret;
use usage_protocol::wire::user_hash;
use usage_receiver::ReceiverSettings;
use usage_testkit::chromium::{Rendered, headless};

use crate::common::{PROVIDER_PASSWORD, PROVIDER_USER, TestReceiver, receiver_settings};
use crate::provider::{earlier_today, enroll, event, get_text, send, set_label, set_plan};

/// Renders `path` of `rx` in headless Chromium: the DOM it built, a screenshot, and its
/// log.
async fn render_in_chromium(
    rx: &TestReceiver,
    path: &str,
    width: u32,
    height: u32,
) -> (String, Vec<u8>) {
    let url = format!(
        "http://{PROVIDER_USER}:{PROVIDER_PASSWORD}@{}{path}",
        rx.addr
    );
    let size = format!("--window-size={width},{height}");
    tokio::task::spawn_blocking(move || {
        let profile = tempfile::tempdir().unwrap();
        let shot = profile.path().join("shot.png");
        let shot_arg = format!("--screenshot={}", shot.display());
        let Rendered { stdout: dom, log } =
            headless(&profile.path().join("dom"), &["--dump-dom", &url]);
        let shot_log = headless(
            &profile.path().join("shot"),
            &[&size, "--hide-scrollbars", &shot_arg, &url],
        )
        .log;
        for log in [&log, &shot_log] {
            assert!(
                !log.contains("Content Security Policy") && !log.contains("Refused to"),
                "the page broke its own policy: {log}"
            );
        }
        (
            dom,
            std::fs::read(&shot).expect("chromium wrote the screenshot"),
        )
    })
    .await
    .unwrap()
}

/// Prices per 1K tokens for three models; `deepseek-chat` has none (no default price).
fn settings(now: chrono::DateTime<Utc>) -> ReceiverSettings {
    ReceiverSettings {
        default_cost_per_1k_tokens: None,
        model_cost_overrides: [
            ("gpt-4o".to_owned(), 0.005),
            ("claude-3".to_owned(), 0.015),
            ("llama-3".to_owned(), 0.001),
        ]
        .into_iter()
        .collect(),
        plan_pro_monthly: Some(19.0),
        plan_agency_monthly: Some(99.99),
        provider_now: Some(now),
        ..receiver_settings()
    }
}

/// The text of the element with `id` in `dom`, tags dropped.
fn text_of(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("#{id} in the page"));
    let open = start + dom[start..].find('>').unwrap() + 1;
    let close = open + dom[open..].find("</div>").unwrap();
    strip_tags(&dom[open..close])
}

fn strip_tags(html: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for c in html.chars() {
        match c {
            '<' => inside = true,
            '>' => inside = false,
            c if !inside => out.push(c),
            _ => {}
        }
    }
    out
}

/// Cents of an amount as the dashboard writes it: `≥ 1,234.56 USD`.
fn cents_of(text: &str) -> i64 {
    let digits: String = text
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("an amount: {text:?}"))
}

/// The rows of the installations table, in order: each row's HTML.
fn install_rows(dom: &str) -> Vec<&str> {
    dom.split("<tr class=\"install\">")
        .skip(1)
        .map(|row| &row[..row.find("</tr>").unwrap()])
        .collect()
}

/// Enrolls `install_id` straight in the store (enrolled at `at_ms`), for tests that fill a
/// fleet faster than signed batches can; returns its key.
fn enroll_in_store(
    store: &dyn usage_receiver::store::ReceiverStore,
    install_id: &str,
    at_ms: i64,
) -> usage_receiver::store::InstallKey {
    store
        .enroll(&usage_receiver::store::NewInstall {
            install_id: install_id.into(),
            secret: Secret::generate(),
            site_hash: "cd".repeat(32),
            enrolled_at_ms: at_ms,
        })
        .unwrap();
    store.find_install(install_id).unwrap().unwrap().key
}

#[tokio::test]
async fn the_dashboard_renders_in_headless_chromium() {
    let now = Utc::now();
    let rx = TestReceiver::start(settings(now));
    let models = [
        ("gpt-4o", 180_000),
        ("claude-3", 640_000),
        ("llama-3", 90_000),
        ("deepseek-chat", 400_000),
    ];
    let installs = [
        ("free", Some("Bakery blog")),
        ("pro", Some("Acme shop")),
        ("agency", Some("Northwind agency sites")),
        ("pro", None),
        ("free", None),
        ("agency", Some("Contoso support desk")),
        ("pro", Some("Fabrikam docs")),
    ];
    let mut ids = Vec::new();
    for (n, (plan, label)) in installs.into_iter().enumerate() {
        let install = enroll(&rx).await;
        // Acme shop's budget is spent (alerts to show); Northwind's is not.
        let budget = match label {
            Some("Acme shop") => Some(r#"{"monthly": 0.05, "thresholds": [50, 80, 100]}"#),
            Some("Northwind agency sites") => Some(r#"{"monthly": 5000}"#),
            _ => None,
        };
        if let Some(budget) = budget {
            let (status, _) = crate::budgets::put_budget(&rx, &install.id, budget).await;
            assert_eq!(status, StatusCode::OK);
        }
        // Eight weeks of history each (so the 30 days before the last 30 have some), from
        // both sources and three users, a little more each install, so no two cost the
        // same; installs 1 and 4 also use the model without a price, Fabrikam only it.
        let kinds = if n % 3 == 1 { 4 } else { 3 };
        let events: Vec<Value> = (0..28u32)
            .map(|day| {
                let (model, tokens) = if label == Some("Fabrikam docs") {
                    models[3]
                } else {
                    models[(n + day as usize) % kinds]
                };
                let at = earlier_today(now) - Duration::days(i64::from(day * 2));
                let tokens = tokens / (u64::from(day % 5) + 1) + 1_000 * n as u64;
                let mut event = event(&install, model, tokens, at);
                event["user_hash"] = json!(user_hash(&install.id, u64::from(day % 3)));
                if (n + day as usize).is_multiple_of(3) {
                    event["source"] = json!("bulk");
                }
                event
            })
            .collect();
        assert_eq!(send(&rx, &install, &events).await, StatusCode::OK);
        let body = format!(r#"{{"plan": "{plan}"}}"#);
        assert_eq!(
            set_plan(&rx, &install.id, &body).await.status(),
            StatusCode::OK
        );
        if let Some(label) = label {
            let body = json!({ "label": label }).to_string();
            assert_eq!(
                set_label(&rx, &install.id, &body).await.status(),
                StatusCode::OK
            );
        }
        ids.push(install.id);
    }
    let view = "/dashboard?period=30d";
    let (dom, wide) = render_in_chromium(&rx, view, 1400, 1600).await;
    // Every install, one row each, and nothing ran.
    let rows = install_rows(&dom);
    assert_eq!(rows.len(), ids.len(), "{dom}");
    for id in &ids {
        assert!(dom.contains(&format!("title=\"{id}\"")), "{id} missing");
    }

    // The totals strip is the CSV's sums.
    let csv = get_text(&rx, "/api/usage/installations?format=csv&period=30d").await;
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let column = |name: &str| header.iter().position(|key| *key == name).unwrap();
    let records: Vec<Vec<String>> = lines
        .map(|line| line.split(',').map(str::to_owned).collect())
        .collect();
    let sum = |name: &str| -> i64 {
        records
            .iter()
            .map(|record| cents_of(&record[column(name)]))
            .sum()
    };
    assert_eq!(cents_of(&text_of(&dom, "total-cost")), sum("cost"));
    assert_eq!(cents_of(&text_of(&dom, "total-revenue")), sum("revenue"));
    assert_eq!(cents_of(&text_of(&dom, "total-profit")), sum("profit"));
    assert!(text_of(&dom, "total-cost").ends_with(" USD"));
    // Some cost is unpriced: the totals say they are a bound.
    assert!(text_of(&dom, "total-cost").contains("at least"), "{dom}");
    assert!(dom.contains("id=\"lower-bound\""));
    assert_eq!(text_of(&dom, "total-alerts"), "Alerts this month3");
    let at_a_loss = records
        .iter()
        .filter(|r| cents_of(&r[column("profit")]) < 0)
        .count();
    assert_eq!(
        text_of(&dom, "total-at-a-loss"),
        format!("Installs at a loss{at_a_loss}")
    );

    // The first row is the costliest install.
    let costliest = records
        .iter()
        .max_by_key(|r| cents_of(&r[column("cost")]))
        .unwrap();
    assert!(
        rows[0].contains(&format!("title=\"{}\"", costliest[column("install_id")])),
        "{}",
        rows[0]
    );

    // An unpriced model never shows 0.00: Fabrikam's cost reads "unpriced", the panel
    // lists the model with its tokens and installs.
    let fabrikam = rows
        .iter()
        .find(|row| row.contains("Fabrikam docs"))
        .unwrap();
    assert!(fabrikam.contains(">unpriced</td>"), "{fabrikam}");
    assert!(!fabrikam.contains(">0.00<"), "{fabrikam}");
    let panel = &dom[dom
        .find("id=\"unpriced-models\"")
        .expect("the unpriced panel")..];
    let panel = &panel[..panel.find("</section>").unwrap()];
    assert!(panel.contains("deepseek-chat"));
    assert!(!panel.contains("0.00"));
    // The chart is cost, scales to its box, and its axes are labelled.
    assert!(dom.contains("viewBox=\"0 0 800 260\""));
    assert!(dom.contains("Cost per day (USD)") && dom.contains("Day (UTC)"));
    assert!(dom.contains("today, partial"));
    // The month's alerts at the top, none delivered anywhere: no webhook is configured.
    assert_eq!(dom.matches("no webhook configured").count(), 3);
    assert!(dom.find("id=\"month-alerts\"") < dom.find("id=\"installations\""));

    // A search finds a label, ignoring case; the plan filter keeps its plan.
    let (found, _) = render_in_chromium(&rx, &format!("{view}&q=ACME"), 1400, 900).await;
    let found_rows = install_rows(&found);
    assert_eq!(found_rows.len(), 1, "{found}");
    assert!(found_rows[0].contains("Acme shop"));
    assert!(found.contains("1 of 7 installs match"));
    let agency = get_text(&rx, &format!("{view}&plan=agency")).await;
    assert_eq!(install_rows(&agency).len(), 2);
    // The CSV link keeps the search.
    assert!(found.contains("format=csv&amp;period=30d&amp;sort=-cost&amp;q=acme"));

    // At 400 px: a viewport, the wide table scrolls inside its own box, the chart has no
    // fixed width.
    let (_, narrow) = render_in_chromium(&rx, view, 400, 1600).await;
    assert!(
        dom.contains("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
    );
    assert!(
        dom.contains("<div class=\"scroll\" id=\"installations-box\"><table id=\"installations\">")
    );
    assert!(dom.contains(".scroll{overflow-x:auto"));
    assert!(!dom.contains("<svg id=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width="));

    // An install's page: dearest model first, the unpriced model reads "unpriced".
    let acme = &ids[1];
    let detail = format!("/dashboard/installations/{acme}?period=30d");
    let (detail_dom, detail_wide) = render_in_chromium(&rx, &detail, 1400, 1500).await;
    assert!(detail_dom.contains("Acme shop"));
    let by_model = &detail_dom[detail_dom.find("<table id=\"by-model\">").unwrap()..];
    let by_model = &by_model[..by_model.find("</table>").unwrap()];
    let claude = by_model.find("claude-3").unwrap();
    assert!(claude < by_model.find("gpt-4o").unwrap(), "{by_model}");
    assert!(claude < by_model.find("llama-3").unwrap());
    let deepseek = &by_model[by_model.find("deepseek-chat").unwrap()..];
    assert!(
        deepseek.contains("unpriced")
            && !deepseek[..deepseek.find("</tr>").unwrap()].contains(">0.00<")
    );
    assert!(detail_dom.contains("<table id=\"by-source\">"));
    assert!(detail_dom.contains("<table id=\"by-user\">"));
    // Its plan history: pro since today (set the day it enrolled, so from enrollment on).
    let today = now.format("%Y-%m-%d").to_string();
    assert!(
        detail_dom.contains(&format!(
            "<tr><td>pro</td><td class=\"nowrap\">{today}</td><td class=\"nowrap\">today</td></tr>"
        )),
        "{detail_dom}"
    );
    // Every alert of the install is listed: this month's three, and last month's that its
    // late events (four weeks of history) raised in their own month.
    let alerts: Value =
        serde_json::from_str(&get_text(&rx, "/api/alerts?limit=1000").await).unwrap();
    let acme_alerts = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|alert| alert["install_id"] == acme.as_str())
        .count();
    assert!(acme_alerts >= 3, "{alerts}");
    assert_eq!(
        detail_dom.matches("no webhook configured").count(),
        acme_alerts,
        "Acme shop's alerts listed"
    );
    let (_, detail_narrow) = render_in_chromium(&rx, &detail, 400, 1500).await;

    for png in [&wide, &narrow, &detail_wide, &detail_narrow] {
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    }
    // `UPDATE_SCREENSHOTS=1` refreshes the screenshots kept in the repository.
    if std::env::var_os("UPDATE_SCREENSHOTS").is_some_and(|v| v == "1") {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
        for (name, png) in [
            ("dashboard-wide.png", &wide),
            ("dashboard-narrow.png", &narrow),
            ("dashboard-install-wide.png", &detail_wide),
            ("dashboard-install-narrow.png", &detail_narrow),
        ] {
            std::fs::write(docs.join(name), png).expect("write the screenshot");
        }
    }
}

#[tokio::test]
async fn an_install_page_lists_its_hundred_costliest_users_and_counts_the_rest() {
    use usage_protocol::event::Source;
    use usage_receiver::store::NewEvent;

    let now = Utc.with_ymd_and_hms(2026, 3, 31, 12, 0, 0).unwrap();
    let rx = TestReceiver::start(settings(now));
    let store = rx.store.clone();
    let at = now.timestamp_millis();
    tokio::task::spawn_blocking(move || {
        let key = enroll_in_store(&*store, "busy-site", at);
        // 20,000 users; user n used 10 × (n + 1) gpt-4o tokens.
        let events: Vec<NewEvent> = (0..20_000u32)
            .map(|n| {
                let mut user_hash = [0u8; 32];
                user_hash[..4].copy_from_slice(&n.to_be_bytes());
                NewEvent {
                    event_id: Uuid::new_v4(),
                    user_hash,
                    source: Source::Inline,
                    model: "gpt-4o".into(),
                    prompt_tokens: 10 * u64::from(n + 1),
                    completion_tokens: 0,
                    cached_tokens: 0,
                    cache_write_tokens: 0,
                    reasoning_tokens: 0,
                    origin: None,
                    context: None,
                    created_at_ms: at,
                }
            })
            .collect();
        for chunk in events.chunks(1000) {
            store.ingest(key, chunk.to_vec(), at).unwrap();
        }
    })
    .await
    .unwrap();
    let page = get_text(&rx, "/dashboard/installations/busy-site").await;
    let users = &page[page.find("<table id=\"by-user\">").unwrap()..];
    let users = &users[..users.find("</table>").unwrap()];
    // A heading row, 100 users and the others' line.
    assert_eq!(users.matches("<tr").count(), 102, "{users}");
    assert!(users.contains("and 19,900 more users"));
    // The dearest user (n = 19,999: 200,000 tokens, 1.00) first.
    let first = &users[users.find("<tr><td>").unwrap()..];
    assert!(first.starts_with("<tr><td><code>00004e1f"), "{first}");
    assert!(page.contains("By user (20,000)"));
    assert!(page.len() < 200_000, "{} bytes", page.len());
}

#[tokio::test]
async fn an_install_page_lists_only_its_own_alerts_among_the_fleets() {
    use usage_receiver::billing::money::Micros;
    use usage_receiver::store::NewAlert;

    let now = Utc.with_ymd_and_hms(2026, 3, 31, 12, 0, 0).unwrap();
    let rx = TestReceiver::start(settings(now));
    let store = rx.store.clone();
    let at = now.timestamp_millis();
    tokio::task::spawn_blocking(move || {
        // 300 installs with two alerts each, in this month and the one before; the install
        // looked at has three, of 45, 55 and 65 (no other install alerts at those).
        let mut alerts = Vec::new();
        for n in 0..300 {
            let key = enroll_in_store(&*store, &format!("site-{n:03}"), at);
            let thresholds: &[u32] = if n == 150 { &[45, 55, 65] } else { &[50, 80] };
            for (i, &threshold) in thresholds.iter().enumerate() {
                alerts.push(NewAlert {
                    alert_id: Uuid::now_v7(),
                    install: key,
                    threshold,
                    month: if i == 0 { "2026-02" } else { "2026-03" }.into(),
                    cost: Micros(41_000_000),
                    budget: Micros(50_000_000),
                    currency: "USD".into(),
                    at_ms: at - i64::from(n) * 1000 + i as i64 * 60_000,
                });
            }
        }
        assert_eq!(store.record_alerts(&alerts).unwrap().len(), 601);
    })
    .await
    .unwrap();
    let page = get_text(&rx, "/dashboard/installations/site-150").await;
    let table = &page[page.find("<table id=\"alerts-table\">").unwrap()..];
    let table = &table[..table.find("</table>").unwrap()];
    // A heading row and its own three alerts, newest first.
    assert_eq!(table.matches("<tr").count(), 4, "{table}");
    let thresholds: Vec<usize> = ["65%", "55%", "45%"]
        .iter()
        .map(|t| table.find(t).unwrap_or_else(|| panic!("{t} in {table}")))
        .collect();
    assert!(thresholds.is_sorted(), "{table}");
    assert!(!table.contains("50%") && !table.contains("80%"), "{table}");
}

#[tokio::test]
async fn an_empty_dashboard_says_so() {
    let rx = TestReceiver::start(settings(Utc::now()));
    let page = get_text(&rx, "/dashboard").await;
    assert!(page.contains("No priced usage in this period: nothing to chart."));
    assert!(!page.contains("max 1"));
    assert!(page.contains("No installs yet."));
    assert!(page.contains("No budget alerts this month."));
    let install = enroll(&rx).await;
    let page = get_text(&rx, "/dashboard?q=nothing-like-it").await;
    assert!(page.contains("No install matches this search."));
    let detail = get_text(&rx, &format!("/dashboard/installations/{}", install.id)).await;
    assert!(detail.contains("No priced usage in this period"));
    assert!(detail.contains("No usage in this period."));
}

/// `cargo test --release -p usage-receiver --test api dashboard_of_3001 -- --nocapture`
/// prints the fastest of three 30-day pages (BENCHMARKS.md, the dashboard on SQLite).
#[tokio::test]
async fn the_dashboard_of_3001_installs_shows_its_costliest_first() {
    use usage_protocol::event::Source;
    use usage_receiver::store::NewEvent;

    // The last day of a 31-day month, so the 30 days and the 30 before hold every day.
    let now = Utc.with_ymd_and_hms(2026, 3, 31, 12, 0, 0).unwrap();
    let rx = TestReceiver::start(settings(now));
    let store = rx.store.clone();
    let at = now.timestamp_millis();
    const INSTALLS: u32 = 3001;
    const DAYS: i64 = 40;
    let models = ["gpt-4o", "claude-3", "llama-3", "deepseek-chat"];
    tokio::task::spawn_blocking(move || {
        for n in 0..INSTALLS {
            let key = enroll_in_store(&*store, &format!("install-{n:04}"), at);
            // 40 days × 4 models: 160 rollup rows per install, 480,160 in all; install n
            // uses 100 × (n + 1) more tokens of each, so the last one costs most.
            let events: Vec<NewEvent> = (0..DAYS * 4)
                .map(|i| NewEvent {
                    event_id: Uuid::new_v4(),
                    user_hash: [(i % 7) as u8; 32],
                    source: Source::Bulk,
                    model: models[(i % 4) as usize].into(),
                    prompt_tokens: 1_000 + 100 * u64::from(n + 1),
                    completion_tokens: 50,
                    cached_tokens: 0,
                    cache_write_tokens: 0,
                    reasoning_tokens: 0,
                    origin: None,
                    context: None,
                    created_at_ms: at - (i / 4) * 86_400_000,
                })
                .collect();
            store.ingest(key, events, at).unwrap();
        }
    })
    .await
    .unwrap();
    let mut times = Vec::new();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let page = get_text(&rx, "/dashboard?period=30d").await;
        times.push(started.elapsed());
        let rows = install_rows(&page);
        assert_eq!(rows.len(), 100);
        assert!(rows[0].contains("install-3000"), "{}", rows[0]);
        assert!(page.contains("3,001 installs"));
    }
    // One install stores a batch: the next page reads its rows and today's again.
    let store = rx.store.clone();
    tokio::task::spawn_blocking(move || {
        let key = store.find_install("install-0000").unwrap().unwrap().key;
        let event = NewEvent {
            event_id: Uuid::new_v4(),
            user_hash: [1; 32],
            source: Source::Inline,
            model: "gpt-4o".into(),
            prompt_tokens: 1_000_000_000,
            completion_tokens: 0,
            cached_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            origin: None,
            context: None,
            created_at_ms: at,
        };
        store.ingest(key, vec![event], at).unwrap();
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let page = get_text(&rx, "/dashboard?period=30d").await;
    let changed = started.elapsed();
    assert!(install_rows(&page)[0].contains("install-0000"));
    // Reported, not asserted: speed is a benchmark's business (BENCHMARKS.md).
    let fastest = times.iter().min().unwrap();
    println!(
        "dashboard, 30 days of 3001 installs: {fastest:?} (first {:?}, after one batch {changed:?})",
        times[0]
    );
}
