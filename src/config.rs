//! Agent configuration (docs/reference/config.md): the `agent.toml` keys, their defaults, the
//! environment overrides, and checks that name the offending key.
//!
//! Values are parsed once, here, into the types the rest of the code uses (the time zone,
//! the cron schedules, the socket mode, the loopback address, the backend URL), so no
//! other module parses a config string again. Loading is pure apart from reading the file
//! and the environment; nothing here opens sockets or databases. A leaf: it imports only
//! [`crate::calendar`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use reqwest::Url;
use serde::{Deserialize, Deserializer};

use crate::calendar::{Calendar, Cron};

/// Where the config comes from when `--config` is not given.
pub const SYSTEM_CONFIG_PATH: &str = "/etc/usage-agent/agent.toml";
/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "USAGE_AGENT_CONFIG";

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config value for `{key}`: {rule}")]
    Invalid { key: String, rule: String },
}

fn invalid(key: &str, rule: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        rule: rule.into(),
    }
}

/// How hard SQLite works to keep a commit: `full` survives power loss, `normal` a process kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Full,
    Normal,
}

impl Synchronous {
    pub fn as_pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Octal permission bits of the socket (`socket_mode = "0660"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct SocketMode(u32);

impl SocketMode {
    const RULE: &str = "must be octal permission bits such as \"0660\"";

    pub fn parse(text: &str) -> Option<SocketMode> {
        u32::from_str_radix(text.trim_start_matches("0o"), 8)
            .ok()
            .filter(|bits| *bits <= 0o777)
            .map(SocketMode)
    }

    pub fn bits(self) -> u32 {
        self.0
    }
}

impl TryFrom<String> for SocketMode {
    type Error = String;

    fn try_from(text: String) -> Result<SocketMode, String> {
        SocketMode::parse(&text).ok_or_else(|| format!("{text:?} {}", SocketMode::RULE))
    }
}

/// The backend's base URL (`sync.backend_url`): `http` or `https`, with a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl(Url);

impl BackendUrl {
    const RULE: &str =
        "must be an http:// or https:// URL with a host, such as https://usage.example.net";

    /// Parses a base URL; a trailing `/` is dropped so endpoints join cleanly.
    pub fn parse(text: &str) -> Result<BackendUrl, String> {
        let url = Url::parse(text.trim_end_matches('/'))
            .map_err(|e| format!("{text:?} {} ({e})", BackendUrl::RULE))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!("{text:?} {}", BackendUrl::RULE));
        }
        Ok(BackendUrl(url))
    }

    /// The URL of one of the backend's endpoints (`path` starts with `/`).
    pub fn endpoint(&self, path: &str) -> Url {
        let mut url = self.0.clone();
        let joined = format!("{}{path}", url.path().trim_end_matches('/'));
        url.set_path(&joined);
        url
    }

    pub fn url(&self) -> &Url {
        &self.0
    }
}

impl std::fmt::Display for BackendUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str().trim_end_matches('/'))
    }
}

/// An empty string is "not set"; anything else must parse.
fn optional<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    let text = String::deserialize(deserializer)?;
    if text.is_empty() {
        Ok(None)
    } else {
        text.parse().map(Some).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for BackendUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<BackendUrl, String> {
        BackendUrl::parse(text)
    }
}

/// The optional loopback TCP listener (`tcp_listen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopbackAddr(SocketAddr);

impl LoopbackAddr {
    pub fn addr(self) -> SocketAddr {
        self.0
    }
}

impl std::str::FromStr for LoopbackAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<LoopbackAddr, String> {
        let addr: SocketAddr = text
            .parse()
            .map_err(|_| format!("{text:?} must be an address such as 127.0.0.1:8788"))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{text:?} must be a loopback address (127.0.0.1 or ::1)"
            ));
        }
        Ok(LoopbackAddr(addr))
    }
}

/// The whole agent configuration.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for the database, `identity.json`, the lock file and the default socket.
    pub data_dir: PathBuf,
    /// Unix socket path; empty means `<data_dir>/agent.sock`.
    pub socket_path: String,
    /// Octal permission bits of the socket, e.g. `"0660"`.
    pub socket_mode: SocketMode,
    /// Group that owns the socket (the web server's), empty to keep the agent's own.
    pub socket_group: String,
    /// Optional loopback TCP address for the API; requires `api_token`.
    #[serde(deserialize_with = "optional")]
    pub tcp_listen: Option<LoopbackAddr>,
    /// Bearer token required on the TCP listener.
    pub api_token: String,
    /// IANA time zone for `usage_date` and the daily schedules.
    pub timezone: Calendar,
    /// Kill switch: when false the API answers `disabled` and stores nothing.
    pub tracking_enabled: bool,
    /// SQLite durability of a commit.
    pub synchronous: Synchronous,
    /// Log format of the daemon.
    pub log_format: LogFormat,
    /// Log every recorded event.
    pub debug: bool,
    /// Open API connections at once (socket and TCP port each); past that, new ones are
    /// closed at once.
    pub max_connections: usize,
    /// How long shutdown may take in all: draining connections, the last sync, the
    /// checkpoint.
    pub shutdown_timeout_secs: u64,
    pub sync: SyncConfig,
    pub retention: RetentionConfig,
    pub schedule: ScheduleConfig,
    pub quota: QuotaConfig,
}

/// `[sync]`: shipping events to the backend.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Whether scheduled and manual syncs run at all.
    pub enabled: bool,
    /// Backend base URL; empty (`None`) means local logging only.
    #[serde(deserialize_with = "optional")]
    pub backend_url: Option<BackendUrl>,
    /// Optional bearer token sent with each batch.
    pub auth_token: String,
    /// Enrollment token, used when `init` was not given one.
    pub enroll_token: String,
    /// Seconds between scheduled syncs.
    pub interval_secs: u64,
    /// Events per batch (1..=1000).
    pub batch_size: usize,
    /// Attempts per batch per run.
    pub max_attempts: u32,
    /// First backoff delay between attempts.
    pub initial_backoff_ms: u64,
    /// Largest backoff delay between attempts.
    pub max_backoff_ms: u64,
    /// Timeout of one HTTP request to the backend.
    pub request_timeout_secs: u64,
}

/// `[retention]`: how long data is kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Days raw events are kept (after their day is rolled up).
    pub event_days: u32,
    /// Days daily summaries are kept.
    pub daily_days: u32,
}

/// `[schedule]`: cron expressions (seconds first) in `timezone`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    pub rollup: Cron,
    pub cleanup: Cron,
}

/// `[quota]`: local token limits a site asks before it spends, in tokens; 0 means no
/// limit. Days and months are the agent's `timezone`'s.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    pub user_daily_tokens: u64,
    pub user_monthly_tokens: u64,
    pub site_daily_tokens: u64,
    pub site_monthly_tokens: u64,
    /// Seconds after which a hold that no event settled is released.
    pub hold_ttl_secs: u64,
}

impl QuotaConfig {
    /// Longest a hold may live: a day, so a forgotten hold cannot block a site for long.
    pub const MAX_HOLD_TTL_SECS: u64 = 86_400;

    /// Whether any limit is set.
    pub fn any_limit(&self) -> bool {
        self.user_daily_tokens
            .max(self.user_monthly_tokens)
            .max(self.site_daily_tokens)
            .max(self.site_monthly_tokens)
            > 0
    }
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig {
            user_daily_tokens: 0,
            user_monthly_tokens: 0,
            site_daily_tokens: 0,
            site_monthly_tokens: 0,
            hold_ttl_secs: 300,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./usage-agent-data"),
            socket_path: String::new(),
            socket_mode: SocketMode(0o660),
            socket_group: String::new(),
            tcp_listen: None,
            api_token: String::new(),
            timezone: Calendar::new(chrono_tz::Tz::UTC),
            tracking_enabled: true,
            synchronous: Synchronous::Full,
            log_format: LogFormat::Text,
            debug: false,
            max_connections: 512,
            shutdown_timeout_secs: 10,
            sync: SyncConfig::default(),
            retention: RetentionConfig::default(),
            schedule: ScheduleConfig::default(),
            quota: QuotaConfig::default(),
        }
    }
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            enabled: true,
            backend_url: None,
            auth_token: String::new(),
            enroll_token: String::new(),
            interval_secs: 300,
            batch_size: 50,
            max_attempts: 3,
            initial_backoff_ms: 1000,
            max_backoff_ms: 60_000,
            request_timeout_secs: 30,
        }
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            event_days: 90,
            daily_days: 730,
        }
    }
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            rollup: Cron::parse("0 0 2 * * *").expect("the default rollup schedule parses"),
            cleanup: Cron::parse("0 0 3 * * *").expect("the default cleanup schedule parses"),
        }
    }
}

fn redact(secret: &str) -> &'static str {
    if secret.is_empty() { "" } else { "<redacted>" }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("socket_path", &self.socket_path)
            .field("socket_mode", &self.socket_mode)
            .field("socket_group", &self.socket_group)
            .field("tcp_listen", &self.tcp_listen)
            .field("api_token", &redact(&self.api_token))
            .field("timezone", &self.timezone)
            .field("tracking_enabled", &self.tracking_enabled)
            .field("synchronous", &self.synchronous)
            .field("log_format", &self.log_format)
            .field("debug", &self.debug)
            .field("max_connections", &self.max_connections)
            .field("shutdown_timeout_secs", &self.shutdown_timeout_secs)
            .field("sync", &self.sync)
            .field("retention", &self.retention)
            .field("schedule", &self.schedule)
            .field("quota", &self.quota)
            .finish()
    }
}

impl std::fmt::Debug for SyncConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncConfig")
            .field("enabled", &self.enabled)
            .field("backend_url", &self.backend_url)
            .field("auth_token", &redact(&self.auth_token))
            .field("enroll_token", &redact(&self.enroll_token))
            .field("interval_secs", &self.interval_secs)
            .field("batch_size", &self.batch_size)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff_ms", &self.initial_backoff_ms)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .finish()
    }
}

impl Config {
    /// Loads the config the way every subcommand does: `--config`, else `$USAGE_AGENT_CONFIG`,
    /// else the system file if it exists, else built-in defaults; then environment overrides.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let env_path = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty());
        let path = match (explicit, env_path) {
            (Some(path), _) => Some(path.to_path_buf()),
            (None, Some(path)) => Some(PathBuf::from(path)),
            (None, None) => Some(PathBuf::from(SYSTEM_CONFIG_PATH)).filter(|p| p.exists()),
        };
        let mut config = match path {
            Some(path) => Config::from_file(&path)?,
            None => Config::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        config.check()?;
        Ok(config)
    }

    /// Parses one TOML file (without environment overrides).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses TOML text; an unknown key or a bad value is an error naming it.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| usage_common::toml_place::describe(text, &e))
    }

    /// Applies the `USAGE_AGENT_*` environment overrides, which win over the file.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let flag = |name: &str| -> Result<bool, ConfigError> {
            match var(name).as_deref().map(str::trim) {
                None | Some("") | Some("0") | Some("false") => Ok(false),
                Some("1") | Some("true") => Ok(true),
                Some(_) => Err(invalid(name, "must be 1 or 0")),
            }
        };
        if flag("USAGE_AGENT_DISABLE_TRACKING")? {
            self.tracking_enabled = false;
        }
        if flag("USAGE_AGENT_DISABLE_SYNC")? {
            self.sync.enabled = false;
        }
        if flag("USAGE_AGENT_DEBUG")? {
            self.debug = true;
        }
        if let Some(value) = var("USAGE_AGENT_SYNC_INTERVAL") {
            self.sync.interval_secs = value.trim().parse().map_err(|_| {
                invalid(
                    "USAGE_AGENT_SYNC_INTERVAL",
                    "must be a whole number of seconds",
                )
            })?;
        }
        if let Some(value) = var("USAGE_AGENT_SYNC_BATCH_SIZE") {
            self.sync.batch_size = value
                .trim()
                .parse()
                .map_err(|_| invalid("USAGE_AGENT_SYNC_BATCH_SIZE", "must be a whole number"))?;
        }
        if let Some(value) = var("USAGE_AGENT_BACKEND_URL") {
            self.sync.backend_url = match value.trim() {
                "" => None,
                text => Some(
                    BackendUrl::parse(text)
                        .map_err(|rule| invalid("USAGE_AGENT_BACKEND_URL", rule))?,
                ),
            };
        }
        if let Some(value) = var("USAGE_AGENT_DATA_DIR").filter(|v| !v.is_empty()) {
            self.data_dir = PathBuf::from(value);
        }
        let quota = &mut self.quota;
        for (name, key) in [
            (
                "USAGE_AGENT_QUOTA_USER_DAILY_TOKENS",
                &mut quota.user_daily_tokens,
            ),
            (
                "USAGE_AGENT_QUOTA_USER_MONTHLY_TOKENS",
                &mut quota.user_monthly_tokens,
            ),
            (
                "USAGE_AGENT_QUOTA_SITE_DAILY_TOKENS",
                &mut quota.site_daily_tokens,
            ),
            (
                "USAGE_AGENT_QUOTA_SITE_MONTHLY_TOKENS",
                &mut quota.site_monthly_tokens,
            ),
            ("USAGE_AGENT_QUOTA_HOLD_TTL_SECS", &mut quota.hold_ttl_secs),
        ] {
            if let Some(value) = var(name) {
                *key = value
                    .trim()
                    .parse()
                    .map_err(|_| invalid(name, "must be a whole number"))?;
            }
        }
        Ok(())
    }

    /// Checks the rules that TOML types alone cannot express.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        if self.shutdown_timeout_secs == 0 {
            return Err(invalid("shutdown_timeout_secs", "must be at least 1"));
        }
        if self.tcp_listen.is_some() && self.api_token.is_empty() {
            return Err(invalid("api_token", "is required when tcp_listen is set"));
        }
        let sync = &self.sync;
        if !(1..=1000).contains(&sync.batch_size) {
            return Err(invalid("sync.batch_size", "must be from 1 to 1000"));
        }
        if sync.interval_secs == 0 {
            return Err(invalid("sync.interval_secs", "must be at least 1"));
        }
        if sync.max_attempts == 0 {
            return Err(invalid("sync.max_attempts", "must be at least 1"));
        }
        if sync.max_backoff_ms < sync.initial_backoff_ms {
            return Err(invalid(
                "sync.max_backoff_ms",
                "must not be less than sync.initial_backoff_ms",
            ));
        }
        if sync.request_timeout_secs == 0 {
            return Err(invalid("sync.request_timeout_secs", "must be at least 1"));
        }
        if self.retention.event_days == 0 {
            return Err(invalid("retention.event_days", "must be at least 1"));
        }
        if self.retention.daily_days < self.retention.event_days {
            return Err(invalid(
                "retention.daily_days",
                "must not be less than retention.event_days",
            ));
        }
        if !(1..=QuotaConfig::MAX_HOLD_TTL_SECS).contains(&self.quota.hold_ttl_secs) {
            return Err(invalid(
                "quota.hold_ttl_secs",
                format!(
                    "must be from 1 to {} (a day)",
                    QuotaConfig::MAX_HOLD_TTL_SECS
                ),
            ));
        }
        Ok(())
    }

    /// Where the local API socket lives.
    pub fn socket_path(&self) -> PathBuf {
        if self.socket_path.is_empty() {
            self.data_dir.join("agent.sock")
        } else {
            PathBuf::from(&self.socket_path)
        }
    }

    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("usage.db")
    }

    pub fn identity_path(&self) -> PathBuf {
        self.data_dir.join("identity.json")
    }

    pub fn lock_path(&self) -> PathBuf {
        self.data_dir.join("agent.lock")
    }

    /// Whether sync can run at all: enabled and pointed at a backend.
    pub fn sync_active(&self) -> bool {
        self.sync.enabled && self.sync.backend_url.is_some()
    }

    /// Why sync is off, or `None` when it can run (status `disabled`).
    pub fn sync_disabled_reason(&self) -> Option<&'static str> {
        if !self.tracking_enabled {
            Some(
                "sync is disabled because tracking is off (tracking_enabled = false or USAGE_AGENT_DISABLE_TRACKING)",
            )
        } else if !self.sync.enabled {
            Some("sync is disabled (sync.enabled = false or USAGE_AGENT_DISABLE_SYNC)")
        } else if self.sync.backend_url.is_none() {
            Some("sync is disabled: no sync.backend_url is configured (events are kept locally)")
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_urls_are_checked_once_and_keep_a_path_prefix() {
        let url = BackendUrl::parse("https://b.example/ingest/").unwrap();
        assert_eq!(
            url.endpoint("/api/usage/event").as_str(),
            "https://b.example/ingest/api/usage/event"
        );
        assert_eq!(
            BackendUrl::parse("http://127.0.0.1:8787")
                .unwrap()
                .endpoint("/api/installations")
                .as_str(),
            "http://127.0.0.1:8787/api/installations"
        );
        for bad in ["b.example", "ftp://b.example", "https://", "http://", ""] {
            assert!(BackendUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_match_the_spec() {
        let config = Config::default();
        assert_eq!(
            config.socket_path(),
            PathBuf::from("./usage-agent-data/agent.sock")
        );
        assert_eq!(config.socket_mode.bits(), 0o660);
        assert_eq!(config.timezone.name(), "UTC");
        assert_eq!(config.schedule.rollup.as_str(), "0 0 2 * * *");
        assert_eq!(config.sync.backend_url, None);
        assert_eq!(config.synchronous, Synchronous::Full);
        assert_eq!(config.sync.batch_size, 50);
        assert_eq!(config.retention.daily_days, 730);
        config.check().unwrap();
    }

    #[test]
    fn the_example_file_parses_and_lists_every_key() {
        let text = include_str!("../agent.toml.example");
        let config = Config::from_toml(text).expect("agent.toml.example parses");
        config.check().unwrap();
        let uncommented: String = text
            .lines()
            .map(|line| line.trim_start_matches('#').trim_start())
            .collect::<Vec<_>>()
            .join("\n");
        for key in [
            "data_dir",
            "socket_path",
            "socket_mode",
            "socket_group",
            "tcp_listen",
            "api_token",
            "timezone",
            "tracking_enabled",
            "synchronous",
            "log_format",
            "debug",
            "max_connections",
            "shutdown_timeout_secs",
            "[sync]",
            "enabled",
            "backend_url",
            "auth_token",
            "enroll_token",
            "interval_secs",
            "batch_size",
            "max_attempts",
            "initial_backoff_ms",
            "max_backoff_ms",
            "request_timeout_secs",
            "[retention]",
            "event_days",
            "daily_days",
            "[schedule]",
            "rollup",
            "cleanup",
            "[quota]",
            "user_daily_tokens",
            "user_monthly_tokens",
            "site_daily_tokens",
            "site_monthly_tokens",
            "hold_ttl_secs",
        ] {
            assert!(
                uncommented.contains(key),
                "agent.toml.example does not document {key}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let error = Config::from_toml("colour = 1").unwrap_err();
        assert!(error.contains("colour"), "{error}");
        let error = Config::from_toml("[sync]\nbatchsize = 5").unwrap_err();
        assert!(error.contains("sync.batchsize"), "{error}");
    }

    #[test]
    fn bad_values_are_named() {
        let error = Config::from_toml("synchronous = \"off\"").unwrap_err();
        assert!(error.contains("synchronous"), "{error}");
        let cases = [
            ("[sync]\nbatch_size = 1001", "sync.batch_size"),
            ("socket_mode = \"rw\"", "socket_mode"),
            (
                "tcp_listen = \"0.0.0.0:9000\"\napi_token = \"t\"",
                "tcp_listen",
            ),
            ("tcp_listen = \"127.0.0.1:9000\"", "api_token"),
            ("[sync]\nbackend_url = \"ftp://x\"", "sync.backend_url"),
            ("[retention]\nevent_days = 0", "retention.event_days"),
            ("[quota]\nhold_ttl_secs = 0", "quota.hold_ttl_secs"),
            ("[quota]\nhold_ttl_secs = 86401", "quota.hold_ttl_secs"),
            ("[quota]\nuser_daily_tokens = -1", "quota.user_daily_tokens"),
            ("max_connections = 0", "max_connections"),
            ("shutdown_timeout_secs = 0", "shutdown_timeout_secs"),
            ("timezone = \"Mars/Olympus\"", "timezone"),
            ("timezone = \"\"", "timezone"),
            ("[schedule]\nrollup = \"0 2 * * *\"", "schedule.rollup"),
            ("[schedule]\ncleanup = \"daily\"", "schedule.cleanup"),
        ];
        for (text, key) in cases {
            // A value that does not parse is refused while reading the file; a rule
            // between keys when the config is checked. Either way the key is named.
            let error = match Config::from_toml(text) {
                Err(message) => message,
                Ok(config) => config.check().unwrap_err().to_string(),
            };
            assert!(error.contains(key), "{text}: {error}");
        }
    }

    #[test]
    fn environment_overrides_win() {
        let mut config =
            Config::from_toml("tracking_enabled = true\n[sync]\ninterval_secs = 60").unwrap();
        let env = |name: &str| match name {
            "USAGE_AGENT_DISABLE_TRACKING" => Some("1".to_string()),
            "USAGE_AGENT_SYNC_INTERVAL" => Some("15".to_string()),
            "USAGE_AGENT_DATA_DIR" => Some("/tmp/x".to_string()),
            "USAGE_AGENT_QUOTA_USER_DAILY_TOKENS" => Some("5000".to_string()),
            "USAGE_AGENT_QUOTA_HOLD_TTL_SECS" => Some(" 30 ".to_string()),
            _ => None,
        };
        config.apply_env(env).unwrap();
        assert!(!config.tracking_enabled);
        assert_eq!(config.quota.user_daily_tokens, 5000);
        assert_eq!(config.quota.hold_ttl_secs, 30);
        assert!(config.quota.any_limit());
        let error = config
            .apply_env(|n| (n == "USAGE_AGENT_QUOTA_SITE_MONTHLY_TOKENS").then(|| "lots".into()))
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("USAGE_AGENT_QUOTA_SITE_MONTHLY_TOKENS"),
            "{error}"
        );
        config
            .apply_env(|n| (n == "USAGE_AGENT_BACKEND_URL").then(|| "https://b.example/".into()))
            .unwrap();
        assert_eq!(
            config.sync.backend_url.as_ref().map(ToString::to_string),
            Some("https://b.example".to_string())
        );
        let error = config
            .apply_env(|n| (n == "USAGE_AGENT_BACKEND_URL").then(|| "b.example".into()))
            .unwrap_err();
        assert!(
            error.to_string().contains("USAGE_AGENT_BACKEND_URL"),
            "{error}"
        );
        assert_eq!(config.sync.interval_secs, 15);
        assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
        let error = config
            .apply_env(|n| (n == "USAGE_AGENT_SYNC_BATCH_SIZE").then(|| "many".to_string()))
            .unwrap_err();
        assert!(error.to_string().contains("USAGE_AGENT_SYNC_BATCH_SIZE"));
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let config = Config {
            api_token: "tok-123".into(),
            sync: SyncConfig {
                auth_token: "auth-456".into(),
                ..SyncConfig::default()
            },
            ..Config::default()
        };
        let text = format!("{config:?}");
        assert!(
            !text.contains("tok-123") && !text.contains("auth-456"),
            "{text}"
        );
    }
}
