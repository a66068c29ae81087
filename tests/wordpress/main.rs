//! The WordPress plugin (`clients/wordpress/usage-agent`) in a real WordPress: Debian's
//! WordPress on MariaDB, served by `php -S`, with the plugin talking to the real agent
//! binary over its socket and two test plugins calling a fake AI provider (so their calls
//! have different origins). A must-use plugin of the test (`site/mu-plugins`) stands in for
//! what WordPress 6.1 lacks: the AI client's action, fired with objects of the AI client's
//! shape, and WP-CLI, through a `WP_CLI` class that records what a command prints. A test
//! theme calls the provider too, so `theme:` origins are covered.
//! Everything is checked over HTTP, from the agent's API and from the pages WordPress serves.

// The integration tests' helpers, shared as they are; this binary uses only some of them.
#[allow(dead_code)]
#[path = "../it/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "../../crates/usage-receiver/tests/support/mod.rs"]
mod shared;

mod provider;
mod site;

mod metering;
mod pages;
mod quota;
mod spool;

use std::collections::HashSet;

use serde_json::Value;

use harness::Agent;

/// The agent's events, read through `GET /v1/export`, handing out only the new ones.
#[derive(Default)]
pub struct NewEvents {
    seen: HashSet<String>,
}

impl NewEvents {
    /// Events stored since the last call.
    pub async fn take(&mut self, agent: &Agent) -> Vec<Value> {
        let (status, body) = agent
            .get("/v1/export?format=json")
            .await
            .expect("the agent answers");
        assert!(status.is_success(), "{body}");
        body["events"]
            .as_array()
            .expect("an events list")
            .iter()
            .filter(|event| {
                self.seen
                    .insert(event["event_id"].as_str().unwrap().to_string())
            })
            .cloned()
            .collect()
    }

    /// Exactly one new event.
    pub async fn one(&mut self, agent: &Agent, what: &str) -> Value {
        let events = self.take(agent).await;
        assert_eq!(events.len(), 1, "{what}: one event, got {events:#?}");
        events.into_iter().next().unwrap()
    }
}
