//! What the next chat-completion request should get: replies, OpenAI-shaped
//! errors and transport faults.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::json;

/// One scripted outcome, consumed by one chat-completion request.
#[derive(Clone, Debug)]
pub enum Script {
    /// 200 with this content / tool calls (streamed when the request asked for `"stream": true`).
    Reply(Reply),
    /// That status, an OpenAI error body and the error's headers.
    Error(ErrorReply),
    /// Sleep before sending anything (not even headers), then the default reply.
    SlowFirstByte(Duration),
    /// The default reply, dribbled out: each SSE event is delayed by the duration;
    /// a non-stream body is sent in about 4 chunks with the duration between them.
    SlowTrickle(Duration),
    /// Non-stream: 200 headers and the first half of the body, then the connection is aborted.
    /// Stream: the first 2 chunk events, then the connection is aborted (no `[DONE]`).
    CutConnection,
    /// 200 `application/json` whose body is truncated JSON.
    MalformedJson,
    /// Stream: 200, the role chunk and 2 content chunks, then `data: {"error":{...}}` and the
    /// stream ends without `[DONE]`. Non-stream request: same as [`Script::Error`].
    ErrorMidStream(ErrorReply),
}

/// A successful assistant message.
///
/// Fields are used as given: `Reply::default()` answers with `content: null`.
/// `finish_reason` defaults to `"tool_calls"` when there are tool calls, else `"stop"`.
#[derive(Clone, Debug, Default)]
pub struct Reply {
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    pub refusal: Option<String>,
    pub finish_reason: Option<String>,
}

/// A function tool call in a [`Reply`]; `arguments` is the raw JSON text the model "wrote".
#[derive(Clone, Debug)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// An OpenAI error response: status, `{"error":{"message","type","param","code"}}` and headers.
#[derive(Clone, Debug)]
pub struct ErrorReply {
    pub status: u16,
    pub error_type: String,
    pub code: Option<String>,
    pub param: Option<String>,
    pub message: String,
    pub headers: Vec<(String, String)>,
}

impl ErrorReply {
    pub fn new(status: u16, error_type: &str, code: Option<&str>, message: &str) -> Self {
        ErrorReply {
            status,
            error_type: error_type.to_string(),
            code: code.map(str::to_string),
            param: None,
            message: message.to_string(),
            headers: Vec::new(),
        }
    }

    /// Adds a response header. Panics on an invalid name or value, so a typo
    /// fails the test that wrote it rather than silently vanishing.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        HeaderName::from_bytes(name.as_bytes())
            .unwrap_or_else(|_| panic!("invalid header name {name:?}"));
        HeaderValue::from_str(value)
            .unwrap_or_else(|_| panic!("invalid value for header {name}: {value:?}"));
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    /// 429 "requests" limit hit, with `retry-after` (seconds, as sent on the wire)
    /// and OpenAI's `x-ratelimit-*` headers showing no requests left.
    pub fn rate_limited(retry_after_secs: &str) -> Self {
        // Only a plain number makes sense inside the message and the Go-style reset duration;
        // anything else (an HTTP date, garbage) is still sent verbatim in `retry-after`.
        let (wait, reset) = match retry_after_secs.trim().parse::<f64>() {
            Ok(_) => (
                format!("Please try again in {}s.", retry_after_secs.trim()),
                format!("{}s", retry_after_secs.trim()),
            ),
            Err(_) => ("Please try again later.".to_string(), "20s".to_string()),
        };
        Self::rate_limit(&wait, &reset).with_header("retry-after", retry_after_secs)
    }

    /// Like [`ErrorReply::rate_limited`], with `retry-after-ms` instead of `retry-after`.
    pub fn rate_limited_ms(retry_after_ms: u64) -> Self {
        Self::rate_limit(
            &format!("Please try again in {retry_after_ms}ms."),
            &format!("{retry_after_ms}ms"),
        )
        .with_header("retry-after-ms", &retry_after_ms.to_string())
    }

    fn rate_limit(wait: &str, reset: &str) -> Self {
        let message = format!(
            "Rate limit reached for gpt-4o-mini in organization org-fake on requests per min (RPM): \
             Limit 3, Used 3, Requested 1. {wait} \
             Visit https://platform.openai.com/account/rate-limits to learn more."
        );
        ErrorReply::new(429, "requests", Some("rate_limit_exceeded"), &message)
            .with_header("x-ratelimit-limit-requests", "3")
            .with_header("x-ratelimit-remaining-requests", "0")
            .with_header("x-ratelimit-reset-requests", reset)
            .with_header("x-ratelimit-limit-tokens", "40000")
            .with_header("x-ratelimit-remaining-tokens", "39990")
            .with_header("x-ratelimit-reset-tokens", "15ms")
    }

    pub fn insufficient_quota() -> Self {
        ErrorReply::new(
            429,
            "insufficient_quota",
            Some("insufficient_quota"),
            "You exceeded your current quota, please check your plan and billing details. \
             For more information on this error, read the docs: \
             https://platform.openai.com/docs/guides/error-codes/api-errors.",
        )
    }

    pub fn server_error() -> Self {
        ErrorReply::new(
            500,
            "server_error",
            None,
            "The server had an error while processing your request. Sorry about that!",
        )
    }

    pub fn overloaded() -> Self {
        ErrorReply::new(
            503,
            "server_error",
            Some("server_is_overloaded"),
            "That model is currently overloaded with other requests. You can retry your request, \
             or contact us through our help center at help.openai.com if the error persists.",
        )
    }

    pub fn invalid_api_key() -> Self {
        Self::invalid_api_key_for("sk-fake-key-abcd")
    }

    /// The 401 for a wrong key, masked like OpenAI does: only the last 4 characters
    /// are shown, and none at all for a key so short that 4 characters would reveal it.
    pub(crate) fn invalid_api_key_for(presented: &str) -> Self {
        let chars: Vec<char> = presented.chars().collect();
        let tail: String = if chars.len() > 8 {
            chars[chars.len() - 4..].iter().collect()
        } else {
            "****".to_string()
        };
        ErrorReply::new(
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            &format!(
                "Incorrect API key provided: sk-...{tail}. You can find your API key at \
                 https://platform.openai.com/account/api-keys."
            ),
        )
    }

    pub fn permission_denied() -> Self {
        ErrorReply::new(
            403,
            "request_forbidden",
            Some("unsupported_country_region_territory"),
            "Country, region, or territory not supported",
        )
    }

    pub fn model_not_found(model: &str) -> Self {
        ErrorReply::new(
            404,
            "invalid_request_error",
            Some("model_not_found"),
            &format!("The model `{model}` does not exist or you do not have access to it."),
        )
    }

    pub fn bad_request(param: &str, message: &str) -> Self {
        ErrorReply::new(400, "invalid_request_error", None, message).with_param(param)
    }

    pub(crate) fn missing_api_key() -> Self {
        ErrorReply::new(
            401,
            "invalid_request_error",
            None,
            "You didn't provide an API key. You need to provide your API key in an Authorization \
             header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password \
             field (with blank username) if you're accessing the API from your browser and are \
             prompted for a username. You can obtain an API key from \
             https://platform.openai.com/account/api-keys.",
        )
    }

    pub(crate) fn unparsable_json() -> Self {
        ErrorReply::new(
            400,
            "invalid_request_error",
            None,
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but \
             what was sent was not valid JSON. If you have trouble figuring out how to fix this, \
             please contact us through our help center at help.openai.com.)",
        )
    }

    pub(crate) fn invalid_url(method: &str, path: &str) -> Self {
        ErrorReply::new(
            404,
            "invalid_request_error",
            None,
            &format!("Invalid URL ({method} {path})"),
        )
    }

    /// The JSON body; all four keys are always present, as in OpenAI's responses.
    pub(crate) fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        })
    }

    pub(crate) fn response(&self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = Response::new(Body::from(self.body().to_string()));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (name, value) in &self.headers {
            // `with_header` already validated these; a hand-built invalid pair is skipped.
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.insert(name, value);
            }
        }
        response
    }
}
