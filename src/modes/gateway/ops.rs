//! Operations: health, readiness, metrics, inbound auth, and a log line plus metrics per request.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{json_reply, Gateway};

/// Alive: the process serves HTTP.
pub async fn healthz() -> &'static str {
    "ok"
}

/// Ready for traffic: not shutting down. (Upstream health is not checked: a flaky upstream must
/// not take every replica out of the Service at once.)
pub async fn readyz(State(gateway): State<Gateway>) -> Response {
    if gateway.is_stopping() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else {
        "ready".into_response()
    }
}

pub async fn metrics(State(gateway): State<Gateway>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        gateway.metrics().render(),
    )
        .into_response()
}

pub async fn not_found() -> Response {
    json_reply(
        StatusCode::NOT_FOUND,
        json!({"status": 404, "msg": "no such route: use POST /, POST /glific/parse_via_chat_gpt or POST /actions/sendRequest"}),
    )
}

/// Checks `auth_token` (Bearer) or `auth_username`/`auth_password` (Basic) when configured.
/// Health, readiness and metrics stay open so probes and scrapers need no secret.
pub async fn authenticate(
    State(gateway): State<Gateway>,
    request: Request,
    next: Next,
) -> Response {
    let config = gateway.config();
    let basic = config
        .auth_username
        .as_ref()
        .zip(config.auth_password.as_ref());
    if config.auth_token.is_none() && basic.is_none() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // The scheme name is case-insensitive (RFC 9110 section 11.1).
    let (scheme, given) = presented.split_once(' ').unwrap_or(("", ""));
    let given = given.trim();
    let bearer_ok = match &config.auth_token {
        Some(token) if scheme.eq_ignore_ascii_case("bearer") => same(token.expose(), given),
        _ => false,
    };
    let basic_ok = match basic {
        Some((user, password)) if scheme.eq_ignore_ascii_case("basic") => {
            let expected = base64::engine::general_purpose::STANDARD
                .encode(format!("{user}:{}", password.expose()));
            same(&expected, given)
        }
        _ => false,
    };
    if bearer_ok || basic_ok {
        return next.run(request).await;
    }
    let mut response = json_reply(
        StatusCode::UNAUTHORIZED,
        json!({"status": 401, "msg": "missing or wrong credentials: send the gateway's token as `Authorization: Bearer <token>` (or its Basic auth user and password)"}),
    );
    let challenge = if basic.is_some() {
        "Basic realm=\"chatgpt-component\""
    } else {
        "Bearer"
    };
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

/// Compares digests, so the time taken says nothing about how much of a secret matched.
fn same(expected: &str, given: &str) -> bool {
    Sha256::digest(expected.as_bytes()) == Sha256::digest(given.as_bytes())
}

/// Counts and times every request, and logs one line for it: never headers or bodies, which
/// may hold keys or personal data.
pub async fn observe(State(gateway): State<Gateway>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().clone();
    let response = next.run(request).await;
    let status = response.status();
    let elapsed = started.elapsed();
    let metrics = gateway.metrics();
    metrics
        .requests
        .with_label_values(&[route.as_str(), status.as_str()])
        .inc();
    metrics
        .request_seconds
        .with_label_values(&[route.as_str()])
        .observe(elapsed.as_secs_f64());
    if !matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics") {
        tracing::info!(
            %method,
            route,
            status = status.as_u16(),
            ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    }
    response
}

/// A request header as text, if present and printable.
pub fn header_text<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}
