//! Send Request: message in -> validate -> resolve -> build -> call -> emit.
//!
//! Each step is a function of its own so it can be read, tested and benchmarked alone;
//! [`process`] only chains them and maps failures to outcomes.

use std::time::Duration;

use serde_json::{json, Map, Value};

use super::conversation;
use super::{attachments, ActionDef, Context};
use crate::component::validate::Violations;
use crate::component::{self, Direction};
use crate::credentials::{self, ConfigError, Credentials};
use crate::emit::{ErrorEvent, Outcome};
use crate::message::Message;
use crate::openai::{CallOptions, Completion};

pub const DEF: ActionDef = ActionDef {
    name: "sendRequest",
    model_functions: &["getModels"],
    cfg_keys: &[
        "organization",
        "model",
        "customModel",
        "requestTimeout",
        "maxRetries",
        "conversationStore",
    ],
};

/// Default request timeout: the official SDKs' 10 minutes. Reasoning models routinely take more
/// than the old component's 60 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
const MAX_TIMEOUT_SECS: f64 = 24.0 * 3600.0;
const MAX_RETRIES: u32 = 10;

/// The action's own settings, from `cfg`.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub model: String,
    pub timeout: Duration,
    pub max_retries: u32,
}

/// A request ready to send.
#[derive(Debug)]
pub struct Prepared {
    pub credentials: Credentials,
    pub request: Value,
    pub options: CallOptions,
    /// The request asked for JSON output, so the reply content is parsed.
    pub wants_json: bool,
    /// The message continues a stored conversation.
    pub conversation: Option<ConversationRef>,
}

/// What the message says about its conversation (the fields are taken out of the request).
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationRef {
    pub id: String,
    pub restart: bool,
    pub token_budget: Option<usize>,
    /// `conversationStore` from `cfg`.
    pub store: Option<String>,
}

/// Runs the whole action on one message.
pub async fn process(ctx: &Context<'_>, cfg: &Value, mut msg: Message) -> Outcome {
    let attached = std::mem::take(&mut msg.attachments);
    let mut prepared = match prepare(ctx, cfg, msg) {
        Ok(prepared) => prepared,
        Err(error) => return Outcome::Error(error),
    };
    if let Some(body) = prepared.request.as_object_mut() {
        if let Err(error) =
            attachments::inline(ctx.client.http(), body, &attached, &ctx.storage).await
        {
            return Outcome::Error(error);
        }
    }
    let model = prepared.request["model"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let turn = match &prepared.conversation {
        None => None,
        Some(wanted) => match conversation::begin(ctx, wanted, &mut prepared.request).await {
            Ok(turn) => Some(turn),
            Err(outcome) => return outcome,
        },
    };
    tracing::debug!(
        model,
        streamed = prepared.request.get("stream").is_some(),
        "sending chat completion request"
    );
    let result = ctx
        .client
        .chat_completion(&prepared.credentials, &prepared.request, &prepared.options)
        .await;
    let result = match turn {
        Some(turn) => turn.finish(result).await,
        None => result,
    };
    match result {
        Ok(completion) => {
            tracing::info!(
                model,
                request_id = completion.request_id.as_deref(),
                "chat completion received"
            );
            Outcome::Data(output(completion, prepared.wants_json))
        }
        Err(error) if error.is_transient() => {
            tracing::warn!(model, error = %error, "upstream still failing after retries; rebounding");
            Outcome::Rebound(error.to_event())
        }
        Err(error) => {
            tracing::warn!(model, error = %error, "chat completion failed");
            Outcome::Error(error.to_event())
        }
    }
}

/// Validate, resolve and build: everything before the network. A failure is the error to emit.
pub fn prepare(ctx: &Context<'_>, cfg: &Value, msg: Message) -> Result<Prepared, ErrorEvent> {
    let mut body = validate(msg.body).map_err(|v| violations_event(&v))?;
    let conversation = conversation::take_fields(&mut body, cfg);
    let credentials = credentials::resolve(cfg, ctx.env).map_err(|e| e.to_event())?;
    let settings = settings(cfg).map_err(|e| e.to_event())?;
    let wants_json = matches!(
        body.get("response_format")
            .and_then(|f| f.get("type"))
            .and_then(Value::as_str),
        Some("json_object" | "json_schema")
    );
    let options = CallOptions {
        timeout: settings.timeout,
        retry: crate::openai::RetryPolicy {
            max_retries: settings.max_retries,
            ..ctx.retry.clone()
        },
    };
    Ok(Prepared {
        credentials,
        request: build_request(&settings.model, body),
        options,
        wants_json,
        conversation,
    })
}

/// Checks the body against the input schema. Top-level `null`s count as unset (a mapper leaves
/// them for unmapped fields) and are dropped, so only what the user set is sent.
pub fn validate(mut body: Value) -> Result<Map<String, Value>, Violations> {
    if let Value::Object(map) = &mut body {
        map.retain(|_, v| !v.is_null());
    }
    component::compiled(DEF.name, Direction::In).check(&body)?;
    match body {
        Value::Object(map) => Ok(map),
        _ => unreachable!("the input schema requires an object"),
    }
}

/// The chat completion request: the body as given, plus the configured model. A streamed
/// request also asks for usage, so the aggregated answer carries it like a plain one.
pub fn build_request(model: &str, mut body: Map<String, Value>) -> Value {
    body.insert("model".into(), Value::String(model.to_string()));
    if body.get("stream") == Some(&Value::Bool(true)) {
        let options = body.entry("stream_options").or_insert_with(|| json!({}));
        if let Some(options) = options.as_object_mut() {
            options.entry("include_usage").or_insert(Value::Bool(true));
        }
    }
    Value::Object(body)
}

/// Reads the action's settings from `cfg`.
pub fn settings(cfg: &Value) -> Result<Settings, ConfigError> {
    let model = credentials::text(cfg, "customModel")
        .or_else(|| credentials::text(cfg, "model"))
        .ok_or_else(|| {
            ConfigError::new(
                "model",
                "is missing: select a model, or type a model ID in `customModel`",
            )
        })?;
    let timeout = match credentials::text(cfg, "requestTimeout") {
        None => DEFAULT_TIMEOUT,
        Some(text) => text
            .parse::<f64>()
            .ok()
            .filter(|s| *s > 0.0 && *s <= MAX_TIMEOUT_SECS)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                ConfigError::new(
                    "requestTimeout",
                    "must be a number of seconds between 0 and 86400, such as 600",
                )
            })?,
    };
    let max_retries = match credentials::text(cfg, "maxRetries") {
        None => crate::openai::RetryPolicy::default().max_retries,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= MAX_RETRIES)
            .ok_or_else(|| ConfigError::new("maxRetries", "must be a whole number from 0 to 10"))?,
    };
    Ok(Settings {
        model,
        timeout,
        max_retries,
    })
}

/// The emitted message: the completion as the body. When JSON output was requested, each
/// choice's content is also given parsed, as `message.parsed`, so mappers can address fields.
pub fn output(completion: Completion, wants_json: bool) -> Message {
    let mut body = completion.body;
    if wants_json {
        let choices = body.get_mut("choices").and_then(Value::as_array_mut);
        for message in choices
            .into_iter()
            .flatten()
            .filter_map(|c| c.get_mut("message"))
        {
            let parsed = message
                .get("content")
                .and_then(Value::as_str)
                .and_then(|text| serde_json::from_str::<Value>(text).ok());
            if let Some(parsed) = parsed {
                message["parsed"] = parsed;
            }
        }
    }
    let mut message = Message::with_body(body);
    if let Some(id) = completion.request_id {
        message
            .headers
            .insert("openaiRequestId".into(), Value::String(id));
    }
    message
}

fn violations_event(violations: &Violations) -> ErrorEvent {
    ErrorEvent::new(
        "ValidationError",
        format!("{violations}\nFix the mapping of these fields in the step's input."),
        json!({ "violations": violations.0 }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_prefer_the_typed_model_and_parse_numbers_or_text() {
        let s = settings(&json!({"model": "gpt-4o", "customModel": "my-ft", "requestTimeout": "1.5", "maxRetries": 0})).unwrap();
        assert_eq!(
            s,
            Settings {
                model: "my-ft".into(),
                timeout: Duration::from_millis(1500),
                max_retries: 0
            }
        );
        let s =
            settings(&json!({"model": "gpt-4o", "customModel": "", "requestTimeout": 30})).unwrap();
        assert_eq!(
            (s.model.as_str(), s.timeout, s.max_retries),
            ("gpt-4o", Duration::from_secs(30), 2)
        );
        assert_eq!(
            settings(&json!({"model": "m"})).unwrap().timeout,
            DEFAULT_TIMEOUT
        );
    }

    #[test]
    fn bad_settings_name_their_field() {
        for (cfg, field) in [
            (json!({}), "model"),
            (
                json!({"model": "m", "requestTimeout": "soon"}),
                "requestTimeout",
            ),
            (
                json!({"model": "m", "requestTimeout": "0"}),
                "requestTimeout",
            ),
            (
                json!({"model": "m", "requestTimeout": "-5"}),
                "requestTimeout",
            ),
            (json!({"model": "m", "maxRetries": "11"}), "maxRetries"),
            (json!({"model": "m", "maxRetries": "1.5"}), "maxRetries"),
        ] {
            assert_eq!(settings(&cfg).unwrap_err().field, field, "{cfg}");
        }
    }

    #[test]
    fn only_fields_the_user_set_are_sent() {
        let body =
            validate(json!({"messages": [{"role": "user", "content": "hi"}], "temperature": null}))
                .unwrap();
        assert_eq!(
            build_request("gpt-4o", body),
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
        );
    }

    #[test]
    fn streamed_requests_ask_for_usage_without_overriding_the_user() {
        let body = |extra: Value| {
            let mut b = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
            b.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            validate(b).unwrap()
        };
        assert_eq!(
            build_request("m", body(json!({})))["stream_options"],
            json!({"include_usage": true})
        );
        assert_eq!(
            build_request(
                "m",
                body(
                    json!({"stream_options": {"include_usage": false, "include_obfuscation": false}})
                )
            )["stream_options"],
            json!({"include_usage": false, "include_obfuscation": false})
        );
    }

    #[test]
    fn json_content_is_also_given_parsed() {
        let completion = Completion {
            body: json!({"choices": [
                {"index": 0, "message": {"role": "assistant", "content": "{\"a\":1}"}},
                {"index": 1, "message": {"role": "assistant", "content": "not json"}}
            ]}),
            request_id: Some("req_1".into()),
        };
        let message = output(completion.clone(), true);
        assert_eq!(
            message.body["choices"][0]["message"]["parsed"],
            json!({"a": 1})
        );
        assert!(message.body["choices"][1]["message"]
            .get("parsed")
            .is_none());
        assert_eq!(message.headers["openaiRequestId"], "req_1");
        assert!(output(completion, false).body["choices"][0]["message"]
            .get("parsed")
            .is_none());
    }
}
