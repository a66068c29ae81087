//! The agent's OpenAPI document (docs/reference/openapi/agent.json) against its router:
//! every route the local API serves is documented, nothing is documented that it does not
//! serve, and a real agent answers every documented route from its handler, not from the
//! fallback for unknown paths or methods.

use std::collections::BTreeSet;

use reqwest::Method;

use crate::harness::Agent;
use crate::shared::openapi_routes as documented;

/// A documented path with every `{parameter}` filled in.
fn concrete(path: &str) -> String {
    let mut out = String::new();
    let mut in_parameter = false;
    for c in path.chars() {
        match c {
            '{' => in_parameter = true,
            '}' => {
                in_parameter = false;
                out.push('7');
            }
            _ if in_parameter => {}
            _ => out.push(c),
        }
    }
    out
}

#[test]
fn the_agents_openapi_document_lists_exactly_the_routes_it_serves() {
    let routed: BTreeSet<(String, String)> = usage_agent::api::routes()
        .iter()
        .map(|route| (route.method.to_string(), route.path.to_owned()))
        .collect();
    let documented = documented("docs/reference/openapi/agent.json");
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routed, not documented: {undocumented:?}"
    );
    assert!(unrouted.is_empty(), "documented, not routed: {unrouted:?}");
    assert!(routed.contains(&("POST".to_owned(), "/v1/events".to_owned())));
}

#[tokio::test]
async fn a_real_agent_answers_every_documented_route_from_its_handler() {
    let agent = Agent::start("").await;
    for (method, path) in documented("docs/reference/openapi/agent.json") {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let (status, body) = agent
            .request(method.clone(), &concrete(&path), None)
            .await
            .expect("the agent answers");
        let code = body["error"]["code"].as_str().unwrap_or_default();
        assert!(
            code != "not_found" && code != "method_not_allowed",
            "{method} {path}: answered {status} by the fallback"
        );
    }
    // The check can fail: an unknown path is the fallback's.
    let (_, body) = agent.get("/v1/nothing-here").await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}
