//! The receiver's OpenAPI document (docs/reference/openapi/receiver.json) against its
//! router: every route is documented, nothing is documented that is not routed, and a real
//! receiver answers every documented route from its handler, not from the fallback for
//! unknown paths or methods.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::Value;
use usage_receiver::{ReceiverSettings, open_sqlite, serve};

// Shared with the other test binaries, each using only some of it.
#[allow(dead_code)]
#[path = "support/mod.rs"]
mod support;

const DOCUMENT: &str = "docs/reference/openapi/receiver.json";

fn documented() -> BTreeSet<(String, String)> {
    support::openapi_routes(DOCUMENT)
}

#[test]
fn the_receivers_openapi_document_lists_exactly_the_routes_it_serves() {
    let routed: BTreeSet<(String, String)> = usage_receiver::server::routes()
        .iter()
        .map(|route| (route.method.to_string(), route.path.to_owned()))
        .collect();
    let documented = documented();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routed, not documented: {undocumented:?}"
    );
    assert!(unrouted.is_empty(), "documented, not routed: {unrouted:?}");
    assert!(routed.contains(&("POST".to_owned(), "/api/usage/event".to_owned())));
}

#[tokio::test]
async fn a_real_receiver_answers_every_documented_route_from_its_handler() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_sqlite(&dir.path().join("receiver.db")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, ReceiverSettings::default(), store, async {
        let _ = stopped.await;
    }));
    // reqwest is built without a default TLS provider; plain HTTP needs none, but the
    // client is built only once one is installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    for (method, path) in documented() {
        let url = format!("http://{addr}{}", path.replace("{install_id}", "site-7"));
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let response = client.request(method.clone(), &url).send().await.unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let code = body["error"]["code"].as_str().unwrap_or_default();
        assert!(
            code != "not_found" && code != "method_not_allowed",
            "{method} {path}: answered {status} by the fallback"
        );
    }
    // The check can fail: an unknown path is the fallback's.
    let body: Value = client
        .get(format!("http://{addr}/api/nothing-here"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
