//! The HTTP side: one handler that records, authenticates and routes every
//! request, plus the headers OpenAI puts on every response.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::{chat, ErrorReply, Options, RecordedRequest, Script};

pub(crate) const JSON: &str = "application/json";
pub(crate) const EVENT_STREAM: &str = "text/event-stream; charset=utf-8";
/// Far above any real chat request; only guards against runaway bodies.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// State shared by the handle and the server task.
pub(crate) struct Shared {
    pub(crate) options: Options,
    pub(crate) scripts: Mutex<VecDeque<Script>>,
    pub(crate) log: Mutex<Vec<Logged>>,
    /// Numbers requests, for `x-request-id` and completion ids.
    counter: AtomicU64,
}

pub(crate) struct Logged {
    pub(crate) request: RecordedRequest,
    pub(crate) chat: bool,
}

impl Shared {
    pub(crate) fn new(options: Options) -> Shared {
        Shared {
            options,
            scripts: Mutex::new(VecDeque::new()),
            log: Mutex::new(Vec::new()),
            counter: AtomicU64::new(0),
        }
    }
}

/// Which endpoint a request is for.
enum Route {
    /// `deployment` is `Some` on the Azure form, where it stands in for the model.
    Chat {
        deployment: Option<String>,
    },
    Models,
    Unknown,
}

impl Route {
    fn of(method: &Method, path: &str) -> Route {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method, segments.as_slice()) {
            (&Method::POST, ["v1", "chat", "completions"]) => Route::Chat { deployment: None },
            (&Method::POST, ["openai", "deployments", deployment, "chat", "completions"]) => {
                Route::Chat {
                    deployment: Some(deployment.to_string()),
                }
            }
            (&Method::GET, ["v1", "models"]) => Route::Models,
            (&Method::GET, ["openai", "deployments", _, "models"]) => Route::Models,
            _ => Route::Unknown,
        }
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    // A single fallback handler rather than axum routes: every request, whatever its
    // method or path, must be recorded and answered in OpenAI's shape (never axum's 405).
    Router::new().fallback(handle).with_state(shared)
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let started = Instant::now();
    let number = shared.counter.fetch_add(1, Ordering::Relaxed) + 1;
    let (parts, body) = request.into_parts();
    // An unreadable body is treated as empty: chat validation then reports unparsable JSON.
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .unwrap_or_default();
    let route = Route::of(&parts.method, parts.uri.path());
    let is_chat = matches!(route, Route::Chat { .. });
    // Recorded before anything can sleep, so tests see the request while it is in flight.
    shared.log.lock().unwrap().push(Logged {
        request: record(&parts, &body),
        chat: is_chat,
    });

    let mut response = match authenticate(&shared.options, &parts.headers) {
        Err(error) => error.response(),
        Ok(()) => match route {
            Route::Chat { deployment } => {
                match chat::parse(&body, deployment.as_deref(), &shared.options) {
                    Err(error) => error.response(),
                    Ok(chat_request) => {
                        // Popped only now: a request failing validation leaves the queue alone.
                        let script = shared.scripts.lock().unwrap().pop_front();
                        let id = format!("chatcmpl-fake-{number}");
                        chat::respond(&chat_request, script, &id, shared.options.latency).await
                    }
                }
            }
            Route::Models if shared.options.models_endpoint => models(&shared.options),
            Route::Models | Route::Unknown => {
                ErrorReply::invalid_url(parts.method.as_str(), parts.uri.path()).response()
            }
        },
    };

    let headers = response.headers_mut();
    if is_chat {
        // Defaults only: a scripted 429 brings its own exhausted limits.
        for (name, value) in [
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-remaining-requests", "9999"),
            ("x-ratelimit-limit-tokens", "30000000"),
            ("x-ratelimit-remaining-tokens", "29999000"),
            ("x-ratelimit-reset-requests", "6ms"),
            ("x-ratelimit-reset-tokens", "1s"),
        ] {
            set_default(headers, name, value.to_string());
        }
    }
    set_default(headers, "x-request-id", format!("req_{number}"));
    set_default(
        headers,
        "openai-processing-ms",
        started.elapsed().as_millis().to_string(),
    );
    set_default(headers, "openai-version", "2020-10-01".to_string());
    response
}

fn set_default(headers: &mut HeaderMap, name: &'static str, value: String) {
    let name = HeaderName::from_static(name);
    if !headers.contains_key(&name) {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
}

fn record(parts: &Parts, body: &[u8]) -> RecordedRequest {
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        // `HeaderName` is already lowercase; repeated headers are joined like HTTP allows.
        headers
            .entry(name.as_str().to_string())
            .and_modify(|existing| {
                existing.push_str(", ");
                existing.push_str(&value);
            })
            .or_insert(value);
    }
    RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers,
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
    }
}

/// OpenAI accepts `Authorization: Bearer <key>`; Azure uses `api-key: <key>`.
fn authenticate(options: &Options, headers: &HeaderMap) -> Result<(), Box<ErrorReply>> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    let api_key = headers
        .get("api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let key = bearer
        .filter(|k| !k.is_empty())
        .or(api_key.filter(|k| !k.is_empty()))
        .ok_or_else(|| Box::new(ErrorReply::missing_api_key()))?;
    match &options.api_key {
        Some(expected) if expected != key => Err(Box::new(ErrorReply::invalid_api_key_for(key))),
        _ => Ok(()),
    }
}

fn models(options: &Options) -> Response {
    let data: Vec<Value> = options
        .models
        .iter()
        .map(|id| {
            let owner = if id.starts_with("ft:") {
                "user-fake"
            } else {
                "system"
            };
            json!({ "id": id, "object": "model", "created": 1_700_000_000, "owned_by": owner })
        })
        .collect();
    let body = json!({ "object": "list", "data": data }).to_string();
    framed(StatusCode::OK, JSON, vec![Frame::now(body)])
}

/// One piece of a response body as it goes on the wire.
pub(crate) enum Frame {
    Data {
        delay: Duration,
        data: Bytes,
    },
    /// Kill the connection mid-body, as a crashed proxy or reset socket would.
    Abort,
}

impl Frame {
    pub(crate) fn now(data: impl Into<Bytes>) -> Frame {
        Frame::after(Duration::ZERO, data)
    }

    pub(crate) fn after(delay: Duration, data: impl Into<Bytes>) -> Frame {
        Frame::Data {
            delay,
            data: data.into(),
        }
    }
}

/// A response whose body is sent frame by frame, each its own write, honouring delays.
pub(crate) fn framed(
    status: StatusCode,
    content_type: &'static str,
    frames: Vec<Frame>,
) -> Response {
    let body = match frames.as_slice() {
        // A plain body gets a content-length, like a normal JSON answer.
        [Frame::Data { delay, data }] if delay.is_zero() => Body::from(data.clone()),
        _ => Body::from_stream(futures_util::stream::iter(frames).then(|frame| async move {
            match frame {
                Frame::Data { delay, data } => {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok(data)
                }
                Frame::Abort => {
                    // The pause lets hyper flush what was already sent; a body error then
                    // makes hyper drop the connection without the final chunk, so the
                    // client sees a truncated body instead of a clean end.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "fake-openai: scripted connection cut",
                    ))
                }
            }
        })),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if content_type == EVENT_STREAM {
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    response
}
