//! The gateway's configuration: a Vanus connector `config.yml`, plus our keys.
//!
//! Found via `--config`, then `CONNECTOR_CONFIG`, then `/vanus-connect/config/config.yml` (the
//! path Vanus images use). Every key can be overridden by `CONNECTOR_<KEY>` in the environment
//! (Vanus itself reads `CONNECTOR_TARGET`). Unknown keys are errors, so a typo is reported
//! instead of silently ignored; the cdk-go keys that mean nothing here are accepted with a
//! warning, so an existing Vanus config starts unchanged.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::credentials::Env;
use crate::secret::Secret;

/// Where Vanus images mount the connector config.
pub const VANUS_CONFIG_PATH: &str = "/vanus-connect/config/config.yml";

/// Vanus's default for `everyday_limit` (the code's, not the README's 100).
pub const VANUS_DAILY_LIMIT: u64 = 1000;

/// cdk-go keys a Vanus config may hold that the gateway has no use for.
const IGNORED_VANUS_KEYS: &[&str] = &[
    "vanus",
    "batch_size",
    "log_config",
    "store_config",
    "multi",
    "connector_type",
    "base_path",
    "grpc_port",
];

/// A bad configuration: the key at fault and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    fn new(key: &str, problem: impl Into<String>) -> Self {
        ConfigError {
            key: key.to_string(),
            problem: problem.into(),
        }
    }
}

/// How events are written to `target`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EventMode {
    /// One JSON document, `application/cloudevents+json` (what Vanus sends).
    #[default]
    Structured,
    /// Attributes as `ce-*` headers, the data as the body.
    Binary,
}

/// Whether `POST /` answers at once (Vanus) or after the answer is known (`Process-Mode: sync`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProcessMode {
    #[default]
    Async,
    Sync,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Successful upstream calls allowed per UTC day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DailyLimit {
    Calls(u64),
    Unlimited,
}

impl<'de> Deserialize<'de> for DailyLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            // As Vanus: zero or less means the default.
            Raw::Number(n) if n <= 0 => Ok(DailyLimit::Calls(VANUS_DAILY_LIMIT)),
            Raw::Number(n) => Ok(DailyLimit::Calls(n as u64)),
            Raw::Text(t) if t == "unlimited" => Ok(DailyLimit::Unlimited),
            Raw::Text(t) => t
                .parse::<i64>()
                .map(|n| DailyLimit::Calls(if n <= 0 { VANUS_DAILY_LIMIT } else { n as u64 }))
                .map_err(|_| {
                    serde::de::Error::custom("expected a whole number of calls or \"unlimited\"")
                }),
        }
    }
}

/// The gateway's settings. Field names are the YAML keys.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    // --- Vanus keys ---
    /// Where answers are POSTed as CloudEvents. Needed only for asynchronous `POST /`.
    pub target: Option<String>,
    #[serde(default = "default_port")]
    pub port: u16,
    /// The OpenAI API key. Falls back to `OPENAI_API_KEY`.
    #[serde(default, deserialize_with = "secret")]
    pub token: Option<Secret>,
    #[serde(default = "default_daily_limit")]
    pub everyday_limit: DailyLimit,
    /// Sent as `max_completion_tokens` (Vanus sent the deprecated `max_tokens`, always).
    pub max_tokens: Option<u32>,
    /// Delivery attempts per event; 0 or less retries until shutdown (as Vanus).
    #[serde(default = "default_attempts")]
    pub send_event_attempts: i64,

    // --- ours ---
    /// The address to listen on; loopback unless told otherwise.
    #[serde(default = "default_bind")]
    pub bind: IpAddr,
    #[serde(default = "default_model")]
    pub model: String,
    /// A system message put before the text of every `POST /` request.
    pub system_prompt: Option<String>,
    /// An OpenAI-compatible endpoint instead of OpenAI (`OPENAI_BASE_URL` otherwise).
    pub base_url: Option<String>,
    pub organization: Option<String>,
    pub project: Option<String>,
    /// Seconds one upstream call may take (streams: between chunks).
    #[serde(default = "default_request_timeout")]
    pub request_timeout: f64,
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Upstream calls in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Requests allowed to wait for an upstream slot; beyond it callers get 429.
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default)]
    pub event_mode: EventMode,
    #[serde(default)]
    pub default_process_mode: ProcessMode,
    /// Seconds one delivery attempt to `target` may take.
    #[serde(default = "default_delivery_timeout")]
    pub send_event_timeout: f64,
    /// Milliseconds before the first delivery retry; doubles each time, capped at 5 s.
    #[serde(default = "default_delivery_backoff")]
    pub send_event_backoff_ms: u64,
    /// Holds the daily usage (`daily-usage.json`) and undeliverable events (`dead-letters/`).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Callers must send `Authorization: Bearer <auth_token>`.
    #[serde(default, deserialize_with = "secret")]
    pub auth_token: Option<Secret>,
    /// Callers must send HTTP Basic credentials (with `auth_password`).
    pub auth_username: Option<String>,
    #[serde(default, deserialize_with = "secret")]
    pub auth_password: Option<Secret>,
    #[serde(default)]
    pub log_format: LogFormat,
    /// Seconds between SIGTERM and no longer accepting: `/readyz` fails while requests are still
    /// served, so load balancers can take the replica out first.
    #[serde(default)]
    pub shutdown_delay: f64,
    /// Where conversations are kept (requests with a conversation id): a SQLite file path or
    /// `redis://…`; default `CONVERSATION_STORE`, else a file in the user's data directory.
    pub conversation_store: Option<String>,
    /// cdk-go keys found in the file and ignored; `serve` warns about them once logging is up.
    #[serde(skip)]
    pub ignored_keys: Vec<String>,
}

/// Keys that hold text: an environment override is taken as written, never as a number.
const TEXT_KEYS: &[&str] = &[
    "target",
    "token",
    "model",
    "system_prompt",
    "base_url",
    "organization",
    "project",
    "data_dir",
    "auth_token",
    "auth_username",
    "auth_password",
    "everyday_limit",
    "conversation_store",
];
/// Keys whose environment override is parsed as a YAML scalar (numbers, addresses, words).
const SCALAR_KEYS: &[&str] = &[
    "port",
    "max_tokens",
    "send_event_attempts",
    "bind",
    "request_timeout",
    "max_retries",
    "concurrency",
    "queue_size",
    "max_body_bytes",
    "event_mode",
    "default_process_mode",
    "send_event_timeout",
    "send_event_backoff_ms",
    "log_format",
    "shutdown_delay",
];

fn default_port() -> u16 {
    8080
}
fn default_daily_limit() -> DailyLimit {
    DailyLimit::Calls(VANUS_DAILY_LIMIT)
}
fn default_attempts() -> i64 {
    3
}
fn default_bind() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}
fn default_model() -> String {
    "gpt-4o-mini".into()
}
fn default_request_timeout() -> f64 {
    crate::actions::send_request::DEFAULT_TIMEOUT.as_secs_f64()
}
fn default_max_retries() -> u32 {
    crate::openai::RetryPolicy::default().max_retries
}
fn default_concurrency() -> usize {
    64
}
fn default_queue_size() -> usize {
    1000
}
fn default_max_body_bytes() -> usize {
    1 << 20
}
fn default_delivery_timeout() -> f64 {
    5.0
}
fn default_delivery_backoff() -> u64 {
    1000
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

fn secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    Ok(Option::<String>::deserialize(d)?
        .filter(|s| !s.is_empty())
        .map(Secret::new))
}

/// Which file to read: `--config`, then `CONNECTOR_CONFIG`, then the Vanus image path. `None`
/// when none is given and the Vanus path does not exist: then keys come from the environment.
pub fn locate(flag: Option<&Path>, env: Env) -> Option<PathBuf> {
    if let Some(path) = flag {
        return Some(path.to_path_buf());
    }
    if let Some(path) = env("CONNECTOR_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    Some(PathBuf::from(VANUS_CONFIG_PATH)).filter(|p| p.exists())
}

/// Reads and checks the configuration.
pub fn load(path: Option<&Path>, env: Env) -> Result<Config, ConfigError> {
    let map = match path {
        None => Map::new(),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
            })?;
            parse_document(&text, env("CONNECTOR_CONFIG_TYPE").as_deref())?
        }
    };
    from_map(map, env)
}

/// Parses a config document (YAML, or JSON when `CONNECTOR_CONFIG_TYPE=json`).
fn parse_document(text: &str, kind: Option<&str>) -> Result<Map<String, Value>, ConfigError> {
    let value: Value = if kind == Some("json") {
        serde_json::from_str(text).map_err(|e| ConfigError::new("(file)", e.to_string()))?
    } else if text.trim().is_empty() {
        Value::Object(Map::new())
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| ConfigError::new("(file)", e.to_string()))?
    };
    match value {
        Value::Object(map) => Ok(map),
        Value::Null => Ok(Map::new()),
        _ => Err(ConfigError::new(
            "(file)",
            "must be a mapping of keys to values",
        )),
    }
}

/// Applies environment overrides and checks every value.
pub fn from_map(mut map: Map<String, Value>, env: Env) -> Result<Config, ConfigError> {
    let ignored_keys: Vec<String> = IGNORED_VANUS_KEYS
        .iter()
        .filter(|key| map.remove(**key).is_some())
        .map(|key| key.to_string())
        .collect();
    for key in TEXT_KEYS.iter().chain(SCALAR_KEYS) {
        let Some(raw) = env(&format!("CONNECTOR_{}", key.to_uppercase())) else {
            continue;
        };
        let value = if TEXT_KEYS.contains(key) {
            Value::String(raw)
        } else {
            serde_yaml_ng::from_str(&raw).unwrap_or(Value::String(raw))
        };
        map.insert(key.to_string(), value);
    }
    if !map.contains_key("token") {
        if let Some(key) = env("OPENAI_API_KEY") {
            map.insert("token".into(), Value::String(key));
        }
    }
    let mut config: Config = serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
        let key = e.path().to_string();
        let problem = e.into_inner().to_string();
        // Unknown keys are reported by serde at the top level ("."): name the key itself.
        match problem.strip_prefix("unknown field `") {
            Some(rest) => ConfigError::new(
                rest.split('`').next().unwrap_or(&key),
                format!("is not a known key; {problem}"),
            ),
            None => ConfigError::new(&key, problem),
        }
    })?;
    config.check()?;
    config.ignored_keys = ignored_keys;
    Ok(config)
}

impl Config {
    fn check(&self) -> Result<(), ConfigError> {
        if self.token.is_none() {
            return Err(ConfigError::new(
                "token",
                "is missing: set your OpenAI API key as `token` (or CONNECTOR_TOKEN or OPENAI_API_KEY)",
            ));
        }
        if let Some(target) = &self.target {
            let parsed = reqwest::Url::parse(target).ok();
            if !matches!(parsed.as_ref().map(|u| u.scheme()), Some("http" | "https")) {
                return Err(ConfigError::new(
                    "target",
                    "must be an http:// or https:// URL, such as http://sink-display:8080",
                ));
            }
        }
        if !(self.request_timeout > 0.0 && self.request_timeout <= 86_400.0) {
            return Err(ConfigError::new(
                "request_timeout",
                "must be a number of seconds between 0 and 86400",
            ));
        }
        if !(self.send_event_timeout > 0.0 && self.send_event_timeout <= 3_600.0) {
            return Err(ConfigError::new(
                "send_event_timeout",
                "must be a number of seconds between 0 and 3600",
            ));
        }
        if !(0.0..=300.0).contains(&self.shutdown_delay) {
            return Err(ConfigError::new(
                "shutdown_delay",
                "must be a number of seconds from 0 to 300",
            ));
        }
        if self.concurrency == 0 {
            return Err(ConfigError::new("concurrency", "must be at least 1"));
        }
        if self.max_retries > 10 {
            return Err(ConfigError::new("max_retries", "must be from 0 to 10"));
        }
        if self.model.trim().is_empty() {
            return Err(ConfigError::new(
                "model",
                "must name a model, such as gpt-4o-mini",
            ));
        }
        match (&self.auth_username, &self.auth_password) {
            (Some(_), None) => Err(ConfigError::new(
                "auth_password",
                "is missing: Basic auth needs both auth_username and auth_password",
            )),
            (None, Some(_)) => Err(ConfigError::new(
                "auth_username",
                "is missing: Basic auth needs both auth_username and auth_password",
            )),
            _ => Ok(()),
        }
    }

    /// The Send Request configuration every gateway route starts from.
    pub fn action_cfg(&self) -> Value {
        let mut cfg = json!({
            "apiKey": self.token.as_ref().map(Secret::expose),
            "model": self.model,
            "requestTimeout": self.request_timeout,
            "maxRetries": self.max_retries,
        });
        let optional = [
            ("baseUrl", &self.base_url),
            ("organization", &self.organization),
            ("project", &self.project),
            ("conversationStore", &self.conversation_store),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                cfg[key] = Value::String(value.clone());
            }
        }
        cfg
    }

    pub fn delivery_backoff(&self) -> Duration {
        Duration::from_millis(self.send_event_backoff_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn parse(yaml: &str, env: &[(&'static str, &'static str)]) -> Result<Config, ConfigError> {
        let env: &'static [(&str, &str)] = Box::leak(env.to_vec().into_boxed_slice());
        let env = env_of(env);
        from_map(parse_document(yaml, None)?, &env)
    }

    #[test]
    fn a_vanus_config_starts_unchanged() {
        let config = parse(
            "target: http://sink:8080\nport: 8082\ntoken: sk-x\neveryday_limit: 100\nlog_config:\n  log_level: DEBUG\n",
            &[],
        )
        .unwrap();
        assert_eq!(config.target.as_deref(), Some("http://sink:8080"));
        assert_eq!(config.port, 8082);
        assert_eq!(config.everyday_limit, DailyLimit::Calls(100));
        assert_eq!(config.bind, default_bind());
        assert_eq!(config.send_event_attempts, 3);
        assert_eq!(config.ignored_keys, ["log_config"]);
    }

    #[test]
    fn the_environment_overrides_keys_and_keeps_text_as_text() {
        let config = parse(
            "token: sk-file\nport: 1\n",
            &[
                ("CONNECTOR_PORT", "9090"),
                ("CONNECTOR_TOKEN", "12345"),
                ("CONNECTOR_TARGET", "http://t"),
                ("CONNECTOR_EVERYDAY_LIMIT", "unlimited"),
            ],
        )
        .unwrap();
        assert_eq!(config.port, 9090);
        assert_eq!(config.token.unwrap().expose(), "12345");
        assert_eq!(config.target.as_deref(), Some("http://t"));
        assert_eq!(config.everyday_limit, DailyLimit::Unlimited);
        let config = parse("", &[("OPENAI_API_KEY", "sk-env")]).unwrap();
        assert_eq!(config.token.unwrap().expose(), "sk-env");
    }

    #[test]
    fn vanus_limits_of_zero_or_less_mean_the_default() {
        for text in ["0", "-3", "\"0\""] {
            let config = parse(&format!("token: k\neveryday_limit: {text}\n"), &[]).unwrap();
            assert_eq!(config.everyday_limit, DailyLimit::Calls(1000), "{text}");
        }
    }

    #[test]
    fn bad_configs_name_the_key() {
        for (yaml, key) in [
            ("token: k\nport: eighty\n", "port"),
            ("token: k\ntokne: k\n", "tokne"),
            ("port: 1\n", "token"),
            ("token: k\ntarget: sink:8080\n", "target"),
            ("token: k\nbind: localhost\n", "bind"),
            ("token: k\neveryday_limit: lots\n", "everyday_limit"),
            ("token: k\nevent_mode: xml\n", "event_mode"),
            ("token: k\nauth_username: u\n", "auth_password"),
            ("token: k\nconcurrency: 0\n", "concurrency"),
            ("- a\n- b\n", "(file)"),
            ("token: [\n", "(file)"),
        ] {
            let error = parse(yaml, &[]).unwrap_err();
            assert_eq!(error.key, key, "{yaml}: {error}");
        }
    }

    #[test]
    fn the_action_cfg_carries_the_key_and_the_model() {
        let config = parse("token: sk-1\nmodel: gpt-4o\nbase_url: http://x/v1\n", &[]).unwrap();
        let cfg = config.action_cfg();
        assert_eq!(cfg["apiKey"], "sk-1");
        assert_eq!(cfg["model"], "gpt-4o");
        assert_eq!(cfg["baseUrl"], "http://x/v1");
        assert!(cfg.get("project").is_none());
        assert!(!format!("{config:?}").contains("sk-1"));
    }
}
