//! From step configuration to a resolved endpoint: where to send, and with which headers.
//!
//! The platform delivers credentials merged with the action's fields into one `cfg` object. For
//! local use, anything missing from `cfg` falls back to the environment variables the official
//! SDKs read. All header values are checked here, before any request is made, so a pasted key with
//! a line break is a configuration error that names the field, not an obscure HTTP failure.

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use serde_json::Value;

use crate::secret::Secret;

/// The default API root.
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

/// Credential keys the code reads from `cfg`; `check` verifies each is a credentials field.
pub const CFG_KEYS: &[&str] = &["apiKey", "baseUrl", "project", "authStyle", "apiVersion"];

/// Looks up an environment variable. Injected so tests and the platform mode decide what the
/// environment is.
pub type Env<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// How the key is presented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthStyle {
    /// `Authorization: Bearer <key>`: OpenAI and most compatible servers.
    Bearer,
    /// `api-key: <key>`: Azure OpenAI.
    Azure,
}

/// A resolved endpoint. Its `Debug` output is safe to log: the key is a [`Secret`] and the
/// header map marks it sensitive.
#[derive(Clone, Debug)]
pub struct Credentials {
    base_url: String,
    api_version: Option<String>,
    headers: HeaderMap,
    api_key: Secret,
}

/// A setting that is missing or unusable. Names the field and says what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Configuration field `{field}` {problem}")]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(field: &str, problem: impl Into<String>) -> Self {
        ConfigError {
            field: field.to_string(),
            problem: problem.into(),
        }
    }

    /// The error as the platform shows it.
    pub fn to_event(&self) -> crate::emit::ErrorEvent {
        crate::emit::ErrorEvent::new(
            "ConfigurationError",
            self.to_string(),
            serde_json::json!({ "field": self.field }),
        )
    }
}

/// Resolves credentials from `cfg`, falling back to `OPENAI_API_KEY`, `OPENAI_BASE_URL`,
/// `OPENAI_ORG_ID`, `OPENAI_PROJECT_ID` and `OPENAI_API_VERSION`.
pub fn resolve(cfg: &Value, env: Env) -> Result<Credentials, ConfigError> {
    let setting = |key: &str, var: &str| text(cfg, key).or_else(|| non_empty(env(var)));

    let api_key = setting("apiKey", "OPENAI_API_KEY").ok_or_else(|| {
        ConfigError::new(
            "apiKey",
            "is missing: enter your OpenAI API key in the credentials (or set OPENAI_API_KEY for local runs)",
        )
    })?;
    let auth = match text(cfg, "authStyle").as_deref() {
        None | Some("bearer") => AuthStyle::Bearer,
        Some("azure") => AuthStyle::Azure,
        Some(_) => {
            return Err(ConfigError::new(
                "authStyle",
                "must be \"bearer\" or \"azure\"",
            ))
        }
    };
    let base_url = match setting("baseUrl", "OPENAI_BASE_URL") {
        None => OPENAI_BASE_URL.to_string(),
        Some(url) => check_url(&url)?,
    };

    let mut headers = HeaderMap::new();
    let key_header = match auth {
        AuthStyle::Bearer => (AUTHORIZATION, format!("Bearer {api_key}")),
        AuthStyle::Azure => (HeaderName::from_static("api-key"), api_key.clone()),
    };
    let mut value = header_value("apiKey", &key_header.1)?;
    value.set_sensitive(true);
    headers.insert(key_header.0, value);
    let optional = [
        ("organization", "OPENAI_ORG_ID", "openai-organization"),
        ("project", "OPENAI_PROJECT_ID", "openai-project"),
    ];
    for (key, var, header) in optional {
        if let Some(v) = setting(key, var) {
            headers.insert(HeaderName::from_static(header), header_value(key, &v)?);
        }
    }
    let api_version = setting("apiVersion", "OPENAI_API_VERSION");
    if let Some(v) = &api_version {
        if !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(ConfigError::new(
                "apiVersion",
                "must look like 2024-10-21 or 2025-04-01-preview",
            ));
        }
    }

    Ok(Credentials {
        base_url,
        api_version,
        headers,
        api_key: Secret::new(api_key),
    })
}

impl Credentials {
    /// The URL of an API path such as `/chat/completions`, with Azure's `api-version` if set.
    pub fn url(&self, path: &str) -> String {
        match &self.api_version {
            Some(v) => format!("{}{path}?api-version={v}", self.base_url),
            None => format!("{}{path}", self.base_url),
        }
    }

    /// Authentication, organization and project headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// True when talking to OpenAI itself (model lists are filtered only there).
    pub fn is_openai(&self) -> bool {
        self.base_url == OPENAI_BASE_URL
    }

    /// Removes the key from text that came from elsewhere (an upstream error body), in case a
    /// compatible server echoes it.
    pub fn scrub(&self, text: &str) -> String {
        let key = self.api_key.expose();
        if key.len() >= 8 && text.contains(key) {
            text.replace(key, "***")
        } else {
            text.to_string()
        }
    }
}

/// A text setting from `cfg`: strings trimmed of spaces, numbers as written; blank is unset
/// (forms submit empty strings for untouched fields).
pub fn text(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => non_empty(Some(s.trim_matches([' ', '\t']).to_string())),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

fn header_value(field: &str, value: &str) -> Result<HeaderValue, ConfigError> {
    // The value itself is never quoted: for `apiKey` it is the secret.
    if value.contains(['\r', '\n']) {
        return Err(ConfigError::new(
            field,
            "contains a line break (CR or LF); remove it (it often comes with copy and paste)",
        ));
    }
    HeaderValue::from_str(value).map_err(|_| {
        ConfigError::new(
            field,
            "contains characters that cannot be sent in an HTTP header; use printable ASCII only",
        )
    })
}

fn check_url(url: &str) -> Result<String, ConfigError> {
    let parsed = reqwest::Url::parse(url).ok().filter(|u| {
        matches!(u.scheme(), "http" | "https") && u.host().is_some() && u.query().is_none()
    });
    match parsed {
        Some(_) => Ok(url.trim_end_matches('/').to_string()),
        None => Err(ConfigError::new(
            "baseUrl",
            "must be an http(s) URL without a query, such as https://api.openai.com/v1",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn header(c: &Credentials, name: &str) -> Option<String> {
        c.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn openai_defaults() {
        let c = resolve(&json!({"apiKey": "sk-1", "organization": "org-9"}), &no_env).unwrap();
        assert_eq!(
            c.url("/chat/completions"),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(header(&c, "authorization").as_deref(), Some("Bearer sk-1"));
        assert_eq!(header(&c, "openai-organization").as_deref(), Some("org-9"));
        assert_eq!(header(&c, "openai-project"), None);
        assert!(c.headers()["authorization"].is_sensitive());
        assert!(c.is_openai());
    }

    #[test]
    fn blank_fields_fall_back_to_the_environment() {
        let env = |name: &str| match name {
            "OPENAI_API_KEY" => Some("sk-env".to_string()),
            "OPENAI_BASE_URL" => Some("http://127.0.0.1:9/v1/".to_string()),
            "OPENAI_ORG_ID" => Some("org-env".to_string()),
            "OPENAI_PROJECT_ID" => Some("proj_env".to_string()),
            _ => None,
        };
        let c = resolve(&json!({"apiKey": "", "organization": "  "}), &env).unwrap();
        assert_eq!(c.url("/models"), "http://127.0.0.1:9/v1/models");
        assert_eq!(
            header(&c, "authorization").as_deref(),
            Some("Bearer sk-env")
        );
        assert_eq!(
            header(&c, "openai-organization").as_deref(),
            Some("org-env")
        );
        assert_eq!(header(&c, "openai-project").as_deref(), Some("proj_env"));
        assert!(!c.is_openai());
    }

    #[test]
    fn cfg_wins_over_the_environment() {
        let env = |name: &str| (name != "OPENAI_BASE_URL").then(|| "from-env".to_string());
        let c = resolve(&json!({"apiKey": "sk-cfg", "project": "proj_cfg"}), &env).unwrap();
        assert_eq!(
            header(&c, "authorization").as_deref(),
            Some("Bearer sk-cfg")
        );
        assert_eq!(header(&c, "openai-project").as_deref(), Some("proj_cfg"));
    }

    #[test]
    fn azure_uses_api_key_header_and_api_version() {
        let cfg = json!({
            "apiKey": "azkey", "authStyle": "azure", "apiVersion": "2024-10-21",
            "baseUrl": "https://r.openai.azure.com/openai/deployments/gpt4o"
        });
        let c = resolve(&cfg, &no_env).unwrap();
        assert_eq!(
            c.url("/chat/completions"),
            "https://r.openai.azure.com/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(header(&c, "api-key").as_deref(), Some("azkey"));
        assert_eq!(header(&c, "authorization"), None);
    }

    #[test]
    fn missing_key_is_a_clear_error() {
        let err = resolve(&json!({}), &no_env).unwrap_err();
        assert_eq!(err.field, "apiKey");
        assert!(err.to_string().contains("enter your OpenAI API key"));
    }

    #[test]
    fn line_breaks_are_refused_without_quoting_the_value() {
        for (cfg, field) in [
            (json!({"apiKey": "sk-abc\n"}), "apiKey"),
            (
                json!({"apiKey": "sk-1", "organization": "org\r\nX-Evil: 1"}),
                "organization",
            ),
            (json!({"apiKey": "sk-1", "project": "p\n"}), "project"),
        ] {
            let err = resolve(&cfg, &no_env).unwrap_err();
            assert_eq!(err.field, field);
            assert!(err.problem.contains("line break"), "{err}");
            assert!(!err.to_string().contains("sk-abc"));
        }
        let err = resolve(&json!({"apiKey": "sk-\u{7f}x"}), &no_env).unwrap_err();
        assert!(err.problem.contains("printable ASCII"));
    }

    #[test]
    fn bad_settings_name_their_field() {
        for (cfg, field) in [
            (
                json!({"apiKey": "k", "baseUrl": "api.openai.com"}),
                "baseUrl",
            ),
            (json!({"apiKey": "k", "baseUrl": "ftp://x/v1"}), "baseUrl"),
            (json!({"apiKey": "k", "authStyle": "basic"}), "authStyle"),
            (
                json!({"apiKey": "k", "apiVersion": "2024 10"}),
                "apiVersion",
            ),
        ] {
            assert_eq!(resolve(&cfg, &no_env).unwrap_err().field, field, "{cfg}");
        }
    }

    #[test]
    fn scrub_removes_an_echoed_key() {
        let c = resolve(&json!({"apiKey": "sk-0123456789"}), &no_env).unwrap();
        assert_eq!(c.scrub("bad key sk-0123456789!"), "bad key ***!");
    }
}
