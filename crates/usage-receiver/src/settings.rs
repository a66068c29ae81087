//! The receiver's settings, read from the environment variables its operators know
//! (docs/reference/receiver-api.md, "Settings"), or built directly as a plain struct in
//! tests.
//!
//! This module only reads and checks values (and the price book file `PRICE_BOOK` names);
//! it does not act on them. Secrets (the enrollment token, the provider password and the
//! webhook secret) never appear in `Debug` output.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::billing::price_book::PriceBook;
use crate::billing::pricing::PriceSettings;
use usage_protocol::signing::Secret;

/// Default requests per install per minute.
pub const DEFAULT_RATE_LIMIT_PER_MIN: u32 = 100;
/// Default `MAX_CONNECTIONS`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default signature timestamp tolerance, in seconds, in either direction.
pub const DEFAULT_SIGNATURE_TOLERANCE_S: i64 = 300;
/// Default `MAX_INFLIGHT_BATCHES`.
pub const DEFAULT_MAX_INFLIGHT_BATCHES: usize = 64;
/// Most `MAX_INFLIGHT_BATCHES` accepted (what a semaphore can count).
pub const MAX_MAX_INFLIGHT_BATCHES: usize = tokio::sync::Semaphore::MAX_PERMITS;
/// Default longest wait of a batch for its turn before `503`.
pub const DEFAULT_INFLIGHT_WAIT: Duration = Duration::from_secs(10);
/// Default largest request body as received (compressed or not).
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 << 20;
/// Default largest body after gzip decompression.
pub const DEFAULT_MAX_DECOMPRESSED_BYTES: usize = 10 << 20;

/// Everything the receiver can be told. `Default` gives the documented defaults with no
/// enrollment token and no provider credentials (so enrollment and provider views refuse).
#[derive(Clone)]
pub struct ReceiverSettings {
    /// `ENROLLMENT_TOKEN`: the bearer token that authorizes `POST /api/installations`.
    pub enrollment_token: Option<String>,
    /// `PROVIDER_USERNAME`: basic-auth user for every provider endpoint.
    pub provider_username: Option<String>,
    /// `PROVIDER_PASSWORD`: basic-auth password for every provider endpoint.
    pub provider_password: Option<String>,
    /// `METRICS_TOKEN`: a bearer token that also authorizes `GET /metrics` (besides the
    /// provider's basic auth), so a Prometheus server needs no provider password.
    pub metrics_token: Option<String>,
    /// `ALLOW_FIRST_SYNC_WITHOUT_SIGNATURE`: accept an enrollment without the token for an
    /// install id never seen before (trust on first use).
    pub allow_first_sync_without_signature: bool,
    /// `RATE_LIMIT_PER_MIN`: ingest requests per install per minute; 0 turns the limit off.
    pub rate_limit_per_min: u32,
    /// `SIGNATURE_TOLERANCE_S`: how far a signature timestamp may be from the clock.
    pub signature_tolerance_s: i64,
    /// `DEFAULT_COST_PER_1K_TOKENS`: price of 1000 tokens of a model with no override.
    pub default_cost_per_1k_tokens: Option<f64>,
    /// `MODEL_COST_OVERRIDES`: JSON object, model name to price per 1000 tokens.
    pub model_cost_overrides: BTreeMap<String, f64>,
    /// `PRICE_BOOK`: the TOML price book at that path, read and checked at start;
    /// the two prices above are the fallback for models it does not price.
    pub price_book: Option<PriceBook>,
    /// `PLAN_FREE_MONTHLY`: monthly revenue of a free install.
    pub plan_free_monthly: Option<f64>,
    /// `PLAN_PRO_MONTHLY`: monthly revenue of a pro install.
    pub plan_pro_monthly: Option<f64>,
    /// `PLAN_AGENCY_MONTHLY`: monthly revenue of an agency install.
    pub plan_agency_monthly: Option<f64>,
    /// `MAX_CONNECTIONS`: open connections at once; past that, new ones are closed.
    pub max_connections: usize,
    /// `MAX_INFLIGHT_BATCHES`: batches whose costly work (decompression, JSON, database
    /// writes) runs at once; the others wait their turn.
    pub max_inflight_batches: usize,
    /// How long a batch waits for its turn before it is answered `503` with `Retry-After`
    /// (not an environment variable: 10 s, as the reference documents it; tests shorten
    /// it).
    pub inflight_wait: Duration,
    /// Largest request body as received (not an environment variable).
    pub max_body_bytes: usize,
    /// Largest ingest body after gzip decompression (not an environment variable).
    pub max_decompressed_bytes: usize,
    /// The instant the provider views (installations, dashboard) and plan changes take as
    /// now; `None`, the default, reads the system clock. For tests of month boundaries and
    /// plan history; not an environment variable, and ingest always uses the system clock.
    pub provider_now: Option<DateTime<Utc>>,
    /// `DEFAULT_MONTHLY_BUDGET`: the monthly budget, in currency units, of every install
    /// without one of its own.
    pub default_monthly_budget: Option<f64>,
    /// `ALERT_WEBHOOK_URL` and `ALERT_WEBHOOK_SECRET`: where budget alerts are POSTed,
    /// signed with Standard Webhooks.
    pub alert_webhook: Option<AlertWebhook>,
    /// The longest wait between two delivery attempts of an alert (not an environment
    /// variable; tests shorten it).
    pub alert_retry_max: Duration,
}

/// Where budget alerts go.
#[derive(Clone)]
pub struct AlertWebhook {
    pub url: url::Url,
    pub secret: Secret,
}

/// Default [`ReceiverSettings::alert_retry_max`].
pub const DEFAULT_ALERT_RETRY_MAX: Duration = Duration::from_secs(300);

impl Default for ReceiverSettings {
    fn default() -> ReceiverSettings {
        ReceiverSettings {
            enrollment_token: None,
            provider_username: None,
            provider_password: None,
            metrics_token: None,
            allow_first_sync_without_signature: false,
            rate_limit_per_min: DEFAULT_RATE_LIMIT_PER_MIN,
            signature_tolerance_s: DEFAULT_SIGNATURE_TOLERANCE_S,
            default_cost_per_1k_tokens: None,
            model_cost_overrides: BTreeMap::new(),
            price_book: None,
            plan_free_monthly: None,
            plan_pro_monthly: None,
            plan_agency_monthly: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_inflight_batches: DEFAULT_MAX_INFLIGHT_BATCHES,
            inflight_wait: DEFAULT_INFLIGHT_WAIT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_decompressed_bytes: DEFAULT_MAX_DECOMPRESSED_BYTES,
            provider_now: None,
            default_monthly_budget: None,
            alert_webhook: None,
            alert_retry_max: DEFAULT_ALERT_RETRY_MAX,
        }
    }
}

impl std::fmt::Debug for ReceiverSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |value: &Option<String>| value.as_ref().map(|_| "<redacted>");
        f.debug_struct("ReceiverSettings")
            .field("enrollment_token", &redacted(&self.enrollment_token))
            .field("provider_username", &self.provider_username)
            .field("provider_password", &redacted(&self.provider_password))
            .field("metrics_token", &redacted(&self.metrics_token))
            .field(
                "allow_first_sync_without_signature",
                &self.allow_first_sync_without_signature,
            )
            .field("rate_limit_per_min", &self.rate_limit_per_min)
            .field("signature_tolerance_s", &self.signature_tolerance_s)
            .field(
                "default_cost_per_1k_tokens",
                &self.default_cost_per_1k_tokens,
            )
            .field("model_cost_overrides", &self.model_cost_overrides)
            .field(
                "price_book",
                &self
                    .price_book
                    .as_ref()
                    .map(|book| format!("{} entries in {}", book.entries.len(), book.currency)),
            )
            .field("plan_free_monthly", &self.plan_free_monthly)
            .field("plan_pro_monthly", &self.plan_pro_monthly)
            .field("plan_agency_monthly", &self.plan_agency_monthly)
            .field("max_connections", &self.max_connections)
            .field("max_inflight_batches", &self.max_inflight_batches)
            .field("inflight_wait", &self.inflight_wait)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_decompressed_bytes", &self.max_decompressed_bytes)
            .field("provider_now", &self.provider_now)
            .field("default_monthly_budget", &self.default_monthly_budget)
            .field(
                "alert_webhook",
                &self
                    .alert_webhook
                    .as_ref()
                    .map(|webhook| format!("{} (secret redacted)", webhook.url)),
            )
            .field("alert_retry_max", &self.alert_retry_max)
            .finish()
    }
}

/// A setting that could not be read; names the variable, never its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {name} {rule}")]
pub struct SettingsError {
    pub name: &'static str,
    pub rule: String,
}

impl SettingsError {
    fn new(name: &'static str, rule: impl Into<String>) -> SettingsError {
        SettingsError {
            name,
            rule: rule.into(),
        }
    }
}

impl ReceiverSettings {
    /// Reads the settings from the process environment. An empty variable counts as unset.
    pub fn from_env() -> Result<ReceiverSettings, SettingsError> {
        ReceiverSettings::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `lookup` (a variable name to its value), so tests need
    /// not touch the process environment.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<ReceiverSettings, SettingsError> {
        let get = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());
        let defaults = ReceiverSettings::default();
        Ok(ReceiverSettings {
            enrollment_token: get("ENROLLMENT_TOKEN"),
            provider_username: get("PROVIDER_USERNAME"),
            provider_password: get("PROVIDER_PASSWORD"),
            metrics_token: get("METRICS_TOKEN"),
            allow_first_sync_without_signature: match get("ALLOW_FIRST_SYNC_WITHOUT_SIGNATURE") {
                None => false,
                Some(text) => parse_bool("ALLOW_FIRST_SYNC_WITHOUT_SIGNATURE", &text)?,
            },
            rate_limit_per_min: match get("RATE_LIMIT_PER_MIN") {
                None => defaults.rate_limit_per_min,
                Some(text) => text.trim().parse().map_err(|_| {
                    SettingsError::new(
                        "RATE_LIMIT_PER_MIN",
                        "must be a whole number of requests (0 turns the limit off)",
                    )
                })?,
            },
            signature_tolerance_s: match get("SIGNATURE_TOLERANCE_S") {
                None => defaults.signature_tolerance_s,
                Some(text) => match text.trim().parse::<i64>() {
                    Ok(seconds) if seconds > 0 => seconds,
                    _ => {
                        return Err(SettingsError::new(
                            "SIGNATURE_TOLERANCE_S",
                            "must be a positive whole number of seconds",
                        ));
                    }
                },
            },
            default_cost_per_1k_tokens: parse_money(&get, "DEFAULT_COST_PER_1K_TOKENS")?,
            model_cost_overrides: match get("MODEL_COST_OVERRIDES") {
                None => BTreeMap::new(),
                Some(text) => parse_overrides(&text)?,
            },
            price_book: match get("PRICE_BOOK") {
                None => None,
                Some(path) => Some(PriceBook::load(Path::new(path.trim())).map_err(|error| {
                    SettingsError::new(
                        "PRICE_BOOK",
                        format!("names an invalid price book: {error}"),
                    )
                })?),
            },
            plan_free_monthly: parse_money(&get, "PLAN_FREE_MONTHLY")?,
            plan_pro_monthly: parse_money(&get, "PLAN_PRO_MONTHLY")?,
            plan_agency_monthly: parse_money(&get, "PLAN_AGENCY_MONTHLY")?,
            max_connections: match get("MAX_CONNECTIONS") {
                None => defaults.max_connections,
                Some(text) => match text.trim().parse::<usize>() {
                    Ok(count) if count > 0 => count,
                    _ => {
                        return Err(SettingsError::new(
                            "MAX_CONNECTIONS",
                            "must be a whole number of connections, at least 1",
                        ));
                    }
                },
            },
            max_inflight_batches: match get("MAX_INFLIGHT_BATCHES") {
                None => defaults.max_inflight_batches,
                Some(text) => match text.trim().parse::<usize>() {
                    Ok(count) if (1..=MAX_MAX_INFLIGHT_BATCHES).contains(&count) => count,
                    _ => {
                        return Err(SettingsError::new(
                            "MAX_INFLIGHT_BATCHES",
                            format!(
                                "must be a whole number of batches from 1 to {MAX_MAX_INFLIGHT_BATCHES}"
                            ),
                        ));
                    }
                },
            },
            default_monthly_budget: match parse_money(&get, "DEFAULT_MONTHLY_BUDGET")? {
                Some(amount) if amount <= 0.0 => {
                    return Err(SettingsError::new(
                        "DEFAULT_MONTHLY_BUDGET",
                        "must be a positive amount such as 50.0",
                    ));
                }
                amount => amount,
            },
            alert_webhook: alert_webhook(&get)?,
            ..defaults
        })
    }
}

/// `ALERT_WEBHOOK_URL` (http or https) and its `ALERT_WEBHOOK_SECRET` (`whsec_...`), which
/// it requires.
fn alert_webhook(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Option<AlertWebhook>, SettingsError> {
    let Some(text) = get("ALERT_WEBHOOK_URL") else {
        return Ok(None);
    };
    let url = url::Url::parse(text.trim())
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https") && url.has_host())
        .ok_or_else(|| {
            SettingsError::new(
                "ALERT_WEBHOOK_URL",
                "must be an http or https URL such as https://hooks.example.com/usage",
            )
        })?;
    let secret = get("ALERT_WEBHOOK_SECRET").ok_or_else(|| {
        SettingsError::new(
            "ALERT_WEBHOOK_SECRET",
            "must be set when ALERT_WEBHOOK_URL is (whsec_ followed by base64)",
        )
    })?;
    let secret = Secret::parse(secret.trim()).map_err(|error| {
        SettingsError::new(
            "ALERT_WEBHOOK_SECRET",
            format!("must be whsec_ followed by base64 of 24 to 64 bytes ({error})"),
        )
    })?;
    Ok(Some(AlertWebhook { url, secret }))
}

fn parse_bool(name: &'static str, text: &str) -> Result<bool, SettingsError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(SettingsError::new(name, "must be true or false")),
    }
}

fn parse_money(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<f64>, SettingsError> {
    let Some(text) = get(name) else {
        return Ok(None);
    };
    match text.trim().parse::<f64>() {
        Ok(amount) if amount.is_finite() && amount >= 0.0 => Ok(Some(amount)),
        _ => Err(SettingsError::new(
            name,
            "must be a non-negative number such as 0.002",
        )),
    }
}

fn parse_overrides(text: &str) -> Result<BTreeMap<String, f64>, SettingsError> {
    const NAME: &str = "MODEL_COST_OVERRIDES";
    let invalid = || {
        SettingsError::new(
            NAME,
            "must be a JSON object of model name to non-negative cost per 1K tokens, such as {\"gpt-4o\": 0.005}",
        )
    };
    let map: BTreeMap<String, f64> = serde_json::from_str(text).map_err(|_| invalid())?;
    if map.values().any(|cost| !cost.is_finite() || *cost < 0.0) {
        return Err(invalid());
    }
    Ok(map)
}

impl ReceiverSettings {
    /// The prices among the settings, as [`Pricing`](crate::billing::pricing::Pricing)
    /// reads them.
    pub fn prices(&self) -> PriceSettings {
        PriceSettings {
            price_book: self.price_book.clone(),
            default_cost_per_1k_tokens: self.default_cost_per_1k_tokens,
            model_cost_overrides: self.model_cost_overrides.clone(),
            plan_free_monthly: self.plan_free_monthly,
            plan_pro_monthly: self.plan_pro_monthly,
            plan_agency_monthly: self.plan_agency_monthly,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<ReceiverSettings, SettingsError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ReceiverSettings::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn budgets_and_the_alert_webhook_are_read_and_checked() {
        let secret = Secret::generate().to_whsec();
        let settings = from(&[
            ("DEFAULT_MONTHLY_BUDGET", "50.5"),
            ("ALERT_WEBHOOK_URL", "https://hooks.example.com/usage"),
            ("ALERT_WEBHOOK_SECRET", &secret),
        ])
        .unwrap();
        assert_eq!(settings.default_monthly_budget, Some(50.5));
        let webhook = settings.alert_webhook.unwrap();
        assert_eq!(webhook.url.as_str(), "https://hooks.example.com/usage");
        assert_eq!(webhook.secret.to_whsec(), secret);
        assert!(!format!("{:?}", from(&[]).unwrap()).contains("whsec_"));

        let refused = |vars: &[(&str, &str)]| from(vars).unwrap_err().name;
        assert_eq!(
            refused(&[("DEFAULT_MONTHLY_BUDGET", "0")]),
            "DEFAULT_MONTHLY_BUDGET"
        );
        assert_eq!(
            refused(&[("DEFAULT_MONTHLY_BUDGET", "lots")]),
            "DEFAULT_MONTHLY_BUDGET"
        );
        assert_eq!(
            refused(&[("ALERT_WEBHOOK_URL", "ftp://x")]),
            "ALERT_WEBHOOK_URL"
        );
        assert_eq!(
            refused(&[("ALERT_WEBHOOK_URL", "http://127.0.0.1:9/")]),
            "ALERT_WEBHOOK_SECRET"
        );
        assert_eq!(
            refused(&[
                ("ALERT_WEBHOOK_URL", "http://127.0.0.1:9/"),
                ("ALERT_WEBHOOK_SECRET", "not-a-secret")
            ]),
            "ALERT_WEBHOOK_SECRET"
        );
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let settings = from(&[]).unwrap();
        assert_eq!(settings.enrollment_token, None);
        assert!(!settings.allow_first_sync_without_signature);
        assert_eq!(settings.rate_limit_per_min, 100);
        assert_eq!(settings.signature_tolerance_s, 300);
        assert!(settings.model_cost_overrides.is_empty());
        assert_eq!(settings.max_inflight_batches, 64);
        assert_eq!(settings.inflight_wait, Duration::from_secs(10));
    }

    #[test]
    fn every_variable_is_read() {
        let settings = from(&[
            ("ENROLLMENT_TOKEN", "tok"),
            ("PROVIDER_USERNAME", "admin"),
            ("PROVIDER_PASSWORD", "pw"),
            ("ALLOW_FIRST_SYNC_WITHOUT_SIGNATURE", "TRUE"),
            ("RATE_LIMIT_PER_MIN", "7"),
            ("SIGNATURE_TOLERANCE_S", "60"),
            ("DEFAULT_COST_PER_1K_TOKENS", "0.002"),
            ("MODEL_COST_OVERRIDES", r#"{"gpt-4o": 0.005}"#),
            ("PLAN_FREE_MONTHLY", "0"),
            ("PLAN_PRO_MONTHLY", "19"),
            ("PLAN_AGENCY_MONTHLY", "99.5"),
            ("MAX_INFLIGHT_BATCHES", " 3 "),
        ])
        .unwrap();
        assert_eq!(settings.enrollment_token.as_deref(), Some("tok"));
        assert_eq!(settings.provider_username.as_deref(), Some("admin"));
        assert_eq!(settings.provider_password.as_deref(), Some("pw"));
        assert!(settings.allow_first_sync_without_signature);
        assert_eq!(settings.rate_limit_per_min, 7);
        assert_eq!(settings.signature_tolerance_s, 60);
        assert_eq!(settings.default_cost_per_1k_tokens, Some(0.002));
        assert_eq!(settings.model_cost_overrides["gpt-4o"], 0.005);
        assert_eq!(settings.plan_free_monthly, Some(0.0));
        assert_eq!(settings.plan_pro_monthly, Some(19.0));
        assert_eq!(settings.plan_agency_monthly, Some(99.5));
        assert_eq!(settings.max_inflight_batches, 3);
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases = [
            ("ALLOW_FIRST_SYNC_WITHOUT_SIGNATURE", "maybe"),
            ("RATE_LIMIT_PER_MIN", "-1"),
            ("SIGNATURE_TOLERANCE_S", "0"),
            ("DEFAULT_COST_PER_1K_TOKENS", "cheap"),
            ("MODEL_COST_OVERRIDES", "[1]"),
            ("MODEL_COST_OVERRIDES", r#"{"m": -1}"#),
            ("PLAN_PRO_MONTHLY", "-5"),
            ("MAX_INFLIGHT_BATCHES", "0"),
            ("MAX_INFLIGHT_BATCHES", "-1"),
            ("MAX_INFLIGHT_BATCHES", "many"),
            ("MAX_INFLIGHT_BATCHES", "2.5"),
            ("MAX_INFLIGHT_BATCHES", "99999999999999999999"),
        ];
        for (name, value) in cases {
            let error = from(&[(name, value)]).unwrap_err();
            assert_eq!(error.name, name);
            assert!(error.to_string().starts_with("environment variable"));
        }
        let error = from(&[("MAX_INFLIGHT_BATCHES", "0")]).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("environment variable MAX_INFLIGHT_BATCHES must be a whole number of batches from 1 to "),
            "{error}"
        );
    }

    #[test]
    fn the_price_book_is_read_and_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("prices.toml");
        std::fs::write(
            &good,
            "currency = \"USD\"\n[[model]]\nmatch = \"m\"\neffective_from = \"2024-01-01\"\ninput_per_mtok = 1\noutput_per_mtok = 2\n",
        )
        .unwrap();
        let settings = from(&[("PRICE_BOOK", good.to_str().unwrap())]).unwrap();
        let book = settings.price_book.expect("the book is read");
        assert_eq!((book.currency.as_str(), book.entries.len()), ("USD", 1));

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "currency = \"USD\"\nvat = 1\n").unwrap();
        let error = from(&[("PRICE_BOOK", bad.to_str().unwrap())]).unwrap_err();
        assert_eq!(error.name, "PRICE_BOOK");
        assert!(error.to_string().contains("line 2, key `vat`"), "{error}");
        let missing = dir.path().join("missing.toml");
        let error = from(&[("PRICE_BOOK", missing.to_str().unwrap())]).unwrap_err();
        assert!(error.to_string().contains("could not read"), "{error}");
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let settings = from(&[("ENROLLMENT_TOKEN", ""), ("RATE_LIMIT_PER_MIN", " ")]).unwrap();
        assert_eq!(settings.enrollment_token, None);
        assert_eq!(settings.rate_limit_per_min, 100);
    }

    #[test]
    fn debug_redacts_the_secrets() {
        let settings = from(&[
            ("ENROLLMENT_TOKEN", "tok-secret"),
            ("PROVIDER_PASSWORD", "pw-secret"),
            ("METRICS_TOKEN", "scrape-secret"),
        ])
        .unwrap();
        let shown = format!("{settings:?}");
        assert_eq!(settings.metrics_token.as_deref(), Some("scrape-secret"));
        assert!(
            !shown.contains("tok-secret")
                && !shown.contains("pw-secret")
                && !shown.contains("scrape-secret"),
            "{shown}"
        );
        assert!(shown.contains("<redacted>"));
    }
}
