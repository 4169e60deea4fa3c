//! The `ELASTICIO_*` environment, read the way sailor-nodejs's `lib/settings.js` reads it.
//!
//! The platform starts every step container with these variables; matching sailor's quirks
//! (JavaScript `parseInt`, `0` meaning "use the default", `"false"` as the only false string)
//! means a flow that works on the Node.js runtime behaves the same here.

use crate::secret::Secret;

const PREFIX: &str = "ELASTICIO_";

/// A required variable is missing; the text is sailor's (`"ELASTICIO_FLOW_ID is missing"`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SettingsError(pub String);

/// Everything sailor reads from the environment.
///
/// Units: `_ms` fields are milliseconds, sizes are bytes, the `*_rate_limit` fields count emits
/// allowed per `rate_interval_ms`. The message-processing fields (`amqp_uri` to
/// `message_crypto_password`) are empty in hook-shutdown mode.
#[derive(Debug, Clone)]
pub struct Settings {
    pub flow_id: String,
    pub exec_id: String,
    pub step_id: String,
    pub container_id: String,
    pub workspace_id: String,
    pub user_id: String,
    pub comp_id: String,
    /// The action or trigger key in component.json.
    pub function: String,
    pub api_uri: String,
    pub api_username: String,
    pub api_key: Secret,
    /// A `Secret` because the URI usually embeds the broker password.
    pub amqp_uri: Secret,
    /// Queue to consume.
    pub listen_messages_on: String,
    /// Exchange to publish to.
    pub publish_messages_to: String,
    pub data_routing_key: String,
    pub error_routing_key: String,
    pub rebound_routing_key: String,
    pub snapshot_routing_key: String,
    /// Raw IV text: not secret in itself, but kept out of log context like sailor does.
    pub message_crypto_iv: String,
    pub message_crypto_password: Secret,
    pub rebound_initial_expiration_ms: u64,
    pub rebound_limit: u64,
    /// Component root relative to the working directory.
    pub component_path: String,
    /// `RABBITMQ_PREFETCH_SAILOR`, clamped to what AMQP's basic.qos can carry.
    pub prefetch: u16,
    pub startup_required: bool,
    pub hook_shutdown: bool,
    pub api_request_retry_attempts: u64,
    pub api_request_retry_delay_ms: u64,
    pub data_rate_limit: u64,
    pub error_rate_limit: u64,
    pub snapshot_rate_limit: u64,
    pub rate_interval_ms: u64,
    pub process_amqp_drain: bool,
    /// Base of the exponential publish backoff.
    pub amqp_publish_retry_delay_ms: u64,
    /// `None` = retry forever (sailor's `Infinity`).
    pub amqp_publish_retry_attempts: Option<u64>,
    pub amqp_publish_max_retry_delay_ms: u64,
    pub amqp_persistent_messages: bool,
    /// Limit on the encoded (encrypted) outgoing payload.
    pub outgoing_message_size_limit: u64,
    /// From `ELASTICIO_NO_SELF_PASSTRHOUGH`, the platform's spelling.
    pub no_self_passthrough: bool,
    /// 1 = base64 bodies, 2 = raw ciphertext; values above 255 clamp to 255.
    pub protocol_version: u8,
    pub no_error_replies: bool,
    /// `"default"`, or `"error"` for error-handler steps.
    pub input_format: String,
    pub object_storage_uri: Option<String>,
    pub object_storage_token: Option<Secret>,
    pub object_storage_size_threshold: u64,
    pub emit_lightweight_message: bool,
    pub amqp_reconnect_attempts: u64,
    pub amqp_reconnect_timeout_ms: u64,
    /// Extra outgoing AMQP headers from `ADDITIONAL_VARS_FOR_HEADERS`, camelCased, in list order.
    pub additional_headers: Vec<(String, String)>,
    /// The set log-only variables (`COMP_NAME`, `TENANT_ID`, ...) as `(full name, value)`.
    pub extra_log_context: Vec<(String, String)>,
}

/// Variables that only feed log lines; sailor's logger picks these when present.
const LOG_ONLY: [&str; 8] = [
    "COMP_NAME",
    "CONTRACT_ID",
    "EXEC_TYPE",
    "EXECUTION_RESULT_ID",
    "FLOW_VERSION",
    "TASK_USER_EMAIL",
    "TENANT_ID",
    "TASK_ID",
];

/// Reads the settings through `env` (a variable lookup, so tests need not touch the process
/// environment). Fails with the first missing required variable, in sailor's order.
pub fn read(env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, SettingsError> {
    let e = Env(env);
    // Sailor relaxes the message-processing variables on any non-empty HOOK_SHUTDOWN, even
    // "false"; the boolean field below still parses "false" as false. Kept for parity.
    let hook = e.get("HOOK_SHUTDOWN").is_some();
    let for_messages = |key: &str| {
        if hook {
            Ok(String::new())
        } else {
            e.required(key)
        }
    };
    Ok(Settings {
        // Struct fields evaluate in source order, so the first missing variable in sailor's list
        // is the one reported.
        flow_id: e.required("FLOW_ID")?,
        exec_id: e.required("EXEC_ID")?,
        step_id: e.required("STEP_ID")?,
        container_id: e.required("CONTAINER_ID")?,
        workspace_id: e.required("WORKSPACE_ID")?,
        user_id: e.required("USER_ID")?,
        comp_id: e.required("COMP_ID")?,
        function: e.required("FUNCTION")?,
        api_uri: e.required("API_URI")?,
        api_username: e.required("API_USERNAME")?,
        api_key: Secret::new(e.required("API_KEY")?),
        amqp_uri: Secret::new(for_messages("AMQP_URI")?),
        listen_messages_on: for_messages("LISTEN_MESSAGES_ON")?,
        publish_messages_to: for_messages("PUBLISH_MESSAGES_TO")?,
        data_routing_key: for_messages("DATA_ROUTING_KEY")?,
        error_routing_key: for_messages("ERROR_ROUTING_KEY")?,
        rebound_routing_key: for_messages("REBOUND_ROUTING_KEY")?,
        snapshot_routing_key: for_messages("SNAPSHOT_ROUTING_KEY")?,
        message_crypto_iv: for_messages("MESSAGE_CRYPTO_IV")?,
        message_crypto_password: Secret::new(for_messages("MESSAGE_CRYPTO_PASSWORD")?),
        rebound_initial_expiration_ms: e.number("REBOUND_INITIAL_EXPIRATION", 15_000),
        rebound_limit: e.number("REBOUND_LIMIT", 20),
        component_path: e.string("COMPONENT_PATH", ""),
        prefetch: e.number("RABBITMQ_PREFETCH_SAILOR", 1).min(u16::MAX.into()) as u16,
        startup_required: e.boolean("STARTUP_REQUIRED", false),
        hook_shutdown: e.boolean("HOOK_SHUTDOWN", false),
        api_request_retry_attempts: e.number("API_REQUEST_RETRY_ATTEMPTS", 3),
        api_request_retry_delay_ms: e.number("API_REQUEST_RETRY_DELAY", 100),
        data_rate_limit: e.number("DATA_RATE_LIMIT", 10),
        error_rate_limit: e.number("ERROR_RATE_LIMIT", 2),
        snapshot_rate_limit: e.number("SNAPSHOT_RATE_LIMIT", 2),
        rate_interval_ms: e.number("RATE_INTERVAL", 100),
        process_amqp_drain: e.boolean("PROCESS_AMQP_DRAIN", true),
        amqp_publish_retry_delay_ms: e.number("AMQP_PUBLISH_RETRY_DELAY", 100),
        amqp_publish_retry_attempts: e.positive("AMQP_PUBLISH_RETRY_ATTEMPTS"),
        amqp_publish_max_retry_delay_ms: e.number("AMQP_PUBLISH_MAX_RETRY_DELAY", 300_000),
        amqp_persistent_messages: e.boolean("AMQP_PERSISTENT_MESSAGES", false),
        outgoing_message_size_limit: e.number("OUTGOING_MESSAGE_SIZE_LIMIT", 10_485_760),
        no_self_passthrough: e.boolean("NO_SELF_PASSTRHOUGH", false),
        protocol_version: e.number("PROTOCOL_VERSION", 1).min(u8::MAX.into()) as u8,
        no_error_replies: e.boolean("NO_ERROR_REPLIES", false),
        input_format: e.string("INPUT_FORMAT", "default"),
        object_storage_uri: e.get("OBJECT_STORAGE_URI"),
        object_storage_token: e.get("OBJECT_STORAGE_TOKEN").map(Secret::new),
        object_storage_size_threshold: e.number("OBJECT_STORAGE_SIZE_THRESHOLD", 1_048_576),
        emit_lightweight_message: e.boolean("EMIT_LIGHTWEIGHT_MESSAGE", false),
        amqp_reconnect_attempts: e.number("AMQP_RECONNECT_ATTEMPTS", 3),
        amqp_reconnect_timeout_ms: e.number("AMQP_RECONNECT_TIMEOUT", 100),
        additional_headers: additional_headers(env, e.get("ADDITIONAL_VARS_FOR_HEADERS")),
        extra_log_context: LOG_ONLY
            .iter()
            .filter_map(|key| Some((format!("{PREFIX}{key}"), e.get(key)?)))
            .collect(),
    })
}

impl Settings {
    /// `ELASTICIO_*` pairs to stamp on every log line, as sailor's logger does. Secrets, the IV and
    /// the AMQP URI (which may hold a password) are deliberately absent.
    pub fn log_context(&self) -> Vec<(String, String)> {
        let identity = [
            ("FLOW_ID", &self.flow_id),
            ("EXEC_ID", &self.exec_id),
            ("STEP_ID", &self.step_id),
            ("COMP_ID", &self.comp_id),
            ("FUNCTION", &self.function),
            ("CONTAINER_ID", &self.container_id),
            ("WORKSPACE_ID", &self.workspace_id),
            ("USER_ID", &self.user_id),
            ("API_USERNAME", &self.api_username),
        ];
        identity
            .into_iter()
            .map(|(key, value)| (format!("{PREFIX}{key}"), value.clone()))
            .chain(self.extra_log_context.iter().cloned())
            .collect()
    }
}

/// Prefixed lookups with sailor's per-type parsing.
struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    fn raw(&self, key: &str) -> Option<String> {
        (self.0)(&format!("{PREFIX}{key}"))
    }

    /// JavaScript truthiness: an empty value is as good as unset.
    fn get(&self, key: &str) -> Option<String> {
        self.raw(key).filter(|v| !v.is_empty())
    }

    fn required(&self, key: &str) -> Result<String, SettingsError> {
        self.get(key)
            .ok_or_else(|| SettingsError(format!("{PREFIX}{key} is missing")))
    }

    /// `parseInt(v) || default`. Negative values cannot mean anything for these counts and
    /// durations, so they fall back to the default too.
    fn number(&self, key: &str, default: u64) -> u64 {
        self.positive(key).unwrap_or(default)
    }

    fn positive(&self, key: &str) -> Option<u64> {
        let n = parse_int(&self.get(key)?)?;
        u64::try_from(n).ok().filter(|&n| n > 0)
    }

    fn boolean(&self, key: &str, default: bool) -> bool {
        match self.raw(key) {
            None => default,
            Some(v) => !(v.is_empty() || v == "false"),
        }
    }

    fn string(&self, key: &str, default: &str) -> String {
        self.get(key).unwrap_or_else(|| default.to_owned())
    }
}

/// JavaScript `parseInt(s)` without a radix: skip leading whitespace, optional sign, `0x` means
/// hex, then the longest run of digits. `None` where JavaScript gives `NaN`. Saturates instead of
/// losing precision the way a double would.
pub fn parse_int(s: &str) -> Option<i64> {
    let s = s.trim_start_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (radix, s) = match s.get(..2) {
        Some("0x" | "0X") => (16, &s[2..]),
        _ => (10, s),
    };
    let digits: Vec<u32> = s.chars().map_while(|c| c.to_digit(radix)).collect();
    if digits.is_empty() {
        return None;
    }
    let magnitude = digits.iter().fold(0i64, |acc, &d| {
        acc.saturating_mul(radix.into()).saturating_add(d.into())
    });
    Some(if negative { -magnitude } else { magnitude })
}

/// Each listed variable becomes a header named like sailor names it: `ELASTICIO_` stripped, then
/// lodash `camelCase`. Unset variables are skipped (sailor would send `undefined`).
fn additional_headers(
    env: &dyn Fn(&str) -> Option<String>,
    list: Option<String>,
) -> Vec<(String, String)> {
    let Some(list) = list else { return Vec::new() };
    list.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .filter_map(|name| {
            let value = env(name)?;
            Some((camel_case(name.strip_prefix(PREFIX).unwrap_or(name)), value))
        })
        .collect()
}

/// lodash `camelCase` for identifier-like input: words split at non-alphanumerics, at
/// lower→upper and letter↔digit changes, and before the last capital of an acronym
/// (`XMLHttp` → `XML`, `Http`); first word lowercased, the rest capitalised.
pub fn camel_case(name: &str) -> String {
    let mut out = String::new();
    for (i, word) in words(name).into_iter().enumerate() {
        let lower = word.to_lowercase();
        let mut chars = lower.chars();
        match chars.next() {
            Some(first) if i > 0 => {
                out.extend(first.to_uppercase());
                out.push_str(chars.as_str());
            }
            _ => out.push_str(&lower),
        }
    }
    out
}

fn words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    for chunk in s.split(|c: char| !c.is_alphanumeric()) {
        let chars: Vec<char> = chunk.chars().collect();
        let mut start = 0;
        for i in 1..chars.len() {
            let (prev, cur) = (chars[i - 1], chars[i]);
            let next_lower = chars.get(i + 1).is_some_and(|c| c.is_lowercase());
            if (prev.is_lowercase() && cur.is_uppercase())
                || (prev.is_numeric() != cur.is_numeric())
                || (prev.is_uppercase() && cur.is_uppercase() && next_lower)
            {
                words.push(chars[start..i].iter().collect());
                start = i;
            }
        }
        if start < chars.len() {
            words.push(chars[start..].iter().collect());
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const REQUIRED: &str = "FLOW_ID EXEC_ID STEP_ID CONTAINER_ID WORKSPACE_ID USER_ID COMP_ID \
        FUNCTION API_URI API_USERNAME API_KEY";
    const FOR_MESSAGES: &str = "AMQP_URI LISTEN_MESSAGES_ON PUBLISH_MESSAGES_TO DATA_ROUTING_KEY \
        ERROR_ROUTING_KEY REBOUND_ROUTING_KEY SNAPSHOT_ROUTING_KEY MESSAGE_CRYPTO_IV \
        MESSAGE_CRYPTO_PASSWORD";

    fn all_required() -> impl Iterator<Item = &'static str> {
        REQUIRED
            .split_whitespace()
            .chain(FOR_MESSAGES.split_whitespace())
    }

    /// A complete environment where each variable's value is its lowercased short name.
    fn full() -> HashMap<String, String> {
        all_required()
            .map(|k| (format!("{PREFIX}{k}"), k.to_lowercase()))
            .collect()
    }

    fn read_map(vars: &HashMap<String, String>) -> Result<Settings, SettingsError> {
        read(&|k| vars.get(k).cloned())
    }

    fn missing(vars: &HashMap<String, String>) -> String {
        read_map(vars).unwrap_err().to_string()
    }

    fn with(pairs: &[(&str, &str)]) -> Settings {
        let mut vars = full();
        vars.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        read_map(&vars).unwrap()
    }

    #[test]
    fn each_required_variable_is_reported_by_its_full_name() {
        assert_eq!(missing(&HashMap::new()), "ELASTICIO_FLOW_ID is missing");
        for key in all_required() {
            for absent in [None, Some("")] {
                let mut vars = full();
                match absent {
                    None => vars.remove(&format!("{PREFIX}{key}")),
                    Some(v) => vars.insert(format!("{PREFIX}{key}"), v.into()),
                };
                assert_eq!(missing(&vars), format!("ELASTICIO_{key} is missing"));
            }
        }
    }

    #[test]
    fn hook_shutdown_relaxes_only_the_message_variables() {
        let mut vars: HashMap<String, String> = full()
            .into_iter()
            .filter(|(k, _)| {
                REQUIRED
                    .split_whitespace()
                    .any(|r| k == &format!("{PREFIX}{r}"))
            })
            .collect();
        assert_eq!(missing(&vars), "ELASTICIO_AMQP_URI is missing");
        vars.insert("ELASTICIO_HOOK_SHUTDOWN".into(), "1".into());
        let s = read_map(&vars).unwrap();
        assert!(s.hook_shutdown);
        assert_eq!(
            (s.amqp_uri.expose(), s.listen_messages_on.as_str()),
            ("", "")
        );
        vars.remove("ELASTICIO_API_KEY");
        assert_eq!(missing(&vars), "ELASTICIO_API_KEY is missing");
    }

    #[test]
    fn parse_int_follows_javascript() {
        let cases = [
            ("12abc", Some(12)),
            ("abc", None),
            (" 42", Some(42)),
            ("-5", Some(-5)),
            ("1e3", Some(1)),
            ("0x10", Some(16)),
            ("0XfF", Some(255)),
            ("", None),
            ("0x", None),
            ("+7", Some(7)),
            ("\t\n 3.9", Some(3)),
            ("-0x10", Some(-16)),
            ("- 1", None),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_int(input), expected, "{input:?}");
        }
        assert_eq!(parse_int("99999999999999999999999"), Some(i64::MAX));
    }

    #[test]
    fn defaults_when_unset() {
        let s = with(&[]);
        assert_eq!(
            (s.rebound_initial_expiration_ms, s.rebound_limit, s.prefetch),
            (15_000, 20, 1)
        );
        assert_eq!(
            (s.data_rate_limit, s.error_rate_limit, s.rate_interval_ms),
            (10, 2, 100)
        );
        assert_eq!(s.amqp_publish_retry_attempts, None);
        assert_eq!(s.amqp_publish_max_retry_delay_ms, 300_000);
        assert_eq!(s.outgoing_message_size_limit, 10_485_760);
        assert_eq!(
            (s.protocol_version, s.input_format.as_str()),
            (1, "default")
        );
        assert!(s.process_amqp_drain && !s.hook_shutdown && !s.no_self_passthrough);
        assert!(s.object_storage_uri.is_none() && s.object_storage_token.is_none());
        assert!(s.additional_headers.is_empty());
    }

    #[test]
    fn numbers_use_parse_int_and_fall_back_on_nan_zero_and_negatives() {
        let num = |v: &str| with(&[("ELASTICIO_REBOUND_LIMIT", v)]).rebound_limit;
        let cases = [
            ("20", 20),
            ("7 days", 7),
            ("0x10", 16),
            ("abc", 20),
            ("0", 20),
            ("-3", 20),
        ];
        for (input, expected) in cases {
            assert_eq!(num(input), expected, "{input:?}");
        }
        let prefetch = |v: &str| with(&[("ELASTICIO_RABBITMQ_PREFETCH_SAILOR", v)]).prefetch;
        assert_eq!((prefetch("20"), prefetch("100000")), (20, u16::MAX));
        let attempts = |v: &str| {
            with(&[("ELASTICIO_AMQP_PUBLISH_RETRY_ATTEMPTS", v)]).amqp_publish_retry_attempts
        };
        assert_eq!(
            (attempts("5"), attempts("0"), attempts("x")),
            (Some(5), None, None)
        );
        assert_eq!(
            with(&[("ELASTICIO_PROTOCOL_VERSION", "2")]).protocol_version,
            2
        );
    }

    #[test]
    fn booleans_are_false_only_for_empty_and_false() {
        let b = |v: &str| with(&[("ELASTICIO_NO_ERROR_REPLIES", v)]).no_error_replies;
        assert!(!b("") && !b("false"));
        assert!(b("true") && b("0") && b("FALSE") && b("no"));
        assert!(!with(&[("ELASTICIO_PROCESS_AMQP_DRAIN", "")]).process_amqp_drain);
        assert!(with(&[("ELASTICIO_NO_SELF_PASSTRHOUGH", "1")]).no_self_passthrough);
    }

    #[test]
    fn strings_fall_back_when_empty() {
        assert_eq!(
            with(&[("ELASTICIO_INPUT_FORMAT", "")]).input_format,
            "default"
        );
        assert_eq!(
            with(&[("ELASTICIO_INPUT_FORMAT", "error")]).input_format,
            "error"
        );
        let s = with(&[
            ("ELASTICIO_OBJECT_STORAGE_URI", "http://m"),
            ("ELASTICIO_OBJECT_STORAGE_TOKEN", "jwt"),
        ]);
        assert_eq!(s.object_storage_uri.as_deref(), Some("http://m"));
        assert_eq!(s.object_storage_token.unwrap().expose(), "jwt");
    }

    #[test]
    fn additional_headers_are_camel_cased_in_list_order() {
        let s = with(&[
            (
                "ELASTICIO_ADDITIONAL_VARS_FOR_HEADERS",
                "ELASTICIO_FIRST, TENANT_ID ,ELASTICIO_THIRD_ELASTICIO_ENV,ELASTICIO_NOT_PRESENT,,my-var",
            ),
            ("ELASTICIO_FIRST", "first"),
            ("TENANT_ID", "t1"),
            ("ELASTICIO_THIRD_ELASTICIO_ENV", "third"),
            ("my-var", "mine"),
        ]);
        let expected = [
            ("first", "first"),
            ("tenantId", "t1"),
            ("thirdElasticioEnv", "third"),
            ("myVar", "mine"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(s.additional_headers, expected);
        assert_eq!(camel_case("CONTRACT_ID"), "contractId");
        assert_eq!(camel_case("fooBar_baz2qux"), "fooBarBaz2Qux");
        assert_eq!(camel_case("XMLHttp"), "xmlHttp");
    }

    #[test]
    fn log_context_names_identity_and_set_extras_but_no_secrets() {
        let s = with(&[("ELASTICIO_TENANT_ID", "t1"), ("ELASTICIO_COMP_NAME", "")]);
        let context = s.log_context();
        assert_eq!(
            context[0],
            ("ELASTICIO_FLOW_ID".to_string(), "flow_id".to_string())
        );
        assert!(context.contains(&("ELASTICIO_TENANT_ID".into(), "t1".into())));
        let names: Vec<&str> = context.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names.len(), 10, "{names:?}");
        for secret in [
            "API_KEY",
            "MESSAGE_CRYPTO_PASSWORD",
            "MESSAGE_CRYPTO_IV",
            "AMQP_URI",
            "COMP_NAME",
        ] {
            assert!(
                !names.contains(&format!("{PREFIX}{secret}").as_str()),
                "{secret}"
            );
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let s = with(&[("ELASTICIO_OBJECT_STORAGE_TOKEN", "object_storage_token")]);
        let debug = format!("{s:?}");
        for secret in [
            "api_key\"",
            "amqp_uri\"",
            "message_crypto_password\"",
            "object_storage_token\"",
        ] {
            assert!(!debug.contains(secret), "{secret} leaked: {debug}");
        }
        assert!(debug.contains("flow_id: \"flow_id\""));
    }
}
