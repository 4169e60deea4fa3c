//! Platform services that run outside message processing: credential verification and the
//! dynamic model list behind the `model` dropdown.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::actions::{self, Context};
use crate::credentials;
use crate::emit::ErrorEvent;
use crate::openai::{CallError, CallOptions, RetryPolicy};

/// Services answer a person waiting on a form: keep them short.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(30);

/// The answer to `verifyCredentials`, as sailor reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verification {
    pub verified: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn service_options(ctx: &Context<'_>) -> CallOptions {
    CallOptions {
        timeout: SERVICE_TIMEOUT,
        retry: RetryPolicy {
            max_retries: 1,
            ..ctx.retry.clone()
        },
    }
}

/// Checks the credentials by listing models.
///
/// 401/403 mean the key is wrong; exhausted quota means it cannot be used. A compatible server
/// without a model list (404/405/501) is reachable and accepted the key as far as we can tell,
/// and a rate limit proves the key authenticated: both count as verified.
pub async fn verify_credentials(ctx: &Context<'_>, cfg: &Value) -> Verification {
    let refuse = |reason: String| Verification {
        verified: false,
        reason: Some(reason),
    };
    let credentials = match credentials::resolve(cfg, ctx.env) {
        Ok(c) => c,
        Err(e) => return refuse(e.to_string()),
    };
    match ctx.client.models(&credentials, &service_options(ctx)).await {
        Ok(_) => Verification {
            verified: true,
            reason: None,
        },
        Err(CallError::Api(e)) if e.status == 429 && !e.is_insufficient_quota() => Verification {
            verified: true,
            reason: None,
        },
        Err(CallError::Api(e))
            if matches!(e.status, 404 | 405 | 501) && !credentials.is_openai() =>
        {
            Verification {
                verified: true,
                reason: None,
            }
        }
        Err(e) => refuse(e.to_event().message),
    }
}

/// Runs a select-model function named in `component.json`: a sorted `{value: label}` map.
pub async fn select_model(
    ctx: &Context<'_>,
    action: &str,
    function: &str,
    cfg: &Value,
) -> Result<BTreeMap<String, String>, ErrorEvent> {
    let known = actions::find(action).is_some_and(|a| a.model_functions.contains(&function));
    if !known {
        return Err(ErrorEvent::new(
            "ConfigurationError",
            format!("action `{action}` has no model function `{function}`"),
            Value::Null,
        ));
    }
    let credentials = credentials::resolve(cfg, ctx.env).map_err(|e| e.to_event())?;
    let ids = match ctx.client.models(&credentials, &service_options(ctx)).await {
        Ok(ids) => ids,
        Err(CallError::Api(e)) if matches!(e.status, 404 | 405 | 501) => {
            return Err(ErrorEvent::new(
                "OpenAIError",
                "this server does not list its models: type the model ID in `customModel` (Model ID) instead",
                serde_json::json!({"status": e.status}),
            ))
        }
        Err(e) => return Err(e.to_event()),
    };
    // Only OpenAI's own list mixes in embeddings, audio and image models; a compatible server's
    // list is whatever it serves, so it is not second-guessed.
    let filter = credentials.is_openai();
    Ok(ids
        .into_iter()
        .filter(|id| !filter || is_chat_model(id))
        .map(|id| (id.clone(), id))
        .collect())
}

/// True for OpenAI model ids that take text chat completions (fine-tunes included).
pub fn is_chat_model(id: &str) -> bool {
    const FAMILIES: &[&str] = &["gpt-", "o1", "o3", "o4", "chatgpt-"];
    const NOT_CHAT: &[&str] = &[
        "instruct",
        "embedding",
        "tts",
        "whisper",
        "dall-e",
        "transcribe",
        "realtime",
        "audio",
        "image",
        "moderation",
    ];
    let base = id.strip_prefix("ft:").unwrap_or(id);
    FAMILIES.iter().any(|f| base.starts_with(f)) && !NOT_CHAT.iter().any(|n| base.contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_chat_models_only() {
        for id in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-5",
            "o3-mini",
            "o1",
            "chatgpt-4o-latest",
            "ft:gpt-4o-mini:acme::abc123",
            "gpt-4o-search-preview",
        ] {
            assert!(is_chat_model(id), "{id}");
        }
        for id in [
            "gpt-3.5-turbo-instruct",
            "text-embedding-3-small",
            "whisper-1",
            "tts-1",
            "dall-e-3",
            "gpt-4o-realtime-preview",
            "gpt-4o-transcribe",
            "gpt-image-1",
            "omni-moderation-latest",
            "babbage-002",
        ] {
            assert!(!is_chat_model(id), "{id}");
        }
    }
}
