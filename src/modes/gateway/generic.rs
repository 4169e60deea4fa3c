//! `POST /actions/{action}`: any HTTP client can run an action. The body is `{"cfg": ...,
//! "msg": ...}`; the reply is the events the action emitted, as `exec` prints them (a data,
//! error or rebound event, then `end`), with a status that says which.
//!
//! `cfg` may be left out: the server's key and model are used. A request that brings its own
//! `apiKey` uses it with its own endpoint settings; one that does not may not point the
//! server's key at another endpoint (`baseUrl`, `authStyle`, `apiVersion`), or any caller could
//! collect the key with a server of their own.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::{json_reply, Gateway, Refusal};
use crate::actions;
use crate::credentials;
use crate::emit::{ErrorEvent, Event, Outcome};
use crate::message::Message;

/// Credential keys that decide where the key is sent.
const ENDPOINT_KEYS: &[&str] = &["baseUrl", "authStyle", "apiVersion"];

fn events(status: StatusCode, outcome: Outcome) -> Response {
    json_reply(status, json!([Event::from(outcome), Event::End]))
}

fn invalid(message: impl Into<String>, details: Value) -> ErrorEvent {
    ErrorEvent::new("ValidationError", message, details)
}

pub async fn handle(
    State(gateway): State<Gateway>,
    Path(action): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if actions::find(&action).is_none() {
        let known: Vec<_> = actions::ACTIONS.iter().map(|a| a.name).collect();
        return events(
            StatusCode::NOT_FOUND,
            Outcome::Error(ErrorEvent::new(
                "ConfigurationError",
                format!(
                    "unknown action `{action}`; this component has: {}",
                    known.join(", ")
                ),
                Value::Null,
            )),
        );
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            return events(
                rejection.status(),
                Outcome::Error(ErrorEvent::new(
                    "ValidationError",
                    rejection.body_text(),
                    Value::Null,
                )),
            )
        }
    };
    let (cfg, msg) = match parse(&gateway, &body) {
        Ok(parsed) => parsed,
        Err(error) => return events(StatusCode::BAD_REQUEST, Outcome::Error(error)),
    };
    let ticket = match gateway.admit() {
        Ok(ticket) => ticket,
        Err(refusal) => return refused(refusal),
    };
    match gateway.call(&ticket, &cfg, msg).await {
        Ok(message) => events(StatusCode::OK, Outcome::Data(message)),
        Err(refusal) => refused(refusal),
    }
}

fn refused(refusal: Refusal) -> Response {
    let outcome = match &refusal {
        Refusal::Failed(e) => Outcome::Error(e.clone()),
        other => Outcome::Rebound(other.to_event()),
    };
    refusal.decorate(events(refusal.status(), outcome))
}

/// The `cfg` to run with (the server's, overlaid by the request's) and the message.
fn parse(gateway: &Gateway, body: &[u8]) -> Result<(Value, Message), ErrorEvent> {
    let mut request: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => map,
        Ok(_) => {
            return Err(invalid(
                "the body must be a JSON object: {\"cfg\": {...}, \"msg\": {...}}",
                Value::Null,
            ))
        }
        Err(e) => {
            return Err(invalid(
                format!("the body is not valid JSON: {e}"),
                Value::Null,
            ))
        }
    };
    let mut given = match request.remove("cfg") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(cfg)) => cfg,
        Some(_) => {
            return Err(invalid(
                "/cfg must be an object",
                json!({"pointer": "/cfg"}),
            ))
        }
    };
    let msg = match request.remove("msg") {
        Some(msg @ Value::Object(_)) => Message::from_json(msg).map_err(|e| {
            invalid(
                format!("/msg is not a message: {e}"),
                json!({"pointer": "/msg"}),
            )
        })?,
        Some(_) => {
            return Err(invalid(
                "/msg must be an object: {\"body\": {...}}",
                json!({"pointer": "/msg"}),
            ))
        }
        None => {
            return Err(invalid(
                "/msg is missing: send {\"msg\": {\"body\": {...}}}",
                json!({"pointer": "/msg"}),
            ))
        }
    };
    // Unset (null or blank, as a mapper leaves it): the server's value applies.
    given.retain(|_, v| !v.is_null() && v.as_str().is_none_or(|s| !s.trim().is_empty()));
    let server = gateway.action_cfg();
    let mut cfg = if credentials::text(&Value::Object(given.clone()), "apiKey").is_some() {
        // The caller's own key: only the server's non-credential defaults apply.
        let mut base = Map::new();
        for key in ["model", "requestTimeout", "maxRetries"] {
            base.insert(key.into(), server[key].clone());
        }
        base
    } else {
        if let Some(key) = ENDPOINT_KEYS.iter().find(|k| given.contains_key(**k)) {
            return Err(invalid(
                format!("/cfg/{key} cannot be set without /cfg/apiKey: the server's key is only sent to the server's endpoint"),
                json!({"pointer": format!("/cfg/{key}")}),
            ));
        }
        server.as_object().cloned().unwrap_or_default()
    };
    cfg.extend(given);
    Ok((Value::Object(cfg), msg))
}
