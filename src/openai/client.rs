//! The HTTP client: one pool, timeouts, retries, SSE.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, ACCEPT, CONTENT_TYPE};
use reqwest::Response;
use serde_json::{json, Value};

use super::error::{parse_error_body, ApiError, CallError, TransportKind};
use super::retry::{self, Decision, RetryPolicy};
use super::stream::Aggregate;
use crate::credentials::Credentials;

/// Time allowed to open a TCP (and TLS) connection, separate from the request timeout so a dead
/// host fails fast while a slow model may take minutes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-call settings.
#[derive(Clone, Debug, PartialEq)]
pub struct CallOptions {
    /// Non-streamed: the whole request. Streamed: until the response starts, and between chunks.
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions {
            timeout: Duration::from_secs(600),
            retry: RetryPolicy::default(),
        }
    }
}

/// A successful chat completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The chat completion object (aggregated when streamed).
    pub body: Value,
    /// OpenAI's `x-request-id`, for support requests.
    pub request_id: Option<String>,
}

/// The OpenAI client. Cheap to clone: clones share one connection pool.
#[derive(Clone, Debug)]
pub struct OpenAi {
    http: reqwest::Client,
}

impl Default for OpenAi {
    fn default() -> Self {
        Self::new()
    }
}

impl OpenAi {
    /// A client with its own connection pool. Honours `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`.
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("chatgpt-component/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the TLS backend initialises");
        OpenAi { http }
    }

    /// The underlying HTTP client, for other calls that should share the pool.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The process-wide client: every message shares its pool and warm connections.
    pub fn shared() -> &'static OpenAi {
        static CLIENT: OnceLock<OpenAi> = OnceLock::new();
        CLIENT.get_or_init(OpenAi::new)
    }

    /// `POST /chat/completions`. `request` is sent as given; with `"stream": true` the stream is
    /// consumed and aggregated.
    pub async fn chat_completion(
        &self,
        credentials: &Credentials,
        request: &Value,
        options: &CallOptions,
    ) -> Result<Completion, CallError> {
        self.chat(credentials, request, options, None).await
    }

    /// A streamed chat completion (`request` should say `"stream": true`) that also hands each
    /// piece of the first choice's text to `on_delta` as it arrives; returns the aggregated
    /// answer. Failures are retried only until the first piece was handed over: after that a
    /// retry would repeat text the caller already has.
    pub async fn chat_completion_streamed(
        &self,
        credentials: &Credentials,
        request: &Value,
        options: &CallOptions,
        on_delta: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Completion, CallError> {
        self.chat(credentials, request, options, Some(on_delta))
            .await
    }

    async fn chat(
        &self,
        credentials: &Credentials,
        request: &Value,
        options: &CallOptions,
        on_delta: Option<&(dyn Fn(&str) + Send + Sync)>,
    ) -> Result<Completion, CallError> {
        let streamed = request.get("stream") == Some(&Value::Bool(true));
        let body = Bytes::from(serde_json::to_vec(request).expect("JSON values serialize"));
        let url = credentials.url("/chat/completions");
        let delivered = AtomicBool::new(false);
        let give_up = || delivered.load(Ordering::SeqCst);
        let delivered = &delivered;
        with_retries(&options.retry, "chat completion", &give_up, || async {
            let mut builder = self
                .http
                .post(&url)
                .headers(credentials.headers().clone())
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone());
            if streamed {
                builder = builder.header(ACCEPT, "text/event-stream");
            } else {
                builder = builder.timeout(options.timeout);
            }
            let response = within(options.timeout, builder.send()).await?;
            let response = success(credentials, response).await?;
            let request_id = request_id(response.headers());
            let is_sse = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
            let body = if is_sse {
                let sink = on_delta.map(|f| DeltaSink { f, delivered });
                read_stream(credentials, response, options.timeout, &request_id, sink).await?
            } else {
                // A server that ignores `stream` answers with plain JSON: accept that too.
                let bytes = within(options.timeout, response.bytes()).await?;
                parse_completion(&bytes, &request_id)?
            };
            Ok(Completion { body, request_id })
        })
        .await
    }

    /// `GET /models`: the ids of the models the key can use, as listed.
    pub async fn models(
        &self,
        credentials: &Credentials,
        options: &CallOptions,
    ) -> Result<Vec<String>, CallError> {
        let url = credentials.url("/models");
        with_retries(&options.retry, "model list", &|| false, || async {
            let builder = self
                .http
                .get(&url)
                .headers(credentials.headers().clone())
                .timeout(options.timeout);
            let response =
                success(credentials, within(options.timeout, builder.send()).await?).await?;
            let request_id = request_id(response.headers());
            let bytes = response.bytes().await.map_err(transport)?;
            let list: Value =
                serde_json::from_slice(&bytes).map_err(|e| CallError::InvalidResponse {
                    detail: format!("the model list is not JSON ({e})"),
                    request_id: request_id.clone(),
                })?;
            let data = list.get("data").and_then(Value::as_array).ok_or_else(|| {
                CallError::InvalidResponse {
                    detail: "the model list has no `data` array".into(),
                    request_id,
                }
            })?;
            Ok(data
                .iter()
                .filter_map(|m| m.get("id").and_then(Value::as_str).map(str::to_string))
                .collect())
        })
        .await
    }
}

/// Runs `attempt` until it succeeds or the policy gives up.
/// Runs `attempt` until it succeeds or `policy` (or `give_up`) says to stop.
async fn with_retries<T, F, Fut>(
    policy: &RetryPolicy,
    what: &str,
    give_up: &(dyn Fn() -> bool + Sync),
    mut attempt: F,
) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CallError>>,
{
    let mut retries = 0;
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        if give_up() {
            return Err(error);
        }
        match policy.decide(retries, &error) {
            Decision::GiveUp => return Err(error),
            Decision::RetryAfter(delay) => {
                retries += 1;
                tracing::warn!(
                    what,
                    retry = retries,
                    delay_ms = delay.as_millis() as u64,
                    request_id = error.request_id(),
                    error = %error,
                    "retrying"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Bounds one await by the request timeout.
async fn within<T>(
    limit: Duration,
    future: impl Future<Output = reqwest::Result<T>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(limit, future).await {
        Ok(result) => result.map_err(transport),
        Err(_) => Err(timed_out(limit)),
    }
}

fn timed_out(limit: Duration) -> CallError {
    CallError::Transport {
        kind: TransportKind::Timeout,
        detail: format!("no answer within {} s", limit.as_secs_f64()),
    }
}

fn transport(error: reqwest::Error) -> CallError {
    let kind = if error.is_timeout() {
        TransportKind::Timeout
    } else if error.is_connect() {
        TransportKind::Connect
    } else {
        TransportKind::Interrupted
    };
    // The source chain holds the useful part ("connection refused"); the URL is left out.
    let detail = error_chain(&error.without_url());
    CallError::Transport { kind, detail }
}

/// An error and its sources, joined: reqwest's own text alone rarely says what went wrong.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Passes a 2xx response through; turns anything else into an [`ApiError`].
async fn success(credentials: &Credentials, response: Response) -> Result<Response, CallError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let headers = response.headers().clone();
    let body = response.bytes().await.unwrap_or_default();
    let mut error = parse_error_body(status.as_u16(), &body);
    error.message = credentials.scrub(&error.message);
    error.request_id = request_id(&headers);
    error.should_retry = retry::should_retry(&headers);
    error.retry_after = retry::retry_after(&headers);
    Err(CallError::Api(Box::new(error)))
}

fn request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Parses and normalises a non-streamed completion: lenient about what compatible servers omit
/// (`object`, choice `index`, message `role`), strict about what callers need (`choices`).
pub fn parse_completion(bytes: &[u8], request_id: &Option<String>) -> Result<Value, CallError> {
    let invalid = |detail: String| CallError::InvalidResponse {
        detail,
        request_id: request_id.clone(),
    };
    let mut body: Value = serde_json::from_slice(bytes)
        .map_err(|e| invalid(format!("the body is not JSON ({e})")))?;
    let Some(object) = body.as_object_mut() else {
        return Err(invalid("the body is not a JSON object".into()));
    };
    let Some(choices) = object.get_mut("choices").and_then(Value::as_array_mut) else {
        return Err(invalid("the body has no `choices` array".into()));
    };
    for (position, choice) in choices.iter_mut().enumerate() {
        let Some(choice) = choice.as_object_mut() else {
            return Err(invalid(format!("choices[{position}] is not an object")));
        };
        choice.entry("index").or_insert(json!(position));
        let message = choice
            .entry("message")
            .or_insert_with(|| json!({"role": "assistant", "content": null}));
        if let Some(message) = message.as_object_mut() {
            message.entry("role").or_insert(json!("assistant"));
        }
    }
    object.entry("object").or_insert(json!("chat.completion"));
    Ok(body)
}

/// Consumes an SSE stream. The timeout bounds each wait for the next event, never the whole
/// stream: a long answer that keeps arriving is never cut.
/// Where streamed text goes as it arrives, and whether any went yet.
struct DeltaSink<'a> {
    f: &'a (dyn Fn(&str) + Send + Sync),
    delivered: &'a AtomicBool,
}

async fn read_stream(
    credentials: &Credentials,
    response: Response,
    limit: Duration,
    request_id: &Option<String>,
    sink: Option<DeltaSink<'_>>,
) -> Result<Value, CallError> {
    let mut events = response.bytes_stream().eventsource();
    let mut aggregate = Aggregate::default();
    loop {
        let next = tokio::time::timeout(limit, events.next())
            .await
            .map_err(|_| timed_out(limit))?;
        let event = match next {
            None => break,
            Some(Ok(event)) => event,
            Some(Err(eventsource_stream::EventStreamError::Transport(e))) => {
                return Err(transport(e))
            }
            Some(Err(e)) => {
                return Err(CallError::InvalidResponse {
                    detail: format!("the event stream is malformed ({e})"),
                    request_id: request_id.clone(),
                })
            }
        };
        let data = event.data.trim();
        if data == "[DONE]" {
            return Ok(aggregate.finish());
        }
        if data.is_empty() {
            continue;
        }
        let chunk: Value = serde_json::from_str(data).map_err(|e| CallError::InvalidResponse {
            detail: format!("a stream chunk is not JSON ({e})"),
            request_id: request_id.clone(),
        })?;
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            // An error inside a 200 stream: surfacing it is the whole point (clients that
            // swallowed these returned truncated answers as if complete).
            let body = serde_json::to_vec(&json!({ "error": error })).unwrap_or_default();
            let mut api: ApiError = parse_error_body(200, &body);
            api.message = credentials.scrub(&api.message);
            api.request_id = request_id.clone();
            return Err(CallError::Api(Box::new(api)));
        }
        aggregate.push(&chunk);
        if let Some(sink) = &sink {
            let choices = chunk["choices"].as_array().into_iter().flatten();
            let first = choices.filter(|c| c["index"].as_u64().unwrap_or(0) == 0);
            for text in first.filter_map(|c| c["delta"]["content"].as_str()) {
                if !text.is_empty() {
                    sink.delivered.store(true, Ordering::SeqCst);
                    (sink.f)(text);
                }
            }
        }
    }
    // The server closed without `[DONE]`: fine if every choice finished, a cut otherwise.
    if aggregate.is_complete() {
        Ok(aggregate.finish())
    } else {
        Err(CallError::Transport {
            kind: TransportKind::Interrupted,
            detail: "the stream ended before the answer was complete".into(),
        })
    }
}
