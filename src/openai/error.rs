//! Everything that can go wrong talking to OpenAI, and what the user should do about it.

use std::time::Duration;

use serde_json::{json, Value};

use crate::emit::ErrorEvent;

/// A failed call. Every variant can say whether it is transient (worth a platform rebound) and
/// what the user should do.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CallError {
    /// The server answered with an error (an HTTP status, or an error event inside a stream).
    #[error("{0}")]
    Api(Box<ApiError>),
    /// No usable answer arrived: the connection failed, was cut, or timed out.
    #[error("{kind}: {detail}")]
    Transport { kind: TransportKind, detail: String },
    /// The server answered 2xx with something that is not a chat completion.
    #[error("the server answered with something that is not a chat completion: {detail}")]
    InvalidResponse {
        detail: String,
        request_id: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    Connect,
    Timeout,
    Interrupted,
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportKind::Connect => "could not connect",
            TransportKind::Timeout => "timed out",
            TransportKind::Interrupted => "the connection broke",
        })
    }
}

/// An OpenAI error answer: `{"error": {"message", "type", "param", "code"}}` plus what the
/// headers said.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// HTTP status; 200 for an error event inside a stream.
    pub status: u16,
    pub error_type: Option<String>,
    pub code: Option<String>,
    pub param: Option<String>,
    pub message: String,
    pub request_id: Option<String>,
    /// `x-should-retry`, when the server sent it.
    pub should_retry: Option<bool>,
    /// `retry-after-ms` or `retry-after`, when the server sent one.
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// Billing, not pacing: retrying can never help.
    pub fn is_insufficient_quota(&self) -> bool {
        self.code.as_deref() == Some("insufficient_quota")
            || self.error_type.as_deref() == Some("insufficient_quota")
    }

    fn label(&self) -> String {
        match self.code.as_deref().or(self.error_type.as_deref()) {
            Some(code) => format!("{} {code}", self.status),
            None => self.status.to_string(),
        }
    }

    fn advice(&self) -> &'static str {
        let code = self.code.as_deref().unwrap_or_default();
        match (self.status, code) {
            _ if self.is_insufficient_quota() => {
                "Your OpenAI account has run out of quota: add credit or raise the spending limit in the billing settings. Retrying will not help."
            }
            (_, "context_length_exceeded") => {
                "The conversation is longer than the model's context window: send fewer or shorter messages, or lower max_completion_tokens."
            }
            (_, "unsupported_parameter") => {
                "This model does not accept the field named in `param`: remove it from the message (reasoning models take max_completion_tokens instead of max_tokens)."
            }
            (_, "unsupported_value") => {
                "This model does not accept that value for the field named in `param`: remove the field or use a supported value."
            }
            (_, "model_not_found" | "DeploymentNotFound") | (404, _) => {
                "Check the model: pick one from the list or type a model ID your key can use (on Azure: the deployment name in baseUrl and the apiVersion)."
            }
            (401, _) => {
                "Check the API key in the credentials, and that the organization and project belong to that key."
            }
            (403, _) => {
                "The key may not do this: check the project's permissions and that your country or region is supported."
            }
            (429, _) => {
                "Rate limit reached: the message is handed back to the platform to retry later. Lower the flow's throughput or raise your OpenAI rate limits."
            }
            (408 | 409, _) | (500.., _) => {
                "The server had a temporary problem: the message is handed back to the platform to retry later."
            }
            (200, _) => "The server reported an error while streaming the answer; try again.",
            _ => "Fix the request field named in `param` (see OpenAI's message).",
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OpenAI answered {}: {}", self.label(), self.message)
    }
}

impl CallError {
    /// Worth retrying later as a whole (platform rebound): rate limits, server trouble and an
    /// unreachable server. Timeouts are not: the same request would most likely time out again,
    /// so the user must raise the timeout or stream.
    pub fn is_transient(&self) -> bool {
        match self {
            CallError::Api(e) => {
                !e.is_insufficient_quota()
                    && e.should_retry != Some(false)
                    && matches!(e.status, 408 | 409 | 429 | 500..)
            }
            CallError::Transport { kind, .. } => *kind != TransportKind::Timeout,
            CallError::InvalidResponse { .. } => false,
        }
    }

    pub fn request_id(&self) -> Option<&str> {
        match self {
            CallError::Api(e) => e.request_id.as_deref(),
            CallError::InvalidResponse { request_id, .. } => request_id.as_deref(),
            CallError::Transport { .. } => None,
        }
    }

    /// The sentence that tells the user what to do.
    pub fn advice(&self) -> &'static str {
        match self {
            CallError::Api(e) => e.advice(),
            CallError::Transport {
                kind: TransportKind::Timeout,
                ..
            } => "No answer within the request timeout: raise `requestTimeout`, or set `stream: true` so a long answer is not cut while it streams.",
            CallError::Transport { .. } => {
                "Check `baseUrl`, the network and any proxy (HTTPS_PROXY/NO_PROXY); the message is handed back to the platform to retry later."
            }
            CallError::InvalidResponse { .. } => {
                "Check that `baseUrl` points at an OpenAI-compatible API (usually ending in /v1)."
            }
        }
    }

    /// The error as the platform shows it.
    pub fn to_event(&self) -> ErrorEvent {
        let what = self.to_string();
        let mut message = format!("{}. {}", what.trim_end_matches('.'), self.advice());
        if let Some(id) = self.request_id() {
            message.push_str(&format!(" (request id {id})"));
        }
        let details = match self {
            CallError::Api(e) => json!({
                "status": e.status,
                "type": e.error_type,
                "code": e.code,
                "param": e.param,
                "message": e.message,
                "requestId": e.request_id,
                "retryable": self.is_transient(),
            }),
            CallError::Transport { kind, detail } => json!({
                "transport": format!("{kind:?}").to_lowercase(),
                "message": detail,
                "retryable": self.is_transient(),
            }),
            CallError::InvalidResponse { detail, request_id } => json!({
                "message": detail,
                "requestId": request_id,
                "retryable": false,
            }),
        };
        ErrorEvent::new("OpenAIError", message, details)
    }
}

/// Reads an error body leniently: OpenAI's `{"error": {...}}`, a bare string `error`, FastAPI's
/// `{"detail": ...}`, or plain text.
pub fn parse_error_body(status: u16, body: &[u8]) -> ApiError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error")).cloned();
    let field = |name: &str| {
        error
            .as_ref()
            .and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let message = field("message")
        .or_else(|| error.as_ref().and_then(Value::as_str).map(str::to_string))
        .or_else(|| {
            parsed
                .as_ref()
                .and_then(|v| v.get("detail").or_else(|| v.get("message")))
                .map(|d| d.as_str().map_or_else(|| d.to_string(), str::to_string))
        })
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                "no error details in the response".to_string()
            } else {
                text.chars().take(500).collect()
            }
        });
    ApiError {
        status,
        error_type: field("type"),
        code: field("code").or_else(|| {
            // Some servers send numeric codes.
            error
                .as_ref()
                .and_then(|e| e.get("code"))
                .and_then(Value::as_i64)
                .map(|c| c.to_string())
        }),
        param: field("param"),
        message,
        request_id: None,
        should_retry: None,
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openai_and_compatible_error_bodies() {
        let e = parse_error_body(
            429,
            br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
        );
        assert!(e.is_insufficient_quota());
        assert_eq!(e.message, "You exceeded your current quota");
        assert_eq!(e.param, None);
        assert_eq!(
            parse_error_body(400, br#"{"detail":"bad model"}"#).message,
            "bad model"
        );
        assert_eq!(
            parse_error_body(400, br#"{"error":"nope"}"#).message,
            "nope"
        );
        assert_eq!(
            parse_error_body(502, b"Bad Gateway\n").message,
            "Bad Gateway"
        );
        assert_eq!(
            parse_error_body(502, b"").message,
            "no error details in the response"
        );
    }

    #[test]
    fn transient_means_rate_limit_server_trouble_or_unreachable() {
        let api = |status, code: Option<&str>| {
            CallError::Api(Box::new(ApiError {
                code: code.map(str::to_string),
                ..parse_error_body(status, b"{}")
            }))
        };
        assert!(api(429, Some("rate_limit_exceeded")).is_transient());
        assert!(api(503, None).is_transient());
        assert!(!api(429, Some("insufficient_quota")).is_transient());
        assert!(!api(400, None).is_transient());
        assert!(!api(401, None).is_transient());
        let transport = |kind| CallError::Transport {
            kind,
            detail: String::new(),
        };
        assert!(transport(TransportKind::Connect).is_transient());
        assert!(!transport(TransportKind::Timeout).is_transient());
    }
}
