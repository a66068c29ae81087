//! What people see: Tools > AI usage (the agent's numbers, sync status, the two buttons
//! behind nonces, admins only), each user's own usage on their profile, Site Health, the
//! WP-CLI command, and a display name carrying HTML printed escaped everywhere. The admin
//! page and the profile are also rendered in headless Chromium, and their screenshots land
//! in `$CARGO_TARGET_TMPDIR/wordpress` (the ones in docs/images come from there).

use std::path::Path;

use reqwest::StatusCode;
use serde_json::Value;
use usage_testkit::chromium::headless;

use crate::NewEvents;
use crate::harness::Agent;
use crate::provider::Provider;
use crate::site::{Site, urlencode};

/// The display name install.php gives the subscriber, and what it must look like escaped.
const PAYLOAD: &str = r#"<script>alert("ua-xss")</script>"#;
const PAYLOAD_ESCAPED: &str = "&lt;script&gt;alert(&quot;ua-xss&quot;)&lt;/script&gt;";

fn assert_escaped(page: &str, what: &str) {
    if let Some(at) = page.find(PAYLOAD) {
        panic!(
            "{what} prints the display name raw: {}",
            &page[at.saturating_sub(300)..(at + 100).min(page.len())]
        );
    }
    assert!(
        !page.contains("<img src=x onerror"),
        "{what} prints the display name raw"
    );
}

/// The value of the nonce field inside the form that posts `action`.
fn nonce_for(page: &str, action: &str) -> String {
    let form = page
        .split("<form")
        .find(|form| form.contains(&format!("value=\"{action}\"")))
        .unwrap_or_else(|| panic!("a form for {action}"));
    let after = form
        .split("name=\"_wpnonce\" value=\"")
        .nth(1)
        .expect("a nonce field");
    after[..after.find('"').unwrap()].to_string()
}

/// `n` as WordPress's number_format_i18n prints it in English.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Logs `login` in through the test's login redirect and renders `path`: the DOM Chromium
/// built, and a screenshot saved as `shot`.
async fn render(site: &Site, login: &str, path: &str, shot: &str, height: u32) -> String {
    let url = format!(
        "{}/?ua_test=login&as={login}&to={}",
        site.url,
        urlencode(path)
    );
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("wordpress");
    std::fs::create_dir_all(&dir).unwrap();
    let shot = dir.join(shot);
    let profile = site.dir.path().join(format!("chromium-{login}"));
    tokio::task::spawn_blocking(move || {
        let dom = headless(&profile.join("dom"), &["--dump-dom", &url]).stdout;
        let size = format!("--window-size=1280,{height}");
        let shot_arg = format!("--screenshot={}", shot.display());
        headless(
            &profile.join("shot"),
            &[&size, "--hide-scrollbars", &shot_arg, &url],
        );
        assert!(shot.exists(), "chromium wrote {}", shot.display());
        dom
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn admins_and_users_see_the_agents_numbers_escaped_and_behind_nonces() {
    let agent = Agent::start("").await;
    let provider = Provider::start().await;
    let site = Site::start(&agent.socket, &provider.url).await;
    let mut events = NewEvents::default();

    // Usage to show: two plugins, the admin and the subscriber.
    let admin = site.cookies("admin").await;
    let subscriber = site.cookies("subscriber").await;
    let author = site.cookies("author").await;
    for (path, cookie) in [
        ("/?alt_text_bot=openai_responses", Some(author.as_str())),
        ("/?alt_text_bot=anthropic_messages", Some(admin.as_str())),
        ("/?alt_text_bot=openai_chat", None),
        ("/?post_summarizer=gemini", Some(admin.as_str())),
        (
            "/?post_summarizer=openai_embeddings",
            Some(subscriber.as_str()),
        ),
    ] {
        site.get_json(path, cookie).await;
    }
    assert_eq!(events.take(&agent).await.len(), 5);

    // Tools > AI usage shows the agent's own numbers, current to the last event.
    let (status, page) = site
        .get("/wp-admin/tools.php?page=usage-agent", Some(&admin))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let (_, by_model) = agent
        .get("/v1/usage?group_by=model")
        .await
        .expect("the agent answers");
    let rows = by_model["rows"].as_array().expect("usage rows");
    assert_eq!(rows.len(), 5, "{by_model}");
    let table = page
        .split("id=\"usage-agent-by-model\"")
        .nth(1)
        .expect("the by-model table");
    let table = &table[..table.find("</table>").unwrap()];
    for row in rows {
        let model = row["model"].as_str().unwrap();
        let total = thousands(row["total_tokens"].as_u64().unwrap());
        let line = table
            .split("<tr>")
            .find(|line| line.contains(&format!(">{model}<")))
            .unwrap_or_else(|| panic!("{model} in the by-model table"));
        assert!(
            line.contains(&format!(">{total}<")),
            "{model}: {total} in {line}"
        );
    }
    for id in [
        "usage-agent-by-day",
        "usage-agent-by-user",
        "usage-agent-by-origin",
        "usage-agent-by-source",
        "usage-agent-status",
    ] {
        assert!(page.contains(&format!("id=\"{id}\"")), "{id} on the page");
    }
    assert!(page.contains(">plugin:post-summarizer<") && page.contains(">plugin:alt-text-bot<"));
    assert!(
        page.contains(PAYLOAD_ESCAPED),
        "the subscriber's name, escaped"
    );
    assert_escaped(&page, "Tools > AI usage");

    // Admins only, for the page and for its buttons.
    let (status, _) = site
        .get("/wp-admin/tools.php?page=usage-agent", Some(&subscriber))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let nonce = nonce_for(&page, "usage_agent_retry_failed");
    let (status, _, _) = site
        .post_form(
            "/wp-admin/admin-post.php",
            &subscriber,
            &[("action", "usage_agent_retry_failed"), ("_wpnonce", &nonce)],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a subscriber cannot retry");
    // No nonce, no action.
    let (status, _, _) = site
        .post_form(
            "/wp-admin/admin-post.php",
            &admin,
            &[("action", "usage_agent_retry_failed")],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a POST without its nonce");
    // "Retry failed" with its nonce: back to the page, which says what the agent did.
    let (status, location, _) = site
        .post_form(
            "/wp-admin/admin-post.php",
            &admin,
            &[("action", "usage_agent_retry_failed"), ("_wpnonce", &nonce)],
        )
        .await;
    assert_eq!(status, StatusCode::FOUND);
    assert!(
        location.ends_with("/wp-admin/tools.php?page=usage-agent"),
        "{location}"
    );
    let (_, page) = site
        .get("/wp-admin/tools.php?page=usage-agent", Some(&admin))
        .await;
    assert!(page.contains("0 failed events queued again."), "{page}");
    // "Sync now" with its nonce: this agent has no backend, and the page says so.
    let nonce = nonce_for(&page, "usage_agent_sync");
    let (status, _, _) = site
        .post_form(
            "/wp-admin/admin-post.php",
            &admin,
            &[("action", "usage_agent_sync"), ("_wpnonce", &nonce)],
        )
        .await;
    assert_eq!(status, StatusCode::FOUND);
    let (_, page) = site
        .get("/wp-admin/tools.php?page=usage-agent", Some(&admin))
        .await;
    assert!(
        page.contains("id=\"usage-agent-notice\"") && page.contains("409"),
        "the sync's answer on the page"
    );

    // A subscriber's profile shows their own usage only.
    let (status, profile) = site.get("/wp-admin/profile.php", Some(&subscriber)).await;
    assert_eq!(status, StatusCode::OK);
    let section = profile
        .split("id=\"usage-agent-profile\"")
        .nth(1)
        .expect("the usage section on the profile");
    assert!(section.contains(">text-embedding-3-small<"), "{section}");
    assert!(section.contains(">plugin:post-summarizer<"));
    for others in ["claude-sonnet", "gemini", "gpt-4o-mini", "alt-text-bot"] {
        assert!(
            !section.contains(others),
            "{others} on the subscriber's profile"
        );
    }
    // The admin bar of WordPress itself prints the name as stored (WordPress filters it
    // on the way in, which install.php went around); the plugin's own output is checked.
    assert_escaped(section, "the profile's usage section");
    let (_, admin_profile) = site.get("/wp-admin/profile.php", Some(&admin)).await;
    assert!(admin_profile.contains(">claude-sonnet-4-5-20250929<"));
    let (_, other_profile) = site
        .get(
            &format!(
                "/wp-admin/user-edit.php?user_id={}",
                site.user("subscriber")
            ),
            Some(&admin),
        )
        .await;
    let section = other_profile
        .split("id=\"usage-agent-profile\"")
        .nth(1)
        .expect("the usage section on the subscriber's profile, seen by an admin");
    assert!(section.contains(">text-embedding-3-small<") && !section.contains("claude"));

    // Site Health: a healthy agent is good.
    let health = site.get_json("/?ua_test=site_health", None).await;
    assert_eq!(health["status"], "good", "{health}");
    assert_eq!(health["test"], "usage_agent");

    // WP-CLI's commands, through the stand-in.
    let cli =
        |command: &str, args: &str| format!("/?ua_test=cli&cmd={command}&args={}", urlencode(args));
    let out = site.get_json(&cli("status", "{}"), None).await;
    assert_eq!(out["exit"], 0, "{out}");
    assert!(
        out["output"].to_string().contains("pending_events"),
        "{out}"
    );
    let out = site
        .get_json(
            &cli("usage", r#"{"group-by":"model","format":"json"}"#),
            None,
        )
        .await;
    let usage: Value = serde_json::from_str(out["output"][0][1].as_str().unwrap()).unwrap();
    assert_eq!(usage["rows"].as_array().unwrap().len(), 5, "{usage}");
    let out = site.get_json(&cli("retry-failed", "{}"), None).await;
    assert_eq!(out["output"][0][0], "success", "{out}");
    let out = site.get_json(&cli("flush-spool", "{}"), None).await;
    assert_eq!(out["exit"], 0, "{out}");
    let out = site.get_json(&cli("sync", "{}"), None).await;
    assert_eq!(out["exit"], 1, "no backend: the command fails: {out}");

    // In a browser: the admin page and the profile section, rendered.
    let dom = render(
        &site,
        "admin",
        "/wp-admin/tools.php?page=usage-agent",
        "wordpress-admin.png",
        1800,
    )
    .await;
    assert!(dom.contains("usage-agent-by-model"), "{dom}");
    assert!(dom.contains("claude-sonnet-4-5-20250929"));
    assert_escaped(&dom, "the admin page in Chromium");
    // The author's profile: the subscriber's would stop the browser at WordPress's own
    // admin bar, which prints the stored name as it is (and runs its alert).
    let dom = render(
        &site,
        "author",
        "/wp-admin/profile.php",
        "wordpress-profile.png",
        2400,
    )
    .await;
    let section = dom
        .split("id=\"usage-agent-profile\"")
        .nth(1)
        .expect("the usage section in Chromium");
    assert!(section.contains("gpt-5-mini-2025-08-07"));
    assert!(
        !section.contains("text-embedding-3-small"),
        "only the author's own usage"
    );
    assert_eq!(site.php_errors(), "");
}
