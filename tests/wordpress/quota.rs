//! Limits: `usage_agent_allowed()` and the AI client's `wp_ai_client_prevent_prompt` follow
//! the agent's local quotas, the profile shows a user's limits, and `usage_agent_fail_closed`
//! decides while the agent does not answer. It needs the agent's local quotas (`[quota]`,
//! `GET /v1/quota`).

use reqwest::StatusCode;

use crate::harness::Agent;
use crate::provider::Provider;
use crate::site::Site;

#[tokio::test]
async fn a_user_over_their_quota_is_not_allowed_and_sees_it_on_their_profile() {
    let mut agent = Agent::configure_with("", "[quota]\nuser_monthly_tokens = 1000\n");
    agent.spawn().await;
    let provider = Provider::start().await;
    let site = Site::start(&agent.socket, &provider.url).await;
    let subscriber = site.cookies("subscriber").await;
    let editor = site.cookies("editor").await;
    let (sub_id, editor_id) = (site.user("subscriber"), site.user("editor"));

    // 1500 tokens: over the subscriber's 1000 a month.
    site.get_json("/?post_summarizer=openai_chat", Some(&subscriber))
        .await;
    let mine = site
        .get_json(
            &format!("/?ua_test=allowed&user={sub_id}"),
            Some(&subscriber),
        )
        .await;
    assert_eq!(mine["allowed"], false, "{mine}");
    assert_eq!(mine["prevent"], false, "enforcement is off by default");
    let theirs = site
        .get_json(
            &format!("/?ua_test=allowed&user={editor_id}&tokens=500"),
            Some(&editor),
        )
        .await;
    assert_eq!(theirs["allowed"], true, "{theirs}");
    let theirs = site
        .get_json(
            &format!("/?ua_test=allowed&user={editor_id}&tokens=5000"),
            Some(&editor),
        )
        .await;
    assert_eq!(theirs["allowed"], false, "{theirs}");

    // Enforced: the AI client's prompt of the subscriber is stopped, the editor's is not.
    site.get_json("/?ua_test=option&name=usage_agent_enforce&value=1", None)
        .await;
    let mine = site
        .get_json(
            &format!("/?ua_test=allowed&user={sub_id}"),
            Some(&subscriber),
        )
        .await;
    assert_eq!(mine["prevent"], true);
    let theirs = site
        .get_json(
            &format!("/?ua_test=allowed&user={editor_id}"),
            Some(&editor),
        )
        .await;
    assert_eq!(theirs["prevent"], false);

    // The profile shows the limit.
    let (status, profile) = site.get("/wp-admin/profile.php", Some(&subscriber)).await;
    assert_eq!(status, StatusCode::OK);
    let quota = profile
        .split("id=\"usage-agent-profile-quota\"")
        .nth(1)
        .expect("the limits on the profile");
    assert!(quota.contains("data-scope=\"user_monthly\""));
    assert!(
        quota.contains(">1,000<") && quota.contains(">1,500<"),
        "{quota}"
    );

    // No agent: open by default, closed with usage_agent_fail_closed.
    agent.terminate();
    let theirs = site
        .get_json(
            &format!("/?ua_test=allowed&user={editor_id}"),
            Some(&editor),
        )
        .await;
    assert_eq!(theirs["allowed"], true);
    site.get_json(
        "/?ua_test=option&name=usage_agent_fail_closed&value=1",
        None,
    )
    .await;
    let theirs = site
        .get_json(
            &format!("/?ua_test=allowed&user={editor_id}"),
            Some(&editor),
        )
        .await;
    assert_eq!(
        (&theirs["allowed"], &theirs["prevent"]),
        (&false.into(), &true.into())
    );
}
