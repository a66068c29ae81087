//! Metering, counted once: each known API's answer by the plugin's table, the AI client's
//! action, a call seen by both, by hand, and who made each call (user and origin).

use std::time::Duration;

use serde_json::{Value, json};

use crate::NewEvents;
use crate::harness::Agent;
use crate::provider::{Provider, expected};
use crate::shared::poll;
use crate::site::Site;

fn tokens(event: &Value) -> [u64; 5] {
    [
        "prompt_tokens",
        "cached_tokens",
        "cache_write_tokens",
        "completion_tokens",
        "reasoning_tokens",
    ]
    .map(|field| event[field].as_u64().unwrap_or(0))
}

#[tokio::test]
async fn every_ai_call_of_a_wordpress_site_is_metered_once_with_its_user_and_origin() {
    let agent = Agent::start("").await;
    let provider = Provider::start().await;
    let site = Site::start(&agent.socket, &provider.url).await;
    let mut events = NewEvents::default();

    // Each API's answer gives exactly the table's numbers, from a plugin's own wp_remote_post.
    for (api, model, numbers) in expected() {
        let answer = site.get_json(&format!("/?alt_text_bot={api}"), None).await;
        assert_eq!(answer["status"], 200, "{api}");
        let event = events.one(&agent, api).await;
        assert_eq!(event["model"], model, "{api}");
        assert_eq!(tokens(&event), numbers, "{api}: {event}");
        assert_eq!(event["user_id"], 0, "{api}: nobody is logged in");
        assert_eq!(event["source"], "inline", "{api}");
        assert_eq!(site.origins().last().unwrap(), "plugin:alt-text-bot");
    }

    // An error answer (with usage in it) and an API nobody listed record nothing.
    let answer = site.get_json("/?alt_text_bot=error", None).await;
    assert_eq!(answer["status"], 429);
    site.get_json("/?alt_text_bot=unmetered", None).await;
    assert_eq!(events.take(&agent).await, Vec::<Value>::new());

    // With the HTTP capture switched off, a plugin's own API call is not metered.
    site.get_json(
        "/?ua_test=option&name=usage_agent_capture_http&value=",
        None,
    )
    .await;
    site.get_json("/?alt_text_bot=openai_chat", None).await;
    assert_eq!(events.take(&agent).await, Vec::<Value>::new());
    site.get_json(
        "/?ua_test=option&name=usage_agent_capture_http&value=1",
        None,
    )
    .await;

    // A call seen by the HTTP capture and then by the AI client's action counts once, with
    // the HTTP capture's numbers (the AI client's do not know cached tokens).
    site.get_json("/?alt_text_bot=openai_chat&ai_client=1", None)
        .await;
    let event = events.one(&agent, "a call seen by both hooks").await;
    assert_eq!(tokens(&event), [1200, 400, 0, 300, 120]);

    // The AI client's action alone: prompt, completion and thought tokens, the model's id.
    site.get_json(
        "/?ua_test=ai_client&id=ai-1&model=gpt-4.1&prompt=100&completion=40&thoughts=10",
        None,
    )
    .await;
    let event = events.one(&agent, "the AI client's action").await;
    assert_eq!(event["model"], "gpt-4.1");
    assert_eq!(tokens(&event), [100, 0, 0, 40, 10]);
    assert_eq!(site.origins().last().unwrap(), "plugin:ua-test-harness");

    // By hand: the function and the action.
    let answer = site.get_json("/?ua_test=record", None).await;
    assert_eq!(answer["results"], json!([true]));
    let event = events.one(&agent, "usage_agent_record()").await;
    assert_eq!(event["model"], "manual-model");
    assert_eq!(event["context"], json!({"n": 0}));
    site.get_json("/?ua_test=record_action", None).await;
    let event = events.one(&agent, "do_action('usage_agent_record')").await;
    assert_eq!(
        (&event["model"], &event["prompt_tokens"]),
        (&json!("action-model"), &json!(7))
    );

    // Two plugins, two origins.
    site.get_json("/?post_summarizer=openai_embeddings", None)
        .await;
    events.one(&agent, "the second plugin's call").await;
    assert_eq!(site.origins().last().unwrap(), "plugin:post-summarizer");

    // A theme's call is the theme's.
    site.get_json("/?theme_call=gemini", None).await;
    events.one(&agent, "the theme's call").await;
    assert_eq!(site.origins().last().unwrap(), "theme:ua-test-theme");

    // The source: `queue` from WP-cron, `bulk` under WP-CLI.
    site.get_json("/?ua_test=schedule_call", None).await;
    // WP-cron runs once at a time: a run a page load spawned may hold the lock, so ask again
    // until the job has run.
    let event = poll(
        "the WP-cron job's call",
        Duration::from_secs(30),
        async || {
            site.get("/wp-cron.php?doing_wp_cron", None).await;
            events.take(&agent).await.pop()
        },
    )
    .await;
    assert_eq!(events.take(&agent).await, Vec::<Value>::new());
    assert_eq!(
        (&event["source"], &event["model"]),
        (&json!("queue"), &json!("text-embedding-3-small"))
    );
    assert_eq!(site.origins().last().unwrap(), "plugin:alt-text-bot");
    site.get_json("/?ua_test=record_as_cli", None).await;
    assert_eq!(events.one(&agent, "under WP-CLI").await["source"], "bulk");

    // The call stack's innermost plugin or theme, past WordPress and this plugin; else core.
    for (files, origin) in [
        (
            json!([
                "{abspath}wp-includes/class-wp-http.php",
                "{abspath}index.php"
            ]),
            "core",
        ),
        (
            json!([
                "{plugins}/usage-agent/includes/class-usage-agent-capture.php",
                "{abspath}wp-includes/class-wp-hook.php",
                "{plugins}/seo-helper/lib/ai.php",
                "{themes}/acme/functions.php"
            ]),
            "plugin:seo-helper",
        ),
        (json!(["{themes}/acme/inc/ai.php"]), "theme:acme"),
        (json!(["{mu}/site-tools.php"]), "plugin:site-tools"),
        (json!(["{plugins}/hello.php"]), "plugin:hello"),
    ] {
        let path = format!(
            "/?ua_test=origin_of&files={}",
            crate::site::urlencode(&files.to_string())
        );
        assert_eq!(
            site.get_json(&path, None).await["origin"],
            origin,
            "{files}"
        );
    }

    // Three logged-in users' calls arrive with their own user_id.
    for login in ["editor", "author", "subscriber"] {
        let cookie = site.cookies(login).await;
        site.get_json("/?post_summarizer=openai_embeddings", Some(&cookie))
            .await;
        let event = events.one(&agent, login).await;
        assert_eq!(event["user_id"], site.user(login), "{login}");
    }

    // What the agent stored by origin: each plugin under its own name.
    let (_, usage) = agent
        .get("/v1/usage?group_by=origin")
        .await
        .expect("the agent answers");
    let origins: Vec<&str> = usage["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("usage by origin: {usage}"))
        .iter()
        .filter_map(|row| row["origin"].as_str())
        .collect();
    for origin in [
        "plugin:alt-text-bot",
        "plugin:post-summarizer",
        "plugin:ua-test-harness",
        "theme:ua-test-theme",
    ] {
        assert!(origins.contains(&origin), "{origin} in {usage}");
    }
    assert_eq!(site.php_errors(), "");
}
